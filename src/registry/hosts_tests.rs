use super::*;

fn parsed(text: &str) -> Vec<HostConfig> {
    parse(Path::new("/etc/containerd/certs.d/docker.io/hosts.toml"), text).unwrap()
}

fn error(text: &str) -> String {
    parse(Path::new("/c/r.test/hosts.toml"), text).unwrap_err().to_string()
}

fn url(scheme: &str, host: &str, path: &str) -> Option<HostUrl> {
    Some(HostUrl {
        scheme: scheme.into(),
        host: host.into(),
        path: path.into(),
    })
}

#[test]
fn mirrors_come_in_file_order_and_the_server_last() {
    let h = parsed(
        r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:30021"]
  capabilities = ["pull", "resolve"]
[host."https://a.mirror"]
  capabilities = ["pull"]
[host."http://127.0.0.1:30020"]
"#,
    );
    let urls: Vec<_> = h.iter().map(|e| e.url.clone()).collect();
    assert_eq!(
        urls,
        vec![
            url("http", "127.0.0.1:30021", "/v2"),
            url("https", "a.mirror", "/v2"),
            url("http", "127.0.0.1:30020", "/v2"),
            url("https", "registry-1.docker.io", "/v2"),
        ]
    );
    assert_eq!(h[0].capabilities(), Capabilities::PULL.union(Capabilities::RESOLVE));
    assert_eq!(h[1].capabilities(), Capabilities::PULL);
    assert_eq!(h[2].capabilities(), Capabilities::ALL, "absent: every capability");
}

#[test]
fn without_server_the_last_entry_is_the_registry_itself() {
    let h = parsed("[host.\"https://m.test\"]\ncapabilities = [\"pull\"]\n");
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].url, None);
    assert_eq!(h[1].capabilities(), Capabilities::ALL);
}

#[test]
fn a_server_without_scheme_is_https_and_paths_get_v2_unless_overridden() {
    let h = parsed("server = \"r.test:5000\"\n");
    assert_eq!(h[0].url, url("https", "r.test:5000", "/v2"));
    let h =
        parsed("[host.\"https://m.test/us/\"]\n[host.\"https://n.test/x/v2\"]\n[host.\"https://o.test/a/./b/../c\"]\n");
    assert_eq!(h[0].url, url("https", "m.test", "/us/v2"));
    assert_eq!(h[1].url, url("https", "n.test", "/x/v2"), "already ends with /v2");
    assert_eq!(
        h[2].url,
        url("https", "o.test", "/a/c/v2"),
        "cleaned like Go's path.Clean"
    );
}

#[test]
fn override_path_keeps_the_path_as_written() {
    let h = parsed(
        "[host.\"https://m.test/custom/api\"]\noverride_path = true\n[host.\"https://n.test\"]\noverride_path = true\n",
    );
    assert_eq!(h[0].url, url("https", "m.test", "/custom/api"));
    assert_eq!(h[1].url, url("https", "n.test", ""));
    let h = parsed("server = \"https://s.test/root\"\noverride_path = true\n");
    assert_eq!(h[0].url, url("https", "s.test", "/root"));
}

#[test]
fn ca_is_a_path_or_a_list_relative_to_the_file() {
    let h = parsed("ca = \"mirror.crt\"\n[host.\"https://m.test\"]\nca = [\"/etc/certs/a.pem\", \"b.pem\"]\n");
    assert_eq!(
        h[0].tls.ca,
        vec![
            PathBuf::from("/etc/certs/a.pem"),
            PathBuf::from("/etc/containerd/certs.d/docker.io/b.pem")
        ]
    );
    assert_eq!(
        h[1].tls.ca,
        vec![PathBuf::from("/etc/containerd/certs.d/docker.io/mirror.crt")]
    );
}

#[test]
fn client_is_a_path_a_list_of_paths_or_a_list_of_pairs() {
    let h = parsed(
        r#"
client = "/c/both.pem"
[host."https://a.test"]
client = ["/c/1.pem", "/c/2.pem"]
[host."https://b.test"]
client = [["/c/cert", "/c/key"], ["/c/both.pem", ""]]
"#,
    );
    assert_eq!(h[2].tls.client, vec![(PathBuf::from("/c/both.pem"), None)]);
    assert_eq!(
        h[0].tls.client,
        vec![(PathBuf::from("/c/1.pem"), None), (PathBuf::from("/c/2.pem"), None)]
    );
    assert_eq!(
        h[1].tls.client,
        vec![
            (PathBuf::from("/c/cert"), Some(PathBuf::from("/c/key"))),
            (PathBuf::from("/c/both.pem"), None)
        ]
    );
}

#[test]
fn headers_are_strings_or_lists_and_skip_verify_and_dial_timeout_are_read() {
    let h = parsed(
        r#"
[host."http://127.0.0.1:65001"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  dial_timeout = "200ms"
  [host."http://127.0.0.1:65001".header]
    X-Dragonfly-Registry = "https://index.docker.io"
    x-multi = ["a", "b"]
"#,
    );
    assert_eq!(h[0].tls.skip_verify, Some(true));
    assert_eq!(h[0].tls.dial_timeout, Some(Duration::from_millis(200)));
    assert_eq!(
        h[0].header,
        vec![
            (
                "X-Dragonfly-Registry".to_string(),
                vec!["https://index.docker.io".to_string()]
            ),
            ("x-multi".to_string(), vec!["a".to_string(), "b".to_string()]),
        ]
    );
    assert_eq!(h[1].tls, TlsConfig::default());
}

#[test]
fn go_durations_parse_like_time_parse_duration() {
    assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
    assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(go_duration("250us"), Some(Duration::from_micros(250)));
    assert_eq!(go_duration("0"), Some(Duration::ZERO));
    for bad in ["", "5", "1x", "s", "-1s"] {
        assert_eq!(go_duration(bad), None, "{bad:?}");
    }
}

#[test]
fn bad_files_name_the_file_and_the_key() {
    let e = error("[host.\"https://m.test\"]\ncapabilities = [\"pull\", \"fly\"]\n");
    assert!(
        e.contains("/c/r.test/hosts.toml") && e.contains("host.\"https://m.test\".capabilities") && e.contains("fly"),
        "{e}"
    );
    let e = error("skip_verify = \"yes\"\n");
    assert!(e.contains("/c/r.test/hosts.toml: key skip_verify"), "{e}");
    let e = error("[host.\"https://m.test\"]\ndial_timeout = \"soon\"\n");
    assert!(e.contains("dial_timeout") && e.contains("soon"), "{e}");
    let e = error("[host.\"https://m.test\"]\nclient = [[\"only-one\"]]\n");
    assert!(e.contains(".client") && e.contains("pair"), "{e}");
    let e = error("ca = 3\n");
    assert!(e.contains("key ca"), "{e}");
    let e = error("[host.\"https://m.test\".header]\nx = 1\n");
    assert!(e.contains("header.x"), "{e}");
    let e = error("[host.\"ftp://m.test\"]\n");
    assert!(e.contains("scheme"), "{e}");
    let e = error("mirrors = []\n");
    assert!(e.contains("key mirrors: unknown key"), "{e}");
    let e = error("server = \n");
    assert!(e.contains("/c/r.test/hosts.toml: not TOML"), "{e}");
}

#[test]
fn host_directories_are_tried_in_containerds_order() {
    let root = Path::new("/certs.d");
    assert_eq!(
        host_dirs(root, "r.test:5000"),
        vec![
            PathBuf::from("/certs.d/r.test_5000_"),
            PathBuf::from("/certs.d/r.test:5000"),
            PathBuf::from("/certs.d/_default"),
        ]
    );
    assert_eq!(
        host_dirs(root, "docker.io"),
        vec![PathBuf::from("/certs.d/docker.io"), PathBuf::from("/certs.d/_default")]
    );
    assert_eq!(host_dirs(root, ".."), vec![PathBuf::from("/certs.d/_default")]);
}

#[test]
fn a_directory_without_hosts_toml_gives_dockers_certificate_files() {
    let d = tempfile::tempdir().unwrap();
    for f in ["ca.crt", "client.cert", "client.key", "other.cert", "notes.txt"] {
        std::fs::write(d.path().join(f), "x").unwrap();
    }
    let h = load_dir(d.path()).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].url, None);
    assert_eq!(h[0].tls.ca, vec![d.path().join("ca.crt")]);
    assert_eq!(
        h[0].tls.client,
        vec![
            (d.path().join("client.cert"), Some(d.path().join("client.key"))),
            (d.path().join("other.cert"), None)
        ]
    );
    std::fs::write(d.path().join("hosts.toml"), "server = \"https://s.test\"\n").unwrap();
    assert_eq!(load_dir(d.path()).unwrap()[0].url, url("https", "s.test", "/v2"));
}

#[test]
fn the_files_spegel_and_dragonfly_write_are_read() {
    // Spegel: literal strings, an empty [host] table first, a short dial timeout.
    let h = parsed(
        "server = 'https://registry-1.docker.io'\n\n[host]\n[host.'http://10.0.0.7:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'\n\n[host.'http://10.0.0.7:30021']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'\n",
    );
    let hosts: Vec<_> = h.iter().map(|e| e.url.as_ref().unwrap().host.clone()).collect();
    assert_eq!(hosts, ["10.0.0.7:30020", "10.0.0.7:30021", "registry-1.docker.io"]);
    assert_eq!(h[1].tls.dial_timeout, Some(Duration::from_millis(200)));
    // Dragonfly: the origin registry in a header for its peer proxy.
    let h = parsed(
        "server = \"https://docker.io\"\n\n[host.\"http://127.0.0.1:4001\"]\n  capabilities = [\"pull\", \"resolve\"]\n  [host.\"http://127.0.0.1:4001\".header]\n    X-Dragonfly-Registry = [\"https://registry-1.docker.io\"]\n  [host.\"https://registry-1.docker.io\"]\n    capabilities = [\"pull\", \"resolve\"]\n",
    );
    let hosts: Vec<_> = h.iter().map(|e| e.url.as_ref().unwrap().host.clone()).collect();
    assert_eq!(hosts, ["127.0.0.1:4001", "registry-1.docker.io", "docker.io"]);
    assert_eq!(h[0].header[0].0, "X-Dragonfly-Registry");
}
