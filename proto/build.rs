//! Generates the tonic/prost code and a descriptor set for server reflection,
//! with a vendored protoc so a fresh machine needs no install step.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    unsafe_set_protoc(&protoc);

    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "weft/v1/types",
        "weft/v1/topology",
        "weft/v1/ipam",
        "weft/v1/admin",
        "weft/agent/v1/cni",
    ]
    .map(|name| PathBuf::from(format!("proto/{name}.proto")));
    tonic_prost_build::configure()
        .codec_path("crate::codec::WeftCodec")
        .file_descriptor_set_path(out.join("weft_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;
    // Printing any rerun-if line disables cargo's default scan, so name the
    // whole proto tree or .proto edits go unnoticed.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // Edition 2024 marks set_var unsafe because other threads may read the
    // environment; a build script has no other threads at this point.
    unsafe { env::set_var("PROTOC", path) };
}
