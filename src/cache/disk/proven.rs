//! Layers whose whole blob a completion check hashed to the layer digest on
//! this node: an empty file per layer under `proven/`, so later fills (after
//! a restart) re-check the cached chunks but do not fetch the blob again.

use super::DiskCache;
use crate::digest::Digest;
use std::io;
use std::path::PathBuf;

/// Not a layer digest, so `DiskCache::open` passes the directory by.
const PROVEN: &str = "proven";

impl DiskCache {
    fn proven_path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(PROVEN).join(layer.hex())
    }

    /// Records that `layer`'s blob hashed to its digest.
    pub fn mark_proven(&self, layer: &Digest) -> io::Result<()> {
        let dir = self.dir.join(PROVEN);
        crate::private::dir(&dir)?;
        crate::private::create(&self.proven_path(layer))?.sync_all()?;
        std::fs::File::open(&dir)?.sync_all()
    }

    /// Did a completion check on this node prove `layer`'s blob?
    pub fn is_proven(&self, layer: &Digest) -> bool {
        self.proven_path(layer).exists()
    }

    pub(super) fn forget_proven(&self, layer: &Digest) {
        let _ = std::fs::remove_file(self.proven_path(layer));
    }
}
