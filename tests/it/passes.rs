//! Each detection beside the run's reads the archive once: the plans of
//! `silences`, `volume_counts` (the part of `volume` that reads the
//! archive; `anomalies` and `run` compute it once and keep it) and
//! `contradicted` hold one scan of the archive's files, of the narrow
//! columns only. Counted in the physical plans `backfill sql` explains,
//! not timed (the times are in `make bench`).

use crate::cli::backfill;

/// The scans of the archive at `archive` in the physical plan of
/// `SELECT * FROM view`, each with the columns it reads.
fn archive_scans(archive: &str, extra: &[&str], view: &str) -> Vec<String> {
    let query = format!("EXPLAIN SELECT * FROM {view}");
    let mut args = vec!["sql", "--source", archive];
    args.extend_from_slice(extra);
    args.push(&query);
    let run = backfill(&args);
    run.ok();
    let plan = run
        .stdout
        .split_once("physical_plan")
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    plan.lines()
        .filter(|l| l.contains("DataSourceExec: file_groups") && l.contains("dt=2024-01-01"))
        .map(|l| {
            l.split("projection=[")
                .nth(1)
                .and_then(|p| p.split(']').next())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn each_detection_reads_the_archive_once_and_narrow() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let logs = dir.path().join("logs");
    backfill(&[
        "generate",
        "--out",
        archive.to_str().unwrap(),
        "--events",
        "3000",
        "--keys",
        "30",
        "--seed",
        "5",
        "--logs",
        logs.to_str().unwrap(),
    ])
    .ok();
    let a = archive.to_str().unwrap();
    let window = [
        "--from",
        "2024-01-01T00:00:00Z",
        "--to",
        "2024-01-09T00:00:00Z",
    ];
    let with_logs = ["--logs", logs.to_str().unwrap()];
    for (view, extra) in [
        ("silences", &[][..]),
        ("silences", &window[..]),
        ("volume_counts", &[][..]),
        ("volume_counts", &window[..]),
        ("contradicted", &with_logs[..]),
    ] {
        let scans = archive_scans(a, extra, view);
        assert_eq!(scans.len(), 1, "{view} {extra:?}: {scans:#?}");
        assert!(
            !scans[0].contains("payload"),
            "{view} reads the payloads: {}",
            scans[0]
        );
    }
}
