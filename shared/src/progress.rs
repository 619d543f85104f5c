//! Progress of a build, as events: a step started, printed output, finished (or was served
//! from the cache), failed. The engine sends them; a front end (plain text, a live terminal
//! view, JSON lines) prints them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// One thing that happened in a build.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step starts: `[label n/m] text`.
    Started {
        /// Stage instance id in the plan.
        job: usize,
        /// `build` or `linux/arm64 build`.
        label: String,
        n: usize,
        m: usize,
        text: String,
    },
    /// Output of a running step, as it arrived (not necessarily whole lines).
    Output { job: usize, n: usize, data: String },
    /// The step's result came from the cache; nothing ran.
    Cached { job: usize, n: usize },
    /// The step finished.
    Done {
        job: usize,
        n: usize,
        #[serde(serialize_with = "secs", deserialize_with = "from_secs")]
        elapsed: Duration,
    },
    /// The step failed with this message.
    Failed {
        job: usize,
        n: usize,
        message: String,
    },
    /// A line about the build as a whole (exporting, pushing).
    Note { text: String },
}

fn from_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Ok(Duration::try_from_secs_f64(secs).unwrap_or_default())
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Where the engine sends events; cloning shares the channel. Sending never blocks and never
/// fails the build: a front end that went away just stops receiving.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Progress {
    /// A sink and the receiver of its events.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Progress { tx: Some(tx) }, rx)
    }

    /// A sink that drops everything.
    pub fn discard() -> Self {
        Progress { tx: None }
    }

    pub fn send(&self, e: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(e);
        }
    }
}
