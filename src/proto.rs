//! Generated protobuf and gRPC code for containerd's wire contracts.
//! Nothing outside `snapshotter/` (the server) and `pull` (the containerd client) uses these types.
#![allow(clippy::all, missing_docs)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod diff {
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
    }
}

/// Minimal Kubernetes CRI v1 client (`proto/k8s/cri/v1/api.proto`), used by the tests.
pub mod cri {
    tonic::include_proto!("runtime.v1");
}
