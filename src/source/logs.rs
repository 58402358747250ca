//! Application logs as evidence (`--logs`, `[logs]`): NDJSON / JSON-lines
//! files, plain or gzip, local or in an object store, read into the `logs`
//! table (event_id, log_time, level, message, error) by the job's field
//! mapping, and the per-event count of error-level lines a run's one-pass
//! detection reads ([`error_counts`]).
//!
//! We read the files ourselves (arrow-json's decoder, line by line) rather
//! than through DataFusion's NDJSON table: a bad line must be named by its
//! file and line, a timestamp may be an RFC 3339 string or epoch
//! milliseconds (a number), and each mapped field is read as text whatever
//! JSON type it has, so no schema is inferred from the first lines.
//!
//! Never opens files with std::fs: every byte comes through the location's
//! object store (a local file's handle is the one object_store opened).

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::SessionContext;
use object_store::path::Path;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt};

use crate::location::{self, LocationError, StorageSettings};

/// Rows per batch of the `logs` table.
const BATCH_ROWS: usize = 8192;

/// The file name endings read as logs.
pub const EXTENSIONS: [&str; 6] = [
    ".ndjson",
    ".jsonl",
    ".json",
    ".ndjson.gz",
    ".jsonl.gz",
    ".json.gz",
];

/// The JSON field each column of `logs` is read from (`[logs] event_id =
/// "evt"`, ...). Top-level fields only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogFields {
    pub event_id: String,
    pub timestamp: String,
    pub level: String,
    pub message: String,
    pub error: String,
}

impl Default for LogFields {
    fn default() -> Self {
        LogFields {
            event_id: "event_id".into(),
            timestamp: "timestamp".into(),
            level: "level".into(),
            message: "message".into(),
            error: "error".into(),
        }
    }
}

impl LogFields {
    /// (role, JSON field), in the order of the raw schema.
    pub fn pairs(&self) -> [(&'static str, &str); 5] {
        [
            ("event_id", &self.event_id),
            ("timestamp", &self.timestamp),
            ("level", &self.level),
            ("message", &self.message),
            ("error", &self.error),
        ]
    }
}

/// Validated `[logs]` / `--logs` settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogSettings {
    /// Files, folders (every log file below) or globs (`*`, `?` in the
    /// last part of the path).
    pub paths: Vec<String>,
    pub fields: LogFields,
    /// Levels that mean a failed attempt, upper case (compared
    /// case-insensitively).
    pub error_levels: Vec<String>,
}

/// Errors reading logs. `is_config` tells the user's input (exit 2) from a
/// store failing (exit 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogsError {
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error("logs {location}: no such file or directory")]
    NotFound { location: String },
    #[error("logs {location}: no log files found (*.ndjson, *.jsonl, *.json, and their .gz)")]
    Empty { location: String },
    #[error("logs {location}: cannot list: {message}")]
    List { location: String, message: String },
    #[error("logs file {file}: cannot read: {message}")]
    Read { file: String, message: String },
    #[error("logs file {file}, line {line}: not a JSON object per line (NDJSON): {message}")]
    NotJson {
        file: String,
        line: u64,
        message: String,
    },
    #[error(
        "logs file {file}, lines {first}-{last}: {message} (a mapped field holds text, a number or a boolean, not an object or an array)"
    )]
    BadValue {
        file: String,
        first: u64,
        last: u64,
        message: String,
    },
    #[error(
        "logs file {file}: no line has the field '{field}' ({role}); set [logs] {role} to the field that holds it"
    )]
    FieldAbsent {
        file: String,
        field: String,
        role: &'static str,
    },
    #[error(
        "logs file {file}, line {line}: the line names event {event_id} but has no '{field}' ({role})"
    )]
    MissingField {
        file: String,
        line: u64,
        field: String,
        role: &'static str,
        event_id: String,
    },
    #[error(
        "logs file {file}, line {line}: field '{field}' (timestamp) is '{value}': expected RFC 3339 (2024-01-01T10:00:00Z) or epoch milliseconds"
    )]
    BadTimestamp {
        file: String,
        line: u64,
        field: String,
        value: String,
    },
}

impl LogsError {
    /// True when the user's files or settings are at fault (exit 2).
    pub fn is_config(&self) -> bool {
        !matches!(self, LogsError::List { .. } | LogsError::Read { .. })
    }
}

/// One listed log file.
#[derive(Debug, Clone)]
pub struct LogFile {
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// The name errors use (a path for local files, a URL otherwise).
    pub display: String,
    gz: bool,
}

/// The `logs` table's schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, true),
        Field::new(
            "log_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("level", DataType::Utf8, true),
        Field::new("message", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
    ]))
}

fn is_log_name(name: &str) -> bool {
    !name.starts_with('_') && !name.starts_with('.') && EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// `*` any run of characters, `?` one.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// Every log file the settings name, in path order within each location.
pub async fn list(
    settings: &LogSettings,
    storage: &StorageSettings,
) -> Result<Vec<LogFile>, LogsError> {
    let mut out = vec![];
    for original in &settings.paths {
        // A glob in the last part: list its folder and match names.
        let (base, pattern) = match original.rsplit_once('/') {
            Some((dir, last)) if last.contains(['*', '?']) => {
                (if dir.is_empty() { "/" } else { dir }, Some(last))
            }
            None if original.contains(['*', '?']) => (".", Some(original.as_str())),
            _ => (original.as_str(), None),
        };
        let loc = location::resolve(base, storage)?;
        let list_err = |e: object_store::Error| LogsError::List {
            location: original.clone(),
            message: location::store_error_line(&e),
        };
        let file = |path: Path| LogFile {
            store: loc.store.clone(),
            display: loc.display_path(&path),
            gz: path.as_ref().ends_with(".gz"),
            path,
        };
        let mut found = vec![];
        let named_file = pattern.is_none()
            && loc
                .prefix
                .filename()
                .is_some_and(|n| EXTENSIONS.iter().any(|e| n.ends_with(e)));
        if named_file {
            match loc.store.head(&loc.prefix).await {
                Ok(m) => found.push(file(m.location)),
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(LogsError::NotFound {
                        location: original.clone(),
                    });
                }
                Err(e) => return Err(list_err(e)),
            }
        } else {
            if loc.is_local && !std::path::Path::new(&format!("/{}", loc.prefix)).exists() {
                return Err(LogsError::NotFound {
                    location: original.clone(),
                });
            }
            let metas: Vec<object_store::ObjectMeta> = match pattern {
                Some(_) => {
                    loc.store
                        .list_with_delimiter(Some(&loc.prefix))
                        .await
                        .map_err(list_err)?
                        .objects
                }
                None => {
                    use futures::TryStreamExt;
                    loc.store
                        .list(Some(&loc.prefix))
                        .try_collect()
                        .await
                        .map_err(list_err)?
                }
            };
            let mut paths: Vec<Path> = metas
                .into_iter()
                .map(|m| m.location)
                .filter(|p| {
                    let name = p.filename().unwrap_or_default();
                    is_log_name(name) && pattern.is_none_or(|pat| wildcard(pat, name))
                })
                // Folders named _x or .x below the location are skipped,
                // as the archive's are.
                .filter(|p| {
                    p.prefix_match(&loc.prefix).is_none_or(|mut parts| {
                        parts.all(|part| {
                            !part.as_ref().starts_with('_') && !part.as_ref().starts_with('.')
                        })
                    })
                })
                .collect();
            paths.sort();
            found.extend(paths.into_iter().map(file));
        }
        if found.is_empty() {
            return Err(LogsError::Empty {
                location: original.clone(),
            });
        }
        out.extend(found);
    }
    Ok(out)
}

/// Read one file, sending its rows in the `logs` schema, batch by batch.
/// The bytes are decoded on a blocking thread; a local file is read as it
/// goes, an object store's is fetched whole first.
async fn read_file(
    f: &LogFile,
    fields: &LogFields,
    tx: tokio::sync::mpsc::Sender<Result<RecordBatch, LogsError>>,
) -> Result<(), LogsError> {
    let read_err = |e: object_store::Error| LogsError::Read {
        file: f.display.clone(),
        message: location::store_error_line(&e),
    };
    let got = f.store.get(&f.path).await.map_err(read_err)?;
    let source: Box<dyn Read + Send> = match got.payload {
        GetResultPayload::File(file, _) => Box::new(file),
        GetResultPayload::Stream(_) => {
            Box::new(std::io::Cursor::new(got.bytes().await.map_err(read_err)?))
        }
    };
    let source: Box<dyn Read + Send> = if f.gz {
        Box::new(flate2::read::MultiGzDecoder::new(source))
    } else {
        source
    };
    let display = f.display.clone();
    let fields = fields.clone();
    tokio::task::spawn_blocking(move || decode(BufReader::new(source), &display, &fields, &tx))
        .await
        .map_err(|e| LogsError::Read {
            file: f.display.clone(),
            message: e.to_string(),
        })?
}

/// The blocking half of [`read_file`].
fn decode(
    mut r: impl BufRead,
    file: &str,
    fields: &LogFields,
    tx: &tokio::sync::mpsc::Sender<Result<RecordBatch, LogsError>>,
) -> Result<(), LogsError> {
    let raw = Arc::new(Schema::new(
        fields
            .pairs()
            .iter()
            .map(|(_, name)| Field::new(*name, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut decoder = arrow::json::ReaderBuilder::new(raw)
        .with_batch_size(BATCH_ROWS)
        .with_coerce_primitive(true)
        .build_decoder()
        .map_err(|e| LogsError::Read {
            file: file.to_string(),
            message: e.to_string(),
        })?;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    // The line of each row the decoder holds.
    let mut lines: Vec<u64> = vec![];
    let mut seen_id = false;
    let mut any = false;
    // Hand the decoded rows on; false when nobody reads further.
    let flush = |decoder: &mut arrow::json::reader::Decoder,
                 lines: &mut Vec<u64>,
                 seen_id: &mut bool|
     -> Result<bool, LogsError> {
        // Values become columns here, a batch at a time: the error names
        // the batch's lines.
        let batch = decoder.flush().map_err(|e| LogsError::BadValue {
            file: file.to_string(),
            first: lines.first().copied().unwrap_or(0),
            last: lines.last().copied().unwrap_or(0),
            message: e.to_string(),
        })?;
        let Some(batch) = batch else {
            return Ok(true);
        };
        let b = convert(&batch, lines, file, fields)?;
        *seen_id |= b.column(0).null_count() < b.num_rows();
        lines.clear();
        Ok(tx.blocking_send(Ok(b)).is_ok())
    };
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| LogsError::Read {
                file: file.to_string(),
                message: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        any = true;
        // Batches end between lines, so that each row keeps its line.
        if decoder.len() >= BATCH_ROWS && !flush(&mut decoder, &mut lines, &mut seen_id)? {
            return Ok(());
        }
        let mut buf = &line[..];
        while !buf.is_empty() {
            let used = decoder.decode(buf).map_err(|e| LogsError::NotJson {
                file: file.to_string(),
                line: line_no,
                message: e.to_string(),
            })?;
            if used == 0 && !flush(&mut decoder, &mut lines, &mut seen_id)? {
                return Ok(());
            }
            buf = &buf[used..];
        }
        // A line is one object: a line that ends inside one is refused
        // here, not at the next line, so that the error names it.
        if decoder.has_partial_record() {
            return Err(LogsError::NotJson {
                file: file.to_string(),
                line: line_no,
                message: "the line ends inside a JSON value".into(),
            });
        }
        while lines.len() < decoder.len() {
            lines.push(line_no);
        }
    }
    if !flush(&mut decoder, &mut lines, &mut seen_id)? {
        return Ok(());
    }
    if any && !seen_id {
        return Err(LogsError::FieldAbsent {
            file: file.to_string(),
            field: fields.event_id.clone(),
            role: "event_id",
        });
    }
    Ok(())
}

/// Epoch milliseconds (an integer) or RFC 3339, as microseconds.
fn parse_time(s: &str) -> Option<i64> {
    let t = s.trim();
    if !t.is_empty()
        && t.trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return t.parse::<i64>().ok()?.checked_mul(1000);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.timestamp_micros())
}

/// A raw batch (the mapped fields as text) in the `logs` schema.
fn convert(
    raw: &RecordBatch,
    lines: &[u64],
    file: &str,
    fields: &LogFields,
) -> Result<RecordBatch, LogsError> {
    let text = |i: usize| raw.column(i).as_string::<i32>();
    let (id, ts, level) = (text(0), text(1), text(2));
    let line = |r: usize| lines.get(r).copied().unwrap_or(0);
    let mut times = Vec::with_capacity(raw.num_rows());
    for r in 0..raw.num_rows() {
        let t = if ts.is_valid(r) {
            Some(
                parse_time(ts.value(r)).ok_or_else(|| LogsError::BadTimestamp {
                    file: file.to_string(),
                    line: line(r),
                    field: fields.timestamp.clone(),
                    value: ts.value(r).chars().take(80).collect(),
                })?,
            )
        } else {
            None
        };
        if id.is_valid(r) {
            for (present, role, field) in [
                (t.is_some(), "timestamp", &fields.timestamp),
                (level.is_valid(r), "level", &fields.level),
            ] {
                if !present {
                    return Err(LogsError::MissingField {
                        file: file.to_string(),
                        line: line(r),
                        field: field.clone(),
                        role,
                        event_id: id.value(r).chars().take(80).collect(),
                    });
                }
            }
        }
        times.push(t);
    }
    let columns: Vec<ArrayRef> = vec![
        raw.column(0).clone(),
        Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
        raw.column(2).clone(),
        raw.column(3).clone(),
        raw.column(4).clone(),
    ];
    RecordBatch::try_new(schema(), columns).map_err(|e| LogsError::Read {
        file: file.to_string(),
        message: e.to_string(),
    })
}

/// Every file's rows through one channel (the `logs` table's stream and
/// [`error_counts`] read it). Files are decoded side by side, one per
/// core: decoding JSON is the logs' whole cost, and a worker's logs are
/// many files (one per day, per pod). Rows of different files interleave:
/// nothing downstream depends on their order. The first file that fails
/// ends the stream with its error; the others stop at their next batch.
fn rows(
    files: Arc<Vec<LogFile>>,
    fields: LogFields,
) -> tokio::sync::mpsc::Receiver<Result<RecordBatch, LogsError>> {
    use futures::StreamExt;
    let width = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, files.len().max(1));
    let (tx, rx) = tokio::sync::mpsc::channel(2 * width);
    tokio::spawn(async move {
        let mut decoding = futures::stream::iter(0..files.len())
            .map(|i| {
                let (files, fields, tx) = (files.clone(), fields.clone(), tx.clone());
                async move { read_file(&files[i], &fields, tx).await }
            })
            .buffer_unordered(width);
        while let Some(done) = decoding.next().await {
            if let Err(e) = done {
                let _ = tx.send(Err(e)).await;
                return;
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// The one narrow pass over the logs a run makes before the archive's:
/// per event named by an error-level line, the number of such lines.
/// Memory: one entry per event with an error line (the other lines are
/// counted and dropped as they stream by).
pub async fn error_counts(
    files: &[LogFile],
    settings: &LogSettings,
) -> Result<ErrorCounts, LogsError> {
    let mut rx = rows(Arc::new(files.to_vec()), settings.fields.clone());
    let mut out = ErrorCounts::default();
    while let Some(b) = rx.recv().await {
        out.add(&b?, &settings.error_levels);
    }
    Ok(out)
}

impl ErrorCounts {
    /// Count the error-level lines of a batch of `logs` rows that name an
    /// event (`sql/logs.sql`'s `log_attempts`, line by line).
    pub fn add(&mut self, b: &RecordBatch, error_levels: &[String]) {
        self.lines += b.num_rows() as u64;
        let id = b.column(0).as_string::<i32>();
        let time = b
            .column(1)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let level = b.column(2).as_string::<i32>();
        for r in 0..b.num_rows() {
            if id.is_valid(r)
                && level.is_valid(r)
                && error_levels
                    .iter()
                    .any(|l| l.eq_ignore_ascii_case(level.value(r)))
            {
                self.error_lines += 1;
                let id = id.value(r);
                // An event's later lines find its entry without a copy of the id.
                if !self.by_event.contains_key(id) {
                    self.by_event.insert(id.to_string(), Logged::default());
                }
                let Some(e) = self.by_event.get_mut(id) else {
                    continue;
                };
                e.lines += 1;
                if time.is_valid(r) {
                    let t = time.value(r);
                    e.first_us = Some(e.first_us.map_or(t, |f| f.min(t)));
                    e.last_us = Some(e.last_us.map_or(t, |l| l.max(t)));
                }
            }
        }
    }
}

/// What [`error_counts`] found.
#[derive(Debug, Default)]
pub struct ErrorCounts {
    /// Lines read, of every level.
    pub lines: u64,
    /// Lines at an error level that name an event.
    pub error_lines: u64,
    /// Per event: its error-level lines.
    pub by_event: datafusion::common::HashMap<String, Logged>,
}

/// One event's error-level lines: how many, the first and the last (µs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    pub lines: u64,
    pub first_us: Option<i64>,
    pub last_us: Option<i64>,
}

impl ErrorCounts {
    /// The counts as the `log_attempts` view's rows.
    pub fn log_attempts(&self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut ids = Vec::with_capacity(self.by_event.len());
        let (mut n, mut first, mut last) = (vec![], vec![], vec![]);
        for (id, l) in &self.by_event {
            ids.push(id.as_str());
            n.push(i64::try_from(l.lines).unwrap_or(i64::MAX));
            first.push(l.first_us);
            last.push(l.last_us);
        }
        let ts = |v: Vec<Option<i64>>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
        };
        let utc = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("event_id", DataType::Utf8, true),
                Field::new("error_lines", DataType::Int64, false),
                Field::new("first_error_at", utc(), true),
                Field::new("last_error_at", utc(), true),
            ])),
            vec![
                Arc::new(StringArray::from(ids)),
                Arc::new(arrow::array::Int64Array::from(n)),
                ts(first),
                ts(last),
            ],
        )
    }
}

/// `logs`: the files' lines as a table (read again by each query that
/// scans it), and `log_error_levels` (level, upper case). Without
/// settings, an empty `logs` of the same shape and the default levels, so
/// that the views always plan.
pub async fn register(
    ctx: &SessionContext,
    settings: Option<&LogSettings>,
    storage: &StorageSettings,
) -> Result<Vec<LogFile>, LogsError> {
    let levels: Vec<String> = match settings {
        Some(s) => s.error_levels.clone(),
        None => default_error_levels(),
    };
    let level_schema = Arc::new(Schema::new(vec![Field::new(
        "level",
        DataType::Utf8,
        false,
    )]));
    let level_batch = RecordBatch::try_new(
        level_schema.clone(),
        vec![Arc::new(StringArray::from(levels)) as ArrayRef],
    )
    .map_err(|e| LogsError::Read {
        file: "log_error_levels".into(),
        message: e.to_string(),
    })?;
    let table = |r: datafusion::error::Result<()>| {
        r.map_err(|e| LogsError::Read {
            file: "logs".into(),
            message: e.to_string(),
        })
    };
    let levels_table =
        datafusion::datasource::MemTable::try_new(level_schema, vec![vec![level_batch]]);
    table(levels_table.and_then(|t| {
        ctx.register_table("log_error_levels", Arc::new(t))
            .map(|_| ())
    }))?;
    let Some(settings) = settings else {
        let empty = datafusion::datasource::MemTable::try_new(schema(), vec![vec![]]);
        table(empty.and_then(|t| ctx.register_table("logs", Arc::new(t)).map(|_| ())))?;
        return Ok(vec![]);
    };
    let files = list(settings, storage).await?;
    let source = LogsTable {
        files: Arc::new(files.clone()),
        fields: settings.fields.clone(),
    };
    let t = StreamingTable::try_new(schema(), vec![Arc::new(source)]);
    table(t.and_then(|t| ctx.register_table("logs", Arc::new(t)).map(|_| ())))?;
    Ok(files)
}

/// `["ERROR", "FATAL"]`.
pub fn default_error_levels() -> Vec<String> {
    vec!["ERROR".into(), "FATAL".into()]
}

/// The `logs` table's one partition: every file, decoded side by side.
struct LogsTable {
    files: Arc<Vec<LogFile>>,
    fields: LogFields,
}

impl std::fmt::Debug for LogsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogsTable({} files)", self.files.len())
    }
}

impl PartitionStream for LogsTable {
    fn schema(&self) -> &SchemaRef {
        static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
        SCHEMA.get_or_init(schema)
    }

    fn execute(&self, _: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rx = rows(self.files.clone(), self.fields.clone());
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let b = rx.recv().await?;
            Some((b.map_err(|e| DataFusionError::External(Box::new(e))), rx))
        });
        Box::pin(RecordBatchStreamAdapter::new(schema(), stream))
    }
}

/// The [`LogsError`] inside a query's error, if that is what failed it.
pub fn find_in(e: &DataFusionError) -> Option<&LogsError> {
    match e {
        DataFusionError::External(inner) => inner.downcast_ref::<LogsError>(),
        DataFusionError::Context(_, inner) => find_in(inner),
        DataFusionError::Shared(inner) => find_in(inner),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> LogFields {
        LogFields {
            event_id: "evt".into(),
            timestamp: "ts".into(),
            ..Default::default()
        }
    }

    fn decode_all(text: &str) -> Result<Vec<RecordBatch>, LogsError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        decode(text.as_bytes(), "f.ndjson", &fields(), &tx)?;
        drop(tx);
        let mut out = vec![];
        while let Ok(b) = rx.try_recv() {
            out.push(b?);
        }
        Ok(out)
    }

    #[test]
    fn lines_map_to_the_logs_columns() {
        let b = decode_all(concat!(
            "{\"evt\":\"e1\",\"ts\":\"2024-01-01T10:00:00Z\",\"level\":\"error\",\"message\":\"boom\",\"error\":\"stack\"}\n",
            "\n",
            "{\"ts\":1704103200000,\"level\":\"INFO\",\"message\":\"started\"}\n",
            "{\"evt\":42,\"ts\":\"2024-01-01T12:00:00.5+02:00\",\"level\":\"WARN\",\"other\":{\"x\":1}}\n",
        ))
        .unwrap();
        let b = arrow::compute::concat_batches(&schema(), &b).unwrap();
        assert_eq!(b.num_rows(), 3);
        let id = b.column(0).as_string::<i32>();
        assert_eq!(id.value(0), "e1");
        assert!(id.is_null(1));
        assert_eq!(id.value(2), "42");
        let t = b
            .column(1)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(t.value(0), 1_704_103_200_000_000);
        assert_eq!(t.value(1), 1_704_103_200_000_000);
        assert_eq!(t.value(2), 1_704_103_200_500_000);
    }

    #[test]
    fn bad_lines_are_named() {
        let e = decode_all("{\"evt\":\"e1\",\"ts\":1,\"level\":\"E\"}\nnot json\n").unwrap_err();
        assert!(matches!(e, LogsError::NotJson { line: 2, .. }), "{e}");
        let e = decode_all("{\"evt\":\"e1\",\"ts\":\"yesterday\",\"level\":\"E\"}\n").unwrap_err();
        assert!(e.to_string().contains("line 1: field 'ts'"), "{e}");
        let e = decode_all("{\"evt\":\"e1\",\"level\":\"E\"}\n").unwrap_err();
        assert!(e.to_string().contains("no 'ts' (timestamp)"), "{e}");
        let e = decode_all("{\"id\":\"e1\",\"ts\":1,\"level\":\"E\"}\n").unwrap_err();
        assert!(e.to_string().contains("no line has the field 'evt'"), "{e}");
        let e = decode_all("{\"evt\":\"e1\",\"ts\":1,\n\"level\":\"E\"}\n").unwrap_err();
        assert!(matches!(e, LogsError::NotJson { line: 1, .. }), "{e}");
        let e = decode_all(
            "{\"evt\":\"a\",\"ts\":1,\"level\":\"E\"}\n{\"evt\":\"b\",\"ts\":1,\"level\":\"E\",\"error\":{\"x\":1}}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("lines 1-2: "), "{e}");
        assert!(e.to_string().contains("field 'error'"), "{e}");
        // An empty file is no error.
        assert!(decode_all("").unwrap().is_empty());
    }

    #[test]
    fn globs_match_names() {
        assert!(wildcard("app-*.jsonl.gz", "app-1.jsonl.gz"));
        assert!(wildcard("*", "x"));
        assert!(wildcard("a?c*", "abcdef"));
        assert!(!wildcard("app-*.jsonl", "app-1.jsonl.gz"));
    }
}
