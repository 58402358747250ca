//! Redaction: the one place that decides how a secret is kept out of error
//! messages, `Debug` output, logs and the files a run writes.
//!
//! Two tools, used together:
//! - [`url`] and [`urls_in`] hide the user info of a URL (`s3://`, `gs://`,
//!   `az://`, `kafka://`, an `http://` endpoint), by position: whatever sits
//!   between `://` and the last `@` after it. A password may hold `/`, `@`,
//!   `:` or `%2F` unencoded, so no parser's idea of where the user info ends
//!   is trusted; the rule hides too much rather than too little. Both
//!   scrub the registered secrets first: a secret holding `@` outside the
//!   user info would move the cut and leave a fragment no scrub recognises.
//! - A process-wide registry of secret values ([`register`]), filled where a
//!   secret is read (the `[storage]` and `[kafka]` settings as they are
//!   deserialized, the environment), and [`scrub`], which replaces every
//!   registered value in any message, whether written raw, percent-encoded
//!   (`%2F`, `%2f`, `%252F`) or escaped as `Debug` and JSON escape it. `main`
//!   passes the final error line through it as the last line of defence, so
//!   a message from a library we do not control (librdkafka, object_store,
//!   DataFusion) cannot carry a known secret out either.
//!
//! This module must never print, log or return a secret, never panic on any
//! input (it runs on error paths), and never be the reason a message is
//! lost: it replaces, it does not drop.

use std::sync::RwLock;

use regex::Regex;

/// What a redacted secret looks like.
pub const REDACTED: &str = "***";

/// Values shorter than this are not scrubbed from messages: a secret of two
/// or three characters protects nothing, and replacing it everywhere would
/// make every message unreadable (`"on"`, `"1"`, `"us"`).
pub const MIN_SECRET_LEN: usize = 4;

/// `s` with the user info of its URL hidden: `s3://AKIA:se/cr@et@bucket/x` →
/// `s3://***@bucket/x`.
///
/// Every registered secret ([`register`]) is scrubbed first, wherever it
/// sits: a secret holding `@` in a path, port, query or fragment
/// (`s3://lake/a#se@cret`) would otherwise move the cut and leave its tail
/// (`cret`) in the message, where the scrubber no longer recognises it.
///
/// Everything between `scheme://` and the last `@` that follows it is
/// hidden, even a path: neither bucket names, hosts, ports nor Kafka topics
/// may contain `@`, so that `@` ends the user info or the URL is not one we
/// accept anyway. Without a scheme (an endpoint written as
/// `user:pass@host:9000`, or a password holding `://` before any scheme),
/// everything before the last `@` is hidden. Apply it to URLs and endpoints,
/// not to local paths, where `@` is just a character. Query values whose
/// names look secret (`sig`, `X-Amz-Signature`, `token`, ...) are hidden
/// too.
pub fn url(s: &str) -> String {
    cut_userinfo(&scrub(s))
}

/// [`url`] without the scrub: the cut at the last `@` and the secret query
/// values, for text already scrubbed.
fn cut_userinfo(s: &str) -> String {
    let start = userinfo_start(s);
    // A query or fragment holding `@` (`?token=p@ss`) must not move the cut
    // into itself: where the URL has user info, its query and fragment are
    // hidden whole, and the cut looks only at what comes before them.
    let end = match s[start..].find(['?', '#']) {
        Some(i) => start + i,
        None => s.len(),
    };
    if !s[start..].contains('@') {
        return hide_secret_query(s);
    }
    let tail = if end < s.len() {
        format!("{}{REDACTED}", &s[end..end + 1])
    } else {
        String::new()
    };
    match s[start..end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}{tail}", &s[..start], &s[start + at..end]),
        None => format!("{}{}{tail}", &s[..start], &s[start..end]),
    }
}

/// The URL `s` with its query or fragment hidden whole (`s3://b/x?***`), or
/// `None` when it has neither or is no URL (in a local path, `?` and `#`
/// are characters of a name). For a location refused for carrying one:
/// what follows the `?` may be a signature or a password under any name,
/// which [`url`]'s guess by name (`sig`, `token`) would show.
pub fn hide_query(s: &str) -> Option<String> {
    let start = userinfo_start(s);
    if start == 0 {
        return None;
    }
    let q = start + s[start..].find(['?', '#'])?;
    Some(format!("{}{}{REDACTED}", url(&s[..q]), &s[q..q + 1]))
}

/// True when `s` carries user info by [`url`]'s rule: an `@` after
/// `scheme://`, or any `@` when `s` does not start with a scheme. A location
/// or endpoint for which this holds must be refused: it would be echoed in
/// every later message.
pub fn has_userinfo(s: &str) -> bool {
    s[userinfo_start(s)..].contains('@')
}

/// Where user info could begin: after a leading `scheme://`, else at 0.
fn userinfo_start(s: &str) -> usize {
    match s.find("://") {
        Some(i) if is_scheme(&s[..i]) => i + 3,
        _ => 0,
    }
}

/// RFC 3986: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Every URL in a free-text message with its user info hidden (see [`url`]).
/// A URL is a whitespace-separated word holding `://`: quotes and commas are
/// not taken as its end, because a password may contain them. The word's
/// leading punctuation (`'`, `"`, `(`, ...) is kept when a scheme follows
/// it; when what precedes `://` is not a scheme (`'u:pa://ss@host'`), the
/// whole word up to its last `@` is hidden.
///
/// A quoted URL runs to its closing quote, across whitespace: a location
/// quoted as the user wrote it may hold a space or a newline in a password
/// or a query value (`'s3://b/x?sasl.password=a b c'`), and cut at the
/// space, the rest of the value was left in the message. The closing quote
/// is the first one followed by whitespace, the end, or punctuation that
/// ends a phrase (`':`, `',`, `')`), and is not hidden with the value. An
/// unquoted URL ends at whitespace: one written by a program has its
/// spaces percent-encoded.
pub fn urls_in(text: &str) -> String {
    // Scrubbed whole before the cut, for the reason given at [`url`], and
    // before the split into words, so that a secret holding a space matches.
    let text = &scrub(text);
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let blank = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..blank]);
        let rest = &rest[blank..];
        if rest.is_empty() {
            break;
        }
        let word = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let token = quoted_url_len(rest, word).unwrap_or(word);
        out.push_str(&url_in_word(&rest[..token]));
        i += blank + token;
    }
    out
}

/// For a word (`rest[..word]`) that opens a quoted URL (`'s3://...`), the
/// length of the quote and the URL up to its closing quote, which may lie
/// beyond the word; `None` for any other word, or when the quote is never
/// closed.
fn quoted_url_len(rest: &str, word: usize) -> Option<usize> {
    let sep = rest[..word].find("://")?;
    let open = rest[..sep]
        .chars()
        .rev()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))?;
    if !matches!(open, '\'' | '"' | '`') {
        return None;
    }
    let mut chars = rest[sep..].char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let closes = chars.peek().is_none_or(|(_, next)| {
            next.is_whitespace() || matches!(next, ':' | ';' | ',' | '.' | ')' | ']' | '}' | '>')
        });
        if c == open && closes {
            return Some(sep + at);
        }
    }
    None
}

fn url_in_word(word: &str) -> String {
    let Some(sep) = word.find("://") else {
        return word.to_string();
    };
    let scheme_start = word[..sep]
        .char_indices()
        .rev()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |(p, c)| p + c.len_utf8());
    let lead = &word[..scheme_start];
    let lead_is_punctuation = lead
        .chars()
        .all(|c| matches!(c, '\'' | '"' | '`' | '(' | '[' | '<' | '{' | '='));
    if lead_is_punctuation && is_scheme(&word[scheme_start..sep]) {
        format!("{lead}{}", cut_userinfo(&word[scheme_start..]))
    } else {
        cut_userinfo(word)
    }
}

/// True for a setting name whose value is a secret: passwords, keys,
/// tokens, signatures, JAAS and OAuth configs. Errs on the side of hiding
/// (`access_key_id` counts: hiding an id costs little), but not so far as
/// to take paths for secrets: `PWD`, `SSH_AUTH_SOCK` or `ssl.ca.location`
/// would blank out the very file names a message is about.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "pass",
        "secret",
        "token",
        "credential",
        "key",
        "signature",
        "jaas",
        "oauthbearer",
        "private",
    ]
    .iter()
    .any(|w| n.contains(w))
}

fn hide_secret_query(s: &str) -> String {
    let Some(q) = s.find('?') else {
        return s.to_string();
    };
    let (head, query) = s.split_at(q + 1);
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret_name(k) || k.eq_ignore_ascii_case("sig") => {
                format!("{k}={REDACTED}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}", pairs.join("&"))
}

/// The registered secrets, each compiled to a pattern that matches it in
/// every encoding [`pattern`] knows. Longest first, so that a secret
/// containing another is replaced whole.
static SECRETS: RwLock<Vec<(String, Regex)>> = RwLock::new(Vec::new());

/// Remember `value` as a secret for [`scrub`], for the rest of the process.
/// Its percent-decoded form is registered too (a URL parser may have decoded
/// it before a message was built). Values shorter than [`MIN_SECRET_LEN`]
/// are ignored.
pub fn register(value: &str) {
    let mut forms = vec![value.to_string()];
    if let Some(decoded) = percent_decode(value)
        && decoded != value
    {
        forms.push(decoded);
    }
    let Ok(mut secrets) = SECRETS.write() else {
        return;
    };
    for form in forms {
        if form.chars().count() < MIN_SECRET_LEN || secrets.iter().any(|(s, _)| *s == form) {
            continue;
        }
        if let Ok(re) = Regex::new(&pattern(&form)) {
            secrets.push((form, re));
        }
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
}

/// Register the user info of a URL or endpoint (what [`url`] hides) as a
/// secret, whole and from its first `:` on (the password alone), so that a
/// message built elsewhere from the raw string is scrubbed too.
pub fn register_userinfo(s: &str) {
    let start = userinfo_start(s);
    if let Some(at) = s[start..].rfind('@') {
        let userinfo = &s[start..start + at];
        register(userinfo);
        if let Some((_, password)) = userinfo.split_once(':') {
            register(password);
        }
    }
}

/// True for a configured value that cannot be a secret and that messages
/// need to stay readable: numbers and booleans.
pub fn is_harmless_value(v: &str) -> bool {
    let v = v.trim();
    (!v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '-'))
        || ["true", "false", "yes", "no", "on", "off"]
            .iter()
            .any(|b| v.eq_ignore_ascii_case(b))
}

/// Register the value of every environment variable whose name looks secret
/// ([`is_secret_name`]): `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AZURE_STORAGE_ACCOUNT_KEY`, the `KAFKA_PASSWORD` a job file interpolates
/// as `${KAFKA_PASSWORD}`, ...
pub fn register_env() {
    for (name, value) in std::env::vars_os() {
        if let (Some(name), Some(value)) = (name.to_str(), value.to_str()) {
            register_variable(name, value);
        }
    }
}

/// Register `value` if the variable `name` holds a secret: its name looks
/// secret, and it is not a key *id*, which names a key and is not one
/// (`AWS_ACCESS_KEY_ID` is printed by every AWS tool; scrubbing a short one
/// such as `backfill` would blank that word in every message). A region or
/// an endpoint stays readable.
pub fn register_variable(name: &str, value: &str) {
    if is_secret_name(name) && !name.to_ascii_uppercase().ends_with("KEY_ID") {
        register(value);
    }
}

/// `msg` with every registered secret replaced by `***`, in any encoding.
pub fn scrub(msg: &str) -> String {
    let Ok(secrets) = SECRETS.read() else {
        // A poisoned lock: hide the whole message rather than risk it.
        return REDACTED.to_string();
    };
    hide_matches(msg, secrets.iter().map(|(_, re)| re))
}

/// `msg` with every match of any of `patterns` replaced by `***`, the
/// matches all found in the original text and overlapping ones merged.
/// Replacing one pattern after another would not do: two secrets may
/// overlap (a URL's registered user info `lake/a?x=Cr/n` and the secret
/// `Cr/n@ry` it cut), and once the first is replaced the rest of the
/// second no longer matches and is left in the message.
fn hide_matches<'a>(msg: &str, patterns: impl IntoIterator<Item = &'a Regex>) -> String {
    let mut spans: Vec<(usize, usize)> = patterns
        .into_iter()
        .flat_map(|re| re.find_iter(msg).map(|m| (m.start(), m.end())))
        .collect();
    if spans.is_empty() {
        return msg.to_string();
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(msg.len());
    let mut copied = 0;
    let mut i = 0;
    while i < spans.len() {
        let (start, mut end) = spans[i];
        i += 1;
        while i < spans.len() && spans[i].0 <= end {
            end = end.max(spans[i].1);
            i += 1;
        }
        out.push_str(&msg[copied..start]);
        out.push_str(REDACTED);
        copied = end;
    }
    out.push_str(&msg[copied..]);
    out
}

/// `msg` with each of `values` replaced by `***`, in any encoding; values
/// shorter than [`MIN_SECRET_LEN`] are left alone. For messages of a
/// library that may echo a configured value (librdkafka does), when the
/// caller knows which values it configured.
pub fn scrub_values<'a>(msg: &str, values: impl IntoIterator<Item = &'a str>) -> String {
    let mut values: Vec<String> = values
        .into_iter()
        .flat_map(|v| [Some(v.to_string()), percent_decode(v)])
        .flatten()
        .filter(|v| v.chars().count() >= MIN_SECRET_LEN)
        .collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values.dedup();
    let patterns: Vec<Regex> = values
        .iter()
        .filter_map(|v| Regex::new(&pattern(v)).ok())
        .collect();
    hide_matches(msg, &patterns)
}

/// The last line of defence for a line about to leave the process: every
/// registered secret scrubbed, then user info of every URL hidden.
pub fn line(msg: &str) -> String {
    urls_in(msg)
}

/// A regex matching `secret` written raw, percent-encoded (any hex case, any
/// mix of encoded and plain characters, encoded twice), with `+` for a space
/// (form encoding), or with `"` and `\` backslash-escaped (`Debug`, JSON).
fn pattern(secret: &str) -> String {
    let mut p = String::new();
    for c in secret.chars() {
        let mut alts = vec![regex::escape(&c.to_string())];
        let mut buf = [0u8; 4];
        let encoded: String = c
            .encode_utf8(&mut buf)
            .bytes()
            .map(|b| format!("(?:%|%25){}", hex_byte(b)))
            .collect();
        alts.push(encoded);
        match c {
            ' ' => alts.push(r"\+".into()),
            '"' => alts.push(r#"\\""#.into()),
            '\\' => alts.push(r"\\\\".into()),
            '/' => alts.push(r"\\/".into()),
            _ => {}
        }
        p.push_str(&format!("(?:{})", alts.join("|")));
    }
    p
}

/// `[Hh][Hh]` for a byte: percent-encoding may use either case.
fn hex_byte(b: u8) -> String {
    format!("{:02X}", b)
        .chars()
        .map(|h| {
            if h.is_ascii_alphabetic() {
                format!("[{}{}]", h, h.to_ascii_lowercase())
            } else {
                h.to_string()
            }
        })
        .collect()
}

/// The percent-decoded form of `s`, when it has any `%XX` and decodes to
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_at_in_a_query_or_fragment_does_not_move_the_cut() {
        for (input, leak) in [
            ("s3://lake/x?token=Zq9/p@ss:w%2Frd", "ss:w"),
            ("s3://lake/x#frag=Zq9/p@ss:w%2Frd", "ss:w"),
            ("kafka://h:9092/rp?pw=Zq9/p@ss:w", "ss:w"),
            ("s3://u:p@ss@lake/x?a=b@c", "b@c"),
        ] {
            let out = url(input);
            assert!(!out.contains(leak), "{input} -> {out}");
            assert!(!out.contains("Zq9"), "{input} -> {out}");
        }
        assert_eq!(url("s3://lake/x?token=Zq9/p@ss"), "s3://lake/x?***");
    }

    /// The test canary: `/`, `@`, `:` and a percent-encoded `/` in one.
    const CANARY: &str = "Cr/n@ry:s3cr%2Ft";

    /// Every form and 4+ character fragment of `secret` that must not leak.
    fn leaks(secret: &str, text: &str) -> Vec<String> {
        let decoded = percent_decode(secret).unwrap_or_else(|| secret.to_string());
        let mut needles = vec![secret.to_string(), decoded.clone()];
        for s in [secret, decoded.as_str()] {
            needles.extend(
                s.split(['/', '@', ':'])
                    .filter(|f| f.len() >= 4)
                    .map(str::to_string),
            );
        }
        needles.into_iter().filter(|n| text.contains(n)).collect()
    }

    #[test]
    fn userinfo_with_slash_at_and_colon_is_hidden_whole() {
        for (scheme, tail) in [
            ("s3", "bucket/events/x"),
            ("gs", "bucket/events"),
            ("az", "container/p"),
            ("abfss", "container/p"),
            ("kafka", "a:9092,b:9093/topic"),
            ("http", "127.0.0.1:9000"),
            ("https", "minio.example:9000/"),
        ] {
            for user in ["AKIA", "", "us/er"] {
                let raw = format!("{scheme}://{user}:{CANARY}@{tail}");
                let r = url(&raw);
                assert_eq!(r, format!("{scheme}://{REDACTED}@{tail}"), "{raw}");
                assert!(leaks(CANARY, &r).is_empty(), "{raw} → {r}");
                assert!(has_userinfo(&raw), "{raw}");
            }
        }
    }

    #[test]
    fn the_old_first_at_rule_is_not_used() {
        // Splitting at the first `@` showed `cr/et@bucket/x`.
        assert_eq!(url("s3://AKIA:se@cr/et@bucket/x"), "s3://***@bucket/x");
    }

    #[test]
    fn percent_encoded_userinfo_is_hidden() {
        let r = url("s3://AKIA:se%2Fcr%40et%3A@bucket/x");
        assert_eq!(r, "s3://***@bucket/x");
    }

    #[test]
    fn urls_without_userinfo_are_unchanged() {
        for s in [
            "s3://bucket/events/2024",
            "kafka://a:1,b:2/t",
            "http://127.0.0.1:9000",
            "file:///tmp/x",
        ] {
            assert_eq!(url(s), s);
            assert!(!has_userinfo(s), "{s}");
        }
    }

    #[test]
    fn an_endpoint_without_scheme_hides_what_precedes_the_at() {
        let r = url(&format!("user:{CANARY}@host:9000"));
        assert_eq!(r, "***@host:9000");
        assert!(has_userinfo("u:p@host:9000"));
    }

    #[test]
    fn an_at_in_a_path_hides_too_much_rather_than_too_little() {
        // `s3://u:1234/5678@bucket` parses as host `u`, port 1234; the rule
        // does not care and hides up to the last `@`.
        assert_eq!(url("s3://u:1234/5678@bucket/x"), "s3://***@bucket/x");
        assert_eq!(url("s3://bucket/a@b/c"), "s3://***@b/c");
    }

    #[test]
    fn a_password_holding_a_scheme_separator_is_hidden_whole() {
        assert_eq!(url("u:pa://ss@host:9000"), "***@host:9000");
        assert!(has_userinfo("u:pa://ss@host:9000"));
        assert_eq!(
            urls_in("endpoint 'u:pa://ss@host:9000' refused"),
            "endpoint ***@host:9000' refused"
        );
        assert_eq!(
            urls_in("at (s3://u:p@b/x), \"kafka://a:1/t\""),
            "at (s3://***@b/x), \"kafka://a:1/t\""
        );
    }

    #[test]
    fn a_refused_query_is_hidden_whole_and_paths_keep_theirs() {
        assert_eq!(
            hide_query("s3://b/x?v=1&pw=a b").as_deref(),
            Some("s3://b/x?***")
        );
        assert_eq!(
            hide_query("file:///t/o#f").as_deref(),
            Some("file:///t/o#***")
        );
        assert_eq!(
            hide_query("kafka://h:1?x/t").as_deref(),
            Some("kafka://h:1?***")
        );
        assert_eq!(hide_query("s3://b/x"), None);
        assert_eq!(hide_query("/data/a?b#c"), None);
    }

    /// Cut at the first space or newline, a quoted URL left the rest of a
    /// query value or password in the message.
    #[test]
    fn a_quoted_url_runs_to_its_closing_quote() {
        for (msg, want) in [
            (
                "location 's3://b/x?sasl.password=a b c': refused",
                "location 's3://b/x?sasl.password=***': refused",
            ),
            (
                "location 's3://b/x?token=a\nb c' refused",
                "location 's3://b/x?token=***' refused",
            ),
            (
                "url \"kafka://h:1/t?sasl.password=it's a b\", then",
                "url \"kafka://h:1/t?sasl.password=***\", then",
            ),
            ("at `s3://u:p w@b/x`.", "at `s3://***@b/x`."),
            (
                "location 's3://b/x?token=a%0Ab%20c' refused",
                "location 's3://b/x?token=***' refused",
            ),
        ] {
            assert_eq!(urls_in(msg), want, "{msg:?}");
            assert_eq!(line(msg), want, "{msg:?}");
        }
        // A quote never closed, and an unquoted URL: the word alone.
        assert_eq!(urls_in("'s3://b/x?token=a b"), "'s3://b/x?token=*** b");
        assert_eq!(
            urls_in("GET s3://b/x?v=1 failed: 'oops'"),
            "GET s3://b/x?v=1 failed: 'oops'"
        );
        // What follows the closing quote is read as usual.
        assert_eq!(
            urls_in("'s3://b/x?token=a b' and 's3://u:p@c/y'"),
            "'s3://b/x?token=***' and 's3://***@c/y'"
        );
    }

    #[test]
    fn secret_query_values_are_hidden() {
        assert_eq!(
            url("az://c/p?sv=2024&sig=abc%2Fdef"),
            "az://c/p?sv=2024&sig=***"
        );
        assert_eq!(
            urls_in("GET https://h/b?X-Amz-Signature=deadbeef failed"),
            "GET https://h/b?X-Amz-Signature=*** failed"
        );
    }

    #[test]
    fn every_url_in_a_message_is_redacted() {
        let msg = format!(
            "location 's3://AKIA:{CANARY}@bucket/x': no; endpoint \
             http://u:{CANARY}@127.0.0.1:9000, and kafka://u:{CANARY}@a:1/t."
        );
        let r = urls_in(&msg);
        assert!(leaks(CANARY, &r).is_empty(), "{r}");
        assert!(r.contains("'s3://***@bucket/x'"), "{r}");
        assert!(r.contains("http://***@127.0.0.1:9000,"), "{r}");
        assert!(r.contains("kafka://***@a:1/t."), "{r}");
        assert_eq!(urls_in("no urls: a@b c:d"), "no urls: a@b c:d");
    }

    #[test]
    fn scrub_values_catches_raw_encoded_decoded_and_escaped_forms() {
        let decoded = percent_decode(CANARY).unwrap();
        assert_eq!(decoded, "Cr/n@ry:s3cr/t");
        for msg in [
            format!("value {CANARY} rejected"),
            format!("value {decoded} rejected"),
            "value Cr%2Fn%40ry%3As3cr%252Ft rejected".to_string(),
            "value cr%2fn%40ry%3as3cr%252ft rejected".replacen("cr", "Cr", 1),
            "value Cr%2Fn@ry%3As3cr%2Ft rejected".to_string(),
            format!("value {CANARY:?} rejected"),
            format!("value {} rejected", serde_json::to_string(CANARY).unwrap()),
        ] {
            let r = scrub_values(&msg, [CANARY]);
            assert!(leaks(CANARY, &r).is_empty(), "{msg} → {r}");
            assert!(r.starts_with("value ") && r.ends_with(" rejected"), "{r}");
        }
    }

    #[test]
    fn scrub_handles_quotes_backslashes_and_spaces() {
        let secret = r#"a"b\c d/e"#;
        for msg in [
            format!("x {secret} y"),
            format!("x {secret:?} y"),
            format!("x {} y", serde_json::to_string(secret).unwrap()),
            "x a%22b%5Cc+d%2Fe y".to_string(),
        ] {
            let r = scrub_values(&msg, [secret]);
            assert!(!r.contains("b\\c") && !r.contains("c d"), "{msg} → {r}");
        }
    }

    #[test]
    fn short_values_are_not_scrubbed() {
        assert_eq!(scrub_values("on and off", ["on"]), "on and off");
    }

    #[test]
    fn registered_secrets_are_scrubbed_by_line() {
        let secret = "reg-Cr/n@ry:t0k%2Fen-unique";
        register(secret);
        register(secret); // idempotent
        let msg =
            format!("error: token {secret} and decoded reg-Cr/n@ry:t0k/en-unique at s3://u:p@b/x");
        let r = line(&msg);
        assert!(leaks(secret, &r).is_empty(), "{r}");
        assert!(r.contains("s3://***@b/x"), "{r}");
    }

    #[test]
    fn a_registered_secret_holding_an_at_is_scrubbed_before_the_cut() {
        // An `@` of the secret outside the user-info slot moved the cut to
        // it, and the tail after it (`@cd:ef%2Fgh+XyZ`) was left in the
        // message, no longer matching the registered value.
        let secret = "Zq9/ab@cd:ef%2Fgh+XyZ-cut";
        register(secret);
        for raw in [
            format!("s3://lake:{secret}/a200k"),
            format!("s3://lake/a200k#{secret}"),
            format!("s3://lake/a200k?x={secret}"),
            format!("s3://lake/{secret}"),
            format!("s3://lake/{}", percent_decode(secret).unwrap()),
        ] {
            for r in [
                url(&raw),
                urls_in(&format!("location '{raw}' refused")),
                line(&format!("location '{raw}' refused")),
            ] {
                assert!(leaks(secret, &r).is_empty(), "{raw} → {r}");
                assert!(!r.contains("XyZ"), "{raw} → {r}");
                assert!(r.contains("s3://lake"), "{raw} → {r}");
            }
        }
    }

    #[test]
    fn overlapping_secrets_are_hidden_whole() {
        // `lake/a?x=Ov/n` is what `register_userinfo` takes for user info in
        // `s3://lake/a?x=Ov/n@ry:s3cr%2Ft`; replaced first, it left
        // `@ry:s3cr%2Ft` of the other secret behind.
        let secret = "Ov/n@ry:s3cr%2Ft-overlap";
        let msg = format!("location 's3://lake/a?x={secret}' refused");
        for r in [
            scrub_values(&msg, ["lake/a?x=Ov/n", secret]),
            scrub_values(&msg, [secret, "lake/a?x=Ov/n"]),
        ] {
            assert_eq!(r, "location 's3://***' refused", "{r}");
        }
        assert_eq!(scrub_values("abcdXefgh", ["abcd", "efgh"]), "***X***");
        assert_eq!(scrub_values("abcdefgh", ["abcdef", "cdefgh"]), "***");
    }

    #[test]
    fn env_secrets_are_registered_by_name() {
        assert!(is_secret_name("AWS_SECRET_ACCESS_KEY"));
        assert!(is_secret_name("AWS_SESSION_TOKEN"));
        assert!(is_secret_name("sasl.passwd"));
        assert!(is_secret_name("azure_storage_sas_token"));
        assert!(!is_secret_name("bootstrap.servers"));
        assert!(!is_secret_name("AWS_REGION"));
        assert!(!is_secret_name("PWD"));
        assert!(!is_secret_name("SSH_AUTH_SOCK"));
    }

    #[test]
    fn userinfo_registration_covers_the_password_alone() {
        let raw = "http://svc:Pw-Cr/n@ry-unique@127.0.0.1:9000";
        register_userinfo(raw);
        let r = scrub("librdkafka said Pw-Cr/n@ry-unique and Pw-Cr%2Fn%40ry-unique");
        assert!(!r.contains("Pw-Cr"), "{r}");
    }

    #[test]
    fn harmless_values_are_numbers_and_booleans() {
        for v in ["1", "60000", "0.5", "true", "FALSE", "on"] {
            assert!(is_harmless_value(v), "{v}");
        }
        for v in ["hunter2", "PLAIN", "127.0.0.1:9092"] {
            assert!(!is_harmless_value(v), "{v}");
        }
    }

    #[test]
    fn nothing_panics_on_odd_input() {
        for s in [
            "",
            "://",
            "@",
            "://@",
            "%",
            "%4",
            "%zz@://",
            "é@ü://ß@",
            "?&=@",
        ] {
            let _ = url(s);
            let _ = urls_in(s);
            let _ = has_userinfo(s);
            let _ = scrub_values(s, [s, "%%%%", "é%C3"]);
            let _ = percent_decode(s);
        }
    }
}
