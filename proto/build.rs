//! Generates the `shoal.v1` protobuf/gRPC code without a system `protoc`:
//! `protox` parses the `.proto` files (it bundles the well-known types) and
//! `tonic-prost-build` generates messages, clients and servers from the
//! resulting descriptor set. The encoded descriptor set (with imports and
//! comments) is also written to `$OUT_DIR/shoal_descriptor.bin` for
//! tonic-reflection.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_dir = manifest_dir.join("shoal").join("v1");

    println!("cargo:rerun-if-changed=build.rs");
    // A directory: cargo rescans it entirely, so added/removed files count too.
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let files = proto_files(&proto_dir)?;
    if files.is_empty() {
        return Err(format!("no .proto files in {}", proto_dir.display()).into());
    }

    let mut compiler = protox::Compiler::new([&manifest_dir])?;
    compiler.include_imports(true).include_source_info(true);
    for file in &files {
        // Names relative to the include root, as in `import` statements.
        let name = file.strip_prefix(&manifest_dir)?;
        compiler.open_file(name)?;
    }

    fs::write(
        out_dir.join("shoal_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A manifest's chunk table goes into every order for its blob (32 KiB for 1 GiB,
        // 20,000 orders in a big Distribute): shared, not copied per order.
        .bytes(".shoal.v1.Manifest.chunk_digests")
        .emit_rerun_if_changed(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// The `.proto` files directly in `dir`, sorted for reproducible output.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
