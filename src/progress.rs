//! Progress of a command, told once and shown two ways. Every phase start
//! and end is a log event (target [`TARGET`], fields `phase` and `event`,
//! figures such as `rows`, `bytes`, `rows_per_s`), and the same calls drive
//! what `--progress` shows: a bar with totals, rate and ETA when stderr is a
//! terminal, or, when it is not (`--progress on` under a scheduler), a
//! progress log line every `--progress-interval`.
//!
//! This module only reports: it must never decide anything, never write to
//! stdout, and never let a message out that did not pass through
//! [`crate::redact::line`] (log lines pass through it in [`crate::log`]).

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cli::Progress;
use crate::human;

/// The target of every phase and progress event: `BACKFILL_LOG` can name
/// it (`event_backfill::progress=off`), and `--progress on` lets it through
/// whatever the level.
pub const TARGET: &str = "event_backfill::progress";

/// How often a progress line is logged when stderr is not a terminal.
static INTERVAL: OnceLock<Duration> = OnceLock::new();

/// The bar being drawn, for the log writer to clear around its lines.
static DRAWN: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Set once by `main` from `--progress-interval`.
pub fn configure(interval: Duration) {
    let _ = INTERVAL.set(interval);
}

fn interval() -> Duration {
    INTERVAL.get().copied().unwrap_or(Duration::from_secs(10))
}

/// Run `write` with the progress bar (if one is drawn) cleared, so that a
/// log line lands above the bar instead of through it.
pub fn suspend<R>(write: impl FnOnce() -> R) -> R {
    let bar = DRAWN.lock().ok().and_then(|b| b.clone());
    match bar {
        Some(b) => b.suspend(write),
        None => write(),
    }
}

/// Whether `--progress` asks for progress with stderr as it is.
pub fn wanted(progress: Progress) -> bool {
    use std::io::IsTerminal;
    match progress {
        Progress::On => true,
        Progress::Off => false,
        Progress::Auto => std::io::stderr().is_terminal(),
    }
}

/// The figures a phase ends with; what is None is not logged.
#[derive(Debug, Default, Clone)]
pub struct Figures<'a> {
    pub files: Option<u64>,
    pub files_pruned: Option<u64>,
    pub bytes: Option<u64>,
    pub rows: Option<u64>,
    pub events: Option<u64>,
    pub replayed: Option<u64>,
    pub dead_lettered: Option<u64>,
    pub gaps: Option<u64>,
    pub missing_events: Option<u64>,
    pub conflicts: Option<u64>,
    pub spilled_bytes: Option<u64>,
    /// The sink kind a write phase is about (`replay`, `dlq`, `gaps`).
    pub sink: Option<&'a str>,
    /// Where it went (redacted by the log writer like every line).
    pub location: Option<&'a str>,
    /// The commit log position.
    pub seq: Option<u64>,
}

/// Log the end of `phase` after `elapsed`, with its figures and a rate
/// when it counted rows.
pub fn finished(phase: &str, elapsed: Duration, figures: &Figures<'_>, message: &str) {
    let f = figures;
    let rows_per_s = f.rows.and_then(|r| human::per_second(r, elapsed));
    tracing::info!(
        target: TARGET,
        event = "end",
        phase,
        elapsed_ms = elapsed.as_millis() as u64,
        files = f.files,
        files_pruned = f.files_pruned,
        bytes = f.bytes,
        rows = f.rows,
        rows_per_s,
        events = f.events,
        replayed = f.replayed,
        dead_lettered = f.dead_lettered,
        gaps = f.gaps,
        missing_events = f.missing_events,
        conflicts = f.conflicts,
        spilled_bytes = f.spilled_bytes,
        sink = f.sink,
        location = f.location,
        seq = f.seq,
        "{message}"
    );
}

/// The short name a phase's message stands for, the `phase` field of its
/// events. A message this list does not know names itself.
fn phase_of(head: &str) -> &str {
    match head {
        "reading state" => "state",
        "listing the archive" => "list",
        "scanning the archive" => "scan",
        "writing gaps" => "gaps",
        "deciding" => "decide",
        "dead-lettering undecodable Kafka messages" => "undecodable",
        "flushing outputs" => "write",
        "committing" => "commit",
        "publishing outputs" => "publish",
        "aborting" => "abort",
        h if h.starts_with("checking the ") => "check",
        h => h,
    }
}

/// A command's phases: start events, and the bar or the progress lines.
pub struct Phases {
    shared: Arc<Shared>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    /// Drawn on a terminal; hidden (counting only) for progress lines.
    bar: Option<indicatif::ProgressBar>,
    now: Mutex<Now>,
    stopped: Mutex<bool>,
    wake: Condvar,
}

#[derive(Default)]
struct Now {
    /// The message up to its first `:`; a new one starts a phase.
    head: String,
    phase: String,
    message: String,
    started: Option<Instant>,
    /// The bar counts rows (the scan), rather than spinning.
    counting: bool,
}

impl Phases {
    /// Progress as `progress` asks: a bar on a terminal, progress lines
    /// every `--progress-interval` when `on` and stderr is not one, nothing
    /// but the phase events otherwise.
    pub fn new(progress: Progress) -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let bar = wanted(progress).then(|| {
            if terminal {
                let b = indicatif::ProgressBar::new_spinner();
                b.enable_steady_tick(Duration::from_millis(120));
                if let Ok(mut d) = DRAWN.lock() {
                    *d = Some(b.clone());
                }
                b
            } else {
                indicatif::ProgressBar::hidden()
            }
        });
        let lines = bar.is_some() && !terminal;
        let shared = Arc::new(Shared {
            bar,
            now: Mutex::new(Now::default()),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
        });
        let ticker = lines.then(|| {
            let s = shared.clone();
            std::thread::spawn(move || s.tick_until_stopped())
        });
        Phases { shared, ticker }
    }

    /// Enter a phase, or update the current one: a message whose text up
    /// to its first `:` differs from the last starts a phase (a log event);
    /// `deciding: 5 replayed` only updates what the bar shows.
    pub fn set(&self, msg: impl Into<String>) {
        let msg = crate::redact::line(&msg.into());
        let head = msg.split(':').next().unwrap_or_default().trim().to_string();
        if let Ok(mut now) = self.shared.now.lock() {
            if now.head != head {
                let phase = phase_of(&head).to_string();
                tracing::info!(target: TARGET, event = "start", phase = phase.as_str(), "{msg}");
                now.phase = phase;
                now.head = head;
                now.started = Some(Instant::now());
            }
            now.message = msg.clone();
            now.counting = false;
        }
        if let Some(b) = &self.shared.bar {
            if b.length().is_some() {
                b.set_style(indicatif::ProgressStyle::default_spinner());
                b.unset_length();
            }
            b.set_message(msg);
        }
    }

    /// The scan as a bar over the rows the footers announce, with rate and
    /// ETA; None when progress is off. [`Phases::set`] after it turns the
    /// line back into a spinner. Off a terminal the bar is hidden and only
    /// counts, for the progress lines.
    pub fn rows_bar(&self, total: u64) -> Option<indicatif::ProgressBar> {
        let b = self.shared.bar.as_ref()?;
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {human_pos}/{human_len} rows, {rate}, ETA {eta}",
        ) {
            // indicatif's own {per_sec} prints four decimals of a rate.
            let style = style.with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{} rows/s", human::count(s.per_sec() as u64));
                },
            );
            b.set_style(style.progress_chars("=> "));
        }
        b.set_length(total);
        b.set_position(0);
        b.reset_eta();
        if let Ok(mut now) = self.shared.now.lock() {
            now.counting = true;
        }
        Some(b.clone())
    }

    /// Stop drawing (and logging progress lines).
    pub fn done(&self) {
        if let Ok(mut s) = self.shared.stopped.lock() {
            *s = true;
        }
        self.shared.wake.notify_all();
        if let Some(b) = &self.shared.bar {
            b.finish_and_clear();
        }
        if let Ok(mut d) = DRAWN.lock() {
            *d = None;
        }
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        self.done();
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn tick_until_stopped(&self) {
        let every = interval();
        let Ok(mut stopped) = self.stopped.lock() else {
            return;
        };
        loop {
            let Ok((s, _)) = self.wake.wait_timeout(stopped, every) else {
                return;
            };
            stopped = s;
            if *stopped {
                return;
            }
            self.progress_line();
        }
    }

    /// One progress line: the rows so far against the total, the rate and
    /// the ETA while the scan counts; the phase and its time otherwise.
    fn progress_line(&self) {
        let Ok(now) = self.now.lock() else { return };
        let Some(started) = now.started else { return };
        let elapsed = started.elapsed();
        let elapsed_ms = elapsed.as_millis() as u64;
        let phase = now.phase.as_str();
        match (&self.bar, now.counting) {
            (Some(b), true) => {
                let pos = b.position();
                let total = b.length().unwrap_or(0);
                let rate = human::per_second(pos, elapsed);
                let eta_s = rate
                    .filter(|r| *r > 0 && total > pos)
                    .map(|r| (total - pos).div_ceil(r));
                let pct = (pos * 100).checked_div(total).unwrap_or(100);
                let mut msg = format!(
                    "{}: {}/{} rows ({pct} %)",
                    now.message,
                    human::count(pos),
                    human::count(total)
                );
                if let Some(r) = rate {
                    msg.push_str(&format!(", {} rows/s", human::count(r)));
                }
                if let Some(e) = eta_s {
                    msg.push_str(&format!(
                        ", ETA {}",
                        human::duration(Duration::from_secs(e))
                    ));
                }
                tracing::info!(
                    target: TARGET,
                    event = "progress",
                    phase,
                    rows = pos,
                    total_rows = total,
                    rows_per_s = rate,
                    eta_s,
                    elapsed_ms,
                    "{msg}"
                );
            }
            _ => {
                tracing::info!(
                    target: TARGET,
                    event = "progress",
                    phase,
                    elapsed_ms,
                    "{} ({} so far)",
                    now.message,
                    human::duration(elapsed)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_named_by_their_message() {
        assert_eq!(phase_of("listing the archive"), "list");
        assert_eq!(phase_of("checking the dlq sink"), "check");
        assert_eq!(phase_of("deciding"), "decide");
        assert_eq!(phase_of("something new"), "something new");
    }

    /// Off, nothing is drawn or counted and `rows_bar` hands out nothing.
    #[test]
    fn off_means_no_bar() {
        let p = Phases::new(Progress::Off);
        p.set("scanning the archive");
        assert!(p.rows_bar(10).is_none());
        p.done();
    }
}
