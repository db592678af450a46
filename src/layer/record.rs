//! What a layer's index was built from, kept in the state dir
//! (`layers/<hex>.record`), so that after a restart or a reboot the layer is
//! indexed again without the registry: the image and the layer's descriptor
//! from the manifest, and the blob ranges its index was read from (an eStargz
//! footer and TOC, a zstd:chunked manifest; nothing for a gzip or tar layer,
//! whose checkpoint index is a local file already). The same bytes give the
//! same index, node for node: a connection held across a restart keeps its
//! inode numbers. The ranges are checked again as on first use (TOC digest,
//! manifest checksum), so a damaged record fails the open, never a read.

use crate::digest::Digest;
use crate::registry::LayerDescriptor;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Bumped when the record's shape changes: an older record is ignored (the
/// layer is then opened through the registry and recorded again).
const VERSION: u32 = 1;
/// Largest record read back (TOCs are capped well below this).
const MAX_RECORD: u64 = 256 << 20;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LayerRecord {
    version: u32,
    /// The image the layer was first served for (with its manifest digest).
    pub image: String,
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub annotations: HashMap<String, String>,
    /// Blob bytes read to build the index, by offset.
    pub ranges: Vec<(u64, Vec<u8>)>,
}

impl LayerRecord {
    pub fn new(image: &str, desc: &LayerDescriptor, ranges: Vec<(u64, Vec<u8>)>) -> Self {
        Self {
            version: VERSION,
            image: image.to_string(),
            digest: desc.digest.to_string(),
            size: desc.size,
            media_type: desc.media_type.clone(),
            annotations: desc.annotations.clone(),
            ranges,
        }
    }

    pub fn descriptor(&self) -> Option<LayerDescriptor> {
        Some(LayerDescriptor {
            digest: self.digest.parse().ok()?,
            size: self.size,
            media_type: self.media_type.clone(),
            annotations: self.annotations.clone(),
        })
    }

    /// `len` bytes at `offset`, if a recorded range holds them.
    pub fn read(&self, offset: u64, len: u64) -> Option<Bytes> {
        self.ranges.iter().find_map(|(at, data)| {
            let from = offset.checked_sub(*at)?;
            let to = from.checked_add(len)?;
            (to <= data.len() as u64).then(|| Bytes::copy_from_slice(&data[from as usize..to as usize]))
        })
    }
}

pub fn path(layers_dir: &Path, layer: &Digest) -> PathBuf {
    layers_dir.join(format!("{}.record", layer.hex()))
}

/// Writes `record` durably (temporary name, fsync, rename, fsync of the directory).
pub fn save(layers_dir: &Path, layer: &Digest, record: &LayerRecord) -> io::Result<()> {
    use std::io::Write;
    crate::private::dir(layers_dir)?;
    let bytes = postcard::to_stdvec(record).map_err(io::Error::other)?;
    let final_path = path(layers_dir, layer);
    let tmp = final_path.with_extension("record.tmp");
    let mut f = crate::private::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &final_path)?;
    std::fs::File::open(layers_dir)?.sync_all()
}

/// The record of `layer`, if one of this version is there and whole.
pub fn load(layers_dir: &Path, layer: &Digest) -> Option<LayerRecord> {
    let p = path(layers_dir, layer);
    let len = std::fs::metadata(&p).ok()?.len();
    if len > MAX_RECORD {
        return None;
    }
    let bytes = std::fs::read(&p).ok()?;
    let record: LayerRecord = postcard::from_bytes(&bytes).ok()?;
    (record.version == VERSION && record.digest == layer.to_string()).then_some(record)
}

pub fn remove(layers_dir: &Path, layer: &Digest) {
    let _ = std::fs::remove_file(path(layers_dir, layer));
}

/// Records of layers in `layers_dir` (by digest).
pub fn recorded(layers_dir: &Path) -> Vec<Digest> {
    let Ok(dir) = std::fs::read_dir(layers_dir) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name().to_string_lossy().into_owned();
        format!("sha256:{}", name.strip_suffix(".record")?).parse().ok()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> LayerDescriptor {
        LayerDescriptor {
            digest: Digest::of(b"layer"),
            size: 100,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            annotations: [("a".to_string(), "b".to_string())].into(),
        }
    }

    #[test]
    fn a_saved_record_loads_back_the_same() {
        let d = tempfile::tempdir().unwrap();
        let r = LayerRecord::new("reg/img@sha256:00", &desc(), vec![(49, b"footer".to_vec())]);
        save(d.path(), &desc().digest, &r).unwrap();
        assert_eq!(load(d.path(), &desc().digest), Some(r));
        assert_eq!(recorded(d.path()), vec![desc().digest]);
    }

    #[test]
    fn recorded_ranges_answer_reads_inside_them_only() {
        let r = LayerRecord::new("i", &desc(), vec![(10, b"abcdef".to_vec())]);
        assert_eq!(r.read(12, 3).unwrap(), Bytes::from_static(b"cde"));
        assert!(r.read(14, 3).is_none(), "past the range");
        assert!(r.read(9, 2).is_none(), "before it");
    }

    #[test]
    fn a_damaged_record_is_not_loaded() {
        let d = tempfile::tempdir().unwrap();
        let r = LayerRecord::new("i", &desc(), vec![]);
        save(d.path(), &desc().digest, &r).unwrap();
        let p = path(d.path(), &desc().digest);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(load(d.path(), &desc().digest), None);
    }
}
