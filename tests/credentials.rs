//! Registry credentials from every source a node has, against real registries:
//! `docker-registry` with htpasswd (Basic), and a bearer token server with
//! short-lived tokens in front of one (the fault proxy's token mode). The
//! credential helper and the credential-provider plugin are small scripts of
//! the test speaking the real protocols; lazy reads go through `mount` and
//! through `serve` with containerd.
mod common;
use common::image::BigLayerImage;
use common::registry::htpasswd;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret";
/// base64 of "alice:s3cret".
const ALICE: &str = "YWxpY2U6czNjcmV0";

/// An eStargz image in a registry that wants alice's password (htpasswd),
/// pushed through an open registry on the same storage.
struct Private {
    _open: Registry,
    registry: Registry,
    reference: String,
    image: BigLayerImage,
    work: tempfile::TempDir,
}

fn private_image(size_mib: u64) -> Private {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let open = Registry::start_with(RegistryOpts {
        storage: Some(storage.clone()),
        ..Default::default()
    });
    let image = build_big_layer_image(&work.path().join("image"), size_mib);
    let pushed = push(&image.image, &open, Format::Estargz);
    let users = work.path().join("htpasswd");
    htpasswd(&users, &[(USER, PASSWORD)]);
    let registry = Registry::start_with(RegistryOpts {
        storage: Some(storage),
        htpasswd: Some(users),
        ..Default::default()
    });
    let reference = pushed.replacen(&open.addr(), &registry.addr(), 1);
    Private {
        _open: open,
        registry,
        reference,
        image,
        work,
    }
}

/// Writes `dir/config.json`; returns `dir` (for `DOCKER_CONFIG`).
fn docker_config(dir: &Path, json: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
    dir.to_path_buf()
}

/// Writes an executable shell script `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// `PATH` with `dir` first, for helpers found the way docker finds them.
fn path_with(dir: &Path) -> PathBuf {
    PathBuf::from(format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

fn mount_with(p: &Private, extra: &[&str], env: &[(&str, &Path)]) -> Result<MountProcess, String> {
    let (state, mnt) = (p.work.path().join("state"), p.work.path().join("mnt"));
    MountProcess::try_start_env(&p.reference, &state, &mnt, extra, env)
}

/// Reads every small file of the image through the mount and checks it.
fn read_all(mount: &MountProcess, image: &BigLayerImage) {
    for (path, content) in image.before.iter().chain(&image.after) {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content, "{path}");
    }
}

/// Ranged (206) blob reads the registry served, and their bytes: the reads were lazy.
fn lazy_reads(registry: &Registry) -> (usize, u64) {
    let ranged: Vec<_> = registry
        .blob_requests()
        .into_iter()
        .filter(|r| r.status == 206)
        .collect();
    (ranged.len(), ranged.iter().map(|r| r.bytes).sum())
}

fn assert_lazy(p: &Private, size_mib: u64) {
    let (n, bytes) = lazy_reads(&p.registry);
    eprintln!("{n} ranged blob reads, {bytes} bytes of a {size_mib} MiB layer");
    assert!(n > 0, "no ranged read reached the registry");
    assert!(
        bytes < size_mib << 20,
        "{bytes} bytes served: the layer was not read lazily"
    );
}

#[test]
fn config_json_auths_let_mount_read_lazily_from_an_htpasswd_registry() {
    let p = private_image(8);
    let json = format!(r#"{{"auths":{{"{}":{{"auth":"{ALICE}"}}}}}}"#, p.registry.addr());
    let docker = docker_config(&p.work.path().join("docker"), &json);
    let mount = mount_with(&p, &[], &[("DOCKER_CONFIG", &docker)]).unwrap_or_else(|log| panic!("{log}"));
    read_all(&mount, &p.image);
    assert_lazy(&p, 8);
    mount.stop();
}

#[test]
fn a_wrong_password_in_config_json_fails_naming_the_registry_and_the_file() {
    let p = private_image(4);
    let json = format!(
        r#"{{"auths":{{"{}":{{"username":"alice","password":"not-the-password"}}}}}}"#,
        p.registry.addr()
    );
    let docker = docker_config(&p.work.path().join("docker"), &json);
    let log = match mount_with(&p, &[], &[("DOCKER_CONFIG", &docker)]) {
        Ok(m) => panic!("mounted with a wrong password:\n{}", m.log()),
        Err(log) => log,
    };
    let file = docker.join("config.json");
    for word in [
        "access denied (401)",
        &p.registry.addr(),
        &format!("credentials from config.json {}", file.display()),
    ] {
        assert!(log.contains(word), "log does not say {word:?}:\n{log}");
    }
    assert!(!log.contains("not-the-password"), "the password was logged:\n{log}");
}

#[test]
fn a_credential_helper_script_answers_by_the_helper_protocol() {
    let p = private_image(4);
    let bin = p.work.path().join("bin");
    let asked = p.work.path().join("helper-asked");
    script(
        &bin,
        "docker-credential-streamsnaptest",
        &format!(
            r#"[ "$1" = get ] || exit 1
read url; echo "$url" >> {asked}
printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}' "$url""#,
            asked = asked.display()
        ),
    );
    let json = format!(r#"{{"credHelpers":{{"{}":"streamsnaptest"}}}}"#, p.registry.addr());
    let docker = docker_config(&p.work.path().join("docker"), &json);
    let path = path_with(&bin);
    let mount =
        mount_with(&p, &[], &[("DOCKER_CONFIG", &docker), ("PATH", &path)]).unwrap_or_else(|log| panic!("{log}"));
    read_all(&mount, &p.image);
    assert_lazy(&p, 4);
    let asked = std::fs::read_to_string(&asked).unwrap();
    eprintln!("helper asked {} time(s)", asked.lines().count());
    assert!(asked.lines().all(|l| l == p.registry.addr()), "{asked}");
    // Its answer is kept: not one helper run per request.
    assert!(asked.lines().count() <= 2, "{asked}");
    mount.stop();
}

#[test]
fn a_wrong_secret_from_a_credential_store_fails_naming_the_registry_and_the_helper() {
    let p = private_image(4);
    let bin = p.work.path().join("bin");
    script(
        &bin,
        "docker-credential-streamsnapstale",
        r#"cat >/dev/null; echo '{"ServerURL":"x","Username":"alice","Secret":"stale-secret"}'"#,
    );
    let docker = docker_config(&p.work.path().join("docker"), r#"{"credsStore":"streamsnapstale"}"#);
    let path = path_with(&bin);
    let log = match mount_with(&p, &[], &[("DOCKER_CONFIG", &docker), ("PATH", &path)]) {
        Ok(m) => panic!("mounted with a stale secret:\n{}", m.log()),
        Err(log) => log,
    };
    for word in [
        "access denied (401)",
        &p.registry.addr(),
        "credential helper docker-credential-streamsnapstale",
    ] {
        assert!(log.contains(word), "log does not say {word:?}:\n{log}");
    }
    assert!(!log.contains("stale-secret"), "the secret was logged:\n{log}");
}

/// kubelet's config for one plugin `test-provider` matching `pattern`.
fn provider_config(dir: &Path, pattern: &str) -> PathBuf {
    let config = dir.join("credential-provider.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig",
            "providers":[{{"name":"test-provider","matchImages":["{pattern}"],"defaultCacheDuration":"1m",
            "apiVersion":"credentialprovider.kubelet.k8s.io/v1","args":["--user","{USER}"],
            "env":[{{"name":"TEST_SECRET","value":"{PASSWORD}"}}]}}]}}"#
        ),
    )
    .unwrap();
    config
}

/// The plugin: logs each request, answers for `pattern` (cacheKeyType Registry, 10m).
fn provider_plugin(bin: &Path, pattern: &str) -> PathBuf {
    let log = bin.join("requests.log");
    script(
        bin,
        "test-provider",
        &format!(
            r#"cat >> {log}; echo >> {log}
cat <<EOF
{{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1",
 "cacheKeyType":"Registry","cacheDuration":"10m",
 "auth":{{"{pattern}":{{"username":"$2","password":"$TEST_SECRET"}}}}}}
EOF"#,
            log = log.display()
        ),
    );
    log
}

#[test]
fn a_credential_provider_plugin_supplies_credentials_for_the_images_it_matches() {
    let p = private_image(4);
    let bin = p.work.path().join("plugins");
    let pattern = p.registry.addr(); // 127.0.0.1:PORT: the port must match too
    let requests = provider_plugin(&bin, &pattern);
    let config = provider_config(p.work.path(), &pattern);
    let flags = [
        "--image-credential-provider-config",
        config.to_str().unwrap(),
        "--image-credential-provider-bin-dir",
        bin.to_str().unwrap(),
    ];
    // No config.json at all: the plugin is the only source.
    let empty = p.work.path().join("no-docker");
    let mount = mount_with(&p, &flags, &[("DOCKER_CONFIG", &empty)]).unwrap_or_else(|log| panic!("{log}"));
    read_all(&mount, &p.image);
    assert_lazy(&p, 4);
    let log = std::fs::read_to_string(&requests).unwrap();
    let calls: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    eprintln!("plugin run {} time(s)", calls.len());
    // cacheKeyType Registry, 10m: one run serves every request.
    assert_eq!(calls.len(), 1, "{log}");
    assert_eq!(calls[0]["kind"], "CredentialProviderRequest");
    assert_eq!(calls[0]["apiVersion"], "credentialprovider.kubelet.k8s.io/v1");
    let repo = p.reference.split(':').take(2).collect::<Vec<_>>().join(":");
    assert_eq!(calls[0]["image"], repo.as_str(), "{log}");
    mount.stop();
}

#[test]
fn a_provider_whose_match_images_miss_the_image_is_not_run() {
    let p = private_image(4);
    let bin = p.work.path().join("plugins");
    // Same host, other port: kubelet's rules say no match.
    let requests = provider_plugin(&bin, "127.0.0.1:1");
    let config = provider_config(p.work.path(), "127.0.0.1:1");
    let empty = p.work.path().join("no-docker");
    let flags = [
        "--image-credential-provider-config",
        config.to_str().unwrap(),
        "--image-credential-provider-bin-dir",
        bin.to_str().unwrap(),
    ];
    let log = match mount_with(&p, &flags, &[("DOCKER_CONFIG", &empty)]) {
        Ok(m) => panic!("mounted without credentials:\n{}", m.log()),
        Err(log) => log,
    };
    assert!(!requests.exists(), "the plugin ran for an image it does not match");
    assert!(
        log.contains("access denied (401) with no credentials") && log.contains(&p.registry.addr()),
        "{log}"
    );
}

/// An eStargz image behind a token server whose tokens live `lifetime`.
struct Tokened {
    _registry: Registry,
    proxy: FaultProxy,
    reference: String,
    image: BigLayerImage,
    work: tempfile::TempDir,
}

fn image_behind_token_server(lifetime: Duration) -> Tokened {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 8);
    let pushed = push(&image.image, &registry, Format::Estargz);
    let proxy = FaultProxy::start(&registry.addr());
    proxy.require_bearer(ALICE, lifetime);
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    Tokened {
        _registry: registry,
        proxy,
        reference,
        image,
        work,
    }
}

/// Reads each small file, `pause` apart: tokens expire between (and during) reads.
fn read_slowly(mount: &MountProcess, image: &BigLayerImage, pause: Duration) {
    for (path, content) in image.before.iter().chain(&image.after) {
        std::thread::sleep(pause);
        let got = std::fs::read(mount.mountpoint.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        assert_eq!(&got, content, "{path}");
    }
}

/// Mounts `t` with alice's password in config.json.
fn mount_with_password(t: &Tokened) -> MountProcess {
    let json = format!(r#"{{"auths":{{"{}":{{"auth":"{ALICE}"}}}}}}"#, t.proxy.addr());
    let docker = docker_config(&t.work.path().join("docker"), &json);
    let (state, mnt) = (t.work.path().join("state"), t.work.path().join("mnt"));
    MountProcess::try_start_env(&t.reference, &state, &mnt, &[], &[("DOCKER_CONFIG", &docker)])
        .unwrap_or_else(|log| panic!("{log}"))
}

#[test]
fn short_lived_tokens_are_renewed_before_they_expire() {
    let t = image_behind_token_server(Duration::from_secs(3));
    let mount = mount_with_password(&t);
    let first = t.proxy.tokens_issued();
    read_slowly(&mount, &t.image, Duration::from_millis(1500));
    let (issued, expired) = (t.proxy.tokens_issued(), t.proxy.expired_tokens_seen());
    eprintln!("3 s tokens: {first} at mount, {issued} after 4 reads 1.5 s apart; {expired} sent expired");
    assert!(issued > first, "no token was renewed");
    assert_eq!(expired, 0, "a request carried an expired token");
    mount.stop();
}

#[test]
fn an_expired_token_refused_mid_read_is_replaced_without_a_failed_read() {
    // The server says 60 s but refuses tokens after 2 s: the refusals arrive during
    // reads, and each must turn into a new token and a retried request, not EIO.
    let t = image_behind_token_server(Duration::from_secs(2));
    t.proxy.state_lifetime(60);
    let mount = mount_with_password(&t);
    let first = t.proxy.tokens_issued();
    read_slowly(&mount, &t.image, Duration::from_millis(1500));
    let (issued, expired) = (t.proxy.tokens_issued(), t.proxy.expired_tokens_seen());
    eprintln!(
        "2 s tokens stated 60 s: {first} at mount, {issued} after 4 reads 1.5 s apart; {expired} refused expired"
    );
    assert!(
        expired > 0,
        "no request carried an expired token: the case was not exercised"
    );
    assert!(issued > first, "no token was refreshed");
    assert!(!mount.log().contains("access denied"), "{}", mount.log());
    mount.stop();
}

/// Mounts `t` with `config.json` (and helpers in `bin` on PATH); reads across token
/// lifetimes; only the refresh_token grant can have issued the tokens.
fn assert_identity_token_exchanged(t: &Tokened, json: &str, bin: &Path) {
    let docker = docker_config(&t.work.path().join("docker"), json);
    let path = path_with(bin);
    let (state, mnt) = (t.work.path().join("state"), t.work.path().join("mnt"));
    let env = [("DOCKER_CONFIG", docker.as_path()), ("PATH", path.as_path())];
    let mount =
        MountProcess::try_start_env(&t.reference, &state, &mnt, &[], &env).unwrap_or_else(|log| panic!("{log}"));
    read_slowly(&mount, &t.image, Duration::from_millis(1500));
    let issued = t.proxy.tokens_issued();
    eprintln!("tokens issued by refresh_token grant: {issued}");
    assert!(issued >= 2, "tokens issued: {issued}");
    assert!(!mount.log().contains("refresh-7f3a"), "the identity token was logged");
    mount.stop();
}

#[test]
fn an_identity_token_from_a_credential_store_is_exchanged_for_bearer_tokens() {
    let t = image_behind_token_server(Duration::from_secs(2));
    t.proxy.accept_refresh_token("refresh-7f3a");
    let bin = t.work.path().join("bin");
    // docker's convention: Username "<token>" means Secret is an identity (refresh) token.
    script(
        &bin,
        "docker-credential-streamsnapoauth",
        r#"cat >/dev/null; echo '{"ServerURL":"x","Username":"<token>","Secret":"refresh-7f3a"}'"#,
    );
    assert_identity_token_exchanged(&t, r#"{"credsStore":"streamsnapoauth"}"#, &bin);
}

#[test]
fn an_identitytoken_in_config_json_auths_is_exchanged_for_bearer_tokens() {
    let t = image_behind_token_server(Duration::from_secs(2));
    t.proxy.accept_refresh_token("refresh-7f3a");
    // As `docker login` writes it for an OAuth registry: the token wins over `auth`.
    let json = format!(
        r#"{{"auths":{{"{}":{{"auth":"dTpw","identitytoken":"refresh-7f3a"}}}}}}"#,
        t.proxy.addr()
    );
    assert_identity_token_exchanged(&t, &json, &t.work.path().join("no-helpers"));
}

/// `streamsnap serve EXTRA…` (with `env`) and a containerd using it.
fn serve_with(p: &Private, extra: &[&str], env: &[(&str, &Path)]) -> (ServeProcess, Containerd) {
    let serve = ServeProcess::start_env(&p.work.path().join("streamsnap"), extra, env);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    (serve, containerd)
}

/// `ctr-remote image rpull` as alice: containerd needs the password for the manifest
/// (and to unpack, should streamsnap fall back); streamsnap gets its own from its sources.
fn rpull_as_alice(containerd: &Containerd, reference: &str) {
    let user = format!("{USER}:{PASSWORD}");
    let args = [
        "image",
        "rpull",
        "--plain-http",
        "--user",
        &user,
        "--snapshotter",
        "streamsnap",
        reference,
    ];
    containerd.ctr_remote(&args);
}

/// The image's one layer is FUSE-mounted by `serve`, reads right, and was read lazily.
fn assert_served_lazily(p: &Private, serve: &ServeProcess, size_mib: u64) {
    let mounts = fuse_mounts_under(&serve.root);
    assert_eq!(mounts.len(), 1, "layers mounted: {mounts:?}\n{}", serve.log());
    for (path, content) in p.image.before.iter().chain(&p.image.after) {
        assert_eq!(&std::fs::read(mounts[0].join(path)).unwrap(), content, "{path}");
    }
    assert_lazy(p, size_mib);
}

#[test]
fn serve_uses_config_json_rewritten_while_it_runs() {
    let p = private_image(6);
    let file = p.work.path().join("docker/config.json");
    let wrong = format!(
        r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6d3Jvbmc="}}}}}}"#,
        p.registry.addr()
    );
    docker_config(file.parent().unwrap(), &wrong);
    let (serve, containerd) = serve_with(&p, &["--docker-config", file.to_str().unwrap()], &[]);
    // Wrong password: containerd (which has the right one) unpacks instead, and the log says why.
    rpull_as_alice(&containerd, &p.reference);
    assert!(
        fuse_mounts_under(&serve.root).is_empty(),
        "served lazily with a wrong password"
    );
    let log = serve.log();
    assert!(
        log.contains("access denied (401)")
            && log.contains(&p.registry.addr())
            && log.contains(&format!("credentials from config.json {}", file.display())),
        "{log}"
    );
    containerd.ctr(&["image", "rm", "--sync", &p.reference]);
    wait_until(
        Duration::from_secs(60),
        "containerd's GC to remove the snapshots",
        || {
            containerd
                .ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
                .lines()
                .count()
                <= 1
        },
    );
    // The right password, written while serving: the next pull is lazy.
    let right = format!(r#"{{"auths":{{"{}":{{"auth":"{ALICE}"}}}}}}"#, p.registry.addr());
    std::fs::write(&file, right).unwrap();
    rpull_as_alice(&containerd, &p.reference);
    assert_served_lazily(&p, &serve, 6);
    drop(containerd);
    serve.stop();
}

#[test]
fn serve_reads_lazily_with_a_credential_helper_named_in_its_config_file() {
    let p = private_image(4);
    let bin = p.work.path().join("bin");
    script(
        &bin,
        "docker-credential-streamsnapserve",
        &format!(r#"read url; printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}' "$url""#),
    );
    let json = format!(r#"{{"credHelpers":{{"{}":"streamsnapserve"}}}}"#, p.registry.addr());
    let docker = docker_config(&p.work.path().join("docker"), &json);
    let config = p.work.path().join("streamsnap.toml");
    let toml = format!(
        "[credentials]\ndocker_config = \"{}\"\nexec_timeout = 5\n",
        docker.join("config.json").display()
    );
    std::fs::write(&config, toml).unwrap();
    let path = path_with(&bin);
    let (serve, containerd) = serve_with(&p, &["--config", config.to_str().unwrap()], &[("PATH", &path)]);
    rpull_as_alice(&containerd, &p.reference);
    assert_served_lazily(&p, &serve, 4);
    drop(containerd);
    serve.stop();
}

#[test]
fn serve_reads_lazily_with_a_credential_provider_plugin_configured_in_yaml() {
    let p = private_image(4);
    let bin = p.work.path().join("plugins");
    let pattern = p.registry.addr();
    let requests = provider_plugin(&bin, &pattern);
    // kubelet's usual form of the same config.
    let config = p.work.path().join("credential-provider.yaml");
    let yaml = format!(
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n\
         - name: test-provider\n  matchImages:\n  - \"{pattern}\"\n  defaultCacheDuration: \"1m\"\n\
         \x20 apiVersion: credentialprovider.kubelet.k8s.io/v1\n  args: [--user, {USER}]\n\
         \x20 env:\n  - name: TEST_SECRET\n    value: {PASSWORD}\n"
    );
    std::fs::write(&config, yaml).unwrap();
    let empty = p.work.path().join("no-docker/config.json");
    let flags = [
        "--image-credential-provider-config",
        config.to_str().unwrap(),
        "--image-credential-provider-bin-dir",
        bin.to_str().unwrap(),
        "--docker-config",
        empty.to_str().unwrap(),
    ];
    let (serve, containerd) = serve_with(&p, &flags, &[]);
    rpull_as_alice(&containerd, &p.reference);
    assert_served_lazily(&p, &serve, 4);
    let runs = std::fs::read_to_string(&requests).unwrap().lines().count();
    eprintln!("plugin run {runs} time(s) for a pull through serve");
    assert_eq!(runs, 1);
    drop(containerd);
    serve.stop();
}
