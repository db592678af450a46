//! The command line's contract: flags parse into the config they promise.
use super::*;

fn parse(args: &[&str]) -> Command {
    Cli::try_parse_from([&["streamsnap"][..], args].concat())
        .unwrap()
        .command
}

#[test]
fn mount_without_flags_uses_the_config_defaults() {
    let Command::Mount(m) = parse(&["mount", "img", "/mnt"]) else {
        panic!()
    };
    assert_eq!(m.config(), Config::default());
}

#[test]
fn mount_flags_set_their_config_values() {
    let Command::Mount(m) = parse(&[
        "mount",
        "--state-dir=/s",
        "--cache-size=1GiB",
        "--platform=linux/arm64",
        "--index-repo=reg:5000/idx",
        "--prefetch-timeout=0",
        "--read-deadline=8",
        "--stall-timeout=2.5",
        "--background-fill",
        "--background-fill-rate=1MiB",
        "img",
        "/mnt",
    ]) else {
        panic!()
    };
    let c = m.config();
    assert_eq!(c.root, PathBuf::from("/s"));
    assert_eq!(c.cache.disk_size, ByteSize::gib(1));
    assert_eq!(c.registry.platform.architecture, "arm64");
    assert_eq!(c.index.repositories[0].repository, "idx");
    assert_eq!(c.prefetch.timeout, Seconds::default());
    assert_eq!(c.fetch.read_deadline, Seconds::from_secs(8));
    assert_eq!(c.fetch.stall_timeout.0, std::time::Duration::from_millis(2500));
    assert!(c.background_fill.enabled);
    assert_eq!(c.background_fill.rate, Some(ByteSize::mib(1)));
}

#[test]
fn serve_flags_override_and_extend_the_config() {
    let Command::Serve(s) = parse(&[
        "serve",
        "--insecure-registry=r:5000",
        "--profile-quiet=2",
        "--no-profile-replay",
        "--background-fill-delay=0.5",
    ]) else {
        panic!()
    };
    let mut c = Config::default();
    c.registry.insecure.push("a:1".parse().unwrap());
    s.apply(&mut c);
    assert_eq!(c.registry.insecure.len(), 2);
    assert_eq!(c.profile.quiet, Seconds::from_secs(2));
    assert!(!c.profile.replay);
    assert_eq!(c.background_fill.delay.0, std::time::Duration::from_millis(500));
}

#[test]
fn install_defaults_to_the_node_paths_and_systemd() {
    let Command::Install(a) = parse(&["install"]) else {
        panic!()
    };
    let o = a.options();
    assert_eq!(o.config, PathBuf::from("/etc/containerd/config.toml"));
    assert_eq!(o.address, Config::default().address);
    assert_eq!(o.restart.as_deref(), Some("systemctl restart containerd"));
    assert_eq!(o.config_version, None);
    let Command::Uninstall(a) = parse(&["uninstall", "--no-restart", "--config-version=3"]) else {
        panic!()
    };
    let o = a.options();
    assert_eq!(o.restart, None);
    assert_eq!(o.config_version, Some(install::ConfigVersion::V3));
    assert!(Cli::try_parse_from(["streamsnap", "install", "--config-version=1"]).is_err());
}

#[test]
fn credential_flags_set_the_credentials_section_with_kubelets_names() {
    let Command::Serve(s) = parse(&[
        "serve",
        "--docker-config=/d/config.json",
        "--image-credential-provider-config=/k/config.yaml",
        "--image-credential-provider-bin-dir=/k/bin",
    ]) else {
        panic!()
    };
    let mut c = Config::default();
    c.credentials.exec_timeout = Seconds::from_secs(3);
    s.apply(&mut c);
    assert_eq!(c.credentials.docker_config, Some(PathBuf::from("/d/config.json")));
    assert_eq!(c.credentials.provider_config, Some(PathBuf::from("/k/config.yaml")));
    assert_eq!(c.credentials.provider_bin_dir, Some(PathBuf::from("/k/bin")));
    assert_eq!(c.credentials.exec_timeout, Seconds::from_secs(3));
    let Command::Mount(m) = parse(&["mount", "--docker-config=/d/c.json", "img", "/mnt"]) else {
        panic!()
    };
    assert_eq!(m.config().credentials.docker_config, Some(PathBuf::from("/d/c.json")));
}

#[test]
fn command_line_values_are_checked_like_the_config_file() {
    for bad in [
        &["serve", "--index-repo=Not A Repo"][..],
        &["serve", "--background-fill-delay=nan"],
        &["serve", "--insecure-registry=http://r"],
        &["mount", "--platform=amd64", "img", "/mnt"],
        &["mount", "Bad Image", "/mnt"],
    ] {
        assert!(
            Cli::try_parse_from([&["streamsnap"][..], bad].concat()).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn registry_config_path_is_a_flag_of_serve_mount_pull_and_index() {
    let dir = Some(PathBuf::from("/etc/containerd/certs.d"));
    let Command::Serve(s) = parse(&["serve", "--registry-config-path=/etc/containerd/certs.d"]) else {
        panic!()
    };
    let mut c = Config::default();
    s.apply(&mut c);
    assert_eq!(c.registry.config_path, dir);
    let Command::Mount(m) = parse(&[
        "mount",
        "--registry-config-path",
        "/etc/containerd/certs.d",
        "img",
        "/mnt",
    ]) else {
        panic!()
    };
    assert_eq!(m.config().registry.config_path, dir);
    let Command::Pull(p) = parse(&["pull", "--registry-config-path=/etc/containerd/certs.d", "img"]) else {
        panic!()
    };
    assert_eq!(p.hosts.config().registry.config_path, dir);
    let Command::Index(i) = parse(&["index", "--registry-config-path=/etc/containerd/certs.d", "img"]) else {
        panic!()
    };
    assert_eq!(i.hosts.config().registry.config_path, dir);
    let Command::Serve(s) = parse(&["serve"]) else { panic!() };
    let mut c = Config::default();
    s.apply(&mut c);
    assert_eq!(c.registry.config_path, None, "no mirrors unless configured");
}
