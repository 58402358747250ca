//! Numbers, sizes, durations and paths as a person reads them: the run
//! summary and the log messages use these, so that both say `140.2 KiB` and
//! `1.2 s` where the JSON report and the log fields carry raw integers.
//! Formatting only: nothing here reads or decides anything.

use std::time::Duration;

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 file`, `2,048 files`: a count and its noun (plural with an `s`).
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{} {noun}s", count(n))
    }
}

/// Bytes in binary units, one decimal from KiB on: `512 B`, `140.2 KiB`,
/// `3.4 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A duration at the precision a person wants: `184 ms`, `1.2 s`,
/// `3 min 4 s`, `2 h 5 min`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{:.1} s", (secs * 10.0).floor() / 10.0);
    }
    let s = d.as_secs();
    if s < 3600 {
        return format!("{} min {} s", s / 60, s % 60);
    }
    format!("{} h {} min", s / 3600, (s % 3600) / 60)
}

/// [`duration`] of a count of milliseconds.
pub fn millis(ms: u64) -> String {
    duration(Duration::from_millis(ms))
}

/// Items per second over `d`, rounded; None when no time passed (a rate
/// over nothing says nothing).
pub fn per_second(n: u64, d: Duration) -> Option<u64> {
    let secs = d.as_secs_f64();
    (secs > 0.0).then(|| (n as f64 / secs).round() as u64)
}

/// A location as the summary shows it: a local path made absolute (against
/// the working directory, without resolving symlinks), `-` as `stdout`, a
/// URL as it is (callers pass it redacted).
pub fn location(loc: &str) -> String {
    if loc == "-" {
        return "stdout".to_string();
    }
    if loc.contains("://") {
        return loc.to_string();
    }
    match std::path::absolute(loc) {
        Ok(p) => p.display().to_string(),
        Err(_) => loc.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_group_thousands() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn plurals() {
        assert_eq!(plural(1, "file"), "1 file");
        assert_eq!(plural(0, "file"), "0 files");
        assert_eq!(plural(2048, "row"), "2,048 rows");
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(143_531), "140.2 KiB");
        assert_eq!(bytes(568_000_000), "541.7 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(Duration::from_millis(184)), "184 ms");
        assert_eq!(duration(Duration::from_millis(1_260)), "1.2 s");
        assert_eq!(duration(Duration::from_millis(59_990)), "59.9 s");
        assert_eq!(duration(Duration::from_secs(184)), "3 min 4 s");
        assert_eq!(duration(Duration::from_secs(7_500)), "2 h 5 min");
    }

    #[test]
    fn rates_need_time() {
        assert_eq!(per_second(10, Duration::ZERO), None);
        assert_eq!(per_second(10, Duration::from_millis(500)), Some(20));
    }

    #[test]
    fn local_locations_become_absolute() {
        let here = std::env::current_dir().unwrap();
        assert_eq!(
            location("out/_state"),
            here.join("out/_state").display().to_string()
        );
        assert_eq!(location("/tmp/x"), "/tmp/x");
        assert_eq!(location("-"), "stdout");
        assert_eq!(location("s3://b/p"), "s3://b/p");
        assert_eq!(location("kafka://h:9092/t"), "kafka://h:9092/t");
    }
}
