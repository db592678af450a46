//! Whole small blobs (profiles, gzip indexes) read under a limit the caller
//! knows: the size their descriptor declares, itself capped. The limit is
//! enforced while the body arrives, so a registry that sends more than it
//! declared (an 8 GiB body for a 1-byte descriptor) costs at most the limit.

use super::{Reference, Registry, RegistryError};
use crate::digest::Digest;
use bytes::{Bytes, BytesMut};

/// A blob that could not be read within its limit, or is not what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CappedReadError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("blob {digest} in {repo}: body is over its limit of {limit} bytes")]
    TooLarge { repo: String, digest: Digest, limit: u64 },
    #[error("blob {digest} in {repo}: reading the body: {source}")]
    Body {
        repo: String,
        digest: Digest,
        #[source]
        source: reqwest::Error,
    },
    #[error("blob {digest} in {repo}: content does not match its digest (got {actual})")]
    Mismatch {
        repo: String,
        digest: Digest,
        actual: Digest,
    },
}

impl Registry {
    /// Reads blob `digest` of `repo` whole, refusing it once more than
    /// `limit` bytes arrive, and checks its digest.
    pub async fn read_blob_capped(
        &self,
        repo: &Reference,
        digest: &Digest,
        limit: u64,
    ) -> Result<Bytes, CappedReadError> {
        let too_large = || CappedReadError::TooLarge {
            repo: repo.to_string(),
            digest: digest.clone(),
            limit,
        };
        let mut resp = self.open_blob(repo, digest).await?;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut body = BytesMut::new();
        while let Some(piece) = resp.chunk().await.map_err(|source| CappedReadError::Body {
            repo: repo.to_string(),
            digest: digest.clone(),
            source,
        })? {
            if (body.len() as u64).saturating_add(piece.len() as u64) > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&piece);
        }
        let actual = Digest::of(&body);
        if &actual != digest {
            return Err(CappedReadError::Mismatch {
                repo: repo.to_string(),
                digest: digest.clone(),
                actual,
            });
        }
        Ok(body.freeze())
    }
}
