//! Secrets never leave the process: the real binary driven through every
//! error path that can see a credential (a URL with user info, an endpoint
//! with user info in the job file or the environment, a typo'd Kafka
//! property, an unknown storage option, credentials sent to an unreachable
//! endpoint) and through a successful run with a report. The canary is
//! looked for in stdout, stderr and every file written, raw, encoded,
//! decoded and in fragments; each failure must still be one `error:` line
//! with the right exit code, naming the setting at fault.

use std::fs;
use std::path::{Path, PathBuf};

use crate::archive::{Archive, Layout, Row};
use crate::cli::{Run, backfill_in};
use crate::e2e::snapshot;

/// `/`, `@` and `:` (which move a URL parser's idea of where the host
/// starts) and a percent-encoded `/` (which a parser may decode).
const CANARY: &str = "Cr/n@ry:s3cr%2Ft";

/// Every form of the canary that must not appear: raw, decoded, encoded
/// (either hex case), and each 4+ character fragment of the raw and decoded
/// forms split at `/`, `@` and `:`.
fn needles() -> Vec<String> {
    let decoded = "Cr/n@ry:s3cr/t";
    let mut v = vec![
        "Cr%2Fn%40ry%3As3cr%252Ft".to_string(),
        "Cr%2fn%40ry%3as3cr%252ft".to_string(),
        "Cr%2Fn%40ry%3As3cr%2Ft".to_string(),
    ];
    v.extend(needles_of(CANARY, decoded));
    v
}

/// `secret` and its `decoded` form, and each 4+ character fragment of them
/// split at `/`, `@` and `:`.
fn needles_of(secret: &str, decoded: &str) -> Vec<String> {
    let mut v = vec![secret.to_string(), decoded.to_string()];
    for s in [secret, decoded] {
        v.extend(
            s.split(['/', '@', ':'])
                .filter(|f| f.len() >= 4)
                .map(str::to_string),
        );
    }
    v
}

/// The needles found in `text`.
fn found(text: &str) -> Vec<String> {
    needles().into_iter().filter(|n| text.contains(n)).collect()
}

/// The files under `dir` (none when it does not exist) whose bytes hold the
/// canary in any form.
fn leaky_files(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
    snapshot(dir)
        .into_keys()
        .filter_map(|p| {
            let text = String::from_utf8_lossy(&fs::read(&p).ok()?).into_owned();
            let f = found(&text);
            (!f.is_empty()).then_some((p, f))
        })
        .collect()
}

/// A scratch folder with a small valid archive, an output root and a place
/// for job files and the report.
struct Work {
    dir: tempfile::TempDir,
    archive: Archive,
}

impl Work {
    fn new() -> Work {
        let mut archive = Archive::new();
        archive.file(
            "dt=2024-01-01/part-0.parquet",
            &Layout::default(),
            &[
                Row::new("a", "k", 1, "2024-01-01T00:00:00Z", Some("failed")),
                Row::new("b", "k", 2, "2024-01-01T00:00:01Z", Some("processed")),
            ],
        );
        Work {
            dir: tempfile::tempdir().expect("tempdir"),
            archive,
        }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn report(&self) -> PathBuf {
        self.dir.path().join("report.json")
    }

    /// Write a job file (outside the output root: it holds the canary on
    /// purpose) and return its path.
    fn job(&self, toml: &str) -> String {
        let p = self.dir.path().join("job.toml");
        fs::write(&p, toml).expect("write job file");
        p.display().to_string()
    }

    /// `backfill run --out OUT --run-id secrets-1 --report REPORT ARGS...`
    /// with the extra environment.
    fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let out = self.out().display().to_string();
        let report = self.report().display().to_string();
        let mut all = vec![
            "run",
            "--out",
            &out,
            "--run-id",
            "secrets-1",
            "--report",
            &report,
            "--progress",
            "off",
        ];
        all.extend_from_slice(args);
        // No AWS settings of the machine running the tests leak in.
        let mut envs = envs.to_vec();
        for k in [
            "AWS_PROFILE",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        ] {
            if !envs.iter().any(|(n, _)| *n == k) {
                envs.push((k, "/nonexistent"));
            }
        }
        backfill_in(&all, &envs, None)
    }
}

/// None of `needles` (a secret's spellings) in stdout or stderr.
#[track_caller]
fn assert_no_needle(run: &Run, needles: &[String]) {
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        let leaks: Vec<_> = needles
            .iter()
            .filter(|n| text.contains(n.as_str()))
            .collect();
        assert!(
            leaks.is_empty(),
            "{name} leaks {leaks:?}\n{}",
            run.describe()
        );
    }
}

/// Nothing of the canary in stdout, stderr, the output root or the report.
#[track_caller]
fn assert_no_leak(work: &Work, run: &Run) {
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        let f = found(text);
        assert!(f.is_empty(), "{name} leaks {f:?}\n{}", run.describe());
    }
    let mut files = leaky_files(&work.out());
    if let Ok(bytes) = fs::read(work.report()) {
        let f = found(&String::from_utf8_lossy(&bytes));
        if !f.is_empty() {
            files.push((work.report(), f));
        }
    }
    assert!(
        files.is_empty(),
        "files leak the secret: {files:?}\n{}",
        run.describe()
    );
}

/// The failure shape: the exit code, one `error:` line naming each of
/// `names` (alternatives separated by `|`), and no leak anywhere.
#[track_caller]
fn assert_secret_error(work: &Work, run: &Run, code: i32, names: &[&str]) {
    assert_no_leak(work, run);
    run.expect_code(code);
    let lines = run.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "exactly one line on stderr\n{}",
        run.describe()
    );
    assert!(
        lines[0].starts_with("error:"),
        "the line starts with `error:`\n{}",
        run.describe()
    );
    for name in names {
        assert!(
            name.split('|').any(|n| lines[0].contains(n)),
            "the error names `{name}`\n{}",
            run.describe()
        );
    }
}

#[test]
fn object_store_urls_with_credentials_are_refused_without_echo() {
    for scheme in ["s3", "gs", "az"] {
        for userinfo in [
            format!("AKIA:{CANARY}"),
            CANARY.to_string(),
            "AKIA:Cr%2Fn%40ry%3As3cr%252Ft".to_string(),
        ] {
            let url = format!("{scheme}://{userinfo}@bucket/events");
            let shown = format!("{scheme}://***@bucket/events");
            // As the archive, and as the output root (whose state is
            // resolved first).
            let work = Work::new();
            let run = work.run(&["--source", &url], &[]);
            assert_secret_error(&work, &run, 2, &[&shown, "credentials in the URL"]);

            let work = Work::new();
            let src = work.archive.source();
            let out = format!("{scheme}://{userinfo}@bucket/out");
            let run = backfill_in(
                &["run", "--source", &src, "--out", &out, "--run-id", "s-1"],
                &[],
                None,
            );
            assert_secret_error(
                &work,
                &run,
                2,
                &[
                    &format!("{scheme}://***@bucket/out"),
                    "credentials in the URL",
                ],
            );
        }
    }
}

/// A secret holding `@`, written into a URL anywhere but the user-info
/// slot (a port, the path, a query, a fragment), moved the cut of the URL
/// redactor to its `@`: `s3://***@cd:ef%2Fgh+XyZ/a200k` showed the tail,
/// which no longer matched the registered secret. Registered secrets are
/// scrubbed before the cut now.
#[test]
fn a_secret_holding_an_at_anywhere_in_a_url_is_not_echoed() {
    for (secret, decoded) in [
        ("Zq9/ab@cd:ef%2Fgh+XyZ", "Zq9/ab@cd:ef/gh+XyZ"),
        (CANARY, "Cr/n@ry:s3cr/t"),
    ] {
        let needles = needles_of(secret, decoded);
        for url in [
            format!("s3://lake:{secret}/a200k"),
            format!("s3://lake/a200k#{secret}"),
            format!("s3://lake/a200k?x={secret}"),
            format!("s3://lake/{secret}"),
        ] {
            let work = Work::new();
            let src = work.archive.source();
            for args in [
                vec!["--source", url.as_str()],
                vec!["--source", src.as_str(), "--replay-sink", url.as_str()],
            ] {
                let run = work.run(&args, &[("AWS_SECRET_ACCESS_KEY", secret)]);
                run.expect_code(2);
                assert_no_needle(&run, &needles);
                let lines = run.stderr_lines();
                assert!(
                    lines.len() == 1
                        && lines[0].starts_with("error: ")
                        && lines[0].contains("location 's3://"),
                    "one error line naming the location\n{}",
                    run.describe()
                );
            }
        }
    }
}

#[test]
fn endpoint_with_credentials_in_the_job_file_is_refused_naming_it() {
    let work = Work::new();
    let job = work.job(&format!(
        "source = \"s3://bucket/events\"\n\
         [storage]\nendpoint = \"http://AKIA:{CANARY}@127.0.0.1:1\"\n"
    ));
    let run = work.run(&["--job", &job], &[]);
    assert_secret_error(
        &work,
        &run,
        2,
        &["[storage] endpoint", "http://***@127.0.0.1:1"],
    );
}

#[test]
fn endpoint_with_credentials_in_the_environment_is_refused_naming_it() {
    for var in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"] {
        let work = Work::new();
        let endpoint = format!("http://AKIA:{CANARY}@127.0.0.1:1");
        let run = work.run(
            &["--source", "s3://bucket/events"],
            &[(var, endpoint.as_str())],
        );
        assert_secret_error(&work, &run, 2, &[var, "http://***@127.0.0.1:1"]);
    }
}

#[test]
fn kafka_urls_with_credentials_are_refused_without_echo() {
    let url = format!("kafka://user:{CANARY}@127.0.0.1:1/events");
    let shown = "kafka://***@127.0.0.1:1/events";
    // As the source.
    let work = Work::new();
    let run = work.run(&["--source", &url], &[]);
    assert_secret_error(&work, &run, 2, &[shown, "sasl.password"]);
    // As a sink, after a valid scan.
    let work = Work::new();
    let src = work.archive.source();
    let run = work.run(&["--source", &src, "--replay-sink", &url], &[]);
    assert_secret_error(&work, &run, 2, &[shown, "sasl.password"]);
}

#[test]
fn typoed_kafka_property_never_echoes_its_value() {
    for typo in ["sasl.passwd", "sasl.pasword"] {
        let work = Work::new();
        let job = work.job(&format!(
            "[kafka.properties]\n\"security.protocol\" = \"sasl_plaintext\"\n\
             \"{typo}\" = \"{CANARY}\"\n"
        ));
        let src = work.archive.source();
        // The sink: librdkafka refuses the property when the producer is made.
        let run = work.run(
            &[
                "--job",
                &job,
                "--source",
                &src,
                "--replay-sink",
                "kafka://127.0.0.1:1/replay",
            ],
            &[],
        );
        assert_secret_error(&work, &run, 2, &[typo, "kafka://127.0.0.1:1/replay"]);
        // The source: the same refusal when the consumer is made.
        let work = Work::new();
        let job = work.job(&format!("[kafka.properties]\n\"{typo}\" = \"{CANARY}\"\n"));
        let run = work.run(
            &["--job", &job, "--source", "kafka://127.0.0.1:1/events"],
            &[],
        );
        assert_secret_error(&work, &run, 2, &[typo, "kafka://127.0.0.1:1/events"]);
    }
}

/// A run replaying to an unreachable broker with the secret canary as the
/// value of one `[kafka.properties]` entry.
fn replay_with_kafka_property(property: &str) -> (Work, Run) {
    let work = Work::new();
    let job = work.job(&format!(
        "[kafka.properties]\n\"{property}\" = \"{CANARY}\"\n"
    ));
    let src = work.archive.source();
    let run = work.run(
        &[
            "--job",
            &job,
            "--source",
            &src,
            "--replay-sink",
            "kafka://127.0.0.1:1/replay",
        ],
        &[],
    );
    (work, run)
}

#[test]
fn invalid_value_of_a_kafka_property_is_not_echoed() {
    // librdkafka's "Invalid value ... for configuration property" quotes it.
    let (work, run) = replay_with_kafka_property("message.max.bytes");
    assert_secret_error(&work, &run, 2, &["message.max.bytes"]);
}

/// librdkafka quotes the value it refuses ("Invalid value \"...\" for
/// configuration property \"security.protocol\""), and only the values of
/// properties that may hold secrets were scrubbed. A secret put in any
/// property is never echoed now, by the sink or by the source.
#[test]
fn a_secret_in_a_property_not_named_like_a_secret_is_not_echoed() {
    for property in ["security.protocol", "compression.type"] {
        let (work, run) = replay_with_kafka_property(property);
        assert_secret_error(&work, &run, 2, &[property, "kafka://127.0.0.1:1/replay"]);
    }
    let work = Work::new();
    let job = work.job(&format!(
        "[kafka.properties]\n\"security.protocol\" = \"{CANARY}\"\n"
    ));
    let run = work.run(
        &["--job", &job, "--source", "kafka://127.0.0.1:1/events"],
        &[],
    );
    assert_secret_error(
        &work,
        &run,
        2,
        &["security.protocol", "kafka://127.0.0.1:1/events"],
    );
}

#[test]
fn unknown_storage_option_never_echoes_its_value() {
    let work = Work::new();
    let job = work.job(&format!(
        "source = \"s3://bucket/events\"\n\
         [storage.options]\naws_scret_acces_key = \"{CANARY}\"\n"
    ));
    let run = work.run(&["--job", &job], &[]);
    assert_secret_error(&work, &run, 2, &["aws_scret_acces_key"]);
}

#[test]
fn invalid_storage_option_value_is_not_echoed() {
    // object_store's builder says `failed to parse "<value>" as boolean`.
    let work = Work::new();
    let job = work.job(&format!(
        "source = \"s3://bucket/events\"\n\
         [storage.options]\naws_skip_signature = \"{CANARY}\"\n"
    ));
    let run = work.run(&["--job", &job], &[]);
    assert_secret_error(&work, &run, 2, &["[storage] options.aws_skip_signature"]);
}

#[test]
fn wrong_credentials_against_an_unreachable_endpoint_are_not_echoed() {
    // From the job file.
    let work = Work::new();
    let job = work.job(&format!(
        "source = \"s3://bucket/events\"\n\
         [storage]\nendpoint = \"http://127.0.0.1:1\"\nregion = \"us-east-1\"\n\
         access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"{CANARY}\"\n\
         session_token = \"tok-{CANARY}\"\n\
         [storage.retry]\nmax_retries = 0\nretry_timeout_secs = 1\nconnect_timeout_secs = 1\n"
    ));
    let run = work.run(&["--job", &job], &[]);
    assert_secret_error(&work, &run, 1, &["s3://bucket/events", "not reachable"]);

    // From the environment.
    let work = Work::new();
    let job = work.job(
        "[storage.retry]\nmax_retries = 0\nretry_timeout_secs = 1\nconnect_timeout_secs = 1\n",
    );
    let token = format!("tok-{CANARY}");
    let run = work.run(
        &["--job", &job, "--source", "s3://bucket/events"],
        &[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", CANARY),
            ("AWS_SESSION_TOKEN", token.as_str()),
        ],
    );
    assert_secret_error(&work, &run, 1, &["s3://bucket/events", "not reachable"]);
}

#[test]
fn wrong_secret_rejected_by_a_real_server_is_not_echoed() {
    // s3s-fs answers 403 SignatureDoesNotMatch; its body and object_store's
    // message must not carry the secret or the session token.
    let server = crate::services::s3();
    let bucket = crate::services::unique_name("secrets");
    server.create_bucket(&bucket);
    let work = Work::new();
    let src = format!("s3://{bucket}/events");
    let token = format!("tok-{CANARY}");
    let server_env = server.env();
    let mut envs: Vec<(&str, &str)> = server_env
        .iter()
        .filter(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY")
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    envs.push(("AWS_SECRET_ACCESS_KEY", CANARY));
    envs.push(("AWS_SESSION_TOKEN", &token));
    let run = work.run(&["--source", &src], &envs);
    assert_secret_error(&work, &run, 1, &[&src, "403|credentials rejected"]);
}

#[test]
fn an_environment_secret_echoed_by_any_error_is_scrubbed_by_main() {
    // A secret interpolated into the wrong field: the job file's type error
    // quotes the value, and no module knows it is a secret. `main` does:
    // it scrubs every secret-named environment variable's value.
    let work = Work::new();
    let job = work.job("[storage]\nallow_http = \"${AWS_SECRET_ACCESS_KEY}\"\n");
    let src = work.archive.source();
    let run = work.run(
        &["--job", &job, "--source", &src],
        &[("AWS_SECRET_ACCESS_KEY", CANARY)],
    );
    assert_secret_error(&work, &run, 2, &[&job, "expected a boolean"]);
}

#[test]
fn a_successful_run_writes_no_secret_to_its_report_or_outputs() {
    let work = Work::new();
    let job = work.job(&format!(
        "[storage]\nsecret_access_key = \"{CANARY}\"\nsession_token = \"{CANARY}\"\n\
         [storage.options]\naws_scret_acces_key = \"{CANARY}\"\n\
         [kafka.properties]\n\"sasl.password\" = \"{CANARY}\"\n\"sasl.passwd\" = \"{CANARY}\"\n"
    ));
    let src = work.archive.source();
    let run = work.run(
        &["--job", &job, "--source", &src],
        &[("AWS_SECRET_ACCESS_KEY", CANARY)],
    );
    run.ok();
    assert_no_leak(&work, &run);
    assert!(work.report().exists(), "no report\n{}", run.describe());
    assert!(
        !snapshot(&work.out()).is_empty(),
        "the run wrote nothing\n{}",
        run.describe()
    );
}

/// A query or fragment in a location was ignored by every store and kept
/// in the location as written: `--replay-sink file://…/replay?sasl.password=…`
/// ran, and the report and the commit log held the password as the sink's
/// target. Every location refuses one now, before anything is read or
/// written (exit 2, one line, the URL shown up to its `?` or `#`). In a
/// Kafka URL, a `?` among the brokers was echoed by the message about the
/// port.
#[test]
fn a_query_or_fragment_in_any_location_is_refused_and_never_stored() {
    // No `@`: a URL holding one is refused as credentials already.
    let (secret, decoded) = ("Qu3ry/s3cr%2Ft", "Qu3ry/s3cr/t");
    let needles = needles_of(secret, decoded);
    let work = Work::new();
    let dir = work.dir.path().display().to_string();
    let src = work.archive.source();
    let cases = [
        (
            "--replay-sink",
            format!("file://{dir}/out/replay?sasl.password={secret}"),
        ),
        ("--dlq-sink", format!("file://{dir}/out/dlq#{secret}")),
        ("--gaps-sink", format!("s3://bucket/gaps?token={secret}")),
        ("--state", format!("file://{dir}/state?x={secret}")),
        ("--source", format!("file://{src}?x={secret}")),
        ("--out", format!("file://{dir}/out?x={secret}")),
        (
            "--replay-sink",
            format!("kafka://127.0.0.1:1?sasl.password={secret}/r"),
        ),
        (
            "--replay-sink",
            format!("kafka://127.0.0.1:1/r?sasl.password={secret}"),
        ),
    ];
    for (flag, value) in &cases {
        let out = work.out().display().to_string();
        let report = work.report().display().to_string();
        let mut args = vec!["run", "--run-id", "q-1", "--report", &report];
        args.extend_from_slice(&["--progress", "off", *flag, value]);
        if *flag != "--source" {
            args.extend_from_slice(&["--source", &src]);
        }
        if *flag != "--out" {
            args.extend_from_slice(&["--out", &out]);
        }
        let run = backfill_in(&args, &[], None);
        run.expect_code(2);
        assert_no_needle(&run, &needles);
        let lines = run.stderr_lines();
        assert!(
            lines.len() == 1
                && lines[0].starts_with("error: ")
                && lines[0].contains("takes no query or fragment")
                && (lines[0].contains("?***'") || lines[0].contains("#***'")),
            "one error line naming the URL without its query\n{}",
            run.describe()
        );
        let files: Vec<_> = snapshot(work.dir.path())
            .into_keys()
            .filter(|p| {
                let text = String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
                needles.iter().any(|n| text.contains(n))
            })
            .collect();
        assert!(files.is_empty(), "{flag}: files leak the secret: {files:?}");
        assert!(
            !work.out().exists(),
            "{flag}: the run wrote\n{}",
            run.describe()
        );
    }
}

/// The redactor cut a URL at the first whitespace: a query value holding a
/// space or a newline, quoted by a message as the user wrote it, showed
/// its rest (`'s3://b/x?sasl.password=*** one two'`). A quoted URL now
/// runs to its closing quote. DataFusion's planning error quotes a table
/// URL of `sql` twice, as written and behind its schema name.
#[test]
fn a_query_value_with_spaces_or_newlines_is_hidden_whole() {
    let work = Work::new();
    let src = work.archive.source();
    for (sep, scheme) in [
        (" ", "s3://b/x"),
        ("\n", "file:///tmp/x"),
        ("\t", "az://c/p"),
    ] {
        let query = format!("SELECT * FROM '{scheme}?sasl.password=Sp4ce{sep}0ne{sep}tw0'");
        let run = backfill_in(&["sql", "--source", &src, &query], &[], None);
        run.expect_code(2);
        for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            for needle in ["Sp4ce", "0ne", "tw0"] {
                assert!(
                    !text.contains(needle),
                    "{name} leaks {needle}\n{}",
                    run.describe()
                );
            }
        }
        let lines = run.stderr_lines();
        assert!(
            lines.len() == 1 && lines[0].contains(&format!("'{scheme}?sasl.password=***'")),
            "one error line naming the table\n{}",
            run.describe()
        );
    }
}

/// An endpoint holding a space (here in a query value, where a token may
/// hide) made object_store's request signer panic: exit 101 and a
/// backtrace. Refused before anything is contacted, naming the setting,
/// without the query.
#[test]
fn an_endpoint_with_a_query_or_a_space_is_refused_without_echo() {
    let endpoint = "http://127.0.0.1:1/?token=Sp4ce 0ne tw0";
    for (var, value) in [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1 :1"),
    ] {
        let work = Work::new();
        let job = work.job(
            "[storage.retry]\nmax_retries = 0\nretry_timeout_secs = 1\nconnect_timeout_secs = 1\n",
        );
        let run = work.run(
            &["--job", &job, "--source", "s3://bucket/events"],
            &[
                (var, value),
                ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
                ("AWS_SECRET_ACCESS_KEY", CANARY),
                ("AWS_ALLOW_HTTP", "true"),
            ],
        );
        assert_secret_error(&work, &run, 2, &[var, "endpoint|whitespace"]);
        for needle in ["Sp4ce", "0ne", "tw0"] {
            assert!(!run.stderr.contains(needle), "{}", run.describe());
        }
    }
}
