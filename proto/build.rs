//! Compiles the `.proto` files with `protox` (pure Rust, no system `protoc`) and generates the
//! tonic clients and servers, plus a descriptor set for gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "lienthong/v1/exchange.proto",
    "lienthong/v1/admin.proto",
    "lienthong/v1/audit.proto",
    "lienthong/v1/queue.proto",
    "lienthong/v1/storage.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let file_descriptors = protox::compile(PROTO_FILES, ["."])?;

    // `file_descriptor_set_path` only applies when protoc runs, so the set is written by hand.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("lienthong_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .build_client(true)
        .build_server(true)
        .compile_fds(file_descriptors)?;
    Ok(())
}
