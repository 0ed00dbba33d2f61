//! Translation from Kubernetes objects to a routing snapshot, through `k8s::build` and
//! `Snapshot::decide`: path and host matching as the Ingress spec defines it, backend
//! resolution, default backends, conflicts, class selection, TLS Secrets and bad input.
//!
//! Objects are made by small builders below (`ingress("ns", "web").host("foo.com")
//! .prefix("/", "svc", 80)`), deserialised into the k8s-openapi types the watchers
//! produce, and certificates are generated at run time with rcgen.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use portcullis::k8s::translate::ServiceRef;
use portcullis::k8s::{Inputs, Options, build};
use portcullis::model::{
    Decision, Diagnostic, HostMatch, ObjectRef, PortRef, Severity, Snapshot, Upstream, request_host,
};

const OURS: &str = "portcullis.io/ingress-controller";

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

/// A backend port: by number or by name.
enum Port {
    Number(i32),
    Name(&'static str),
}

impl From<i32> for Port {
    fn from(n: i32) -> Port {
        Port::Number(n)
    }
}

impl From<&'static str> for Port {
    fn from(s: &'static str) -> Port {
        Port::Name(s)
    }
}

fn backend(service: &str, port: impl Into<Port>) -> Value {
    let port = match port.into() {
        Port::Number(n) => json!({ "number": n }),
        Port::Name(s) => json!({ "name": s }),
    };
    json!({ "service": { "name": service, "port": port } })
}

struct IngressBuilder {
    namespace: String,
    name: String,
    class: Option<String>,
    annotations: BTreeMap<String, String>,
    created: Option<String>,
    rules: Vec<Value>,
    default_backend: Option<Value>,
    tls: Vec<Value>,
}

fn ingress(namespace: &str, name: &str) -> IngressBuilder {
    IngressBuilder {
        namespace: namespace.into(),
        name: name.into(),
        class: None,
        annotations: BTreeMap::new(),
        created: None,
        rules: Vec::new(),
        default_backend: None,
        tls: Vec::new(),
    }
}

impl IngressBuilder {
    fn class(mut self, class: &str) -> Self {
        self.class = Some(class.into());
        self
    }

    fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// creationTimestamp, RFC 3339.
    fn created(mut self, ts: &str) -> Self {
        self.created = Some(ts.into());
        self
    }

    /// Starts a rule for `host`; the paths that follow belong to it.
    fn host(mut self, host: &str) -> Self {
        self.rules
            .push(json!({ "host": host, "http": { "paths": [] } }));
        self
    }

    /// Starts a rule without host.
    fn any_host(mut self) -> Self {
        self.rules.push(json!({ "http": { "paths": [] } }));
        self
    }

    /// A rule with neither host nor http.
    fn empty_rule(mut self) -> Self {
        self.rules.push(json!({}));
        self
    }

    fn path(mut self, path_type: &str, path: &str, service: &str, port: impl Into<Port>) -> Self {
        if self.rules.is_empty() {
            self = self.any_host();
        }
        let rule = self.rules.last_mut().unwrap();
        rule["http"]["paths"].as_array_mut().unwrap().push(json!({
            "path": path,
            "pathType": path_type,
            "backend": backend(service, port),
        }));
        self
    }

    fn prefix(self, path: &str, service: &str, port: impl Into<Port>) -> Self {
        self.path("Prefix", path, service, port)
    }

    fn exact(self, path: &str, service: &str, port: impl Into<Port>) -> Self {
        self.path("Exact", path, service, port)
    }

    fn default_backend(mut self, service: &str, port: impl Into<Port>) -> Self {
        self.default_backend = Some(backend(service, port));
        self
    }

    fn tls(mut self, hosts: &[&str], secret: &str) -> Self {
        self.tls
            .push(json!({ "hosts": hosts, "secretName": secret }));
        self
    }

    fn build(self) -> Arc<Ingress> {
        let mut spec = json!({ "rules": self.rules, "tls": self.tls });
        if let Some(class) = self.class {
            spec["ingressClassName"] = json!(class);
        }
        if let Some(b) = self.default_backend {
            spec["defaultBackend"] = b;
        }
        let mut meta = json!({
            "namespace": self.namespace,
            "name": self.name,
            "annotations": self.annotations,
        });
        if let Some(ts) = self.created {
            meta["creationTimestamp"] = json!(ts);
        }
        let v = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": meta,
            "spec": spec,
        });
        Arc::new(serde_json::from_value(v).expect("fixture Ingress deserialises"))
    }
}

struct ServiceBuilder {
    namespace: String,
    name: String,
    ports: Vec<Value>,
    external_name: Option<String>,
}

fn service(namespace: &str, name: &str) -> ServiceBuilder {
    ServiceBuilder {
        namespace: namespace.into(),
        name: name.into(),
        ports: Vec::new(),
        external_name: None,
    }
}

impl ServiceBuilder {
    /// An unnamed port with a numeric targetPort.
    fn port(mut self, port: i32, target: i32) -> Self {
        self.ports
            .push(json!({ "port": port, "targetPort": target, "protocol": "TCP" }));
        self
    }

    /// A named port; `target` is a number or a container port name.
    fn named_port(mut self, name: &str, port: i32, target: Value) -> Self {
        self.ports
            .push(json!({ "name": name, "port": port, "targetPort": target, "protocol": "TCP" }));
        self
    }

    /// Sets appProtocol on the last port.
    fn app_protocol(mut self, proto: &str) -> Self {
        let last = self.ports.last_mut().expect("a port first");
        last["appProtocol"] = json!(proto);
        self
    }

    fn external_name(mut self, host: &str) -> Self {
        self.external_name = Some(host.into());
        self
    }

    fn build(self) -> Arc<Service> {
        let mut spec = json!({ "ports": self.ports });
        match self.external_name {
            Some(h) => {
                spec["type"] = json!("ExternalName");
                spec["externalName"] = json!(h);
            }
            None => spec["type"] = json!("ClusterIP"),
        }
        let v = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": self.namespace, "name": self.name },
            "spec": spec,
        });
        Arc::new(serde_json::from_value(v).expect("fixture Service deserialises"))
    }
}

struct SliceBuilder {
    namespace: String,
    name: String,
    service: String,
    address_type: String,
    ports: Vec<Value>,
    endpoints: Vec<Value>,
}

/// An EndpointSlice of `service`, named `service-abc` as the controller would.
fn slice(namespace: &str, service: &str) -> SliceBuilder {
    SliceBuilder {
        namespace: namespace.into(),
        name: format!("{service}-abc"),
        service: service.into(),
        address_type: "IPv4".into(),
        ports: Vec::new(),
        endpoints: Vec::new(),
    }
}

impl SliceBuilder {
    fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// `addressType` (`IPv4` unless set).
    fn address_type(mut self, address_type: &str) -> Self {
        self.address_type = address_type.into();
        self
    }

    /// A port; `name` as the Service port's name (`None` for an unnamed one).
    fn port(mut self, name: Option<&str>, port: i32) -> Self {
        let mut p = json!({ "port": port, "protocol": "TCP" });
        if let Some(n) = name {
            p["name"] = json!(n);
        }
        self.ports.push(p);
        self
    }

    fn endpoint(mut self, ip: &str, ready: bool, serving: bool, terminating: bool) -> Self {
        self.endpoints.push(json!({
            "addresses": [ip],
            "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
        }));
        self
    }

    fn ready(self, ip: &str) -> Self {
        self.endpoint(ip, true, true, false)
    }

    fn build(self) -> Arc<EndpointSlice> {
        let v = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": self.namespace,
                "name": self.name,
                "labels": { "kubernetes.io/service-name": self.service },
            },
            "addressType": self.address_type,
            "ports": self.ports,
            "endpoints": self.endpoints,
        });
        Arc::new(serde_json::from_value(v).expect("fixture EndpointSlice deserialises"))
    }
}

fn class(name: &str, controller: &str, default: bool) -> Arc<IngressClass> {
    let mut meta = json!({ "name": name });
    if default {
        meta["annotations"] = json!({ "ingressclass.kubernetes.io/is-default-class": "true" });
    }
    let v = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "IngressClass",
        "metadata": meta,
        "spec": { "controller": controller },
    });
    Arc::new(serde_json::from_value(v).expect("fixture IngressClass deserialises"))
}

fn secret_with(namespace: &str, name: &str, crt: &[u8], key: &[u8]) -> Arc<Secret> {
    let mut data = BTreeMap::new();
    data.insert("tls.crt".to_string(), ByteString(crt.to_vec()));
    data.insert("tls.key".to_string(), ByteString(key.to_vec()));
    Arc::new(Secret {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    })
}

/// A certificate and key in PEM, for these DNS names, made now.
fn cert_pem(hosts: &[&str]) -> (String, String) {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen makes a certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// A valid `kubernetes.io/tls` Secret for `hosts`.
fn tls_secret(namespace: &str, name: &str, hosts: &[&str]) -> Arc<Secret> {
    let (crt, key) = cert_pem(hosts);
    secret_with(namespace, name, crt.as_bytes(), key.as_bytes())
}

/// The objects of one build. `World::new()` has our IngressClass `portcullis` marked as
/// the default, as a typical installation does; `World::bare()` has no class at all.
#[derive(Default)]
struct World {
    inputs: Inputs,
}

impl World {
    fn new() -> World {
        World::bare().class(class("portcullis", OURS, true))
    }

    fn bare() -> World {
        World::default()
    }

    fn ing(mut self, i: IngressBuilder) -> Self {
        self.inputs.ingresses.push(i.build());
        self
    }

    fn svc(mut self, s: ServiceBuilder) -> Self {
        self.inputs.services.push(s.build());
        self
    }

    fn slice(mut self, s: SliceBuilder) -> Self {
        self.inputs.endpoint_slices.push(s.build());
        self
    }

    fn class(mut self, c: Arc<IngressClass>) -> Self {
        self.inputs.ingress_classes.push(c);
        self
    }

    fn secret(mut self, s: Arc<Secret>) -> Self {
        self.inputs.secrets.push(s);
        self
    }

    /// A Service `name` with port 80 → 8080 and one ready endpoint.
    fn backend(self, namespace: &str, name: &str, ip: &str) -> Self {
        self.svc(service(namespace, name).port(80, 8080))
            .slice(slice(namespace, name).port(None, 8080).ready(ip))
    }

    fn build(&self) -> Snapshot {
        build(&self.inputs, &Options::default())
    }

    fn build_with(&self, options: &Options) -> Snapshot {
        build(&self.inputs, options)
    }
}

// ---------------------------------------------------------------------------------------
// Helpers on results
// ---------------------------------------------------------------------------------------

/// What a request gets, in one comparable string:
/// `ns/name rules[R].paths[P] (Type /path) host=exact` for a route,
/// `default ns/svc:port` for the default backend, `404` for nothing.
fn outcome(snap: &Snapshot, host: Option<&str>, path: &str) -> String {
    match snap.decide(host, path) {
        Decision::Route(m) => format!(
            "{} rules[{}].paths[{}] ({} {}) host={}",
            m.route.source.object,
            m.route.source.rule,
            m.route.source.match_index,
            m.route.path.path_type,
            m.route.path.path,
            m.host_match
        ),
        Decision::DefaultBackend(c) => format!("default {}", c.display_name()),
        Decision::NotFound => "404".into(),
    }
}

/// The rule path a request takes, as `Type /path`, or `None`.
fn matched_path(snap: &Snapshot, host: &str, path: &str) -> Option<String> {
    match snap.decide(Some(host), path) {
        Decision::Route(m) => Some(format!("{} {}", m.route.path.path_type, m.route.path.path)),
        _ => None,
    }
}

/// The cluster a request reaches (route or default backend).
fn cluster_of<'a>(snap: &'a Snapshot, host: &str, path: &str) -> &'a portcullis::model::Cluster {
    match snap.decide(Some(host), path) {
        Decision::Route(m) => snap.route_cluster(m.route).expect("the route forwards"),
        Decision::DefaultBackend(c) => c,
        Decision::NotFound => panic!("{host}{path} is not routed"),
    }
}

fn active(snap: &Snapshot, host: &str, path: &str) -> Vec<String> {
    cluster_of(snap, host, path)
        .active_endpoints()
        .iter()
        .map(SocketAddr::to_string)
        .collect()
}

/// The one diagnostic about `kind` `ns/name` whose field contains `field`; panics with
/// every diagnostic when there is none.
#[track_caller]
fn diag<'a>(snap: &'a Snapshot, kind: &str, obj: &str, field: &str) -> &'a Diagnostic {
    let (ns, name) = obj.split_once('/').unwrap();
    snap.diagnostics
        .iter()
        .find(|d| d.kind == kind && d.namespace == ns && d.name == name && d.field.contains(field))
        .unwrap_or_else(|| {
            panic!(
                "no diagnostic for {kind} {obj} field {field}; have:\n{}",
                snap.diagnostics
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

#[track_caller]
fn no_diagnostics(snap: &Snapshot) {
    assert!(
        snap.diagnostics.is_empty(),
        "unexpected diagnostics:\n{}",
        snap.diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn ignored_reason<'a>(snap: &'a Snapshot, obj: &str) -> Option<&'a str> {
    let (ns, name) = obj.split_once('/').unwrap();
    snap.ignored
        .iter()
        .find(|i| i.namespace == ns && i.name == name)
        .map(|i| i.reason.as_str())
}

// ---------------------------------------------------------------------------------------
// Paths: the kubernetes.io Ingress documentation examples
// ---------------------------------------------------------------------------------------

/// One row of the "Examples" table of the Ingress concept page: rules (type, path) in
/// one Ingress, a request path, and the rule it takes (`None`: no rule matches).
struct PathCase {
    rules: &'static [(&'static str, &'static str)],
    request: &'static str,
    want: Option<&'static str>,
}

const fn case(
    rules: &'static [(&'static str, &'static str)],
    request: &'static str,
    want: Option<&'static str>,
) -> PathCase {
    PathCase {
        rules,
        request,
        want,
    }
}

const PATH_CASES: &[PathCase] = &[
    // Prefix `/` matches every path.
    case(&[("Prefix", "/")], "/", Some("Prefix /")),
    case(&[("Prefix", "/")], "/aaa", Some("Prefix /")),
    case(&[("Prefix", "/")], "/aaa/bbb/", Some("Prefix /")),
    // Exact is the whole path, case-sensitive, no trailing-slash tolerance.
    case(&[("Exact", "/foo")], "/foo", Some("Exact /foo")),
    case(&[("Exact", "/foo")], "/bar", None),
    case(&[("Exact", "/foo")], "/foo/", None),
    case(&[("Exact", "/foo")], "/FOO", None),
    case(&[("Exact", "/foo/")], "/foo", None),
    case(&[("Exact", "/foo/")], "/foo/", Some("Exact /foo/")),
    // A Prefix rule's trailing slash is ignored.
    case(
        &[("Prefix", "/foo"), ("Prefix", "/foo/")],
        "/foo",
        Some("Prefix /foo"),
    ),
    case(
        &[("Prefix", "/foo"), ("Prefix", "/foo/")],
        "/foo/",
        Some("Prefix /foo"),
    ),
    case(&[("Prefix", "/foo/")], "/foo", Some("Prefix /foo/")),
    case(&[("Prefix", "/foo/")], "/foo/", Some("Prefix /foo/")),
    // Element-wise: `/aaa/bb` is not a prefix of `/aaa/bbb`.
    case(&[("Prefix", "/aaa/bb")], "/aaa/bbb", None),
    case(
        &[("Prefix", "/aaa/bbb")],
        "/aaa/bbb",
        Some("Prefix /aaa/bbb"),
    ),
    case(
        &[("Prefix", "/aaa/bbb")],
        "/aaa/bbb/",
        Some("Prefix /aaa/bbb"),
    ),
    case(
        &[("Prefix", "/aaa/bbb")],
        "/aaa/bbb/ccc",
        Some("Prefix /aaa/bbb"),
    ),
    case(&[("Prefix", "/aaa/bbb")], "/aaa/bbbxyz", None),
    case(
        &[("Prefix", "/aaa/bbb/")],
        "/aaa/bbb",
        Some("Prefix /aaa/bbb/"),
    ),
    // Longest path wins.
    case(
        &[("Prefix", "/"), ("Prefix", "/aaa")],
        "/aaa/ccc",
        Some("Prefix /aaa"),
    ),
    case(
        &[("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
        "/aaa/bbb",
        Some("Prefix /aaa/bbb"),
    ),
    case(
        &[("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
        "/ccc",
        Some("Prefix /"),
    ),
    // No rule: the default backend answers.
    case(&[("Prefix", "/aaa")], "/ccc", None),
    // Equal length: Exact beats Prefix, whatever the rule order.
    case(
        &[("Prefix", "/foo"), ("Exact", "/foo")],
        "/foo",
        Some("Exact /foo"),
    ),
    case(
        &[("Exact", "/foo"), ("Prefix", "/foo")],
        "/foo",
        Some("Exact /foo"),
    ),
    case(
        &[("Prefix", "/foo"), ("Exact", "/foo")],
        "/foo/x",
        Some("Prefix /foo"),
    ),
    // ImplementationSpecific behaves as Prefix.
    case(
        &[("ImplementationSpecific", "/foo")],
        "/foo/bar",
        Some("ImplementationSpecific /foo"),
    ),
    case(&[("ImplementationSpecific", "/foo")], "/foobar", None),
    // The table compares paths byte for byte: no decoding, no normalising, no query.
    // (The proxy normalises request and rule paths first; `--path-normalization off`
    // leaves both as written, which is what these cases build with.)
    case(&[("Prefix", "/a%2Fb")], "/a/b", None),
    case(&[("Prefix", "/a/b")], "/a%2Fb", None),
    case(&[("Prefix", "/a%20b")], "/a%20b/c", Some("Prefix /a%20b")),
    case(&[("Prefix", "/aaa")], "/aaa/../bbb", Some("Prefix /aaa")),
    // Braces and stars are plain characters, not router syntax.
    case(&[("Prefix", "/{id}")], "/{id}/x", Some("Prefix /{id}")),
    case(&[("Prefix", "/{id}")], "/123", None),
    case(&[("Exact", "/*")], "/anything", None),
];

#[test]
fn kubernetes_docs_path_examples() {
    let mut failures = Vec::new();
    for (i, c) in PATH_CASES.iter().enumerate() {
        let mut ing = ingress("ns", "paths").host("foo.com");
        for (t, p) in c.rules {
            ing = ing.path(t, p, "svc", 80);
        }
        let snap = World::new()
            .backend("ns", "svc", "10.0.0.1")
            .ing(ing)
            .build_with(&Options {
                normalize_paths: false,
                ..Options::default()
            });
        // `Prefix /foo` + `Prefix /foo/` overlap; every other case builds cleanly.
        if !c.rules.contains(&("Prefix", "/foo/")) || c.rules.len() == 1 {
            no_diagnostics(&snap);
        }
        let got = matched_path(&snap, "foo.com", c.request);
        if got.as_deref() != c.want {
            failures.push(format!(
                "case {i}: rules {:?} request {} → got {got:?}, want {:?}",
                c.rules, c.request, c.want
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn no_matching_rule_falls_to_default_backend_then_404() {
    let world = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .backend("ns", "fallback", "10.0.0.2")
        .ing(ingress("ns", "only-aaa").prefix("/aaa", "svc", 80));
    assert_eq!(outcome(&world.build(), Some("foo.com"), "/ccc"), "404");

    let world = world.ing(
        ingress("ns", "dflt")
            .created("2024-01-01T00:00:00Z")
            .default_backend("fallback", 80),
    );
    assert_eq!(
        outcome(&world.build(), Some("foo.com"), "/ccc"),
        "default ns/fallback:80"
    );
}

// ---------------------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------------------

fn host_world() -> World {
    World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "exact")
                .host("foo.example.com")
                .prefix("/api", "svc", 80),
        )
        .ing(
            ingress("ns", "wild")
                .host("*.example.com")
                .prefix("/api/v1", "svc", 80)
                .prefix("/static", "svc", 80),
        )
        .ing(ingress("ns", "any").any_host().prefix("/", "svc", 80))
}

#[test]
fn host_cases() {
    let snap = host_world().build();
    no_diagnostics(&snap);
    let cases: &[(Option<&str>, &str, &str)] = &[
        // The exact virtual host wins over a longer wildcard path.
        (
            Some("foo.example.com"),
            "/api/v1/x",
            "ns/exact rules[0].paths[0] (Prefix /api) host=exact",
        ),
        // The exact virtual host has no `/static`: fall through to the wildcard…
        (
            Some("foo.example.com"),
            "/static/app.js",
            "ns/wild rules[0].paths[1] (Prefix /static) host=wildcard",
        ),
        // …and to the host-less rule when the wildcard has nothing either.
        (
            Some("foo.example.com"),
            "/other",
            "ns/any rules[0].paths[0] (Prefix /) host=any",
        ),
        // A wildcard covers exactly one label.
        (
            Some("bar.example.com"),
            "/api/v1",
            "ns/wild rules[0].paths[0] (Prefix /api/v1) host=wildcard",
        ),
        (
            Some("a.bar.example.com"),
            "/api/v1",
            "ns/any rules[0].paths[0] (Prefix /) host=any",
        ),
        (
            Some("example.com"),
            "/static",
            "ns/any rules[0].paths[0] (Prefix /) host=any",
        ),
        // No host at all: only host-less rules.
        (None, "/api", "ns/any rules[0].paths[0] (Prefix /) host=any"),
    ];
    for (host, path, want) in cases {
        assert_eq!(&outcome(&snap, *host, path), want, "{host:?} {path}");
    }
}

#[test]
fn hosts_are_case_insensitive() {
    let snap = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "upper")
                .host("Foo.Example.COM")
                .exact("/", "svc", 80),
        )
        .ing(
            ingress("ns", "wild")
                .host("*.Bar.com")
                .exact("/", "svc", 80),
        )
        .build();
    for (authority, header, want) in [
        (None, Some("FOO.example.com"), "ns/upper"),
        (None, Some("foo.EXAMPLE.com:8080"), "ns/upper"),
        (Some("Foo.Example.Com."), None, "ns/upper"),
        (None, Some("X.BAR.COM"), "ns/wild"),
    ] {
        let host = request_host(authority, header).unwrap();
        match snap.decide(host.as_deref(), "/") {
            Decision::Route(m) => assert_eq!(m.route.source.object.to_string(), want),
            other => panic!("{authority:?} {header:?}: {other:?}"),
        }
    }
}

#[test]
fn without_host_rules_nothing_but_host_less_rules_match() {
    let snap = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(ingress("ns", "h").host("foo.com").prefix("/", "svc", 80))
        .build();
    assert_eq!(outcome(&snap, None, "/"), "404");
    assert_eq!(outcome(&snap, Some("bar.com"), "/"), "404");
}

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

#[test]
fn port_by_number_and_by_name_with_named_target_port() {
    let snap = World::new()
        .svc(
            service("ns", "web")
                .named_port("http", 80, json!("web-http"))
                .named_port("grpc", 9000, json!(9090))
                .app_protocol("kubernetes.io/h2c"),
        )
        .slice(
            slice("ns", "web")
                .port(Some("http"), 8080)
                .port(Some("grpc"), 9090)
                .ready("10.0.0.1")
                .ready("10.0.0.2"),
        )
        .ing(
            ingress("ns", "ing")
                .host("foo.com")
                .prefix("/by-number", "web", 80)
                .prefix("/by-name", "web", "http")
                .prefix("/grpc", "web", "grpc"),
        )
        .build();
    no_diagnostics(&snap);
    assert_eq!(
        active(&snap, "foo.com", "/by-number"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert_eq!(
        active(&snap, "foo.com", "/by-name"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    let by_name = cluster_of(&snap, "foo.com", "/by-name");
    assert_eq!(by_name.service_port, Some(80));
    assert_eq!(by_name.port, PortRef::Name("http".into()));
    assert_eq!(by_name.app_protocol, None);

    let grpc = cluster_of(&snap, "foo.com", "/grpc");
    assert_eq!(grpc.service_port, Some(9000));
    assert_eq!(grpc.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
    assert_eq!(
        active(&snap, "foo.com", "/grpc"),
        ["10.0.0.1:9090", "10.0.0.2:9090"]
    );
}

#[test]
fn ready_endpoints_first_then_serving_and_terminating() {
    let world = |eps: &[(&str, bool, bool, bool)]| {
        let mut s = slice("ns", "svc").port(None, 8080);
        for (ip, ready, serving, terminating) in eps {
            s = s.endpoint(ip, *ready, *serving, *terminating);
        }
        World::new()
            .svc(service("ns", "svc").port(80, 8080))
            .slice(s)
            .ing(ingress("ns", "ing").host("foo.com").prefix("/", "svc", 80))
            .build()
    };
    // Ready ones are used; a serving-but-terminating one is not while some are ready.
    let snap = world(&[
        ("10.0.0.1", true, true, false),
        ("10.0.0.2", false, true, true),
        ("10.0.0.3", false, false, false),
    ]);
    assert_eq!(active(&snap, "foo.com", "/"), ["10.0.0.1:8080"]);
    match &cluster_of(&snap, "foo.com", "/").upstream {
        Upstream::Endpoints { all, .. } => assert_eq!(all.len(), 3),
        other => panic!("{other:?}"),
    }

    // None ready: the serving ones, terminating included (rolling update).
    let snap = world(&[
        ("10.0.0.2", false, true, true),
        ("10.0.0.3", false, false, false),
        ("10.0.0.4", false, true, false),
    ]);
    assert_eq!(
        active(&snap, "foo.com", "/"),
        ["10.0.0.2:8080", "10.0.0.4:8080"]
    );
    no_diagnostics(&snap);

    // Nothing ready or serving: the route stays and answers 503, with a diagnostic.
    let snap = world(&[("10.0.0.3", false, false, false)]);
    assert!(active(&snap, "foo.com", "/").is_empty());
    let d = diag(&snap, "Ingress", "ns/ing", "spec.rules[0].http.paths[0]");
    assert!(d.reason.contains("no ready or serving endpoints"), "{d}");
}

#[test]
fn endpoints_from_several_slices_are_merged() {
    let snap = World::new()
        .svc(service("ns", "svc").port(80, 8080))
        .slice(
            slice("ns", "svc")
                .named("svc-1")
                .port(None, 8080)
                .ready("10.0.0.1"),
        )
        .slice(
            slice("ns", "svc")
                .named("svc-2")
                .port(None, 8080)
                .ready("10.0.0.2"),
        )
        // Another namespace's slice with the same Service name is not ours.
        .slice(slice("other", "svc").port(None, 8080).ready("10.9.9.9"))
        .svc(service("other", "svc").port(80, 8080))
        .ing(ingress("ns", "ing").host("foo.com").prefix("/", "svc", 80))
        .build();
    assert_eq!(
        active(&snap, "foo.com", "/"),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
}

#[test]
fn external_name_service() {
    let snap = World::new()
        .svc(
            service("ns", "ext")
                .named_port("https", 443, json!(8443))
                .external_name("api.example.net"),
        )
        .svc(service("ns", "bare").external_name("db.example.net"))
        .ing(
            ingress("ns", "ing")
                .host("foo.com")
                .prefix("/named", "ext", "https")
                .prefix("/number", "ext", 443)
                .prefix("/portless", "bare", 5432),
        )
        .build();
    no_diagnostics(&snap);
    let want = |path, host: &str, port| {
        assert_eq!(
            cluster_of(&snap, "foo.com", path).upstream,
            Upstream::ExternalName {
                host: host.into(),
                port
            },
            "{path}"
        );
    };
    // The Service `port`, not the targetPort.
    want("/named", "api.example.net", 443);
    want("/number", "api.example.net", 443);
    want("/portless", "db.example.net", 5432);
}

#[test]
fn external_name_pointing_at_loopback_is_refused_in_kubernetes_mode() {
    let world = World::new()
        .svc(service("ns", "ext").port(80, 80).external_name("localhost"))
        .ing(ingress("ns", "ing").host("foo.com").prefix("/", "ext", 80));
    let snap = world.build();
    assert!(matches!(
        cluster_of(&snap, "foo.com", "/").upstream,
        Upstream::Unresolved { .. }
    ));
    diag(
        &snap,
        "Ingress",
        "ns/ing",
        "spec.rules[0].http.paths[0].backend",
    );

    let file_mode = Options {
        allow_local_endpoints: true,
        ..Options::default()
    };
    let snap = world.build_with(&file_mode);
    assert!(matches!(
        cluster_of(&snap, "foo.com", "/").upstream,
        Upstream::ExternalName { .. }
    ));
}

#[test]
fn missing_service_keeps_the_route_and_becomes_servable_when_it_appears() {
    let world = World::new()
        .backend("ns", "other", "10.0.0.9")
        .ing(
            ingress("ns", "ing")
                .host("foo.com")
                .prefix("/", "later", 80),
        )
        .ing(
            ingress("ns", "fine")
                .host("bar.com")
                .prefix("/", "other", 80),
        );
    let snap = world.build();
    // Route kept: the request is routed (to a cluster that answers 503), not a 404.
    let c = cluster_of(&snap, "foo.com", "/x");
    assert_eq!(c.service, ObjectRef::new("ns", "later"));
    assert!(c.active_endpoints().is_empty());
    assert!(matches!(&c.upstream, Upstream::Unresolved { reason } if reason.contains("not found")));
    let d = diag(
        &snap,
        "Ingress",
        "ns/ing",
        "spec.rules[0].http.paths[0].backend",
    );
    assert_eq!(d.severity, Severity::Error);
    assert!(d.reason.contains("Service ns/later not found"), "{d}");
    assert_eq!(active(&snap, "bar.com", "/"), ["10.0.0.9:8080"]);

    let snap = world.backend("ns", "later", "10.0.0.1").build();
    no_diagnostics(&snap);
    assert_eq!(active(&snap, "foo.com", "/x"), ["10.0.0.1:8080"]);
}

#[test]
fn unresolvable_backends_keep_their_routes() {
    let snap = World::new()
        .svc(service("ns", "noslice").port(80, 8080))
        .svc(service("ns", "web").named_port("http", 80, json!(8080)))
        .slice(
            slice("ns", "web")
                .port(Some("http"), 8080)
                .ready("10.0.0.1"),
        )
        .ing(
            ingress("ns", "ing")
                .host("foo.com")
                .prefix("/no-slice", "noslice", 80)
                .prefix("/bad-name", "web", "nope")
                .prefix("/bad-number", "web", 81)
                .prefix("/ok", "web", "http"),
        )
        .build();
    for (i, path, reason) in [
        (0, "/no-slice", "no ready or serving endpoints"),
        (1, "/bad-name", "has no port named nope"),
        (2, "/bad-number", "has no port 81"),
    ] {
        let c = cluster_of(&snap, "foo.com", path);
        assert!(c.active_endpoints().is_empty(), "{path}");
        let d = diag(&snap, "Ingress", "ns/ing", &format!("paths[{i}].backend"));
        assert!(d.reason.contains(reason), "{path}: {d}");
    }
    assert_eq!(active(&snap, "foo.com", "/ok"), ["10.0.0.1:8080"]);
}

#[test]
fn loopback_and_link_local_endpoints_are_refused_unless_allowed() {
    let world = World::new()
        .svc(service("ns", "svc").port(80, 8080))
        .slice(
            slice("ns", "svc")
                .port(None, 8080)
                .ready("127.0.0.1")
                .ready("169.254.169.254")
                .ready("0.0.0.0")
                .ready("10.0.0.1"),
        )
        .ing(ingress("ns", "ing").host("foo.com").prefix("/", "svc", 80));
    let snap = world.build();
    assert_eq!(active(&snap, "foo.com", "/"), ["10.0.0.1:8080"]);
    let refused: Vec<&Diagnostic> = snap
        .diagnostics
        .iter()
        .filter(|d| d.kind == "EndpointSlice" && d.name == "svc-abc")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused.iter().any(|d| d.reason.contains("127.0.0.1:8080")));
    assert!(
        refused
            .iter()
            .any(|d| d.reason.contains("169.254.169.254:8080"))
    );

    let file_mode = Options {
        allow_local_endpoints: true,
        ..Options::default()
    };
    let snap = world.build_with(&file_mode);
    assert_eq!(active(&snap, "foo.com", "/").len(), 4);
}

#[test]
fn ipv4_mapped_local_addresses_are_refused_as_the_ipv4_they_map() {
    let world = World::new()
        .svc(service("ns", "svc").port(80, 8080))
        .slice(
            slice("ns", "svc")
                .address_type("IPv6")
                .port(None, 8080)
                .ready("::ffff:127.0.0.1")
                .ready("::ffff:169.254.169.254")
                .ready("::ffff:0.0.0.0")
                .ready("::ffff:10.0.0.1")
                .ready("2001:db8::1"),
        )
        .ing(ingress("ns", "ing").host("foo.com").prefix("/", "svc", 80));
    let snap = world.build();
    assert_eq!(
        active(&snap, "foo.com", "/"),
        ["[::ffff:10.0.0.1]:8080", "[2001:db8::1]:8080"]
    );
    let refused: Vec<&Diagnostic> = snap
        .diagnostics
        .iter()
        .filter(|d| d.kind == "EndpointSlice" && d.name == "svc-abc")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    for ip in [
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
    ] {
        assert!(
            refused
                .iter()
                .any(|d| d.reason.contains(&format!("[{ip}]:8080")) && d.field == "endpoints"),
            "{ip}: {refused:?}"
        );
    }

    // Our own listener on 0.0.0.0 covers its mapped loopback address too.
    let own = Options {
        allow_local_endpoints: true,
        own_addresses: vec!["0.0.0.0:8080".parse().unwrap()],
        ..Options::default()
    };
    let snap = world.build_with(&own);
    assert_eq!(active(&snap, "foo.com", "/").len(), 3);
    let d = diag(&snap, "EndpointSlice", "ns/svc-abc", "endpoints");
    assert!(d.reason.contains("own listeners"), "{d}");
}

#[test]
fn endpoint_addresses_must_match_the_slice_address_type() {
    let snap = World::new()
        .svc(service("ns", "svc").port(80, 8080))
        .slice(
            slice("ns", "svc")
                .named("svc-v4")
                .port(None, 8080)
                .ready("::1")
                .ready("10.0.0.1")
                .ready("2001:db8::2")
                .ready("not-an-ip"),
        )
        .slice(
            slice("ns", "svc")
                .named("svc-v6")
                .address_type("IPv6")
                .port(None, 8080)
                .ready("10.0.0.2")
                .ready("2001:db8::1"),
        )
        .ing(ingress("ns", "ing").host("foo.com").prefix("/", "svc", 80))
        .build();
    assert_eq!(
        active(&snap, "foo.com", "/"),
        ["10.0.0.1:8080", "[2001:db8::1]:8080"]
    );
    for (slice, field, address) in [
        ("ns/svc-v4", "endpoints[0].addresses[0]", "::1"),
        ("ns/svc-v4", "endpoints[2].addresses[0]", "2001:db8::2"),
        ("ns/svc-v4", "endpoints[3].addresses[0]", "not-an-ip"),
        ("ns/svc-v6", "endpoints[0].addresses[0]", "10.0.0.2"),
    ] {
        let d = diag(&snap, "EndpointSlice", slice, field);
        assert!(d.reason.contains(address), "{d}");
        assert!(d.reason.contains("addressType"), "{d}");
    }
}

#[test]
fn external_name_that_is_not_a_dns_name_is_a_diagnostic_and_503() {
    for bad in ["bad name!", "a..b", "::1", "host:80"] {
        let world = World::new()
            .svc(service("ns", "ext").port(80, 80).external_name(bad))
            .ing(ingress("ns", "ing").host("foo.com").prefix("/", "ext", 80));
        // In both modes: a malformed name is no local-development convenience.
        for options in [
            Options::default(),
            Options {
                allow_local_endpoints: true,
                ..Options::default()
            },
        ] {
            let snap = world.build_with(&options);
            let c = cluster_of(&snap, "foo.com", "/");
            assert!(
                matches!(&c.upstream, Upstream::Unresolved { reason } if reason.contains("not a valid DNS name")),
                "{bad}: {:?}",
                c.upstream
            );
            let d = diag(&snap, "Service", "ns/ext", "spec.externalName");
            assert_eq!(d.severity, Severity::Error, "{d}");
            assert!(d.reason.contains(bad), "{d}");
            // The route is kept (and answers 503), with the Ingress told why.
            diag(
                &snap,
                "Ingress",
                "ns/ing",
                "spec.rules[0].http.paths[0].backend",
            );
        }
    }
}

/// An ExternalName written as an address is checked like an endpoint, with the Service
/// port: on one of our listeners' ports it is refused, in file mode too.
#[test]
fn an_external_name_address_at_our_own_listener_is_refused() {
    let options = Options {
        allow_local_endpoints: true,
        own_addresses: vec!["10.0.0.9:8080".parse().expect("address")],
        ..Options::default()
    };
    for (port, refused) in [(8080, true), (9090, false)] {
        let snap = World::new()
            .svc(
                service("ns", "ext")
                    .port(port, port)
                    .external_name("10.0.0.9"),
            )
            .ing(
                ingress("ns", "ing")
                    .host("foo.com")
                    .prefix("/", "ext", port),
            )
            .build_with(&options);
        let c = cluster_of(&snap, "foo.com", "/");
        if refused {
            assert!(
                matches!(&c.upstream, Upstream::Unresolved { reason } if reason.contains("own listeners")),
                "{:?}",
                c.upstream
            );
            let d = diag(&snap, "Service", "ns/ext", "spec.externalName");
            assert_eq!(
                d.reason,
                "10.0.0.9: points at one of Portcullis' own listeners; its routes answer 503"
            );
        } else {
            assert!(
                matches!(&c.upstream, Upstream::ExternalName { host, port: 9090 } if host == "10.0.0.9"),
                "{:?}",
                c.upstream
            );
        }
    }
}

#[test]
fn endpoints_at_our_own_listeners_are_refused() {
    let options = Options {
        allow_local_endpoints: true,
        own_addresses: vec!["0.0.0.0:8080".parse().unwrap()],
        ..Options::default()
    };
    let snap = World::new()
        .svc(service("ns", "svc").port(80, 8080))
        .slice(
            slice("ns", "svc")
                .port(None, 8080)
                .ready("127.0.0.1")
                .ready("10.0.0.1"),
        )
        .ing(ingress("ns", "ing").host("foo.com").prefix("/", "svc", 80))
        .build_with(&options);
    assert_eq!(active(&snap, "foo.com", "/"), ["10.0.0.1:8080"]);
    let d = diag(&snap, "EndpointSlice", "ns/svc-abc", "endpoints");
    assert!(d.reason.contains("own listeners"), "{d}");
}

// ---------------------------------------------------------------------------------------
// Default backend
// ---------------------------------------------------------------------------------------

#[test]
fn default_backend_precedence() {
    let flag = Options {
        default_backend_service: Some("ns/flag:80".parse::<ServiceRef>().unwrap()),
        ..Options::default()
    };
    let base = World::new()
        .backend("ns", "flag", "10.0.0.1")
        .backend("ns", "old", "10.0.0.2")
        .backend("ns", "new", "10.0.0.3")
        .ing(
            ingress("ns", "rules")
                .host("foo.com")
                .exact("/x", "old", 80),
        );

    // Nothing: 404. The flag alone: the flag's Service.
    assert_eq!(outcome(&base.build(), Some("foo.com"), "/"), "404");
    let snap = base.build_with(&flag);
    assert_eq!(outcome(&snap, Some("foo.com"), "/"), "default ns/flag:80");
    assert_eq!(snap.default_backend_source, None);

    // An Ingress' defaultBackend beats the flag; the oldest Ingress wins among them,
    // whatever the input order; the newer one gets a diagnostic.
    for reversed in [false, true] {
        let mut ings = vec![
            ingress("ns", "b-new")
                .created("2024-02-01T00:00:00Z")
                .default_backend("new", 80),
            ingress("ns", "a-old")
                .created("2024-01-01T00:00:00Z")
                .default_backend("old", 80),
        ];
        if reversed {
            ings.reverse();
        }
        let mut world = base.clone_inputs();
        for i in ings {
            world = world.ing(i);
        }
        let snap = world.build_with(&flag);
        assert_eq!(outcome(&snap, Some("foo.com"), "/"), "default ns/old:80");
        assert_eq!(
            snap.default_backend_source,
            Some(ObjectRef::new("ns", "a-old"))
        );
        let d = diag(&snap, "Ingress", "ns/b-new", "spec.defaultBackend");
        assert!(d.reason.contains("ns/a-old"), "{d}");
    }

    // A route still beats the default backend.
    let snap = base.build_with(&flag);
    assert_eq!(
        outcome(&snap, Some("foo.com"), "/x"),
        "ns/rules rules[0].paths[0] (Exact /x) host=exact"
    );
}

#[test]
fn default_backend_flag_to_missing_service_is_a_diagnostic() {
    let options = Options {
        default_backend_service: Some("ns/nowhere:http".parse().unwrap()),
        ..Options::default()
    };
    let snap = World::new().build_with(&options);
    let d = diag(&snap, "Service", "ns/nowhere", "--default-backend-service");
    assert!(d.reason.contains("not found"), "{d}");
    assert!(
        matches!(snap.decide(Some("a.com"), "/"), Decision::DefaultBackend(c) if c.active_endpoints().is_empty())
    );
}

impl World {
    fn clone_inputs(&self) -> World {
        World {
            inputs: self.inputs.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Conflicts
// ---------------------------------------------------------------------------------------

/// Deterministic permutations of a list (a fixed-seed Fisher–Yates shuffle).
fn shuffles<T: Clone>(items: &[T], n: usize) -> Vec<Vec<T>> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = vec![items.to_vec()];
    let mut rev = items.to_vec();
    rev.reverse();
    out.push(rev);
    for _ in 0..n {
        let mut v = items.to_vec();
        for i in (1..v.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        out.push(v);
    }
    out
}

#[test]
fn conflicts_oldest_wins_whatever_the_input_order() {
    let ingresses = vec![
        ingress("ns", "newest")
            .created("2024-03-01T00:00:00Z")
            .host("foo.com")
            .prefix("/app", "c", 80)
            .exact("/only-newest", "c", 80)
            .build(),
        ingress("ns", "oldest")
            .created("2024-01-01T00:00:00Z")
            .host("foo.com")
            .prefix("/app", "a", 80)
            .build(),
        // Same timestamp as `oldest`: namespace/name decides (`ns/oldest` < `ns/twin`).
        ingress("ns", "twin")
            .created("2024-01-01T00:00:00Z")
            .host("foo.com")
            .path("ImplementationSpecific", "/app", "b", 80)
            .build(),
        // Different pathType: not a conflict (and Exact wins on `/app`).
        ingress("ns", "exact")
            .created("2024-04-01T00:00:00Z")
            .host("foo.com")
            .exact("/app", "d", 80)
            .build(),
        // Another host: not a conflict.
        ingress("ns", "other-host")
            .created("2024-05-01T00:00:00Z")
            .host("bar.com")
            .prefix("/app", "c", 80)
            .build(),
    ];
    let base = World::new()
        .backend("ns", "a", "10.0.0.1")
        .backend("ns", "b", "10.0.0.2")
        .backend("ns", "c", "10.0.0.3")
        .backend("ns", "d", "10.0.0.4");

    let mut results = Vec::new();
    for order in shuffles(&ingresses, 6) {
        let mut world = base.clone_inputs();
        world.inputs.ingresses = order;
        let snap = world.build();
        let summary = (
            outcome(&snap, Some("foo.com"), "/app/x"),
            outcome(&snap, Some("foo.com"), "/app"),
            outcome(&snap, Some("foo.com"), "/only-newest"),
            outcome(&snap, Some("bar.com"), "/app"),
            snap.diagnostics.clone(),
            snap.clusters
                .iter()
                .map(|c| c.display_name())
                .collect::<Vec<_>>(),
        );
        results.push(summary);
    }
    let first = &results[0];
    assert_eq!(
        first.0,
        "ns/oldest rules[0].paths[0] (Prefix /app) host=exact"
    );
    assert_eq!(
        first.1,
        "ns/exact rules[0].paths[0] (Exact /app) host=exact"
    );
    assert_eq!(
        first.2,
        "ns/newest rules[0].paths[1] (Exact /only-newest) host=exact"
    );
    assert_eq!(
        first.3,
        "ns/other-host rules[0].paths[0] (Prefix /app) host=exact"
    );
    let losers: Vec<(&str, &str)> = first
        .4
        .iter()
        .map(|d| (d.name.as_str(), d.field.as_str()))
        .collect();
    assert_eq!(
        losers,
        [
            ("newest", "spec.rules[0].http.paths[0]"),
            ("twin", "spec.rules[0].http.paths[0]"),
        ]
    );
    for d in &first.4 {
        assert!(d.reason.contains("older Ingress ns/oldest"), "{d}");
    }
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r, first, "input order {i} gives another result");
    }
}

#[test]
fn duplicate_path_inside_one_ingress_keeps_the_first() {
    let snap = World::new()
        .backend("ns", "a", "10.0.0.1")
        .backend("ns", "b", "10.0.0.2")
        .ing(
            ingress("ns", "dup")
                .host("foo.com")
                .prefix("/app", "a", 80)
                .prefix("/app/", "b", 80),
        )
        .build();
    assert_eq!(active(&snap, "foo.com", "/app"), ["10.0.0.1:8080"]);
    let d = diag(&snap, "Ingress", "ns/dup", "spec.rules[0].http.paths[1]");
    assert!(d.reason.contains("paths[0]"), "{d}");
}

// ---------------------------------------------------------------------------------------
// Ingress classes
// ---------------------------------------------------------------------------------------

fn class_world() -> World {
    World::bare()
        .backend("ns", "svc", "10.0.0.1")
        .class(class("ours", OURS, false))
        .class(class("nginx", "k8s.io/ingress-nginx", false))
        .ing(
            ingress("ns", "by-class")
                .class("ours")
                .host("a.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "other-controller")
                .class("nginx")
                .host("b.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "missing-class")
                .class("gone")
                .host("c.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "legacy")
                .annotation("kubernetes.io/ingress.class", "portcullis")
                .host("d.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "legacy-other")
                .annotation("kubernetes.io/ingress.class", "nginx")
                .host("e.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "classless")
                .host("f.com")
                .prefix("/", "svc", 80),
        )
}

fn served(snap: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = snap
        .routes
        .routes()
        .map(|r| r.source.object.name.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn ingress_class_selection() {
    let snap = class_world().build();
    assert_eq!(served(&snap), ["by-class", "legacy"]);
    assert!(
        ignored_reason(&snap, "ns/other-controller")
            .unwrap()
            .contains("k8s.io/ingress-nginx")
    );
    assert!(
        ignored_reason(&snap, "ns/missing-class")
            .unwrap()
            .contains("gone not found")
    );
    assert!(
        ignored_reason(&snap, "ns/legacy-other")
            .unwrap()
            .contains("kubernetes.io/ingress.class=nginx")
    );
    assert!(
        ignored_reason(&snap, "ns/classless")
            .unwrap()
            .contains("no IngressClass")
    );
    // Ignored Ingresses are not errors: a cluster has other controllers.
    no_diagnostics(&snap);
    assert_eq!(outcome(&snap, Some("b.com"), "/"), "404");

    // A default class of ours takes the class-less Ingress, not the legacy-other one.
    let snap = class_world()
        .class(class("ours-default", OURS, true))
        .build();
    assert_eq!(served(&snap), ["by-class", "classless", "legacy"]);

    // A default class of another controller does not.
    let snap = class_world()
        .class(class("nginx-default", "k8s.io/ingress-nginx", true))
        .build();
    assert_eq!(served(&snap), ["by-class", "legacy"]);

    // --watch-ingress-without-class.
    let options = Options {
        watch_without_class: true,
        ..Options::default()
    };
    let snap = class_world().build_with(&options);
    assert_eq!(served(&snap), ["by-class", "classless", "legacy"]);

    // Another controller name: the roles swap.
    let options = Options {
        controller_name: "k8s.io/ingress-nginx".into(),
        ingress_class: "nginx".into(),
        ..Options::default()
    };
    let snap = class_world().build_with(&options);
    assert_eq!(served(&snap), ["legacy-other", "other-controller"]);
}

#[test]
fn assume_class_in_file_mode() {
    let file_mode = Options {
        assume_class: true,
        allow_local_endpoints: true,
        ..Options::default()
    };
    let world = World::bare()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "named")
                .class("portcullis")
                .host("a.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "classless")
                .host("b.com")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "foreign")
                .class("nginx")
                .host("c.com")
                .prefix("/", "svc", 80),
        );
    // Assumed: `portcullis`, ours and default.
    let snap = world.build_with(&file_mode);
    assert_eq!(served(&snap), ["classless", "named"]);
    assert!(ignored_reason(&snap, "ns/foreign").is_some());

    // Not assumed without the option.
    let snap = world.build();
    assert!(served(&snap).is_empty());

    // Not assumed when the files define a class of ours: then that one decides.
    let snap = world
        .clone_inputs()
        .class(class("mine", OURS, false))
        .build_with(&file_mode);
    assert!(served(&snap).is_empty());
    assert!(
        ignored_reason(&snap, "ns/named")
            .unwrap()
            .contains("portcullis not found")
    );
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

fn tls_world(secret: Arc<Secret>) -> World {
    World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "secure")
                .host("foo.com")
                .prefix("/", "svc", 80)
                .tls(&["foo.com", "*.foo.com"], "foo-tls"),
        )
        .secret(secret)
}

#[test]
fn tls_valid_secret() {
    let snap = tls_world(tls_secret("ns", "foo-tls", &["foo.com", "*.foo.com"])).build();
    no_diagnostics(&snap);
    let cert = snap
        .tls
        .cert_for("foo.com")
        .expect("a certificate for foo.com");
    assert_eq!(cert.secret, ObjectRef::new("ns", "foo-tls"));
    assert_eq!(cert.dns_names, ["foo.com", "*.foo.com"]);
    assert_eq!(cert.sha256.len(), 64);
    assert!(snap.tls.cert_for("a.foo.com").is_some());
    assert!(snap.tls.cert_for("b.a.foo.com").is_none());
    assert!(snap.tls.cert_for("bar.com").is_none());
    // TLS does not change routing.
    assert_eq!(active(&snap, "foo.com", "/"), ["10.0.0.1:8080"]);
}

#[test]
fn tls_hosts_default_to_the_rule_hosts() {
    let snap = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "secure")
                .host("foo.com")
                .prefix("/", "svc", 80)
                .host("bar.com")
                .prefix("/", "svc", 80)
                .tls(&[], "tls"),
        )
        .secret(tls_secret("ns", "tls", &["foo.com", "bar.com"]))
        .build();
    no_diagnostics(&snap);
    assert!(snap.tls.cert_for("foo.com").is_some());
    assert!(snap.tls.cert_for("bar.com").is_some());
}

#[test]
fn tls_garbage_pem_is_a_diagnostic_and_routing_goes_on() {
    let snap = tls_world(secret_with("ns", "foo-tls", b"not a pem", b"nor this")).build();
    let d = diag(&snap, "Secret", "ns/foo-tls", "tls.crt");
    assert_eq!(d.severity, Severity::Error);
    assert!(d.reason.contains("default certificate"), "{d}");
    assert!(snap.tls.cert_for("foo.com").is_none());
    // The host is still a TLS host (served with the default certificate).
    assert!(snap.tls.host_for("foo.com").is_some());
    assert_eq!(active(&snap, "foo.com", "/"), ["10.0.0.1:8080"]);

    // A good certificate with a garbage key.
    let (crt, _) = cert_pem(&["foo.com"]);
    let snap = tls_world(secret_with("ns", "foo-tls", crt.as_bytes(), b"garbage")).build();
    diag(&snap, "Secret", "ns/foo-tls", "tls.key");
}

#[test]
fn tls_key_that_does_not_match_the_certificate() {
    let (crt, _) = cert_pem(&["foo.com"]);
    let (_, other_key) = cert_pem(&["foo.com"]);
    let snap = tls_world(secret_with(
        "ns",
        "foo-tls",
        crt.as_bytes(),
        other_key.as_bytes(),
    ))
    .build();
    let d = diag(&snap, "Secret", "ns/foo-tls", "tls.key");
    assert!(d.reason.contains("does not match"), "{d}");
    assert!(snap.tls.cert_for("foo.com").is_none());
}

#[test]
fn tls_secret_turning_invalid_keeps_the_last_good_certificate() {
    let good = tls_world(tls_secret("ns", "foo-tls", &["foo.com"])).build();
    let good_cert = good.tls.cert_for("foo.com").unwrap().clone();

    let mut world = tls_world(secret_with("ns", "foo-tls", b"broken", b"broken"));
    world.inputs.last_good_certs = good.tls.certs.clone();
    let snap = world.build();
    let kept = snap
        .tls
        .cert_for("foo.com")
        .expect("last good certificate kept");
    assert_eq!(kept.sha256, good_cert.sha256);
    let d = diag(&snap, "Secret", "ns/foo-tls", "tls.crt");
    assert!(d.reason.contains("last good certificate"), "{d}");

    // The publisher's path takes the last good certificates from the previous snapshot,
    // without copying them into the inputs: the same result.
    let update = portcullis::publish::SourceUpdate {
        inputs: tls_world(secret_with("ns", "foo-tls", b"broken", b"broken")).inputs,
        diagnostics: Vec::new(),
    };
    assert!(update.inputs.last_good_certs.is_empty());
    let published = portcullis::publish::build_snapshot(&update, &Options::default(), &good);
    assert_eq!(
        published.tls.cert_for("foo.com").map(|c| c.sha256.clone()),
        Some(good_cert.sha256.clone())
    );
    assert_eq!(published.diagnostics, snap.diagnostics);

    // A deleted Secret is not "turned invalid": its hosts fall back to the default.
    let mut world = tls_world(tls_secret("ns", "unrelated", &["x.com"]));
    world.inputs.last_good_certs = good.tls.certs.clone();
    let snap = world.build();
    assert!(snap.tls.cert_for("foo.com").is_none());
    assert!(
        diag(&snap, "Secret", "ns/foo-tls", "")
            .reason
            .contains("not found")
    );
}

#[test]
fn tls_secret_from_another_namespace_is_never_used() {
    // The Secret exists, valid, in another namespace.
    let snap = tls_world(tls_secret("elsewhere", "foo-tls", &["foo.com"])).build();
    assert!(snap.tls.cert_for("foo.com").is_none());
    diag(&snap, "Secret", "ns/foo-tls", "");

    // Naming it as `namespace/name` does not reach it either.
    let snap = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "sneaky")
                .host("foo.com")
                .prefix("/", "svc", 80)
                .tls(&["foo.com"], "elsewhere/foo-tls"),
        )
        .secret(tls_secret("elsewhere", "foo-tls", &["foo.com"]))
        .build();
    assert!(snap.tls.cert_for("foo.com").is_none());
    assert!(snap.tls.certs.keys().all(|k| k.namespace == "ns"));
}

// ---------------------------------------------------------------------------------------
// Bad input: each is reported, and the rest still routes
// ---------------------------------------------------------------------------------------

#[test]
fn bad_objects_are_reported_and_the_rest_routes() {
    let snap = World::new()
        .class(class("nginx", "k8s.io/ingress-nginx", false))
        .backend("ns", "svc", "10.0.0.1")
        .svc(service("ns", "web").named_port("http", 80, json!(8080)))
        .slice(
            slice("ns", "web")
                .port(Some("http"), 8080)
                .ready("10.0.0.2"),
        )
        // An EndpointSlice whose Service does not exist.
        .slice(slice("ns", "ghost").port(None, 8080).ready("10.0.0.3"))
        // A Secret with garbage PEM.
        .secret(secret_with(
            "ns",
            "bad-tls",
            b"-----BEGIN CERTIFICATE-----\nxx",
            b"x",
        ))
        // No rules and no default backend.
        .ing(ingress("ns", "empty"))
        // A rule that is nothing but a host-less empty rule.
        .ing(ingress("ns", "empty-rule").empty_rule())
        // A path without its leading `/`, next to a good path of the same Ingress.
        .ing(
            ingress("ns", "relative")
                .host("rel.com")
                .prefix("api", "svc", 80)
                .prefix("/good", "svc", 80),
        )
        // A port name the Service does not have.
        .ing(
            ingress("ns", "bad-port")
                .host("port.com")
                .prefix("/", "web", "nope"),
        )
        // An Ingress of another controller's class.
        .ing(
            ingress("ns", "foreign")
                .class("nginx")
                .host("foreign.com")
                .prefix("/", "svc", 80),
        )
        // A bad host and an unknown pathType.
        .ing(
            ingress("ns", "bad-host")
                .host("*.*.com")
                .prefix("/", "svc", 80)
                .host("typo.com")
                .path("Regex", "/x", "svc", 80),
        )
        // TLS pointing at the garbage Secret.
        .ing(
            ingress("ns", "tls")
                .host("tls.com")
                .prefix("/", "svc", 80)
                .tls(&["tls.com"], "bad-tls"),
        )
        // And a good one.
        .ing(
            ingress("ns", "good")
                .host("good.com")
                .prefix("/", "web", "http"),
        )
        .build();

    diag(&snap, "Ingress", "ns/empty", "spec");
    assert!(
        diag(
            &snap,
            "Ingress",
            "ns/relative",
            "spec.rules[0].http.paths[0].path"
        )
        .reason
        .contains("must start with `/`")
    );
    assert!(
        diag(
            &snap,
            "Ingress",
            "ns/bad-port",
            "spec.rules[0].http.paths[0].backend"
        )
        .reason
        .contains("no port named nope")
    );
    assert!(
        ignored_reason(&snap, "ns/foreign")
            .unwrap()
            .contains("k8s.io/ingress-nginx")
    );
    diag(&snap, "Ingress", "ns/bad-host", "spec.rules[0].host");
    assert!(
        diag(
            &snap,
            "Ingress",
            "ns/bad-host",
            "spec.rules[1].http.paths[0].pathType"
        )
        .reason
        .contains("Regex")
    );
    diag(&snap, "Secret", "ns/bad-tls", "tls.crt");
    assert!(
        diag(
            &snap,
            "EndpointSlice",
            "ns/ghost-abc",
            "kubernetes.io/service-name"
        )
        .reason
        .contains("Service ns/ghost not found")
    );
    for d in &snap.diagnostics {
        assert!(
            !d.kind.is_empty() && !d.name.is_empty() && !d.reason.is_empty(),
            "{d}"
        );
    }

    // Everything else still routes.
    assert_eq!(active(&snap, "good.com", "/"), ["10.0.0.2:8080"]);
    assert_eq!(active(&snap, "rel.com", "/good/x"), ["10.0.0.1:8080"]);
    assert_eq!(outcome(&snap, Some("rel.com"), "/api"), "404");
    assert_eq!(active(&snap, "tls.com", "/"), ["10.0.0.1:8080"]);
    assert!(
        cluster_of(&snap, "port.com", "/")
            .active_endpoints()
            .is_empty()
    );
    assert_eq!(outcome(&snap, Some("foreign.com"), "/"), "404");
    assert_eq!(outcome(&snap, Some("typo.com"), "/x"), "404");
    assert!(snap.tls.host_for("tls.com").is_some());
}

#[test]
fn routes_carry_their_identity_and_host_match() {
    let snap = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .ing(
            ingress("ns", "multi")
                .host("a.com")
                .exact("/one", "svc", 80)
                .host("*.b.com")
                .prefix("/two", "svc", 80),
        )
        .build();
    match snap.decide(Some("x.b.com"), "/two/three") {
        Decision::Route(m) => {
            assert_eq!(m.host_match, HostMatch::Wildcard);
            assert_eq!((m.route.source.rule, m.route.source.match_index), (1, 0));
            let c = snap.route_cluster(m.route).expect("the route forwards");
            assert_eq!(c.service, ObjectRef::new("ns", "svc"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tls_secret_without_namespace_is_filed_under_default() {
    let mut secret = (*tls_secret("default", "t", &["foo.com"])).clone();
    secret.metadata.namespace = None;
    let snap = World::new()
        .backend("default", "svc", "10.0.0.1")
        .ing(
            ingress("default", "secure")
                .host("foo.com")
                .prefix("/", "svc", 80)
                .tls(&["foo.com"], "t"),
        )
        .secret(Arc::new(secret))
        .build();
    no_diagnostics(&snap);
    let cert = snap.tls.cert_for("foo.com").unwrap();
    assert_eq!(cert.secret, ObjectRef::new("default", "t"));
    assert!(snap.tls.certs.contains_key(&cert.secret));
}

// ---------------------------------------------------------------------------------------
// portcullis.io/max-body-size
// ---------------------------------------------------------------------------------------

/// The body limit carried by the route a request takes.
fn route_body_limit(snap: &Snapshot, host: &str, path: &str) -> Option<u64> {
    match snap.decide(Some(host), path) {
        Decision::Route(m) => m.route.max_body_size,
        _ => panic!("{host}{path} is not routed"),
    }
}

#[test]
fn max_body_size_annotation_is_carried_on_every_route_of_its_ingress() {
    let world = World::new()
        .backend("ns", "svc", "10.0.0.1")
        .backend("ns", "fallback", "10.0.0.2")
        .ing(
            ingress("ns", "limited")
                .annotation("portcullis.io/max-body-size", "10MiB")
                .host("a.example")
                .prefix("/", "svc", 80)
                .prefix("/upload", "svc", 80)
                .default_backend("fallback", 80),
        )
        .ing(
            ingress("ns", "lower-case")
                .annotation("portcullis.io/max-body-size", " 512k ")
                .host("b.example")
                .prefix("/", "svc", 80),
        )
        .ing(
            ingress("ns", "plain")
                .host("c.example")
                .prefix("/", "svc", 80),
        );
    let snap = world.build();
    no_diagnostics(&snap);
    assert_eq!(route_body_limit(&snap, "a.example", "/"), Some(10 << 20));
    assert_eq!(
        route_body_limit(&snap, "a.example", "/upload/x"),
        Some(10 << 20)
    );
    assert_eq!(route_body_limit(&snap, "b.example", "/"), Some(512_000));
    assert_eq!(route_body_limit(&snap, "c.example", "/"), None);
    // The default backend takes the limit of the Ingress it came from.
    assert_eq!(snap.default_backend_max_body_size, Some(10 << 20));
}

#[test]
fn an_invalid_max_body_size_is_an_error_and_the_ingress_keeps_the_global_limit() {
    for value in ["ten megs", "1.5M", "-1", "10MiBs", ""] {
        let world = World::new().backend("ns", "svc", "10.0.0.1").ing(
            ingress("ns", "bad")
                .annotation("portcullis.io/max-body-size", value)
                .host("a.example")
                .prefix("/", "svc", 80),
        );
        let snap = world.build();
        let d = diag(
            &snap,
            "Ingress",
            "ns/bad",
            "metadata.annotations[portcullis.io/max-body-size]",
        );
        assert_eq!(d.severity, portcullis::model::Severity::Error, "{value:?}");
        assert!(d.reason.contains("global --max-body-size"), "{}", d.reason);
        // The route is still served, with no limit of its own.
        assert_eq!(route_body_limit(&snap, "a.example", "/"), None, "{value:?}");
    }
}
