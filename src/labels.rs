//! Counter names with labels, in Prometheus syntax:
//! `http_requests_total{method="GET",code="200"}`.
//!
//! A name that contains `{` is a labelled name and must parse: a metric
//! name (`[a-zA-Z_:][a-zA-Z0-9_:]*`), then `{`, then `name="value"` pairs
//! separated by commas (a trailing comma is allowed, as Prometheus allows
//! it), then `}` at the very end. Label names follow
//! `[a-zA-Z_][a-zA-Z0-9_]*` and may not start with `__` (reserved by
//! Prometheus). Values are any UTF-8, with `\\`, `\"` and `\n` escaped.
//! A name without `{` is a plain name and is taken as it is.
//!
//! [`canonical`] gives the one spelling of a series: labels sorted by name,
//! values escaped the one way, no spaces, no trailing comma, and `name{}`
//! written `name`. The same series written two ways is then one counter.

use crate::error::{Error, Result};

/// Most labels one counter may carry.
pub const LABELS_PER_COUNTER_MAX: usize = 16;
/// Longest label name, in bytes.
pub const LABEL_NAME_BYTES_MAX: usize = 64;
/// Longest label value, in bytes, unescaped.
pub const LABEL_VALUE_BYTES_MAX: usize = 128;

/// A parsed labelled name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series<'a> {
    /// The metric name.
    pub metric: &'a str,
    /// Labels sorted by name, values unescaped.
    pub labels: Vec<(&'a str, String)>,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("counter name", reason)
}

fn is_metric_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn is_label_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses `name`: `None` for a plain name (no `{`), the series for a
/// labelled one, an error naming what is wrong for anything else.
pub fn parse(name: &str) -> Result<Option<Series<'_>>> {
    let Some(open) = name.find('{') else {
        return Ok(None);
    };
    let metric = &name[..open];
    if !is_metric_name(metric) {
        return Err(invalid(format!(
            "'{metric}' before '{{' is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        )));
    }
    let body = name[open + 1..]
        .strip_suffix('}')
        .ok_or_else(|| invalid("a labelled name must end with '}'"))?;
    let mut labels: Vec<(&str, String)> = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| invalid(format!("label '{rest}' has no '=\"value\"'")))?;
        let label = &rest[..eq];
        if !is_label_name(label) {
            return Err(invalid(format!(
                "'{label}' is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)"
            )));
        }
        if label.starts_with("__") {
            return Err(invalid(format!(
                "label name '{label}' starts with '__', which Prometheus reserves"
            )));
        }
        if label.len() > LABEL_NAME_BYTES_MAX {
            return Err(invalid(format!(
                "label name '{label}' is {} bytes; the limit is {LABEL_NAME_BYTES_MAX}",
                label.len()
            )));
        }
        let after = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| invalid(format!("the value of label '{label}' must be quoted")))?;
        let (value, used) = unescape(after)
            .ok_or_else(|| invalid(format!("the value of label '{label}' is not closed or has a bad escape (only \\\\, \\\" and \\n)")))?;
        if value.len() > LABEL_VALUE_BYTES_MAX {
            return Err(invalid(format!(
                "the value of label '{label}' is {} bytes; the limit is {LABEL_VALUE_BYTES_MAX}",
                value.len()
            )));
        }
        labels.push((label, value));
        if labels.len() > LABELS_PER_COUNTER_MAX {
            return Err(invalid(format!(
                "more than {LABELS_PER_COUNTER_MAX} labels (LABELS_PER_COUNTER_MAX)"
            )));
        }
        rest = &after[used..];
        match rest.as_bytes().first() {
            None => {}
            Some(b',') => rest = &rest[1..],
            Some(_) => {
                return Err(invalid(format!(
                    "expected ',' or '}}' after the value of label '{label}'"
                )));
            }
        }
    }
    labels.sort_by(|a, b| a.0.cmp(b.0));
    if let Some(w) = labels.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(invalid(format!("label '{}' is given twice", w[0].0)));
    }
    Ok(Some(Series { metric, labels }))
}

/// The value of a quoted label value starting just after its opening
/// quote, unescaped, and the bytes it took with the closing quote.
fn unescape(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => match chars.next()?.1 {
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                'n' => out.push('\n'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}

/// Writes `value` escaped as a label value, without the quotes.
pub fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The one spelling of `name`: a plain name as it is, a labelled one with
/// its labels sorted and escaped the one way.
pub fn canonical(name: &str) -> Result<std::borrow::Cow<'_, str>> {
    let Some(series) = parse(name)? else {
        return Ok(std::borrow::Cow::Borrowed(name));
    };
    let mut out = String::with_capacity(name.len());
    out.push_str(series.metric);
    if !series.labels.is_empty() {
        out.push('{');
        for (i, (label, value)) in series.labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            escape_into(&mut out, value);
            out.push('"');
        }
        out.push('}');
    }
    if out == name {
        Ok(std::borrow::Cow::Borrowed(name))
    } else {
        Ok(std::borrow::Cow::Owned(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_kept_as_they_are() {
        for name in ["hits", "counter:000000000001", "a b/c", "x}"] {
            assert_eq!(parse(name).unwrap(), None);
            assert_eq!(canonical(name).unwrap(), name);
        }
    }

    // One series, however it is written: labels in any order, a trailing
    // comma, empty braces.
    #[test]
    fn one_series_has_one_spelling() {
        let want = r#"http_requests_total{code="200",method="GET"}"#;
        for written in [
            r#"http_requests_total{method="GET",code="200"}"#,
            r#"http_requests_total{code="200",method="GET"}"#,
            r#"http_requests_total{method="GET",code="200",}"#,
        ] {
            assert_eq!(canonical(written).unwrap(), want, "{written}");
        }
        assert_eq!(canonical("up{}").unwrap(), "up");
        let s = parse(want).unwrap().unwrap();
        assert_eq!(s.metric, "http_requests_total");
        assert_eq!(
            s.labels,
            vec![("code", "200".to_string()), ("method", "GET".to_string())]
        );
    }

    #[test]
    fn escapes_round_trip() {
        let name = r#"m{path="a\\b",quote="say \"hi\"",nl="x\ny"}"#;
        let s = parse(name).unwrap().unwrap();
        let got: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            got,
            vec![("nl", "x\ny"), ("path", "a\\b"), ("quote", "say \"hi\"")]
        );
        let c = canonical(name).unwrap();
        assert_eq!(c, r#"m{nl="x\ny",path="a\\b",quote="say \"hi\""}"#);
        assert_eq!(canonical(&c).unwrap(), c, "canonical is a fixed point");
    }

    #[test]
    fn bad_syntax_is_refused_with_the_reason() {
        let cases = [
            (r#"9m{a="b"}"#, "not a metric name"),
            (r#"m{a="b""#, "must end with '}'"),
            (r#"m{a="b"}x"#, "must end with '}'"),
            (r#"m{a}"#, "has no '=\"value\"'"),
            (r#"m{1a="b"}"#, "is not a label name"),
            (r#"m{__name__="b"}"#, "reserves"),
            (r#"m{a=b}"#, "must be quoted"),
            (r#"m{a="b}"#, "not closed"),
            (r#"m{a="\t"}"#, "bad escape"),
            (r#"m{a="b" c="d"}"#, "expected ','"),
            (r#"m{a="b",a="c"}"#, "given twice"),
        ];
        for (name, reason) in cases {
            let e = parse(name).unwrap_err().to_string();
            assert!(e.contains(reason), "{name}: {e}");
        }
    }

    #[test]
    fn limits_are_named_in_the_error() {
        let many: Vec<String> = (0..=LABELS_PER_COUNTER_MAX)
            .map(|i| format!("l{i}=\"v\""))
            .collect();
        let e = parse(&format!("m{{{}}}", many.join(","))).unwrap_err();
        assert!(e.to_string().contains("LABELS_PER_COUNTER_MAX"), "{e}");
        let fits: Vec<String> = (0..LABELS_PER_COUNTER_MAX)
            .map(|i| format!("l{i}=\"v\""))
            .collect();
        assert!(parse(&format!("m{{{}}}", fits.join(","))).is_ok());
        let long = "n".repeat(LABEL_NAME_BYTES_MAX + 1);
        let e = parse(&format!("m{{{long}=\"v\"}}")).unwrap_err();
        assert!(e.to_string().contains("the limit is"), "{e}");
        let long = "v".repeat(LABEL_VALUE_BYTES_MAX + 1);
        let e = parse(&format!("m{{a=\"{long}\"}}")).unwrap_err();
        assert!(e.to_string().contains("the limit is"), "{e}");
    }
}
