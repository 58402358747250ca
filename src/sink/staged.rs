//! The staging protocol of file sinks: how an attempt names what it writes
//! before its commit, and how a committed attempt's files reach their final
//! names — by the run that wrote them, or, after a crash, by any later run
//! or `backfill state gc` (roll-forward).
//!
//! ```text
//! <base>/_staging/run_id=<RUN>/<NONCE>/part-00000.parquet.staged   before the commit
//! <base>/run_id=<RUN>/part-00000-<NONCE>.parquet                   after it
//! ```
//! Staged files live in an `_`-prefixed folder (skipped by Spark, Hive and
//! our own listing) and do not end in `.parquet` (so a DuckDB or Polars glob
//! `**/*.parquet` does not match them either). Final names carry the nonce of
//! the attempt that committed, so a file in a committed run's folder can
//! always be traced to the manifest that lists it, and no attempt can ever
//! overwrite another's file. This module must never make a file final for an
//! attempt that is not committed: callers promote only what a committed log
//! entry lists.

use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::location::{Location, store_error_line};

/// The folder below a sink's base that holds every attempt's staged files.
pub const STAGING_DIR: &str = "_staging";

/// One output file of a committed attempt, relative to its sink's base.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagedFile {
    /// Where the attempt wrote it (invisible to readers).
    pub staged: String,
    /// Its final name (visible once promoted).
    pub published: String,
}

/// What one sink of a committed run must make visible: recorded in the
/// run's log entry so that a later process can finish the job.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Publication {
    /// `replay`, `dlq` or `gaps`.
    pub kind: String,
    /// The sink's base as a resolvable location: an absolute path or a URL
    /// without credentials.
    pub target: String,
    pub files: Vec<StagedFile>,
}

/// The staging folder of one attempt, relative to the sink's base.
pub fn attempt_dir(run_id: &str, nonce: &str) -> String {
    format!("{STAGING_DIR}/run_id={run_id}/{nonce}")
}

/// Names of part `n` of an attempt: (staged, final), relative to the base.
pub fn part_names(run_id: &str, nonce: &str, n: usize) -> StagedFile {
    StagedFile {
        staged: format!("{}/part-{n:05}.parquet.staged", attempt_dir(run_id, nonce)),
        published: format!("run_id={run_id}/part-{n:05}-{nonce}.parquet"),
    }
}

/// Make staged files final. Idempotent: a file already at its final name
/// (promoted by an earlier, interrupted call or by a concurrent roll-forward)
/// is left as it is. Returns an error naming the file when a staged file is
/// neither at its staged nor at its final name: that output is lost, and
/// saying so is the only honest answer.
pub async fn promote(base: &Location, files: &[StagedFile]) -> Result<(), PromoteError> {
    // Every file is tried, whatever happened to one before it: one lost file
    // must not keep the others of a committed run staged forever.
    let mut errors = vec![];
    let mut lost = vec![];
    for f in files {
        if let Err(e) = crate::failpoint::hit("publish_file").await {
            errors.push(e.to_string());
            break;
        }
        let from = base.path(&f.staged);
        let to = base.path(&f.published);
        match base.store.rename(&from, &to).await {
            Ok(()) => {
                if let Err(e) = sync_local(base, &to) {
                    errors.push(e);
                }
            }
            Err(object_store::Error::NotFound { .. }) => match base.store.head(&to).await {
                Ok(_) => {}
                Err(e) => lost.push(format!(
                    "{} is neither staged nor published ({})",
                    base.display_path(&to),
                    store_error_line(&e)
                )),
            },
            Err(e) => errors.push(format!(
                "rename {} to its final name: {}",
                base.display_path(&from),
                store_error_line(&e)
            )),
        }
    }
    remove_empty_dirs(base, files);
    if errors.is_empty() && lost.is_empty() {
        Ok(())
    } else {
        Err(PromoteError { lost, errors })
    }
}

/// What `promote` could not do: files that are gone for good, and failures
/// a later try may get past.
#[derive(Debug)]
pub struct PromoteError {
    pub lost: Vec<String>,
    pub errors: Vec<String>,
}

impl std::fmt::Display for PromoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<&str> = self
            .errors
            .iter()
            .chain(&self.lost)
            .map(String::as_str)
            .collect();
        f.write_str(&all.join("; "))
    }
}

/// On local disk, make a file and its folder's entry durable: object_store's
/// local store renames without fsync, and a manifest must never name a file
/// that a power cut can take back. Nothing to do elsewhere (object stores are
/// durable once they answer). The one place this crate touches `std::fs` for
/// data, and only for its durability.
pub fn sync_local(base: &Location, path: &object_store::path::Path) -> Result<(), String> {
    if !base.is_local {
        return Ok(());
    }
    let p = std::path::PathBuf::from(format!("/{path}"));
    let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(&p).map_err(|e| format!("fsync {}: {e}", p.display()))?;
    if let Some(dir) = p.parent() {
        sync(dir).map_err(|e| format!("fsync {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// On local disk, folders outlive the files moved out of them: remove the
/// now-empty staging folders of these files (never one that still holds a
/// file). Object stores have no folders, so there is nothing to do there.
pub fn remove_empty_dirs(base: &Location, files: &[StagedFile]) {
    if !base.is_local {
        return;
    }
    let root = std::path::PathBuf::from(format!("/{}", base.prefix));
    let mut dirs: Vec<std::path::PathBuf> = vec![];
    for f in files {
        let mut p = root.join(&f.staged);
        while p.pop() && p.starts_with(&root) && p != root {
            if !dirs.contains(&p) {
                dirs.push(p.clone());
            }
        }
    }
    // Deepest first; remove_dir fails on a non-empty folder, as wanted.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_are_hidden_and_final_names_carry_the_attempt() {
        let f = part_names("r1", "n1", 3);
        assert!(f.staged.starts_with("_staging/"));
        assert!(!f.staged.ends_with(".parquet"));
        assert_eq!(f.published, "run_id=r1/part-00003-n1.parquet");
    }

    #[tokio::test]
    async fn promote_is_idempotent_and_names_a_lost_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = crate::location::resolve(
            dir.path().to_str().unwrap(),
            &crate::location::StorageSettings::default(),
        )
        .unwrap();
        let f = part_names("r", "n", 0);
        base.store
            .put(&base.path(&f.staged), "x".into())
            .await
            .unwrap();
        promote(&base, std::slice::from_ref(&f)).await.unwrap();
        assert!(dir.path().join(&f.published).exists());
        assert!(
            !dir.path().join("_staging").exists(),
            "empty staging removed"
        );
        // Again: nothing to do, no error.
        promote(&base, std::slice::from_ref(&f)).await.unwrap();
        std::fs::remove_file(dir.path().join(&f.published)).unwrap();
        let e = promote(&base, &[f]).await.unwrap_err();
        assert!(e.errors.is_empty(), "{e}");
        assert!(
            e.to_string().contains("neither staged nor published"),
            "{e}"
        );
    }
}
