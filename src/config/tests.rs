use super::*;

fn load(text: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    Config::load(Some(&p)).map_err(|e| e.to_string())
}

#[test]
fn unknown_top_level_keys_are_rejected_naming_the_file_and_the_key() {
    let e = load("root = \"/x\"\ncache_sise = \"1GiB\"\n").unwrap_err();
    assert!(e.contains("cache_sise") && e.contains("c.toml"), "{e}");
}

#[test]
fn unknown_keys_inside_a_section_are_rejected_naming_the_key() {
    let e = load("[cache]\ndisk_sise = \"1GiB\"\n").unwrap_err();
    assert!(e.contains("disk_sise") && e.contains("c.toml"), "{e}");
}

#[test]
fn the_old_flat_keys_are_unknown() {
    let e = load("cache_size = \"1GiB\"\n").unwrap_err();
    assert!(e.contains("cache_size"), "{e}");
}

#[test]
fn a_missing_explicit_file_is_an_error_but_the_default_may_be_absent() {
    assert!(Config::load(Some(Path::new("/nonexistent/streamsnap.toml"))).is_err());
}

#[test]
fn an_empty_file_gives_the_single_machine_defaults() {
    let c = load("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.address, PathBuf::from("/run/streamsnap/streamsnap.sock"));
    assert_eq!(c.cache.disk_size, ByteSize::gib(10));
    assert_eq!(c.registry.platform.to_string(), "linux/amd64");
    assert_eq!(c.prefetch.timeout.0, Duration::from_secs(10));
    assert!(c.profile.replay && !c.background_fill.enabled);
}

#[test]
fn the_documented_example_config_is_valid_and_holds_the_defaults() {
    let c: Config = toml::from_str(include_str!("../../deploy/config.toml")).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn a_section_sets_only_the_keys_it_names() {
    let c = load("[background_fill]\nenabled = true\n").unwrap();
    assert!(c.background_fill.enabled);
    assert_eq!(c.background_fill.delay, Seconds::from_secs(5));
    assert_eq!(c.profile, Profile::default());
}

#[test]
fn nested_sections_are_read_typed() {
    let c = load(
        "metrics_address = \"127.0.0.1:9580\"\n\
         [registry]\ninsecure = [\"r:5000\"]\nplatform = \"linux/arm64/v8\"\n\
         [cache]\ndisk_size = \"1GiB\"\nmemory_size = 1048576\n\
         [index]\nrepositories = [\"reg:5000/team/indexes\"]\ntrust_referrers = true\n\
         [fetch]\nread_deadline = 8\nstall_timeout = 2.5\nread_ahead = \"8MiB\"\n\
         [prefetch]\ntimeout = 0.5\n\
         [background_fill]\ndelay = 0\nrate = \"100MiB\"\n\
         [profile]\nquiet = 2\npush = true\nreplay = false\nreplay_budget = \"64MiB\"\n",
    )
    .unwrap();
    assert_eq!(c.metrics_address, Some("127.0.0.1:9580".parse().unwrap()));
    assert_eq!(c.registry.insecure[0].as_str(), "r:5000");
    assert_eq!(c.registry.config_path, None);
    assert_eq!(c.registry.platform.variant.as_deref(), Some("v8"));
    assert_eq!(c.cache.disk_size, ByteSize::gib(1));
    assert_eq!(c.cache.memory_size, ByteSize::mib(1));
    assert_eq!(c.index.repositories[0].repository, "team/indexes");
    assert_eq!(c.fetch.read_deadline, Seconds::from_secs(8));
    assert_eq!(c.fetch.stall_timeout.0, Duration::from_millis(2500));
    assert_eq!(c.fetch.read_ahead, ByteSize::mib(8));
    assert!(c.index.trust_referrers);
    assert_eq!(c.prefetch.timeout.0, Duration::from_millis(500));
    assert_eq!(c.background_fill.delay.0, Duration::ZERO);
    assert_eq!(c.background_fill.rate, Some(ByteSize::mib(100)));
    assert_eq!(c.profile.quiet, Seconds::from_secs(2));
    assert!(c.profile.push && !c.profile.replay);
    assert_eq!(c.profile.replay_budget, ByteSize::mib(64));
}

#[test]
fn the_credentials_section_is_read_and_checked_like_the_others() {
    let c = load("[credentials]\ndocker_config = \"/d/c.json\"\nprovider_config = \"/p.json\"\nprovider_bin_dir = \"/bin\"\nexec_timeout = 2\n").unwrap();
    assert_eq!(c.credentials.docker_config, Some(PathBuf::from("/d/c.json")));
    assert_eq!(c.credentials.provider_bin_dir, Some(PathBuf::from("/bin")));
    assert_eq!(c.credentials.exec_timeout, Seconds::from_secs(2));
    let e = load("[credentials]\ncreds_store = \"pass\"\n").unwrap_err();
    assert!(e.contains("creds_store"), "{e}");
}

#[test]
fn the_cri_proxy_is_off_unless_its_address_is_set() {
    assert_eq!(Config::default().cri.proxy_address, None);
    let c = load("[cri]\nproxy_address = \"/run/s/cri.sock\"\n").unwrap();
    assert_eq!(c.cri.proxy_address, Some(PathBuf::from("/run/s/cri.sock")));
    assert_eq!(
        c.cri.containerd_address,
        PathBuf::from("/run/containerd/containerd.sock")
    );
}

#[test]
fn a_bad_size_is_rejected_naming_the_key_and_the_value() {
    let e = load("[cache]\ndisk_size = \"lots\"\n").unwrap_err();
    assert!(e.contains("disk_size") && e.contains("lots"), "{e}");
}

#[test]
fn a_bad_fill_rate_is_rejected_naming_the_key_and_the_value() {
    let e = load("[background_fill]\nrate = \"fast\"\n").unwrap_err();
    assert!(e.contains("rate") && e.contains("fast"), "{e}");
}

#[test]
fn a_negative_duration_is_rejected_naming_the_key_and_the_value() {
    let e = load("[prefetch]\ntimeout = -1.5\n").unwrap_err();
    assert!(
        e.contains("timeout") && e.contains("-1.5") && e.contains("non-negative"),
        "{e}"
    );
}

#[test]
fn a_nan_duration_is_rejected() {
    let e = load("[profile]\nquiet = nan\n").unwrap_err();
    assert!(e.contains("quiet") && e.contains("finite"), "{e}");
}

#[test]
fn a_bad_platform_is_rejected_naming_the_key_and_the_value() {
    let c = load("[registry]\nconfig_path = \"/etc/containerd/certs.d\"\n").unwrap();
    assert_eq!(c.registry.config_path, Some(PathBuf::from("/etc/containerd/certs.d")));
    let e = load("[registry]\nplatform = \"amd64\"\n").unwrap_err();
    assert!(
        e.contains("platform") && e.contains("amd64") && e.contains("os/arch"),
        "{e}"
    );
}

#[test]
fn index_repositories_must_be_references() {
    let e = load("[index]\nrepositories = [\"Not A Repo\"]\n").unwrap_err();
    assert!(e.contains("repositories") && e.contains("Not A Repo"), "{e}");
}

#[test]
fn insecure_registries_must_be_host_and_port() {
    let e = load("[registry]\ninsecure = [\"http://r:5000\"]\n").unwrap_err();
    assert!(e.contains("insecure") && e.contains("http://r:5000"), "{e}");
}

#[test]
fn registry_hosts_may_be_names_addresses_or_bracketed_ipv6() {
    for ok in ["r", "reg.local:5000", "10.0.0.1:443", "[::1]", "[fd00::1]:5000"] {
        assert!(ok.parse::<RegistryHost>().is_ok(), "{ok}");
    }
    for bad in ["", "r:", "r:http", "r/path", "r:99999", "a b"] {
        assert!(bad.parse::<RegistryHost>().is_err(), "{bad}");
    }
}

#[test]
fn seconds_parse_from_the_command_line_like_the_file() {
    assert_eq!("2".parse::<Seconds>().unwrap(), Seconds::from_secs(2));
    assert_eq!("0.25".parse::<Seconds>().unwrap().0, Duration::from_millis(250));
    assert!("-1".parse::<Seconds>().is_err());
    assert!("inf".parse::<Seconds>().is_err());
    assert!("soon".parse::<Seconds>().is_err());
}

#[test]
fn seconds_display_round_trips() {
    let s = Seconds(Duration::from_millis(1500));
    assert_eq!(s.to_string().parse::<Seconds>().unwrap(), s);
}
