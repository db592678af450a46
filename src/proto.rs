//! Generated protobuf and gRPC code for containerd's wire contracts.
//! Nothing outside `snapshotter/` (and the client in `pull`) uses these types.
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
    }
}
