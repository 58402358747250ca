//! Results to text: a table, CSV, TSV, a JSON array or JSON lines, at most
//! `--maxrows` rows of each result.
//!
//! Rows are written as the query produces them (a table needs them all for
//! its widths, so it holds what it prints), and reading stops at the row
//! limit: the query is dropped, not drained. Binary columns print as text
//! where the bytes are UTF-8 (archived payloads are JSON more often than
//! not) and as `\x` and hex otherwise, in every format. An empty result
//! still prints its header (CSV, TSV, table) or `[]` (JSON).
//!
//! Every column prints in every format: what a format cannot hold is
//! turned into text first (nested values as JSON in CSV and TSV), so no
//! column fails to print after the header is out (a query that fails while
//! it runs still stops its result where it failed). A table, which is
//! for a terminal, shows control characters escaped (`\n`, `\u{1b}`): a
//! value must not break the table's lines or send the terminal escape
//! sequences.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;

use crate::cli::Format;
use crate::error::Error;

/// Where results go: stdout in the binary, a buffer in tests. A reader that
/// went away (`| head`) is not an error: the writer notes it, swallows the
/// rest, and the shell stops.
pub struct Out {
    w: Box<dyn Write + Send>,
    closed: bool,
    /// Results printed so far (tables are separated by a blank line).
    pub results: usize,
}

impl Out {
    /// Buffered: stdout is line-buffered, and JSON rows are written one
    /// at a time. Flushed after each result.
    pub fn stdout() -> Out {
        Out::new(Box::new(std::io::BufWriter::with_capacity(
            1 << 16,
            std::io::stdout(),
        )))
    }

    pub fn new(w: Box<dyn Write + Send>) -> Out {
        Out {
            w,
            closed: false,
            results: 0,
        }
    }

    /// The reader of stdout went away: nothing more will be seen.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        match self.w.write_all(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(buf.len())
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self.w.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => r,
        }
    }
}

/// A write to stdout that failed other than by a closed pipe.
pub fn stdout_error(e: std::io::Error) -> Error {
    Error::Io {
        what: "stdout".into(),
        message: e.to_string(),
    }
}

/// What a result printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Printed {
    /// Rows written.
    pub rows: usize,
    /// The result had more rows than the limit; they were not fetched.
    pub more: bool,
}

/// Print one result, reading at most `maxrows` rows (and one more, to know
/// whether there were more) from `stream`. A result without columns (DDL,
/// `SELECT FROM t`) prints nothing; its rows are counted. `lines`: the result is text of ours or DataFusion's, not
/// data (EXPLAIN's plans), whose line breaks a table keeps.
pub async fn print_stream(
    out: &mut Out,
    schema: SchemaRef,
    mut stream: SendableRecordBatchStream,
    format: Format,
    maxrows: Option<usize>,
    lines: bool,
) -> Result<Printed, Error> {
    if schema.fields().is_empty() {
        // Still run it to its end: a DDL statement acts when polled. Its
        // rows are counted: `SELECT FROM events` has some, and no columns.
        let mut rows = 0;
        while let Some(b) = stream.next().await {
            rows += b?.num_rows();
        }
        return Ok(match maxrows {
            Some(max) if rows > max => Printed {
                rows: max,
                more: true,
            },
            _ => Printed { rows, more: false },
        });
    }
    let mut writer = BatchWriter::new(format, &schema, lines);
    let mut rows = 0usize;
    let mut more = false;
    while let Some(batch) = stream.next().await {
        let mut batch = batch?;
        if let Some(max) = maxrows
            && rows + batch.num_rows() > max
        {
            batch = batch.slice(0, max - rows);
            more = true;
        }
        rows += batch.num_rows();
        writer.write(out, &batch)?;
        if more || out.closed() {
            break;
        }
    }
    // Dropping the stream cancels the query: nothing past the limit is read.
    drop(stream);
    writer.finish(out)?;
    out.results += 1;
    Ok(Printed { rows, more })
}

/// Print batches already in memory (the `gaps` command), all of them.
pub fn print_batches(
    out: &mut Out,
    schema: SchemaRef,
    batches: &[RecordBatch],
    format: Format,
) -> Result<(), Error> {
    let mut writer = BatchWriter::new(format, &schema, false);
    for b in batches {
        writer.write(out, b)?;
    }
    writer.finish(out)?;
    out.results += 1;
    out.flush().map_err(stdout_error)
}

/// One result being written in one format: how each column is shown, and
/// the writer's state.
struct BatchWriter {
    format: Format,
    /// A table keeps the values' line breaks (EXPLAIN's plans).
    lines: bool,
    /// The result's schema as written (every converted column is text):
    /// the header of a result without rows, and of a table.
    schema: SchemaRef,
    state: State,
}

enum State {
    /// Held until the end: a table's widths depend on every row.
    Table(Vec<RecordBatch>),
    /// CSV or TSV; the header is written with the first batch (an empty one
    /// at the end if no batch had rows).
    Delimited(u8, bool),
    /// Whether a row was written (`[` is out).
    Json(bool),
    Ndjson,
}

impl BatchWriter {
    fn new(format: Format, schema: &SchemaRef, lines: bool) -> BatchWriter {
        let state = match format {
            Format::Table => State::Table(vec![]),
            Format::Csv => State::Delimited(b',', false),
            Format::Tsv => State::Delimited(b'\t', false),
            Format::Json => State::Json(false),
            Format::Ndjson => State::Ndjson,
        };
        BatchWriter {
            format,
            lines,
            schema: shown_schema(schema, format, lines).1,
            state,
        }
    }

    /// `batch` with its columns converted as [`Shown`] says, decided on the
    /// batch's own types: they may differ from the result's schema
    /// (`SELECT CAST(NULL AS INT) UNION ALL SELECT 1` is planned as Int32
    /// and yields Int64), and a batch is what is written.
    fn convert(&self, batch: &RecordBatch) -> Result<RecordBatch, Error> {
        let (shown, schema) = shown_schema(&batch.schema(), self.format, self.lines);
        if shown.iter().all(|s| *s == Shown::AsIs) {
            return Ok(batch.clone());
        }
        let columns = batch
            .columns()
            .iter()
            .zip(batch.schema().fields())
            .zip(&shown)
            .map(|((col, field), shown)| shown.convert(col, field))
            .collect::<Result<Vec<ArrayRef>, Error>>()?;
        Ok(RecordBatch::try_new(schema, columns)?)
    }

    fn write(&mut self, out: &mut Out, batch: &RecordBatch) -> Result<(), Error> {
        let batch = self.convert(batch)?;
        match &mut self.state {
            State::Table(kept) => kept.push(batch),
            State::Delimited(delimiter, header_done) => {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(!*header_done)
                    .with_delimiter(*delimiter)
                    .build(&mut *out);
                w.write(&batch)?;
                *header_done = true;
            }
            State::Json(started) => {
                // The array's brackets and commas are ours, so that the
                // rows can be written as they come.
                let mut buf = vec![];
                {
                    let mut w = arrow::json::WriterBuilder::new()
                        .with_explicit_nulls(true)
                        .build::<_, arrow::json::writer::LineDelimited>(&mut buf);
                    w.write(&batch)?;
                    w.finish()?;
                }
                for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    out.write_all(if *started { b",\n" } else { b"[" })
                        .map_err(stdout_error)?;
                    out.write_all(line).map_err(stdout_error)?;
                    *started = true;
                }
            }
            State::Ndjson => {
                let mut w = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(&mut *out);
                w.write(&batch)?;
                w.finish()?;
            }
        }
        Ok(())
    }

    fn finish(self, out: &mut Out) -> Result<(), Error> {
        match self.state {
            State::Table(kept) => {
                if out.results > 0 {
                    out.write_all(b"\n").map_err(stdout_error)?;
                }
                let t = arrow::util::pretty::pretty_format_batches_with_schema(self.schema, &kept)?;
                writeln!(out, "{t}").map_err(stdout_error)?;
            }
            State::Delimited(delimiter, false) => {
                // No rows: the header alone, from an empty batch.
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .with_delimiter(delimiter)
                    .build(&mut *out);
                w.write(&RecordBatch::new_empty(self.schema))?;
            }
            State::Delimited(..) => {}
            State::Json(started) => {
                out.write_all(if started { b"]\n" } else { b"[]\n" })
                    .map_err(stdout_error)?;
            }
            State::Ndjson => {}
        }
        Ok(())
    }
}

/// How each column of `schema` is written in `format`, and the schema as
/// written.
fn shown_schema(schema: &Schema, format: Format, lines: bool) -> (Vec<Shown>, SchemaRef) {
    let shown: Vec<Shown> = schema
        .fields()
        .iter()
        .map(|f| Shown::of(f, format, lines))
        .collect();
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(&shown)
        .map(|(f, shown)| {
            let name = match format {
                Format::Table => escape_controls(f.name()).into_owned(),
                _ => f.name().clone(),
            };
            let data_type = match shown {
                Shown::AsIs => f.data_type().clone(),
                _ => DataType::Utf8,
            };
            Field::new(name, data_type, f.is_nullable()).with_metadata(f.metadata().clone())
        })
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    (shown, schema)
}

/// How a column is written in a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// As the format's writer writes its type.
    AsIs,
    /// Binary as text or `\x` hex ([`binary_text`]).
    BinaryText,
    /// Nested (struct, list, map) as JSON text: arrow's CSV writer refuses
    /// nested types, and it did so after the header was out. DuckDB writes
    /// them into CSV as text too.
    Json,
    /// As the table shows it (`{a: 1}`): a type the format's writer cannot
    /// write at all (a union; a map with non-string keys in JSON).
    Display,
    /// A table cell, as arrow displays it, control characters escaped.
    Cell,
    /// A table cell of text that is not data (a plan), its line breaks
    /// kept: an EXPLAIN is read line by line.
    Lines,
    /// A binary table cell: [`binary_text`], control characters escaped.
    BinaryCell,
}

impl Shown {
    fn of(field: &Field, format: Format, lines: bool) -> Shown {
        let t = field.data_type();
        match format {
            Format::Table if is_binary(t) => Shown::BinaryCell,
            // Numbers, booleans and times hold no control characters.
            Format::Table if t.is_primitive() || t.is_null() || *t == DataType::Boolean => {
                Shown::AsIs
            }
            Format::Table if lines => Shown::Lines,
            Format::Table => Shown::Cell,
            _ if is_binary(t) => Shown::BinaryText,
            Format::Csv | Format::Tsv if t.is_nested() && json_encodes(field) => Shown::Json,
            Format::Csv | Format::Tsv if t.is_nested() => Shown::Display,
            Format::Json | Format::Ndjson if !json_encodes(field) => Shown::Display,
            _ => Shown::AsIs,
        }
    }

    fn convert(self, col: &ArrayRef, field: &Field) -> Result<ArrayRef, Error> {
        Ok(match self {
            Shown::AsIs => col.clone(),
            Shown::BinaryText => binary_text(col),
            Shown::Json => json_text(col, field)?,
            Shown::Display => display_text(col, None)?,
            Shown::Cell => display_text(col, Some(&[]))?,
            Shown::Lines => display_text(col, Some(&['\n']))?,
            Shown::BinaryCell => display_text(&binary_text(col), Some(&[]))?,
        })
    }
}

/// Whether arrow's JSON writer writes `field`'s type (it has no union,
/// and only string keys for maps).
fn json_encodes(field: &Field) -> bool {
    let empty = arrow::array::new_empty_array(field.data_type());
    let field = Arc::new(field.clone());
    let options = arrow::json::writer::EncoderOptions::default();
    arrow::json::writer::make_encoder(&field, empty.as_ref(), &options).is_ok()
}

/// Each value of a nested column as its JSON text (NULL stays NULL).
fn json_text(col: &ArrayRef, field: &Field) -> Result<ArrayRef, Error> {
    let field = Arc::new(field.clone());
    let options = arrow::json::writer::EncoderOptions::default().with_explicit_nulls(true);
    let mut encoder = arrow::json::writer::make_encoder(&field, col.as_ref(), &options)?;
    let mut b = StringBuilder::with_capacity(col.len(), 0);
    let mut buf = Vec::new();
    for i in 0..col.len() {
        if encoder.is_null(i) {
            b.append_null();
            continue;
        }
        buf.clear();
        encoder.encode(i, &mut buf);
        // The encoder writes JSON, which is UTF-8.
        b.append_value(String::from_utf8_lossy(&buf));
    }
    Ok(Arc::new(b.finish()))
}

/// Each value as arrow displays it (as a table shows it); escaped for a
/// table cell when `cell`, but for the characters it holds. NULL stays
/// NULL.
fn display_text(col: &ArrayRef, cell: Option<&[char]>) -> Result<ArrayRef, Error> {
    let options = arrow::util::display::FormatOptions::default().with_display_error(true);
    let formatter = arrow::util::display::ArrayFormatter::try_new(col.as_ref(), &options)?;
    let mut b = StringBuilder::with_capacity(col.len(), 0);
    for i in 0..col.len() {
        if col.is_null(i) {
            b.append_null();
            continue;
        }
        let text = formatter.value(i).to_string();
        match cell {
            Some(keep) => b.append_value(escape(&text, keep)),
            None => b.append_value(text),
        }
    }
    Ok(Arc::new(b.finish()))
}

/// `s` with its control characters written as escapes: `\n`, `\r`, `\t`,
/// `\u{1b}` (and DEL, C1 controls such as U+009B, a terminal's escape
/// introducer too, and as `\u{202e}` the bidirectional overrides that make
/// text read otherwise than it is, the line and paragraph separators, and
/// the invisible U+200B, U+2060 and U+FEFF, which make two keys that look
/// alike differ). For text that reaches a terminal from data, file names
/// or SQL: a table cell, an error line. The joiners U+200C and U+200D are
/// left alone: scripts and emoji need them.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s, &[])
}

/// [`escape_controls`] for an error or warning line, but for the line
/// breaks and tabs that `Error::line` folds into spaces (DataFusion's
/// messages span lines; `\n` in them would read worse than a space).
pub fn escape_error(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s, &['\n', '\r', '\t'])
}

/// [`escape_controls`] sparing the characters in `keep`.
fn escape<'a>(s: &'a str, keep: &[char]) -> std::borrow::Cow<'a, str> {
    let escaped = |c: char| {
        (c.is_control() && !keep.contains(&c))
            || matches!(
                c,
                '\u{200b}'
                    | '\u{200e}'
                    | '\u{200f}'
                    | '\u{2028}'..='\u{202e}'
                    | '\u{2060}'
                    | '\u{2066}'..='\u{2069}'
                    | '\u{feff}'
            )
    };
    if !s.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !escaped(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
    )
}

/// Each value as its text when the bytes are UTF-8, else as `\x` and hex
/// (PostgreSQL's bytea output), so that a payload reads as the JSON or text
/// it is and a hash as the bytes it is.
fn binary_text(col: &ArrayRef) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(col.len(), 0);
    let mut push = |bytes: Option<&[u8]>| match bytes {
        None => b.append_null(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) => b.append_value(s),
            Err(_) => {
                let mut s = String::with_capacity(2 + 2 * bytes.len());
                s.push_str("\\x");
                for byte in bytes {
                    s.push_str(&format!("{byte:02x}"));
                }
                b.append_value(s);
            }
        },
    };
    match col.data_type() {
        DataType::Binary => col.as_binary::<i32>().iter().for_each(&mut push),
        DataType::LargeBinary => col.as_binary::<i64>().iter().for_each(&mut push),
        DataType::BinaryView => col.as_binary_view().iter().for_each(&mut push),
        DataType::FixedSizeBinary(_) => col.as_fixed_size_binary().iter().for_each(&mut push),
        _ => unreachable!("binary_text is called on binary columns only"),
    }
    Arc::new(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Int64Array};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use std::sync::Mutex;

    /// An `Out` whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn ints(schema: &SchemaRef, from: i64, n: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(from..from + n))],
        )
        .unwrap()
    }

    /// Batches of 10 rows, and then an error: a printer that reads past
    /// what it prints hits the error.
    fn stream_then_error(schema: &SchemaRef, good: i64) -> SendableRecordBatchStream {
        let mut items: Vec<datafusion::error::Result<RecordBatch>> =
            (0..good).map(|i| Ok(ints(schema, i * 10, 10))).collect();
        items.push(Err(datafusion::error::DataFusionError::Execution(
            "read past the row limit".into(),
        )));
        Box::pin(RecordBatchStreamAdapter::new(
            schema.clone(),
            futures::stream::iter(items),
        ))
    }

    fn int_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]))
    }

    #[tokio::test]
    async fn stops_reading_at_the_row_limit() {
        let schema = int_schema();
        let buf = Shared::default();
        let mut out = Out::new(Box::new(buf.clone()));
        let printed = print_stream(
            &mut out,
            schema.clone(),
            stream_then_error(&schema, 2),
            Format::Csv,
            Some(15),
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            printed,
            Printed {
                rows: 15,
                more: true
            }
        );
        let text = buf.text();
        assert_eq!(text.lines().count(), 16, "{text}");
        assert!(
            text.starts_with("n\n0\n") && text.ends_with("\n14\n"),
            "{text}"
        );
        // Without a limit the same stream's error is reached and reported.
        let mut out = Out::new(Box::new(Shared::default()));
        let e = print_stream(
            &mut out,
            schema.clone(),
            stream_then_error(&schema, 2),
            Format::Csv,
            None,
            false,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("read past the row limit"), "{e}");
    }

    #[tokio::test]
    async fn exactly_the_limit_is_not_more() {
        let schema = int_schema();
        let mut out = Out::new(Box::new(Shared::default()));
        let s = Box::pin(RecordBatchStreamAdapter::new(
            schema.clone(),
            futures::stream::iter(vec![Ok(ints(&schema, 0, 10))]),
        ));
        let printed = print_stream(&mut out, schema, s, Format::Table, Some(10), false)
            .await
            .unwrap();
        assert_eq!(
            printed,
            Printed {
                rows: 10,
                more: false
            }
        );
    }

    #[test]
    fn empty_results_keep_their_header() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("payload", DataType::Binary, true),
        ]));
        for (format, want) in [
            (Format::Csv, "event_id,payload\n"),
            (Format::Tsv, "event_id\tpayload\n"),
            (Format::Json, "[]\n"),
            (Format::Ndjson, ""),
        ] {
            let buf = Shared::default();
            let mut out = Out::new(Box::new(buf.clone()));
            print_batches(&mut out, schema.clone(), &[], format).unwrap();
            assert_eq!(buf.text(), want, "{format:?}");
        }
        let buf = Shared::default();
        let mut out = Out::new(Box::new(buf.clone()));
        print_batches(&mut out, schema, &[], Format::Table).unwrap();
        assert!(
            buf.text().contains("| event_id | payload |"),
            "{}",
            buf.text()
        );
    }

    #[test]
    fn binary_prints_as_text_when_utf8_else_as_hex() {
        let schema = Arc::new(Schema::new(vec![Field::new("p", DataType::Binary, true)]));
        let col = BinaryArray::from(vec![
            Some(&b"{\"body\":\"e1\"}"[..]),
            Some(&[0xff, 0x00, 0x10][..]),
            None,
        ]);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(col)]).unwrap();
        let buf = Shared::default();
        let mut out = Out::new(Box::new(buf.clone()));
        print_batches(
            &mut out,
            schema.clone(),
            std::slice::from_ref(&batch),
            Format::Csv,
        )
        .unwrap();
        // (A lone NULL is `""`: arrow's CSV writer tells it from no line.)
        assert_eq!(
            buf.text(),
            "p\n\"{\"\"body\"\":\"\"e1\"\"}\"\n\\xff0010\n\"\"\n"
        );
        let buf = Shared::default();
        let mut out = Out::new(Box::new(buf.clone()));
        print_batches(&mut out, schema, &[batch], Format::Ndjson).unwrap();
        assert_eq!(
            buf.text(),
            "{\"p\":\"{\\\"body\\\":\\\"e1\\\"}\"}\n{\"p\":\"\\\\xff0010\"}\n{\"p\":null}\n"
        );
    }

    #[test]
    fn json_is_one_array_across_batches() {
        let schema = int_schema();
        let buf = Shared::default();
        let mut out = Out::new(Box::new(buf.clone()));
        print_batches(
            &mut out,
            schema.clone(),
            &[ints(&schema, 0, 2), ints(&schema, 2, 1)],
            Format::Json,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&buf.text()).unwrap();
        assert_eq!(v, serde_json::json!([{"n": 0}, {"n": 1}, {"n": 2}]));
    }

    #[test]
    fn nested_columns_are_json_text_in_csv() {
        use arrow::array::{ListArray, StructArray};
        use arrow::datatypes::Int64Type;
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
            Some(vec![Some(1), None]),
            None,
        ]);
        let s = StructArray::from(vec![(
            Arc::new(Field::new("a", DataType::Utf8, true)),
            Arc::new(arrow::array::StringArray::from(vec![Some("x,\"y\""), None])) as ArrayRef,
        )]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("l", list.data_type().clone(), true),
            Field::new("s", s.data_type().clone(), true),
        ]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(list), Arc::new(s)]).unwrap();
        let buf = Shared::default();
        let mut out = Out::new(Box::new(buf.clone()));
        print_batches(&mut out, schema, &[batch], Format::Csv).unwrap();
        assert_eq!(
            buf.text(),
            "l,s\n\"[1,null]\",\"{\"\"a\"\":\"\"x,\\\"\"y\\\"\"\"\"}\"\n,\"{\"\"a\"\":null}\"\n"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain é"), "plain é");
        assert_eq!(
            escape_error("table 'a\u{1b}[2J' not\nfound"),
            "table 'a\\u{1b}[2J' not\nfound"
        );
        assert_eq!(
            escape_controls("a\nb\r\tc\u{1b}[0m\u{7f}\u{9b}\u{202e}"),
            "a\\nb\\r\\tc\\u{1b}[0m\\u{7f}\\u{9b}\\u{202e}"
        );
        assert_eq!(
            escape_controls("key\u{200b}1\u{feff}\u{2028}👨\u{200d}👩"),
            "key\\u{200b}1\\u{feff}\\u{2028}👨\u{200d}👩"
        );
    }

    /// DataFusion may yield batches whose types differ from the result's
    /// schema (`SELECT CAST(NULL AS INT) ... UNION ALL SELECT 1` is
    /// planned as Int32 and yields Int64); a table with a text column
    /// failed on them ("column types must match schema types").
    #[test]
    fn batches_typed_otherwise_than_their_schema_print() {
        let planned = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, true),
            Field::new("n", DataType::Int32, true),
        ]));
        let yielded = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            yielded,
            vec![
                Arc::new(arrow::array::StringArray::from(vec![Some("a"), None])),
                Arc::new(Int64Array::from(vec![None, Some(1)])),
            ],
        )
        .unwrap();
        for format in [Format::Table, Format::Csv, Format::Json] {
            let buf = Shared::default();
            let mut out = Out::new(Box::new(buf.clone()));
            print_batches(
                &mut out,
                planned.clone(),
                std::slice::from_ref(&batch),
                format,
            )
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert!(buf.text().contains('1'), "{format:?}: {}", buf.text());
        }
    }
}
