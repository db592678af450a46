//! Page-aligned buffers: decoded chunk and span bytes land in them so the
//! disk cache can write them with O_DIRECT. A leaf module: used by `fetch`
//! and `index` alike, it imports neither.

use bytes::{Bytes, BytesMut};
use std::io::{self, Read};

/// The alignment O_DIRECT writes need (the page size of the targets we run on).
pub const PAGE: usize = 4096;

/// `len` zero bytes starting on a page boundary.
pub fn aligned_buffer(len: usize) -> BytesMut {
    let mut v = BytesMut::zeroed(len + PAGE);
    let pad = v.as_ptr().align_offset(PAGE);
    let mut out = v.split_off(pad);
    out.truncate(len);
    out
}

/// A buffer a decoder reads into whose contents start on a page boundary.
/// Stays aligned as long as no more than its capacity is read into it.
pub struct AlignedVec {
    vec: Vec<u8>,
    pad: usize,
}

impl AlignedVec {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut vec: Vec<u8> = Vec::with_capacity(capacity + PAGE);
        let pad = vec.as_ptr().align_offset(PAGE);
        vec.resize(pad, 0);
        Self { vec, pad }
    }

    /// Appends everything `r` yields; returns how many bytes that was.
    pub fn read_to_end(&mut self, mut r: impl Read) -> io::Result<usize> {
        r.read_to_end(&mut self.vec)
    }

    /// Bytes held (the alignment pad not counted).
    pub fn len(&self) -> usize {
        self.vec.len() - self.pad
    }

    /// The bytes read so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.vec[self.pad..]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The contents, still page-aligned, without a copy.
    pub fn freeze(self) -> Bytes {
        Bytes::from(self.vec).slice(self.pad..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page_boundary() {
        let b = aligned_buffer(10_000);
        assert_eq!((b.len(), b.as_ptr().align_offset(PAGE)), (10_000, 0));
        let mut v = AlignedVec::with_capacity(5);
        assert_eq!(v.read_to_end(&b"hello"[..]).unwrap(), 5);
        let frozen = v.freeze();
        assert_eq!((&frozen[..], frozen.as_ptr().align_offset(PAGE)), (&b"hello"[..], 0));
    }
}
