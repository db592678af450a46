//! A range request's body as it arrives, read in order on a blocking thread:
//! decoders pull a chunk's compressed bytes straight from the pieces the
//! connection delivers, so a chunk is never held compressed and decoded at
//! once, and no piece is copied into a batch buffer first.

use bytes::{Bytes, BytesMut};
use std::io::{self, BufRead, Read};
use tokio::sync::mpsc;

/// The body of one range request, from blob offset `at` on.
pub(super) struct Body {
    rx: mpsc::Receiver<Bytes>,
    /// The unread rest of the current piece; it starts at blob offset `at`.
    piece: Bytes,
    at: u64,
    /// The connection delivered its last piece (or failed): no more will come.
    ended: bool,
    /// Bytes read while recording, in order (for the blob hash's tap).
    recorded: Option<Vec<Bytes>>,
}

impl Body {
    pub(super) fn new(rx: mpsc::Receiver<Bytes>, start: u64) -> Self {
        Self {
            rx,
            piece: Bytes::new(),
            at: start,
            ended: false,
            recorded: None,
        }
    }

    /// Blob offset of the next unread byte.
    pub(super) fn at(&self) -> u64 {
        self.at
    }

    /// Waits for the next piece when the current one is read; false at the end.
    fn fill(&mut self) -> bool {
        while self.piece.is_empty() {
            if self.ended {
                return false;
            }
            match self.rx.blocking_recv() {
                Some(p) => self.piece = p,
                None => self.ended = true,
            }
        }
        true
    }

    fn advance(&mut self, n: usize) {
        let read = self.piece.split_to(n);
        if let Some(r) = self.recorded.as_mut() {
            r.push(read);
        }
        self.at += n as u64;
    }

    /// Reads and drops bytes up to blob offset `to`; false if the body ends first.
    pub(super) fn skip_to(&mut self, to: u64) -> bool {
        while self.at < to {
            if !self.fill() {
                return false;
            }
            let n = (to - self.at).min(self.piece.len() as u64) as usize;
            self.advance(n);
        }
        true
    }

    /// The next `len` bytes as one buffer, or `None` if the body ends first.
    pub(super) fn read_bytes(&mut self, len: u64) -> Option<Bytes> {
        let mut out = BytesMut::with_capacity(usize::try_from(len).ok()?);
        while (out.len() as u64) < len {
            if !self.fill() {
                return None;
            }
            let n = (len - out.len() as u64).min(self.piece.len() as u64) as usize;
            out.extend_from_slice(&self.piece[..n]);
            self.advance(n);
        }
        Some(out.freeze())
    }

    /// The next `len` bytes as a reader; what it leaves unread stays in the body.
    pub(super) fn extent(&mut self, len: u64) -> Extent<'_> {
        Extent { body: self, left: len }
    }

    /// Keeps every byte read from now on, until [`Self::take_recorded`].
    pub(super) fn record(&mut self) {
        self.recorded = Some(Vec::new());
    }

    /// The bytes read since [`Self::record`], as one buffer (none if not recording).
    pub(super) fn take_recorded(&mut self) -> Option<Bytes> {
        let pieces = self.recorded.take()?;
        if let [one] = &pieces[..] {
            return Some(one.clone());
        }
        let mut out = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
        pieces.iter().for_each(|p| out.extend_from_slice(p));
        Some(out.freeze())
    }

    /// Reads the body to its end; returns the blob offset it reached.
    pub(super) fn drain(&mut self) -> u64 {
        while self.fill() {
            self.advance(self.piece.len());
        }
        self.at
    }
}

/// At most `left` bytes of a [`Body`], as a buffered reader. A body that
/// ends early is an error of kind `UnexpectedEof`.
pub(super) struct Extent<'a> {
    body: &'a mut Body,
    left: u64,
}

impl Extent<'_> {
    /// Reads and drops what is left of the extent; false if the body ends first.
    pub(super) fn finish(self) -> bool {
        let to = self.body.at + self.left;
        self.body.skip_to(to)
    }
}

impl Read for Extent<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Extent<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.left == 0 {
            return Ok(&[]);
        }
        if !self.body.fill() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the range body ended early",
            ));
        }
        let n = self.left.min(self.body.piece.len() as u64) as usize;
        Ok(&self.body.piece[..n])
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.left as usize).min(self.body.piece.len());
        self.body.advance(n);
        self.left -= n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `pieces`, all sent, starting at blob offset `start`.
    fn body(pieces: &[&'static [u8]], start: u64) -> Body {
        let (tx, rx) = mpsc::channel(pieces.len().max(1));
        for p in pieces {
            tx.try_send(Bytes::from_static(p)).unwrap();
        }
        Body::new(rx, start)
    }

    #[test]
    fn an_extent_reads_across_pieces_and_stops_at_its_length() {
        let mut b = body(&[b"abc", b"defg", b"hi"], 100);
        assert!(b.skip_to(101));
        let mut out = Vec::new();
        b.extent(5).read_to_end(&mut out).unwrap();
        assert_eq!((&out[..], b.at()), (&b"bcdef"[..], 106));
        assert_eq!(b.read_bytes(3).as_deref(), Some(&b"ghi"[..]));
        assert_eq!(b.drain(), 109);
    }

    #[test]
    fn an_extent_of_a_body_that_ends_early_is_an_unexpected_eof() {
        let mut b = body(&[b"abc"], 0);
        let mut out = Vec::new();
        let e = b.extent(5).read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn finishing_an_extent_skips_what_its_reader_left() {
        let mut b = body(&[b"abcdef"], 0);
        let mut e = b.extent(4);
        let mut two = [0u8; 2];
        e.read_exact(&mut two).unwrap();
        assert!(e.finish());
        assert_eq!(b.read_bytes(2).as_deref(), Some(&b"ef"[..]));
    }

    #[test]
    fn recorded_bytes_come_back_as_one_buffer() {
        let mut b = body(&[b"ab", b"cd", b"ef"], 0);
        b.record();
        assert!(b.skip_to(5));
        assert_eq!(b.take_recorded().as_deref(), Some(&b"abcde"[..]));
        assert_eq!(b.take_recorded(), None);
    }
}
