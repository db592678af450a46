//! The binary's log: formatted lines on stderr, filtered by `RUST_LOG`
//! (default `info`), without fuser's error line for a reply the kernel no
//! longer waits for.
//!
//! fuser answers every FUSE_INTERRUPT (a signal to a process inside a FUSE
//! call: runc and the shims are Go programs, whose runtime signals its threads
//! all the time) with ENOSYS. When the interrupted call was answered first,
//! the kernel finds no request for that ENOSYS and the write fails with
//! ENOENT; fuser logs it as an error. Nothing was lost, and a few such lines
//! per container start would teach operators to ignore errors.

use std::fmt::Debug;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The line fuser logs when the kernel refuses a reply with ENOENT.
const STALE_REPLY: &str = "Failed to send FUSE reply: No such file or directory";

/// Installs the binary's subscriber (also for the `log` records of fuser).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(StaleReplies)
        .init();
}

/// Drops fuser's error for a reply to a request the kernel no longer waits for.
pub struct StaleReplies;

impl<S: Subscriber> Layer<S> for StaleReplies {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        !is_stale_reply(event)
    }
}

fn is_stale_reply(event: &Event<'_>) -> bool {
    if *event.metadata().level() != Level::ERROR {
        return false;
    }
    let mut fields = Fields::default();
    event.record(&mut fields);
    // Records of the `log` crate carry their target as a field.
    let target = fields.log_target.as_deref().unwrap_or(event.metadata().target());
    target.starts_with("fuser") && fields.message.starts_with(STALE_REPLY)
}

#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;

    /// Messages of the events that reached the subscriber's output.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut fields = Fields::default();
            event.record(&mut fields);
            self.0.lock().push(fields.message);
        }
    }

    /// Sends `line` as fuser does (a `log` record at `level`, target `fuser::reply`).
    fn seen_of_fuser_line(level: log::Level, line: &str) -> Vec<String> {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone()).with(StaleReplies);
        tracing::subscriber::with_default(subscriber, || {
            // `format_args!` lives only to the end of its statement.
            tracing_log::format_trace(
                &log::Record::builder()
                    .level(level)
                    .target("fuser::reply")
                    .module_path_static(Some("fuser::reply"))
                    .args(format_args!("{line}"))
                    .build(),
            )
            .unwrap();
        });
        let lines = seen.0.lock().clone();
        lines
    }

    #[test]
    fn a_reply_the_kernel_no_longer_waits_for_is_not_logged() {
        let line = "Failed to send FUSE reply: No such file or directory (os error 2)";
        assert_eq!(seen_of_fuser_line(log::Level::Error, line), Vec::<String>::new());
    }

    #[test]
    fn other_failed_replies_are_still_logged() {
        let line = "Failed to send FUSE reply: No such device (os error 19)";
        assert_eq!(seen_of_fuser_line(log::Level::Error, line), vec![line.to_string()]);
    }

    #[test]
    fn the_same_words_from_another_target_are_still_logged() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone()).with(StaleReplies);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "streamsnap::fs", "{STALE_REPLY} (os error 2)");
        });
        assert_eq!(seen.0.lock().len(), 1);
    }
}
