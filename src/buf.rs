//! Page-aligned buffers: decoded chunk and span bytes land in them so the
//! disk cache can write them with O_DIRECT. A leaf module: used by `fetch`
//! and `index` alike, it imports neither.

use bytes::{Bytes, BytesMut};
use std::io::{self, Read};

/// The alignment O_DIRECT writes need (the page size of the targets we run on).
pub const PAGE: usize = 4096;
/// Most bytes [`AlignedVec::read_to_end`] makes room for per read.
const STEP: usize = 256 << 10;
/// Room for a read once the capacity is used up (it should find the end of the stream).
const PROBE: usize = 32;

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
    /// Reads a [`STEP`] at a time into zeroed room: the buffer's pages become
    /// resident as bytes arrive. (std's `read_to_end` zeroes ever longer
    /// stretches ahead of a reader that fills them: a chunk coming from the
    /// network was resident whole once about half of it had come.)
    pub fn read_to_end(&mut self, mut r: impl Read) -> io::Result<usize> {
        let start = self.vec.len();
        loop {
            let at = self.vec.len();
            // Within the capacity asked for: growing would move the buffer off its page boundary.
            let room = (self.vec.capacity() - at).min(STEP);
            let got = if room >= PROBE {
                self.vec.resize(at + room, 0);
                let got = r.read(&mut self.vec[at..]);
                self.vec.truncate(at + *got.as_ref().unwrap_or(&0));
                got
            } else {
                // Full: a small read finds the end (a longer stream than asked for grows the buffer).
                let mut probe = [0u8; PROBE];
                let got = r.read(&mut probe);
                self.vec.extend_from_slice(&probe[..*got.as_ref().unwrap_or(&0)]);
                got
            };
            match got {
                Ok(0) => return Ok(self.vec.len() - start),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
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

    #[test]
    fn reading_to_the_end_keeps_the_buffer_where_it_is_and_takes_every_byte() {
        let data: Vec<u8> = (0..(STEP * 3 + 77)).map(|i| i as u8).collect();
        let mut v = AlignedVec::with_capacity(data.len());
        let before = v.as_slice().as_ptr();
        // A short read first, as a decoder waiting on the network may return.
        let mut slow = (&data[..5]).chain(&data[5..]);
        assert_eq!(v.read_to_end(&mut slow).unwrap(), data.len());
        assert_eq!(v.as_slice(), &data[..]);
        assert_eq!(v.as_slice().as_ptr(), before, "not moved: still page-aligned");
    }

    #[test]
    fn a_stream_longer_than_the_capacity_is_read_whole() {
        let data: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
        let mut v = AlignedVec::with_capacity(3);
        assert_eq!(v.read_to_end(&data[..]).unwrap(), data.len());
        assert_eq!(v.as_slice(), &data[..]);
    }
}
