//! zlib's inflate API (through libz-rs-sys, the zlib-rs project's C API in
//! Rust) for what random access into a gzip stream needs and flate2 does not
//! expose: stopping at deflate block boundaries (`Z_BLOCK`), and starting
//! mid-stream at a bit offset (`inflatePrime`) with a saved window
//! (`inflateSetDictionary`).

use libz_rs_sys as z;

/// Largest back-reference distance of deflate: the window a checkpoint keeps.
pub const WINDOW: usize = 32 << 10;

/// A zlib inflate call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("{op} failed ({code})")]
    Call { op: &'static str, code: i32 },
    #[error("deflate stream asks for a preset dictionary")]
    PresetDictionary,
    #[error("invalid deflate data ({0})")]
    InvalidData(String),
}

/// Outcome of one [`Inflater::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The end of the deflate stream (and, for gzip, its trailer) was reached.
    pub end: bool,
}

/// One zlib inflate stream. Boxed: zlib's state points back at the stream.
pub struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream owns its state and is only used through `&mut self`.
unsafe impl Send for Inflater {}

impl Inflater {
    /// Inflates a gzip member (header and trailer checked by zlib).
    pub fn gzip() -> Result<Self, InflateError> {
        Self::new(15 + 16)
    }

    /// Inflates raw deflate data, as found between two checkpoints.
    pub fn raw() -> Result<Self, InflateError> {
        Self::new(-15)
    }

    fn new(window_bits: i32) -> Result<Self, InflateError> {
        let mut strm = Box::<z::z_stream>::default();
        // SAFETY: `strm` is a valid, default-initialised stream with allocators set.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(InflateError::Call {
                op: "inflateInit2",
                code: rc,
            });
        }
        Ok(Self { strm })
    }

    /// Feeds the `bits` high bits of `byte` first: a checkpoint inside a byte.
    pub fn prime(&mut self, bits: u8, byte: u8) -> Result<(), InflateError> {
        if bits == 0 {
            return Ok(());
        }
        // SAFETY: initialised stream.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, bits as i32, (byte >> (8 - bits)) as i32) };
        check(rc, "inflatePrime")
    }

    /// Sets the window (the output that preceded this point of the stream).
    pub fn set_window(&mut self, window: &[u8]) -> Result<(), InflateError> {
        if window.is_empty() {
            return Ok(());
        }
        // SAFETY: initialised stream; zlib copies the dictionary.
        let rc = unsafe { z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32) };
        check(rc, "inflateSetDictionary")
    }

    /// Inflates from `input` into `output`; with `block`, returns at the end
    /// of every deflate block header and block (see [`Inflater::at_block_boundary`]).
    pub fn step(&mut self, input: &[u8], output: &mut [u8], block: bool) -> Result<Step, InflateError> {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = output.as_mut_ptr();
        s.avail_out = output.len().min(u32::MAX as usize) as u32;
        let before_in = s.avail_in;
        let before_out = s.avail_out;
        let flush = if block { z::Z_BLOCK } else { z::Z_NO_FLUSH };
        // SAFETY: next_in/next_out point into live slices of the given lengths.
        let rc = unsafe { z::inflate(s, flush) };
        let step = Step {
            consumed: (before_in - s.avail_in) as usize,
            produced: (before_out - s.avail_out) as usize,
            end: rc == z::Z_STREAM_END,
        };
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        match rc {
            z::Z_OK | z::Z_STREAM_END | z::Z_BUF_ERROR => Ok(step),
            z::Z_NEED_DICT => Err(InflateError::PresetDictionary),
            _ => Err(InflateError::InvalidData(self.message())),
        }
    }

    /// After a `block` step: the stream sits between two deflate blocks (not
    /// after the last one), where a checkpoint can be taken.
    pub fn at_block_boundary(&self) -> bool {
        let t = self.strm.data_type;
        t & 128 != 0 && t & 64 == 0
    }

    /// Unused bits of the last consumed byte (they belong to the next block).
    pub fn pending_bits(&self) -> u8 {
        (self.strm.data_type & 7) as u8
    }

    #[allow(clippy::unnecessary_cast)] // c_ulong: 32 bits on some targets
    pub fn total_in(&self) -> u64 {
        self.strm.total_in as u64
    }

    #[allow(clippy::unnecessary_cast)]
    pub fn total_out(&self) -> u64 {
        self.strm.total_out as u64
    }

    fn message(&self) -> String {
        if self.strm.msg.is_null() {
            return "no message".into();
        }
        // SAFETY: zlib's messages are static NUL-terminated strings.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, ended once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

fn check(rc: i32, op: &'static str) -> Result<(), InflateError> {
    if rc == z::Z_OK {
        Ok(())
    } else {
        Err(InflateError::Call { op, code: rc })
    }
}
