//! The routing domain: what a published configuration looks like to the data path.
//!
//! A [`Snapshot`] is immutable once built. It holds the route table, the clusters the
//! routes lead to, the TLS certificates by host, and the diagnostics of the build that
//! made it. Nothing in this module knows about Kubernetes object types or does I/O.

pub mod gateway;
pub mod matching;
pub mod path;
pub mod route;
pub mod router;
pub mod safety;
pub mod size;
pub mod tls;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

pub use matching::{HostMatch, HostPattern, PathRule, PathType, Pattern, Precedence, request_host};
pub use route::{
    Action, BackendTarget, Backends, Conditions, Filters, HeaderCondition, HeaderModifier,
    ListenerKind, Mirror, PathModifier, QueryCondition, Redirect, RequestFacts, Route, RouteKind,
    RouteSource, Timeouts, UrlRewrite, ValueMatch, WeightedBackend,
};
pub use router::{RouteMatch, RouteTable, VirtualHost, reference_lookup};
pub use tls::{CertEntry, IngressTls, TlsTable};

/// `namespace/name` of a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ObjectRef {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How bad a diagnostic is. `Error`: part of the configuration is not served as
/// written. `Warning`: served, but probably not as intended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// Something skipped or partly applied while building a snapshot, naming the object
/// and the field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Kubernetes kind of the object: `Ingress`, `Service`, `Secret`, …
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Path of the field inside the object, such as `spec.rules[0].http.paths[1].path`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ", self.severity, self.kind)?;
        if self.namespace.is_empty() {
            write!(f, "{}", self.name)?;
        } else {
            write!(f, "{}/{}", self.namespace, self.name)?;
        }
        if !self.field.is_empty() {
            write!(f, " {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// An Ingress that is not ours, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct IgnoredIngress {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// Index of a cluster in [`Snapshot::clusters`].
pub type ClusterId = u32;

/// The Service port a backend names: by number or by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(s) => f.write_str(s),
        }
    }
}

/// One pod address from an EndpointSlice, with its conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Where a cluster's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Upstream {
    /// Pod endpoints. `active` are the ones to balance over: the ready endpoints, or,
    /// when none is ready, those still serving (terminating ones included), so that a
    /// rolling update does not turn into 503s.
    Endpoints {
        all: Vec<Endpoint>,
        active: Vec<SocketAddr>,
    },
    /// An `ExternalName` Service: a DNS name resolved when connecting.
    ExternalName { host: String, port: u16 },
    /// The backend could not be resolved; the route answers 503.
    Unresolved { reason: String },
}

/// One Service port: the set of endpoints routes balance over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// The Service.
    pub service: ObjectRef,
    /// The port as the Ingress backend named it.
    pub port: PortRef,
    /// The Service port number, when the Service and the port were found.
    pub service_port: Option<i32>,
    /// The Service port's `appProtocol` (`kubernetes.io/h2c` asks for HTTP/2 cleartext).
    pub app_protocol: Option<String>,
    pub upstream: Upstream,
}

impl Cluster {
    /// `namespace/service:port`, for logs and debug views.
    pub fn display_name(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }

    /// The addresses to balance over; empty for ExternalName and unresolved clusters.
    pub fn active_endpoints(&self) -> &[SocketAddr] {
        match &self.upstream {
            Upstream::Endpoints { active, .. } => active,
            _ => &[],
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'a> {
    /// A route matched; its action says what happens.
    Route(RouteMatch<'a>),
    /// No route matched; the default backend answers.
    DefaultBackend(&'a Cluster),
    /// Nothing matched and there is no default backend: 404.
    NotFound,
}

/// An immutable, complete routing configuration.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Set by the publisher; 0 until published.
    pub generation: u64,
    /// Shared with the next snapshot when only EndpointSlices changed.
    pub routes: Arc<RouteTable>,
    pub clusters: Vec<Arc<Cluster>>,
    pub default_backend: Option<ClusterId>,
    /// Where the default backend came from: an Ingress, or `None` for the flag.
    pub default_backend_source: Option<ObjectRef>,
    /// The request body limit of the Ingress the default backend came from; `None`
    /// leaves the proxy's global limit in force.
    pub default_backend_max_body_size: Option<u64>,
    /// Shared with the next snapshot when only EndpointSlices changed.
    pub tls: Arc<TlsTable>,
    pub ignored: Vec<IgnoredIngress>,
    /// Every Ingress classified as ours (by IngressClass, the legacy annotation or the
    /// default class), sorted, whether or not any of its rules could be routed. These
    /// are the Ingresses whose status Portcullis writes.
    pub served_ingresses: Vec<ObjectRef>,
    /// Gateway API objects of ours and what became of them (attachment, conditions).
    /// Shared with the next snapshot when only EndpointSlices changed.
    pub gateway: Arc<gateway::GatewayReport>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Snapshot {
    /// Routes a request: `host` normalised as [`request_host`] does, `path` without the
    /// query, as [`path::normalize`] gives it (or as received, when normalisation is
    /// off).
    /// A `GET` without headers or query is assumed (see [`Snapshot::decide_request`]).
    pub fn decide(&self, host: Option<&str>, path: &str) -> Decision<'_> {
        self.decide_request(host, path, &RequestFacts::get())
    }

    /// Routes a request, conditions on method, headers and query included.
    pub fn decide_request(
        &self,
        host: Option<&str>,
        path: &str,
        req: &RequestFacts<'_>,
    ) -> Decision<'_> {
        if let Some(m) = self.routes.lookup(host, path, req) {
            return Decision::Route(m);
        }
        match self.default_backend {
            Some(id) => Decision::DefaultBackend(&self.clusters[id as usize]),
            None => Decision::NotFound,
        }
    }

    pub fn cluster(&self, id: ClusterId) -> &Cluster {
        &self.clusters[id as usize]
    }

    /// The cluster of a route's first usable backend, if it forwards.
    pub fn route_cluster(&self, route: &Route) -> Option<&Cluster> {
        route
            .first_cluster()
            .and_then(|id| self.clusters.get(id as usize))
            .map(|c| &**c)
    }

    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }
}
