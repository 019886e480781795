//! The list of HTTP endpoints: each one's method and path pattern, written
//! once. The router is built from [`Endpoint::ALL`], and a test checks the
//! OpenAPI document against the same list, so a route cannot exist without
//! being documented or be documented without existing.

use axum::http::Method;

/// One route of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Increment,
    IncrementBatch,
    GetCounter,
    DeleteCounter,
    ResetCounter,
    SetExpiry,
    GetExpiry,
    ClearExpiry,
    ListCounters,
    Cluster,
    RetireNode,
    Metrics,
    Health,
    Readiness,
    OpenApi,
    Dashboard,
}

impl Endpoint {
    /// Every endpoint, in the order the API documentation lists them.
    pub const ALL: [Endpoint; 16] = [
        Endpoint::Increment,
        Endpoint::IncrementBatch,
        Endpoint::GetCounter,
        Endpoint::DeleteCounter,
        Endpoint::ResetCounter,
        Endpoint::SetExpiry,
        Endpoint::GetExpiry,
        Endpoint::ClearExpiry,
        Endpoint::ListCounters,
        Endpoint::Cluster,
        Endpoint::RetireNode,
        Endpoint::Metrics,
        Endpoint::Health,
        Endpoint::Readiness,
        Endpoint::OpenApi,
        Endpoint::Dashboard,
    ];

    pub fn method(self) -> Method {
        match self {
            Endpoint::Increment
            | Endpoint::IncrementBatch
            | Endpoint::ResetCounter
            | Endpoint::RetireNode => Method::POST,
            Endpoint::SetExpiry => Method::PUT,
            Endpoint::DeleteCounter | Endpoint::ClearExpiry => Method::DELETE,
            Endpoint::GetCounter
            | Endpoint::GetExpiry
            | Endpoint::ListCounters
            | Endpoint::Cluster
            | Endpoint::Metrics
            | Endpoint::Health
            | Endpoint::Readiness
            | Endpoint::OpenApi
            | Endpoint::Dashboard => Method::GET,
        }
    }

    /// Path pattern in the syntax shared by axum and OpenAPI: `{name}` is
    /// one path segment.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Increment => "/v1/counters/{name}/increment",
            Endpoint::IncrementBatch => "/v1/increments",
            Endpoint::GetCounter | Endpoint::DeleteCounter => "/v1/counters/{name}",
            Endpoint::ResetCounter => "/v1/counters/{name}/reset",
            Endpoint::SetExpiry | Endpoint::GetExpiry | Endpoint::ClearExpiry => {
                "/v1/counters/{name}/expiry"
            }
            Endpoint::ListCounters => "/v1/counters",
            Endpoint::Cluster => "/v1/cluster",
            Endpoint::RetireNode => "/v1/nodes/{name}/retire",
            Endpoint::Metrics => "/metrics",
            Endpoint::Health => "/healthz",
            Endpoint::Readiness => "/readyz",
            Endpoint::OpenApi => "/openapi.json",
            Endpoint::Dashboard => "/",
        }
    }

    /// Whether a request path fits this endpoint's pattern when `{name}` may
    /// also be empty. The router itself never matches an empty segment; this
    /// lets the fallbacks tell "empty counter name" and "wrong method" apart
    /// from "no such route".
    pub(crate) fn fits(self, path: &str) -> Option<Fit> {
        let mut pattern = self.path().split('/');
        let mut given = path.split('/');
        let mut empty_name = false;
        loop {
            match (pattern.next(), given.next()) {
                (None, None) => return Some(Fit { empty_name }),
                (Some("{name}"), Some(segment)) => empty_name |= segment.is_empty(),
                (Some(p), Some(segment)) if p == segment => {}
                _ => return None,
            }
        }
    }
}

/// How a request path fits an endpoint's pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fit {
    /// The `{name}` segment is empty.
    pub empty_name: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only exact patterns fit, and an empty name segment is reported.
    #[test]
    fn fits_matches_segments_and_flags_empty_names() {
        let inc = Endpoint::Increment;
        assert_eq!(
            inc.fits("/v1/counters/a/increment"),
            Some(Fit { empty_name: false })
        );
        assert_eq!(
            inc.fits("/v1/counters//increment"),
            Some(Fit { empty_name: true })
        );
        assert_eq!(inc.fits("/v1/counters/a/b/increment"), None);
        assert_eq!(inc.fits("/v1/counters/a"), None);
        assert_eq!(
            Endpoint::GetCounter.fits("/v1/counters/"),
            Some(Fit { empty_name: true })
        );
        assert_eq!(
            Endpoint::Health.fits("/healthz"),
            Some(Fit { empty_name: false })
        );
        assert_eq!(Endpoint::Health.fits("/healthz/"), None);
    }
}
