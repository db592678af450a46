//! The `streamsnap` command line: a thin layer over the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use streamsnap::image_mount::{self, StateDir};
use streamsnap::indexer::{IndexOptions, LayerOutcome};
use streamsnap::layer::gzip_index::IndexStore;
use streamsnap::metrics::Metrics;
use streamsnap::prefetch::profile::Profiles;
use streamsnap::registry::{DockerConfig, Platform, Reference, Registry, RegistryOptions};
use tracing::info;

#[derive(Parser)]
#[command(name = "streamsnap", version, about = "Lazy-pulling containerd snapshotter")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve containerd's snapshotter API on a unix socket until SIGTERM/SIGINT.
    Serve {
        /// TOML config file (default /etc/streamsnap/config.toml, if present).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (overrides the config file).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Socket path (overrides the config file).
        #[arg(long)]
        address: Option<PathBuf>,
        /// Registry reached over plain HTTP (repeatable; adds to the config file's list).
        #[arg(long = "insecure-registry")]
        insecure_registry: Vec<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (overrides the config file).
        #[arg(long)]
        metrics_address: Option<std::net::SocketAddr>,
        /// Repository holding gzip indexes by layer digest (repeatable; adds to the config file's list).
        #[arg(long = "index-repo")]
        index_repo: Vec<String>,
        #[command(flatten)]
        fill: FillArgs,
        /// Publish each recorded start-up profile next to its image.
        #[arg(long)]
        profile_push: bool,
        /// Seconds without reads that end a start-up profile recording (overrides the config file).
        #[arg(long)]
        profile_quiet: Option<f64>,
        /// Do not replay start-up profiles (still record them).
        #[arg(long)]
        no_profile_replay: bool,
    },
    /// Pull an image into containerd with lazily served layers (then `ctr run --snapshotter streamsnap`).
    Pull {
        #[arg(long)]
        plain_http: bool,
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "linux/amd64")]
        platform: Platform,
        /// Name containerd knows the snapshotter by.
        #[arg(long, default_value = "streamsnap")]
        snapshotter: String,
        image: String,
    },
    /// Mount an image read-only at MOUNTPOINT, fetching file contents on first read.
    Mount {
        /// Reach the registry over plain HTTP (loopback registries always are).
        #[arg(long)]
        plain_http: bool,
        #[arg(long, default_value = "/var/lib/streamsnap")]
        state_dir: PathBuf,
        /// Bound of the on-disk chunk cache, e.g. 10GiB.
        #[arg(long, default_value = "10GiB")]
        cache_size: bytesize::ByteSize,
        #[arg(long, default_value = "linux/amd64")]
        platform: Platform,
        /// Repository holding gzip indexes by layer digest (repeatable).
        #[arg(long = "index-repo")]
        index_repo: Vec<Reference>,
        /// Longest wait, in seconds, for landmark files before each layer is mounted (0: no prefetch).
        #[arg(long, default_value_t = 10.0)]
        prefetch_timeout: f64,
        #[command(flatten)]
        fill: FillArgs,
        image: String,
        mountpoint: PathBuf,
    },
    /// Show or publish the recorded start-up profile of an image.
    Profile {
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Build the checkpoint index of each plain gzip layer of IMAGE, so that it
    /// can be served lazily; keep it in the local index cache, and publish it.
    Index {
        #[arg(long)]
        plain_http: bool,
        /// Output bytes between inflate checkpoints: a read fetches about this much.
        #[arg(long, default_value = "4MiB")]
        span: bytesize::ByteSize,
        /// Publish the index as an OCI artifact referring to the image (in its repository).
        #[arg(long)]
        push: bool,
        /// Publish in this repository instead, tagged by layer digest.
        #[arg(long)]
        index_repo: Option<Reference>,
        /// Layers smaller than this are not indexed (they are fetched whole).
        #[arg(long, default_value = "4MiB")]
        min_layer_size: bytesize::ByteSize,
        #[arg(long, default_value = "/var/lib/streamsnap")]
        state_dir: PathBuf,
        #[arg(long, default_value = "linux/amd64")]
        platform: Platform,
        image: String,
    },
}

#[derive(Subcommand)]
enum ProfileAction {
    /// Print the profile: the reads start-up made, in order.
    Show(ProfileArgs),
    /// Publish it as an OCI artifact referring to the image (or in --repo, tagged by manifest digest).
    Push {
        #[command(flatten)]
        args: ProfileArgs,
        #[arg(long)]
        repo: Option<Reference>,
    },
}

#[derive(clap::Args)]
struct ProfileArgs {
    #[arg(long)]
    plain_http: bool,
    /// State directory holding the profile (the daemon's root or the mount's state dir).
    #[arg(long, default_value = "/var/lib/streamsnap")]
    state_dir: PathBuf,
    #[arg(long, default_value = "linux/amd64")]
    platform: Platform,
    image: String,
}

/// Background fill flags (`serve`: override the config file).
#[derive(clap::Args)]
struct FillArgs {
    /// Fetch the rest of every mounted layer into the cache in the background.
    #[arg(long)]
    background_fill: bool,
    /// Seconds after a layer is mounted before its fill starts.
    #[arg(long)]
    background_fill_delay: Option<f64>,
    /// Bandwidth cap of the fill per second, e.g. 100MiB.
    #[arg(long)]
    background_fill_rate: Option<bytesize::ByteSize>,
}

impl FillArgs {
    fn apply(self, cfg: &mut streamsnap::config::Config) {
        cfg.background_fill |= self.background_fill;
        if let Some(d) = self.background_fill_delay {
            cfg.background_fill_delay_secs = d;
        }
        if let Some(r) = self.background_fill_rate {
            cfg.background_fill_rate = Some(r.to_string());
        }
    }
}

fn main() -> anyhow::Result<()> {
    // Chunk buffers are 1-16 MiB: by default glibc serves each with a fresh
    // mmap, so every chunk pays page faults and kernel zeroing (about a tenth
    // of the CPU of a cold sequential read). Keep them on the heap instead.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Pull {
                plain_http,
                address,
                namespace,
                platform,
                snapshotter,
                image,
            } => {
                let image: Reference = image.parse()?;
                let registry = registry_client(plain_http)?;
                let opts = streamsnap::pull::PullOptions {
                    address,
                    namespace,
                    platform,
                    snapshotter,
                };
                let report = streamsnap::pull::pull(&registry, &image, &opts).await?;
                println!(
                    "pulled {image}: {} layers served lazily, {} unpacked",
                    report.lazy_layers, report.unpacked_layers
                );
                Ok(())
            }
            Command::Serve {
                config,
                root,
                address,
                insecure_registry,
                metrics_address,
                index_repo,
                fill,
                profile_push,
                profile_quiet,
                no_profile_replay,
            } => {
                let mut cfg = streamsnap::config::Config::load(config.as_deref())?;
                if let Some(r) = root {
                    cfg.root = r;
                }
                if let Some(a) = address {
                    cfg.address = a;
                }
                cfg.insecure_registries.extend(insecure_registry);
                cfg.index_repositories.extend(index_repo);
                fill.apply(&mut cfg);
                cfg.profile_push |= profile_push;
                cfg.profile_replay &= !no_profile_replay;
                if let Some(q) = profile_quiet {
                    cfg.profile_quiet_secs = q;
                }
                if metrics_address.is_some() {
                    cfg.metrics_address = metrics_address;
                }
                streamsnap::daemon::serve(cfg, async {
                    if let Err(e) = wait_for_signal().await {
                        tracing::error!(error = %e, "signal handling failed");
                    }
                })
                .await
            }
            Command::Mount {
                plain_http,
                state_dir,
                cache_size,
                platform,
                index_repo,
                prefetch_timeout,
                fill,
                image,
                mountpoint,
            } => {
                let mut cfg = streamsnap::config::Config::default();
                fill.apply(&mut cfg);
                let image: Reference = image.parse()?;
                let registry = Arc::new(registry_client(plain_http)?);
                let state = StateDir { root: state_dir };
                let opts = image_mount::LayerOptions {
                    cache_size: cache_size.as_u64(),
                    index_repos: index_repo,
                    prefetch_timeout: std::time::Duration::try_from_secs_f64(prefetch_timeout).unwrap_or_default(),
                    fill: cfg.fill(),
                    ..Default::default()
                };
                let ctx = image_mount::layer_context(&state, registry, Metrics::new(), opts)?;
                let mounted = image_mount::mount_image(&ctx, &state, &image, &platform, &mountpoint)
                    .await
                    .with_context(|| format!("mounting {image}"))?;
                println!("mounted {image} at {}", mountpoint.display());
                wait_for_signal().await?;
                info!(bytes_fetched = mounted.bytes_fetched(), "shutting down");
                drop(mounted);
                Ok(())
            }
            Command::Profile { action } => {
                let (args, repo, push) = match action {
                    ProfileAction::Show(a) => (a, None, false),
                    ProfileAction::Push { args, repo } => (args, repo, true),
                };
                let image: Reference = args.image.parse()?;
                let registry = registry_client(args.plain_http)?;
                let resolved = registry.resolve(&image, &args.platform).await?;
                let profiles = Profiles::new(
                    StateDir { root: args.state_dir }.profiles(),
                    std::time::Duration::ZERO,
                    false,
                    Vec::new(),
                );
                if push {
                    let d = profiles.push(&registry, &resolved.reference, repo.as_ref()).await?;
                    println!("published {d}");
                } else {
                    let path = profiles.path(&resolved.manifest_digest);
                    let p = streamsnap::prefetch::profile::read_file(&path).map_err(anyhow::Error::msg)?;
                    println!("start-up profile of {} ({} reads)", p.image, p.reads.len());
                    for r in &p.reads {
                        println!("{} /{} {}+{}", r.layer, r.path, r.offset, r.len);
                    }
                }
                Ok(())
            }
            Command::Index {
                plain_http,
                span,
                push,
                index_repo,
                min_layer_size,
                state_dir,
                platform,
                image,
            } => {
                let image: Reference = image.parse()?;
                let registry = registry_client(plain_http)?;
                let store = IndexStore::new(StateDir { root: state_dir }.indexes(), Vec::new());
                let opts = IndexOptions {
                    span: span.as_u64(),
                    min_layer_size: min_layer_size.as_u64(),
                    platform,
                    push,
                    index_repo,
                };
                let report = streamsnap::indexer::index_image(&registry, &store, &image, &opts).await?;
                for l in &report.layers {
                    match l {
                        LayerOutcome::Indexed {
                            layer,
                            layer_size,
                            index_size,
                            checkpoints,
                            entries,
                        } => println!(
                            "{layer}: indexed: {entries} entries, {checkpoints} checkpoints, index {index_size} bytes ({:.2}% of {layer_size})",
                            *index_size as f64 * 100.0 / *layer_size as f64
                        ),
                        LayerOutcome::Skipped { layer, reason } => println!("{layer}: skipped: {reason}"),
                    }
                }
                if let Some((repo, digest)) = &report.pushed {
                    println!("published {digest} to {repo}");
                }
                Ok(())
            }
        }
    })
}

/// The registry client of one-shot commands (docker's credentials).
fn registry_client(plain_http: bool) -> anyhow::Result<Registry> {
    Ok(Registry::new(RegistryOptions {
        plain_http,
        docker_config: DockerConfig::load_default()?,
        ..Default::default()
    })?)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
