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

/// The longest line read, in bytes (without its newline): 16 MiB. A line
/// is held whole while it is decoded; a longer one is refused as it is
/// read, not buffered first (a file without newlines would be one line).
pub const MAX_LINE_BYTES: usize = 16 << 20;

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
    /// Levels that mean a failed attempt, upper case (Unicode): a line's
    /// level is one when upper-cased it equals one ([`is_error_level`]).
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
    #[error("logs file {file}, line {line}: not UTF-8")]
    NotUtf8 { file: String, line: u64 },
    #[error(
        "logs file {file}, line {line}: more than one JSON object (NDJSON: one object per line)"
    )]
    Several { file: String, line: u64 },
    #[error("logs file {file}: line {line} is longer than {} MiB", MAX_LINE_BYTES >> 20)]
    TooLong { file: String, line: u64 },
    #[error("logs file {file}: not valid gzip: {reason}")]
    NotGzip { file: String, reason: String },
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

/// A `--logs` location as the folder (or file) to list and the glob of
/// its last part, if it has one.
fn split_glob(original: &str) -> (&str, Option<&str>) {
    match original.rsplit_once('/') {
        Some((dir, last)) if last.contains(['*', '?']) => {
            (if dir.is_empty() { "/" } else { dir }, Some(last))
        }
        None if original.contains(['*', '?']) => (".", Some(original)),
        _ => (original, None),
    }
}

/// The locations the settings list (a glob's folder), resolved: no sink
/// may be one of them.
pub fn folders(
    settings: &LogSettings,
    storage: &StorageSettings,
) -> Result<Vec<location::Location>, LogsError> {
    settings
        .paths
        .iter()
        .map(|p| resolve_base(p, storage).map(|(loc, _)| loc))
        .collect()
}

/// [`split_glob`], the folder resolved. An error names the location as
/// given, glob included (after the folder's redaction: a glob holds no
/// user info, unless an `@` in it says the split fell inside the URL's).
fn resolve_base<'a>(
    original: &'a str,
    storage: &StorageSettings,
) -> Result<(location::Location, Option<&'a str>), LogsError> {
    let (base, pattern) = split_glob(original);
    match location::resolve(base, storage) {
        Ok(loc) => Ok((loc, pattern)),
        Err(mut e) => {
            if let Some(pat) = pattern.filter(|p| !p.contains('@') && base.contains("://")) {
                let (LocationError::Invalid { location, .. }
                | LocationError::Store { location, .. }) = &mut e;
                if *location == crate::redact::url(base) {
                    location.push('/');
                    location.push_str(pat);
                }
            }
            Err(e.into())
        }
    }
}

/// Every log file the settings name, in path order within each location.
/// A file named twice (two paths, a folder and a glob in it) is listed
/// once, where it is first named: each line counts once.
pub async fn list(
    settings: &LogSettings,
    storage: &StorageSettings,
) -> Result<Vec<LogFile>, LogsError> {
    let mut out = vec![];
    let mut seen = std::collections::HashSet::new();
    for original in &settings.paths {
        // A glob in the last part: list its folder and match names.
        let (loc, pattern) = resolve_base(original, storage)?;
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
        // The same store and object path: the same file.
        out.extend(
            found
                .into_iter()
                .filter(|f| seen.insert((loc.store_url.clone(), f.path.clone()))),
        );
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
    let (display, gz) = (f.display.clone(), f.gz);
    let fields = fields.clone();
    tokio::task::spawn_blocking(move || {
        let source = if gz {
            gunzip(source, &display)?
        } else {
            source
        };
        decode(BufReader::new(source), &display, &fields, &tx, gz)
    })
    .await
    .map_err(|e| LogsError::Read {
        file: f.display.clone(),
        message: e.to_string(),
    })?
}

/// A `.gz` file's text. A file that does not start as gzip does (empty,
/// plain text) is refused here, as the user's file (exit 2), not as a
/// failed read.
fn gunzip(mut source: Box<dyn Read + Send>, file: &str) -> Result<Box<dyn Read + Send>, LogsError> {
    let mut head = [0u8; 2];
    let mut n = 0;
    while n < head.len() {
        match source.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(file, e, false)),
        }
    }
    if head[..n] != [0x1f, 0x8b] {
        return Err(LogsError::NotGzip {
            file: file.to_string(),
            reason: if n == 0 {
                "the file is empty".into()
            } else {
                "it does not start with gzip's magic bytes (1f 8b)".into()
            },
        });
    }
    let source = std::io::Cursor::new(head).chain(source);
    Ok(Box::new(flate2::read::MultiGzDecoder::new(source)))
}

/// A failed read of a log file. In a gzip file, a header or deflate
/// stream that does not decode (flate2's InvalidInput / InvalidData) is
/// the file's fault (exit 2); one that ends early stays a read failure
/// (exit 1): a local file may still be being written or compressed, and
/// a rerun reads it whole.
fn read_error(file: &str, e: std::io::Error, gz: bool) -> LogsError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidInput | ErrorKind::InvalidData if gz => LogsError::NotGzip {
            file: file.to_string(),
            reason: e.to_string(),
        },
        ErrorKind::UnexpectedEof if gz => LogsError::Read {
            file: file.to_string(),
            message: format!("the gzip stream ends early ({e}): truncated, or still being written"),
        },
        _ => LogsError::Read {
            file: file.to_string(),
            message: e.to_string(),
        },
    }
}

/// What a line that is not a JSON object holds, from its first byte.
fn not_an_object(first: &[u8]) -> String {
    match first.first() {
        Some(b'[') => "the line holds an array".into(),
        Some(b'"') => "the line holds a string".into(),
        Some(b'-' | b'0'..=b'9') => "the line holds a number".into(),
        Some(b't' | b'f') if first.starts_with(b"true") || first.starts_with(b"false") => {
            "the line holds a boolean".into()
        }
        Some(b'n') if first.starts_with(b"null") => "the line holds null".into(),
        _ if first.starts_with("\u{feff}".as_bytes()) => {
            "the line starts with a byte-order mark (write UTF-8 without BOM)".into()
        }
        _ => format!(
            "the line starts with '{}'",
            String::from_utf8_lossy(first)
                .chars()
                .take(20)
                .collect::<String>()
        ),
    }
}

/// The blocking half of [`read_file`]. Each non-blank line must be one
/// JSON object, UTF-8, at most [`MAX_LINE_BYTES`] long.
fn decode(
    mut r: impl BufRead,
    file: &str,
    fields: &LogFields,
    tx: &tokio::sync::mpsc::Sender<Result<RecordBatch, LogsError>>,
    gz: bool,
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
        // At most one byte past the cap: a longer line is refused unread.
        let n = r
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| read_error(file, e, gz))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if n > MAX_LINE_BYTES && line.last() != Some(&b'\n') {
            return Err(LogsError::TooLong {
                file: file.to_string(),
                line: line_no,
            });
        }
        let Some(start) = line.iter().position(|b| !b.is_ascii_whitespace()) else {
            continue;
        };
        if std::str::from_utf8(&line).is_err() {
            return Err(LogsError::NotUtf8 {
                file: file.to_string(),
                line: line_no,
            });
        }
        // The decoder takes any JSON value as a row, and refuses one that
        // is not an object only a batch later (naming the batch's lines).
        if line[start] != b'{' {
            return Err(LogsError::NotJson {
                file: file.to_string(),
                line: line_no,
                message: not_an_object(&line[start..]),
            });
        }
        any = true;
        // Batches end between lines, so that each row keeps its line: the
        // decoder has room for this line's row.
        if decoder.len() >= BATCH_ROWS && !flush(&mut decoder, &mut lines, &mut seen_id)? {
            return Ok(());
        }
        let before = decoder.len();
        let used = decoder.decode(&line).map_err(|e| LogsError::NotJson {
            file: file.to_string(),
            line: line_no,
            message: e.to_string(),
        })?;
        // One line, one row: a second value on the line started another
        // (or, the batch full, was left unread).
        if used < line.len() || decoder.len() > before + 1 {
            return Err(LogsError::Several {
                file: file.to_string(),
                line: line_no,
            });
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
        lines.push(line_no);
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
        // Within chrono's range, as an RFC 3339 time is: the engine turns
        // log_time into dates (casts, display) through chrono.
        let us = t.parse::<i64>().ok()?.checked_mul(1000)?;
        return chrono::DateTime::from_timestamp_micros(us).map(|_| us);
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
            if id.is_valid(r) && level.is_valid(r) && is_error_level(level.value(r), error_levels) {
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

/// `upper(level) IN (SELECT level FROM log_error_levels)`, as
/// `sql/logs.sql` has it: the level in Unicode upper case (Rust's
/// `to_uppercase`, which DataFusion's `upper` is) equals one of the levels,
/// which are stored upper case. An ASCII level (nearly every one) is
/// compared byte by byte, without upper-casing it into a new string.
fn is_error_level(level: &str, error_levels: &[String]) -> bool {
    if level.is_ascii() {
        error_levels.iter().any(|l| {
            l.len() == level.len()
                && l.bytes()
                    .zip(level.bytes())
                    .all(|(a, b)| a == b.to_ascii_uppercase())
        })
    } else {
        error_levels.contains(&level.to_uppercase())
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
        decode(text.as_bytes(), "f.ndjson", &fields(), &tx, false)?;
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

    /// One object per line, UTF-8, at most [`MAX_LINE_BYTES`]; epoch
    /// milliseconds within chrono's range.
    #[test]
    fn a_line_is_one_object() {
        let ok = "{\"evt\":\"e1\",\"ts\":1,\"level\":\"E\"}";
        for (text, want) in [
            (
                "5",
                "line 2: not a JSON object per line (NDJSON): the line holds a number",
            ),
            ("null", "the line holds null"),
            ("\"s\"", "the line holds a string"),
            ("  [1,2]", "the line holds an array"),
            ("\u{feff}{}", "byte-order mark"),
            (&format!("{ok} {ok}"), "line 2: more than one JSON object"),
            (&format!("{ok} 5"), "line 2: more than one JSON object"),
        ] {
            let e = decode_all(&format!("{ok}\n{text}\n")).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
        // The second object of a line that fills the batch is left unread.
        let full = format!("{ok}\n").repeat(BATCH_ROWS - 1);
        let e = decode_all(&format!("{full}{ok}{ok}\n")).unwrap_err();
        assert!(
            matches!(e, LogsError::Several { line, .. } if line == BATCH_ROWS as u64),
            "{e}"
        );
        let rows: usize = decode_all(&format!("{full}{ok}\r\n{ok}\n"))
            .unwrap()
            .iter()
            .map(RecordBatch::num_rows)
            .sum();
        assert_eq!(rows, BATCH_ROWS + 1);
        let (tx, _rx) = tokio::sync::mpsc::channel(100);
        let e = decode(&b"{\"evt\":\"\xff\"}\n"[..], "f", &fields(), &tx, false).unwrap_err();
        assert_eq!(e.to_string(), "logs file f, line 1: not UTF-8");
        // The longest line passes; one byte more does not.
        let line = |n: usize| format!("{{\"evt\":\"{}\",\"ts\":1,\"level\":\"E\"}}", "x".repeat(n));
        let longest = line(MAX_LINE_BYTES - line(0).len());
        assert_eq!(longest.len(), MAX_LINE_BYTES);
        assert_eq!(
            decode_all(&format!("{longest}\n")).unwrap()[0].num_rows(),
            1
        );
        assert_eq!(decode_all(&longest).unwrap()[0].num_rows(), 1);
        let e = decode_all(&format!("\n{longest}x\n")).unwrap_err();
        assert!(matches!(e, LogsError::TooLong { line: 2, .. }), "{e}");
        // Epoch milliseconds: within chrono's range, as RFC 3339 is.
        assert_eq!(parse_time("1704103200000"), Some(1_704_103_200_000_000));
        assert_eq!(parse_time("-1"), Some(-1000));
        assert_eq!(parse_time("9223372036854775"), None);
        assert_eq!(parse_time("-9223372036854775"), None);
    }

    /// `upper(level) IN levels`, ASCII or not.
    #[test]
    fn error_levels_are_upper_case_matches() {
        let levels = ["ERROR".to_string(), "ÉCHEC".into(), "STRASSE".into()];
        for (level, is) in [
            ("error", true),
            ("Error", true),
            ("errors", false),
            ("échec", true),
            ("Straße", true),
            ("strasse", true),
            ("echec", false),
            ("ERROR ", false),
        ] {
            assert_eq!(is_error_level(level, &levels), is, "{level}");
        }
    }

    #[test]
    fn globs_match_names() {
        assert!(wildcard("app-*.jsonl.gz", "app-1.jsonl.gz"));
        assert!(wildcard("*", "x"));
        assert!(wildcard("a?c*", "abcdef"));
        assert!(!wildcard("app-*.jsonl", "app-1.jsonl.gz"));
    }
}
