//! Where a layer's bytes come from: the registry (range reads) or a local
//! file (layers downloaded whole and verified against their digest).

use super::FetchError;
use crate::digest::Digest;
use crate::registry::{Reference, Registry};
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

#[derive(Clone)]
pub enum BlobSource {
    Registry { registry: Arc<Registry>, repo: Reference },
    Local(Arc<std::fs::File>),
}

impl BlobSource {
    /// Exactly `len` bytes at `offset` of the layer's blob.
    pub async fn read(&self, layer: &Digest, offset: u64, len: u64) -> Result<Bytes, FetchError> {
        let err = |message: String| FetchError::Source {
            layer: layer.clone(),
            offset,
            len,
            message,
        };
        match self {
            BlobSource::Registry { registry, repo } => registry
                .read_blob_range(repo, layer, offset, len)
                .await
                .map_err(|e| err(e.to_string())),
            BlobSource::Local(file) => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, offset).map(|()| Bytes::from(buf))
                })
                .await
                .map_err(|e| err(e.to_string()))?
                .map_err(|e| err(e.to_string()))
            }
        }
    }
}
