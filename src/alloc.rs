//! The daemon's use of glibc's allocator: tuned once at start, and heap
//! pages handed back after the few operations that free a large peak at once.

/// Sets glibc's allocator tunables; call before any other thread starts.
///
/// Chunk buffers and range bodies (up to 4 MiB) stay on the heap: a fresh
/// mmap each would cost page faults and kernel zeroing (about a tenth of the
/// CPU of a cold sequential read). fuser's 16 MiB request buffers are
/// mmapped, so the pages the kernel never writes stay untouched. Two arenas
/// and a trim threshold bound what the heap keeps after a burst: glibc would
/// otherwise keep an arena per blocking thread, each holding its peak.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tunables and takes plain
    // integers; the caller runs it before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands freed heap pages back to the OS. Building an index parses (and
/// drops) a whole TOC or tar stream; without this the daemon's resident
/// memory would keep that peak for as long as it runs.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's
    // own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
