//! An in-process range source for tests and benchmarks: serves a blob from
//! memory, injects faults (errors, not found, short bodies, wrong bytes,
//! stalls) into chosen requests, logs every request, and can stand in for a
//! link of a given rate and round-trip time shared by concurrent requests.

use super::source::{RangeSource, SourceError};
use crate::registry::RangeSink;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// What goes wrong with one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// A transient failure (a 5xx, a reset).
    Error,
    /// The blob is not there.
    NotFound,
    /// Only this many bytes arrive.
    Short(u64),
    /// The right number of bytes, one of them flipped.
    WrongBytes,
    /// The answer comes this much later.
    Stall(Duration),
}

/// A simulated link: requests wait one round trip, then share the rate.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub bytes_per_sec: u64,
    pub rtt: Duration,
}

/// Bytes a request sends before letting another one use the link.
const LINK_PIECE: u64 = 256 << 10;

/// A blob served from memory, with faults on demand.
pub struct TestSource {
    blob: Bytes,
    link: Option<Link>,
    /// When the simulated link is next free.
    link_free: Mutex<Instant>,
    /// Faults for the next requests, in order.
    faults: Mutex<VecDeque<Fault>>,
    /// A blob byte served flipped in every answer that holds it.
    flipped: Mutex<Option<u64>>,
    log: Mutex<Vec<(u64, u64)>>,
}

impl TestSource {
    pub fn new(blob: impl Into<Bytes>) -> Self {
        Self {
            blob: blob.into(),
            link: None,
            link_free: Mutex::new(Instant::now()),
            faults: Mutex::default(),
            flipped: Mutex::default(),
            log: Mutex::default(),
        }
    }

    /// The blob as it should be.
    pub fn blob(&self) -> &Bytes {
        &self.blob
    }

    /// From now on, the byte at `offset` is served flipped (a tampering registry).
    pub fn flip_at(&self, offset: u64) {
        *self.flipped.lock() = Some(offset);
    }

    /// Answers come over a simulated link.
    pub fn over(mut self, link: Link) -> Self {
        self.link = Some(link);
        self
    }

    /// The next request not yet given a fault gets this one.
    pub fn fail_next(&self, fault: Fault) {
        self.faults.lock().push_back(fault);
    }

    /// Every request so far: (offset, length), in arrival order.
    pub fn requests(&self) -> Vec<(u64, u64)> {
        self.log.lock().clone()
    }

    /// Bytes asked for so far.
    pub fn bytes_requested(&self) -> u64 {
        self.log.lock().iter().map(|(_, len)| len).sum()
    }

    async fn transmit(&self, bytes: u64) {
        let Some(link) = self.link else { return };
        tokio::time::sleep(link.rtt).await;
        let mut left = bytes;
        while left > 0 {
            let piece = left.min(LINK_PIECE);
            left -= piece;
            let took = Duration::from_secs_f64(piece as f64 / link.bytes_per_sec as f64);
            let done = {
                let mut free = self.link_free.lock();
                let start = (*free).max(Instant::now());
                *free = start + took;
                *free
            };
            tokio::time::sleep_until(done).await;
        }
    }
}

/// The size of the pieces a test source streams a range in: odd, so pieces
/// never line up with chunks.
const STREAM_PIECE: usize = 7001;

impl RangeSource for TestSource {
    fn read_into(&self, offset: u64, len: u64, tx: RangeSink) -> BoxFuture<'_, Result<(), SourceError>> {
        async move {
            let data = self.read(offset, len).await?;
            for at in (0..data.len()).step_by(STREAM_PIECE) {
                if tx
                    .send(data.slice(at..data.len().min(at + STREAM_PIECE)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        async move {
            self.log.lock().push((offset, len));
            let fault = self.faults.lock().pop_front();
            let end = offset.checked_add(len).filter(|e| *e <= self.blob.len() as u64);
            let Some(end) = end else {
                return Err(SourceError::Injected(format!(
                    "range {offset}+{len} is past the blob ({} bytes)",
                    self.blob.len()
                )));
            };
            let mut data = self.blob.slice(offset as usize..end as usize);
            if let Some(at) = (*self.flipped.lock()).filter(|at| (offset..end).contains(at)) {
                let mut wrong = BytesMut::from(&data[..]);
                wrong[(at - offset) as usize] ^= 0x01;
                data = wrong.freeze();
            }
            match fault {
                None => {}
                Some(Fault::Error) => return Err(SourceError::Injected("connection reset".into())),
                Some(Fault::NotFound) => return Err(SourceError::NotFound("blob unknown to the source".into())),
                Some(Fault::Short(n)) => {
                    self.transmit(n.min(len)).await;
                    return Ok(data.slice(..n.min(len) as usize));
                }
                Some(Fault::WrongBytes) => {
                    self.transmit(len).await;
                    let mut wrong = BytesMut::from(&data[..]);
                    if let Some(b) = wrong.get_mut(len as usize / 2) {
                        *b ^= 0x55;
                    }
                    return Ok(wrong.freeze());
                }
                Some(Fault::Stall(d)) => tokio::time::sleep(d).await,
            }
            self.transmit(len).await;
            Ok(data)
        }
        .boxed()
    }
}

/// Services over a disk cache in `cache_dir` bounded to `cache_size`.
pub fn services(cache_dir: &std::path::Path, cache_size: u64) -> super::Services {
    use crate::cache::{DiskCache, MemCache};
    use std::sync::Arc;
    let disk = DiskCache::open(cache_dir, cache_size).expect("test cache dir opens");
    super::Services::new(
        Arc::new(disk),
        Arc::new(MemCache::new(64 << 20)),
        crate::metrics::Metrics::new(),
    )
}

/// An uncompressed tar layer holding `files` (path, content), in that order.
pub fn tar_blob(files: &[(&str, Vec<u8>)]) -> Bytes {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, &data[..]).expect("in-memory tar");
    }
    Bytes::from(b.into_inner().expect("in-memory tar"))
}

/// A fetcher over `source` for the tar layer `blob`, split into chunks of
/// `chunk_size`; with `verified`, each chunk carries its digest (as an
/// eStargz TOC would), so wrong bytes are caught.
pub async fn tar_fetcher(
    blob: &Bytes,
    source: std::sync::Arc<dyn RangeSource>,
    services: &super::Services,
    chunk_size: u64,
    verified: bool,
) -> std::sync::Arc<super::Fetcher> {
    let layer = crate::digest::Digest::of(blob);
    let walk = std::sync::Arc::new(TestSource::new(blob.clone()));
    let read = |offset: u64, len: u64| {
        let walk = std::sync::Arc::clone(&walk);
        async move { walk.read(offset, len).await }
    };
    let mut index = crate::index::tar::index_tar(&layer, blob.len() as u64, chunk_size, read)
        .await
        .expect("test tar indexes");
    if verified {
        for c in &mut index.chunks {
            let at = c.blob_offset as usize;
            c.digest = Some(crate::digest::Digest::of(&blob[at..at + c.len as usize]));
        }
    }
    super::Fetcher::new(layer, std::sync::Arc::new(index), source, services)
}
