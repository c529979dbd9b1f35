//! The OpenAPI document of the local API (`docs/openapi.json`) against the daemon's router.
//!
//! The document is hand-written, so these tests hold it to what a reader and a generator need:
//! it parses as OpenAPI 3.1, every operation has an id and documented responses, every `$ref`
//! points at something, request bodies refuse unknown fields as the daemon does, and the routes
//! it describes are exactly the daemon's (`blobstage::daemon::api::ROUTES`), no more and no
//! fewer.

use std::collections::BTreeSet;

use serde_json::Value;

const DOCUMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

/// The HTTP methods an OpenAPI path item may hold operations under.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The schemas the API's bodies are built from.
const SCHEMAS: &[&str] = &["Pull", "PullRequest", "Blob", "BlobList", "Status", "Error"];

fn document() -> Value {
    let text = std::fs::read_to_string(DOCUMENT).expect("read docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// Every `(METHOD, path template, operation)` of the document.
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let paths = doc["paths"].as_object().expect("a paths object");
    let mut found = Vec::new();
    for (path, item) in paths {
        for method in METHODS {
            if let Some(operation) = item.get(*method) {
                found.push((method.to_uppercase(), path.clone(), operation));
            }
        }
    }
    found
}

/// Follows `value` if it is a `{"$ref": "#/..."}`, once; panics on a dangling reference.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => lookup(doc, reference).unwrap_or_else(|| panic!("dangling {reference}")),
        None => value,
    }
}

/// The target of a local reference (`#/components/...`), if it exists.
fn lookup<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// Every `$ref` string anywhere in `value`, with the JSON path where it was found.
fn collect_refs(value: &Value, at: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "$ref" {
                    let target = child.as_str().expect("a $ref is a string");
                    found.push((at.to_owned(), target.to_owned()));
                } else {
                    collect_refs(child, &format!("{at}/{key}"), found);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_refs(child, &format!("{at}/{i}"), found);
            }
        }
        _ => {}
    }
}

#[test]
fn the_document_is_openapi_3_1_with_title_and_version() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("an openapi field");
    assert!(version.starts_with("3.1."), "not OpenAPI 3.1: {version}");
    assert!(doc["info"]["title"].is_string(), "info.title");
    assert!(doc["info"]["version"].is_string(), "info.version");
}

#[test]
fn every_operation_has_a_unique_id_a_description_and_responses() {
    let doc = document();
    let mut ids = BTreeSet::new();
    for (method, path, operation) in operations(&doc) {
        let id = operation["operationId"].as_str();
        let id = id.unwrap_or_else(|| panic!("{method} {path}: no operationId"));
        assert!(ids.insert(id.to_owned()), "operationId {id} is used twice");
        assert!(
            operation["summary"].is_string() || operation["description"].is_string(),
            "{method} {path}: neither summary nor description"
        );
        let responses = operation["responses"].as_object();
        let responses = responses.unwrap_or_else(|| panic!("{method} {path}: no responses"));
        assert!(!responses.is_empty(), "{method} {path}: empty responses");
    }
}

#[test]
fn every_response_is_a_status_code_with_a_description_and_a_json_schema() {
    let doc = document();
    for (method, path, operation) in operations(&doc) {
        let responses = operation["responses"].as_object().expect("responses");
        for (status, response) in responses {
            let code: u16 = status
                .parse()
                .unwrap_or_else(|_| panic!("{method} {path}: response key {status}"));
            assert!((100..600).contains(&code), "{method} {path}: {status}");
            let response = resolve(&doc, response);
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}: no description"
            );
            let schema = &response["content"]["application/json"]["schema"];
            assert!(
                schema.is_object(),
                "{method} {path} {status}: no application/json schema"
            );
            if code >= 400 {
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{method} {path} {status}: errors are Error objects"
                );
            }
        }
    }
}

#[test]
fn every_reference_resolves() {
    let doc = document();
    let mut refs = Vec::new();
    collect_refs(&doc, "#", &mut refs);
    assert!(
        !refs.is_empty(),
        "no $ref at all: the components are unused"
    );
    for (at, target) in refs {
        assert!(
            target.starts_with("#/"),
            "{at}: {target} is not a local reference"
        );
        assert!(
            lookup(&doc, &target).is_some(),
            "{at}: {target} resolves to nothing"
        );
    }
}

#[test]
fn the_components_hold_the_api_schemas() {
    let doc = document();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    for name in SCHEMAS {
        assert!(
            schemas.contains_key(*name),
            "components.schemas.{name} is missing"
        );
    }
    for (name, schema) in schemas {
        assert!(
            schema["description"].is_string(),
            "components.schemas.{name} has no description"
        );
    }
    let states = &doc["components"]["schemas"]["PullState"]["enum"];
    let states: BTreeSet<&str> = states
        .as_array()
        .expect("PullState is an enum")
        .iter()
        .map(|s| s.as_str().expect("a state is a string"))
        .collect();
    let documented = [
        "queued",
        "resolving",
        "transferring",
        "verifying",
        "staged",
        "failed",
        "cancelled",
    ];
    assert_eq!(states, documented.into_iter().collect());
}

#[test]
fn request_bodies_refuse_unknown_fields() {
    let doc = document();
    let mut bodies = 0;
    for (method, path, operation) in operations(&doc) {
        let Some(body) = operation.get("requestBody") else {
            continue;
        };
        bodies += 1;
        let body = resolve(&doc, body);
        let schema = resolve(&doc, &body["content"]["application/json"]["schema"]);
        assert_eq!(
            schema["type"], "object",
            "{method} {path}: the body is not an object"
        );
        assert_eq!(
            schema["additionalProperties"],
            Value::Bool(false),
            "{method} {path}: the body schema allows unknown fields"
        );
    }
    assert!(bodies > 0, "POST /v1/pulls has a body");
}

#[test]
fn every_path_parameter_is_declared_and_required() {
    let doc = document();
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path, operation) in operations(&doc) {
        let shared = paths[&path]["parameters"].as_array().cloned();
        let own = operation["parameters"].as_array().cloned();
        let declared: Vec<Value> = shared.into_iter().chain(own).flatten().collect();
        let declared: Vec<&Value> = declared.iter().map(|p| resolve(&doc, p)).collect();
        let templated = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'));
        for name in templated {
            let parameter = declared
                .iter()
                .find(|p| p["in"] == "path" && p["name"] == name);
            let parameter =
                parameter.unwrap_or_else(|| panic!("{method} {path}: {{{name}}} not declared"));
            assert_eq!(parameter["required"], true, "{method} {path}: {name}");
        }
    }
}

#[test]
fn the_documented_routes_are_exactly_the_daemons() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let routes = blobstage::daemon::api::ROUTES;
    let served: BTreeSet<(String, String)> = routes
        .iter()
        .map(|(method, path)| (method.to_uppercase(), (*path).to_owned()))
        .collect();
    assert_eq!(served.len(), routes.len(), "ROUTES lists a route twice");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not documented: {undocumented:?}; documented but not served: {unserved:?}"
    );
}
