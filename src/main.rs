//! `backfill`: parse, run, and map the outcome to an exit code — in one
//! place. 0 ok, 1 runtime failure, 2 usage/configuration, 3 DLQ not empty
//! with --fail-on-dlq, 4 another run on the same state won (README, "Exit
//! codes"). Errors are one line on stderr, `error: ...`.

use std::process::ExitCode;

use clap::Parser;
use event_backfill::cli::{Cli, Command};
use event_backfill::error::{EXIT_OK, EXIT_USAGE, Error};
use event_backfill::{commands, job, run};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's own C API (linked with the allocator above).
#[cfg(feature = "mimalloc")]
unsafe extern "C" {
    fn mi_version() -> std::ffi::c_int;
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// mimalloc v3's option indexes (`mi_option_t` of its 3.x header); only
/// used when `mi_version()` says 3.x.
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
#[cfg(feature = "mimalloc")]
const MI_OPTION_ALLOW_THP: std::ffi::c_int = 43;

#[cfg(feature = "mimalloc")]
fn mimalloc_v3() -> bool {
    // SAFETY: a plain accessor of the linked mimalloc.
    (300..400).contains(&(unsafe { mi_version() } / 100))
}

/// Never hand freed memory back to the OS during a run (mimalloc v3 does
/// after 1 s). A run frees and allocates decode buffers, bucket pieces and
/// sort entries by the gigabyte; handed back, each reuse faults its pages
/// in again and the kernel zeroes them (transparent huge pages: 2 MiB a
/// fault). Measured over a 10M-event run: 196k page faults and a fifth of
/// the CPU in `clear_page` by default, 4k faults with none (BENCHMARKS.md).
/// A batch job's RSS is its high-water mark either way: freed memory is
/// kept for the next allocation instead. Left alone when
/// MIMALLOC_PURGE_DELAY holds another value than v3's default (1000).
#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    if mimalloc_v3() {
        // SAFETY: option accessors of the linked mimalloc v3, whose enum
        // has index 15.
        unsafe {
            if mi_option_get(MI_OPTION_PURGE_DELAY) == 1000 {
                mi_option_set(MI_OPTION_PURGE_DELAY, -1);
            }
        }
    }
}

/// The settings bound memory (`--memory-limit` or `memory_limit`): what is
/// freed goes back to the OS at once, and no transparent huge page backs
/// the heap. Kept memory counts in RSS, and so does a 2 MiB huge page of
/// which a purge freed only 64 KiB: with huge pages the 10M-event run at
/// `--memory-limit 1G` peaked at 1.35 GiB however soon it purged, at
/// 256M still at 1.15 GiB; without them at 0.93 GiB and 0.65 GiB
/// (BENCHMARKS.md, "Where the memory goes"). The price is system time for
/// the page faults of reused memory.
fn bound_allocator() {
    #[cfg(feature = "mimalloc")]
    if mimalloc_v3() {
        // SAFETY: option accessors of the linked mimalloc v3 (indexes 15
        // and 43 of its enum). The purge delay is read at every purge; the
        // THP option at every new OS allocation.
        unsafe {
            let delay = mi_option_get(MI_OPTION_PURGE_DELAY);
            if delay == 1000 || delay == -1 {
                mi_option_set(MI_OPTION_PURGE_DELAY, 0);
            }
            mi_option_set(MI_OPTION_ALLOW_THP, 0);
        }
    }
    // The memory mimalloc (or malloc) mapped before this point was already
    // advised for huge pages; the process-wide switch covers it too.
    // SAFETY: prctl with integer arguments only; failure (an old kernel)
    // just leaves huge pages on.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The system allocator has no knob for a batch job.
#[cfg(not(feature = "mimalloc"))]
fn tune_allocator() {}

fn main() -> ExitCode {
    // First of all: every message built from here on (a location shown
    // redacted while settings are read, a clap error quoting an argument) is
    // scrubbed of the environment's secrets, whatever the URL around them.
    event_backfill::redact::register_env();
    tune_allocator();
    event_backfill::machine::on_memory_bound(bound_allocator);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version print to stdout and succeed.
            let _ = e.print();
            return ExitCode::from(EXIT_OK);
        }
        Err(e) => {
            eprintln!("error: {}", usage_error_line(&e));
            return ExitCode::from(EXIT_USAGE);
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

/// A clap usage error as the one line the README promises, without its
/// `error: ` prefix: clap's paragraphs (the error, a tip, the possible
/// values) joined, its `Usage:` and `For more information` paragraphs
/// replaced by a pointer to the help of the command at fault. Clap's help
/// dump for a missing subcommand becomes a line listing the commands.
fn usage_error_line(e: &clap::Error) -> String {
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    // The command the arguments name: `backfill state gc`. Only
    // subcommand names are followed; the top level and `state` take no
    // option with a value, so a word that is not a subcommand ends it.
    let mut cmd = Cli::command();
    let mut path = vec![cmd.get_name().to_string()];
    for arg in std::env::args_os().skip(1) {
        let Some(arg) = arg.to_str() else { break };
        if arg.starts_with('-') {
            continue;
        }
        let Some(sub) = cmd.find_subcommand(arg).cloned() else {
            break;
        };
        path.push(sub.get_name().to_string());
        cmd = sub;
    }
    let message = match e.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            let names: Vec<&str> = cmd
                .get_subcommands()
                .map(|c| c.get_name())
                .filter(|n| *n != "help")
                .collect();
            format!("a command is required: one of {}", names.join(", "))
        }
        _ => {
            let rendered = e.render().to_string();
            let parts: Vec<String> = rendered
                .split("\n\n")
                .map(str::trim)
                .filter(|p| {
                    !p.is_empty()
                        && !p.starts_with("Usage:")
                        && !p.starts_with("For more information")
                })
                .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            let joined = parts.join("; ");
            joined
                .strip_prefix("error:")
                .map_or(joined.as_str(), str::trim_start)
                .to_string()
        }
    };
    // An argument clap quotes may hold a secret of the environment.
    let message = event_backfill::redact::line(&message);
    format!("{message} (see {} --help)", path.join(" "))
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
            // A committed run's recorded code decides a rerun's (3 stays 3).
            Ok(r.exit_code
                .unwrap_or_else(|| r.exit_code_under(fail_on_dlq)))
        }
        Command::Gaps(a) => commands::gaps(a).await.map(|_| EXIT_OK),
        Command::Sql(a) => commands::sql(a).await.map(|_| EXIT_OK),
        Command::Explain(a) => commands::explain(a).await.map(|_| EXIT_OK),
        Command::Generate(a) => commands::generate(a).await.map(|_| EXIT_OK),
        Command::State(a) => commands::state(a.command).await.map(|_| EXIT_OK),
    }
}
