//! The generated Gateway API types (`portcullis::k8s::gateway_api`) against the upstream
//! examples of the release they were generated from (tests/data/gateway-api/README.md):
//! every document of a generated kind deserializes into its type and serializes back to
//! the same JSON, field for field. A field the types did not know would be dropped, and
//! a field they defaulted would be added; either shows up here as a difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use portcullis::k8s::gateway_api::{
    backendtlspolicies::BackendTlsPolicy, gatewayclasses::GatewayClass, gateways::Gateway,
    grpcroutes::GrpcRoute, httproutes::HttpRoute, referencegrants, referencegrants_v1,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const GROUP_V1: &str = "gateway.networking.k8s.io/v1";
const GROUP_V1BETA1: &str = "gateway.networking.k8s.io/v1beta1";

/// Kinds the examples hold that have no generated type (ListenerSet and the TCP, TLS and
/// UDP routes are in the standard channel since v1.5 but Portcullis does not serve them).
const NOT_GENERATED: &[&str] = &["Namespace", "ListenerSet"];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gateway-api")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

/// Every YAML document of the examples, with `file#index` naming it.
fn documents() -> Vec<(String, Value)> {
    let dir = data_dir();
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable example");
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.strip_prefix(&dir).expect("under data dir").display();
        for (i, value) in values.into_iter().enumerate() {
            if !value.is_null() {
                docs.push((format!("{name}#{i}"), value));
            }
        }
    }
    docs
}

/// Deserializes `doc` as `T`, with the path of the offending field on failure.
fn parse<T: DeserializeOwned>(doc: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(doc).map_err(|e| format!("at {}: {}", e.path(), e.inner()))
}

/// The paths where two JSON values differ, `$` being the root.
fn differences(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => differences(&format!("{path}.{k}"), wv, gv, out),
                    None => out.push(format!("{path}.{k}: dropped (was {wv})")),
                }
            }
            for (k, gv) in g {
                if !w.contains_key(k) {
                    out.push(format!("{path}.{k}: added ({gv})"));
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                differences(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        _ if want == got => {}
        _ => out.push(format!("{path}: {want} became {got}")),
    }
}

/// Parses `doc` as `T` and serializes it back; panics naming `origin` and every
/// differing field unless the result equals `doc`.
fn round_trip<T: DeserializeOwned + Serialize>(origin: &str, doc: &Value) -> T {
    let typed: T = parse(doc).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let back = serde_json::to_value(&typed).expect("generated types serialize");
    let mut diffs = Vec::new();
    differences("$", doc, &back, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{origin}: round trip changed the document:\n  {}",
        diffs.join("\n  ")
    );
    typed
}

#[test]
fn upstream_examples_round_trip_through_the_generated_types() {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (origin, doc) in documents() {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match (api_version.as_str(), kind.as_str()) {
            (GROUP_V1, "GatewayClass") => {
                round_trip::<GatewayClass>(&origin, &doc);
            }
            (GROUP_V1, "Gateway") => {
                round_trip::<Gateway>(&origin, &doc);
            }
            (GROUP_V1, "HTTPRoute") => {
                round_trip::<HttpRoute>(&origin, &doc);
            }
            (GROUP_V1, "GRPCRoute") => {
                round_trip::<GrpcRoute>(&origin, &doc);
            }
            (GROUP_V1, "BackendTLSPolicy") => {
                round_trip::<BackendTlsPolicy>(&origin, &doc);
            }
            (GROUP_V1, "ReferenceGrant") => {
                round_trip::<referencegrants_v1::ReferenceGrant>(&origin, &doc);
                // The examples of this release write ReferenceGrant as v1 only; v1beta1
                // has the same schema, so the same document is read as v1beta1 too.
                let mut beta = doc.clone();
                beta["apiVersion"] = json!(GROUP_V1BETA1);
                round_trip::<referencegrants::ReferenceGrant>(&origin, &beta);
                *counts.entry("ReferenceGrant v1beta1".into()).or_default() += 1;
            }
            (_, kind) if NOT_GENERATED.contains(&kind) => {
                *counts.entry("(not generated)".into()).or_default() += 1;
                continue;
            }
            _ => panic!("{origin}: unexpected {api_version} {kind}"),
        }
        *counts.entry(kind).or_default() += 1;
    }

    // What the examples hold, as floors: a lost file or a parser that stops early fails
    // here instead of passing on nothing.
    let floors = [
        ("GatewayClass", 4),
        ("Gateway", 22),
        ("HTTPRoute", 48),
        ("GRPCRoute", 7),
        ("ReferenceGrant", 3),
        ("ReferenceGrant v1beta1", 3),
        ("BackendTLSPolicy", 2),
        ("(not generated)", 5),
    ];
    for (kind, floor) in floors {
        let n = counts.get(kind).copied().unwrap_or(0);
        assert!(
            n >= floor,
            "{kind}: read {n} documents, expected at least {floor}; all: {counts:?}"
        );
    }
}

/// The features the translation will lean on come through typed, not only as JSON.
#[test]
fn typed_fields_carry_the_example_values() {
    let docs = documents();
    let find = |file: &str, kind: &str| -> &Value {
        docs.iter()
            .find(|(o, d)| o.starts_with(file) && d["kind"] == kind)
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("{file}: no {kind}"))
    };

    let split: HttpRoute = round_trip(
        "traffic-split-2",
        find("traffic-splitting/traffic-split-2.yaml", "HTTPRoute"),
    );
    let rules = split.spec.rules.as_deref().unwrap_or_default();
    let weights: Vec<Option<i32>> = rules
        .iter()
        .flat_map(|r| r.backend_refs.as_deref().unwrap_or_default())
        .map(|b| b.weight)
        .collect();
    assert_eq!(weights, [Some(90), Some(10)]);

    let gateway: Gateway = round_trip(
        "gateway-namespaces",
        find("http-route-attachment/gateway-namespaces.yaml", "Gateway"),
    );
    let selector = gateway.spec.listeners[0]
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref())
        .and_then(|n| n.selector.as_ref())
        .and_then(|s| s.match_labels.as_ref())
        .expect("allowedRoutes.namespaces.selector.matchLabels");
    assert_eq!(
        selector.get("expose-apps").map(String::as_str),
        Some("true")
    );
}

/// A field of the wrong type fails the whole object, and the error names the field.
#[test]
fn a_wrong_type_fails_with_the_path_of_the_field() {
    let doc = json!({
        "apiVersion": GROUP_V1,
        "kind": "HTTPRoute",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"rules": [{"backendRefs": [{"name": "svc", "port": 80, "weight": "heavy"}]}]},
    });
    let err = parse::<HttpRoute>(&doc).expect_err("a string weight must not parse");
    assert!(
        err.starts_with("at spec.rules[0].backendRefs[0].weight: invalid type: string \"heavy\""),
        "{err}"
    );

    let doc = json!({
        "apiVersion": GROUP_V1,
        "kind": "HTTPRoute",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"rules": [{"matches": [{"path": {"type": "Glob", "value": "/*"}}]}]},
    });
    let err = parse::<HttpRoute>(&doc).expect_err("an unknown path type must not parse");
    assert!(
        err.starts_with("at spec.rules[0].matches[0].path.type: unknown variant `Glob`"),
        "{err}"
    );
}

/// What deserializing does not check, so callers must: it reads any `apiVersion` and
/// `kind` (serializing writes the type's own), and it drops fields the types do not
/// know, such as the experimental channel's `retry` on an HTTPRoute rule.
#[test]
fn kind_version_and_unknown_fields_are_not_checked() {
    let doc = json!({
        "apiVersion": "example.com/v9",
        "kind": "Other",
        "metadata": {"name": "x"},
        "spec": {"rules": [{"retry": {"attempts": 2}}]},
    });
    let route: HttpRoute = parse(&doc).expect("kind and unknown fields are not checked");
    let back = serde_json::to_value(&route).expect("serializes");
    let mut diffs = Vec::new();
    differences("$", &doc, &back, &mut diffs);
    assert_eq!(
        diffs,
        [
            r#"$.apiVersion: "example.com/v9" became "gateway.networking.k8s.io/v1""#,
            r#"$.kind: "Other" became "HTTPRoute""#,
            r#"$.spec.rules[0].retry: dropped (was {"attempts":2})"#,
        ]
    );
}
