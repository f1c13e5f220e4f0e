#!/usr/bin/env python3
"""A Keel client generated from nothing but proto/ (grpcio-tools), as any language would.

It lists Deployments, watches from the list's resourceVersion, creates a Deployment, updates
it, and checks that the watch delivered both changes.
Usage: python_client.py HOST:PORT TLS_DIR (TLS_DIR holds ca.crt, tls.crt and tls.key)
"""
import os
import queue
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def secure_channel(addr, tls_dir):
    """mTLS as every Keel port requires: the cluster CA plus a client certificate. Server
    certificates name "keel-server" whatever their address."""
    def read(name):
        with open(os.path.join(tls_dir, name), "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read("ca.crt"), private_key=read("tls.key"), certificate_chain=read("tls.crt")
    )
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "keel-server")])


def generate():
    out = tempfile.mkdtemp(prefix="keel-py-")
    proto_dir = os.path.join(ROOT, "proto")
    files = sorted(f"keel/v1/{f}" for f in os.listdir(os.path.join(proto_dir, "keel/v1")) if f.endswith(".proto"))
    args = ["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}"] + files
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    addr, tls_dir = sys.argv[1], sys.argv[2]
    generate()
    from keel.v1 import apps_pb2, core_pb2, meta_pb2, objects_pb2, objects_pb2_grpc

    def deployment(replicas, resource_version=""):
        labels = {"app": "py-web"}
        return objects_pb2.Object(
            deployment=apps_pb2.Deployment(
                metadata=meta_pb2.ObjectMeta(name="py-web", namespace="default", resource_version=resource_version),
                spec=apps_pb2.DeploymentSpec(
                    replicas=replicas,
                    selector=meta_pb2.LabelSelector(match_labels=labels),
                    template=core_pb2.PodTemplateSpec(
                        metadata=meta_pb2.ObjectMeta(labels=labels),
                        spec=core_pb2.PodSpec(containers=[core_pb2.Container(name="web", image="nginx:1.25")]),
                    ),
                ),
            )
        )

    channel = secure_channel(addr, tls_dir)
    grpc.channel_ready_future(channel).result(timeout=20)
    objects = objects_pb2_grpc.ObjectsStub(channel)

    listed = objects.List(objects_pb2.ListRequest(kind="Deployment", namespace="default"), timeout=10)
    events = queue.Queue()
    watch = objects.Watch(
        objects_pb2.WatchObjectsRequest(kind="Deployment", namespace="default", resource_version=listed.resource_version)
    )

    def pump():
        try:
            for ev in watch:
                events.put(ev)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()

    created = objects.Create(objects_pb2.CreateRequest(object=deployment(2)), timeout=10)
    rv = created.deployment.metadata.resource_version
    updated = objects.Update(objects_pb2.UpdateRequest(object=deployment(3, rv)), timeout=10)
    assert updated.deployment.metadata.generation == 2, updated.deployment.metadata

    seen = []
    while len(seen) < 2:
        ev = events.get(timeout=10)
        seen.append((ev.type, ev.object.deployment.metadata.name, ev.object.deployment.spec.replicas))
    watch.cancel()
    assert seen == [("ADDED", "py-web", 2), ("MODIFIED", "py-web", 3)], seen
    objects.Delete(objects_pb2.DeleteRequest(ref=objects_pb2.ObjectRef(kind="deploy", namespace="default", name="py-web")))
    print("python generated client: " + ", ".join(f"{t} {n} (replicas {r})" for t, n, r in seen))


if __name__ == "__main__":
    main()
