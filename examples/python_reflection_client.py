#!/usr/bin/env python3
"""A Keel client that knows nothing but the server's address: it discovers the Objects API
through gRPC reflection, builds messages from the descriptors it received, creates a
ConfigMap, updates it, and checks that a watch saw both changes.
Usage: python_reflection_client.py HOST:PORT TLS_DIR (TLS_DIR holds ca.crt, tls.crt, tls.key)
"""
import os
import queue
import sys
import threading

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


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


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    addr, tls_dir = sys.argv[1], sys.argv[2]
    channel = secure_channel(addr, tls_dir)
    grpc.channel_ready_future(channel).result(timeout=20)
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "keel.v1.Objects" in db.get_services(), db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("keel.v1.Objects")

    def msg(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    def method(name, stream=False):
        m = service.FindMethodByName(name)
        path = f"/{service.full_name}/{m.name}"
        out = msg(m.output_type.full_name)
        kind = channel.unary_stream if stream else channel.unary_unary
        return kind(path, request_serializer=lambda r: r.SerializeToString(), response_deserializer=out.FromString)

    Object, ConfigMap, ObjectMeta = msg("keel.v1.Object"), msg("keel.v1.ConfigMap"), msg("keel.v1.ObjectMeta")

    def config(value, rv=""):
        meta = ObjectMeta(name="reflected", namespace="default", resource_version=rv)
        return Object(config_map=ConfigMap(metadata=meta, data={"greeting": value}))

    listed = method("List")(msg("keel.v1.ListRequest")(kind="cm", namespace="default"), timeout=10)
    events = queue.Queue()
    watch = method("Watch", stream=True)(
        msg("keel.v1.WatchObjectsRequest")(kind="cm", namespace="default", resource_version=listed.resource_version)
    )
    def pump():
        try:
            for e in watch:
                events.put(e)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()

    created = method("Create")(msg("keel.v1.CreateRequest")(object=config("hello")), timeout=10)
    rv = created.config_map.metadata.resource_version
    method("Update")(msg("keel.v1.UpdateRequest")(object=config("hello again", rv)), timeout=10)
    seen = []
    while len(seen) < 2:
        ev = events.get(timeout=10)
        seen.append((ev.type, ev.object.config_map.data["greeting"]))
    watch.cancel()
    assert seen == [("ADDED", "hello"), ("MODIFIED", "hello again")], seen
    print("python reflection client: " + ", ".join(f"{t} greeting={v!r}" for t, v in seen))


if __name__ == "__main__":
    main()
