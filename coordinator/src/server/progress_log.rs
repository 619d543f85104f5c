//! The progress of the builds this coordinator led, kept in memory for their watchers. Each
//! build's step output is bounded: past [`MAX_OUTPUT_BYTES`] the output is no longer kept
//! (one note says so), while the events that tell where the build is still are.

use std::collections::HashMap;

use strata_shared::progress::Event;

/// Step output kept per build for its watchers.
pub(super) const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// Progress events by build.
#[derive(Debug, Default)]
pub(super) struct ProgressLog {
    builds: HashMap<u64, BuildLog>,
}

#[derive(Debug, Default)]
struct BuildLog {
    events: Vec<Event>,
    output_bytes: usize,
    truncated: bool,
}

impl ProgressLog {
    /// Keeps one event of `build`, unless it is output past the bound.
    pub(super) fn push(&mut self, build: u64, event: Event) {
        let log = self.builds.entry(build).or_default();
        if let Event::Output { data, .. } = &event {
            if log.output_bytes + data.len() > MAX_OUTPUT_BYTES {
                if !log.truncated {
                    log.truncated = true;
                    let note = Event::Note {
                        text: format!(
                            "output past {} MiB is not kept for watchers; the build goes on",
                            MAX_OUTPUT_BYTES >> 20
                        ),
                    };
                    log.events.push(note);
                }
                return;
            }
            log.output_bytes += data.len();
        }
        log.events.push(event);
    }

    /// The events of `build` from sequence number `from`, with their numbers.
    pub(super) fn since(&self, build: u64, from: u64) -> Vec<(u64, Event)> {
        self.builds
            .get(&build)
            .map(|log| {
                log.events
                    .iter()
                    .enumerate()
                    .skip(usize::try_from(from).unwrap_or(usize::MAX))
                    .map(|(i, e)| (i as u64, e.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The builds with kept events.
    pub(super) fn builds(&self) -> Vec<u64> {
        self.builds.keys().copied().collect()
    }

    pub(super) fn forget(&mut self, build: u64) {
        self.builds.remove(&build);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_bound_is_dropped_once_noted_and_the_rest_kept() {
        let mut log = ProgressLog::default();
        let chunk = "x".repeat(MAX_OUTPUT_BYTES / 2);
        let output = |data: &str| Event::Output {
            job: 0,
            n: 1,
            data: data.into(),
        };
        log.push(7, output(&chunk));
        log.push(7, output(&chunk));
        log.push(7, output("one byte too many"));
        log.push(7, output("and more"));
        let done = Event::Note {
            text: "stage done".into(),
        };
        log.push(7, done.clone());
        let kept = log.since(7, 0);
        assert_eq!(kept.len(), 4, "two chunks, one note, and the last event");
        let Event::Note { text } = &kept[2].1 else {
            panic!("{:?}", kept[2]);
        };
        assert!(text.contains("output past 16 MiB is not kept"), "{text}");
        assert_eq!(kept[3], (3, done));
        assert_eq!(log.since(7, 3).len(), 1);
        assert!(log.since(8, 0).is_empty() && log.since(7, u64::MAX).is_empty());
        assert_eq!(log.builds(), [7]);
        log.forget(7);
        assert!(log.builds().is_empty());
    }
}
