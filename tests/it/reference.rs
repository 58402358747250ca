//! An independent reference model of the decision rules (docs/reference.md, "The decision").
//!
//! It reads Parquet with the parquet crate's synchronous reader into plain
//! rows and applies the rules naively with maps, so that the binary's output
//! can be checked against expectations it had no hand in. It must never call
//! code of the crate under test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Float64Type, Int64Type, SchemaRef, TimeUnit, TimestampNanosecondType,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use regex::Regex;

/// A cell, normalised so that equal values compare equal across the
/// physical types the contract allows (Int32/Int64, timestamp units, zones).
#[derive(Clone, Debug, PartialEq, PartialOrd)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// Nanoseconds since the epoch, UTC (naive timestamps taken as UTC).
    Ts(i64),
    Other(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_ts(&self) -> Option<i64> {
        match self {
            Value::Ts(t) => Some(*t),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A total order key for sorting (keys and seqs).
    fn sort_key(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Int(i) => format!("{:020}", i.wrapping_add(i64::MAX / 2)),
            Value::Str(s) => s.clone(),
            other => format!("{other:?}"),
        }
    }
}

pub type Record = BTreeMap<String, Value>;

/// The values of one Arrow column, normalised.
pub fn column_values(array: &ArrayRef) -> Vec<Value> {
    let n = array.len();
    let nulls = |i: usize| array.is_null(i);
    match array.data_type() {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => {
            let a = cast(array, &DataType::Int64).expect("cast int");
            let a = a.as_primitive::<Int64Type>();
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Int(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Float32 | DataType::Float64 => {
            let a = cast(array, &DataType::Float64).expect("cast float");
            let a = a.as_primitive::<Float64Type>();
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Float(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let a = cast(array, &DataType::Utf8).expect("cast utf8");
            let a = a.as_string::<i32>();
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Str(a.value(i).to_string())
                    }
                })
                .collect()
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let a = cast(array, &DataType::Binary).expect("cast binary");
            let a = a.as_binary::<i32>();
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Bytes(a.value(i).to_vec())
                    }
                })
                .collect()
        }
        DataType::Boolean => {
            let a = array.as_any().downcast_ref::<BooleanArray>().expect("bool");
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Bool(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Timestamp(_, _) => {
            let a = cast(array, &DataType::Timestamp(TimeUnit::Nanosecond, None)).expect("ts");
            let a = a.as_primitive::<TimestampNanosecondType>();
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Ts(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Dictionary(_, value) => {
            let a = cast(array, value).expect("unpack dictionary");
            column_values(&a)
        }
        _ => {
            let formatter =
                arrow::util::display::ArrayFormatter::try_new(array.as_ref(), &Default::default())
                    .expect("formatter");
            (0..n)
                .map(|i| {
                    if nulls(i) {
                        Value::Null
                    } else {
                        Value::Other(formatter.value(i).to_string())
                    }
                })
                .collect()
        }
    }
}

/// One Parquet file read whole.
pub struct ParquetFile {
    pub schema: SchemaRef,
    pub rows: Vec<Record>,
}

pub fn read_parquet_file(path: &Path) -> ParquetFile {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let schema = builder.schema().clone();
    let reader = builder.build().expect("parquet reader");
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let columns: Vec<(String, Vec<Value>)> = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, a)| (f.name().clone(), column_values(a)))
            .collect();
        for i in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|(name, vals)| (name.clone(), vals[i].clone()))
                    .collect(),
            );
        }
    }
    ParquetFile { schema, rows }
}

/// Every `.parquet` file below `dir`, recursively, skipping names that
/// start with `_` or `.` and zero-byte files, sorted by path.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let entry = entry.expect("dir entry");
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('_') || name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            out.extend(parquet_files(&path));
        } else if name.ends_with(".parquet") && entry.metadata().expect("metadata").len() > 0 {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The archive as the job should see it: every row, every column of the
/// merged schema (NULL where a file lacks it).
pub struct Source {
    pub files: Vec<ParquetFile>,
    pub columns: BTreeSet<String>,
    pub rows: Vec<Record>,
}

pub fn read_source(dir: &Path) -> Source {
    let files: Vec<ParquetFile> = parquet_files(dir)
        .iter()
        .map(|p| read_parquet_file(p))
        .collect();
    let columns: BTreeSet<String> = files
        .iter()
        .flat_map(|f| f.schema.fields().iter().map(|fl| fl.name().clone()))
        .collect();
    let mut rows = Vec::new();
    for f in &files {
        for r in &f.rows {
            let mut full = r.clone();
            for c in &columns {
                full.entry(c.clone()).or_insert(Value::Null);
            }
            rows.push(full);
        }
    }
    Source {
        files,
        columns,
        rows,
    }
}

/// Source column names of the input contract.
#[derive(Clone, Debug)]
pub struct Columns {
    pub event_id: String,
    pub key: String,
    pub seq: String,
    pub event_time: String,
    pub status: String,
    pub attempts: String,
    pub error: String,
}

impl Default for Columns {
    fn default() -> Columns {
        Columns {
            event_id: "event_id".into(),
            key: "key".into(),
            seq: "seq".into(),
            event_time: "event_time".into(),
            status: "status".into(),
            attempts: "attempts".into(),
            error: "error".into(),
        }
    }
}

/// The settings the decision depends on.
#[derive(Clone, Debug)]
pub struct Config {
    pub columns: Columns,
    /// Window bounds, nanoseconds since the epoch.
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub done: Vec<String>,
    pub gaps: bool,
    pub conflicts: bool,
    pub max_attempts: i64,
    pub permanent: Vec<String>,
    /// Application logs (`--logs`) and the levels that mean a failure.
    pub logs: Option<Logs>,
}

/// Application log lines (docs/reference.md, "Application logs"), read
/// here with serde_json and flate2, line by line.
#[derive(Clone, Debug, Default)]
pub struct Logs {
    pub lines: Vec<LogLine>,
    /// Upper case.
    pub error_levels: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    pub event_id: Option<String>,
    /// Nanoseconds since the epoch.
    pub time: Option<i64>,
    pub level: Option<String>,
    pub message: Option<String>,
    pub error: Option<String>,
}

impl Logs {
    /// Every `*.ndjson`, `*.jsonl`, `*.json` (and `.gz`) file below `dir`,
    /// with the default field names.
    pub fn read(dir: &Path) -> Logs {
        let mut files = vec![];
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files.sort();
        let mut lines = vec![];
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            let plain = name.trim_end_matches(".gz");
            if ![".ndjson", ".jsonl", ".json"]
                .iter()
                .any(|e| plain.ends_with(e))
            {
                continue;
            }
            let mut text = String::new();
            let file = File::open(&f).unwrap();
            if name.ends_with(".gz") {
                std::io::Read::read_to_string(
                    &mut flate2::read::MultiGzDecoder::new(file),
                    &mut text,
                )
                .unwrap();
            } else {
                std::io::Read::read_to_string(&mut { file }, &mut text).unwrap();
            }
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let s = |k: &str| match &v[k] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                };
                let time = match &v["timestamp"] {
                    serde_json::Value::Number(n) => Some(n.as_i64().unwrap() * 1_000_000),
                    serde_json::Value::String(t) => Some(
                        chrono::DateTime::parse_from_rfc3339(t)
                            .unwrap()
                            .timestamp_nanos_opt()
                            .unwrap(),
                    ),
                    _ => None,
                };
                lines.push(LogLine {
                    event_id: s("event_id"),
                    time,
                    level: s("level"),
                    message: s("message"),
                    error: s("error"),
                });
            }
        }
        Logs {
            lines,
            error_levels: vec!["ERROR".into(), "FATAL".into()],
        }
    }

    fn is_error(&self, l: &LogLine) -> bool {
        l.level
            .as_deref()
            .is_some_and(|v| self.error_levels.contains(&v.to_uppercase()))
    }

    /// Per event id: its error-level lines.
    pub fn errors(&self) -> HashMap<String, Vec<&LogLine>> {
        let mut m: HashMap<String, Vec<&LogLine>> = HashMap::new();
        for l in &self.lines {
            if let (Some(id), true) = (&l.event_id, self.is_error(l)) {
                m.entry(id.clone()).or_default().push(l);
            }
        }
        m
    }
}

/// One expected contradicted event.
#[derive(Clone, Debug, PartialEq)]
pub struct Contradicted {
    pub key: Value,
    pub seq: Value,
    /// Nanoseconds.
    pub processed_at: i64,
    pub first: LogLine,
    pub log_lines: i64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            columns: Columns::default(),
            from: None,
            to: None,
            done: vec!["processed".into()],
            gaps: true,
            conflicts: true,
            max_attempts: 3,
            permanent: Vec::new(),
            logs: None,
        }
    }
}

/// What earlier committed runs (same state) did, tracked by the test.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub replayed: HashMap<String, i64>,
    pub dead: BTreeSet<String>,
}

impl Ledger {
    /// Record a committed run's outcome.
    pub fn commit(&mut self, e: &Expected) {
        for id in e.replay.keys() {
            *self.replayed.entry(id.clone()).or_default() += 1;
        }
        for id in e.dlq.keys() {
            self.dead.insert(id.clone());
        }
    }
}

/// One expected replay or DLQ row.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The chosen row; several when rows tie on attempts and event_time
    /// (then any of them is acceptable).
    pub candidates: Vec<Record>,
    pub reason: String,
    pub attempt: i64,
}

/// One expected gap.
#[derive(Clone, Debug, PartialEq)]
pub struct Gap {
    pub key: Value,
    pub first: i64,
    pub last: i64,
    pub count: i64,
    pub before_id: Value,
    /// Acceptable `before_event_time` values (the event's rows at that seq).
    pub before_times: Vec<i64>,
    pub after_id: Value,
    pub after_times: Vec<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub rows: usize,
    pub events: usize,
    pub resolved: usize,
    pub replay: BTreeMap<String, Outcome>,
    pub dlq: BTreeMap<String, Outcome>,
    pub skipped: BTreeSet<String>,
    pub gaps: Vec<Gap>,
    pub conflicts: usize,
    /// Resolved events an error log line after their processed row
    /// contradicts (with logs).
    pub contradicted: BTreeMap<String, Contradicted>,
}

impl Expected {
    pub fn by_reason(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in self.dlq.values() {
            *m.entry(o.reason.clone()).or_default() += 1;
        }
        m
    }

    pub fn missing_events(&self) -> i64 {
        self.gaps.iter().map(|g| g.count).sum()
    }
}

/// The reserved prefix of synthetic event ids (docs/reference.md "The decision").
pub const MISSING_PREFIX: &str = "backfill:missing-event-id:";

/// The id an archive row is decided and ledgered under: its event_id, or
/// for a row without one (NULL, or starting with the reserved prefix)
/// `backfill:missing-event-id:<chars>:<key>/<seq>/<event_time µs>`, `-`
/// for NULL.
pub fn ledger_id(r: &Record, c: &Columns) -> String {
    if let Some(id) = get(r, &c.event_id).as_str()
        && !id.starts_with(MISSING_PREFIX)
    {
        return id.to_string();
    }
    let key = match get(r, &c.key).as_str() {
        Some(k) => format!("{}:{k}", k.chars().count()),
        None => "-".into(),
    };
    let seq = get(r, &c.seq)
        .as_int()
        .map_or("-".to_string(), |s| s.to_string());
    // Nanoseconds to whole microseconds, sub-microsecond digits dropped.
    let time = get(r, &c.event_time)
        .as_ts()
        .map_or("-".to_string(), |t| (t / 1000).to_string());
    format!("{MISSING_PREFIX}{key}/{seq}/{time}")
}

fn get<'a>(r: &'a Record, col: &str) -> &'a Value {
    r.get(col).unwrap_or(&Value::Null)
}

/// Apply the decision rules of docs/reference.md, naively.
pub fn decide(source: &Source, cfg: &Config, ledger: &Ledger) -> Expected {
    let c = &cfg.columns;
    let regexes: Vec<Regex> = cfg
        .permanent
        .iter()
        .map(|r| Regex::new(r).expect("test regex"))
        .collect();

    // 1. the window
    let rows: Vec<&Record> = source
        .rows
        .iter()
        .filter(|r| match get(r, &c.event_time).as_ts() {
            Some(t) => cfg.from.is_none_or(|f| f <= t) && cfg.to.is_none_or(|to| t < to),
            None => cfg.from.is_none() && cfg.to.is_none(),
        })
        .collect();

    // Rows without an event_id (or with a reserved one) are events under a
    // synthetic id built from key, seq and event_time (docs/reference.md "The
    // decision"); `missing` remembers which ids are synthetic.
    let mut by_event: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    for r in &rows {
        let id = ledger_id(r, c);
        if get(r, &c.event_id).as_str() != Some(id.as_str()) {
            missing.insert(id.clone());
        }
        by_event.entry(id).or_default().push(r);
    }
    let has_own_id = |r: &Record| {
        get(r, &c.event_id)
            .as_str()
            .is_some_and(|s| !s.starts_with(MISSING_PREFIX))
    };

    // 3. conflicts
    let mut carriers: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    if cfg.conflicts {
        for r in &rows {
            let (k, s) = (get(r, &c.key), get(r, &c.seq));
            if k.is_null() || s.is_null() || !has_own_id(r) {
                continue;
            }
            carriers
                .entry((k.sort_key(), s.sort_key()))
                .or_default()
                .insert(get(r, &c.event_id).as_str().unwrap().to_string());
        }
    }
    let conflict = |k: &Value, s: &Value| -> bool {
        !k.is_null()
            && !s.is_null()
            && carriers
                .get(&(k.sort_key(), s.sort_key()))
                .is_some_and(|ids| ids.len() > 1)
    };

    let mut exp = Expected {
        rows: rows.len(),
        events: by_event.len(),
        conflicts: carriers.values().filter(|ids| ids.len() > 1).count(),
        ..Expected::default()
    };

    let log_errors = cfg.logs.as_ref().map(Logs::errors).unwrap_or_default();
    let is_done = |r: &Record| match get(r, &c.status) {
        Value::Str(s) => cfg.done.contains(s),
        _ => false,
    };
    for (id, event_rows) in &by_event {
        // 2. resolved
        let resolved = event_rows.iter().any(|r| is_done(r));
        if resolved {
            exp.resolved += 1;
            // Contradicted: an error line after the latest done row.
            let done: Vec<&&Record> = event_rows
                .iter()
                .filter(|r| is_done(r) && get(r, &c.event_time).as_ts().is_some())
                .collect();
            let latest = done
                .iter()
                .filter_map(|r| get(r, &c.event_time).as_ts())
                .max();
            if let (Some(at), Some(lines)) = (latest, log_errors.get(id)) {
                let mut later: Vec<&&LogLine> = lines
                    .iter()
                    .filter(|l| l.time.is_some_and(|t| t > at))
                    .collect();
                let nulls_last = |a: &Option<String>, b: &Option<String>| match (a, b) {
                    (Some(a), Some(b)) => a.cmp(b),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                };
                later.sort_by(|a, b| {
                    a.time
                        .cmp(&b.time)
                        .then_with(|| a.level.cmp(&b.level))
                        .then_with(|| nulls_last(&a.message, &b.message))
                        .then_with(|| nulls_last(&a.error, &b.error))
                });
                if let Some(first) = later.first() {
                    let row = done
                        .iter()
                        .filter(|r| get(r, &c.event_time).as_ts() == Some(at))
                        .min_by(|a, b| {
                            let k = |r: &Record| {
                                let key = get(r, &c.key).as_str().map(str::to_string);
                                (key.is_none(), key, get(r, &c.seq).as_int())
                            };
                            k(a).cmp(&k(b))
                        })
                        .unwrap();
                    exp.contradicted.insert(
                        id.clone(),
                        Contradicted {
                            key: get(row, &c.key).clone(),
                            seq: get(row, &c.seq).clone(),
                            processed_at: at,
                            first: (**first).clone(),
                            log_lines: later.len() as i64,
                        },
                    );
                }
            }
            continue;
        }
        // 5. dead-lettered before
        if ledger.dead.contains(id) {
            exp.skipped.insert(id.clone());
            continue;
        }
        // 4. retries so far and the chosen row
        let attempts = |r: &Record| get(r, &c.attempts).as_int().unwrap_or(0);
        let time = |r: &Record| get(r, &c.event_time).as_ts().unwrap_or(i64::MIN);
        let max_attempts = event_rows.iter().map(|r| attempts(r)).max().unwrap_or(0);
        // Logs: each error line is a failed attempt; the first was the
        // first try, so they show lines - 1 retries; the greater counts.
        let retries_seen = match log_errors.get(id) {
            Some(lines) => max_attempts.max(lines.len() as i64 - 1),
            None => max_attempts,
        };
        let invalid = !(0..=1_000_000).contains(&retries_seen);
        let replays = ledger.replayed.get(id).copied().unwrap_or(0);
        let retries = if invalid {
            replays
        } else {
            retries_seen + replays
        };
        let best_time = event_rows
            .iter()
            .filter(|r| attempts(r) == max_attempts)
            .map(|r| time(r))
            .max()
            .unwrap();
        let mut candidates: Vec<Record> = Vec::new();
        for r in event_rows
            .iter()
            .filter(|r| attempts(r) == max_attempts && time(r) == best_time)
        {
            if !candidates.contains(r) {
                candidates.push((*r).clone());
            }
        }
        if missing.contains(id) {
            // The outputs carry the synthetic id in the event_id column.
            for cand in candidates.iter_mut() {
                cand.insert(c.event_id.clone(), Value::Str(id.clone()));
            }
        }
        let chosen = &candidates[0];
        let key = get(chosen, &c.key).clone();
        let seq = get(chosen, &c.seq).clone();
        let error = get(chosen, &c.error).as_str().map(str::to_string);
        // 6. first match wins
        let reason = if missing.contains(id) {
            Some("missing_event_id")
        } else if invalid {
            Some("invalid_attempts")
        } else if cfg.conflicts && conflict(&key, &seq) {
            Some("sequence_conflict")
        } else if error
            .as_deref()
            .is_some_and(|e| regexes.iter().any(|re| re.is_match(e)))
        {
            Some("permanent_error")
        } else if retries >= cfg.max_attempts {
            Some("max_attempts_exceeded")
        } else {
            None
        };
        let mut outcome = Outcome {
            candidates,
            reason: reason.unwrap_or("unprocessed").to_string(),
            attempt: retries,
        };
        if reason.is_some() {
            exp.dlq.insert(id.clone(), outcome);
        } else {
            outcome.attempt = retries + 1;
            exp.replay.insert(id.clone(), outcome);
        }
    }

    // 7. gaps
    if cfg.gaps {
        let mut per_key: BTreeMap<String, (Value, BTreeMap<i64, Vec<&Record>>)> = BTreeMap::new();
        for r in &rows {
            let (k, s) = (get(r, &c.key), get(r, &c.seq));
            let Some(s) = s.as_int() else { continue };
            if k.is_null() {
                continue;
            }
            per_key
                .entry(k.sort_key())
                .or_insert_with(|| (k.clone(), BTreeMap::new()))
                .1
                .entry(s)
                .or_default()
                .push(r);
        }
        // Rows without an id of their own are observed seqs that name no
        // neighbour: NULL id and time where a seq has only such rows.
        let side = |rs: &Vec<&Record>| -> (Value, Vec<i64>) {
            let Some(id) = rs
                .iter()
                .filter(|r| has_own_id(r))
                .map(|r| get(r, &c.event_id).as_str().unwrap().to_string())
                .min()
            else {
                return (Value::Null, Vec::new());
            };
            let times = rs
                .iter()
                .filter(|r| get(r, &c.event_id).as_str() == Some(id.as_str()))
                .filter_map(|r| get(r, &c.event_time).as_ts())
                .collect();
            (Value::Str(id), times)
        };
        for (key, seqs) in per_key.values() {
            let observed: Vec<(&i64, &Vec<&Record>)> = seqs.iter().collect();
            for pair in observed.windows(2) {
                let (a, ra) = pair[0];
                let (b, rb) = pair[1];
                if b - a > 1 {
                    let (before_id, before_times) = side(ra);
                    let (after_id, after_times) = side(rb);
                    exp.gaps.push(Gap {
                        key: key.clone(),
                        first: a + 1,
                        last: b - 1,
                        count: b - a - 1,
                        before_id,
                        before_times,
                        after_id,
                        after_times,
                    });
                }
            }
        }
    }
    exp
}

/// One sink's output of one run: `DIR/run_id=<RUN_ID>/part-N-<NONCE>.parquet`.
pub struct Output {
    pub files: Vec<PathBuf>,
    pub schemas: Vec<SchemaRef>,
    /// Rows in file order (part-0, part-1, ...).
    pub rows: Vec<Record>,
}

/// Read a run's folder of one sink; a missing folder is an empty output.
/// Panics when a file is not named `part-N-<NONCE>.parquet`.
pub fn read_output(sink_dir: &Path, run_id: &str) -> Output {
    let dir = sink_dir.join(format!("run_id={run_id}"));
    let mut parts: Vec<(u64, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries {
            let entry = entry.expect("dir entry");
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            // part-<N>-<attempt>.parquet
            let n = name
                .strip_prefix("part-")
                .filter(|_| name.ends_with(".parquet"))
                .and_then(|s| s.split(['-', '.']).next())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected output file {}", entry.path().display()));
            parts.push((n, entry.path()));
        }
    }
    parts.sort();
    let mut out = Output {
        files: Vec::new(),
        schemas: Vec::new(),
        rows: Vec::new(),
    };
    for (_, p) in parts {
        let f = read_parquet_file(&p);
        out.schemas.push(f.schema);
        out.rows.extend(f.rows);
        out.files.push(p);
    }
    out
}

/// Compare a replay or DLQ output with the expectation; returns the
/// differences, empty when they agree.
pub fn diff_events(
    what: &str,
    out: &Output,
    expected: &BTreeMap<String, Outcome>,
    source: &Source,
    cfg: &Config,
    run_id: &str,
) -> Vec<String> {
    let c = &cfg.columns;
    let mut errs = Vec::new();
    let backfill = [
        "backfill_run_id",
        "backfill_reason",
        "backfill_attempt",
        "backfill_detected_at",
    ];
    for schema in &out.schemas {
        let names: BTreeSet<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let want: BTreeSet<String> = source
            .columns
            .iter()
            .cloned()
            .chain(backfill.iter().map(|s| s.to_string()))
            .collect();
        if names != want {
            errs.push(format!("{what}: columns {names:?}, expected {want:?}"));
        }
        for (name, ty) in [
            ("backfill_run_id", DataType::Utf8),
            ("backfill_reason", DataType::Utf8),
            ("backfill_attempt", DataType::Int32),
            (
                "backfill_detected_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ),
        ] {
            match schema.field_with_name(name) {
                Ok(f) if f.data_type() == &ty => {}
                Ok(f) => errs.push(format!(
                    "{what}: {name} is {}, expected {ty}",
                    f.data_type()
                )),
                Err(_) => {}
            }
        }
    }
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut detected: BTreeSet<String> = BTreeSet::new();
    let mut last: Option<(String, String)> = None;
    for row in &out.rows {
        let Some(id) = get(row, &c.event_id).as_str().map(str::to_string) else {
            errs.push(format!("{what}: a row without {}: {row:?}", c.event_id));
            continue;
        };
        if !seen.insert(id.clone()) {
            errs.push(format!("{what}: event {id} written more than once"));
        }
        detected.insert(format!("{:?}", get(row, "backfill_detected_at")));
        let order = (get(row, &c.key).sort_key(), get(row, &c.seq).sort_key());
        if let Some(prev) = &last
            && prev > &order
        {
            errs.push(format!(
                "{what}: rows not ordered by key and seq at event {id}"
            ));
        }
        last = Some(order);
        let Some(exp) = expected.get(&id) else {
            errs.push(format!("{what}: unexpected event {id}: {row:?}"));
            continue;
        };
        if get(row, "backfill_run_id") != &Value::Str(run_id.to_string()) {
            errs.push(format!(
                "{what}: event {id}: backfill_run_id {:?}, expected {run_id}",
                get(row, "backfill_run_id")
            ));
        }
        if get(row, "backfill_reason") != &Value::Str(exp.reason.clone()) {
            errs.push(format!(
                "{what}: event {id}: backfill_reason {:?}, expected {}",
                get(row, "backfill_reason"),
                exp.reason
            ));
        }
        if get(row, "backfill_attempt") != &Value::Int(exp.attempt) {
            errs.push(format!(
                "{what}: event {id}: backfill_attempt {:?}, expected {}",
                get(row, "backfill_attempt"),
                exp.attempt
            ));
        }
        let matches = |cand: &Record| {
            source
                .columns
                .iter()
                .all(|col| get(row, col) == get(cand, col))
        };
        if !exp.candidates.iter().any(matches) {
            errs.push(format!(
                "{what}: event {id}: source columns {:?}, expected the chosen row {:?}",
                source
                    .columns
                    .iter()
                    .map(|col| (col.clone(), get(row, col).clone()))
                    .collect::<Vec<_>>(),
                exp.candidates
            ));
        }
    }
    for id in expected.keys() {
        if !seen.contains(id) {
            errs.push(format!(
                "{what}: missing event {id} (reason {}, attempt {})",
                expected[id].reason, expected[id].attempt
            ));
        }
    }
    if detected.len() > 1 {
        errs.push(format!(
            "{what}: backfill_detected_at is not one value: {detected:?}"
        ));
    }
    errs
}

/// Compare a gaps output with the expectation.
pub fn diff_gaps(out: &Output, expected: &[Gap], run_id: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let want_cols = [
        "key",
        "first_missing_seq",
        "last_missing_seq",
        "missing_count",
        "before_event_id",
        "before_event_time",
        "after_event_id",
        "after_event_time",
        "backfill_run_id",
        "backfill_detected_at",
    ];
    for schema in &out.schemas {
        for col in want_cols {
            if schema.field_with_name(col).is_err() {
                errs.push(format!("gaps: column {col} missing from {schema:?}"));
            }
        }
        if let Ok(f) = schema.field_with_name("missing_count")
            && f.data_type() != &DataType::Int64
        {
            errs.push(format!("gaps: missing_count is {}", f.data_type()));
        }
    }
    let mut got: BTreeMap<(String, i64), &Record> = BTreeMap::new();
    for row in &out.rows {
        let k = (
            get(row, "key").sort_key(),
            get(row, "first_missing_seq").as_int().unwrap_or(i64::MIN),
        );
        if got.insert(k.clone(), row).is_some() {
            errs.push(format!("gaps: duplicate gap {k:?}"));
        }
        if get(row, "backfill_run_id") != &Value::Str(run_id.to_string()) {
            errs.push(format!("gaps: backfill_run_id of {k:?} is not {run_id}"));
        }
    }
    let mut wanted: BTreeSet<(String, i64)> = BTreeSet::new();
    for g in expected {
        let k = (g.key.sort_key(), g.first);
        wanted.insert(k.clone());
        let Some(row) = got.get(&k) else {
            errs.push(format!("gaps: missing gap {g:?}"));
            continue;
        };
        let checks = [
            ("key", get(row, "key") == &g.key),
            (
                "last_missing_seq",
                get(row, "last_missing_seq") == &Value::Int(g.last),
            ),
            (
                "missing_count",
                get(row, "missing_count") == &Value::Int(g.count),
            ),
            (
                "before_event_id",
                get(row, "before_event_id") == &g.before_id,
            ),
            ("after_event_id", get(row, "after_event_id") == &g.after_id),
            (
                "before_event_time",
                match get(row, "before_event_time").as_ts() {
                    Some(t) => g.before_times.contains(&t),
                    None => g.before_times.is_empty(),
                },
            ),
            (
                "after_event_time",
                match get(row, "after_event_time").as_ts() {
                    Some(t) => g.after_times.contains(&t),
                    None => g.after_times.is_empty(),
                },
            ),
        ];
        for (col, ok) in checks {
            if !ok {
                errs.push(format!("gaps: {col} differs: got {row:?}, expected {g:?}"));
            }
        }
    }
    for (k, row) in &got {
        if !wanted.contains(k) {
            errs.push(format!("gaps: unexpected gap {row:?}"));
        }
    }
    errs
}
