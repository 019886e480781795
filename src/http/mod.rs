//! HTTP/JSON front end: the routes, their JSON bodies, the mapping from the
//! library's errors to statuses, and a connection server with its own limits.
//!
//! This module owns no counter state and never decides what an increment
//! means: every request becomes one call on [`Node`], and every outcome one
//! JSON reply. It must never acknowledge an increment before
//! [`Node::increment`] has returned, nor turn an error into a success.
//!
//! # Routes
//!
//! | method | path | reply |
//! | --- | --- | --- |
//! | POST | `/v1/counters/{name}/increment` | `{"name", "value", "duplicate"}` |
//! | POST | `/v1/increments` | one result per item, in order |
//! | GET | `/v1/counters/{name}?consistency=cache\|store` | `{"name", "value", "nodes": {"<node id>": <shard>}}`, 404 if no node holds it |
//! | DELETE | `/v1/counters/{name}` (or POST `.../reset`) | `{"name", "deleted", "erased"}` |
//! | PUT, GET, DELETE | `/v1/counters/{name}/expiry` | `{"name", "changed"}`; GET `{"name", "expires_at_ms", "ttl_ms"}` |
//! | GET | `/v1/counters?prefix=&after=&limit=` | `{"counters": [...], "next_after"}` |
//! | GET | `/v1/cluster` | the cluster view: every node, its epoch, liveness and flush lag |
//! | POST | `/v1/nodes/{id}/retire?force=` | `{"node_id", "retired", "address"}` |
//! | GET | `/` | the dashboard page |
//! | GET | `/metrics` | OpenMetrics text |
//! | GET | `/healthz` | `{"status": "alive"}` |
//! | GET | `/readyz` | 200 `{"ready": true, "replicated", ...}` or 503 `{"ready": false, "reason", ...}` |
//! | GET | `/openapi.json` | the OpenAPI 3.0 description of all of the above |
//!
//! # Global values
//!
//! On a node with a shared store, values are global: the node's own shard
//! plus the other nodes' shards from its cache, which is at most the flush
//! interval plus the refresh interval old (`staleness_bound_ms` in the
//! cluster view). `GET /v1/counters/{name}?consistency=store` reads the
//! other nodes' shards from the store for that request instead, which
//! removes the refresh interval from the staleness but not the other
//! nodes' flush interval; a store that cannot be read is a 503. The
//! counter listing holds every counter any node holds. On a node without a
//! store, `nodes` holds the node's own shard and `consistency` changes
//! nothing.
//!
//! `/readyz` answers 200 while the node can make `local` writes durable:
//! a node whose store is unreachable still serves them, and says
//! `"replicated": false` with a `"replicated_reason"`. A node without a
//! store says `"replicated": false, "replicated_reason": "no shared
//! store"`. `/v1/cluster` on a node without a store answers 200 with
//! `"store": null` and the node alone.
//!
//! A counter name is one path segment, percent-decoded: a name holding `/`
//! must send it as `%2F`. The request body of an increment is optional and
//! its fields are `by` (default 1, may be negative), `idempotency_key` and
//! `durability` (`memory`, `local`, `replicated`); any other field is an
//! error. The content type is not checked, so `curl -d` works.
//!
//! # Batches
//!
//! `POST /v1/increments` takes a JSON array of at most
//! [`ServerConfig::http_batch_len_max`] objects `{"name", "by",
//! "idempotency_key", "durability"}`. A batch that is not well formed (not
//! JSON, not an array, an item with a wrong type or unknown field, too many
//! items) is refused as a whole and nothing is applied. Otherwise every item
//! is applied on its own, concurrently, so that the items share group-commit
//! fsyncs: the reply is 200 with an array holding, in the items' order,
//! either `{"name", "value", "duplicate"}` or `{"name", "error", "status"}`
//! (plus `"outcome": "unknown"` where a lone increment would have had it),
//! where `status` is what `POST /v1/counters/{name}/increment` would have
//! answered. A failed item does not stop the others: a batch is not a
//! transaction. Items naming the same counter may be applied in any order
//! among themselves; each reports the value right after its own increment.
//!
//! # Errors
//!
//! Every error is a JSON object `{"error": "<what went wrong>"}` with a 4xx
//! or 5xx status:
//!
//! | cause | status |
//! | --- | --- |
//! | invalid JSON, a wrong type, an unknown field, a bad `durability`, `consistency` or other query parameter, a bad counter name or key ([`Error::InvalidInput`]) | 400 |
//! | no or a bad `Authorization: Bearer user:secret`, on a node with users (see [`crate::auth`]) | 401, with `WWW-Authenticate` |
//! | a user whose role may not call the route | 403 |
//! | no such route | 404 |
//! | counter held by no node (`GET /v1/counters/{name}`) | 404 |
//! | method not allowed on the route (with an `Allow` header) | 405 |
//! | the body did not arrive within [`ServerConfig::frame_timeout`] | 408 |
//! | [`Error::Overflow`]: the counter would leave the signed 64-bit range | 409 |
//! | body over [`ServerConfig::http_body_bytes_max`], batch over [`ServerConfig::http_batch_len_max`] | 413 |
//! | [`Error::NotFound`]: a node id the store does not know (`POST /v1/nodes/{name}/retire`) | 404 |
//! | [`Error::Conflict`]: a node that may not be retired now (running, this node, or down without `force`) | 409 |
//! | [`Error::Corrupt`], [`Error::Io`] | 500 |
//! | [`Error::DurabilityUnavailable`]: `replicated` asked of a node without a shared store; the request is well formed, but this node cannot do it, and retrying here never helps | 422 |
//! | [`Error::JournalFailed`], [`Error::ShuttingDown`], [`Error::Fenced`], [`Error::StoreUnavailable`] (for `replicated`, or a read of the store): nothing was applied, retry on another node | 503 |
//! | [`Error::Indeterminate`]: the outcome is unknown, retry with the same idempotency key; the body also carries `"outcome": "unknown"` | 504 |
//! | [`Error::LimitExceeded`]: the node holds as many counters or keys as it may | 507 |
//!
//! 504 is used for the unknown outcome, and for nothing else, because it is
//! what a client already gets when a load balancer times out waiting for the
//! node, which means the same thing: retry with the same key.
//!
//! # Connections
//!
//! [`serve`] runs its own accept loop so that it can hold connections to
//! [`ServerConfig::http_connections_max`] (a connection over the limit is
//! closed at accept), and bounds how long a stalled client holds one: a
//! request head, a request body, and a response write that makes no progress
//! all fail the connection after [`ServerConfig::frame_timeout`].
//!
//! [`Node`]: crate::Node
//! [`Node::increment`]: crate::Node::increment
//! [`ServerConfig::http_batch_len_max`]: crate::ServerConfig::http_batch_len_max
//! [`ServerConfig::http_body_bytes_max`]: crate::ServerConfig::http_body_bytes_max
//! [`ServerConfig::http_connections_max`]: crate::ServerConfig::http_connections_max
//! [`ServerConfig::frame_timeout`]: crate::ServerConfig::frame_timeout
//! [`Error::InvalidInput`]: crate::Error::InvalidInput
//! [`Error::Overflow`]: crate::Error::Overflow
//! [`Error::Corrupt`]: crate::Error::Corrupt
//! [`Error::NotFound`]: crate::Error::NotFound
//! [`Error::Conflict`]: crate::Error::Conflict
//! [`Error::Io`]: crate::Error::Io
//! [`Error::DurabilityUnavailable`]: crate::Error::DurabilityUnavailable
//! [`Error::JournalFailed`]: crate::Error::JournalFailed
//! [`Error::ShuttingDown`]: crate::Error::ShuttingDown
//! [`Error::Fenced`]: crate::Error::Fenced
//! [`Error::StoreUnavailable`]: crate::Error::StoreUnavailable
//! [`Error::Indeterminate`]: crate::Error::Indeterminate
//! [`Error::LimitExceeded`]: crate::Error::LimitExceeded

mod auth;
mod body;
mod endpoint;
mod error;
mod openapi;
mod routes;
mod server;

use std::sync::Arc;

pub use crate::listen::Listeners;
pub use endpoint::Endpoint;
pub use openapi::OPENAPI_JSON;
pub use routes::PAGE_LEN_DEFAULT;
pub use server::{ACCEPT_ERROR_BACKOFF, HEAD_BYTES_MAX, SHUTDOWN_DRAIN_TIMEOUT, serve, serve_on};

/// The HTTP API of `node` as an axum router, without a server: embed it in
/// another axum application, or run it with [`serve`].
pub fn router(node: crate::Node, config: Arc<crate::ServerConfig>) -> axum::Router {
    let mut router = axum::Router::new();
    for endpoint in Endpoint::ALL {
        router = router.route(endpoint.path(), routes::method_router(endpoint));
    }
    let router = router
        // Must come after the routes: it is installed on the routes present.
        .method_not_allowed_fallback(routes::method_not_allowed)
        .fallback(routes::no_route);
    let state = routes::AppState { node, config };
    router
        // Around the routes and the fallbacks alike.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .with_state(state)
}
