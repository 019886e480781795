//! HTTP/JSON front end (placeholder; being written).
