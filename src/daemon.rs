//! `streamsnap serve`: the snapshotter daemon on a unix socket, until SIGTERM/SIGINT
//! (which leave the layer mounts to the descriptor keeper, for the next daemon).

use crate::config::Config;
use crate::credentials::PullAuths;
use crate::cri_proxy::{self, CriProxy};
use crate::endpoint::Endpoint;
use crate::metrics::Metrics;
use crate::node;
use crate::snapshotter::remote::{DaemonStatus, RemoteLayers};
use crate::snapshotter::service::{Service, SnapshotsServer};
use crate::snapshotter::Snapshots;
use anyhow::Context as _;
use std::future::Future;
use std::sync::Arc;
use tracing::info;

/// Serves until `shutdown` completes, then leaves its mounts to the keeper (or, without one, unmounts them).
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // First: nothing in the state dir is touched unless this process owns it.
    let owner = node::StateLock::acquire(&config.root)?;
    // Pull secrets of CRI pulls (kept across restarts: their layers still read).
    let pull_dir = node::StateDir {
        root: owner.root().to_path_buf(),
    }
    .pull_auths();
    let pull_auths = Arc::new(
        PullAuths::open(&pull_dir).with_context(|| format!("opening pull secrets in {}", pull_dir.display()))?,
    );
    let metrics = Metrics::new();
    let registry = Arc::new(node::registry_with(
        &config,
        false,
        metrics.endpoints(),
        Some(Arc::clone(&pull_auths)),
    )?);
    let endpoint = Endpoint::new(Arc::clone(&metrics));
    let _metrics_server = match config.metrics_address {
        Some(addr) => {
            // Bound now, so a bad address fails the daemon at start, not later.
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            Some(AbortOnDrop(tokio::spawn(crate::endpoint::serve(
                listener,
                Arc::clone(&endpoint),
            ))))
        }
        None => None,
    };
    // Chunk buffers come and go by the megabyte: their freed gaps go back to the OS.
    let _trimmer = AbortOnDrop(tokio::spawn(crate::alloc::keep_trimmed()));
    let ctx = node::layer_context(&config, &owner, registry, metrics)?;
    let snapshots = Arc::new(
        Snapshots::open(&config.root)
            .with_context(|| format!("opening snapshot store in {}", config.root.display()))?,
    );
    // A crash mid-Prepare leaves a directory (maybe a dead mount) no record names.
    snapshots
        .cleanup()
        .with_context(|| format!("removing orphan snapshot dirs in {}", config.root.display()))?;
    // Holds the mounts' descriptors, so that they outlive this process (`lifecycle`).
    let keeper = match crate::lifecycle::Keeper::connect_or_start(&config.root) {
        Ok(k) => Some(Arc::new(k)),
        Err(e) => {
            tracing::warn!(error = %e, "no descriptor keeper: layer mounts end with this process");
            None
        }
    };
    let remote = Arc::new(
        RemoteLayers::new(
            ctx,
            config.registry.platform.clone(),
            tokio::runtime::Handle::current(),
            keeper,
        )
        .with_pull_auths(Arc::clone(&pull_auths)),
    );
    // Snapshots removed while no daemon ran (or pulls that ended with it) leave secrets to drop.
    remote.drop_unused_pull_auths(&snapshots);

    if let Some(dir) = config.address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&config.address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale socket {}", config.address.display())),
    }
    let listener = tokio::net::UnixListener::bind(&config.address)
        .with_context(|| format!("binding {}", config.address.display()))?;
    // containerd (root) connects; nobody else may.
    std::fs::set_permissions(&config.address, std::os::unix::fs::PermissionsExt::from_mode(0o660))
        .with_context(|| format!("chmod {}", config.address.display()))?;
    // Marked before the first request; mounted while the socket serves.
    let _remounts = AbortOnDrop(remote.remount_all(&snapshots));
    // Connections queue on the bound socket from now on: ready once the re-mounts are done.
    endpoint.serving(Arc::new(DaemonStatus {
        remote: Arc::clone(&remote),
        snapshots: Arc::clone(&snapshots),
    }));
    let cri_proxy = match &config.cri.proxy_address {
        Some(address) => {
            let (remote, snapshots) = (Arc::clone(&remote), Arc::clone(&snapshots));
            let proxy = CriProxy::new(
                &config.cri.containerd_address,
                pull_auths,
                Arc::new(move || remote.drop_unused_pull_auths(&snapshots)),
            );
            Some(cri_proxy::start(address, proxy).with_context(|| format!("binding {}", address.display()))?)
        }
        None => None,
    };
    info!(address = %config.address.display(), root = %config.root.display(), "serving containerd snapshotter");
    let service = Service::new(Arc::clone(&snapshots), Arc::clone(&remote));
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server")?;
    info!("shutting down");
    let _ = std::fs::remove_file(&config.address);
    if let Some(address) = &config.cri.proxy_address {
        drop(cri_proxy);
        let _ = std::fs::remove_file(address);
    }
    if tokio::task::spawn_blocking(move || remote.stop()).await? {
        // Reads in progress must not be answered at all: unwinding would drop
        // their pending replies, and fuser answers a dropped reply with EIO. The
        // next daemon has the kernel send them again (FUSE_NOTIFY_RESEND).
        info!("mounts handed over: exiting without unwinding");
        std::process::exit(0);
    }
    Ok(())
}

/// Stops a background task when the daemon returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
