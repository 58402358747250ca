//! `[detect.silence]` and `[detect.volume]`: the detections that look at
//! time and volume rather than at the status column, as written in the job
//! file and as validated. They run only when asked (a section in the job
//! file, a flag of `run`, or their own command), so nothing here may turn
//! one on by default.
//!
//! Every error names the key or flag at fault (`detect.silence.threshold`,
//! `--silence-threshold`) and is a usage error (exit 2).

use serde::{Deserialize, Serialize};

use super::{JobError, invalid};

/// `[detect]` in the job file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectFile {
    /// Time silences: intervals with no event for longer than a threshold.
    pub silence: Option<SilenceFile>,
    /// Volume anomalies: bucket counts far from their seasonal baseline.
    pub volume: Option<VolumeFile>,
}

/// `[detect.silence]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceFile {
    /// Grouping columns of `events` (default `["key"]`), e.g. `["source"]`.
    pub by: Option<Vec<String>>,
    /// `"15m"` (fixed: ms, s, m, h, d or w) or `"5x median"` (a multiple of
    /// the group's median inter-arrival time). Default `"5x median"`.
    pub threshold: Option<String>,
}

/// `[detect.volume]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFile {
    /// Grouping columns of `events` (default `["source"]`); `[]` counts
    /// the whole stream.
    pub by: Option<Vec<String>>,
    /// The bucket width, dividing a day: `"1h"` (default), `"15m"`, `"1d"`.
    pub bucket: Option<String>,
    /// |score| above which a bucket is flagged (default 5).
    pub threshold: Option<f64>,
}

/// A silence threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Longer than this many microseconds.
    Fixed(i64),
    /// Longer than this multiple of the group's median inter-arrival time.
    MedianMultiple(f64),
}

/// Validated `[detect.silence]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Silence {
    pub by: Vec<String>,
    /// Where `by` came from (`detect.silence.by`, `--silence-by`): an
    /// unknown column is only found once the archive is read.
    pub by_origin: String,
    pub threshold: Threshold,
}

/// Validated `[detect.volume]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub by: Vec<String>,
    pub by_origin: String,
    pub bucket_us: i64,
    pub threshold: f64,
}

pub const DEFAULT_SILENCE_THRESHOLD: &str = "5x median";
pub const DEFAULT_VOLUME_BUCKET: &str = "1h";
pub const DEFAULT_VOLUME_THRESHOLD: f64 = 5.0;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Flags that override `[detect.silence]`; `asked`: a flag or the command
/// asks for the detection even without the section.
#[derive(Debug, Clone, Default)]
pub struct SilenceFlags<'a> {
    pub by: &'a [String],
    pub by_flag: &'a str,
    pub threshold: Option<&'a str>,
    pub threshold_flag: &'a str,
    pub asked: bool,
}

/// Flags that override `[detect.volume]`.
#[derive(Debug, Clone, Default)]
pub struct VolumeFlags<'a> {
    pub by: &'a [String],
    pub by_flag: &'a str,
    pub bucket: Option<&'a str>,
    pub bucket_flag: &'a str,
    pub threshold: Option<f64>,
    pub threshold_flag: &'a str,
    pub asked: bool,
}

/// The silence settings, or `None` when nothing asks for them.
pub fn silence(
    file: Option<&SilenceFile>,
    flags: &SilenceFlags,
) -> Result<Option<Silence>, JobError> {
    if file.is_none() && !flags.asked && flags.by.is_empty() && flags.threshold.is_none() {
        return Ok(None);
    }
    let file = file.cloned().unwrap_or_default();
    let (by, by_origin) = if !flags.by.is_empty() {
        (flags.by.to_vec(), flags.by_flag.to_string())
    } else {
        (
            file.by.unwrap_or_else(|| vec!["key".into()]),
            "detect.silence.by".to_string(),
        )
    };
    check_by(&by, &by_origin, false)?;
    let threshold = match (flags.threshold, file.threshold.as_deref()) {
        (Some(t), _) => parse_threshold(flags.threshold_flag, t)?,
        (None, Some(t)) => parse_threshold("detect.silence.threshold", t)?,
        (None, None) => parse_threshold("threshold", DEFAULT_SILENCE_THRESHOLD)?,
    };
    Ok(Some(Silence {
        by,
        by_origin,
        threshold,
    }))
}

/// The volume settings, or `None` when nothing asks for them.
pub fn volume(file: Option<&VolumeFile>, flags: &VolumeFlags) -> Result<Option<Volume>, JobError> {
    if file.is_none()
        && !flags.asked
        && flags.by.is_empty()
        && flags.bucket.is_none()
        && flags.threshold.is_none()
    {
        return Ok(None);
    }
    let file = file.cloned().unwrap_or_default();
    let (by, by_origin) = if !flags.by.is_empty() {
        (flags.by.to_vec(), flags.by_flag.to_string())
    } else {
        (
            file.by.unwrap_or_else(|| vec!["source".into()]),
            "detect.volume.by".to_string(),
        )
    };
    check_by(&by, &by_origin, true)?;
    let bucket_us = match (flags.bucket, file.bucket.as_deref()) {
        (Some(b), _) => parse_bucket(flags.bucket_flag, b)?,
        (None, Some(b)) => parse_bucket("detect.volume.bucket", b)?,
        (None, None) => parse_bucket("bucket", DEFAULT_VOLUME_BUCKET)?,
    };
    let (threshold, what) = match (flags.threshold, file.threshold) {
        (Some(t), _) => (t, flags.threshold_flag),
        (None, Some(t)) => (t, "detect.volume.threshold"),
        (None, None) => (DEFAULT_VOLUME_THRESHOLD, "threshold"),
    };
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(invalid(
            what,
            format!("{threshold} is not a score threshold: give a positive number such as 5"),
        ));
    }
    Ok(Some(Volume {
        by,
        by_origin,
        bucket_us,
        threshold,
    }))
}

fn check_by(by: &[String], what: &str, empty_ok: bool) -> Result<(), JobError> {
    if by.is_empty() && !empty_ok {
        return Err(invalid(
            what,
            "no grouping column: name at least one column of `events`, e.g. [\"key\"]",
        ));
    }
    for (i, c) in by.iter().enumerate() {
        if c.trim().is_empty() {
            return Err(invalid(what, "an empty column name"));
        }
        if by[..i].contains(c) {
            return Err(invalid(what, format!("column '{c}' is named twice")));
        }
    }
    Ok(())
}

/// `"15m"`, `"90s"`, `"2h"`, `"1d"`, `"500ms"`, `"1w"`: a whole, positive
/// number of one unit, in microseconds.
pub fn parse_duration(what: &str, s: &str) -> Result<i64, JobError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let bad = || {
        invalid(
            what,
            format!(
                "'{s}' is not a duration: a positive whole number and a unit (ms, s, m, h, d, w), e.g. 15m"
            ),
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let unit_us: i64 = match unit {
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" | "min" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => MICROS_PER_DAY,
        "w" => 7 * MICROS_PER_DAY,
        _ => return Err(bad()),
    };
    let n: i64 = num.parse().map_err(|_| bad())?;
    let us = n.checked_mul(unit_us).ok_or_else(bad)?;
    if us <= 0 {
        return Err(invalid(what, format!("'{s}' must be longer than 0")));
    }
    Ok(us)
}

/// `"15m"` (fixed) or `"5x median"` (relative).
pub fn parse_threshold(what: &str, s: &str) -> Result<Threshold, JobError> {
    let t = s.trim();
    if let Some(factor) = t.strip_suffix("median") {
        let factor = factor.trim_end();
        let factor = factor.strip_suffix(['x', 'X', '×']).unwrap_or("").trim();
        return match factor.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Threshold::MedianMultiple(f)),
            _ => Err(invalid(
                what,
                format!(
                    "'{s}': a relative threshold is a positive number, 'x' and 'median', e.g. 5x median"
                ),
            )),
        };
    }
    parse_duration(what, t)
        .map(Threshold::Fixed)
        .map_err(|_| {
            invalid(
                what,
                format!(
                    "'{s}' is not a threshold: a duration (ms, s, m, h, d, w: 15m) or a multiple of the median interval (5x median)"
                ),
            )
        })
}

/// A bucket width that divides a day, so that a bucket of the day or of
/// the week is always the same stretch of time.
pub fn parse_bucket(what: &str, s: &str) -> Result<i64, JobError> {
    let us = parse_duration(what, s)?;
    if MICROS_PER_DAY % us != 0 {
        return Err(invalid(
            what,
            format!("'{s}' does not divide a day: use e.g. 5m, 15m, 1h, 2h, 6h or 1d"),
        ));
    }
    Ok(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(
            parse_threshold("t", "15m").unwrap(),
            Threshold::Fixed(900_000_000)
        );
        assert_eq!(
            parse_threshold("t", "5x median").unwrap(),
            Threshold::MedianMultiple(5.0)
        );
        assert_eq!(
            parse_threshold("t", "2.5xmedian").unwrap(),
            Threshold::MedianMultiple(2.5)
        );
        for bad in [
            "5y",
            "-3m",
            "0m",
            "m",
            "",
            "x median",
            "0x median",
            "-1x median",
            "15 minutes",
        ] {
            let e = parse_threshold("detect.silence.threshold", bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("detect.silence.threshold: "), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn buckets() {
        assert_eq!(parse_bucket("b", "1h").unwrap(), 3_600_000_000);
        assert_eq!(parse_bucket("b", "1d").unwrap(), MICROS_PER_DAY);
        for bad in ["0h", "7m", "2d", "1w", "-1h", "h"] {
            let e = parse_bucket("--bucket", bad).unwrap_err().to_string();
            assert!(e.starts_with("--bucket: "), "{bad}: {e}");
        }
    }

    #[test]
    fn off_unless_asked() {
        assert_eq!(silence(None, &SilenceFlags::default()).unwrap(), None);
        assert_eq!(volume(None, &VolumeFlags::default()).unwrap(), None);
        let s = silence(Some(&SilenceFile::default()), &SilenceFlags::default())
            .unwrap()
            .unwrap();
        assert_eq!(s.by, vec!["key".to_string()]);
        assert_eq!(s.threshold, Threshold::MedianMultiple(5.0));
        let e = silence(
            Some(&SilenceFile {
                by: Some(vec![]),
                threshold: None,
            }),
            &SilenceFlags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("detect.silence.by: "), "{e}");
        let e = volume(
            Some(&VolumeFile {
                threshold: Some(-1.0),
                ..Default::default()
            }),
            &VolumeFlags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("detect.volume.threshold: "), "{e}");
    }
}
