//! `backfill`: parse, run, and map the outcome to an exit code — in one
//! place. 0 ok, 1 runtime failure, 2 usage/configuration, 3 DLQ not empty
//! with --fail-on-dlq. Errors are one line on stderr, `error: ...`.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use event_backfill::cli::{Cli, Command};
use event_backfill::error::{EXIT_DLQ, EXIT_OK, EXIT_USAGE, Error};
use event_backfill::{commands, job, run};

fn main() -> ExitCode {
    // First of all: every message built from here on (a location shown
    // redacted while settings are read, a clap error quoting an argument) is
    // scrubbed of the environment's secrets, whatever the URL around them.
    event_backfill::redact::register_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // `line` scrubs every secret known from the settings and the
            // environment: the last line of defence.
            eprintln!("error: {}", e.line());
            ExitCode::from(e.exit_code())
        }
    }
}

/// Write `text` to `path` through a temporary file in the same folder and a
/// rename, so that a reader never sees half a report.
fn write_atomically(path: &str, text: String) -> std::io::Result<()> {
    let p = std::path::Path::new(path);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = p.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, p).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

async fn dispatch(cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Run(args) => {
            let progress = args.scan.progress;
            let settings = job::run_settings(&args, chrono::Utc::now())?;
            let report_file = settings.report.clone();
            let fail_on_dlq = settings.fail_on_dlq;
            let outcome = run::run(settings, progress).await?;
            let r = &outcome.report;
            if let Some(f) = report_file {
                // The run is over (committed, or nothing to do): a report that
                // cannot be written is worth a warning, never a different
                // outcome. Written whole or not at all.
                let json = serde_json::to_string_pretty(r).unwrap_or_default();
                if let Err(e) = write_atomically(&f, json + "\n") {
                    eprintln!(
                        "warning: {}",
                        event_backfill::redact::line(&format!(
                            "report file {f}: {e}; the run's outcome is unaffected"
                        ))
                    );
                }
            }
            if outcome.stdout_taken {
                eprint!("{}", r.human());
            } else {
                commands::write_stdout(r.human().as_bytes())?;
            }
            if fail_on_dlq && r.dead_lettered > 0 && !r.already_committed {
                return Ok(EXIT_DLQ);
            }
            Ok(EXIT_OK)
        }
        Command::Gaps(a) => commands::gaps(a).await.map(|_| EXIT_OK),
        Command::Sql(a) => commands::sql(a).await.map(|_| EXIT_OK),
        Command::Explain(a) => commands::explain(a).await.map(|_| EXIT_OK),
        Command::Generate(a) => commands::generate(a).await.map(|_| EXIT_OK),
        Command::State(a) => commands::state(a.command).await.map(|_| EXIT_OK),
    }
}
