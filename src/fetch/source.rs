//! Where a layer's bytes come from: the seam between the fetcher and the
//! network. The registry (range reads) and a local file (a layer downloaded
//! whole and verified against its digest) are the two real sources;
//! [`super::testing`] has an in-process one that injects faults.

use crate::digest::Digest;
use crate::registry::{RangeFrom, RangeSink, Reference, Registry, RegistryError};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Range reads of one layer blob.
pub trait RangeSource: Send + Sync {
    /// `len` bytes at `offset` of the blob (the fetcher checks the length).
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>>;

    /// `len` bytes at `offset` sent to `tx` in order as they arrive, then
    /// `Ok` (the fetcher counts what arrived). A source that has them only
    /// whole sends them as one piece.
    fn read_into(&self, offset: u64, len: u64, tx: RangeSink) -> BoxFuture<'_, Result<(), SourceError>> {
        async move {
            let data = self.read(offset, len).await?;
            let _ = tx.send(data).await;
            Ok(())
        }
        .boxed()
    }

    /// The same range once more after its bytes failed verification: a
    /// source with mirrors asks the registry itself (or its `server`), so a
    /// mirror serving bad bytes costs one more request, not a failed read.
    fn read_again(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        self.read(offset, len)
    }

    /// The bytes are on this node already: no caching, read-ahead or scheduling.
    fn is_local(&self) -> bool {
        false
    }

    /// Where the bytes come from (an image repository), for messages.
    fn origin(&self) -> String {
        String::from("-")
    }
}

/// A range read that failed; keeps the cause so callers can tell "not
/// found" from "try again".
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the source answered {got} bytes")]
    Short { got: u64 },
    /// A fault injected by a test source.
    #[error("injected fault: {0}")]
    Injected(String),
    #[error("the source is gone: {0}")]
    NotFound(String),
    #[error("blob bytes {offset}+{len} are not in the layer's record")]
    NotRecorded { offset: u64, len: u64 },
}

impl SourceError {
    /// The blob (or its repository) does not exist there: retrying will not help.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            SourceError::Registry(RegistryError::NotFound { .. }) | SourceError::NotFound(_)
        )
    }

    /// The registry operation ran out of time (its deadline is the read deadline).
    pub fn is_deadline(&self) -> bool {
        match self {
            SourceError::Registry(RegistryError::TimedOut { .. }) => true,
            SourceError::Registry(RegistryError::GaveUp { last, .. }) => {
                matches!(**last, RegistryError::TimedOut { .. })
            }
            _ => false,
        }
    }
}

/// A blob in a registry repository.
pub struct RegistrySource {
    pub registry: Arc<Registry>,
    pub repo: Reference,
    pub digest: Digest,
}

impl RangeSource for RegistrySource {
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        async move {
            Ok(self
                .registry
                .read_blob_range(&self.repo, &self.digest, offset, len)
                .await?)
        }
        .boxed()
    }

    fn read_into(&self, offset: u64, len: u64, tx: RangeSink) -> BoxFuture<'_, Result<(), SourceError>> {
        async move {
            Ok(self
                .registry
                .stream_blob_range(&self.repo, &self.digest, offset, len, RangeFrom::Any, tx)
                .await?)
        }
        .boxed()
    }

    fn read_again(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        async move {
            Ok(self
                .registry
                .read_blob_range_from(&self.repo, &self.digest, offset, len, RangeFrom::Server)
                .await?)
        }
        .boxed()
    }

    fn origin(&self) -> String {
        self.repo.to_string()
    }
}

/// A layer kept on local disk.
pub struct FileSource {
    pub path: PathBuf,
    pub file: Arc<std::fs::File>,
}

impl RangeSource for FileSource {
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let (file, path) = (Arc::clone(&self.file), self.path.clone());
        async move {
            let io = |source| SourceError::Io {
                path: path.clone(),
                source,
            };
            let len = usize::try_from(len).map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .map_err(io)
        }
        .boxed()
    }

    fn is_local(&self) -> bool {
        true
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }
}
