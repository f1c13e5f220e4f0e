//! Compiles `proto/` into Rust types, tonic services and serde (pbjson) implementations with
//! Kubernetes' JSON field names, and writes a descriptor set that feeds gRPC reflection.

use std::path::PathBuf;

const KEEL_PROTOS: &[&str] = &[
    "proto/keel/v1/kv.proto",
    "proto/keel/v1/raft.proto",
    "proto/keel/v1/meta.proto",
    "proto/keel/v1/core.proto",
    "proto/keel/v1/apps.proto",
    "proto/keel/v1/batch.proto",
    "proto/keel/v1/coordination.proto",
    "proto/keel/v1/objects.proto",
    "proto/keel/v1/cluster.proto",
    "proto/keel/v1/node.proto",
];

/// Types written by hand: IntOrString because its JSON form is not protobuf's (e.g.
/// `targetPort: 8080` or `targetPort: http`), WatchEvent so that a server can send one
/// encoding of an object to every watcher.
const HAND_WRITTEN: &[(&str, &str)] = &[
    (".keel.v1.IntOrString", "crate::api::IntOrString"),
    (".keel.v1.WatchEvent", "crate::proto::watch_event::WatchEvent"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("keel_descriptor.bin");
    let mut cfg = tonic_prost_build::configure().file_descriptor_set_path(&descriptors);
    for (proto, rust) in HAND_WRITTEN {
        cfg = cfg.extern_path(*proto, *rust);
    }
    cfg.compile_protos(KEEL_PROTOS, &["proto"])?;

    let bytes = std::fs::read(&descriptors)?;
    let mut json = pbjson_build::Builder::new();
    json.register_descriptors(&bytes)?;
    // The hand-written types bring their own serde.
    json.exclude(HAND_WRITTEN.iter().map(|(proto, _)| *proto));
    json.build(&[".keel"])?;

    // The benchmark talks to etcd through etcd's own wire protocol.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/etcd/etcdserverpb/rpc.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
