//! Compiles the repository's `proto/` at build time with protox (pure Rust), so no `protoc`
//! install is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The .proto files stay at the top of the repository, where participants and other clients
    // look for them.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(["saga/v1/saga.proto"], [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("saga_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("saga_descriptor.bin"))
        .skip_protoc_run()
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
