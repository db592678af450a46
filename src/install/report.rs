//! What install and uninstall print: every change, one line each.

use super::files::{Installed, Options, Uninstalled};
use super::merge::SNAPSHOTTER;
use std::fmt::Write as _;

/// The report of `streamsnap install`.
pub fn installed(opts: &Options, done: &Installed) -> String {
    let path = opts.config.display();
    let version = done.version.number();
    let mut out = if done.changes.is_empty() {
        format!("{path}: streamsnap already installed (config version {version}); nothing changed\n")
    } else {
        format!("{path}: installed streamsnap (config version {version}):\n")
    };
    if !done.imports.is_empty() {
        let _ = writeln!(
            out,
            "note: it imports {}: containerd merges those over it, and install does not edit them",
            done.imports.join(", ")
        );
    }
    if let Some(dir) = &done.registry_config_path {
        let _ = writeln!(
            out,
            "note: containerd reads registry mirrors from {dir}: set `[registry] config_path = {dir:?}` in \
             streamsnap's config (or `serve --registry-config-path {dir}`) for the same mirrors"
        );
    }
    if done.changes.is_empty() {
        if done.restarted {
            out += "restarted containerd (its last restart had failed)\n";
        }
        return out;
    }
    for change in &done.changes {
        let _ = writeln!(out, "  {change}");
    }
    if let Some(old) = &done.replaced_snapshotter {
        let _ = writeln!(
            out,
            "note: CRI's snapshotter was {old:?}, now {SNAPSHOTTER:?}; `streamsnap uninstall` restores it"
        );
    }
    if let Some(backup) = &done.backup {
        let _ = writeln!(out, "original kept in {}", backup.display());
    }
    out + restarted(opts, done.restarted)
}

/// The report of `streamsnap uninstall`.
pub fn uninstalled(opts: &Options, done: &Uninstalled) -> String {
    let path = opts.config.display();
    let (what, restart) = match done {
        Uninstalled::NothingToUndo { restarted } => {
            let out = format!("{path}: no backup from `streamsnap install`; nothing to undo\n");
            if *restarted {
                return out + "restarted containerd (its last restart had failed)\n";
            }
            return out;
        }
        Uninstalled::Restored { backup, restarted } => (
            format!("{path}: original restored from {}\n", backup.display()),
            *restarted,
        ),
        Uninstalled::Removed { restarted } => (
            format!("{path}: removed (there was none before `streamsnap install`)\n"),
            *restarted,
        ),
    };
    if !restart && opts.restart.is_some() {
        return what + "containerd not restarted: the file was already the original\n";
    }
    what + restarted(opts, restart)
}

fn restarted(opts: &Options, restarted: bool) -> &'static str {
    match (restarted, &opts.restart) {
        (true, _) => "restarted containerd\n",
        (false, None) => "containerd not restarted (--no-restart): restart it to apply\n",
        (false, Some(_)) => "",
    }
}
