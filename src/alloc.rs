//! The daemon's use of glibc's allocator: tuned once at start, and free heap
//! pages handed back to the OS while it runs.

use std::time::Duration;

/// Free heap bytes the daemon keeps resident at most between two trims.
pub const TRIM_SLACK: u64 = 4 << 20;
/// How often the heap's free bytes are looked at.
const TRIM_EVERY: Duration = Duration::from_millis(500);

/// Sets glibc's allocator tunables; call before any other thread starts.
///
/// Chunk buffers and range bodies (up to 4 MiB) stay on the heap: a fresh
/// mmap each would cost page faults and kernel zeroing (about a tenth of the
/// CPU of a cold sequential read). fuser's 16 MiB request buffers are
/// mmapped, so the pages the kernel never writes stay untouched. One arena:
/// chunks are allocated on one thread and freed on another, and every arena
/// keeps the free gaps of its own peak (glibc would make one per thread);
/// the measured cost of the shared lock was nil (CPU-efficiency scenario).
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tunables and takes plain
    // integers; the caller runs it before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
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

/// Bytes the heap holds free (resident or not): freed chunk buffers that
/// glibc keeps for reuse wherever they lie, not only at the heap's top.
pub fn free_bytes() -> u64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallinfo2 only reads the allocator's counters, under its locks.
    unsafe {
        return libc::mallinfo2().fordblks as u64;
    }
    #[allow(unreachable_code)]
    0
}

/// Trims the heap when more than `slack` bytes of it are free; true if it did.
pub fn trim_beyond(slack: u64) -> bool {
    let over = free_bytes() > slack;
    if over {
        trim();
    }
    over
}

/// Runs for the daemon's life: chunk buffers come and go by the megabyte,
/// freed in another order than allocated, so the free gaps between live ones
/// would stay resident (a third of the peak in the start-up benchmark).
/// Trimming twice a second costs microseconds; a page handed back is zeroed
/// by the kernel when reused, a small price next to the bytes hashed into it.
pub async fn keep_trimmed() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        trim_beyond(TRIM_SLACK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_anon() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() << 10
    }

    #[test]
    fn freed_gaps_between_live_buffers_are_handed_back_once_beyond_the_slack() {
        // The daemon's tunables: 1 MiB buffers on the heap, not mmapped.
        tune();
        // Every other one freed: the heap's top stays in use, so glibc's own
        // trim at free() cannot release the gaps.
        let mut bufs: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8 | 1; 1 << 20]).collect();
        for b in bufs.iter_mut().step_by(2) {
            *b = Vec::new();
        }
        assert!(free_bytes() > TRIM_SLACK, "the gaps count as free heap");
        let before = rss_anon();
        assert!(trim_beyond(TRIM_SLACK), "beyond the slack, the heap is trimmed");
        let after = rss_anon();
        // Other tests run alongside and allocate too: ask for half the gaps back.
        assert!(
            before.saturating_sub(after) >= 16 << 20,
            "RssAnon {before} -> {after}: the 32 MiB of gaps were not handed back"
        );
        assert!(bufs.iter().skip(1).step_by(2).all(|b| b.len() == 1 << 20));
    }

    #[test]
    fn a_heap_within_the_slack_is_left_alone() {
        assert!(!trim_beyond(u64::MAX));
    }
}
