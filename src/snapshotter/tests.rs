use super::*;

fn open() -> (tempfile::TempDir, Snapshots) {
    let dir = tempfile::tempdir().unwrap();
    let s = Snapshots::open(dir.path()).unwrap();
    (dir, s)
}

#[test]
fn an_active_snapshot_without_parent_is_a_rw_bind_mount() {
    let (_d, s) = open();
    let m = s.prepare("a", "", BTreeMap::new()).unwrap();
    assert_eq!(m[0].fs_type, "bind");
    assert_eq!(m[0].options, vec!["rw", "rbind"]);
}

#[test]
fn parents_must_be_committed_and_exist() {
    let (_d, s) = open();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.prepare("b", "a", BTreeMap::new()),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.prepare("b", "nope", BTreeMap::new()),
        Err(SnapshotError::NotFound(_))
    ));
    s.commit("c", "a", BTreeMap::new()).unwrap();
    let m = s.prepare("b", "c", BTreeMap::new()).unwrap();
    assert_eq!(m[0].fs_type, "overlay");
    assert!(m[0].options.last().unwrap().starts_with("lowerdir="));
}

#[test]
fn keys_are_unique_and_commit_names_too() {
    let (_d, s) = open();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.prepare("a", "", BTreeMap::new()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    s.prepare("b", "", BTreeMap::new()).unwrap();
    s.commit("c", "a", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.commit("c", "b", BTreeMap::new()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.commit("d", "c", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
}

#[test]
fn snapshots_with_children_cannot_be_removed() {
    let (_d, s) = open();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    s.commit("c", "a", BTreeMap::new()).unwrap();
    s.view("v", "c", BTreeMap::new()).unwrap();
    assert!(matches!(s.remove("c"), Err(SnapshotError::FailedPrecondition(_))));
    s.remove("v").unwrap();
    s.remove("c").unwrap();
    assert!(matches!(s.stat("c"), Err(SnapshotError::NotFound(_))));
}

#[test]
fn update_sets_and_deletes_single_labels_by_field_path() {
    let (_d, s) = open();
    s.prepare(
        "a",
        "",
        BTreeMap::from([("x".into(), "1".into()), ("y".into(), "2".into())]),
    )
    .unwrap();
    let mut info = s.stat("a").unwrap();
    info.labels = BTreeMap::from([("z".into(), "3".into())]);
    let out = s.update(&info, &["labels.z".into(), "labels.x".into()]).unwrap();
    assert_eq!(
        out.labels,
        BTreeMap::from([("y".into(), "2".into()), ("z".into(), "3".into())])
    );
    assert!(matches!(
        s.update(&info, &["name".into()]),
        Err(SnapshotError::InvalidArgument(_))
    ));
}

#[test]
fn metadata_survives_reopening() {
    let (d, s) = open();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    drop(s);
    let s = Snapshots::open(d.path()).unwrap();
    assert_eq!(s.stat("a").unwrap().kind, Kind::Active);
}

#[test]
fn the_root_and_the_snapshots_dir_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (d, _s) = open();
    for p in [d.path().to_path_buf(), d.path().join("snapshots")] {
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            p.display()
        );
    }
}

#[test]
fn cleanup_removes_orphaned_directories() {
    let (d, s) = open();
    std::fs::create_dir_all(d.path().join("snapshots/999/fs")).unwrap();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    s.cleanup().unwrap();
    assert!(!d.path().join("snapshots/999").exists());
    assert!(d.path().join("snapshots/1/fs").exists());
}
