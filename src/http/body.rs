//! Request bodies: reading one within its size and time limits, and turning
//! its JSON into typed increment requests.
//!
//! Parsing is done by hand on a [`serde_json::Value`] rather than by derived
//! deserialisation so that every error names the field and what it must be
//! (`field 'by' must be an integer ...`), and names the item of a batch.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::config::Durability;
use crate::engine::deadlines::ExpireIf;
use crate::node::Consistency;

/// The fields of one increment, without the counter name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IncrementFields {
    pub by: i64,
    pub idempotency_key: Option<String>,
    pub durability: Option<Durability>,
    /// `store`: the reply's value is read from the store after the
    /// increment, not from this node's view.
    pub consistency: Consistency,
}

/// One item of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchItem {
    pub name: String,
    pub fields: IncrementFields,
}

/// Reads a whole request body, refusing it with 413 once it exceeds
/// `bytes_max` and with 408 if it has not fully arrived within `timeout`.
///
/// A declared `Content-Length` over the limit is refused before any of the
/// body is read.
pub(crate) async fn read(
    headers: &HeaderMap,
    body: Body,
    bytes_max: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {bytes_max} bytes (http_body_bytes_max)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > bytes_max as u64) {
        return Err(too_large());
    }
    let collect = async {
        let mut stream = body.into_data_stream();
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
            if buf.len() + chunk.len() > bytes_max {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, collect).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} ms (frame_timeout)",
                timeout.as_millis()
            ),
        )
    })?
}

/// Parses the body of `POST /v1/counters/{name}/increment`. An empty body
/// means `{}`.
pub(crate) fn parse_increment(bytes: &[u8]) -> Result<IncrementFields, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(IncrementFields {
            by: 1,
            idempotency_key: None,
            durability: None,
            consistency: Consistency::Cache,
        });
    }
    let Value::Object(object) = parse_json(bytes)? else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object such as {\"by\": 1}",
        ));
    };
    parse_fields(
        object,
        &["by", "idempotency_key", "durability", "consistency"],
    )
    .map_err(ApiError::bad_request)
}

/// Parses the body of `POST /v1/increments`: an array of at most `len_max`
/// objects, each with a `name`.
pub(crate) fn parse_batch(bytes: &[u8], len_max: usize) -> Result<Vec<BatchItem>, ApiError> {
    let Value::Array(items) = parse_json(bytes)? else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON array of increments such as [{\"name\": \"hits\", \"by\": 1}]",
        ));
    };
    if items.len() > len_max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the batch has {} increments; the limit is {len_max} (http_batch_len_max)",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            parse_batch_item(item).map_err(|e| ApiError::bad_request(format!("item {index}: {e}")))
        })
        .collect()
}

fn parse_batch_item(item: Value) -> Result<BatchItem, String> {
    let Value::Object(mut object) = item else {
        return Err("it must be a JSON object such as {\"name\": \"hits\", \"by\": 1}".into());
    };
    let name = match object.remove("name") {
        Some(Value::String(name)) => name,
        None | Some(Value::Null) => return Err("field 'name' is required".into()),
        Some(_) => return Err("field 'name' must be a string".into()),
    };
    let fields = parse_fields(
        object,
        &["name", "by", "idempotency_key", "durability", "consistency"],
    )?;
    Ok(BatchItem { name, fields })
}

/// The body of `PUT /v1/counters/{name}/expiry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpiryFields {
    /// The unix time (ms) to expire at; at or before now (0 included)
    /// deletes the counter now.
    pub at_ms: u64,
    pub when: ExpireIf,
}

/// Parses `{"in_ms": N}` or `{"at_ms": N}`, with an optional `"when"`.
pub(crate) fn parse_expiry(bytes: &[u8], now_ms: u64) -> Result<ExpiryFields, ApiError> {
    const KNOWN: [&str; 3] = ["in_ms", "at_ms", "when"];
    let example = "the request body must be a JSON object such as {\"in_ms\": 60000} or \
                   {\"at_ms\": 1767225600000}";
    let Value::Object(mut object) = parse_json(bytes)? else {
        return Err(ApiError::bad_request(example));
    };
    if let Some(unknown) = object.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown field '{unknown}'; the fields are {}",
            KNOWN.join(", ")
        )));
    }
    let mut int = |field: &str| -> Result<Option<i64>, ApiError> {
        match object.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "field '{field}' must be an integer number of milliseconds"
                ))
            }),
        }
    };
    let at_ms = match (int("in_ms")?, int("at_ms")?) {
        (Some(d), None) => d.saturating_add(i64::try_from(now_ms).unwrap_or(i64::MAX)),
        (None, Some(at)) => at,
        _ => {
            return Err(ApiError::bad_request(format!(
                "give exactly one of 'in_ms' and 'at_ms': {example}"
            )));
        }
    };
    let when = match object.remove("when") {
        None | Some(Value::Null) => ExpireIf::Always,
        Some(Value::String(s)) => match s.as_str() {
            "always" => ExpireIf::Always,
            "no_expiry" => ExpireIf::NoExpiry,
            "has_expiry" => ExpireIf::HasExpiry,
            "later" => ExpireIf::Later,
            "earlier" => ExpireIf::Earlier,
            _ => return Err(ApiError::bad_request(WHEN_VALUES)),
        },
        Some(_) => return Err(ApiError::bad_request(WHEN_VALUES)),
    };
    Ok(ExpiryFields {
        at_ms: u64::try_from(at_ms).unwrap_or(0).max(1),
        when,
    })
}

const WHEN_VALUES: &str =
    "field 'when' must be one of always, no_expiry, has_expiry, later, earlier";

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Reads `by`, `idempotency_key` and `durability` from `object`, refusing
/// any field not in `known`. A field set to `null` counts as absent.
fn parse_fields(mut object: Map<String, Value>, known: &[&str]) -> Result<IncrementFields, String> {
    if let Some(unknown) = object.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "unknown field '{unknown}'; the fields are {}",
            known.join(", ")
        ));
    }
    let by = match object.remove("by") {
        None | Some(Value::Null) => 1,
        Some(v) => v.as_i64().ok_or_else(|| {
            format!(
                "field 'by' must be an integer from {} to {}, not {v}",
                i64::MIN,
                i64::MAX
            )
        })?,
    };
    let idempotency_key = match object.remove("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(key),
        Some(v) => return Err(format!("field 'idempotency_key' must be a string, not {v}")),
    };
    let durability = match object.remove("durability") {
        None | Some(Value::Null) => None,
        Some(Value::String(level)) => Some(level.parse::<Durability>().map_err(|_| {
            format!("field 'durability' must be one of memory, local, replicated, not '{level}'")
        })?),
        Some(v) => {
            return Err(format!(
                "field 'durability' must be one of \"memory\", \"local\", \"replicated\", not {v}"
            ));
        }
    };
    let consistency = match object.remove("consistency") {
        None | Some(Value::Null) => Consistency::Cache,
        Some(Value::String(c)) if c == "cache" => Consistency::Cache,
        Some(Value::String(c)) if c == "store" => Consistency::Store,
        Some(v) => {
            return Err(format!(
                "field 'consistency' must be \"cache\" (this node's view) or \"store\" (read \
                 from the store after the increment), not {v}"
            ));
        }
    };
    Ok(IncrementFields {
        by,
        idempotency_key,
        durability,
        consistency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: ApiError) -> String {
        e.fields()["error"].as_str().unwrap().to_string()
    }

    // An empty body and `{}` both mean "add one at the node's durability".
    #[test]
    fn empty_body_means_by_one() {
        let expected = IncrementFields {
            by: 1,
            idempotency_key: None,
            durability: None,
            consistency: Consistency::Cache,
        };
        assert_eq!(parse_increment(b"").unwrap(), expected);
        assert_eq!(parse_increment(b" \n").unwrap(), expected);
        assert_eq!(parse_increment(b"{}").unwrap(), expected);
        assert_eq!(parse_increment(b"{\"by\": null}").unwrap(), expected);
    }

    // Every field is read, and durability is case-insensitive like the config.
    #[test]
    fn all_fields_are_read() {
        let f = parse_increment(
            br#"{"by": -7, "idempotency_key": "k", "durability": "Memory", "consistency": "store"}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            IncrementFields {
                by: -7,
                idempotency_key: Some("k".into()),
                durability: Some(Durability::Memory),
                consistency: Consistency::Store,
            }
        );
        assert!(
            message(parse_increment(br#"{"consistency": "fresh"}"#).unwrap_err())
                .contains("field 'consistency' must be")
        );
    }

    // Each kind of bad input is refused with a message naming the field.
    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"by": "x"}"#, "field 'by' must be an integer"),
            (br#"{"by": 1.5}"#, "field 'by' must be an integer"),
            (
                br#"{"by": 9223372036854775808}"#,
                "field 'by' must be an integer",
            ),
            (
                br#"{"idempotency_key": 3}"#,
                "field 'idempotency_key' must be a string",
            ),
            (
                br#"{"durability": "disk"}"#,
                "field 'durability' must be one of",
            ),
            (br#"{"durability": 1}"#, "field 'durability' must be one of"),
            (br#"{"bye": 1}"#, "unknown field 'bye'"),
            (br#"{"by": 1"#, "not valid JSON"),
            (br#"[1]"#, "must be a JSON object"),
        ];
        for (body, expected) in cases {
            let e = parse_increment(body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            let m = message(e);
            assert!(
                m.contains(expected),
                "{}: {m}",
                String::from_utf8_lossy(body)
            );
        }
    }

    // Batch errors name the item; too many items is 413.
    #[test]
    fn batch_errors_name_the_item_and_length_is_bounded() {
        let e = parse_batch(br#"[{"name": "a"}, {"by": 1}]"#, 10).unwrap_err();
        assert!(message(e).starts_with("item 1: field 'name' is required"));
        let e = parse_batch(br#"[{"name": "a", "by": "x"}]"#, 10).unwrap_err();
        assert!(message(e).starts_with("item 0: field 'by'"));
        let e = parse_batch(br#"{"name": "a"}"#, 10).unwrap_err();
        assert!(message(e).contains("JSON array"));
        let e = parse_batch(br#"[{"name": "a"}, {"name": "b"}]"#, 1).unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let items = parse_batch(br#"[{"name": "a"}, {"name": "b", "by": 3}]"#, 2).unwrap();
        assert_eq!(items[0].name, "a");
        assert_eq!(items[0].fields.by, 1);
        assert_eq!(items[1].fields.by, 3);
    }

    // A body over the limit is refused, whether or not its length is declared.
    #[tokio::test]
    async fn body_size_is_bounded() {
        let timeout = Duration::from_secs(5);
        let empty = HeaderMap::new();
        let ok = read(&empty, Body::from("1234"), 4, timeout).await.unwrap();
        assert_eq!(&ok[..], b"1234");
        let e = read(&empty, Body::from("12345"), 4, timeout)
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        let e = read(&declared, Body::empty(), 4, timeout)
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
