//! A private Debian `docker-registry` (distribution 2.8) on 127.0.0.1, with byte accounting from its log.
use super::{free_port, require_tool, run, terminate};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running docker-registry with filesystem storage in a TempDir; killed on Drop.
pub struct Registry {
    child: Child,
    addr: String,
    log_path: PathBuf,
    storage: PathBuf,
    dir: tempfile::TempDir,
}

/// The registry's port inside a network namespace of its own (every port is free there).
pub const NETNS_PORT: u16 = 5000;

/// Where and how `Registry::start_with` runs the registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Run inside this network namespace (`ip netns exec`), listening on 127.0.0.1:NETNS_PORT there;
    /// the caller makes it reachable (the start-up benchmark puts a delaying relay in front).
    pub netns: Option<String>,
    /// Keep blobs here instead of in the TempDir, so pushed images survive the process.
    pub storage: Option<PathBuf>,
    /// Require HTTP Basic auth checked against this htpasswd file (bcrypt; see [`htpasswd`]).
    pub htpasswd: Option<PathBuf>,
    /// In a namespace, listen on every address there (0.0.0.0:NETNS_PORT), not only its loopback.
    pub all_interfaces: bool,
    /// A pull-through cache of this registry (`proxy: remoteurl:`, e.g. `http://10.0.0.2:5000`).
    pub proxy_remote_url: Option<String>,
    /// Serve HTTPS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Writes an htpasswd file (bcrypt, as docker-registry requires) with `users` (name, password).
pub fn htpasswd(path: &Path, users: &[(&str, &str)]) {
    require_tool("htpasswd");
    let lines: String = users
        .iter()
        .map(|(u, p)| run(Command::new("htpasswd").args(["-Bbn", u, p])).trim().to_string() + "\n")
        .collect();
    std::fs::write(path, lines).unwrap();
}

/// One GET of a blob as seen in the registry log ("response completed" line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRequest {
    /// Request URI, e.g. `/v2/feat/blobs/sha256:…`.
    pub uri: String,
    /// The `sha256:…` digest taken from the URI.
    pub digest: String,
    /// HTTP status (206 means a Range request was honoured; the log does not record the Range header itself).
    pub status: u16,
    /// `http.response.written`: body bytes actually written to the client.
    pub bytes: u64,
}

impl Registry {
    /// Starts `docker-registry serve` on a free 127.0.0.1 port and waits until `GET /v2/` answers.
    pub fn start() -> Registry {
        Self::start_with(RegistryOpts::default())
    }

    /// Like `start`, in a network namespace and/or with persistent storage.
    pub fn start_with(opts: RegistryOpts) -> Registry {
        require_tool("docker-registry");
        require_tool("curl");
        let dir = tempfile::Builder::new().prefix("registry-").tempdir().expect("tempdir");
        let storage = opts.storage.clone().unwrap_or_else(|| dir.path().join("storage"));
        std::fs::create_dir_all(&storage).unwrap();
        let log_path = dir.path().join("registry.log");
        let mut last_err = String::new();
        let wrap = |program: &str| {
            let mut c = Command::new(if opts.netns.is_some() { "ip" } else { program });
            if let Some(ns) = &opts.netns {
                c.args(["netns", "exec", ns, program]);
            }
            c
        };
        for _attempt in 0..5 {
            let port = if opts.netns.is_some() { NETNS_PORT } else { free_port() };
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                     maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: {listen}:{port}\n  secret: streamsnap-test-secret\n{tls}{auth}{proxy}",
                    storage.display(),
                    listen = if opts.all_interfaces { "0.0.0.0" } else { "127.0.0.1" },
                    tls = opts.tls.as_ref().map_or(String::new(), |(cert, key)| format!(
                        "  tls:\n    certificate: {}\n    key: {}\n",
                        cert.display(),
                        key.display()
                    )),
                    proxy = opts
                        .proxy_remote_url
                        .as_ref()
                        .map_or(String::new(), |u| format!("proxy:\n  remoteurl: {u}\n")),
                    auth = opts.htpasswd.as_ref().map_or(String::new(), |p| format!(
                        "auth:\n  htpasswd:\n    realm: streamsnap-test\n    path: {}\n",
                        p.display()
                    )),
                ),
            )
            .unwrap();
            let log = File::create(&log_path).unwrap();
            let mut child = wrap("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry");
            let scheme = if opts.tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://127.0.0.1:{port}/v2/");
            let start = Instant::now();
            loop {
                if let Ok(Some(st)) = child.try_wait() {
                    last_err = format!(
                        "docker-registry exited with {st}: {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    break;
                }
                let out = wrap("curl")
                    .args(["-s", "-k", "-o", "/dev/null", "-w", "%{http_code}", &url])
                    .output();
                // With auth, the 401 challenge of /v2/ says it is up.
                let up: &[u8] = if opts.htpasswd.is_some() { b"401" } else { b"200" };
                if matches!(&out, Ok(o) if o.stdout == up) {
                    return Registry {
                        child,
                        addr: format!("127.0.0.1:{port}"),
                        log_path,
                        storage,
                        dir,
                    };
                }
                if start.elapsed() > Duration::from_secs(20) {
                    terminate(&mut child, Duration::from_secs(2));
                    panic!(
                        "docker-registry did not answer {url} within 20s; log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start docker-registry (port races?): {last_err}");
    }

    /// SIGKILLs the registry now (a mirror dying mid-transfer); its log stays readable.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// "HOST:PORT", the host part of image references pushed here.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Makes clients use `addr` (a relay in front of a registry in a network namespace).
    pub fn set_addr(&mut self, addr: String) {
        self.addr = addr;
    }

    /// Path of the registry's combined stdout/stderr log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Directory holding the registry's filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.storage.clone()
    }

    /// Current log offset; pass it to `*_since` to measure what happened after this point.
    pub fn mark(&self) -> u64 {
        self.settle();
        std::fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0)
    }

    /// All blob GETs logged since `mark` (waits briefly for the log to stop growing first).
    pub fn blob_requests_since(&self, mark: u64) -> Vec<BlobRequest> {
        self.settle();
        self.logged_since(mark)
    }

    /// Body bytes of blob GETs completed since `mark`, read at once (responses still running are not counted).
    pub fn bytes_logged_since(&self, mark: u64) -> u64 {
        self.logged_since(mark).iter().map(|r| r.bytes).sum()
    }

    fn logged_since(&self, mark: u64) -> Vec<BlobRequest> {
        let mut f = File::open(&self.log_path).expect("open registry log");
        f.seek(SeekFrom::Start(mark)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        String::from_utf8_lossy(&buf)
            .lines()
            .filter_map(parse_blob_get)
            .collect()
    }

    /// All blob GETs logged since the registry started.
    pub fn blob_requests(&self) -> Vec<BlobRequest> {
        self.blob_requests_since(0)
    }

    /// Total body bytes the registry wrote for blob GETs since it started.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served_since(0)
    }

    /// Total body bytes written for blob GETs since `mark`.
    pub fn bytes_served_since(&self, mark: u64) -> u64 {
        self.blob_requests_since(mark).iter().map(|r| r.bytes).sum()
    }

    /// Total body bytes written for GETs of the blob `digest` ("sha256:…" or bare hex) since start.
    pub fn bytes_served_for_blob(&self, digest: &str) -> u64 {
        self.bytes_served_for_blob_since(digest, 0)
    }

    /// Body bytes written for GETs of blob `digest` since `mark`.
    pub fn bytes_served_for_blob_since(&self, digest: &str, mark: u64) -> u64 {
        let want = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.blob_requests_since(mark)
            .iter()
            .filter(|r| r.digest.strip_prefix("sha256:").unwrap_or(&r.digest) == want)
            .map(|r| r.bytes)
            .sum()
    }

    /// Sum of an image's layer sizes, and the layer digests, from its manifest.
    pub fn layers(&self, reference: &str) -> (u64, Vec<String>) {
        let m = self.manifest(reference);
        let layers = m["layers"].as_array().unwrap();
        let digests = layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect();
        (layers.iter().map(|l| l["size"].as_u64().unwrap()).sum(), digests)
    }

    /// Body bytes written for GETs of any of these blobs since `mark`.
    pub fn layer_bytes_served_since(&self, digests: &[String], mark: u64) -> u64 {
        digests.iter().map(|d| self.bytes_served_for_blob_since(d, mark)).sum()
    }

    /// Fetches the OCI/Docker manifest for `repo:tag` or `repo@digest` (refs may include the host) via curl.
    pub fn manifest(&self, reference: &str) -> serde_json::Value {
        let r = reference
            .strip_prefix(&format!("{}/", self.addr()))
            .unwrap_or(reference);
        let (repo, tag) = match r.split_once('@') {
            Some((repo, d)) => (repo, d),
            None => r.rsplit_once(':').unwrap_or((r, "latest")),
        };
        let url = format!("http://{}/v2/{}/manifests/{}", self.addr(), repo, tag);
        let body = run(Command::new("curl").args([
            "-sSf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            &url,
        ]));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("manifest at {url} is not JSON ({e}): {body}"))
    }

    /// Whether `repo:tag` (refs may include the host) has a manifest here.
    pub fn has_manifest(&self, reference: &str) -> bool {
        let r = reference
            .strip_prefix(&format!("{}/", self.addr()))
            .unwrap_or(reference);
        let (repo, tag) = r.rsplit_once(':').unwrap_or((r, "latest"));
        let url = format!("http://{}/v2/{}/manifests/{}", self.addr(), repo, tag);
        let code = run(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            &url,
        ]));
        code == "200"
    }

    /// Waits (max ~3 s) until the log file stops growing, since the registry logs right after a response ends.
    fn settle(&self) {
        let len = || std::fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let start = Instant::now();
        let mut prev = len();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = len();
            if now == prev || start.elapsed() > Duration::from_secs(3) {
                return;
            }
            prev = now;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(3));
    }
}

/// Parses one logrus text line; returns a BlobRequest for completed GETs of `/v2/…/blobs/…`.
fn parse_blob_get(line: &str) -> Option<BlobRequest> {
    if !line.contains("http.response.written=") {
        return None;
    }
    let f = parse_logfmt(line);
    if !f.get("msg")?.starts_with("response completed") || f.get("http.request.method")? != "GET" {
        return None;
    }
    let uri = f.get("http.request.uri")?.clone();
    let path = uri.split('?').next().unwrap_or(&uri);
    let idx = path.find("/blobs/")?;
    if !path.starts_with("/v2/") {
        return None;
    }
    let digest = path[idx + "/blobs/".len()..].to_string();
    if digest.starts_with("uploads") {
        return None;
    }
    Some(BlobRequest {
        digest,
        status: f.get("http.response.status").and_then(|s| s.parse().ok()).unwrap_or(0),
        bytes: f.get("http.response.written")?.parse().ok()?,
        uri,
    })
}

/// Minimal logfmt parser: `key=value` or `key="quoted \"value\""` separated by spaces.
fn parse_logfmt(line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let b: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == ' ' {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != '=' && b[i] != ' ' {
            i += 1;
        }
        let key: String = b[ks..i].iter().collect();
        if i >= b.len() || b[i] != '=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' && i + 1 < b.len() {
                    i += 1;
                }
                val.push(b[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < b.len() && b[i] != ' ' {
                val.push(b[i]);
                i += 1;
            }
        }
        out.insert(key, val);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_real_line() {
        let l = r#"time="2026-11-26T07:37:09.193646837Z" level=info msg="response completed" go.version=go1.19.8 http.request.host="127.0.0.1:5999" http.request.id=f5 http.request.method=GET http.request.remoteaddr="127.0.0.1:56536" http.request.uri="/v2/x/blobs/sha256:ab" http.request.useragent="containerd/1.6.20~ds1" http.response.contenttype="application/octet-stream" http.response.duration=1.6ms http.response.status=206 http.response.written=4096"#;
        let r = super::parse_blob_get(l).unwrap();
        assert_eq!((r.digest.as_str(), r.status, r.bytes), ("sha256:ab", 206, 4096));
    }
}
