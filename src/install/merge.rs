//! The pure half of `streamsnap install`: containerd's config text in, the same text with
//! streamsnap's settings merged in out, plus what changed. No I/O, so every starting config is a
//! cheap unit test. `toml_edit` keeps every other key, comment and blank line where it was.

use std::fmt;
use toml_edit::{ArrayOfTables, DocumentMut, InlineTable, Item, Table, TableLike, Value};

/// The name containerd knows streamsnap by (proxy plugin and CRI snapshotter).
pub const SNAPSHOTTER: &str = "streamsnap";

/// The snapshotter kept in the transfer service's unpack list besides ours: a list replaces
/// containerd's default entry, and images streamsnap cannot serve lazily are unpacked there.
const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

/// The containerd config versions streamsnap writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVersion {
    /// containerd 1.6 / 1.7.
    V2,
    /// containerd 2.x.
    V3,
}

impl ConfigVersion {
    pub fn number(self) -> i64 {
        match self {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        }
    }

    /// The version a containerd release reads natively, from `containerd --version`'s output
    /// (`containerd github.com/containerd/containerd 1.6.20~ds1 …`): 2 for 1.x, 3 for 2.x.
    pub fn for_containerd(version_output: &str) -> Option<ConfigVersion> {
        version_output.split_whitespace().find_map(|word| {
            let word = word.strip_prefix('v').unwrap_or(word);
            let (major, rest) = word.split_once('.')?;
            if !rest.starts_with(|c: char| c.is_ascii_digit()) {
                return None;
            }
            match major {
                "1" => Some(ConfigVersion::V2),
                "2" => Some(ConfigVersion::V3),
                _ => None,
            }
        })
    }
}

impl std::str::FromStr for ConfigVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "2" => Ok(ConfigVersion::V2),
            "3" => Ok(ConfigVersion::V3),
            _ => Err(format!(
                "config version {s:?}: expected 2 (containerd 1.6/1.7) or 3 (containerd 2.x)"
            )),
        }
    }
}

/// Why a config cannot be merged (the caller names the file).
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("not valid TOML: {0}")]
    Parse(#[from] toml_edit::TomlError),
    #[error("config version {0} is not supported (streamsnap edits versions 2 and 3)")]
    UnsupportedVersion(String),
    #[error(
        "no `version` key but plugin settings: containerd reads this as a version 1 config; \
         migrate it first (`containerd config migrate`)"
    )]
    Version1,
    #[error("no `version` key and no containerd version given to choose one")]
    NoVersion,
    #[error("`{0}` is not a table")]
    NotATable(String),
    #[error("`{0}` is not a plain value")]
    NotAValue(String),
    #[error("`{0}` is neither an array of tables nor an array")]
    NotAList(String),
}

/// One setting install made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted path of the key.
    pub key: String,
    /// Its value before (TOML), None if it was absent.
    pub old: Option<String>,
    /// Its value now (TOML).
    pub new: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.old {
            Some(old) => write!(f, "{} = {} (was {old})", self.key, self.new),
            None => write!(f, "{} = {} (added)", self.key, self.new),
        }
    }
}

/// The merged config and what it changed.
#[derive(Debug)]
pub struct Merged {
    /// The config text to write; equal to the input when `changes` is empty.
    pub text: String,
    pub version: ConfigVersion,
    pub changes: Vec<Change>,
    /// The other snapshotter CRI used before (install replaced it).
    pub replaced_snapshotter: Option<String>,
    /// The config's `imports`: files containerd merges over it, which install does not edit.
    pub imports: Vec<String>,
    /// CRI's registry `config_path` (containerd's mirrors), for `[registry] config_path`.
    pub registry_config_path: Option<String>,
}

/// The version the config declares; None for a config without `version` and without plugin
/// settings (an empty or absent file), which takes the running containerd's version.
pub fn declared_version(text: &str) -> Result<Option<ConfigVersion>, MergeError> {
    let doc: DocumentMut = text.parse()?;
    version_of(&doc)
}

fn version_of(doc: &DocumentMut) -> Result<Option<ConfigVersion>, MergeError> {
    match doc.get("version") {
        Some(item) => match item.as_integer() {
            Some(2) => Ok(Some(ConfigVersion::V2)),
            Some(3) => Ok(Some(ConfigVersion::V3)),
            _ => Err(MergeError::UnsupportedVersion(item.to_string().trim().to_string())),
        },
        None if doc.contains_key("plugins") => Err(MergeError::Version1),
        None => Ok(None),
    }
}

/// Merges streamsnap (a proxy snapshotter at `socket`, CRI's snapshotter) into `text`. `fallback`
/// is the version of a config that declares none.
pub fn merge(text: &str, fallback: Option<ConfigVersion>, socket: &str) -> Result<Merged, MergeError> {
    let mut doc: DocumentMut = text.parse()?;
    let mut edit = Edit::default();
    let version = match version_of(&doc)? {
        Some(v) => v,
        None => {
            let v = fallback.ok_or(MergeError::NoVersion)?;
            edit.set(doc.as_table_mut(), &[], "version", Value::from(v.number()))?;
            v
        }
    };
    let proxy = edit.table(doc.as_table_mut(), &["proxy_plugins", SNAPSHOTTER])?;
    edit.set(proxy, &["proxy_plugins", SNAPSHOTTER], "type", "snapshot".into())?;
    edit.set(proxy, &["proxy_plugins", SNAPSHOTTER], "address", socket.into())?;
    let cri: &[&str] = match version {
        ConfigVersion::V2 => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        ConfigVersion::V3 => {
            // The transfer service's unpacker passes layer labels only to proxy snapshotters
            // exporting this.
            let path = ["proxy_plugins", SNAPSHOTTER, "exports"];
            let exports = edit.table(doc.as_table_mut(), &path)?;
            edit.set(exports, &path, "enable_remote_snapshot_annotations", "true".into())?;
            edit.unpack_config(doc.as_table_mut())?;
            &["plugins", "io.containerd.cri.v1.images"]
        }
    };
    let table = edit.table(doc.as_table_mut(), cri)?;
    let old = edit.set(table, cri, "snapshotter", SNAPSHOTTER.into())?;
    // Layer annotations let CRI's pull hand each layer's reference and digest to us (on 2.1 this
    // makes CRI pull with client.Pull() rather than the transfer service: lazy either way).
    edit.set(table, cri, "disable_snapshot_annotations", false.into())?;
    let replaced_snapshotter = old
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|s| !s.is_empty() && s != SNAPSHOTTER);
    let imports = doc
        .get("imports")
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let registry_config_path = [cri[0], cri[1], "registry", "config_path"]
        .iter()
        .try_fold(doc.as_item(), |item, key| item.get(key))
        .and_then(Item::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let text = if edit.changes.is_empty() {
        text.to_string()
    } else {
        doc.to_string()
    };
    Ok(Merged {
        text,
        version,
        changes: edit.changes,
        replaced_snapshotter,
        imports,
        registry_config_path,
    })
}

/// The changes made so far while editing one document.
#[derive(Default)]
struct Edit {
    changes: Vec<Change>,
}

impl Edit {
    /// The table at `path` under `root`, created (header-less until it holds a key) if absent.
    fn table<'a>(&mut self, root: &'a mut dyn TableLike, path: &[&str]) -> Result<&'a mut dyn TableLike, MergeError> {
        let mut t = root;
        for (i, key) in path.iter().enumerate() {
            t = t
                .entry(key)
                .or_insert_with(implicit_table)
                .as_table_like_mut()
                .ok_or_else(|| MergeError::NotATable(dotted(&path[..=i])))?;
        }
        Ok(t)
    }

    /// Sets `key` of table `t` (at `path`) to `new` unless it already holds that value; keeps the
    /// key's comments. Returns the old value when it differed.
    fn set(
        &mut self,
        t: &mut dyn TableLike,
        path: &[&str],
        key: &str,
        mut new: Value,
    ) -> Result<Option<Value>, MergeError> {
        let shown = dotted(&[path, &[key]].concat());
        let old = match t.get_mut(key) {
            None => None,
            Some(item) => {
                let current = item
                    .as_value_mut()
                    .ok_or_else(|| MergeError::NotAValue(shown.clone()))?;
                if same(current, &new) {
                    return Ok(None);
                }
                *new.decor_mut() = current.decor().clone();
                Some(std::mem::replace(current, new.clone()))
            }
        };
        if old.is_none() {
            t.insert(key, Item::Value(new.clone()));
        }
        self.changes.push(Change {
            key: shown,
            old: old.as_ref().map(|v| v.to_string().trim().to_string()),
            new: new.to_string().trim().to_string(),
        });
        Ok(old)
    }

    /// containerd 2.x's transfer service unpacks only into the snapshotters its `unpack_config`
    /// lists: ours is added; a new list also keeps the default snapshotter (a list replaces it).
    fn unpack_config(&mut self, root: &mut dyn TableLike) -> Result<(), MergeError> {
        let path = ["plugins", "io.containerd.transfer.v1.local"];
        let transfer = self.table(root, &path)?;
        let shown = dotted(&[&path[..], &["unpack_config"]].concat());
        let entry = |snapshotter: &str| {
            let mut t = Table::new();
            t.insert("platform", toml_edit::value("linux"));
            t.insert("snapshotter", toml_edit::value(snapshotter));
            t
        };
        let listed = |t: &dyn TableLike| t.get("snapshotter").and_then(|s| s.as_str()) == Some(SNAPSHOTTER);
        match transfer.get_mut("unpack_config") {
            None => {
                let mut list = ArrayOfTables::new();
                list.push(entry(SNAPSHOTTER));
                list.push(entry(DEFAULT_SNAPSHOTTER));
                transfer.insert("unpack_config", Item::ArrayOfTables(list));
                self.record_unpack(shown, None);
            }
            Some(Item::ArrayOfTables(list)) => {
                if !list.iter().any(|t| listed(t)) {
                    list.push(entry(SNAPSHOTTER));
                    self.record_unpack(shown, Some(list.len() - 1));
                }
            }
            Some(Item::Value(Value::Array(list))) => {
                if !list.iter().filter_map(Value::as_inline_table).any(|t| listed(t)) {
                    let table: InlineTable = entry(SNAPSHOTTER).into_inline_table();
                    list.push(table);
                    self.record_unpack(shown, Some(list.len() - 1));
                }
            }
            Some(_) => return Err(MergeError::NotAList(shown)),
        }
        Ok(())
    }

    fn record_unpack(&mut self, key: String, existing: Option<usize>) {
        let ours = format!("{{ platform = \"linux\", snapshotter = \"{SNAPSHOTTER}\" }}");
        self.changes.push(match existing {
            None => Change {
                key,
                old: None,
                new: format!("[{ours}, {{ platform = \"linux\", snapshotter = \"{DEFAULT_SNAPSHOTTER}\" }}]"),
            },
            Some(n) => Change {
                key: format!("{key}[{n}]"),
                old: None,
                new: ours,
            },
        });
    }
}

fn implicit_table() -> Item {
    let mut t = Table::new();
    t.set_implicit(true);
    Item::Table(t)
}

/// Whether two values are the same TOML value (whatever their quoting or spacing).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.value() == y.value(),
        (Value::Integer(x), Value::Integer(y)) => x.value() == y.value(),
        (Value::Boolean(x), Value::Boolean(y)) => x.value() == y.value(),
        _ => false,
    }
}

/// `a.b."c.d"`: a key path as TOML writes it.
fn dotted(path: &[&str]) -> String {
    path.iter()
        .map(|k| toml_edit::Key::new(*k).display_repr().into_owned())
        .collect::<Vec<_>>()
        .join(".")
}
