//! Compiles `proto/` into Rust (server and client stubs) and writes the file descriptor set that
//! gRPC server reflection serves, so `grpcurl list/describe` work without the .proto files.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs no system protoc.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut prost = prost_build::Config::new();
    prost.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let vendored_includes = protoc_bin_vendored::include_path()?;

    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::Codec")
        .file_descriptor_set_path(out_dir.join("latchkey_descriptor.bin"))
        .compile_with_config(
            prost,
            &[
                PathBuf::from("proto/latchkey/v1/lock.proto"),
                PathBuf::from("proto/latchkey/v1/stock.proto"),
            ],
            &[PathBuf::from("proto"), vendored_includes],
        )?;
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds migrations/ at compile time.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
