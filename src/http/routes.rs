//! Route handlers: each turns one request into calls on the node and its
//! outcome into a JSON reply. Extractor rejections are caught here and
//! answered as JSON errors, never with axum's plain-text bodies.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::body::{self, IncrementFields};
use super::endpoint::Endpoint;
use super::error::ApiError;
use super::openapi::OPENAPI_JSON;
use crate::config::ServerConfig;
use crate::node::Consistency;
use crate::node::{IncrementOptions, Node};

/// Page length of `GET /v1/counters` when the request gives no `limit`.
pub const PAGE_LEN_DEFAULT: usize = 100;

/// Content type of `/metrics`, as the OpenMetrics specification names it.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub node: Node,
    pub config: Arc<ServerConfig>,
}

/// The handler of `endpoint`, accepting only its method.
pub(crate) fn method_router(endpoint: Endpoint) -> MethodRouter<AppState> {
    let filter = MethodFilter::try_from(endpoint.method())
        .expect("every endpoint uses a method axum can route");
    match endpoint {
        Endpoint::Increment => on(filter, increment),
        Endpoint::IncrementBatch => on(filter, increment_batch),
        Endpoint::GetCounter => on(filter, get_counter),
        Endpoint::DeleteCounter | Endpoint::ResetCounter => on(filter, delete_counter),
        Endpoint::SetExpiry => on(filter, set_expiry),
        Endpoint::GetExpiry => on(filter, get_expiry),
        Endpoint::ClearExpiry => on(filter, clear_expiry),
        Endpoint::ListCounters => on(filter, list_counters),
        Endpoint::Cluster => on(filter, cluster),
        Endpoint::RetireNode => on(filter, retire_node),
        Endpoint::Metrics => on(filter, metrics),
        Endpoint::Health => on(filter, health),
        Endpoint::Readiness => on(filter, readiness),
        Endpoint::OpenApi => on(filter, openapi),
        Endpoint::Dashboard => on(filter, dashboard),
    }
}

#[derive(Serialize)]
struct IncrementReply<'a> {
    name: &'a str,
    value: i64,
    duplicate: bool,
}

#[derive(Serialize)]
struct CounterReply {
    name: String,
    value: i64,
}

/// `GET /v1/counters/{name}`: the global value and every node's shard.
#[derive(Serialize)]
struct CounterDetailReply {
    name: String,
    value: i64,
    /// Node id to that node's shard, in node-id order.
    nodes: BTreeMap<String, i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    consistency: Option<String>,
}

impl GetQuery {
    fn consistency(&self) -> Result<Consistency, ApiError> {
        match self.consistency.as_deref() {
            None | Some("cache") => Ok(Consistency::Cache),
            Some("store") => Ok(Consistency::Store),
            Some(other) => Err(ApiError::bad_request(format!(
                "query parameter 'consistency' must be cache or store, not '{other}'"
            ))),
        }
    }
}

/// A blocking task that did not complete (it panicked, or the runtime is
/// shutting down).
fn blocking_failed(what: &str, e: tokio::task::JoinError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"))
}

/// The counter name from the path, percent-decoded.
fn name_from(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(name)| name)
        .map_err(|e| ApiError::bad_request(format!("counter name in the path: {}", e.body_text())))
}

/// Applies one increment; the error is the library's, mapped by the caller.
async fn apply(
    node: &Node,
    name: &str,
    fields: &IncrementFields,
) -> crate::Result<crate::IncrementOutcome> {
    let options = IncrementOptions {
        durability: fields.durability,
        idempotency_key: fields.idempotency_key.as_deref(),
    };
    let started = std::time::Instant::now();
    let result = node.increment(name, fields.by, options).await;
    let level = fields.durability.unwrap_or(node.config().durability);
    node.metrics().increment_latency.observe(
        crate::metrics::FrontEnd::Http,
        level,
        started.elapsed(),
        1,
    );
    let mut outcome = result?;
    if fields.consistency == Consistency::Store {
        outcome.value = node.value_after(name, outcome.value).await;
    }
    Ok(outcome)
}

async fn increment(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    request_body: Body,
) -> Result<Response, ApiError> {
    let name = name_from(path)?;
    let bytes = body::read(
        &headers,
        request_body,
        state.config.http_body_bytes_max,
        state.config.frame_timeout,
    )
    .await?;
    let fields = body::parse_increment(&bytes)?;
    let outcome = apply(&state.node, &name, &fields).await?;
    Ok(Json(IncrementReply {
        name: &name,
        value: outcome.value,
        duplicate: outcome.duplicate,
    })
    .into_response())
}

async fn increment_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    request_body: Body,
) -> Result<Response, ApiError> {
    let bytes = body::read(
        &headers,
        request_body,
        state.config.http_body_bytes_max,
        state.config.frame_timeout,
    )
    .await?;
    let items = body::parse_batch(&bytes, state.config.http_batch_len_max)?;
    // All items wait for their fsyncs at once, so one group commit covers
    // many of them; join_all still yields the results in the items' order.
    let node = &state.node;
    let results = futures_util::future::join_all(items.iter().map(|item| async move {
        match apply(node, &item.name, &item.fields).await {
            Ok(outcome) => json!({
                "name": item.name,
                "value": outcome.value,
                "duplicate": outcome.duplicate,
            }),
            Err(e) => {
                let error = ApiError::from(e);
                let mut slot = error.fields();
                slot.insert("name".into(), Value::String(item.name.clone()));
                slot.insert("status".into(), Value::from(error.status().as_u16()));
                Value::Object(slot)
            }
        }
    }))
    .await;
    Ok(Json(Value::Array(results)).into_response())
}

async fn get_counter(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Json<CounterDetailReply>, ApiError> {
    let name = name_from(path)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let detail = match query.consistency()? {
        // Reads memory only (the table and the cache): no blocking call.
        Consistency::Cache => state.node.get_detail(&name, Consistency::Cache)?,
        Consistency::Store => {
            let node = state.node.clone();
            let wanted = name.clone();
            tokio::task::spawn_blocking(move || node.get_detail(&wanted, Consistency::Store))
                .await
                .map_err(|e| blocking_failed("reading the counter from the store", e))??
        }
    };
    match detail {
        Some(detail) => Ok(Json(CounterDetailReply {
            name,
            value: detail.value,
            nodes: detail.shards.into_iter().collect(),
        })),
        None => Err(not_found(&name)),
    }
}

/// `DELETE /v1/counters/{name}` and `POST /v1/counters/{name}/reset`.
#[derive(Serialize)]
struct DeleteReply {
    name: String,
    /// Whether there was a value to erase.
    deleted: bool,
    /// The value erased (0 when nothing was).
    erased: i64,
}

async fn delete_counter(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeleteReply>, ApiError> {
    let name = name_from(path)?;
    let erased = state.node.delete(&name).await?;
    Ok(Json(DeleteReply {
        name,
        deleted: erased.is_some(),
        erased: erased.unwrap_or(0),
    }))
}

/// `GET /v1/counters/{name}/expiry`, and the reply of the `PUT`.
#[derive(Serialize)]
struct ExpiryReply {
    name: String,
    /// Unix time (ms) at which the counter is deleted; `null` if never.
    expires_at_ms: Option<u64>,
    /// Milliseconds left until then (0 once it has come and the sweep
    /// has not run yet); `null` if never.
    ttl_ms: Option<u64>,
}

/// `PUT` and `DELETE /v1/counters/{name}/expiry`.
#[derive(Serialize)]
struct ExpiryChangeReply {
    name: String,
    /// Whether the expiry changed (`PUT`: set, or the counter deleted for
    /// an expiry already past; `DELETE`: there was one to clear).
    changed: bool,
}

/// The reply of a change to `name`'s expiry: 404 if the counter does not
/// exist (`None`).
fn expiry_changed(
    name: String,
    changed: Option<bool>,
) -> Result<Json<ExpiryChangeReply>, ApiError> {
    match changed {
        Some(changed) => Ok(Json(ExpiryChangeReply { name, changed })),
        None => Err(not_found(&name)),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("counter '{name}' not found"))
}

async fn set_expiry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    request_body: Body,
) -> Result<Json<ExpiryChangeReply>, ApiError> {
    let name = name_from(path)?;
    let bytes = body::read(
        &headers,
        request_body,
        state.config.http_body_bytes_max,
        state.config.frame_timeout,
    )
    .await?;
    let fields = body::parse_expiry(&bytes, crate::engine::idempotency::now_ms())?;
    let changed = state
        .node
        .expire(&name, Some(fields.at_ms), fields.when)
        .await?;
    expiry_changed(name, changed)
}

async fn get_expiry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ExpiryReply>, ApiError> {
    let name = name_from(path)?;
    let Some(at) = state.node.expiry(&name).await? else {
        return Err(not_found(&name));
    };
    let now = crate::engine::idempotency::now_ms();
    Ok(Json(ExpiryReply {
        name,
        expires_at_ms: at,
        ttl_ms: at.map(|at| at.saturating_sub(now)),
    }))
}

async fn clear_expiry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ExpiryChangeReply>, ApiError> {
    let name = name_from(path)?;
    let changed = state
        .node
        .expire(&name, None, crate::engine::deadlines::ExpireIf::Always)
        .await?;
    expiry_changed(name, changed)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/nodes/{name}/retire`.
#[derive(Serialize)]
struct RetireReply {
    node_id: String,
    retired: bool,
    /// Where the node last served clients.
    address: String,
}

async fn retire_node(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RetireQuery>, QueryRejection>,
) -> Result<Json<RetireReply>, ApiError> {
    let id = path
        .map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(format!("node id in the path: {}", e.body_text())))?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let node = state.node.clone();
    let wanted = id.clone();
    let address = tokio::task::spawn_blocking(move || node.retire(&wanted, query.force))
        .await
        .map_err(|e| blocking_failed("retiring the node", e))??;
    Ok(Json(RetireReply {
        node_id: id,
        retired: true,
        address,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct ListReply {
    counters: Vec<CounterReply>,
    /// Name to pass as `after` for the next page; `None` on the last page.
    next_after: Option<String>,
}

async fn list_counters(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListReply>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let page_len_max = state.config.http_page_len_max;
    let limit = query.limit.unwrap_or(PAGE_LEN_DEFAULT.min(page_len_max));
    if limit == 0 || limit > page_len_max {
        return Err(ApiError::bad_request(format!(
            "query parameter 'limit' must be from 1 to {page_len_max} (http_page_len_max), not {limit}"
        )));
    }
    // Listing scans the whole table: keep it off the threads that serve
    // other connections. One extra entry tells whether another page exists.
    let node = state.node.clone();
    let mut found = tokio::task::spawn_blocking(move || {
        node.list(&query.prefix, query.after.as_deref(), limit + 1)
    })
    .await
    .map_err(|e| blocking_failed("listing counters", e))?;
    let next_after = if found.len() > limit {
        found.truncate(limit);
        found.last().map(|(name, _)| name.clone())
    } else {
        None
    };
    Ok(Json(ListReply {
        counters: found
            .into_iter()
            .map(|(name, value)| CounterReply { name, value })
            .collect(),
        next_after,
    }))
}

/// `GET /v1/cluster`. The view is read from the store, on a blocking
/// thread; a store error is answered 503. A node without a store answers
/// 200 with itself alone (`"store": null`), so that a tool polling every
/// node gets the same shape from each.
/// How many of this node's hottest counters `GET /v1/cluster` lists.
pub const HOT_COUNTERS_SHOWN: usize = 10;

async fn cluster(State(state): State<AppState>) -> Result<Response, ApiError> {
    let node = state.node.clone();
    let view = tokio::task::spawn_blocking(move || node.cluster_view())
        .await
        .map_err(|e| blocking_failed("reading the cluster view", e))?;
    let mut body = match view {
        Some(view) => serde_json::to_value(view?)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        None => {
            let node_id = state.node.node_id();
            json!({
                "node_id": node_id,
                "store": null,
                "replicated_available": false,
                "nodes": [{
                    "node_id": node_id,
                    "state": "alive",
                    "pid": std::process::id(),
                    "uptime_ms": state.node.uptime().as_millis() as u64,
                    "applied_lsn": state.node.applied_lsn(),
                }],
            })
        }
    };
    body["hot_counters"] = json!(state.node.hot_counters(HOT_COUNTERS_SHOWN));
    Ok(Json(body).into_response())
}

/// The dashboard: one page, built into the binary, that reads
/// `GET /v1/cluster` every second.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    // Rendering visits every counter: keep it off the serving threads.
    let node = state.node.clone();
    let text = tokio::task::spawn_blocking(move || crate::metrics::render_openmetrics(&node))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering metrics: {e}"),
            )
        })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
        )],
        text,
    )
        .into_response())
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

/// `GET /readyz`: 200 while the node can make `local` writes durable,
/// which is all a load balancer needs to route to it. Whether `replicated`
/// writes can be made durable too is said beside it (`replicated`, and
/// `replicated_reason` when they cannot), without changing the status: a
/// node that lost its store still serves `local` writes.
async fn readiness(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let readiness = node.readiness();
    let replicated_reason = if node.config().cluster.is_none() {
        Some("no shared store".to_string())
    } else if !readiness.ready {
        // A node that takes no writes takes no replicated ones either.
        readiness.reason.clone()
    } else {
        node.replicated_unavailable()
    };
    let mut body = json!({
        "ready": readiness.ready,
        "node_id": node.node_id(),
        "replicated": replicated_reason.is_none(),
    });
    if let Some(reason) = replicated_reason {
        body["replicated_reason"] = Value::String(reason);
    }
    if readiness.ready {
        Json(body).into_response()
    } else {
        body["reason"] = json!(readiness.reason);
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_JSON,
    )
        .into_response()
}

/// Answers a path no route takes. A path that would fit a route but for an
/// empty counter name is a bad name, not a missing route.
pub(crate) async fn no_route(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    if Endpoint::ALL
        .iter()
        .any(|e| e.fits(path).is_some_and(|fit| fit.empty_name))
    {
        return ApiError::bad_request("counter name is invalid: it is empty");
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {path}; the API is described at /openapi.json"),
    )
}

/// Answers a known path asked with a method it does not take.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let allowed: Vec<String> = Endpoint::ALL
        .iter()
        .filter(|e| e.fits(path).is_some())
        .map(|e| e.method().to_string())
        .collect();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} is not allowed on {path}; allowed: {}",
            allowed.join(", ")
        ),
    )
}
