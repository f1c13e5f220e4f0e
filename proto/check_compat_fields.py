#!/usr/bin/env python3
"""Dev tool: check that the keel.v1 object protos accept the Kubernetes example manifests.

For every YAML document under the compat corpus (default /work/shared/compat/k8s-docs)
whose kind is modelled in proto/keel/v1, this walks every key path and checks that it
exists as a proto3 JSON name (json_name) in the corresponding message, recursively, and
that the value has the right shape (object / list / map / scalar; IntOrString accepts a
bare number or string). Documents that pass are then parsed for real with
google.protobuf.json_format.ParseDict, after applying the custom mappings the Rust side
will implement (IntOrString scalar -> oneof, YAML timestamps -> RFC 3339 text,
ControllerRevision.data raw JSON -> bytes).

Known-invalid upstream examples are listed in EXPECTED; an apiVersion other than the served one is only
noted (it is not a field problem). The exit status is 1 only when a
problem outside that list shows up (or an expected one disappears).

Needs: protoc on PATH, `pip install protobuf pyyaml`.
Usage: python3 proto/check_compat_fields.py [--docs DIR] [-v]
"""

import argparse
import base64
import binascii
import datetime
import json
import os
import subprocess
import sys
import tempfile

import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor as FD

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_FILES = [
    "keel/v1/meta.proto",
    "keel/v1/core.proto",
    "keel/v1/apps.proto",
    "keel/v1/batch.proto",
    "keel/v1/coordination.proto",
]
# kind -> expected apiVersion (the message is keel.v1.<kind> unless in MESSAGE_FOR_KIND).
KINDS = {
    "Namespace": "v1", "Node": "v1", "Pod": "v1", "Service": "v1", "Endpoints": "v1",
    "ConfigMap": "v1", "Secret": "v1", "Event": "v1", "ReplicationController": "v1",
    "ReplicaSet": "apps/v1", "Deployment": "apps/v1", "DaemonSet": "apps/v1",
    "StatefulSet": "apps/v1", "ControllerRevision": "apps/v1",
    "Job": "batch/v1", "CronJob": "batch/v1", "Lease": "coordination.k8s.io/v1",
}
# Kinds whose message is not keel.v1.<kind> (keel.v1.Event is kv.proto's watch event).
MESSAGE_FOR_KIND = {"Event": "CoreEvent"}
INT_OR_STRING = "keel.v1.IntOrString"
RAW_JSON_FIELDS = {("keel.v1.ControllerRevision", "data")}

# (relative file, path) -> reason. These documents are invalid Kubernetes as published.
EXPECTED = {
    ("pods/pod-with-node-affinity.yaml",
     "Pod.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"):
        "upstream example bug: required term given as a list of preferred-style terms; "
        "Kubernetes expects an object {nodeSelectorTerms: [...]}",
    ("pods/pod-with-node-affinity.yaml",
     "Pod.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution[].preference"):
        "same bug: preference belongs to preferredDuringScheduling... terms",
    ("pods/pod-with-node-affinity.yaml",
     "Pod.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution[].weight"):
        "same bug: weight belongs to preferredDuringScheduling... terms",
    ("secret/serviceaccount/mysecretname.yaml", "Secret.metadata.annotations"):
        "upstream example bug: annotations written as a list; Kubernetes requires a map",
    ("pods/probe/grpc-liveness.yaml", "Pod.spec.containers[].livenessProbe.gRPC"):
        "upstream example typo: the Kubernetes field is `grpc` (JSON names are case-sensitive)",
    ("secret/tls-auth-secret.yaml", "Secret.data.tls.crt"):
        "placeholder REPLACE_WITH_BASE64_CERT is not base64; the API server rejects it too",
    ("secret/tls-auth-secret.yaml", "Secret.data.tls.key"):
        "placeholder REPLACE_WITH_BASE64_KEY is not base64; the API server rejects it too",
}


def load_pool():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k8s.pb")
        subprocess.run(
            ["protoc", "-I", HERE, "--include_imports", f"--descriptor_set_out={out}", *PROTO_FILES],
            check=True,
        )
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return pool


def is_map(fd):
    return (fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry)


def is_repeated(fd):
    # `label` is deprecated in newer protobuf releases; prefer is_repeated when present.
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return rep if isinstance(rep, bool) else rep()
    return fd.label == FD.LABEL_REPEATED


def scalar_ok(fd, v):
    """Whether YAML value v is acceptable for singular scalar field fd."""
    t = fd.type
    if t == FD.TYPE_STRING:
        # YAML turns unquoted timestamps into datetime; they are strings on the wire.
        return isinstance(v, (str, datetime.date, datetime.datetime))
    if t == FD.TYPE_BYTES:
        if not isinstance(v, str):
            return False
        try:
            base64.b64decode(v, validate=True)
            return True
        except (binascii.Error, ValueError):
            return False
    if t == FD.TYPE_BOOL:
        return isinstance(v, bool)
    if t in (FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64,
             FD.TYPE_SINT32, FD.TYPE_SINT64):
        return isinstance(v, int) and not isinstance(v, bool)
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return False


def kind_name(v):
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "list"
    return type(v).__name__


class Checker:
    def __init__(self):
        self.problems = []  # (path, message)

    def message(self, desc, obj, path):
        if obj is None:
            return
        if desc.full_name == INT_OR_STRING:
            if not (isinstance(obj, (int, str)) and not isinstance(obj, bool)):
                self.problems.append((path, f"IntOrString needs a number or string, got {kind_name(obj)}"))
            return
        if not isinstance(obj, dict):
            self.problems.append((path, f"expected object ({desc.name}), got {kind_name(obj)}"))
            if isinstance(obj, list):  # look inside anyway, to name the stray keys
                for item in obj:
                    if isinstance(item, dict):
                        self.message(desc, item, path + "[]")
            return
        by_json = {f.json_name: f for f in desc.fields}
        for key, val in obj.items():
            sub = f"{path}.{key}"
            fd = by_json.get(key)
            if fd is None:
                self.problems.append((sub, f"unknown field in {desc.name}"))
                continue
            self.field(desc, fd, val, sub)

    def field(self, parent, fd, val, path):
        if val is None:
            return
        if (parent.full_name, fd.name) in RAW_JSON_FIELDS:
            return  # arbitrary JSON by design
        if is_map(fd):
            if not isinstance(val, dict):
                self.problems.append((path, f"expected map, got {kind_name(val)}"))
                return
            vfd = fd.message_type.fields_by_name["value"]
            for k, v in val.items():
                if not isinstance(k, str):
                    self.problems.append((f"{path}.{k}", f"map key is {kind_name(k)}, not a string"))
                self.single(vfd, v, f"{path}.{k}")
            return
        if is_repeated(fd):
            if not isinstance(val, list):
                self.problems.append((path, f"expected list, got {kind_name(val)}"))
                return
            for item in val:
                self.single(fd, item, path + "[]")
            return
        self.single(fd, val, path)

    def single(self, fd, val, path):
        if val is None:
            return
        if fd.type == FD.TYPE_MESSAGE:
            self.message(fd.message_type, val, path)
        elif not scalar_ok(fd, val):
            self.problems.append((path, f"expected {FD_TYPE_NAMES.get(fd.type, fd.type)}, got {kind_name(val)}"))


FD_TYPE_NAMES = {FD.TYPE_STRING: "string", FD.TYPE_BYTES: "base64 bytes", FD.TYPE_BOOL: "bool",
                 FD.TYPE_INT32: "int32", FD.TYPE_INT64: "int64"}


def to_proto_json(desc, obj):
    """Apply the custom mappings so json_format.ParseDict sees canonical proto3 JSON."""
    if obj is None:
        return None
    if desc.full_name == INT_OR_STRING:
        return {"intVal": obj} if isinstance(obj, int) else {"strVal": obj}
    out = {}
    by_json = {f.json_name: f for f in desc.fields}
    for key, val in obj.items():
        fd = by_json[key]
        if (desc.full_name, fd.name) in RAW_JSON_FIELDS:
            out[key] = base64.b64encode(json.dumps(val, default=str).encode()).decode()
        elif val is None:
            out[key] = None
        elif is_map(fd):
            vfd = fd.message_type.fields_by_name["value"]
            out[key] = {str(k): conv(vfd, v) for k, v in val.items()}
        elif is_repeated(fd):
            out[key] = [conv(fd, v) for v in val]
        else:
            out[key] = conv(fd, val)
    return out


def conv(fd, v):
    if fd.type == FD.TYPE_MESSAGE:
        return to_proto_json(fd.message_type, v)
    if isinstance(v, datetime.datetime):
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, datetime.date):
        return v.isoformat()
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="/work/shared/compat/k8s-docs")
    ap.add_argument("-v", "--verbose", action="store_true", help="list passing documents too")
    args = ap.parse_args()

    pool = load_pool()
    total = passed = 0
    seen_expected = set()
    unexpected = []
    per_kind = {}
    for root, _, files in os.walk(args.docs):
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, args.docs)
            try:
                with open(full) as f:
                    docs = list(yaml.safe_load_all(f))
            except yaml.YAMLError as e:
                print(f"SKIP {rel}: not parseable YAML ({e.__class__.__name__})")
                continue
            for i, doc in enumerate(docs):
                if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
                    continue
                kind = doc["kind"]
                total += 1
                label = rel if len(docs) == 1 else f"{rel}#{i}"
                desc = pool.FindMessageTypeByName(f"keel.v1.{MESSAGE_FOR_KIND.get(kind, kind)}")
                c = Checker()
                c.message(desc, doc, kind)
                if doc.get("apiVersion") != KINDS[kind]:
                    # Not a field problem: an old group version (e.g. batch/v1beta1) of the kind.
                    print(f"NOTE {label}: apiVersion {doc.get('apiVersion')!r}, Keel serves {KINDS[kind]!r}")
                if not c.problems:
                    try:
                        cls = message_factory.GetMessageClass(desc)
                        json_format.ParseDict(to_proto_json(desc, doc), cls())
                    except json_format.ParseError as e:
                        c.problems.append((kind, f"json_format.ParseDict failed: {e}"))
                ok, bad = per_kind.get(kind, (0, 0))
                if c.problems:
                    per_kind[kind] = (ok, bad + 1)
                    print(f"FAIL {label}")
                    for path, msg in c.problems:
                        reason = EXPECTED.get((rel, path))
                        if reason:
                            seen_expected.add((rel, path))
                            print(f"    {path}: {msg}  [expected: {reason}]")
                        else:
                            unexpected.append((label, path, msg))
                            print(f"    {path}: {msg}  [UNEXPECTED]")
                else:
                    per_kind[kind] = (ok + 1, bad)
                    passed += 1
                    if args.verbose:
                        print(f"ok   {label}")

    print()
    for kind in sorted(per_kind):
        ok, bad = per_kind[kind]
        print(f"  {kind:<22} {ok:>3} pass {bad:>3} fail")
    print(f"{passed} of {total} documents of covered kinds pass the field check")
    missing = {(rel, path) for rel, path in set(EXPECTED) - seen_expected
               if os.path.exists(os.path.join(args.docs, rel))}
    for rel, path in sorted(missing):
        print(f"expected problem not seen (list out of date?): {rel} {path}")
    if unexpected:
        print(f"{len(unexpected)} unexpected problem(s)")
    return 1 if unexpected or missing else 0


if __name__ == "__main__":
    sys.exit(main())
