//! `backfill`: parse, start the logs, run, and map the outcome to an exit
//! code — in one place. 0 ok, 1 runtime failure, 2 usage/configuration, 3
//! DLQ not empty with --fail-on-dlq, 4 another run on the same state won
//! (README, "Exit codes"). Errors are one line
//! on stderr, `error: ...`; logs go to stderr too (src/log.rs); stdout holds
//! only the summary, the rows of a `-` sink and `--report -`.

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
/// after 1 s), and never back the heap with transparent huge pages. A run
/// frees and allocates decode buffers, bucket pieces and sort entries by
/// the gigabyte; handed back, each reuse faults its pages in again and the
/// kernel zeroes them: 196k page faults and a fifth of the CPU in
/// `clear_page` over a 10M-event run by default, 4k with no purge. Huge
/// pages cost more than they save here: each of those 4k faults zeroed
/// (and with the kernel's `defrag = madvise`, compacted memory for) 2 MiB,
/// 6.6–7.0 s of system time at 10M events against 2.2 s with 4 KiB pages,
/// and 1 s more of wall time (BENCHMARKS.md). A batch job's RSS is its
/// high-water mark either way: freed memory is kept for the next
/// allocation instead. Each is left alone when its MIMALLOC_ variable is
/// set.
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
    no_huge_pages();
}

/// Transparent huge pages off: the allocator stops asking for them, and
/// the process refuses them (kernels whose THP mode is `always` back any
/// large mapping with them, whatever the allocator asks). Left on when
/// MIMALLOC_ALLOW_THP is set.
fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    #[cfg(feature = "mimalloc")]
    if mimalloc_v3() {
        // SAFETY: an option setter of the linked mimalloc v3 (index 43 of
        // its enum), read at every new OS allocation.
        unsafe {
            mi_option_set(MI_OPTION_ALLOW_THP, 0);
        }
    }
    // SAFETY: prctl with integer arguments only; failure (an old kernel)
    // just leaves huge pages on.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The settings bound memory (`--memory-limit` or `memory_limit`): what is
/// freed goes back to the OS at once. Kept memory counts in RSS (10M
/// events at `--memory-limit 1G`: 2.1 GiB peak kept, 1.45 GiB purged, same
/// time; BENCHMARKS.md, "Where the memory goes"). The price is system time
/// for the page faults of reused memory.
fn bound_allocator() {
    #[cfg(feature = "mimalloc")]
    if mimalloc_v3() {
        // SAFETY: option accessors of the linked mimalloc v3 (index 15 of
        // its enum), read at every purge.
        unsafe {
            let delay = mi_option_get(MI_OPTION_PURGE_DELAY);
            if delay == 1000 || delay == -1 {
                mi_option_set(MI_OPTION_PURGE_DELAY, 0);
            }
        }
    }
}

/// The system allocator has no knob for a batch job but huge pages.
#[cfg(not(feature = "mimalloc"))]
fn tune_allocator() {
    no_huge_pages();
}

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
    // Commands that print a file of their own: no logs, no runtime.
    match &cli.command {
        Command::Completions(a) => return exit_with(completions(a.shell)),
        Command::Man(a) => return exit_with(man_page(&a.command)),
        _ => {}
    }
    let logs = match start_logs(&cli) {
        Ok(l) => l,
        Err(message) => {
            let line = event_backfill::redact::line(&message);
            eprintln!("error: {}", event_backfill::log::printable(&line));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    event_backfill::progress::configure(cli.progress_interval);
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
            let line = e.line();
            if logs.json() {
                // The same line as a record, for whoever reads only the
                // JSON lines; the plain `error:` line below stays as it
                // was for people and scripts.
                tracing::error!(exit_code = e.exit_code(), "{line}");
            }
            eprintln!("error: {line}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The exit code of a command that only prints.
fn exit_with(r: Result<(), Error>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("error: {}", e.line());
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs on stderr as the flags ask. `run` and `state` tell their phases by
/// default (a scheduler's log is all there is of a run); the commands whose
/// output is the answer (`gaps`, `sql`, `explain`) only warn unless asked.
fn start_logs(cli: &Cli) -> Result<event_backfill::log::Settings, String> {
    use event_backfill::cli::Progress;
    let (default, progress) = match &cli.command {
        Command::Run(a) => ("info", a.scan.progress),
        Command::Gaps(a) => ("warn", a.scan.progress),
        Command::Silences(a) => ("warn", a.scan.progress),
        Command::Anomalies(a) => ("warn", a.scan.progress),
        Command::Sql(a) => ("warn", a.scan.progress),
        Command::Explain(a) => ("warn", a.scan.progress),
        Command::Runs(_) => ("warn", Progress::Off),
        Command::StateAt(a) => ("warn", a.scan.progress),
        Command::Infer(a) => ("warn", a.scan.progress),
        Command::Reconcile(a) => ("warn", a.scan.progress),
        Command::Redrive(a) => ("info", a.progress),
        _ => ("info", Progress::Off),
    };
    let filter =
        event_backfill::log::filter(cli.log_level.as_deref(), default, progress == Progress::On)?;
    Ok(event_backfill::log::init(cli.log_format, filter))
}

/// `backfill completions SHELL`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> Result<(), Error> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "backfill", &mut out);
    commands::write_stdout(&out)
}

/// `backfill man [COMMAND...]`: the roff page of the command on stdout
/// (`backfill-run(1)` for `run`).
fn man_page(path: &[String]) -> Result<(), Error> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.build();
    let mut name = cmd.get_name().to_string();
    for word in path {
        let Some(sub) = cmd.find_subcommand(word).cloned() else {
            return Err(Error::Usage(format!(
                "man: `{}` is not a command (see backfill --help)",
                [name.replace('-', " "), word.clone()].join(" ")
            )));
        };
        name = format!("{name}-{}", sub.get_name());
        cmd = sub;
    }
    // clap names are `&'static str` (without its `string` feature); this
    // process prints one page and ends.
    let name: &'static str = name.leak();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.name(name))
        .render(&mut out)
        .map_err(|e| Error::Io {
            what: "the man page".into(),
            message: e.to_string(),
        })?;
    commands::write_stdout(&out)
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
    // Clap names a flag the user did not type as if they had: say which
    // variable stands for it (`BACKFILL_FILE` beside a QUERY).
    let message = match e.kind() {
        ErrorKind::ArgumentConflict => match set_by_environment(&cmd, &message) {
            Some(why) => format!("{message} ({why})"),
            None => message,
        },
        _ => message,
    };
    // An argument clap quotes may hold a secret of the environment, or a
    // control character.
    let message = event_backfill::log::printable(&event_backfill::redact::line(&message));
    format!("{message} (see {} --help)", path.join(" "))
}

/// For a conflict `message` about a flag of `cmd` that is not on the
/// command line but set by its `BACKFILL_*` variable: that it is. The
/// variable stands for the flag, so it conflicts as the flag would
/// (docs/cli.md); the value is not shown.
fn set_by_environment(cmd: &clap::Command, message: &str) -> Option<String> {
    let typed: Vec<String> = std::env::args().skip(1).collect();
    cmd.get_arguments().find_map(|arg| {
        let var = arg.get_env()?.to_str()?;
        std::env::var_os(var)?;
        let long = format!("--{}", arg.get_long()?);
        let on_line = typed.iter().any(|t| {
            t == &long
                || t.starts_with(&format!("{long}="))
                || arg
                    .get_short()
                    .is_some_and(|c| t.starts_with('-') && !t.starts_with("--") && t.contains(c))
        });
        (!on_line && message.contains(&format!("'{long}")))
            .then(|| format!("{long} is set by the environment variable {var}: unset it"))
    })
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
            let report_to_stdout = report_file.as_deref() == Some("-");
            if report_to_stdout {
                refuse_two_on_stdout(&settings)?;
            }
            if let Some(f) = report_file.as_deref().filter(|f| *f != "-") {
                refuse_a_special_report_file(f)?;
            }
            let fail_on_dlq = settings.fail_on_dlq;
            let outcome = run::run(settings, progress).await?;
            let r = &outcome.report;
            // A committed run's recorded code decides a rerun's (3 stays 3).
            let code = r
                .exit_code
                .unwrap_or_else(|| r.exit_code_under(fail_on_dlq));
            log_run_end(r, code);
            if let Some(f) = report_file.filter(|f| f != "-") {
                // The run is over (committed, or nothing to do): a report that
                // cannot be written is worth a warning, never a different
                // outcome. Written whole or not at all.
                let json = serde_json::to_string_pretty(r).unwrap_or_default();
                if let Err(e) = write_atomically(&f, json + "\n") {
                    tracing::warn!(
                        "{}",
                        event_backfill::redact::line(&format!(
                            "report file {f}: {e}; the run's outcome is unaffected"
                        ))
                    );
                }
            }
            if outcome.stdout_taken {
                eprint!("{}", r.human_with(code));
            } else {
                commands::write_stdout(r.human_with(code).as_bytes())?;
            }
            if report_to_stdout {
                // The last line of stdout, one compact object: what a
                // scheduler that keeps the last line (Airflow's
                // BashOperator) hands on.
                let json = serde_json::to_string(r).unwrap_or_default();
                commands::write_stdout(format!("{json}\n").as_bytes())?;
            }
            Ok(code)
        }
        Command::Gaps(a) => commands::gaps(a).await.map(|_| EXIT_OK),
        Command::Silences(a) => commands::silences(a).await.map(|_| EXIT_OK),
        Command::Anomalies(a) => commands::anomalies(a).await.map(|_| EXIT_OK),
        Command::Sql(a) => commands::sql(a).await.map(|_| EXIT_OK),
        Command::Explain(a) => commands::explain(a).await.map(|_| EXIT_OK),
        Command::Generate(a) => commands::generate(a).await.map(|_| EXIT_OK),
        Command::State(a) => commands::state(a.command).await.map(|_| EXIT_OK),
        Command::Runs(a) => event_backfill::runs::runs(a.command).await.map(|_| EXIT_OK),
        Command::StateAt(a) => event_backfill::state_at::state_at(a).await.map(|_| EXIT_OK),
        Command::Infer(a) => event_backfill::infer::infer(a).await.map(|_| EXIT_OK),
        Command::Reconcile(a) => event_backfill::reconcile::reconcile(a).await,
        Command::Redrive(args) => {
            let outcome = run::redrive::redrive(args).await?;
            let r = &outcome.report;
            let code = r.exit_code.unwrap_or(EXIT_OK);
            if outcome.stdout_taken {
                eprint!("{}", r.human_with(code));
            } else {
                commands::write_stdout(r.human_with(code).as_bytes())?;
            }
            Ok(code)
        }
        Command::Report(a) => commands::report(a.command).map(|_| EXIT_OK),
        Command::Scheduler(a) => event_backfill::cluster::serve::scheduler(a)
            .await
            .map(|_| EXIT_OK),
        Command::Executor(a) => event_backfill::cluster::serve::executor(a)
            .await
            .map(|_| EXIT_OK),
        Command::Completions(a) => completions(a.shell).map(|_| EXIT_OK),
        Command::Man(a) => man_page(&a.command).map(|_| EXIT_OK),
    }
}

/// The run's end as one event, its message the summary's last line: at
/// info, or at warn when the run exits non-zero (3: dead letters under
/// `--fail-on-dlq`), so that a log alert on warnings catches it.
fn log_run_end(r: &event_backfill::report::Report, code: u8) {
    macro_rules! run_end {
        ($level:expr) => {
            tracing::event!(
                target: event_backfill::progress::TARGET,
                $level,
                event = "end",
                phase = "run",
                run_id = r.run_id.as_str(),
                exit_code = code,
                elapsed_ms = r.elapsed_ms,
                rows = r.rows,
                replayed = r.replayed,
                dead_lettered = r.dead_lettered,
                gaps = r.gaps,
                conflicts = r.conflicts,
                "{}",
                r.outcome_line(code)
            )
        };
    }
    if code == EXIT_OK {
        run_end!(tracing::Level::INFO);
    } else {
        run_end!(tracing::Level::WARN);
    }
}

/// A `--report` path that exists and is neither a file nor a folder (a
/// device such as /dev/stdout or /dev/null, a pipe, a socket, or a link to
/// one): the report is written beside it and renamed over it, which
/// replaced the node itself (as root, /dev/null became a file), and a
/// report sent to stdout that way would land among a `-` sink's rows.
/// Refused before anything is read; `--report -` is stdout.
fn refuse_a_special_report_file(path: &str) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() && !m.is_dir() => Err(Error::Usage(format!(
            "--report {path}: not a regular file (a device, pipe or socket); give a file, or - for stdout"
        ))),
        _ => Ok(()),
    }
}

/// `--report -` puts the report on stdout; a sink on `-` puts its rows
/// there: together a reader could not tell them apart. Refused before
/// anything is read.
fn refuse_two_on_stdout(settings: &job::RunSettings) -> Result<(), Error> {
    let on_stdout = [
        ("replay", &settings.replay_sink),
        ("dlq", &settings.dlq_sink),
        ("gaps", &settings.gaps_sink),
        ("silences", &settings.silences_sink),
        ("anomalies", &settings.anomalies_sink),
        ("contradicted", &settings.contradicted_sink),
    ]
    .into_iter()
    .find(|(_, t)| t.as_deref() == Some("-"));
    match on_stdout {
        Some((kind, _)) => Err(Error::Usage(format!(
            "--report - and the {kind} sink - both write to stdout; give the report a file (--report FILE) or the {kind} sink another target"
        ))),
        None => Ok(()),
    }
}
