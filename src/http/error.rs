//! HTTP errors: the status each library [`Error`] maps to, and the JSON body
//! every error reply carries (`{"error": "..."}`, plus `"outcome":
//! "unknown"` when the client cannot know whether its increment counted).
//!
//! The table of statuses is in the [module documentation of
//! `http`](super); this is the one place that implements it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::error::{Error, Outcome};

/// An error reply: a status and a message naming the problem.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// The increment may or may not have been applied. Said in the body as
    /// well as by the status, so that a client reading only the body, or a
    /// batch item's slot, can tell "retry with the same key" from "not
    /// applied".
    outcome_unknown: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            outcome_unknown: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON fields describing this error, to be placed in a reply body
    /// or a batch item's slot.
    pub fn fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("error".into(), Value::String(self.message.clone()));
        if self.outcome_unknown {
            fields.insert("outcome".into(), Value::String("unknown".into()));
        }
        fields
    }
}

/// The status a library error is answered with.
///
/// The match has no wildcard on purpose: a new error variant does not
/// compile until someone decides what a client should make of it.
fn status_of(error: &Error) -> StatusCode {
    match error {
        Error::InvalidInput { .. } => StatusCode::BAD_REQUEST,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        // Well formed, but the state of what it names forbids it for now.
        Error::Conflict(_) => StatusCode::CONFLICT,
        // The request is well formed; it conflicts with the counter's value.
        Error::Overflow => StatusCode::CONFLICT,
        // The request is well formed, but this node has no shared store and
        // never will while it runs: a client error (retrying cannot help
        // here), not a server fault.
        Error::DurabilityUnavailable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        // Nothing was applied and another node may take the write.
        Error::JournalFailed(_)
        | Error::ShuttingDown
        | Error::Fenced(_)
        | Error::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        // Distinct from every other status here: retry with the same key.
        Error::Indeterminate(_) => StatusCode::GATEWAY_TIMEOUT,
        // A capacity limit of the node, which waiting will not lift.
        Error::LimitExceeded(_) => StatusCode::INSUFFICIENT_STORAGE,
        Error::Corrupt { .. } | Error::Io { .. } | Error::InvalidConfig { .. } => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError {
            status: status_of(&error),
            outcome_unknown: error.outcome() == Outcome::Unknown,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = %self.message, "HTTP request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.message, "HTTP request refused");
        }
        (self.status, Json(Value::Object(self.fields()))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The unknown outcome has a status of its own and says so in the body;
    // nothing else claims it.
    #[test]
    fn indeterminate_is_distinguishable_from_not_applied() {
        let unknown = ApiError::from(Error::Indeterminate("fsync failed".into()));
        assert_eq!(unknown.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(unknown.fields()["outcome"], "unknown");
        let others = [
            Error::Overflow,
            Error::ShuttingDown,
            Error::JournalFailed("disk".into()),
            Error::LimitExceeded("counters_max".into()),
            Error::DurabilityUnavailable {
                level: "replicated",
                reason: "no store".into(),
            },
            Error::InvalidInput {
                what: "counter name",
                reason: "it is empty".into(),
            },
        ];
        for e in others {
            let api = ApiError::from(e.clone());
            assert_ne!(api.status(), StatusCode::GATEWAY_TIMEOUT, "{e}");
            assert!(!api.fields().contains_key("outcome"), "{e}");
        }
    }
}
