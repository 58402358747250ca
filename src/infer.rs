//! `backfill infer`: the transactions lost between two snapshots of
//! per-key totals, inferred from what the snapshots moved and what the
//! archive holds between them (`sql/infer.sql`). Where the data decides it
//! (an amount missing and exactly one seq gap), one compensating event per
//! key, flagged `inferred = true` with its seq range and derivation,
//! written to `OUT/inferred/`; sent to a replay sink only when asked
//! (`--emit-inferred LOC`). Everything else is reported as `ambiguous`,
//! never guessed. Reads the archive and the snapshots only; records
//! nothing in the state.

use std::sync::Arc;

use chrono::Utc;
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;

use crate::cli::InferArgs;
use crate::error::Error;
use crate::sink::{self, RowColumns, SinkContext, SinkKind};

pub const INFER_SQL: &str = include_str!("../sql/infer.sql");

/// The inferred events of the per-key report (`inference`).
const INFERRED_SQL: &str = "SELECT concat('inferred:', key, ':', CAST(first_missing_seq AS VARCHAR), '-', CAST(last_missing_seq AS VARCHAR)) AS event_id_text, \
    arrow_cast(key, 'Utf8') AS key, first_missing_seq AS seq_from, last_missing_seq AS seq_to, \
    missing_amount AS amount, true AS inferred, \
    concat('total_after ', CAST(total_after AS VARCHAR), ' - total_before ', CAST(total_before AS VARCHAR), \
           ' - archived ', CAST(archived AS VARCHAR), ' = ', CAST(missing_amount AS VARCHAR), \
           '; one gap: seq ', CAST(first_missing_seq AS VARCHAR), '..', CAST(last_missing_seq AS VARCHAR)) AS derivation_text \
    FROM inference WHERE verdict = 'inferred' ORDER BY key";

/// The inferred events with plain Utf8 text (DataFusion's string functions
/// return views; the outputs keep Arrow's plain strings, as `run`'s do).
const INFERRED_OUT_SQL: &str = "SELECT arrow_cast(event_id_text, 'Utf8') AS event_id, key, seq_from, seq_to, amount, inferred, \
    arrow_cast(derivation_text, 'Utf8') AS derivation FROM inferred_raw";

/// Register a snapshot of totals (`key`, `total`) as `name`.
async fn register_snapshot(
    ctx: &SessionContext,
    name: &str,
    flag: &str,
    loc: &str,
    storage: &crate::location::StorageSettings,
) -> Result<(), Error> {
    use crate::snapshot::Column;
    let columns = [
        Column {
            name: "key",
            source: "key",
            text: true,
            number: false,
            optional: false,
            hint: "",
        },
        Column {
            name: "total",
            source: "total",
            text: false,
            number: true,
            optional: false,
            hint: "",
        },
    ];
    crate::snapshot::register(ctx, name, flag, loc, storage, &columns).await
}

/// The per-key report over the registered `events`, `gaps` and snapshots.
pub async fn report(
    ctx: &SessionContext,
    amount: &str,
    tolerance: f64,
) -> Result<DataFrame, Error> {
    if !tolerance.is_finite() || tolerance < 0.0 {
        return Err(Error::Usage(format!(
            "--tolerance {tolerance}: not a non-negative number"
        )));
    }
    // One value per event: planned alone first, so that a subquery, a
    // volatile function or an aggregate is named as --amount's fault.
    crate::state_at::check_aggregate(
        ctx,
        &format!("--amount {amount:?}"),
        &format!("sum(({amount}))"),
    )
    .await?;
    let sql = INFER_SQL
        .replace("/*amount*/", &format!("({amount})"))
        .replace("0 /*tolerance*/", &format!("{tolerance:?}"));
    ctx.sql(&sql).await.map_err(|e| {
        let m = e.strip_backtrace();
        Error::Usage(format!(
            "--amount {amount:?}: {}",
            m.lines().next().unwrap_or_default()
        ))
    })
}

/// `backfill infer`.
pub async fn infer(args: InferArgs) -> Result<(), Error> {
    let (mut scan, job) = crate::job::scan_settings(&args.scan)?;
    crate::job::no_cluster(&args.scan, &scan, "infer")?;
    if scan.from.is_none() || scan.to.is_none() {
        return Err(Error::Usage(
            "infer: give the interval between the snapshots: --from T1 (the first snapshot's time) and --to T2".into(),
        ));
    }
    if !scan.detect_gaps {
        return Err(Error::Usage(
            "infer: needs gap detection (the lost events' seq ranges); drop --no-gaps".into(),
        ));
    }
    let mut targets = vec![];
    if let Some(out) = args.out.clone().or(job.out.clone()) {
        targets.push(format!("{}/inferred", out.trim_end_matches('/')));
        // The root too: the archive itself is refused as one.
        if !crate::sink::outside_the_lake(&out) {
            scan.exclude.push(out);
        }
    }
    if let Some(t) = &args.emit_inferred {
        targets.push(t.clone());
    }
    // As for a run: outputs are never read back as events.
    scan.exclude.extend(
        targets
            .iter()
            .filter(|t| !crate::sink::outside_the_lake(t))
            .cloned(),
    );
    let ctx = crate::source::session(&scan)?;
    crate::source::register(&ctx, &scan).await?;
    crate::detect::register_views(&ctx, &scan).await?;
    register_snapshot(
        &ctx,
        "snapshot_before",
        "--before",
        &args.before,
        &scan.storage,
    )
    .await?;
    register_snapshot(
        &ctx,
        "snapshot_after",
        "--after",
        &args.after,
        &scan.storage,
    )
    .await?;
    let report = report(&ctx, &args.amount, args.tolerance.unwrap_or(0.0)).await?;
    let schema = Arc::new(report.schema().as_arrow().clone());
    let rows = report.clone().collect().await?;
    ctx.register_table("inference", report.into_view())?;
    crate::commands::print_batches(schema, &rows, args.format)?;

    let raw = ctx.sql(INFERRED_SQL).await?;
    ctx.register_table("inferred_raw", raw.into_view())?;
    let inferred = ctx.sql(INFERRED_OUT_SQL).await?;
    let batches = inferred.clone().collect().await?;
    let schema = Arc::new(inferred.schema().as_arrow().clone());
    let rows = write_all(
        &targets,
        SinkKind::Inferred,
        schema,
        &batches,
        &scan,
        job.kafka.clone(),
    )
    .await?;
    for (target, n) in targets.iter().zip(rows) {
        tracing::info!(
            "{}",
            crate::redact::line(&format!("{n} inferred event(s) written to {target}"))
        );
    }
    Ok(())
}

/// Write `batches` to every sink of `targets` for a command that records
/// nothing in the state (`infer`, `reconcile`): all are opened and checked
/// before any is written (a broker or folder that cannot take them fails
/// the command with nothing written anywhere), then each is written,
/// finished and published; on a failure, each is aborted. The rows each
/// received.
pub async fn write_all(
    targets: &[String],
    kind: SinkKind,
    schema: arrow::datatypes::SchemaRef,
    batches: &[arrow::record_batch::RecordBatch],
    scan: &crate::job::Scan,
    kafka: Option<crate::kafka::KafkaSettings>,
) -> Result<Vec<u64>, Error> {
    let run_id = format!(
        "{}-{}",
        kind.name(),
        Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    );
    let mut sinks = vec![];
    for target in targets {
        let ctx_sink = SinkContext {
            run_id: run_id.clone(),
            nonce: format!(
                "{}-{}",
                Utc::now().timestamp_nanos_opt().unwrap_or_default(),
                std::process::id()
            ),
            kind,
            schema: schema.clone(),
            columns: Arc::new(RowColumns {
                event_id: "event_id".into(),
                key: "key".into(),
                seq: "seq_from".into(),
                event_time: "event_time".into(),
                status: "status".into(),
                error: "error".into(),
                payload: "payload".into(),
            }),
            storage: scan.storage.clone(),
            kafka: kafka.clone(),
        };
        sinks.push(sink::open(target, ctx_sink)?);
    }
    let delivered = async {
        for out in sinks.iter_mut() {
            out.check().await?;
        }
        let mut rows = vec![];
        for out in sinks.iter_mut() {
            for b in batches {
                out.write(b).await?;
            }
            rows.push(out.finish().await?.rows);
        }
        for out in sinks.iter_mut() {
            out.precommit().await?;
        }
        for out in sinks.iter_mut() {
            out.publish().await?;
        }
        Ok::<_, Error>(rows)
    }
    .await;
    if delivered.is_err() {
        for out in sinks.iter_mut() {
            out.abort().await;
        }
    }
    delivered
}
