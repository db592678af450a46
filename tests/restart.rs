//! The daemon restarts, containers do not notice (design.md section 9): after a
//! restart the layers are mounted again while the socket serves, and a layer
//! that cannot be served is reported by name, never shown as an empty directory.
mod common;
use common::*;
use std::time::Duration;

/// Waits until containerd has reconnected to the (new) daemon.
fn wait_for_reconnect(containerd: &Containerd) {
    wait_until(Duration::from_secs(60), "containerd to reconnect to streamsnap", || {
        containerd
            .try_ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
            .is_ok()
    });
}

#[test]
fn a_layer_without_record_or_registry_after_a_restart_fails_container_start_by_name_until_it_can_be() {
    require_root();
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("streamsnap");
    let serve = ServeProcess::start(&root);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let image = build_runnable_image(&work.path().join("image"), 4);
    let pushed = push(&image, &registry, Format::Estargz);
    let (_, digests) = registry.layers(&pushed);
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    containerd.rpull(&reference);
    let greeting = |id: &str| containerd.run_script("streamsnap", &reference, id, "cat /etc/greeting");
    assert_eq!(greeting("before"), "hello from streamsnap\n");

    // A reboot: the daemon and its mounts go; the registry is down when it is
    // back, and the layers' records are gone (without them, mounting a layer
    // again needs the registry).
    serve.stop();
    for e in std::fs::read_dir(root.join("state/layers")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "record") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let refused = Fault::Status {
        code: 503,
        times: u32::MAX,
        retry_after: None,
    };
    proxy.set("/v2/", refused);
    let serve = ServeProcess::start(&root);
    wait_for_reconnect(&containerd);
    let args = [
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        &reference,
        "during",
        "/bin/sh",
        "-c",
        "cat /etc/greeting",
    ];
    let error = containerd
        .try_ctr(&args)
        .expect_err("a container started on a layer that is not served");
    eprintln!("container start refused: {error}");
    assert!(
        error.contains("after the restart") || error.contains("since the restart"),
        "{error}"
    );
    assert!(digests.iter().any(|d| error.contains(d.as_str())), "{error}");

    // The registry is back: the next start mounts the layer again and runs.
    proxy.clear();
    assert_eq!(greeting("after"), "hello from streamsnap\n");
    let log = serve.stop();
    assert!(log.contains("re-mounted lazy layer"), "{log}");
}

mod storm {
    use super::common::*;
    use ::streamsnap::proto::containerd::services::snapshots::v1 as api;
    use ::streamsnap::snapshotter::Snapshots;
    use rand::{Rng, SeedableRng};
    use std::collections::{HashMap, HashSet};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    type Client = api::snapshots_client::SnapshotsClient<tonic::transport::Channel>;

    /// What containerd does with one layer and one container, through the socket:
    /// a lazily served layer, an active snapshot on it, its commit, and removals
    /// (every third round keeps its snapshots, so the store grows across kills).
    async fn storm(socket: PathBuf, worker: usize, image: String, layers: Vec<String>, stop: Arc<AtomicBool>) {
        let Ok(channel) = ::streamsnap::pull::connect(&socket).await else {
            return;
        };
        let mut client = Client::new(channel);
        for i in 0.. {
            if stop.load(Ordering::Relaxed) {
                return; // the daemon is being killed: requests in flight fail, nothing new starts
            }
            let n = format!("w{worker}-{i}");
            let target = format!("lazy-{n}");
            let labels = HashMap::from([
                ("containerd.io/snapshot.ref".to_string(), target.clone()),
                ("containerd.io/snapshot/cri.image-ref".to_string(), image.clone()),
                (
                    "containerd.io/snapshot/cri.layer-digest".to_string(),
                    layers[i % layers.len()].clone(),
                ),
            ]);
            let prepare = |key: String, parent: String, labels: HashMap<String, String>| api::PrepareSnapshotRequest {
                snapshotter: "streamsnap".into(),
                key,
                parent,
                labels,
            };
            let lazy = client
                .prepare(prepare(format!("extract-{n}"), String::new(), labels))
                .await;
            if matches!(&lazy, Err(s) if s.code() == tonic::Code::Unavailable) {
                return; // the daemon is gone
            }
            let active = format!("active-{n}");
            let steps = async {
                client
                    .prepare(prepare(active.clone(), target.clone(), HashMap::new()))
                    .await?;
                client
                    .mounts(api::MountsRequest {
                        snapshotter: "streamsnap".into(),
                        key: active.clone(),
                    })
                    .await?;
                client
                    .commit(api::CommitSnapshotRequest {
                        snapshotter: "streamsnap".into(),
                        name: format!("committed-{n}"),
                        key: active.clone(),
                        ..Default::default()
                    })
                    .await?;
                if i % 3 != 0 {
                    for key in [format!("committed-{n}"), target.clone()] {
                        let remove = api::RemoveSnapshotRequest {
                            snapshotter: "streamsnap".into(),
                            key,
                        };
                        client.remove(remove).await?;
                    }
                }
                Ok::<_, tonic::Status>(())
            };
            let _ = steps.await;
        }
    }

    /// What the store holds (read with the daemon stopped).
    struct Stored {
        ids: HashSet<u64>,
        /// Ids of lazily served snapshots.
        remote: HashSet<u64>,
        /// Hex digests of the layers they serve.
        layers: HashSet<String>,
    }

    fn stored(state: &Path) -> Stored {
        let snapshots = Snapshots::open(state).unwrap();
        let records = snapshots.records().unwrap();
        let remote = records.iter().filter_map(|(_, r)| Some((r.id, r.remote.as_ref()?)));
        Stored {
            ids: records.iter().map(|(_, r)| r.id).collect(),
            remote: remote.clone().map(|(id, _)| id).collect(),
            layers: remote
                .map(|(_, l)| l.layer.trim_start_matches("sha256:").to_string())
                .collect(),
        }
    }

    /// Hex digests of the layers with entries in the disk cache.
    fn cached_layers(state: &Path) -> HashSet<String> {
        let Ok(dir) = std::fs::read_dir(state.join("cache")) else {
            return HashSet::new();
        };
        // Layer dirs are named by digest hex (beside them, `proven/`).
        dir.map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().len() == 64)
            .filter(|p| p.is_dir() && std::fs::read_dir(p).unwrap().next().is_some())
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Ids of the snapshot directories on disk.
    fn dir_ids(state: &Path) -> HashSet<u64> {
        std::fs::read_dir(state.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
            .collect()
    }

    /// Snapshot ids whose `fs` dir holds a streamsnap layer mount answering requests.
    fn live_mount_ids(state: &Path) -> HashSet<u64> {
        let snapshots = std::fs::canonicalize(state.join("snapshots")).unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .filter(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|r| r.split(' ').nth(1).is_some_and(|s| s.starts_with("streamsnap:")))
            })
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
            .filter_map(|p| {
                let p = PathBuf::from(p);
                let id = p.strip_prefix(&snapshots).ok()?.parent()?.to_str()?.parse().ok()?;
                // A mount left by a killed daemon answers ENOTCONN.
                std::fs::read_dir(&p).is_ok().then_some(id)
            })
            .collect()
    }

    #[test]
    fn twenty_kills_during_a_prepare_commit_remove_storm_leave_store_mounts_and_dirs_consistent() {
        require_root();
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let image = build_runnable_image(&work.path().join("image"), 1);
        let reference = push(&image, &registry, Format::Estargz);
        let (_, layers) = registry.layers(&reference);
        let root = work.path().join("streamsnap");
        let state = root.join("state");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(20);
        // Background fill caches every mounted layer, so a removal cut short would leak.
        let flags = ["--background-fill", "--background-fill-delay", "0"];
        let mut serve = ServeProcess::start_with(&root, &flags);
        for round in 0..20 {
            let stop = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let storm = storm(serve.socket.clone(), w, reference.clone(), layers.clone(), stop.clone());
                    runtime.spawn(storm)
                })
                .collect();
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
            stop.store(true, Ordering::Relaxed);
            serve.kill();
            for w in workers {
                runtime.block_on(w).unwrap();
            }
            let Stored { ids, remote, layers } = stored(&state);
            let missing: Vec<_> = ids.difference(&dir_ids(&state)).copied().collect();
            assert!(
                missing.is_empty(),
                "round {round}: snapshots without a directory: {missing:?}"
            );

            serve = ServeProcess::start_with(&root, &flags);
            wait_until(
                Duration::from_secs(60),
                "every lazily served snapshot to be mounted again",
                || remote.is_subset(&live_mount_ids(&state)),
            );
            let orphans: Vec<_> = dir_ids(&state).difference(&ids).copied().collect();
            assert!(
                orphans.is_empty(),
                "round {round}: directories without a snapshot: {orphans:?}"
            );
            let stray: Vec<_> = live_mount_ids(&state).difference(&remote).copied().collect();
            assert!(
                stray.is_empty(),
                "round {round}: mounts without a lazily served snapshot: {stray:?}"
            );
            let leaked: Vec<_> = cached_layers(&state).difference(&layers).cloned().collect();
            assert!(
                leaked.is_empty(),
                "round {round}: cache of layers no snapshot serves: {leaked:?}"
            );
            eprintln!(
                "round {round}: {} snapshots, {} served lazily, {} layers cached",
                ids.len(),
                remote.len(),
                cached_layers(&state).len()
            );
        }
        serve.stop();
    }
}
