//! Progress of long one-shot work (`streamsnap index`, `streamsnap pull`): a
//! bar per layer on stderr when it is a terminal; nothing otherwise (logs,
//! CI, tests), and nothing for library callers that do not ask.

use crate::digest::Digest;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes; cheap to clone (bars of one command share it).
#[derive(Clone)]
pub struct Progress(MultiProgress);

impl Default for Progress {
    /// Shown nowhere.
    fn default() -> Self {
        Self(MultiProgress::with_draw_target(ProgressDrawTarget::hidden()))
    }
}

impl Progress {
    /// On stderr, drawn only when it is a terminal.
    pub fn stderr() -> Self {
        Self(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
    }

    /// Erases the bars (before the command prints its report).
    pub fn clear(&self) {
        let _ = self.0.clear();
    }

    /// Work on one layer, named `sha256:` and 12 hex digits.
    pub fn layer(&self, digest: &Digest, total: u64) -> Task {
        self.task(&format!("sha256:{}", &digest.hex()[..12]), total)
    }

    /// One piece of work: `total` bytes (0: unknown), named by `what`.
    pub fn task(&self, what: &str, total: u64) -> Task {
        let bar = if total > 0 {
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{msg:28} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12}",
                )
                .expect("static template")
                .progress_chars("=> "),
            )
        } else {
            ProgressBar::new_spinner()
                .with_style(ProgressStyle::with_template("{msg:28} {spinner} {elapsed}").expect("static template"))
        };
        Task(self.0.add(bar.with_message(what.to_string())))
    }
}

/// A bar; it stays on screen with its final message when finished.
pub struct Task(ProgressBar);

impl Task {
    pub fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    pub fn finish(&self, message: &str) {
        let msg = format!("{} {message}", self.0.message());
        self.0
            .set_style(ProgressStyle::with_template("{msg}").expect("static template"));
        self.0.finish_with_message(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_progress_counts_without_drawing() {
        let p = Progress::default();
        let t = p.task("sha256:0123456789ab", 100);
        t.advance(40);
        assert_eq!(t.0.position(), 40);
        t.finish("indexed");
        assert!(t.0.is_finished());
        assert_eq!(t.0.message(), "sha256:0123456789ab indexed");
    }
}
