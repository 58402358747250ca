//! Hand-made Parquet archives for the end-to-end tests.
//!
//! Rows are a plain struct; a [`Layout`] says how one file spells them:
//! which columns, in which order, under which names, with which physical
//! types. Written with the parquet crate's synchronous `ArrowWriter`, never
//! with code of the crate under test.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// Microseconds since the epoch (UTC) of an RFC 3339 timestamp.
pub fn ts(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("bad test timestamp {rfc3339}: {e}"))
        .timestamp_micros()
}

/// One archive row, in the input contract's terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub event_id: String,
    pub key: Option<String>,
    pub seq: Option<i64>,
    /// Microseconds since the epoch, UTC. Keep it a whole number of
    /// milliseconds when the row goes into a millisecond file.
    pub event_time: i64,
    pub status: Option<String>,
    pub attempts: Option<i64>,
    pub error: Option<String>,
    pub payload: Option<String>,
    /// A Utf8 passthrough column (default name `region`).
    pub extra: Option<String>,
    /// An Int32 passthrough column (default name `shard`).
    pub shard: Option<i32>,
}

impl Row {
    /// A row with the given identity, at `time` (RFC 3339), with a status
    /// (`None` = NULL), a payload derived from the id and everything else NULL.
    pub fn new(event_id: &str, key: &str, seq: i64, time: &str, status: Option<&str>) -> Row {
        Row {
            event_id: event_id.to_string(),
            key: Some(key.to_string()),
            seq: Some(seq),
            event_time: ts(time),
            status: status.map(str::to_string),
            attempts: None,
            error: None,
            payload: Some(format!("{{\"body\":\"{event_id}\"}}")),
            extra: Some(format!("eu-{key}")),
            shard: Some((seq % 7) as i32),
        }
    }

    pub fn attempts(mut self, n: i64) -> Row {
        self.attempts = Some(n);
        self
    }

    pub fn error(mut self, e: &str) -> Row {
        self.error = Some(e.to_string());
        self
    }

    pub fn payload(mut self, p: &str) -> Row {
        self.payload = Some(p.to_string());
        self
    }
}

/// A column of [`Row`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Col {
    EventId,
    Key,
    Seq,
    EventTime,
    Status,
    Attempts,
    Error,
    Payload,
    Extra,
    Shard,
}

impl Col {
    pub fn default_name(self) -> &'static str {
        match self {
            Col::EventId => "event_id",
            Col::Key => "key",
            Col::Seq => "seq",
            Col::EventTime => "event_time",
            Col::Status => "status",
            Col::Attempts => "attempts",
            Col::Error => "error",
            Col::Payload => "payload",
            Col::Extra => "region",
            Col::Shard => "shard",
        }
    }
}

/// How one file spells the rows.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Which columns, in which order.
    pub columns: Vec<Col>,
    /// Column renames (source name differs from the default name).
    pub names: Vec<(Col, String)>,
    pub seq_type: DataType,
    pub attempts_type: DataType,
    pub time_unit: TimeUnit,
    /// `None`: a naive timestamp; `Some("UTC")`: zoned.
    pub tz: Option<String>,
    pub payload_binary: bool,
    /// Forced type of a column (e.g. `seq` as Utf8 for bad-input tests).
    pub override_type: Option<(Col, DataType)>,
    pub row_group_size: Option<usize>,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            columns: vec![
                Col::EventId,
                Col::Key,
                Col::Seq,
                Col::EventTime,
                Col::Status,
                Col::Attempts,
                Col::Error,
                Col::Payload,
                Col::Extra,
            ],
            names: Vec::new(),
            seq_type: DataType::Int64,
            attempts_type: DataType::Int64,
            time_unit: TimeUnit::Microsecond,
            tz: Some("UTC".to_string()),
            payload_binary: false,
            override_type: None,
            row_group_size: None,
        }
    }
}

impl Layout {
    pub fn name(&self, col: Col) -> String {
        self.names
            .iter()
            .find(|(c, _)| *c == col)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| col.default_name().to_string())
    }

    pub fn with_columns(mut self, cols: &[Col]) -> Layout {
        self.columns = cols.to_vec();
        self
    }

    pub fn without(mut self, col: Col) -> Layout {
        self.columns.retain(|c| *c != col);
        self
    }

    pub fn with(mut self, col: Col) -> Layout {
        if !self.columns.contains(&col) {
            self.columns.push(col);
        }
        self
    }

    pub fn renamed(mut self, col: Col, name: &str) -> Layout {
        self.names.push((col, name.to_string()));
        self
    }

    pub fn seq_int32(mut self) -> Layout {
        self.seq_type = DataType::Int32;
        self
    }

    pub fn attempts_int32(mut self) -> Layout {
        self.attempts_type = DataType::Int32;
        self
    }

    pub fn time(mut self, unit: TimeUnit, tz: Option<&str>) -> Layout {
        self.time_unit = unit;
        self.tz = tz.map(str::to_string);
        self
    }

    pub fn payload_binary(mut self) -> Layout {
        self.payload_binary = true;
        self
    }

    pub fn override_type(mut self, col: Col, ty: DataType) -> Layout {
        self.override_type = Some((col, ty));
        self
    }

    pub fn row_group_size(mut self, n: usize) -> Layout {
        self.row_group_size = Some(n);
        self
    }

    fn time_type(&self) -> DataType {
        DataType::Timestamp(self.time_unit, self.tz.clone().map(Into::into))
    }

    fn column(&self, col: Col, rows: &[Row]) -> (Field, ArrayRef) {
        let utf8 = |f: &dyn Fn(&Row) -> Option<String>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        let int = |ty: &DataType, f: &dyn Fn(&Row) -> Option<i64>| -> ArrayRef {
            match ty {
                DataType::Int32 => Arc::new(
                    rows.iter()
                        .map(|r| f(r).map(|v| v as i32))
                        .collect::<Int32Array>(),
                ),
                DataType::Int64 => Arc::new(rows.iter().map(f).collect::<Int64Array>()),
                DataType::Utf8 => Arc::new(
                    rows.iter()
                        .map(|r| f(r).map(|v| v.to_string()))
                        .collect::<StringArray>(),
                ),
                other => panic!("unsupported integer column type {other}"),
            }
        };
        let forced = self
            .override_type
            .as_ref()
            .filter(|(c, _)| *c == col)
            .map(|(_, t)| t.clone());
        let array: ArrayRef = match col {
            Col::EventId => utf8(&|r| Some(r.event_id.clone())),
            Col::Key => utf8(&|r| r.key.clone()),
            Col::Seq => int(forced.as_ref().unwrap_or(&self.seq_type), &|r| r.seq),
            Col::EventTime => {
                if let Some(DataType::Utf8) = forced {
                    utf8(&|r| Some(r.event_time.to_string()))
                } else {
                    let tz = self.tz.clone();
                    let micros = rows.iter().map(|r| r.event_time);
                    match self.time_unit {
                        TimeUnit::Millisecond => Arc::new(
                            TimestampMillisecondArray::from_iter_values(micros.map(|v| {
                                assert_eq!(v % 1000, 0, "ms file needs whole-ms event times");
                                v / 1000
                            }))
                            .with_timezone_opt(tz),
                        ),
                        TimeUnit::Microsecond => Arc::new(
                            TimestampMicrosecondArray::from_iter_values(micros)
                                .with_timezone_opt(tz),
                        ),
                        TimeUnit::Nanosecond => Arc::new(
                            TimestampNanosecondArray::from_iter_values(micros.map(|v| v * 1000))
                                .with_timezone_opt(tz),
                        ),
                        TimeUnit::Second => panic!("second timestamps are not used"),
                    }
                }
            }
            Col::Status => utf8(&|r| r.status.clone()),
            Col::Attempts => int(forced.as_ref().unwrap_or(&self.attempts_type), &|r| {
                r.attempts
            }),
            Col::Error => utf8(&|r| r.error.clone()),
            Col::Payload => {
                if self.payload_binary {
                    Arc::new(
                        rows.iter()
                            .map(|r| r.payload.as_deref().map(str::as_bytes))
                            .collect::<BinaryArray>(),
                    )
                } else {
                    utf8(&|r| r.payload.clone())
                }
            }
            Col::Extra => utf8(&|r| r.extra.clone()),
            Col::Shard => Arc::new(rows.iter().map(|r| r.shard).collect::<Int32Array>()),
        };
        let ty = if col == Col::EventTime && forced.is_none() {
            self.time_type()
        } else {
            array.data_type().clone()
        };
        (Field::new(self.name(col), ty, true), array)
    }

    /// The batch this layout makes of `rows`.
    pub fn batch(&self, rows: &[Row]) -> RecordBatch {
        let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) =
            self.columns.iter().map(|c| self.column(*c, rows)).unzip();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("test batch")
    }
}

/// Write `rows` to `path` (parents created) as one Parquet file.
pub fn write_file(path: &Path, layout: &Layout, rows: &[Row]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create archive folder");
    }
    let batch = layout.batch(rows);
    let mut props = WriterProperties::builder();
    if let Some(n) = layout.row_group_size {
        props = props.set_max_row_group_row_count(Some(n));
    }
    let file = File::create(path).expect("create parquet file");
    let mut writer =
        ArrowWriter::try_new(file, batch.schema(), Some(props.build())).expect("parquet writer");
    if batch.num_rows() > 0 {
        writer.write(&batch).expect("write batch");
    }
    writer.close().expect("close parquet file");
}

/// An archive folder being built in a temporary directory.
pub struct Archive {
    pub dir: tempfile::TempDir,
}

impl Archive {
    pub fn new() -> Archive {
        Archive {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The archive path as a `--source` argument.
    pub fn source(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Add a file at `rel` (e.g. `dt=2024-01-01/part-0.parquet`).
    pub fn file(&mut self, rel: &str, layout: &Layout, rows: &[Row]) -> &mut Archive {
        write_file(&self.dir.path().join(rel), layout, rows);
        self
    }

    /// Add a file with the default layout.
    pub fn rows(&mut self, rel: &str, rows: &[Row]) -> &mut Archive {
        self.file(rel, &Layout::default(), rows)
    }

    /// Add raw bytes at `rel` (garbage, zero-byte files, `_SUCCESS`).
    pub fn raw(&mut self, rel: &str, bytes: &[u8]) -> &mut Archive {
        let path = self.dir.path().join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create archive folder");
        }
        fs::write(path, bytes).expect("write raw file");
        self
    }
}
