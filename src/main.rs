//! The `streamsnap` command line: clap definitions, then one small function
//! per command over the library. Every value is parsed by the same types the
//! config file uses.

use anyhow::Context as _;
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use streamsnap::config::{self, Config, RegistryHost, Seconds};
use streamsnap::image_mount;
use streamsnap::indexer::{IndexOptions, LayerOutcome};
use streamsnap::install;
use streamsnap::layer::gzip_index::IndexStore;
use streamsnap::metrics::Metrics;
use streamsnap::node::{self, StateDir};
use streamsnap::prefetch::profile::Profiles;
use streamsnap::progress::Progress;
use streamsnap::registry::{Platform, Reference, Registry};
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
    Serve(ServeArgs),
    /// Pull an image into containerd with lazily served layers (then `ctr run --snapshotter streamsnap`).
    Pull(PullArgs),
    /// Mount an image read-only at MOUNTPOINT, fetching file contents on first read.
    Mount(MountArgs),
    /// Show or publish the recorded start-up profile of an image.
    Profile {
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Build the checkpoint index of each plain gzip or uncompressed tar layer of IMAGE, so that it
    /// can be served lazily; keep it in the local index cache, and publish it.
    Index(IndexArgs),
    /// Hold the FUSE descriptors of a state dir's layer mounts across daemon restarts (`serve` starts it).
    Keeper {
        /// The keeper's socket (`<state dir>/keeper.sock`).
        #[arg(long)]
        socket: PathBuf,
    },
    /// Take every lazily served layer of a state dir down (stop the daemon first): the keeper
    /// closes its descriptors and exits, and the layer mounts are unmounted.
    Shutdown {
        /// State directory of the daemon.
        #[arg(long, default_value = "/var/lib/streamsnap")]
        root: PathBuf,
    },
    /// Merge streamsnap into containerd's config (the original is kept beside it), restart
    /// containerd if anything changed.
    Install(InstallArgs),
    /// Put back the containerd config `install` changed, byte for byte; restart containerd if needed.
    Uninstall(InstallArgs),
    /// Show what the running daemon serves: per image and layer, its form, how it is served,
    /// bytes fetched, prefetch and background fill, cache use.
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The daemon's metrics address (default: `metrics_address` of the config file).
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// TOML config file of the daemon (default /etc/streamsnap/config.toml, if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the status document as JSON.
    #[arg(long)]
    json: bool,
}

/// The defaults of flags that set a config value.
fn defaults() -> Config {
    Config::default()
}

#[derive(clap::Args)]
struct ServeArgs {
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
    insecure_registry: Vec<RegistryHost>,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides the config file).
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Trusted repository holding checkpoint indexes by layer digest (repeatable; adds to the config file's list).
    #[arg(long = "index-repo")]
    index_repo: Vec<Reference>,
    /// Also use indexes and profiles pushed as referrers of the image (sets `[index] trust_referrers`).
    #[arg(long)]
    trust_referrers: bool,
    /// Index unindexed plain gzip and tar layers on first use, from one download (sets `[index] build_on_first_use`).
    #[arg(long)]
    build_index_on_first_use: bool,
    /// Push every index built on first use to this repository, tagged by layer digest (`[index] publish`).
    #[arg(long)]
    publish_index: Option<Reference>,
    #[command(flatten)]
    fill: FillArgs,
    /// Publish each recorded start-up profile next to its image.
    #[arg(long)]
    profile_push: bool,
    /// Seconds without reads that end a start-up profile recording (overrides the config file).
    #[arg(long)]
    profile_quiet: Option<Seconds>,
    /// Do not replay start-up profiles (still record them).
    #[arg(long)]
    no_profile_replay: bool,
    #[command(flatten)]
    credentials: CredentialArgs,
    #[command(flatten)]
    hosts: HostsArgs,
    /// Serve CRI's ImageService on this socket, in front of containerd's (kubelet's
    /// --image-service-endpoint), so that pull secrets reach lazily served layers.
    #[arg(long)]
    cri_proxy_address: Option<PathBuf>,
    /// containerd's socket, where the CRI proxy passes every call (default /run/containerd/containerd.sock).
    #[arg(long)]
    cri_containerd_address: Option<PathBuf>,
}

impl ServeArgs {
    /// The flags over the loaded config.
    fn apply(self, cfg: &mut Config) {
        if let Some(r) = self.root {
            cfg.root = r;
        }
        if let Some(a) = self.address {
            cfg.address = a;
        }
        if self.metrics_address.is_some() {
            cfg.metrics_address = self.metrics_address;
        }
        cfg.registry.insecure.extend(self.insecure_registry);
        cfg.index.repositories.extend(self.index_repo);
        cfg.index.trust_referrers |= self.trust_referrers;
        cfg.index.build_on_first_use |= self.build_index_on_first_use;
        if self.publish_index.is_some() {
            cfg.index.publish = self.publish_index;
        }
        self.fill.apply(&mut cfg.background_fill);
        cfg.profile.push |= self.profile_push;
        cfg.profile.replay &= !self.no_profile_replay;
        if let Some(q) = self.profile_quiet {
            cfg.profile.quiet = q;
        }
        self.credentials.apply(&mut cfg.credentials);
        self.hosts.apply(&mut cfg.registry);
        if self.cri_proxy_address.is_some() {
            cfg.cri.proxy_address = self.cri_proxy_address;
        }
        if let Some(a) = self.cri_containerd_address {
            cfg.cri.containerd_address = a;
        }
    }
}

#[derive(clap::Args)]
struct PullArgs {
    #[arg(long)]
    plain_http: bool,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value_t = defaults().registry.platform)]
    platform: Platform,
    /// Name containerd knows the snapshotter by.
    #[arg(long, default_value = "streamsnap")]
    snapshotter: String,
    #[command(flatten)]
    hosts: HostsArgs,
    image: Reference,
}

#[derive(clap::Args)]
struct MountArgs {
    /// Reach the registry over plain HTTP (loopback registries always are).
    #[arg(long)]
    plain_http: bool,
    #[arg(long, default_value_os_t = defaults().root)]
    state_dir: PathBuf,
    /// Bound of the on-disk chunk cache, e.g. 10GiB.
    #[arg(long, default_value_t = defaults().cache.disk_size)]
    cache_size: ByteSize,
    #[arg(long, default_value_t = defaults().registry.platform)]
    platform: Platform,
    /// Trusted repository holding checkpoint indexes by layer digest (repeatable).
    #[arg(long = "index-repo")]
    index_repo: Vec<Reference>,
    /// Also use indexes and profiles pushed as referrers of the image.
    #[arg(long)]
    trust_referrers: bool,
    /// Index unindexed plain gzip and tar layers on first use, from one download (sets `[index] build_on_first_use`).
    #[arg(long)]
    build_index_on_first_use: bool,
    /// Push every index built on first use to this repository, tagged by layer digest (`[index] publish`).
    #[arg(long)]
    publish_index: Option<Reference>,
    /// Longest wait, in seconds, for landmark files before each layer is mounted (0: no prefetch).
    #[arg(long, default_value_t = defaults().prefetch.timeout)]
    prefetch_timeout: Seconds,
    /// Longest wait of a read on the registry before it fails with EIO (`[fetch] read_deadline`).
    #[arg(long, default_value_t = defaults().fetch.read_deadline)]
    read_deadline: Seconds,
    /// Seconds without a byte before a registry connection is replaced (`[fetch] stall_timeout`).
    #[arg(long, default_value_t = defaults().fetch.stall_timeout)]
    stall_timeout: Seconds,
    #[command(flatten)]
    fill: FillArgs,
    #[command(flatten)]
    credentials: CredentialArgs,
    #[command(flatten)]
    hosts: HostsArgs,
    image: Reference,
    mountpoint: PathBuf,
}

impl MountArgs {
    /// The config of this mount: the defaults and the flags.
    fn config(&self) -> Config {
        let mut cfg = defaults();
        cfg.root = self.state_dir.clone();
        cfg.cache.disk_size = self.cache_size;
        cfg.registry.platform = self.platform.clone();
        cfg.index.repositories = self.index_repo.clone();
        cfg.index.trust_referrers = self.trust_referrers;
        cfg.index.build_on_first_use = self.build_index_on_first_use;
        cfg.index.publish = self.publish_index.clone();
        cfg.prefetch.timeout = self.prefetch_timeout;
        cfg.fetch.read_deadline = self.read_deadline;
        cfg.fetch.stall_timeout = self.stall_timeout;
        self.fill.apply(&mut cfg.background_fill);
        self.credentials.apply(&mut cfg.credentials);
        self.hosts.apply(&mut cfg.registry);
        cfg
    }
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
    #[arg(long, default_value_os_t = defaults().root)]
    state_dir: PathBuf,
    #[arg(long, default_value_t = defaults().registry.platform)]
    platform: Platform,
    image: Reference,
}

#[derive(clap::Args)]
struct IndexArgs {
    #[arg(long)]
    plain_http: bool,
    /// Output bytes between inflate checkpoints: a read fetches about this much.
    #[arg(long, default_value = "4MiB")]
    span: ByteSize,
    /// Publish the index as an OCI artifact referring to the image (in its repository).
    #[arg(long)]
    push: bool,
    /// Publish in this repository instead, tagged by layer digest.
    #[arg(long)]
    index_repo: Option<Reference>,
    /// Layers smaller than this are not indexed (they are fetched whole).
    #[arg(long, default_value = "4MiB")]
    min_layer_size: ByteSize,
    #[arg(long, default_value_os_t = defaults().root)]
    state_dir: PathBuf,
    #[arg(long, default_value_t = defaults().registry.platform)]
    platform: Platform,
    #[command(flatten)]
    hosts: HostsArgs,
    image: Reference,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// streamsnap's snapshotter socket, as containerd dials it.
    #[arg(long, default_value_os_t = defaults().address)]
    address: PathBuf,
    /// Shell command restarting containerd after a change.
    #[arg(long, default_value = "systemctl restart containerd")]
    restart_command: String,
    /// Never restart containerd.
    #[arg(long)]
    no_restart: bool,
    /// Version of a config that declares none (2: containerd 1.6/1.7, 3: 2.x); default: what
    /// `containerd --version` implies.
    #[arg(long)]
    config_version: Option<install::ConfigVersion>,
    /// The containerd binary asked for its version (only when the config declares none).
    #[arg(long, default_value = "containerd")]
    containerd_bin: PathBuf,
}

impl InstallArgs {
    fn options(self) -> install::Options {
        install::Options {
            config: self.containerd_config,
            address: self.address,
            restart: (!self.no_restart).then_some(self.restart_command),
            config_version: self.config_version,
            containerd: self.containerd_bin,
        }
    }
}

/// Background fill flags (`serve`: override the config file).
#[derive(clap::Args)]
struct FillArgs {
    /// Fetch the rest of every mounted layer into the cache in the background.
    #[arg(long)]
    background_fill: bool,
    /// Seconds after a layer is mounted before its fill starts.
    #[arg(long)]
    background_fill_delay: Option<Seconds>,
    /// Bandwidth cap of the fill per second, e.g. 100MiB.
    #[arg(long)]
    background_fill_rate: Option<ByteSize>,
}

/// Credential source flags (`serve`: override `[credentials]`); kubelet's flag names.
#[derive(clap::Args)]
struct CredentialArgs {
    /// docker's config.json (default $DOCKER_CONFIG/config.json, else ~/.docker/config.json).
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// kubelet's CredentialProviderConfig file (with --image-credential-provider-bin-dir).
    #[arg(long)]
    image_credential_provider_config: Option<PathBuf>,
    /// Directory of the credential-provider plugins the config names.
    #[arg(long)]
    image_credential_provider_bin_dir: Option<PathBuf>,
}

/// Mirrors: containerd's registry host directory (`[registry] config_path`).
#[derive(clap::Args)]
struct HostsArgs {
    /// containerd's registry `config_path` (`<DIR>/<host>/hosts.toml`: mirrors tried before the registry).
    #[arg(long, value_name = "DIR")]
    registry_config_path: Option<PathBuf>,
}

impl HostsArgs {
    fn apply(&self, r: &mut config::Registry) {
        if let Some(p) = &self.registry_config_path {
            r.config_path = Some(p.clone());
        }
    }

    /// The config of a one-shot command: the defaults and this flag.
    fn config(&self) -> Config {
        let mut cfg = defaults();
        self.apply(&mut cfg.registry);
        cfg
    }
}

impl CredentialArgs {
    fn apply(&self, c: &mut config::Credentials) {
        if let Some(p) = &self.docker_config {
            c.docker_config = Some(p.clone());
        }
        if let Some(p) = &self.image_credential_provider_config {
            c.provider_config = Some(p.clone());
        }
        if let Some(p) = &self.image_credential_provider_bin_dir {
            c.provider_bin_dir = Some(p.clone());
        }
    }
}

impl FillArgs {
    fn apply(&self, fill: &mut config::BackgroundFill) {
        fill.enabled |= self.background_fill;
        if let Some(d) = self.background_fill_delay {
            fill.delay = d;
        }
        if let Some(r) = self.background_fill_rate {
            fill.rate = Some(r);
        }
    }
}

fn main() -> anyhow::Result<()> {
    streamsnap::alloc::tune();
    streamsnap::logging::init();
    let cli = Cli::parse();
    // Plain blocking commands: the keeper must stay a single small thread.
    match &cli.command {
        Command::Keeper { socket } => {
            return streamsnap::lifecycle::keeper::run(socket)
                .with_context(|| format!("keeper at {}", socket.display()))
        }
        Command::Shutdown { root } => {
            let n = streamsnap::lifecycle::shutdown(root)?;
            println!("{n} layer mounts taken down under {}", root.display());
            return Ok(());
        }
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Pull(args) => pull(args).await,
            Command::Mount(args) => mount(args).await,
            Command::Profile { action } => profile(action).await,
            Command::Index(args) => index(args).await,
            Command::Keeper { .. } | Command::Shutdown { .. } => unreachable!("run before the runtime"),
            Command::Install(args) => install_command(args),
            Command::Uninstall(args) => uninstall_command(args),
            Command::Status(args) => status(args).await,
        }
    })
}

/// `streamsnap serve`: the config file, the flags over it, the daemon.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    args.apply(&mut cfg);
    // Installed before the socket exists: a SIGTERM the moment it appears must
    // stop the daemon cleanly, not kill it by the default action.
    let signals = Signals::install()?;
    streamsnap::daemon::serve(cfg, signals.wait()).await
}

async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let registry = node::registry(&args.hosts.config(), args.plain_http)?;
    let opts = streamsnap::pull::PullOptions {
        address: args.address,
        namespace: args.namespace,
        platform: args.platform,
        snapshotter: args.snapshotter,
        progress: Progress::stderr(),
    };
    let image = args.image;
    let report = streamsnap::pull::pull(&registry, &image, &opts).await;
    opts.progress.clear();
    let report = report?;
    println!(
        "pulled {image}: {} layers served lazily, {} unpacked",
        report.lazy_layers, report.unpacked_layers
    );
    Ok(())
}

/// `streamsnap mount`: the node built from the flags, as `serve` builds it from its config.
async fn mount(args: MountArgs) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let cfg = args.config();
    let owner = node::StateLock::acquire(&cfg.root)?;
    let metrics = Metrics::new();
    let registry = Arc::new(node::registry_with(&cfg, args.plain_http, metrics.endpoints(), None)?);
    let ctx = node::layer_context(&cfg, &owner, registry, metrics)?;
    let trimmer = tokio::spawn(streamsnap::alloc::keep_trimmed());
    let state = StateDir { root: cfg.root.clone() };
    let (image, mountpoint) = (&args.image, &args.mountpoint);
    let mounted = image_mount::mount_image(&ctx, &state, image, &cfg.registry.platform, mountpoint)
        .await
        .with_context(|| format!("mounting {image}"))?;
    println!("mounted {image} at {}", mountpoint.display());
    signals.wait().await;
    info!(bytes_fetched = mounted.bytes_fetched(), "shutting down");
    drop(mounted);
    trimmer.abort();
    Ok(())
}

async fn profile(action: ProfileAction) -> anyhow::Result<()> {
    let (args, repo, push) = match action {
        ProfileAction::Show(a) => (a, None, false),
        ProfileAction::Push { args, repo } => (args, repo, true),
    };
    let registry = registry_client(args.plain_http)?;
    let resolved = registry.resolve(&args.image, &args.platform).await?;
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
        let p = streamsnap::prefetch::profile::read_file(&path)?;
        println!("start-up profile of {} ({} reads)", p.image, p.reads.len());
        for r in &p.reads {
            println!("{} /{} {}+{}", r.layer, r.path, r.offset, r.len);
        }
    }
    Ok(())
}

async fn index(args: IndexArgs) -> anyhow::Result<()> {
    let _owner = node::StateLock::acquire(&args.state_dir)?;
    let registry = node::registry(&args.hosts.config(), args.plain_http)?;
    let store = IndexStore::new(StateDir { root: args.state_dir }.indexes(), Vec::new(), false);
    let opts = IndexOptions {
        span: args.span.as_u64(),
        min_layer_size: args.min_layer_size.as_u64(),
        platform: args.platform,
        push: args.push,
        index_repo: args.index_repo,
        progress: Progress::stderr(),
    };
    let report = streamsnap::indexer::index_image(&registry, &store, &args.image, &opts).await;
    opts.progress.clear();
    let report = report?;
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

/// `streamsnap install`: what changed, one line each.
fn install_command(args: InstallArgs) -> anyhow::Result<()> {
    let opts = args.options();
    let done = install::install(&opts)?;
    print!("{}", install::report::installed(&opts, &done));
    Ok(())
}

/// `streamsnap uninstall`: the original config back.
fn uninstall_command(args: InstallArgs) -> anyhow::Result<()> {
    let opts = args.options();
    let done = install::uninstall(&opts)?;
    print!("{}", install::report::uninstalled(&opts, &done));
    Ok(())
}

/// `streamsnap status`: the daemon's status document, as a table or JSON.
async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let address = match args.metrics_address {
        Some(a) => a,
        None => Config::load(args.config.as_deref())?.metrics_address.context(
            "the daemon serves its status on its metrics address: pass --metrics-address or set \
             metrics_address in the config file",
        )?,
    };
    let (json, status) = streamsnap::status::fetch(&address.to_string()).await?;
    if args.json {
        println!("{}", json.trim_end());
    } else {
        print!("{}", streamsnap::status::table(&status));
    }
    Ok(())
}

/// The registry client of one-shot commands (docker's credentials).
fn registry_client(plain_http: bool) -> anyhow::Result<Registry> {
    node::registry(&Config::default(), plain_http)
}

/// SIGTERM and SIGINT, caught from the moment `install` returns.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
#[path = "main_tests.rs"]
mod tests;
