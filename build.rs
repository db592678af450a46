//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and
//! generates tonic/prost code for containerd's snapshotter service.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/types/mount.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
