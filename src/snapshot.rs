//! Snapshots of a downstream store: a Parquet or CSV file (local or on an
//! object store) of per-key values, read by `backfill infer` (two
//! snapshots of totals) and `backfill reconcile` (one snapshot against the
//! archive). One reader, so that both take the same files and refuse the
//! same bad ones with the same lines: a missing column, a row without a
//! key, a key twice (which of two values would be the downstream's?).

use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use crate::error::Error;
use crate::location::StorageSettings;

/// Register the file at `loc` (Parquet, or CSV by its `.csv` extension,
/// with a header) as `name`, exposing `columns` as `(as, source column)`
/// pairs: `key` is cast to text, whatever its type in the file. `flag`
/// names the file in errors. `optional` source columns may be absent
/// (they come out NULL).
pub async fn register(
    ctx: &SessionContext,
    name: &str,
    flag: &str,
    loc: &str,
    storage: &StorageSettings,
    columns: &[Column<'_>],
) -> Result<(), Error> {
    let shown = crate::redact::url(loc);
    let resolved = crate::location::resolve(loc, storage)?;
    resolved.register(ctx);
    let raw = format!("{name}__file");
    let bad = |e: datafusion::error::DataFusionError| {
        Error::Usage(format!(
            "{flag} {shown}: cannot read it as a snapshot: {}",
            e.strip_backtrace().lines().next().unwrap_or_default()
        ))
    };
    // Registered above for its scheme: DataFusion reads the URL as given.
    if loc.ends_with(".csv") {
        ctx.register_csv(&raw, loc, CsvReadOptions::new().has_header(true))
            .await
            .map_err(bad)?;
        // A text column (the key) is read as text, not as the number its
        // values look like: `007` stays `007`, the archive's key.
        let inferred = ctx.table(&raw).await?.schema().inner().clone();
        let fields: Vec<arrow::datatypes::Field> = inferred
            .fields()
            .iter()
            .map(|f| {
                if columns.iter().any(|c| c.text && c.source == f.name()) {
                    f.as_ref()
                        .clone()
                        .with_data_type(arrow::datatypes::DataType::Utf8)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        let text_schema = arrow::datatypes::Schema::new(fields);
        ctx.deregister_table(&raw)?;
        ctx.register_csv(
            &raw,
            loc,
            CsvReadOptions::new().has_header(true).schema(&text_schema),
        )
        .await
        .map_err(bad)?;
    } else {
        ctx.register_parquet(&raw, loc, ParquetReadOptions::default())
            .await
            .map_err(bad)?;
    }
    let schema = ctx.table(&raw).await?.schema().clone();
    let mut select = vec![];
    for c in columns {
        let present = schema.field_with_unqualified_name(c.source).is_ok();
        if c.number
            && let Ok(f) = schema.field_with_unqualified_name(c.source)
            && !is_number(f.data_type())
        {
            return Err(Error::Usage(format!(
                "{flag} {shown}: the column `{}` is {}, not a number",
                c.source,
                f.data_type()
            )));
        }
        let expr = match (present, c.optional) {
            (true, _) if c.text => format!("CAST({} AS VARCHAR)", crate::source::quoted(c.source)),
            (true, _) => crate::source::quoted(c.source),
            (false, true) => "NULL".to_string(),
            (false, false) => {
                let have: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
                return Err(Error::Usage(format!(
                    "{flag} {shown}: the snapshot has no `{}` column (it has {}){}",
                    c.source,
                    have.join(", "),
                    c.hint
                )));
            }
        };
        select.push(format!("{expr} AS {}", crate::source::quoted(c.name)));
    }
    let df = ctx
        .sql(&format!(
            "SELECT {} FROM {}",
            select.join(", "),
            crate::source::quoted(&raw)
        ))
        .await?;
    ctx.register_table(name, df.into_view())?;

    // A key twice, or none: the snapshot does not say what the downstream
    // holds for it.
    let key = crate::source::quoted(columns[0].name);
    let table = crate::source::quoted(name);
    let rows = ctx
        .sql(&format!(
            "SELECT {key} AS k, count(*) AS n FROM {table} \
             GROUP BY {key} HAVING count(*) > 1 OR {key} IS NULL ORDER BY {key} NULLS FIRST LIMIT 1"
        ))
        .await?
        .collect()
        .await
        .map_err(bad)?;
    use arrow::array::{Array, AsArray};
    if let Some(b) = rows.iter().find(|b| b.num_rows() > 0) {
        let k = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let k = k.as_string::<i32>();
        let n = b
            .column(1)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0);
        return Err(Error::Usage(if k.is_null(0) {
            format!(
                "{flag} {shown}: {n} row(s) without a `{}`; every row of a snapshot names its key",
                columns[0].source
            )
        } else {
            format!(
                "{flag} {shown}: the key {:?} appears {n} times; a snapshot holds one value per key",
                k.value(0)
            )
        }));
    }
    // A value the file leaves NULL (beside a column it may lack): no value
    // to compare, and never a silent 0.
    for c in columns.iter().skip(1).filter(|c| !c.optional) {
        let name = crate::source::quoted(c.name);
        let n = count(ctx, &format!("{table} WHERE {name} IS NULL"))
            .await
            .map_err(bad)?;
        if n > 0 {
            return Err(Error::Usage(format!(
                "{flag} {shown}: {n} row(s) with no `{}`; every row needs one",
                c.source
            )));
        }
    }
    // NaN and infinities compare with nothing: not a value either.
    for c in columns.iter().filter(|c| c.number) {
        let t = ctx.table(name).await?;
        let float = t
            .schema()
            .field_with_unqualified_name(c.name)
            .is_ok_and(|f| f.data_type().is_floating());
        if !float {
            continue;
        }
        let name = crate::source::quoted(c.name);
        let n = count(
            ctx,
            &format!("{table} WHERE isnan({name}) OR abs({name}) = CAST('inf' AS DOUBLE)"),
        )
        .await
        .map_err(bad)?;
        if n > 0 {
            return Err(Error::Usage(format!(
                "{flag} {shown}: {n} row(s) whose `{}` is NaN or infinite, not a number",
                c.source
            )));
        }
    }
    Ok(())
}

/// A number a value can be compared by difference with (NULL: a column
/// with no value at all, refused row by row).
pub fn is_number(t: &arrow::datatypes::DataType) -> bool {
    t.is_numeric() || t.is_null()
}

/// `SELECT count(*) FROM {from}`: the rows of a table (and a condition).
pub async fn count(ctx: &SessionContext, from: &str) -> datafusion::error::Result<i64> {
    use arrow::array::AsArray;
    Ok(ctx
        .sql(&format!("SELECT count(*) FROM {from}"))
        .await?
        .collect()
        .await?
        .first()
        .map(|b| {
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0)
        })
        .unwrap_or(0))
}

/// One column of a registered snapshot.
pub struct Column<'a> {
    /// Its name in the registered table.
    pub name: &'a str,
    /// Its name in the file.
    pub source: &'a str,
    /// Cast to text (keys compare as text with the archive's).
    pub text: bool,
    /// Must be a number (a total, a value compared by difference).
    pub number: bool,
    /// May be absent from the file (NULL then).
    pub optional: bool,
    /// Appended to the line of a missing column: what else would do.
    pub hint: &'a str,
}
