//! The OpenAPI 3.0 description of the HTTP API, served at `/openapi.json`.
//!
//! Hand-written JSON kept beside this file, so that it reads as the
//! reference it is; the test below keeps it and [`Endpoint::ALL`] in step.
//!
//! [`Endpoint::ALL`]: super::Endpoint::ALL

/// The OpenAPI document, as served.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::OPENAPI_JSON;
    use crate::http::Endpoint;

    fn document() -> Value {
        serde_json::from_str(OPENAPI_JSON).expect("openapi.json is valid JSON")
    }

    // The document lists exactly the routes the router serves.
    #[test]
    fn document_and_router_list_the_same_routes() {
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths is an object") {
            for method in item.as_object().expect("a path item is an object").keys() {
                if method != "parameters" {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let routed: BTreeSet<(String, String)> = Endpoint::ALL
            .iter()
            .map(|e| (e.method().to_string(), e.path().to_string()))
            .collect();
        assert_eq!(documented, routed);
    }

    // Every `$ref` points at a schema or response the document defines, and
    // every operation documents at least one error reply.
    #[test]
    fn references_resolve_and_errors_are_documented() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
        fn walk(v: &Value, doc: &Value, refs: &mut usize) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        let pointer = r.strip_prefix('#').expect("local reference");
                        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
                        *refs += 1;
                    }
                    map.values().for_each(|v| walk(v, doc, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc, refs)),
                _ => {}
            }
        }
        let mut refs = 0;
        walk(&doc, &doc, &mut refs);
        assert!(refs > 0);
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                let errors = responses.keys().filter(|s| s.as_str() >= "400").count();
                assert!(
                    errors > 0 || path == "/healthz" || path == "/openapi.json" || path == "/",
                    "{method} {path} documents no error reply"
                );
            }
        }
    }
}
