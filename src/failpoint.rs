//! Named crash points at the step boundaries of a run, for the crash
//! harness in the test suite. Compiled to nothing unless the `failpoints`
//! feature is on (`make test` turns it on; release builds never have it).
//!
//! `BACKFILL_FAILPOINT=NAME[:ACTION][@N][,...]` arms a point; ACTION is
//! `crash` (the default: the process aborts on the spot, no destructor runs
//! and nothing is flushed, as under `kill -9`), `error` (the step fails with
//! an error, as a store that answers 500 would) or `sleep-MS` (the step
//! pauses, to line up two runs). `@N` fires on the Nth hit only (default 1).
//! The points are listed in [`POINTS`]; the harness crashes at every one.

use crate::error::Error;

/// Every point a run passes, in order. The harness iterates over this list,
/// so a point added in the code and not here is never tested.
pub const POINTS: &[&str] = &[
    "after_attempt_record",
    "after_write",
    "after_finish",
    "after_ledger",
    "after_prepare",
    "after_precommit",
    "before_commit",
    "after_commit",
    "publish_file",
    "after_publish",
    "after_published_marker",
];

/// Pass the point `name`: nothing happens unless it is armed.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn hit(_name: &str) -> Result<(), Error> {
    Ok(())
}

#[cfg(feature = "failpoints")]
pub async fn hit(name: &str) -> Result<(), Error> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let Ok(spec) = std::env::var("BACKFILL_FAILPOINT") else {
        return Ok(());
    };
    for armed in spec.split(',') {
        // NAME[:ACTION][@N]
        let (armed, nth) = match armed.rsplit_once('@') {
            Some((a, n)) => (a, n.parse::<u64>().unwrap_or(1)),
            None => (armed, 1),
        };
        let (point, action) = armed.split_once(':').unwrap_or((armed, "crash"));
        if point != name {
            continue;
        }
        let count = {
            let mut g = HITS.lock().unwrap_or_else(|p| p.into_inner());
            let m = g.get_or_insert_with(HashMap::new);
            let c = m.entry(name.to_string()).or_insert(0);
            *c += 1;
            *c
        };
        if count != nth {
            continue;
        }
        match action {
            "crash" => {
                eprintln!("failpoint {name}: crash");
                std::process::abort();
            }
            "error" => return Err(Error::Internal(format!("failpoint {name}: injected error"))),
            a => {
                if let Some(ms) = a.strip_prefix("sleep-").and_then(|m| m.parse().ok()) {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
            }
        }
    }
    Ok(())
}
