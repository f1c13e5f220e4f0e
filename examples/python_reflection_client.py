#!/usr/bin/env python3
"""A Keel client that knows nothing but the server's address: it discovers the Objects API
through gRPC reflection, builds messages from the descriptors it received, creates a
ConfigMap, updates it, and checks that a watch saw both changes. Usage: ... HOST:PORT
"""
import queue
import sys
import threading

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main():
    addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7001"
    channel = grpc.insecure_channel(addr)
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
