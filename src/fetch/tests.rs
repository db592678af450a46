//! The fetcher against an in-process source: what reaches the source, what
//! readers get when it fails, and how priorities order the work.

use super::load::coalesce;
use super::testing::{services, tar_blob, tar_fetcher, Fault, TestSource};
use super::*;
use std::time::Duration;

/// Chunk size of the test layers.
const CHUNK: u64 = 64 << 10;

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct TestLayer {
    fetcher: Arc<Fetcher>,
    source: Arc<TestSource>,
    files: Vec<(&'static str, Vec<u8>)>,
    _cache: tempfile::TempDir,
}

impl TestLayer {
    async fn new(verified: bool) -> Self {
        Self::with_deadline(verified, READ_DEADLINE).await
    }

    async fn with_deadline(verified: bool, deadline: Duration) -> Self {
        Self::with_services(verified, |s| s.with_read_deadline(deadline)).await
    }

    async fn with_services(verified: bool, tune: impl FnOnce(Services) -> Services) -> Self {
        let files = vec![
            ("a.bin", content(4 * CHUNK as usize, 1)),
            ("b.bin", content(4 * CHUNK as usize, 2)),
            ("small.txt", b"hello".to_vec()),
        ];
        let blob = tar_blob(&files);
        let source = Arc::new(TestSource::new(blob.clone()));
        let cache = tempfile::tempdir().unwrap();
        let node = tune(services(cache.path(), 1 << 30));
        let fetcher = tar_fetcher(
            &blob,
            Arc::clone(&source) as Arc<dyn RangeSource>,
            &node,
            CHUNK,
            verified,
        )
        .await;
        Self {
            fetcher,
            source,
            files,
            _cache: cache,
        }
    }

    fn node(&self, path: &str) -> NodeId {
        self.fetcher.index().resolve(path).expect("test file")
    }

    fn expected(&self, path: &str) -> &[u8] {
        &self.files.iter().find(|(p, _)| *p == path).expect("test file").1
    }

    async fn read_all(&self, path: &str) -> Result<Bytes, FetchError> {
        self.fetcher.read(self.node(path), 0, 1 << 30).await
    }
}

#[tokio::test]
async fn a_read_returns_the_files_bytes() {
    let l = TestLayer::new(true).await;
    assert_eq!(&l.read_all("a.bin").await.unwrap()[..], l.expected("a.bin"));
    let mid = l.fetcher.read(l.node("b.bin"), CHUNK - 10, 20).await.unwrap();
    assert_eq!(&mid[..], &l.expected("b.bin")[CHUNK as usize - 10..CHUNK as usize + 10]);
}

#[tokio::test]
async fn neighbouring_chunks_coalesce_into_one_request() {
    let l = TestLayer::new(false).await;
    l.read_all("a.bin").await.unwrap();
    assert_eq!(l.source.requests().len(), 1, "{:?}", l.source.requests());
}

#[tokio::test]
async fn concurrent_reads_of_one_chunk_make_one_request() {
    let l = TestLayer::new(false).await;
    let node = l.node("small.txt");
    let reads = (0..8).map(|_| l.fetcher.read(node, 0, 5));
    for r in futures::future::join_all(reads).await {
        assert_eq!(&r.unwrap()[..], b"hello");
    }
    assert_eq!(l.source.requests().len(), 1);
}

#[tokio::test]
async fn bytes_read_ahead_wait_in_memory_only_until_their_reader_has_them() {
    let l = TestLayer::new(true).await;
    let a = l.node("a.bin");
    for i in 0..2 {
        l.fetcher.read(a, i * CHUNK, CHUNK as u32).await.unwrap();
    }
    let mem = &l.fetcher.node.mem;
    for _ in 0..200 {
        if mem.bytes() == 2 * CHUNK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mem.bytes(), 2 * CHUNK, "the two chunks read ahead");
    for i in 2..4 {
        let got = l.fetcher.read(a, i * CHUNK, CHUNK as u32).await.unwrap();
        assert_eq!(
            &got[..],
            &l.expected("a.bin")[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize]
        );
    }
    assert_eq!(mem.bytes(), 0, "read: the page cache holds them now");
    assert_eq!(l.source.requests().len(), 3, "{:?}", l.source.requests());
}

#[tokio::test]
async fn a_sequential_reader_gets_no_more_than_the_configured_read_ahead() {
    let l = TestLayer::with_services(true, |s| s.with_read_ahead(CHUNK)).await;
    let a = l.node("a.bin");
    for i in 0..2 {
        l.fetcher.read(a, i * CHUNK, CHUNK as u32).await.unwrap();
    }
    settle(&l.source).await;
    let mem = &l.fetcher.node.mem;
    for _ in 0..200 {
        if mem.bytes() >= CHUNK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        mem.bytes(),
        CHUNK,
        "one chunk read ahead, not the default's two (the rest of the file)"
    );
    assert_eq!(l.source.requests().len(), 3, "{:?}", l.source.requests());
}

/// A layer of `n` small files of 4 KiB, then one larger than a small file.
async fn small_files_layer(n: usize) -> (Arc<Fetcher>, Arc<TestSource>, tempfile::TempDir) {
    let mut files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("m{i:02}.pyc"), content(4096, i as u8)))
        .collect();
    files.push(("weights.bin".into(), content(2 * ahead::SMALL_FILE as usize, 99)));
    let named: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    let blob = tar_blob(&named);
    let source = Arc::new(TestSource::new(blob.clone()));
    let cache = tempfile::tempdir().unwrap();
    let node = services(cache.path(), 1 << 30);
    let fetcher = tar_fetcher(&blob, Arc::clone(&source) as Arc<dyn RangeSource>, &node, CHUNK, true).await;
    (fetcher, source, cache)
}

/// Waits until `source` has had no new request for a while.
async fn settle(source: &TestSource) {
    let mut seen = usize::MAX;
    while source.requests().len() != seen {
        seen = source.requests().len();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_cold_small_file_brings_the_small_files_after_it_in_one_request() {
    let (f, source, _dir) = small_files_layer(8).await;
    for i in 0..8 {
        let node = f.index().resolve(&format!("m{i:02}.pyc")).unwrap();
        let got = f.read(node, 0, 4096).await.unwrap();
        assert_eq!(&got[..], &content(4096, i as u8)[..]);
        settle(&source).await;
    }
    assert_eq!(
        source.requests().len(),
        2,
        "its own and its neighbours': {:?}",
        source.requests()
    );
}

#[tokio::test]
async fn small_files_fetched_beside_a_cold_one_wait_on_disk_not_in_memory() {
    let (f, source, _dir) = small_files_layer(8).await;
    f.read(f.index().resolve("m00.pyc").unwrap(), 0, 4096).await.unwrap();
    settle(&source).await;
    assert_eq!(f.node.mem.bytes(), 0, "nothing held for readers that may never come");
    let before = source.requests().len();
    let got = f.read(f.index().resolve("m03.pyc").unwrap(), 0, 4096).await.unwrap();
    assert_eq!(&got[..], &content(4096, 3)[..]);
    assert_eq!(
        source.requests().len(),
        before,
        "served from what the first request brought"
    );
}

#[tokio::test]
async fn neighbours_stop_before_a_larger_file() {
    let (f, source, _dir) = small_files_layer(2).await;
    f.read(f.index().resolve("m00.pyc").unwrap(), 0, 4096).await.unwrap();
    settle(&source).await;
    assert!(source.bytes_requested() < 3 * 4096 + 4 * 512, "{:?}", source.requests());
}

#[tokio::test]
async fn a_warm_small_file_fetches_no_neighbours() {
    let (f, source, _dir) = small_files_layer(8).await;
    let last = f.index().resolve("m07.pyc").unwrap();
    f.read(last, 0, 4096).await.unwrap();
    settle(&source).await;
    let before = source.requests().len();
    let first = f.index().resolve("m00.pyc").unwrap();
    f.read(first, 0, 4096).await.unwrap();
    settle(&source).await;
    f.read(last, 0, 4096).await.unwrap();
    settle(&source).await;
    assert_eq!(
        source.requests().len(),
        before + 2,
        "m00 and its neighbours, nothing for m07: {:?}",
        source.requests()
    );
}

#[tokio::test]
async fn a_chunk_a_reader_waited_for_is_not_kept_in_memory() {
    let l = TestLayer::new(true).await;
    l.read_all("small.txt").await.unwrap();
    assert_eq!(l.fetcher.node.mem.bytes(), 0);
}

#[tokio::test]
async fn a_chunk_read_in_pieces_is_fetched_once_and_never_reloaded_from_disk() {
    let l = TestLayer::new(true).await;
    let a = l.node("a.bin");
    let piece = CHUNK / 4;
    for i in 0..4 {
        let got = l.fetcher.read(a, i * piece, piece as u32).await.unwrap();
        assert_eq!(
            &got[..],
            &l.expected("a.bin")[(i * piece) as usize..((i + 1) * piece) as usize]
        );
        // The disk cache has it before the next piece is read.
        for _ in 0..200 {
            if l.fetcher.is_cached(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(l.fetcher.stats.chunks_from_disk.load(Ordering::Relaxed), 0);
    let first = l.fetcher.index().chunks[0].blob_offset;
    let fetching_it = l
        .source
        .requests()
        .iter()
        .filter(|(o, n)| (*o..o + n).contains(&first))
        .count();
    assert_eq!(fetching_it, 1, "{:?}", l.source.requests());
}

#[tokio::test]
async fn a_chunk_read_to_its_end_leaves_memory() {
    let l = TestLayer::new(true).await;
    let a = l.node("a.bin");
    l.fetcher.read(a, 0, (CHUNK / 2) as u32).await.unwrap();
    let key = l.fetcher.key(0);
    assert!(l.fetcher.node.mem.get(&key).is_some(), "half read: held for its reader");
    l.fetcher.read(a, CHUNK / 2, (CHUNK / 2) as u32).await.unwrap();
    assert!(
        l.fetcher.node.mem.get(&key).is_none(),
        "read to its end: the page cache holds it"
    );
}

#[tokio::test]
async fn a_chunk_read_in_pieces_out_of_order_leaves_memory_once_every_piece_was_read() {
    let l = TestLayer::new(true).await;
    let a = l.node("a.bin");
    let piece = CHUNK / 4;
    let key = l.fetcher.key(0);
    for i in [1, 3, 0] {
        l.fetcher.read(a, i * piece, piece as u32).await.unwrap();
        assert!(l.fetcher.node.mem.get(&key).is_some(), "piece {i} read: others unread");
    }
    l.fetcher.read(a, 2 * piece, piece as u32).await.unwrap();
    assert!(l.fetcher.node.mem.get(&key).is_none(), "every piece read");
}

/// Chunks laid one after another in the blob, with these stored sizes.
fn laid_out(lens: &[u64]) -> Vec<Chunk> {
    let mut at = 0;
    lens.iter()
        .map(|&blob_len| {
            let c = Chunk {
                file_offset: 0,
                len: blob_len,
                blob_offset: at,
                blob_len,
                inner_offset: 0,
                encoding: crate::index::Encoding::Raw,
                digest: None,
                whole: None,
            };
            at += blob_len;
            c
        })
        .collect()
}

#[test]
fn small_chunks_decode_in_batches_and_large_ones_alone() {
    let mut lens = vec![256 << 10; 8];
    lens.extend([4 << 20, 4 << 20]);
    let chunks = laid_out(&lens);
    let ids: Vec<ChunkId> = (0..10).collect();
    let batches: Vec<Vec<ChunkId>> = super::load::decode_batches(&chunks, &ids).collect();
    assert_eq!(batches, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8], vec![9]]);
}

#[test]
fn chunks_sharing_a_compressed_member_stay_in_one_batch() {
    let mut chunks = laid_out(&[1 << 20, 1 << 20, 1 << 20]);
    // Chunk 2 starts inside chunk 1's member (tar headers sharing a member).
    chunks[2].blob_offset = chunks[1].blob_offset;
    chunks[2].inner_offset = 512;
    let ids: Vec<ChunkId> = (0..3).collect();
    let batches: Vec<Vec<ChunkId>> = super::load::decode_batches(&chunks, &ids).collect();
    assert_eq!(batches, vec![vec![0], vec![1, 2]]);
}

#[tokio::test]
async fn a_run_is_answered_whole_from_a_body_streamed_in_pieces_that_cross_chunks() {
    let l = TestLayer::new(true).await;
    let b = l.node("b.bin");
    let got = l.fetcher.read(b, 0, (4 * CHUNK) as u32).await.unwrap();
    assert_eq!(&got[..], l.expected("b.bin"));
    assert_eq!(l.source.requests().len(), 1, "{:?}", l.source.requests());
}

/// Streams the first `first` bytes of every range at once and holds the rest back a minute.
struct HoldsBackTheRest {
    blob: Bytes,
    first: usize,
}

impl RangeSource for HoldsBackTheRest {
    fn read(&self, offset: u64, len: u64) -> futures::future::BoxFuture<'_, Result<Bytes, SourceError>> {
        async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(self.blob.slice(offset as usize..(offset + len) as usize))
        }
        .boxed()
    }

    fn read_into(
        &self,
        offset: u64,
        len: u64,
        tx: crate::registry::RangeSink,
    ) -> futures::future::BoxFuture<'_, Result<(), SourceError>> {
        async move {
            let data = self.blob.slice(offset as usize..(offset + len) as usize);
            let _ = tx.send(data.slice(..self.first)).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            let _ = tx.send(data.slice(self.first..)).await;
            Ok(())
        }
        .boxed()
    }
}

#[tokio::test]
async fn a_chunk_is_answered_once_its_bytes_arrived_while_the_rest_of_its_request_is_still_coming() {
    const BIG: u64 = 1 << 20;
    let weights = content(2 * BIG as usize, 7);
    let blob = tar_blob(&[("w.bin", weights.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let node = services(cache.path(), 1 << 30);
    // The tar header (512 bytes) and the first chunk arrive; the second chunk is held back.
    let source = Arc::new(HoldsBackTheRest {
        blob: blob.clone(),
        first: 512 + BIG as usize,
    });
    let f = tar_fetcher(&blob, source as Arc<dyn RangeSource>, &node, BIG, true).await;
    let w = f.index().resolve("w.bin").unwrap();
    let whole = tokio::spawn({
        let f = Arc::clone(&f);
        async move { f.read(w, 0, 2 * BIG as u32).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await; // the whole-file read leads both chunks
    let first = tokio::time::timeout(Duration::from_secs(10), f.read(w, 0, BIG as u32))
        .await
        .expect("the first chunk is answered before the request ends")
        .unwrap();
    assert_eq!(&first[..], &weights[..BIG as usize]);
    assert!(!whole.is_finished(), "the second chunk is still coming");
    whole.abort();
}

#[tokio::test]
async fn a_cached_chunk_needs_no_request() {
    let l = TestLayer::new(true).await;
    l.read_all("small.txt").await.unwrap();
    let before = l.source.requests().len();
    l.read_all("small.txt").await.unwrap();
    assert_eq!(l.source.requests().len(), before);
}

#[tokio::test]
async fn a_transient_failure_fails_the_read_and_the_next_read_fetches_again() {
    let l = TestLayer::new(true).await;
    l.source.fail_next(Fault::Error);
    let e = l.read_all("small.txt").await.unwrap_err();
    assert!(matches!(e, FetchError::Source { .. }) && !e.is_not_found(), "{e}");
    assert!(
        e.to_string().contains(&l.fetcher.layer().to_string()),
        "names the layer: {e}"
    );
    assert_eq!(&l.read_all("small.txt").await.unwrap()[..], b"hello");
}

#[tokio::test]
async fn a_missing_blob_is_told_apart_from_a_transient_failure() {
    let l = TestLayer::new(true).await;
    l.source.fail_next(Fault::NotFound);
    let e = l.read_all("small.txt").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn a_short_body_is_an_error_never_short_bytes() {
    let l = TestLayer::new(false).await;
    l.source.fail_next(Fault::Short(100));
    let e = l.read_all("a.bin").await.unwrap_err();
    assert!(e.to_string().contains("answered 100 bytes"), "{e}");
}

#[tokio::test]
async fn wrong_bytes_are_fetched_once_more_and_the_reader_gets_the_right_ones() {
    let l = TestLayer::new(true).await;
    l.source.fail_next(Fault::WrongBytes);
    assert_eq!(&l.read_all("a.bin").await.unwrap()[..], l.expected("a.bin"));
    assert_eq!(l.source.requests().len(), 2);
}

#[tokio::test]
async fn wrong_bytes_twice_fail_the_read() {
    let l = TestLayer::new(true).await;
    l.source.fail_next(Fault::WrongBytes);
    l.source.fail_next(Fault::WrongBytes);
    let e = l.read_all("a.bin").await.unwrap_err();
    assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
    assert_eq!(
        &l.read_all("a.bin").await.unwrap()[..],
        l.expected("a.bin"),
        "nothing wrong was kept"
    );
}

#[tokio::test]
async fn a_read_waiting_past_its_deadline_fails_naming_the_layer_and_file() {
    let l = TestLayer::with_deadline(true, Duration::from_millis(300)).await;
    l.source.fail_next(Fault::Stall(Duration::from_secs(60)));
    let started = std::time::Instant::now();
    let e = l.read_all("b.bin").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(matches!(e, FetchError::Deadline { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("/b.bin") && text.contains(&l.fetcher.layer().to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn a_read_answered_within_its_deadline_is_unaffected() {
    let l = TestLayer::with_deadline(true, Duration::from_secs(5)).await;
    l.source.fail_next(Fault::Stall(Duration::from_millis(100)));
    assert_eq!(&l.read_all("a.bin").await.unwrap()[..], l.expected("a.bin"));
}

/// A registry whose every operation ran out of its deadline.
struct OutOfTime;

impl RangeSource for OutOfTime {
    fn read(&self, _: u64, _: u64) -> futures::future::BoxFuture<'_, Result<Bytes, SourceError>> {
        use crate::registry::{RedactedUrl, RegistryError};
        let url = RedactedUrl::new("http://r/v2/a/blobs/x");
        let late = RegistryError::TimedOut {
            op: "reading blob range",
            url: url.clone(),
            deadline: Duration::from_secs(60),
        };
        let e = RegistryError::GaveUp {
            op: "reading blob range",
            url,
            attempts: 3,
            elapsed: Duration::from_secs(60),
            last: Box::new(late),
        };
        futures::future::ready(Err(SourceError::Registry(e))).boxed()
    }
}

#[tokio::test]
async fn a_read_whose_registry_operation_ran_out_of_time_reports_the_read_deadline() {
    let files = vec![("f.bin", content(CHUNK as usize, 3))];
    let blob = tar_blob(&files);
    let cache = tempfile::tempdir().unwrap();
    let node = services(cache.path(), 1 << 30);
    let fetcher = tar_fetcher(&blob, Arc::new(OutOfTime), &node, CHUNK, true).await;
    let f = fetcher.index().resolve("f.bin").unwrap();
    let e = fetcher.read(f, 0, 10).await.unwrap_err();
    assert!(matches!(e, FetchError::Deadline { .. }), "{e}");
    assert!(e.to_string().contains("/f.bin"), "{e}");
}

#[tokio::test]
async fn a_stalled_low_priority_request_does_not_hold_up_an_on_demand_read() {
    let l = TestLayer::new(true).await;
    l.source.fail_next(Fault::Stall(Duration::from_secs(60)));
    let (f, a) = (
        Arc::clone(&l.fetcher),
        l.fetcher.index().chunks_for_range(l.node("a.bin"), 0, u64::MAX),
    );
    let stalled = tokio::spawn(async move { f.chunks(None, a, Cause::Prefetch).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let read = tokio::time::timeout(Duration::from_secs(10), l.read_all("b.bin")).await;
    assert_eq!(&read.expect("not held up").unwrap()[..], l.expected("b.bin"));
    assert!(!stalled.is_finished());
    stalled.abort();
}

#[tokio::test]
async fn a_read_that_joins_a_background_fetch_raises_its_priority() {
    let l = TestLayer::new(true).await;
    // An on-demand request in flight keeps background requests out...
    l.source.fail_next(Fault::Stall(Duration::from_secs(60)));
    let (f, a) = (Arc::clone(&l.fetcher), l.node("a.bin"));
    let stalled = tokio::spawn(async move { f.read(a, 0, 10).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = l.fetcher.index().chunks_for_range(l.node("b.bin"), 0, u64::MAX);
    let f = Arc::clone(&l.fetcher);
    let background = tokio::spawn(async move { f.chunks(None, b, Cause::Background).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(l.source.requests().len(), 1, "background waits");
    // ...until a reader wants its chunks: then they are on-demand.
    let read = tokio::time::timeout(Duration::from_secs(10), l.read_all("b.bin")).await;
    assert_eq!(&read.expect("raised").unwrap()[..], l.expected("b.bin"));
    assert!(tokio::time::timeout(Duration::from_secs(10), background).await.is_ok());
    stalled.abort();
}

#[tokio::test]
async fn an_attached_observer_sees_reads_until_it_is_detached() {
    #[derive(Default)]
    struct Seen(parking_lot::Mutex<Vec<(NodeId, u64, u64)>>);
    impl ReadObserver for Seen {
        fn read(&self, _: &Digest, node: NodeId, offset: u64, len: u64) {
            self.0.lock().push((node, offset, len));
        }
    }
    let l = TestLayer::new(false).await;
    let seen = Arc::new(Seen::default());
    let observer: Arc<dyn ReadObserver> = Arc::clone(&seen) as Arc<dyn ReadObserver>;
    l.fetcher.attach(Arc::clone(&observer));
    let node = l.node("small.txt");
    l.fetcher.read(node, 1, 3).await.unwrap();
    l.fetcher.detach(&observer);
    l.fetcher.read(node, 0, 5).await.unwrap();
    assert_eq!(*seen.0.lock(), vec![(node, 1, 3)]);
}

#[tokio::test]
async fn a_read_past_the_end_of_a_file_is_empty() {
    let l = TestLayer::new(false).await;
    assert!(l.fetcher.read(l.node("small.txt"), 5, 10).await.unwrap().is_empty());
    assert!(l.source.requests().is_empty());
}

#[test]
fn neighbours_coalesce_and_distant_chunks_do_not() {
    let chunk = |blob_offset, blob_len| Chunk {
        file_offset: 0,
        len: blob_len,
        blob_offset,
        blob_len,
        inner_offset: 0,
        encoding: crate::index::Encoding::Raw,
        digest: None,
        whole: None,
    };
    let chunks = vec![chunk(0, 100), chunk(100, 100), chunk(10 << 20, 100)];
    assert_eq!(coalesce(&chunks, vec![0, 1, 2], |i| *i), vec![vec![0, 1], vec![2]]);
    let quarter = MAX_REQUEST / 4;
    let big: Vec<Chunk> = (0..8).map(|i| chunk(i * quarter, quarter)).collect();
    assert_eq!(
        coalesce(&big, (0..8).collect(), |i| *i).len(),
        2,
        "runs stay under the request limit"
    );
}

/// A gzip-indexed layer (spans of 256 KiB) over an in-process source.
struct SpanLayer {
    fetcher: Arc<Fetcher>,
    source: Arc<TestSource>,
    weights: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl SpanLayer {
    async fn new() -> Self {
        use rand::{RngCore, SeedableRng};
        use std::io::Write;
        // Incompressible, so deflate blocks stay small and checkpoints can be close.
        let mut weights = vec![0u8; 3 << 20];
        rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut weights);
        let tar = tar_blob(&[("small.txt", b"hello".to_vec()), ("weights.bin", weights.clone())]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let blob = Bytes::from(gz.finish().unwrap());
        let layer = Digest::of(&blob);
        let dir = tempfile::tempdir().unwrap();
        let (meta, windows) = crate::index::gzip::build(&layer, 256 << 10, &blob[..]).unwrap();
        let path = dir.path().join("layer.gzindex");
        std::fs::write(&path, crate::index::gzip::format::write(&meta, &windows).unwrap()).unwrap();
        let index =
            crate::index::gzip::open(&path, &layer, blob.len() as u64, crate::index::gzip::Layout::Deflate).unwrap();
        assert!(index.spans.as_ref().is_some_and(|s| s.len() > 4), "several spans");
        let source = Arc::new(TestSource::new(blob));
        let node = services(&dir.path().join("cache"), 1 << 30);
        let fetcher = Fetcher::new(
            layer,
            Arc::new(index),
            Arc::clone(&source) as Arc<dyn RangeSource>,
            &node,
        );
        Self {
            fetcher,
            source,
            weights,
            _dir: dir,
        }
    }

    fn weights_node(&self) -> NodeId {
        self.fetcher.index().resolve("weights.bin").unwrap()
    }
}

#[tokio::test]
async fn a_span_read_returns_the_files_bytes() {
    let l = SpanLayer::new().await;
    let at = 1_500_000;
    let got = l.fetcher.read(l.weights_node(), at, 100_000).await.unwrap();
    assert_eq!(&got[..], &l.weights[at as usize..at as usize + 100_000]);
    let small = l.fetcher.index().resolve("small.txt").unwrap();
    assert_eq!(&l.fetcher.read(small, 0, 5).await.unwrap()[..], b"hello");
}

#[tokio::test]
async fn concurrent_reads_in_one_span_fetch_it_once() {
    let l = SpanLayer::new().await;
    let node = l.weights_node();
    let reads = (0..6).map(|i| l.fetcher.read(node, 1_000_000 + i * 1000, 100));
    for r in futures::future::join_all(reads).await {
        r.unwrap();
    }
    // (Repeated reads of one chunk look sequential, so later spans come as read-ahead.)
    let mut offsets: Vec<u64> = l.source.requests().iter().map(|(o, _)| *o).collect();
    let n = offsets.len();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), n, "no span fetched twice: {:?}", l.source.requests());
}

#[tokio::test]
async fn a_span_with_wrong_bytes_is_fetched_once_more() {
    let l = SpanLayer::new().await;
    l.source.fail_next(Fault::WrongBytes);
    let got = l.fetcher.read(l.weights_node(), 2_000_000, 4096).await.unwrap();
    assert_eq!(&got[..], &l.weights[2_000_000..2_004_096]);
    assert_eq!(l.source.requests().len(), 2);
}

#[tokio::test]
async fn a_span_wrong_twice_fails_the_read_naming_the_layer() {
    let l = SpanLayer::new().await;
    l.source.fail_next(Fault::WrongBytes);
    l.source.fail_next(Fault::WrongBytes);
    let e = l.fetcher.read(l.weights_node(), 2_000_000, 4096).await.unwrap_err();
    assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&l.fetcher.layer().to_string()), "{e}");
}

#[tokio::test]
async fn a_truncated_span_is_an_error() {
    let l = SpanLayer::new().await;
    l.source.fail_next(Fault::Short(10));
    let e = l.fetcher.read(l.weights_node(), 0, 4096).await.unwrap_err();
    assert!(matches!(e, FetchError::Source { .. }), "{e}");
}

/// Fetches every chunk of the layer and waits until the disk cache holds them all.
async fn fill_all(f: &Arc<Fetcher>) {
    let ids: Vec<ChunkId> = (0..f.index().chunks.len() as ChunkId).collect();
    f.chunks(None, ids.clone(), Cause::Background).await.unwrap();
    for _ in 0..200 {
        if ids.iter().all(|&id| f.is_cached(id)) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let missing: Vec<_> = ids.iter().filter(|&&id| !f.is_cached(id)).collect();
    panic!("chunks never reached the disk cache: {missing:?} of {}", ids.len());
}

#[tokio::test]
async fn a_filled_compressed_layer_is_proven_by_its_layer_digest_once() {
    let l = SpanLayer::new().await;
    fill_all(&l.fetcher).await;
    let size = l.source.blob().len() as u64;
    assert_eq!(l.fetcher.check_complete(size, None).await.unwrap(), Proof::LayerDigest);
    // Recorded: a later check (a fill after a restart) fetches nothing.
    let before = l.source.requests().len();
    assert_eq!(l.fetcher.check_complete(size, None).await.unwrap(), Proof::Recorded);
    assert_eq!(l.source.requests().len(), before);
}

#[tokio::test]
async fn a_compressed_blob_hashed_while_filling_is_fetched_once() {
    let l = SpanLayer::new().await;
    let size = l.source.blob().len() as u64;
    let mut hash = l.fetcher.begin_blob_hash(size);
    let ids: Vec<ChunkId> = (0..l.fetcher.index().chunks.len() as ChunkId).collect();
    for batch in ids.chunks(4) {
        let first = l.fetcher.index().chunks[batch[0] as usize].blob_offset;
        l.fetcher.hash_blob_to(&mut hash, first).await.unwrap();
        l.fetcher.chunks(None, batch.to_vec(), Cause::Background).await.unwrap();
    }
    fill_all(&l.fetcher).await;
    assert_eq!(
        l.fetcher.check_complete(size, Some(hash)).await.unwrap(),
        Proof::LayerDigest
    );
    // Once each, but for the byte a checkpoint sits in, which two spans share.
    let spans = l.fetcher.index().spans.as_ref().unwrap().len() as u64;
    let fetched = l.source.bytes_requested();
    assert!(
        size <= fetched && fetched <= size + spans,
        "{fetched} bytes fetched of {size}"
    );
}

#[tokio::test]
async fn a_compressed_blob_with_a_byte_flipped_outside_every_span_fails_the_completion_check() {
    let l = SpanLayer::new().await;
    // The gzip trailer's last byte: no span covers it, only the layer digest does.
    let size = l.source.blob().len() as u64;
    l.source.flip_at(size - 1);
    l.fetcher
        .read(l.weights_node(), 0, 4096)
        .await
        .expect("spans are intact");
    fill_all(&l.fetcher).await;
    let err = l.fetcher.check_complete(size, None).await.unwrap_err();
    assert!(matches!(err, CompleteError::Mismatch { .. }), "{err}");
    assert!(!l.fetcher.disk().is_proven(l.fetcher.layer()));
}

#[tokio::test]
async fn a_filled_layer_whose_cache_lost_a_chunk_is_not_complete_and_not_quarantined() {
    let l = SpanLayer::new().await;
    fill_all(&l.fetcher).await;
    // Its last chunk may still be sealing the entry (synced, renamed).
    let mut weights = l.fetcher.disk().file(l.fetcher.layer(), l.weights_node());
    for _ in 0..200 {
        if matches!(weights, crate::cache::FileEntry::Ready(_)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        weights = l.fetcher.disk().file(l.fetcher.layer(), l.weights_node());
    }
    let crate::cache::FileEntry::Ready(path) = weights else {
        panic!("weights cached whole: {weights:?}")
    };
    std::fs::remove_file(&path).unwrap();
    let err = l.fetcher.check_complete(0, None).await.unwrap_err();
    assert!(matches!(err, CompleteError::Missing { .. }), "{err}");
    assert!(l.fetcher.quarantined().is_none());
}
