//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and
//! generates tonic/prost code for containerd's services.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/services/leases/v1/leases.proto",
        "proto/containerd/services/content/v1/content.proto",
        "proto/containerd/services/images/v1/images.proto",
        "proto/containerd/services/diff/v1/diff.proto",
        "proto/containerd/types/mount.proto",
        "proto/containerd/types/descriptor.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    // Our own minimal subset of the Kubernetes CRI v1 API (package runtime.v1),
    // client only: the tests drive containerd's CRI plugin with it.
    let cri = "proto/k8s/cri/v1/api.proto";
    println!("cargo:rerun-if-changed={cri}");
    let fds = protox::compile([cri], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
