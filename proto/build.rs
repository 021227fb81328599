//! Compiles proto/upkeep/v1/*.proto with protox (pure Rust), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/upkeep/v1/common.proto",
        "proto/upkeep/v1/agent.proto",
        "proto/upkeep/v1/operator.proto",
        "proto/upkeep/v1/join.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Every generated method uses our codec: tonic-prost's with small per-stream buffers (src/codec.rs).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
