//! raft-rs logs through `slog`; this bridges its records to `tracing` (target `strata::raft`),
//! so the coordinator has one log pipeline. raft-rs's key-value pairs (`raft_id`, `term`, ...)
//! are appended to the message as `key=value`, formatted only when the event is enabled.

use std::fmt;

use slog::{Drain, KV, Level, OwnedKVList, Record};

/// A `slog::Logger` whose records go to `tracing`.
pub(crate) fn tracing_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}

/// The drain: maps slog levels to tracing levels (critical and error to ERROR, warning to WARN,
/// info to INFO, debug to DEBUG, trace to TRACE).
struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let line = Line { record, values };
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "strata::raft", "{line}"),
            Level::Warning => tracing::warn!(target: "strata::raft", "{line}"),
            Level::Info => tracing::info!(target: "strata::raft", "{line}"),
            Level::Debug => tracing::debug!(target: "strata::raft", "{line}"),
            Level::Trace => tracing::trace!(target: "strata::raft", "{line}"),
        }
        Ok(())
    }
}

/// One record, formatted lazily: the message, then the record's and the logger's pairs.
struct Line<'a> {
    record: &'a Record<'a>,
    values: &'a OwnedKVList,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.record.msg())?;
        let mut pairs = Pairs { f, failed: false };
        // slog's serializer reports errors of its own type; a formatting failure is recorded
        // and returned as fmt::Error.
        let _ = self.record.kv().serialize(self.record, &mut pairs);
        let _ = self.values.serialize(self.record, &mut pairs);
        if pairs.failed {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

struct Pairs<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    failed: bool,
}

impl slog::Serializer for Pairs<'_, '_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        if write!(self.f, " {key}={val}").is_err() {
            self.failed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_format_message_and_pairs() {
        // No subscriber is needed to exercise the drain; formatting is checked directly.
        let logger = tracing_logger().new(slog::o!("raft_id" => 7u64));
        slog::info!(logger, "became leader"; "term" => 3u64);

        struct Capture(std::sync::Mutex<Vec<String>>);
        impl Drain for &Capture {
            type Ok = ();
            type Err = slog::Never;
            fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
                let line = Line { record, values };
                self.0.lock().unwrap().push(line.to_string());
                Ok(())
            }
        }
        let capture: &'static Capture = Box::leak(Box::new(Capture(Default::default())));
        let logger = slog::Logger::root(capture.fuse(), slog::o!("raft_id" => 7u64));
        slog::info!(logger, "became leader"; "term" => 3u64);
        let lines = capture.0.lock().unwrap().clone();
        assert_eq!(lines, vec!["became leader term=3 raft_id=7".to_string()]);
    }
}
