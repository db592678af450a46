use super::super::tests::key;
use super::*;
use bytes::Bytes;

#[test]
fn disk_cache_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    DiskCache::open(dir.path(), 100)
        .unwrap()
        .put(&key(1), b"hello")
        .unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert_eq!(c.get(&key(1)).as_deref(), Some(&b"hello"[..]));
    assert_eq!(c.total_bytes(), 5);
}

#[test]
fn disk_cache_evicts_least_recently_used_to_stay_under_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 10).unwrap();
    c.put(&key(1), b"aaaa").unwrap();
    c.put(&key(2), b"bbbb").unwrap();
    assert!(c.get(&key(1)).is_some()); // 1 is now most recent
    c.put(&key(3), b"cccc").unwrap();
    assert!(c.get(&key(2)).is_none());
    assert!(c.get(&key(1)).is_some() && c.get(&key(3)).is_some());
    assert!(c.total_bytes() <= 10);
}

#[test]
fn reopening_with_a_smaller_limit_trims() {
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    for i in 0..5 {
        c.put(&key(i), &[0u8; 10]).unwrap();
    }
    let c = DiskCache::open(dir.path(), 25).unwrap();
    assert!(c.total_bytes() <= 25);
}

#[test]
fn removing_a_layer_frees_its_chunks_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    c.put(&key(1), b"aaaa").unwrap();
    let other = ChunkKey {
        layer: Digest::of(b"other"),
        blob_offset: 1,
        inner_offset: 0,
    };
    c.put(&other, b"bb").unwrap();
    c.remove_layer(&Digest::of(b"l"));
    assert!(c.get(&key(1)).is_none());
    assert_eq!(c.total_bytes(), 2);
    assert!(!dir.path().join(Digest::of(b"l").hex()).exists());
}

fn ready(e: FileEntry) -> std::path::PathBuf {
    match e {
        FileEntry::Ready(p) => p,
        other => panic!("whole-file entry not ready: {other:?}"),
    }
}

fn slot(chunk_index: u32) -> FileSlot {
    FileSlot {
        node: 7,
        file_size: 10,
        chunk_count: 2,
        chunk_index,
        file_offset: chunk_index as u64 * 5,
    }
}

#[test]
fn chunks_of_a_file_fill_one_entry_that_becomes_whole_with_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    let c = DiskCache::open(dir.path(), 100).unwrap();
    c.put_in_file(&layer, slot(1), b"56789").unwrap();
    assert_eq!(c.file(&layer, 7), FileEntry::Absent);
    assert_eq!(c.get_in_file(&layer, slot(1), 5).as_deref(), Some(&b"56789"[..]));
    assert!(c.get_in_file(&layer, slot(0), 5).is_none(), "a hole is no answer");
    c.put_in_file(&layer, slot(0), b"01234").unwrap();
    let whole = ready(c.file(&layer, 7));
    assert_eq!(std::fs::read(whole).unwrap(), b"0123456789");
    assert_eq!(c.get_in_file(&layer, slot(1), 5).as_deref(), Some(&b"56789"[..]));
    assert_eq!(c.total_bytes(), 10);
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert_eq!(c.get_in_file(&layer, slot(0), 5).as_deref(), Some(&b"01234"[..]));
    assert_eq!(c.total_bytes(), 10);
}

#[test]
fn page_aligned_chunks_written_directly_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
    // An aligned 8 KiB + 100-byte chunk, as decode hands them out, then an unaligned one.
    let mut buf: Vec<u8> = Vec::with_capacity(3 * 4096 + 100);
    let pad = buf.as_ptr().align_offset(4096);
    buf.resize(pad, 0);
    buf.extend((0..2 * 4096 + 100).map(|i| (i % 251) as u8));
    let first = Bytes::from(buf).slice(pad..);
    let second = vec![7u8; 50];
    let slot = |chunk_index, file_offset| FileSlot {
        node: 1,
        file_size: 8292 + 50,
        chunk_count: 2,
        chunk_index,
        file_offset,
    };
    c.put_in_file(&layer, slot(0, 0), &first).unwrap();
    c.put_in_file(&layer, slot(1, 8292), &second).unwrap();
    let whole = std::fs::read(ready(c.file(&layer, 1))).unwrap();
    assert_eq!(&whole[..8292], &first[..]);
    assert_eq!(&whole[8292..], &second[..]);
}

#[test]
fn a_corrupt_chunk_drops_its_partial_entry_and_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    let c = DiskCache::open(dir.path(), 100).unwrap();
    c.put_in_file(&layer, slot(0), b"01234").unwrap();
    c.remove_in_file(&layer, slot(0));
    assert_eq!(c.total_bytes(), 0);
    assert!(c.get_in_file(&layer, slot(0), 5).is_none());
    c.put_in_file(&layer, slot(0), b"01234").unwrap();
    c.put_in_file(&layer, slot(1), b"56789").unwrap();
    assert_eq!(c.total_bytes(), 10);
    c.remove_in_file(&layer, slot(1));
    assert!(c.file(&layer, 7) == FileEntry::Absent && c.total_bytes() == 0);
}

#[test]
fn a_partial_file_entry_is_dropped_on_restart_and_by_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    let c = DiskCache::open(dir.path(), 12).unwrap();
    c.put_in_file(&layer, slot(0), b"01234").unwrap();
    assert_eq!(c.total_bytes(), 5);
    c.put(&key(1), &[0u8; 10]).unwrap(); // needs the partial's room
    assert!(c.get_in_file(&layer, slot(0), 5).is_none());
    assert!(c.total_bytes() <= 12);
    c.put_in_file(&layer, slot(0), b"01234").unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert!(c.get_in_file(&layer, slot(0), 5).is_none());
    assert!(!dir.path().join(layer.hex()).join("partial-7").exists());
}

#[test]
fn entries_of_mounted_layers_are_evicted_after_those_no_mount_uses() {
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 10).unwrap();
    let mounted = |off| ChunkKey {
        layer: Digest::of(b"mounted"),
        blob_offset: off,
        inner_offset: 0,
    };
    c.pin(&Digest::of(b"mounted"));
    c.put(&mounted(0), &[1; 4]).unwrap(); // oldest
    c.put(&key(0), &[2; 4]).unwrap();
    c.put(&key(1), &[3; 4]).unwrap(); // over the bound: an unmounted layer's entry goes
    assert!(c.has(&mounted(0)));
    assert!(!c.has(&key(0)));
    assert_eq!(c.evictions_in_use(), 0);
    c.put(&mounted(1), &[4; 4]).unwrap();
    c.put(&mounted(2), &[5; 4]).unwrap(); // only mounted data left to evict: counted
    assert!(c.evictions_in_use() > 0);
    c.unpin(&Digest::of(b"mounted"));
    assert_eq!(c.mounted_bytes_except(&Digest::of(b"x")), 0);
}

#[test]
fn cache_files_and_directories_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let layer = Digest::of(b"l");
    let c = DiskCache::open(&root, 100).unwrap();
    c.put(&key(1), b"hello").unwrap();
    c.put_in_file(&layer, slot(0), b"01234").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let layer_dir = root.join(layer.hex());
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&layer_dir), 0o700);
    for f in std::fs::read_dir(&layer_dir).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// A cache holding the whole-file entry of `slot`'s node, written and then reopened (a restart).
fn whole_file_then_restart(dir: &std::path::Path, layer: &Digest) -> DiskCache {
    let c = DiskCache::open(dir, 100).unwrap();
    c.put_in_file(layer, slot(0), b"01234").unwrap();
    c.put_in_file(layer, slot(1), b"56789").unwrap();
    drop(c);
    DiskCache::open(dir, 100).unwrap()
}

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[at] ^= 0x20;
    std::fs::write(path, data).unwrap();
}

#[test]
fn a_flipped_byte_in_a_chunk_entry_is_never_served_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    DiskCache::open(dir.path(), 100)
        .unwrap()
        .put(&key(1), b"hello")
        .unwrap();
    let entry = dir.path().join(key(1).layer.hex()).join(key(1).file_name());
    flip_byte(&entry, 1);
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert_eq!(c.get(&key(1)), None, "a chunk that fails its seal is a miss");
    assert!(!c.has(&key(1)) && !entry.exists(), "and it is dropped");
}

#[test]
fn a_whole_file_entry_from_an_earlier_run_is_checked_before_passthrough() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    let c = whole_file_then_restart(dir.path(), &layer);
    assert_eq!(c.file(&layer, 7), FileEntry::Unchecked);
    assert!(c.claim_check(&layer, 7), "the first opener starts the check");
    assert!(!c.claim_check(&layer, 7), "later ones do not queue behind it");
    assert!(c.check_file(&layer, 7));
    assert_eq!(std::fs::read(ready(c.file(&layer, 7))).unwrap(), b"0123456789");
}

#[test]
fn a_flipped_byte_in_a_whole_file_entry_is_never_served_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    drop(whole_file_then_restart(dir.path(), &layer));
    let file = dir.path().join(layer.hex()).join("file-7");
    flip_byte(&file, 8);
    let c = DiskCache::open(dir.path(), 100).unwrap();
    // A read through FUSE checks its chunk: the sound one is served, the flipped one dropped.
    assert_eq!(c.get_in_file(&layer, slot(0), 5).as_deref(), Some(&b"01234"[..]));
    assert_eq!(c.get_in_file(&layer, slot(1), 5), None);
    assert_eq!(c.file(&layer, 7), FileEntry::Absent);
    assert!(!file.exists() && c.total_bytes() == 0);
    let c = whole_file_then_restart(dir.path(), &layer);
    flip_byte(&dir.path().join(layer.hex()).join("file-7"), 2);
    assert!(!c.check_file(&layer, 7), "the passthrough check refuses it too");
    assert_eq!(c.file(&layer, 7), FileEntry::Absent);
}

#[test]
fn a_whole_file_entry_without_its_sums_is_dropped_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Digest::of(b"l");
    drop(whole_file_then_restart(dir.path(), &layer));
    std::fs::remove_file(dir.path().join(layer.hex()).join("file-7.sums")).unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert_eq!(c.file(&layer, 7), FileEntry::Absent);
    assert!(!dir.path().join(layer.hex()).join("file-7").exists());
    assert_eq!(c.total_bytes(), 0);
}

#[test]
fn a_write_interrupted_before_its_rename_leaves_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    c.put(&key(1), b"hello").unwrap();
    let layer_dir = dir.path().join(key(1).layer.hex());
    std::fs::write(layer_dir.join(".tmp-2-0-ThreadId(3)"), b"hel").unwrap();
    std::fs::write(layer_dir.join("partial-9"), b"hel").unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert_eq!(std::fs::read_dir(&layer_dir).unwrap().count(), 1);
    assert_eq!(c.total_bytes(), 5);
}

#[test]
fn a_batch_of_chunks_is_stored_durably_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    c.put_many(&[(key(1), &b"one"[..]), (key(2), &b"two"[..]), (key(3), &[0u8; 200][..])])
        .unwrap();
    let c = DiskCache::open(dir.path(), 100).unwrap();
    assert_eq!(c.get(&key(1)).as_deref(), Some(&b"one"[..]));
    assert_eq!(c.get(&key(2)).as_deref(), Some(&b"two"[..]));
    assert!(!c.has(&key(3)), "larger than the cache: served, not kept");
    assert_eq!(c.total_bytes(), 6);
}
