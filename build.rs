//! Compiles `proto/` into Rust types and tonic services, and writes a descriptor set that
//! feeds gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/keel/v1/kv.proto", "proto/keel/v1/raft.proto"];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keel_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    // The benchmark talks to etcd through etcd's own wire protocol.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/etcd/etcdserverpb/rpc.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
