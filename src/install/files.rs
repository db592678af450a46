//! The file side of install/uninstall: the original config is backed up once (its bytes and mode,
//! or a marker that there was none), every write goes to a temporary file that is synced and
//! renamed over the config, and containerd is restarted only after a write (or while an earlier
//! restart is still pending).

use super::merge::{self, Change, ConfigVersion};
use super::Error;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Suffix of the copy of the original config.
pub const BACKUP_SUFFIX: &str = ".streamsnap-orig";
/// Suffix of the marker saying there was no config before install.
pub const ABSENT_SUFFIX: &str = ".streamsnap-absent";
/// Suffix of the marker saying the config changed and containerd has not been restarted since
/// (the restart command failed): the next install or uninstall restarts it even if it changes
/// nothing.
pub const RESTART_PENDING_SUFFIX: &str = ".streamsnap-restart-pending";

/// Mode of a config file install creates.
const NEW_FILE_MODE: u32 = 0o644;

/// What install and uninstall act on.
#[derive(Debug, Clone)]
pub struct Options {
    /// containerd's config file.
    pub config: PathBuf,
    /// streamsnap's snapshotter socket.
    pub address: PathBuf,
    /// Shell command restarting containerd after a change; None: never restart.
    pub restart: Option<String>,
    /// Version of a config that declares none (empty or absent); None: ask `containerd`.
    pub config_version: Option<ConfigVersion>,
    /// The containerd binary asked for its version when needed.
    pub containerd: PathBuf,
}

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    pub version: ConfigVersion,
    /// Empty when the config already had everything (then nothing was written).
    pub changes: Vec<Change>,
    /// The snapshotter CRI used before, now replaced by streamsnap.
    pub replaced_snapshotter: Option<String>,
    /// Files the config imports (containerd merges them over it; install does not edit them).
    pub imports: Vec<String>,
    /// containerd's registry host directory (mirrors), if its CRI config names one.
    pub registry_config_path: Option<String>,
    /// The backup written by this run (first install only).
    pub backup: Option<PathBuf>,
    pub restarted: bool,
}

/// What `uninstall` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Uninstalled {
    /// No backup: install never changed this config (`restarted`: a restart an earlier run
    /// could not make was made now).
    NothingToUndo { restarted: bool },
    /// The original bytes are back (from this backup, now removed).
    Restored { backup: PathBuf, restarted: bool },
    /// There was no config before install: it is removed.
    Removed { restarted: bool },
}

/// `<config><suffix>`, next to the config.
fn beside(config: &Path, suffix: &str) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Merges streamsnap into the config; on the first change backs the original up; writes
/// atomically and restarts containerd only if the bytes changed.
pub fn install(opts: &Options) -> Result<Installed, Error> {
    let path = &through_symlink(&opts.config)?;
    let original = read_if_exists(path)?;
    let text = match &original {
        Some((bytes, _)) => String::from_utf8(bytes.clone()).map_err(|e| Error::Io {
            what: "reading containerd config",
            path: path.clone(),
            source: std::io::Error::new(ErrorKind::InvalidData, e),
        })?,
        None => String::new(),
    };
    let config_error = |reason| Error::Config {
        path: path.clone(),
        reason,
    };
    let fallback = match merge::declared_version(&text).map_err(config_error)? {
        Some(_) => None,
        None => Some(match opts.config_version {
            Some(v) => v,
            None => containerd_config_version(path, &opts.containerd)?,
        }),
    };
    let socket = opts
        .address
        .to_str()
        .ok_or_else(|| Error::Address(opts.address.clone()))?;
    let merged = merge::merge(&text, fallback, socket).map_err(config_error)?;
    let mut installed = Installed {
        version: merged.version,
        changes: merged.changes,
        replaced_snapshotter: merged.replaced_snapshotter,
        imports: merged.imports,
        registry_config_path: merged.registry_config_path,
        backup: None,
        restarted: false,
    };
    if installed.changes.is_empty() {
        installed.restarted = restart(opts, path, false)?;
        return Ok(installed);
    }
    // Never write what does not parse back (the merge cannot produce it, but a node's containerd
    // must not be handed a broken config whatever happens).
    merge::declared_version(&merged.text).map_err(config_error)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("creating directory", dir))?;
    }
    let (backup, absent) = (beside(path, BACKUP_SUFFIX), beside(path, ABSENT_SUFFIX));
    if !exists(&backup)? && !exists(&absent)? {
        match &original {
            Some((bytes, mode)) => {
                write_atomically(&backup, bytes, *mode)?;
                installed.backup = Some(backup);
            }
            None => {
                write_atomically(&absent, b"", 0o600)?;
                installed.backup = Some(absent);
            }
        }
    }
    let mode = original.as_ref().map_or(NEW_FILE_MODE, |(_, m)| *m);
    restart_pending(opts, path)?;
    write_atomically(path, merged.text.as_bytes(), mode)?;
    installed.restarted = restart(opts, path, true)?;
    Ok(installed)
}

/// Puts the original config back byte for byte (or removes the config if there was none) and
/// removes the backup; restarts containerd if the file changed.
pub fn uninstall(opts: &Options) -> Result<Uninstalled, Error> {
    let path = &through_symlink(&opts.config)?;
    let (backup, absent) = (beside(path, BACKUP_SUFFIX), beside(path, ABSENT_SUFFIX));
    match (exists(&backup)?, exists(&absent)?) {
        (true, true) => Err(Error::TwoBackups(backup, absent)),
        (false, false) => Ok(Uninstalled::NothingToUndo {
            restarted: restart(opts, path, false)?,
        }),
        (true, false) => {
            let (bytes, mode) = read_if_exists(&backup)?.ok_or_else(|| Error::Io {
                what: "reading backup",
                path: backup.clone(),
                source: ErrorKind::NotFound.into(),
            })?;
            let current = read_if_exists(path)?;
            let changed = current.as_ref() != Some(&(bytes.clone(), mode));
            if changed {
                restart_pending(opts, path)?;
                write_atomically(path, &bytes, mode)?;
            }
            remove_synced(&backup)?;
            let restarted = restart(opts, path, changed)?;
            Ok(Uninstalled::Restored { backup, restarted })
        }
        (false, true) => {
            let changed = exists(path)?;
            if changed {
                restart_pending(opts, path)?;
                remove_synced(path)?;
            }
            remove_synced(&absent)?;
            let restarted = restart(opts, path, changed)?;
            Ok(Uninstalled::Removed { restarted })
        }
    }
}

/// The file a symlinked config points to (written in place, so the link stays a link); the path
/// itself otherwise. The backup goes beside that file.
fn through_symlink(path: &Path) -> Result<PathBuf, Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).map_err(io("resolving symlink", path)),
        _ => Ok(path.to_path_buf()),
    }
}

/// The config version `containerd --version` implies.
fn containerd_config_version(config: &Path, binary: &Path) -> Result<ConfigVersion, Error> {
    let failed = |reason: String| Error::ContainerdVersion {
        config: config.to_path_buf(),
        binary: binary.to_path_buf(),
        reason,
    };
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| failed(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    ConfigVersion::for_containerd(&text).ok_or_else(|| failed(format!("no 1.x or 2.x version in {:?}", text.trim())))
}

/// Marks a restart as pending (when restarts are on) before the config is changed.
fn restart_pending(opts: &Options, config: &Path) -> Result<(), Error> {
    if opts.restart.is_none() {
        return Ok(());
    }
    write_atomically(&beside(config, RESTART_PENDING_SUFFIX), b"", 0o600)
}

/// Runs the restart command if the config `changed` or an earlier restart failed; false when it
/// did not run (nothing to apply, or restarts are off). The pending mark goes once it succeeds.
fn restart(opts: &Options, config: &Path, changed: bool) -> Result<bool, Error> {
    let Some(command) = &opts.restart else {
        return Ok(false);
    };
    let pending = beside(config, RESTART_PENDING_SUFFIX);
    if !changed && !exists(&pending)? {
        return Ok(false);
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|e| Error::Restart {
            command: command.clone(),
            status: e.to_string(),
        })?;
    if !status.success() {
        return Err(Error::Restart {
            command: command.clone(),
            status: status.to_string(),
        });
    }
    if exists(&pending)? {
        remove_synced(&pending)?;
    }
    Ok(true)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(io("checking", path))
}

/// The file's bytes and permission bits, None if it does not exist.
fn read_if_exists(path: &Path) -> Result<Option<(Vec<u8>, u32)>, Error> {
    match fs::read(path) {
        Ok(bytes) => {
            let mode = fs::metadata(path).map_err(io("reading", path))?.permissions().mode() & 0o7777;
            Ok(Some((bytes, mode)))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", path)(e)),
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and syncs
/// the directory: a crash leaves the old file or the new one, never a mix.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = beside(path, ".streamsnap-tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
    sync_dir(path)
}

fn remove_synced(path: &Path) -> Result<(), Error> {
    fs::remove_file(path).map_err(io("removing", path))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}
