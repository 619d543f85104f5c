//! Printing build progress on standard error: `plain` (BuildKit's numbered lines), `tty` (a
//! live view of the running steps above the finished ones) and `rawjson` (one JSON event per
//! line).

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use strata_shared::progress::Event;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `tty` on a terminal, `plain` otherwise.
    Auto,
    Plain,
    Tty,
    Rawjson,
}

impl Mode {
    pub fn resolve(self) -> Mode {
        match self {
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Tty,
            Mode::Auto => Mode::Plain,
            m => m,
        }
    }
}

/// One step as the printers track it.
struct Step {
    number: usize,
    title: String,
    started: Instant,
    /// Output not yet ending in a newline.
    partial: String,
    /// The last complete output line (tty view).
    last_line: String,
}

/// Numbers steps in the order they start, as BuildKit's `#N`.
#[derive(Default)]
struct Steps {
    by_key: HashMap<(usize, usize), Step>,
    next: usize,
}

impl Steps {
    fn start(&mut self, job: usize, n: usize, title: String) -> usize {
        self.next += 1;
        self.by_key.insert(
            (job, n),
            Step {
                number: self.next,
                title,
                started: Instant::now(),
                partial: String::new(),
                last_line: String::new(),
            },
        );
        self.next
    }
}

fn title(label: &str, n: usize, m: usize, text: &str) -> String {
    format!("[{label} {n}/{m}] {text}")
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Prints events until the channel closes.
pub async fn print(mode: Mode, mut rx: UnboundedReceiver<Event>) {
    match mode.resolve() {
        Mode::Rawjson => {
            while let Some(e) = rx.recv().await {
                if let Ok(line) = serde_json::to_string(&e) {
                    eprintln!("{line}");
                }
            }
        }
        Mode::Tty => tty(rx).await,
        _ => {
            let mut steps = Steps::default();
            while let Some(e) = rx.recv().await {
                let _ = plain_event(&mut steps, &e, &mut std::io::stderr().lock());
            }
        }
    }
}

/// The plain form of one event.
fn plain_event(steps: &mut Steps, e: &Event, out: &mut dyn Write) -> std::io::Result<()> {
    match e {
        Event::Started {
            job,
            label,
            n,
            m,
            text,
        } => {
            let t = title(label, *n, *m, text);
            let k = steps.start(*job, *n, t.clone());
            writeln!(out, "#{k} {t}")
        }
        Event::Output { job, n, data } => {
            let Some(s) = steps.by_key.get_mut(&(*job, *n)) else {
                return Ok(());
            };
            s.partial.push_str(data);
            let elapsed = s.started.elapsed().as_secs_f64();
            while let Some(i) = s.partial.find('\n') {
                let line: String = s.partial.drain(..=i).collect();
                writeln!(
                    out,
                    "#{} {elapsed:.3} {}",
                    s.number,
                    line.trim_end_matches(['\n', '\r'])
                )?;
            }
            Ok(())
        }
        Event::Cached { job, n } => match steps.by_key.remove(&(*job, *n)) {
            Some(s) => writeln!(out, "#{} CACHED", s.number),
            None => Ok(()),
        },
        Event::Done { job, n, elapsed } => match steps.by_key.remove(&(*job, *n)) {
            Some(s) => {
                if !s.partial.is_empty() {
                    writeln!(
                        out,
                        "#{} {:.3} {}",
                        s.number,
                        elapsed.as_secs_f64(),
                        s.partial
                    )?;
                }
                writeln!(out, "#{} DONE {}", s.number, secs(*elapsed))
            }
            None => Ok(()),
        },
        Event::Failed { job, n, message } => match steps.by_key.remove(&(*job, *n)) {
            Some(s) => writeln!(
                out,
                "#{} ERROR: {}",
                s.number,
                message.lines().next().unwrap_or("")
            ),
            None => writeln!(out, "ERROR: {message}"),
        },
        Event::Note { text } => writeln!(out, "{text}"),
    }
}

/// The live view: finished steps scroll above, running steps are redrawn below them.
async fn tty(mut rx: UnboundedReceiver<Event>) {
    let mut steps = Steps::default();
    let mut drawn = 0usize;
    let begun = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(120));
    loop {
        let mut finished: Vec<String> = Vec::new();
        tokio::select! {
            e = rx.recv() => {
                let Some(e) = e else { break };
                tty_event(&mut steps, e, &mut finished);
                while let Ok(e) = rx.try_recv() {
                    tty_event(&mut steps, e, &mut finished);
                }
            }
            _ = tick.tick() => {}
        }
        let mut err = std::io::stderr().lock();
        if drawn > 0 {
            let _ = write!(err, "\x1b[{drawn}A\x1b[J");
        }
        for line in &finished {
            let _ = writeln!(err, "{line}");
        }
        let running: BTreeMap<usize, &Step> =
            steps.by_key.values().map(|s| (s.number, s)).collect();
        let width = terminal_width();
        let mut lines = vec![format!("building {}", secs(begun.elapsed()))];
        for s in running.values() {
            lines.push(fit(
                &format!(" => {} {}", s.title, secs(s.started.elapsed())),
                width,
            ));
            if !s.last_line.is_empty() {
                lines.push(fit(&format!("    {}", s.last_line), width));
            }
        }
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        drawn = lines.len();
        let _ = err.flush();
    }
    let mut err = std::io::stderr().lock();
    if drawn > 0 {
        let _ = write!(err, "\x1b[{drawn}A\x1b[J");
    }
    let _ = writeln!(err, "finished in {}", secs(begun.elapsed()));
}

fn tty_event(steps: &mut Steps, e: Event, finished: &mut Vec<String>) {
    match e {
        Event::Started {
            job,
            label,
            n,
            m,
            text,
        } => {
            steps.start(job, n, title(&label, n, m, &text));
        }
        Event::Output { job, n, data } => {
            if let Some(s) = steps.by_key.get_mut(&(job, n)) {
                s.partial.push_str(&data);
                if let Some(i) = s.partial.rfind('\n') {
                    let complete: String = s.partial.drain(..=i).collect();
                    if let Some(last) = complete.lines().rev().find(|l| !l.trim().is_empty()) {
                        s.last_line = last.to_string();
                    }
                }
            }
        }
        Event::Cached { job, n } => {
            if let Some(s) = steps.by_key.remove(&(job, n)) {
                finished.push(format!(" => CACHED {}", s.title));
            }
        }
        Event::Done { job, n, elapsed } => {
            if let Some(s) = steps.by_key.remove(&(job, n)) {
                finished.push(format!(" => {} {}", s.title, secs(elapsed)));
            }
        }
        Event::Failed { job, n, message } => {
            let first = message.lines().next().unwrap_or("").to_string();
            match steps.by_key.remove(&(job, n)) {
                Some(s) => finished.push(format!(" => ERROR {}: {first}", s.title)),
                None => finished.push(format!(" => ERROR {first}")),
            }
        }
        Event::Note { text } => finished.push(format!(" => {text}")),
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}

/// Cuts a line to the terminal's width, on a character boundary.
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    line.chars()
        .take(width.saturating_sub(1))
        .collect::<String>()
        + "…"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_steps_and_prints_output_lines() {
        let mut steps = Steps::default();
        let mut out = Vec::new();
        let events = [
            Event::Started {
                job: 0,
                label: "build".into(),
                n: 2,
                m: 3,
                text: "RUN make".into(),
            },
            Event::Output {
                job: 0,
                n: 2,
                data: "cc -o app\nlin".into(),
            },
            Event::Output {
                job: 0,
                n: 2,
                data: "ked\n".into(),
            },
            Event::Done {
                job: 0,
                n: 2,
                elapsed: Duration::from_millis(420),
            },
            Event::Started {
                job: 1,
                label: "base".into(),
                n: 1,
                m: 1,
                text: "FROM busybox".into(),
            },
            Event::Cached { job: 1, n: 1 },
        ];
        for e in &events {
            plain_event(&mut steps, e, &mut out).unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "#1 [build 2/3] RUN make");
        assert!(
            lines[1].starts_with("#1 ") && lines[1].ends_with(" cc -o app"),
            "{text}"
        );
        assert!(lines[2].ends_with(" linked"), "{text}");
        assert_eq!(lines[3], "#1 DONE 0.4s");
        assert_eq!(lines[4], "#2 [base 1/1] FROM busybox");
        assert_eq!(lines[5], "#2 CACHED");
    }

    #[test]
    fn fit_cuts_on_char_boundaries() {
        assert_eq!(fit("héllo", 10), "héllo");
        assert_eq!(fit("héllo wörld", 5), "héll…");
    }
}
