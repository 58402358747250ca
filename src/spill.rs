//! Spill folders a killed run left behind.
//!
//! A run spills in folders of its own under `--spill-dir`
//! (`backfill-spill-*`: the detection's buckets and generations;
//! `datafusion-*`: DataFusion's sorts), removed when it ends. A `kill -9`
//! or the kernel's OOM killer leaves them, up to the size of the window's
//! narrow columns each; a scheduler that retries a killed run fills the
//! disk, and every later run fails with a full spill folder.
//!
//! So each run marks its folders as owned: a file [`LOCK`] inside, on
//! which it holds an exclusive `flock` until it exits (the kernel drops
//! the lock of a dead process, however it died). A run starting to spill
//! removes the folders whose lock it can take: their owner is gone. A
//! folder without the file (an older version, or one still being set up)
//! is never touched.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

/// The name of the ownership file in a spill folder.
pub const LOCK: &str = ".backfill-owner";

/// The locks this process holds: for its lifetime (the folders go when the
/// run ends; a lock on a removed file is harmless).
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Mark `folder` as this process's. The lock is taken on a file of a
/// temporary name, then renamed into place, so that no other run can see
/// [`LOCK`] before it is locked.
pub fn claim(folder: &Path) -> std::io::Result<()> {
    let tmp = folder.join(format!("{LOCK}.{}", std::process::id()));
    let f = File::create(&tmp)?;
    f.lock()?;
    std::fs::rename(&tmp, folder.join(LOCK))?;
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push(f);
    Ok(())
}

/// Remove the spill folders in `dir` whose owner is gone; the folders
/// removed. Best effort: a folder that cannot be read or removed stays.
pub fn sweep(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut removed = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("backfill-spill-") || name.starts_with("datafusion-")) {
            continue;
        }
        // Not a link: a folder of ours is a real directory.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let folder = e.path();
        let Ok(lock) = File::open(folder.join(LOCK)) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::fs::remove_dir_all(&folder).is_ok() {
            removed.push(folder);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder whose owner is alive stays; one whose owner is gone (its
    /// lock free) goes; one without the file is not ours to judge.
    #[test]
    fn only_folders_of_dead_runs_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let alive = dir.path().join("backfill-spill-alive");
        let dead = dir.path().join("datafusion-dead");
        let unknown = dir.path().join("backfill-spill-unknown");
        let other = dir.path().join("somebody-elses");
        for d in [&alive, &dead, &unknown, &other] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("spill.arrow"), b"x").unwrap();
        }
        claim(&alive).unwrap();
        // A dead run: its lock file is there, nobody holds the lock.
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(other.join(LOCK), b"").unwrap();
        assert_eq!(sweep(dir.path()), vec![dead.clone()]);
        assert!(alive.join("spill.arrow").exists());
        assert!(unknown.exists() && other.exists() && !dead.exists());
        // The claim left no temporary file.
        let names: Vec<_> = std::fs::read_dir(&alive)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
