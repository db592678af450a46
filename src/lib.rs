//! streamsnap: a containerd remote snapshotter that mounts OCI image layers
//! as read-only FUSE filesystems whose contents are fetched on first read.
//!
//! # Layout
//! - [`registry`]: OCI distribution client (references, auth, manifests, blob ranges, push;
//!   mirrors from containerd's `hosts.toml`, with failover).
//! - [`credentials`]: registry credentials: kubelet credential-provider plugins, docker's
//!   config.json and its credential helpers, in order, refreshed when they expire or change.
//! - [`index`]: one file-tree-and-chunk model for every layer form (eStargz, zstd:chunked, tar,
//!   gzip with a checkpoint index).
//! - [`indexer`]: `streamsnap index`, checkpoint indexes of gzip and tar layers built and published.
//! - [`prefetch`]: landmarks, start-up profiles (recorded, published, replayed), background fill.
//! - [`fetch`]: chunk reads for a layer: dedup in flight, coalescing, verification, the
//!   node's request scheduler (priorities), the range-source and read-observer seams.
//! - [`flight`]: single flight: one computation in flight per key, results optionally kept.
//! - [`cache`]: bounded on-disk chunk store and in-memory LRU.
//! - [`layer`]: chooses the index form for a layer and builds its fetcher.
//! - [`fs`]: the FUSE filesystem of one layer (the only module that knows `fuser`).
//! - [`lifecycle`]: the descriptor keeper: layer mounts that outlive the daemon.
//! - [`logging`]: the binary's log lines, without fuser's error for a reply the kernel no longer waits for.
//! - [`overlay`]: kernel mounts (overlayfs, bind) and unmounts.
//! - [`node`]: the composition root: what one node's layers share, built from config.
//! - [`image_mount`]: `streamsnap mount`, an image's layers merged at a mount point.
//! - [`install`]: `streamsnap install`/`uninstall`, streamsnap merged into containerd's config.
//! - [`snapshotter`]: containerd's snapshotter semantics, metadata store, gRPC adapter, remote layers.
//! - [`pull`]: `streamsnap pull`, an image pulled through containerd's API with lazy layers.
//! - [`daemon`]: `streamsnap serve`, the snapshotter on a unix socket.
//! - [`cri_proxy`]: CRI's ImageService passed on to containerd, each pull's own auth kept for its layers.
//! - [`config`]: the typed TOML configuration, one section per subsystem (imports no subsystem).
//! - [`metrics`]: Prometheus metrics.
//! - [`endpoint`]: the daemon's HTTP endpoint: metrics, health, readiness, status.
//! - [`progress`]: progress bars of long one-shot work on a terminal.
//! - [`status`]: `streamsnap status`, the typed status document and its table.
//! - [`proto`]: generated protobuf/gRPC code (used only by `snapshotter`).
//! - [`digest`]: validated content digests.
//! - [`private`]: owner-only directories and files for everything streamsnap keeps.
//! - [`alloc`]: glibc allocator tuning and trimming.
//! - [`buf`]: page-aligned buffers for decoded bytes (O_DIRECT cache writes).

pub mod alloc;
pub mod buf;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod cri_proxy;
pub mod daemon;
pub mod digest;
pub mod endpoint;
pub mod fetch;
pub mod flight;
pub mod fs;
pub mod image_mount;
pub mod index;
pub mod indexer;
pub mod install;
pub mod layer;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod overlay;
pub mod prefetch;
pub mod private;
pub mod progress;
pub mod proto;
pub mod pull;
pub mod registry;
pub mod snapshotter;
pub mod status;
