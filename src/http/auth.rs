//! Who may call which route, on a node with users (see [`crate::auth`]).
//!
//! Every request carries `Authorization: Bearer user:secret`, except to
//! `/healthz` and `/readyz` (load balancers must reach them without
//! credentials) and, when the node is told so, `/metrics`. A missing or
//! bad token is 401 with `WWW-Authenticate: Bearer realm="tally"`; a role
//! that may not call the route is 403. Either way the handler never runs,
//! so a refused request changes nothing. A request to a path that is no
//! route needs a token too: an unauthenticated client learns nothing about
//! which routes exist.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::endpoint::Endpoint;
use super::error::ApiError;
use super::routes::AppState;
use crate::auth::Role;

/// `WWW-Authenticate` on every 401.
const CHALLENGE: &str = "Bearer realm=\"tally\"";

/// The least role that may call `method path`, or `None` for a route open
/// to everyone.
fn needed(method: &Method, path: &str, metrics_open: bool) -> Option<Role> {
    let endpoint = Endpoint::ALL
        .into_iter()
        .find(|e| e.method() == method && e.fits(path).is_some());
    match endpoint {
        // The page holds no data; the cluster view it reads needs a role.
        Some(Endpoint::Health | Endpoint::Readiness | Endpoint::Dashboard) => None,
        Some(Endpoint::Metrics) if metrics_open => None,
        Some(
            Endpoint::Increment
            | Endpoint::IncrementBatch
            | Endpoint::DeleteCounter
            | Endpoint::ResetCounter
            | Endpoint::SetExpiry
            | Endpoint::ClearExpiry,
        ) => Some(Role::Write),
        Some(Endpoint::RetireNode) => Some(Role::Admin),
        Some(
            Endpoint::GetCounter
            | Endpoint::GetExpiry
            | Endpoint::ListCounters
            | Endpoint::Cluster
            | Endpoint::Metrics
            | Endpoint::OpenApi,
        )
        | None => Some(Role::Read),
    }
}

/// The middleware: checks the token against the route before the handler.
pub(crate) async fn require(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let users = &state.config.users;
    if !users.enabled() {
        return next.run(request).await;
    }
    let Some(role) = needed(
        request.method(),
        request.uri().path(),
        state.config.metrics_without_auth,
    ) else {
        return next.run(request).await;
    };
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let identity = token.and_then(|t| users.authenticate_token(t));
    match identity {
        None => {
            if token.is_some() {
                state
                    .node
                    .metrics()
                    .auth_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication required: send Authorization: Bearer <user>:<secret>",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(CHALLENGE),
            );
            response
        }
        Some(identity) if identity.role < role => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "user '{}' (role {}) may not call this route; it needs role {role}",
                identity.user, identity.role
            ),
        )
        .into_response(),
        Some(_) => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each route needs the role the module documentation gives it.
    #[test]
    fn each_route_needs_its_role() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            needed(&post, "/v1/counters/a/increment", false),
            Some(Role::Write)
        );
        assert_eq!(needed(&post, "/v1/increments", false), Some(Role::Write));
        assert_eq!(
            needed(&Method::DELETE, "/v1/counters/a", false),
            Some(Role::Write)
        );
        assert_eq!(
            needed(&post, "/v1/counters/a/reset", false),
            Some(Role::Write)
        );
        assert_eq!(
            needed(&post, "/v1/nodes/n1/retire", false),
            Some(Role::Admin)
        );
        assert_eq!(needed(&get, "/v1/counters/a", false), Some(Role::Read));
        assert_eq!(needed(&get, "/v1/counters", false), Some(Role::Read));
        assert_eq!(needed(&get, "/v1/cluster", false), Some(Role::Read));
        assert_eq!(needed(&get, "/openapi.json", false), Some(Role::Read));
        assert_eq!(needed(&get, "/metrics", false), Some(Role::Read));
        assert_eq!(needed(&get, "/metrics", true), None);
        assert_eq!(needed(&get, "/healthz", false), None);
        assert_eq!(needed(&get, "/readyz", false), None);
        assert_eq!(needed(&get, "/nosuch", false), Some(Role::Read));
        // A wrong method on an open route is not open.
        assert_eq!(needed(&post, "/healthz", false), Some(Role::Read));
    }
}
