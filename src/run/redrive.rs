//! `backfill redrive`: dead letters of earlier committed runs, selected by
//! a SQL predicate over their columns, replayed to a sink and committed
//! under a run id of their own — through the same sinks and the same commit
//! protocol as `run` ([`super::commit`]): write under staged names, finish,
//! prepare, append the log entry, publish. A failed redrive leaves the state
//! as it was.
//!
//! What it reads: only the DLQ files the log entries of committed runs list
//! for the `--dlq` folder (a file of an uncommitted attempt, or one another
//! job left in the same folder, is never read). What it records: one ledger
//! entry per dead letter sent, outcome `redrive`, which `run` does not count
//! (a dead-lettered event stays dead-lettered for `run`), and which the next
//! redrive reads to leave out what was sent before (`--again` to force).
//! Attempts continue from the highest attempt the ledger holds for the
//! event. This module decides nothing about the archive and never writes to
//! the DLQ it reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::Utc;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use super::commit::{self, Identity};
use super::{OpenSink, Phases, RunOutcome, folder_key, nested, nonce};
use crate::cli::{Format, RedriveArgs};
use crate::error::Error;
use crate::failpoint;
use crate::job::{self, Columns};
use crate::location::{self, Location, StorageSettings};
use crate::policy::out_columns;
use crate::report::{Redrive, Report};
use crate::sink::{self, RowColumns, SinkContext, SinkKind};
use crate::state::{AttemptRecord, Manifest, State};

/// The outcome of a redrive's ledger entries: `run` ignores it (only
/// `replay` and `dlq` decide an event), the next redrive reads it.
pub const LEDGER_OUTCOME: &str = "redrive";

/// Short names the predicate may use for the backfill_* columns of a dead
/// letter; each is added only when the DLQ has no column of that name.
const ALIASES: [(&str, &str); 4] = [
    ("reason", out_columns::REASON),
    ("run_id", out_columns::RUN_ID),
    ("attempt", out_columns::ATTEMPT),
    ("detected_at", out_columns::DETECTED_AT),
];

/// Columns the selection query adds after the dead letter's own.
const NEXT_ATTEMPT: &str = "__backfill_next_attempt";
const NO_ID: &str = "__backfill_no_id";
const REDRIVEN: &str = "__backfill_redriven";

/// The redrive's settings, layered: flags over the job file.
struct Settings {
    run_id: String,
    state: String,
    dlq: String,
    to: String,
    predicate: String,
    again: bool,
    dry_run: bool,
    storage: StorageSettings,
    kafka: Option<crate::kafka::KafkaSettings>,
}

fn settings(args: &RedriveArgs) -> Result<Settings, Error> {
    let job = match &args.job {
        Some(p) => job::load_job_file(p)?,
        None => job::JobFile::default(),
    };
    let storage = job.storage.clone().unwrap_or_default();
    let sinks = job.sinks.clone().unwrap_or_default();
    let out = args.out.clone().or(job.out.clone());
    let out_loc = match &out {
        Some(o) => Some(location::resolve(o, &storage)?),
        None => None,
    };
    let or_default = |given: Option<String>, kind: SinkKind, flag: &str| {
        given
            .or_else(|| out_loc.as_ref().map(|o| sink::default_target(o, kind)))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "redrive: no location for {flag}: pass --out DIR or {flag} LOCATION"
                ))
            })
    };
    let state = match (args.state.clone().or(job.state.clone()), &out) {
        (Some(s), _) => s,
        (None, Some(o)) => format!("{}/_state", o.trim_end_matches('/')),
        (None, None) => {
            return Err(Error::Usage(
                "redrive: no state location: pass --out DIR (state DIR/_state) or --state LOCATION"
                    .into(),
            ));
        }
    };
    let dlq = or_default(args.dlq.clone().or(sinks.dlq), SinkKind::Dlq, "--dlq")?;
    if crate::sink::outside_the_lake(&dlq) {
        return Err(Error::Usage(format!(
            "--dlq {}: redrive reads the Parquet folder committed runs wrote their dead letters to; a DLQ on stdout or a Kafka topic is not kept by backfill",
            crate::redact::url(&dlq)
        )));
    }
    let to = or_default(args.to.clone().or(sinks.replay), SinkKind::Replay, "--to")?;
    let predicate = args.predicate.trim().to_string();
    if predicate.is_empty() {
        return Err(Error::Usage(
            "--where: the predicate is empty; `--where true` selects every dead letter".into(),
        ));
    }
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("redrive-{}", Utc::now().format("%Y%m%dT%H%M%SZ")));
    job::validate_run_id(&run_id)?;
    Ok(Settings {
        run_id,
        state,
        dlq,
        to,
        predicate,
        again: args.again,
        dry_run: args.dry_run,
        storage,
        kafka: job.kafka.clone(),
    })
}

/// Recorded with the entry: a rerun of the redrive's id must match them.
fn decision_settings(s: &Settings) -> serde_json::Value {
    serde_json::json!({
        "kind": "redrive",
        "dlq": commit::location_meaning(&s.dlq, &s.storage),
        "where": s.predicate,
        "to": commit::location_meaning(&s.to, &s.storage),
        "again": s.again,
    })
}

/// One committed run's dead-letter files in the DLQ folder.
struct DlqFiles<'a> {
    run: &'a Manifest,
    /// Object URLs, at their final names or still staged (a committed run
    /// whose publishing was interrupted).
    urls: Vec<String>,
}

/// The DLQ files of every committed run that wrote dead letters to `dlq`:
/// only what their log entries list. Unknown to every committed run: exit 2,
/// naming the folders they did write to.
async fn dlq_files<'a>(
    dlq: &Location,
    runs: &'a [Manifest],
    storage: &StorageSettings,
    state: &State,
) -> Result<Vec<DlqFiles<'a>>, Error> {
    let ours = folder_key(dlq);
    let mut known = BTreeSet::new();
    let mut out = vec![];
    for m in runs {
        for p in m.publish.iter().filter(|p| p.kind == SinkKind::Dlq.name()) {
            let Ok(base) = location::resolve(&p.target, storage) else {
                continue;
            };
            if folder_key(&base) != ours {
                known.insert(base.display_path(&base.prefix));
                continue;
            }
            let mut urls = vec![];
            for f in &p.files {
                let mut found = None;
                for name in [&f.published, &f.staged] {
                    let path = base.path(name);
                    match base.store.head(&path).await {
                        Ok(_) => {
                            found = Some(base.object_url(&path));
                            break;
                        }
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            return Err(Error::Io {
                                what: base.display_path(&path),
                                message: location::store_error_line(&e),
                            });
                        }
                    }
                }
                let Some(url) = found else {
                    return Err(Error::Io {
                        what: format!("the dead letters of committed run '{}'", m.run_id),
                        message: format!(
                            "{} is missing (neither published nor staged)",
                            base.display_path(&base.path(&f.published))
                        ),
                    });
                };
                urls.push(url);
            }
            out.push(DlqFiles { run: m, urls });
        }
    }
    if out.is_empty() {
        let elsewhere = if known.is_empty() {
            "none of its runs wrote dead letters to a folder".to_string()
        } else {
            format!(
                "its runs wrote them to {}",
                known.into_iter().collect::<Vec<_>>().join(", ")
            )
        };
        return Err(Error::Usage(format!(
            "--dlq {}: no committed run of the state {} wrote dead letters there; {elsewhere}",
            dlq.display_path(&dlq.prefix),
            state.loc.display_path(&state.loc.prefix)
        )));
    }
    Ok(out)
}

/// The input-contract column names the dead letters carry: those of the
/// runs that wrote them (recorded with each entry; older entries: the
/// defaults). Runs that named them differently cannot be redriven together.
fn columns_of(files: &[DlqFiles<'_>]) -> Result<Columns, Error> {
    let mut seen: Option<(String, BTreeMap<String, String>)> = None;
    for f in files.iter().filter(|f| !f.urls.is_empty()) {
        let cols: BTreeMap<String, String> = f
            .run
            .settings
            .get("columns")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        match &seen {
            Some((other, theirs)) if *theirs != cols => {
                return Err(Error::Usage(format!(
                    "--dlq: runs '{other}' and '{}' named the input columns differently ([columns]); redrive their dead letters separately, e.g. --where \"run_id = '{}' AND ...\"",
                    f.run.run_id, f.run.run_id
                )));
            }
            Some(_) => {}
            None => seen = Some((f.run.run_id.clone(), cols)),
        }
    }
    let mut c = Columns::default();
    if let Some((_, cols)) = seen {
        let get = |k: &str, d: &String| cols.get(k).cloned().unwrap_or_else(|| d.clone());
        c = Columns {
            event_id: get("event_id", &c.event_id),
            key: get("key", &c.key),
            seq: get("seq", &c.seq),
            event_time: get("event_time", &c.event_time),
            status: get("status", &c.status),
            attempts: get("attempts", &c.attempts),
            error: get("error", &c.error),
            payload: get("payload", &c.payload),
        };
    }
    Ok(c)
}

/// `"name"`, quoted for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Register `dead_letters`: the DLQ files as one table (their schemas
/// merged), with the short aliases of [`ALIASES`]. Returns the DLQ's own
/// columns.
async fn register_dead_letters(
    ctx: &SessionContext,
    dlq: &Location,
    files: &[DlqFiles<'_>],
    columns: &Columns,
) -> Result<SchemaRef, Error> {
    dlq.register(ctx);
    let urls: Vec<ListingTableUrl> = files
        .iter()
        .flat_map(|f| f.urls.iter())
        .map(ListingTableUrl::parse)
        .collect::<datafusion::error::Result<_>>()?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
    let schema: SchemaRef = if urls.is_empty() {
        // No dead letters yet: the columns every dead letter has, so that
        // the predicate is still checked.
        let mut fields: Vec<Field> = [&columns.event_id, &columns.key, &columns.error]
            .iter()
            .map(|c| Field::new(c.as_str(), DataType::Utf8, true))
            .collect();
        fields.push(Field::new(&columns.seq, DataType::Int64, true));
        fields.extend(crate::policy::backfill_fields());
        Arc::new(Schema::new(fields))
    } else {
        let state = ctx.state();
        let mut schemas = vec![];
        // Each file a committed run listed must read as a dead-letter file:
        // one that does not (emptied, cut short, replaced) is damage to the
        // state's outputs, exit 1 naming the file, not the user's mistake.
        for u in &urls {
            let damaged = |why: String| Error::Io {
                what: crate::redact::url(u.as_str()),
                message: format!("a dead-letter file a committed run wrote is damaged: {why}"),
            };
            let schema = options
                .infer_schema(&state, u)
                .await
                .map_err(|e| damaged(e.find_root().to_string()))?;
            if schema.index_of(out_columns::RUN_ID).is_err() {
                return Err(damaged(format!("no column {}", out_columns::RUN_ID)));
            }
            schemas.push(schema.as_ref().clone());
        }
        Arc::new(Schema::try_merge(schemas).map_err(|e| {
            Error::Usage(format!(
                "--dlq {}: the dead letters of these runs have incompatible columns ({e}); redrive them separately, e.g. --where \"run_id = '...' AND ...\"",
                dlq.display_path(&dlq.prefix)
            ))
        })?)
    };
    for needed in [
        out_columns::RUN_ID,
        out_columns::REASON,
        out_columns::ATTEMPT,
        columns.event_id.as_str(),
    ] {
        if schema.index_of(needed).is_err() {
            return Err(Error::Usage(format!(
                "--dlq {}: the dead letters have no column '{needed}': not a DLQ written by backfill",
                dlq.display_path(&dlq.prefix)
            )));
        }
    }
    let table: Arc<dyn datafusion::catalog::TableProvider> = if urls.is_empty() {
        Arc::new(datafusion::datasource::MemTable::try_new(
            schema.clone(),
            vec![vec![]],
        )?)
    } else {
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema.clone());
        Arc::new(ListingTable::try_new(config)?)
    };
    ctx.register_table("dlq_files", table)?;
    let mut select = vec!["*".to_string()];
    for (alias, column) in ALIASES {
        if schema.index_of(alias).is_err() {
            select.push(format!("{} AS {}", ident(column), ident(alias)));
        }
    }
    let view = ctx
        .sql(&format!("SELECT {} FROM dlq_files", select.join(", ")))
        .await?
        .into_view();
    ctx.register_table("dead_letters", view)?;
    Ok(schema)
}

/// The dead letters the predicate selects, with what the ledger says of
/// each: the next attempt, no event_id, redriven before. Ordered by key
/// and seq, so that a consumer sees each key's events in order.
async fn selection(
    ctx: &SessionContext,
    predicate: &str,
    dlq_schema: &Schema,
    columns: &Columns,
) -> Result<datafusion::dataframe::DataFrame, Error> {
    let bad = |e: datafusion::error::DataFusionError| {
        let text = e.to_string();
        let text = text
            .strip_prefix("Error during planning: ")
            .unwrap_or(&text)
            .replace("dead_letters.", "")
            .replace(". Consider using HAVING instead", "");
        Error::Usage(format!("--where \"{predicate}\": {text}"))
    };
    // One expression and nothing after it (no `; DROP ...`, no `) OR (`),
    // planned as the WHERE of a query so that subqueries see the tables.
    let expr = {
        use datafusion::sql::sqlparser::{
            dialect::GenericDialect, parser::Parser, tokenizer::Token,
        };
        let dialect = GenericDialect {};
        let mut parser = Parser::new(&dialect)
            .try_with_sql(predicate)
            .map_err(|e| bad(e.into()))?;
        let expr = parser.parse_expr().map_err(|e| bad(e.into()))?;
        let next = parser.peek_token();
        if next.token != Token::EOF {
            return Err(Error::Usage(format!(
                "--where \"{predicate}\": one expression expected, found `{}` after it{}",
                next.token, next.span.start
            )));
        }
        expr
    };
    let selected = ctx
        .sql(&format!("SELECT * FROM dead_letters WHERE {expr}"))
        .await
        .map_err(bad)?;
    // Planned now, so that a predicate that names no column, or is not a
    // boolean, fails here (exit 2) and not in the middle of sending.
    selected.clone().create_physical_plan().await.map_err(bad)?;
    // A volatile predicate (`random() < 0.5`, `now()`-relative ones are
    // stable, not volatile) would select one set in a dry run and another
    // in the redrive it previews, and another again in a rerun.
    let mut volatile = false;
    {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        selected
            .logical_plan()
            .apply(|node| {
                if let datafusion::logical_expr::LogicalPlan::Filter(f) = node
                    && f.predicate.is_volatile()
                {
                    volatile = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .map_err(bad)?;
    }
    if volatile {
        return Err(Error::Usage(format!(
            "--where \"{predicate}\": a volatile function (random() ...) would select other rows in each run and in its dry run; select by the dead letters' columns"
        )));
    }
    ctx.register_table("selected", selected.into_view())?;
    let own: Vec<String> = dlq_schema
        .fields()
        .iter()
        .map(|f| format!("s.{}", ident(f.name())))
        .collect();
    let id = format!("CAST(s.{} AS VARCHAR)", ident(&columns.event_id));
    let order: Vec<String> = [&columns.key, &columns.seq, &columns.event_id]
        .into_iter()
        .filter(|c| dlq_schema.index_of(c).is_ok())
        .map(|c| format!("s.{} NULLS LAST", ident(c)))
        .collect();
    let sql = format!(
        "SELECT {own}, \
           CAST(greatest(coalesce(l.attempt, 0), coalesce(s.{attempt}, 0)) + 1 AS INT) AS {NEXT_ATTEMPT}, \
           s.{eid} IS NULL AS {NO_ID}, \
           r.event_id IS NOT NULL AS {REDRIVEN} \
         FROM selected s \
         LEFT JOIN (SELECT event_id, max(attempt) AS attempt FROM ledger_entries GROUP BY event_id) l \
           ON {id} = l.event_id \
         LEFT JOIN (SELECT DISTINCT event_id FROM ledger_entries WHERE outcome = '{LEDGER_OUTCOME}') r \
           ON {id} = r.event_id \
         ORDER BY {order}",
        own = own.join(", "),
        attempt = ident(out_columns::ATTEMPT),
        eid = ident(&columns.event_id),
        order = order.join(", "),
    );
    Ok(ctx.sql(&sql).await?)
}

/// The schema of the rows a redrive sends: the dead letter's own columns
/// (its backfill_* replaced), the backfill_* of this redrive, and
/// backfill_redrive_of.
fn output_schema(dlq: &Schema) -> SchemaRef {
    let ours: Vec<Field> = crate::policy::backfill_fields();
    let mut fields: Vec<Field> = dlq
        .fields()
        .iter()
        .filter(|f| {
            f.name() != out_columns::REDRIVE_OF && !ours.iter().any(|o| o.name() == f.name())
        })
        // As written to the DLQ: the scan reads strings as views.
        .map(|f| {
            let t = match f.data_type() {
                DataType::Utf8View => DataType::Utf8,
                DataType::BinaryView => DataType::Binary,
                t => t.clone(),
            };
            f.as_ref().clone().with_data_type(t)
        })
        .collect();
    fields.extend(ours);
    fields.push(Field::new(out_columns::REDRIVE_OF, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

/// One batch of the selection: the rows to send (as the sink receives
/// them) and the batch's counts.
struct Split {
    send: RecordBatch,
    selected: u64,
    without_id: u64,
    redriven_before: u64,
    of_runs: BTreeMap<String, u64>,
}

fn split(
    b: &RecordBatch,
    out_schema: &SchemaRef,
    run_id: &str,
    again: bool,
    detected_at_us: i64,
) -> Result<Split, Error> {
    let col = |name: &str| -> Result<&ArrayRef, Error> {
        b.column_by_name(name)
            .ok_or_else(|| Error::Internal(format!("redrive: the selection has no {name}")))
    };
    let no_id = col(NO_ID)?.as_boolean().clone();
    let redriven = col(REDRIVEN)?.as_boolean().clone();
    let n = b.num_rows();
    let mut send = Vec::with_capacity(n);
    let (mut without_id, mut redriven_before) = (0, 0);
    for i in 0..n {
        let missing = no_id.is_valid(i) && no_id.value(i);
        let before = !missing && redriven.is_valid(i) && redriven.value(i);
        without_id += missing as u64;
        redriven_before += before as u64;
        send.push(!missing && (again || !before));
    }
    let mask = BooleanArray::from(send);
    let rows = filter_record_batch(b, &mask)?;
    let m = rows.num_rows();
    let dead_by = cast(col(out_columns::RUN_ID)?, &DataType::Utf8)?;
    let dead_by = arrow::compute::filter(&dead_by, &mask)?;
    let reason = cast(
        rows.column_by_name(out_columns::REASON)
            .ok_or_else(|| Error::Internal("redrive: no reason".into()))?,
        &DataType::Utf8,
    )?;
    let attempt = rows
        .column_by_name(NEXT_ATTEMPT)
        .ok_or_else(|| Error::Internal("redrive: no attempt".into()))?
        .clone();
    let mut of_runs = BTreeMap::new();
    for v in dead_by.as_string::<i32>().iter().flatten() {
        *of_runs.entry(v.to_string()).or_insert(0u64) += 1;
    }
    let mut cols: Vec<ArrayRef> = vec![];
    for f in out_schema.fields() {
        let c: ArrayRef = match f.name().as_str() {
            out_columns::RUN_ID => Arc::new(StringArray::from(vec![run_id; m])),
            out_columns::REASON => reason.clone(),
            out_columns::ATTEMPT => attempt.clone(),
            out_columns::DETECTED_AT => Arc::new(
                TimestampMicrosecondArray::from(vec![detected_at_us; m]).with_timezone("UTC"),
            ),
            out_columns::REDRIVE_OF => dead_by.clone(),
            name => cast(
                rows.column_by_name(name)
                    .ok_or_else(|| Error::Internal(format!("redrive: no column {name}")))?,
                f.data_type(),
            )?,
        };
        cols.push(c);
    }
    let send = RecordBatch::try_new(out_schema.clone(), cols)?;
    Ok(Split {
        send,
        selected: n as u64,
        without_id,
        redriven_before,
        of_runs,
    })
}

/// Ledger entries for the rows sent: (run_id, event_id, `redrive`, the
/// dead letter's reason, the attempt sent).
fn ledger_entries(send: &RecordBatch, run_id: &str, event_id: &str) -> Result<RecordBatch, Error> {
    let n = send.num_rows();
    let get = |name: &str| {
        send.column_by_name(name)
            .ok_or_else(|| Error::Internal(format!("redrive: no column {name}")))
    };
    Ok(RecordBatch::try_new(
        crate::detect::ledger_entries_schema(),
        vec![
            Arc::new(StringArray::from(vec![run_id; n])),
            cast(get(event_id)?, &DataType::Utf8)?,
            Arc::new(StringArray::from(vec![LEDGER_OUTCOME; n])),
            cast(get(out_columns::REASON)?, &DataType::Utf8)?,
            cast(get(out_columns::ATTEMPT)?, &DataType::Int32)?,
        ],
    )?)
}

/// `backfill redrive`.
pub async fn redrive(args: RedriveArgs) -> Result<RunOutcome, Error> {
    let started = Instant::now();
    let phases = Phases::new(args.progress);
    let s = settings(&args)?;
    let id = Identity {
        run_id: s.run_id.clone(),
        settings: decision_settings(&s),
        fail_on_dlq: false,
        storage: s.storage.clone(),
        kafka: s.kafka.clone(),
        started,
    };
    let state = State::new(location::resolve(&s.state, &s.storage)?);
    if let Err(reason) = state.loc.check_local_writable() {
        return Err(Error::Usage(format!(
            "state {}: {reason}",
            state.loc.display_path(&state.loc.prefix)
        )));
    }
    let dlq = location::resolve(&s.dlq, &s.storage)?;
    let mut report = Report {
        run_id: s.run_id.clone(),
        dry_run: s.dry_run,
        state: Some(state.loc.original.clone()),
        redrive: Some(Redrive {
            dlq: dlq.display_path(&dlq.prefix),
            predicate: s.predicate.clone(),
            again: s.again,
            ..Default::default()
        }),
        ..Default::default()
    };
    phases.set("reading state");
    let snapshot = state.snapshot().await?;
    if !s.dry_run {
        match state.roll_forward(&snapshot, &s.storage).await {
            Ok(runs) => report.rolled_forward = runs,
            Err(e) => tracing::warn!(
                "{}",
                crate::redact::line(&format!("{e}; `backfill state gc` retries it"))
            ),
        }
    }
    if let Some(m) = snapshot.committed(&s.run_id) {
        let mut r = commit::committed_again(m, &id)?;
        r.elapsed_ms = started.elapsed().as_millis() as u64;
        phases.done();
        return Ok(RunOutcome {
            report: r,
            stdout_taken: false,
        });
    }
    let runs: Vec<Manifest> = snapshot.runs().cloned().collect();
    // A typo in --out / --state must not read as "no dead letters there".
    if runs.is_empty() && state.is_empty().await? {
        return Err(Error::Usage(format!(
            "redrive: there is no backfill state at {} (no commit log): check --out / --state",
            state.loc.display_path(&state.loc.prefix)
        )));
    }
    state.verify_ledgers(&runs).await?;
    if !s.dry_run
        && let Some(mut r) = commit::recover_prepared(&state, &id).await?
    {
        r.elapsed_ms = started.elapsed().as_millis() as u64;
        phases.done();
        return Ok(RunOutcome {
            report: r,
            stdout_taken: false,
        });
    }

    // The plan: which files, which columns, which rows; all checked before
    // a sink is opened.
    phases.set("selecting dead letters");
    let files = dlq_files(&dlq, &runs, &s.storage, &state).await?;
    let columns = columns_of(&files)?;
    let ctx = SessionContext::new();
    let dlq_schema = register_dead_letters(&ctx, &dlq, &files, &columns).await?;
    state.register_ledger(&ctx, &runs).await?;
    let selection = selection(&ctx, &s.predicate, &dlq_schema, &columns).await?;
    let out_schema = output_schema(&dlq_schema);

    // The sink, checked before anything is sent; never inside the DLQ it
    // reads or the state.
    let mut stdout_taken = false;
    let mut targets = vec![];
    if !crate::sink::outside_the_lake(&s.to) {
        let base = location::resolve(&s.to, &s.storage)?;
        let key = folder_key(&base);
        for (what, other) in [("the DLQ", &dlq), ("the state", &state.loc)] {
            let theirs = folder_key(other);
            if nested(&key, &theirs) || nested(&theirs, &key) {
                return Err(Error::Usage(format!(
                    "--to {} and {what} {} share a folder; give the redrive a folder of its own (a replay folder)",
                    base.display_path(&base.prefix),
                    other.display_path(&other.prefix)
                )));
            }
        }
        targets.push(base.display_path(&base.prefix));
    }
    stdout_taken |= s.to == "-" && !s.dry_run;
    let run_nonce = nonce();
    let c = &columns;
    let sink_ctx = SinkContext {
        run_id: s.run_id.clone(),
        nonce: run_nonce.clone(),
        kind: SinkKind::Replay,
        schema: out_schema.clone(),
        columns: Arc::new(RowColumns {
            event_id: c.event_id.clone(),
            key: c.key.clone(),
            seq: c.seq.clone(),
            event_time: c.event_time.clone(),
            status: c.status.clone(),
            error: c.error.clone(),
            payload: c.payload.clone(),
        }),
        storage: s.storage.clone(),
        kafka: s.kafka.clone(),
    };
    let mut opened = sink::open(&s.to, sink_ctx)?;
    phases.set("checking the sink");
    if s.dry_run {
        opened.preflight().await?;
        report.outputs.insert(
            SinkKind::Replay.name().to_string(),
            sink::SinkReceipt {
                target: crate::redact::url(&s.to),
                ..Default::default()
            },
        );
    } else {
        opened.check().await?;
    }
    let mut sinks = vec![OpenSink {
        kind: SinkKind::Replay,
        sink: opened,
    }];

    let result = async {
        if !s.dry_run {
            state
                .record_attempt(&AttemptRecord {
                    run_id: s.run_id.clone(),
                    nonce: run_nonce.clone(),
                    started_at: Utc::now(),
                    based_on: snapshot.head,
                    targets: targets.clone(),
                })
                .await?;
            failpoint::hit("after_attempt_record").await?;
        }
        let mut ledger = if s.dry_run {
            None
        } else {
            Some(state.ledger_writer(&s.run_id, &run_nonce)?)
        };
        let detected_at_us = Utc::now().timestamp_micros();
        let mut figures = report.redrive.clone().unwrap_or_default();
        let mut sent = 0u64;
        let mut shown: Vec<RecordBatch> = vec![];
        let mut stream = selection.execute_stream().await?;
        phases.set("sending dead letters");
        while let Some(b) = stream.next().await {
            let b = b.map_err(|e| while_selecting(&s.predicate, e))?;
            let part = split(&b, &out_schema, &s.run_id, s.again, detected_at_us)?;
            figures.selected += part.selected;
            figures.without_event_id += part.without_id;
            figures.already_redriven += part.redriven_before;
            for (run, n) in part.of_runs {
                *figures.of_runs.entry(run).or_insert(0) += n;
            }
            let rows = part.send.num_rows() as u64;
            if rows == 0 {
                continue;
            }
            sent += rows;
            phases.set(format!("sending dead letters: {sent}"));
            if s.dry_run {
                shown.push(plan_rows(&part.send, c)?);
                continue;
            }
            for o in sinks.iter_mut() {
                o.sink.write(&part.send).await?;
            }
            let entries = ledger_entries(&part.send, &s.run_id, &c.event_id)?;
            if let Some(l) = ledger.as_mut() {
                l.write(&entries).await?;
            }
            failpoint::hit("redrive_after_batch").await?;
        }
        report.replayed = sent;
        let left_out = if s.again { 0 } else { figures.already_redriven };
        if figures.selected != sent + left_out + figures.without_event_id {
            return Err(Error::Internal(format!(
                "the redrive does not balance: {} selected != {sent} sent + {left_out} redriven before + {} without event_id",
                figures.selected, figures.without_event_id
            )));
        }
        report.redrive = Some(figures);
        if s.dry_run {
            if let Some(r) = report.outputs.get_mut(SinkKind::Replay.name()) {
                r.rows = sent;
            }
            let schema = shown
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| plan_schema(c, &out_schema));
            if shown.is_empty() {
                return Ok(());
            }
            let mut out = crate::shell::print::Out::stdout();
            crate::shell::print::print_batches(&mut out, schema, &shown, Format::Table)?;
            return Ok(());
        }
        failpoint::hit("after_write").await?;
        commit::commit_and_publish(
            &state,
            &id,
            &mut sinks,
            ledger,
            snapshot.head,
            &run_nonce,
            &mut report,
            &phases,
        )
        .await
    }
    .await;
    if let Err(e) = result {
        let attempt = (!s.dry_run).then_some((&state, s.run_id.as_str(), run_nonce.as_str()));
        return Err(super::abort(e, &mut sinks, attempt, &phases).await);
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    phases.done();
    Ok(RunOutcome {
        report,
        stdout_taken,
    })
}

/// An error while the selection runs. What the predicate computes can
/// fail only on the rows it meets (a division by zero, a cast, a scalar
/// subquery of several rows): the user's to fix, so exit 2 naming
/// `--where`, not 1, which a scheduler retries to the same end. Reading
/// (I/O, the store, Parquet, memory) stays what it is.
fn while_selecting(predicate: &str, e: datafusion::error::DataFusionError) -> Error {
    use datafusion::error::DataFusionError as D;
    let theirs = match e.find_root() {
        D::ArrowError(a, _) => !matches!(
            a.as_ref(),
            arrow::error::ArrowError::IoError(..) | arrow::error::ArrowError::ExternalError(_)
        ),
        D::Execution(_) => true,
        _ => false,
    };
    if theirs {
        Error::Usage(format!("--where \"{predicate}\": {}", e.find_root()))
    } else {
        e.into()
    }
}

/// The columns a dry run lists of each dead letter it would send.
fn plan_columns(c: &Columns) -> Vec<String> {
    vec![
        c.event_id.clone(),
        c.key.clone(),
        c.seq.clone(),
        out_columns::REASON.to_string(),
        out_columns::REDRIVE_OF.to_string(),
        out_columns::ATTEMPT.to_string(),
    ]
}

fn plan_schema(c: &Columns, out: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = plan_columns(c)
        .iter()
        .filter_map(|n| out.field_with_name(n).ok().cloned())
        .collect();
    Arc::new(Schema::new(fields))
}

/// A dry run's listing of the rows it would send: the narrow columns.
fn plan_rows(send: &RecordBatch, c: &Columns) -> Result<RecordBatch, Error> {
    let schema = plan_schema(c, &send.schema());
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .filter_map(|f| send.column_by_name(f.name()).cloned())
        .collect();
    Ok(RecordBatch::try_new(schema, cols)?)
}
