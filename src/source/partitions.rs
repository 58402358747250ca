//! Hive partition pruning: which `name=value` folders can hold rows inside
//! the window. A folder is kept unless the time span its values denote lies
//! wholly outside `[from, to)`; values that do not parse are kept (never
//! drop data because a folder name surprised us).

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Utc};

use crate::job::PartitionSpec;

/// The span one partition value covers, from its format: `%H` an hour,
/// `%M` a minute, otherwise (`%d`/`%j`) a day. Err when the format cannot
/// denote a time.
pub fn partition_granularity(format: &str) -> Result<Duration, String> {
    if !(format.contains("%Y") || format.contains("%H")) {
        return Err("a partition format needs at least %Y (a date) or %H (an hour)".into());
    }
    Ok(if format.contains("%M") {
        Duration::minutes(1)
    } else if format.contains("%H") {
        Duration::hours(1)
    } else {
        Duration::days(1)
    })
}

/// Does the folder with these partition values (outermost first, only the
/// levels seen so far) overlap the window?
pub fn overlaps(
    specs: &[PartitionSpec],
    values: &[(String, String)],
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> bool {
    let Some((start, span)) = span_of(specs, values) else {
        return true;
    };
    let end = start + span;
    if let Some(f) = from
        && end <= f
    {
        return false;
    }
    if let Some(t) = to
        && start >= t
    {
        return false;
    }
    true
}

fn span_of(
    specs: &[PartitionSpec],
    values: &[(String, String)],
) -> Option<(DateTime<Utc>, Duration)> {
    let mut fmt = String::new();
    let mut val = String::new();
    for (k, v) in values {
        let spec = specs.iter().find(|s| &s.name == k)?;
        if !fmt.is_empty() {
            fmt.push('|');
            val.push('|');
        }
        fmt.push_str(&spec.format);
        val.push_str(v);
    }
    let span = partition_granularity(&fmt).ok()?;
    if fmt.contains("%H") {
        // A bare hour level without a date above it cannot be placed in time.
        if !fmt.contains("%Y") {
            return None;
        }
        let (f, v) = if fmt.contains("%M") {
            (fmt.clone(), val.clone())
        } else {
            (format!("{fmt}|%M"), format!("{val}|00"))
        };
        let t = NaiveDateTime::parse_from_str(&v, &f).ok()?;
        Some((t.and_utc(), span))
    } else {
        let d = NaiveDate::parse_from_str(&val, &fmt).ok()?;
        Some((d.and_hms_opt(0, 0, 0)?.and_utc(), span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<PartitionSpec> {
        vec![
            PartitionSpec {
                name: "dt".into(),
                format: "%Y-%m-%d".into(),
            },
            PartitionSpec {
                name: "hour".into(),
                format: "%H".into(),
            },
        ]
    }

    fn t(s: &str) -> Option<DateTime<Utc>> {
        Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    #[test]
    fn day_and_hour_pruning() {
        let v = |d: &str| vec![("dt".to_string(), d.to_string())];
        let (f, to) = (t("2024-01-02T00:00:00Z"), t("2024-01-03T00:00:00Z"));
        assert!(!overlaps(&specs(), &v("2024-01-01"), f, to));
        assert!(overlaps(&specs(), &v("2024-01-02"), f, to));
        assert!(
            !overlaps(&specs(), &v("2024-01-03"), f, to),
            "to is exclusive"
        );
        let mut h = v("2024-01-02");
        h.push(("hour".into(), "05".into()));
        assert!(!overlaps(&specs(), &h, t("2024-01-02T06:00:00Z"), None));
        assert!(overlaps(&specs(), &h, t("2024-01-02T05:59:00Z"), None));
    }

    #[test]
    fn unparseable_values_are_kept() {
        let v = vec![("dt".to_string(), "__HIVE_DEFAULT_PARTITION__".to_string())];
        assert!(overlaps(&specs(), &v, t("2024-01-02T00:00:00Z"), None));
    }

    #[test]
    fn formats_are_checked() {
        assert!(partition_granularity("%Y-%m-%d").is_ok());
        assert!(partition_granularity("region").is_err());
    }
}
