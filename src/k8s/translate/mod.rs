//! Translation: a pure function from Kubernetes objects to a routing [`Snapshot`].
//!
//! [`build`] does no I/O and reads no clock. A bad object, or a bad part of one, is
//! skipped with a [`Diagnostic`] naming kind, namespace/name and field; it never stops
//! the rest of the table from building. The output is the same whatever the order of
//! the inputs.

mod backends;
mod classes;
mod gateway;
mod httproute;
mod incremental;
mod ingress;
mod tls;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::k8s::gateway_api::gatewayclasses::GatewayClass;
use crate::k8s::gateway_api::gateways::Gateway;
use crate::k8s::gateway_api::httproutes::HttpRoute;
use crate::k8s::gateway_api::referencegrants::ReferenceGrant;

use crate::model::gateway::GatewayReport;
use crate::model::{
    CertEntry, Cluster, Diagnostic, IgnoredIngress, ObjectRef, PortRef, Route, RouteKind,
    RouteTable, Severity, Snapshot, TlsTable, Upstream,
};

use backends::{PortKey, Prior, Resolver};
use classes::IngressClasses;
use ingress::{Use, UseObject};

pub use incremental::{Rebuild, rebuild};
pub use tls::{SecretError, parse_tls_secret};

/// The annotation that names a class on Ingresses without `spec.ingressClassName`.
pub const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// The annotation that marks an IngressClass as the cluster default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// Per-Ingress opt-in (`"true"`) or opt-out (`"false"`) of the plain-HTTP → HTTPS redirect
/// for its TLS hosts; without it `--ssl-redirect` decides.
pub const SSL_REDIRECT_ANNOTATION: &str = "portcullis.io/ssl-redirect";
/// Per-Ingress `Strict-Transport-Security` value for responses over TLS; without it
/// `--hsts` decides.
pub const HSTS_ANNOTATION: &str = "portcullis.io/hsts";
/// Per-Ingress request body limit (a size such as `10MiB`, see [`crate::model::size`]);
/// replaces `--max-body-size` for the Ingress' routes and its `spec.defaultBackend`.
pub const MAX_BODY_SIZE_ANNOTATION: &str = "portcullis.io/max-body-size";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// All objects a build reads, one list per kind, plus the certificates of the previous
/// snapshot (so that a Secret that turns invalid keeps its last good certificate).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub ingresses: Vec<Arc<Ingress>>,
    pub ingress_classes: Vec<Arc<IngressClass>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub secrets: Vec<Arc<Secret>>,
    /// Namespaces, for their labels (Gateway API `allowedRoutes` selectors). A namespace
    /// without an object here has just the `kubernetes.io/metadata.name` label.
    pub namespaces: Vec<Arc<Namespace>>,
    pub gateway_classes: Vec<Arc<GatewayClass>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    /// ReferenceGrants, v1beta1 and v1 alike (the two versions have one schema).
    pub reference_grants: Vec<Arc<ReferenceGrant>>,
    /// Certificates in force before this build, by Secret.
    pub last_good_certs: HashMap<ObjectRef, Arc<CertEntry>>,
}

/// A `--default-backend-service` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub service: ObjectRef,
    pub port: PortRef,
}

impl std::str::FromStr for ServiceRef {
    type Err = String;
    /// Parses `namespace/name:port` (port a number or a port name).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not NAMESPACE/NAME:PORT"))?;
        let (name, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not NAMESPACE/NAME:PORT"))?;
        if ns.is_empty() || name.is_empty() || port.is_empty() {
            return Err(format!("`{s}` is not NAMESPACE/NAME:PORT"));
        }
        let port = match port.parse::<i32>() {
            Ok(n) => PortRef::Number(n),
            Err(_) => PortRef::Name(port.to_string()),
        };
        Ok(ServiceRef {
            service: ObjectRef::new(ns, name),
            port,
        })
    }
}

/// What a build needs besides the objects.
#[derive(Debug, Clone)]
pub struct Options {
    /// `spec.controller` of the IngressClasses we serve.
    pub controller_name: String,
    /// The legacy annotation value we answer to; in file mode also the class assumed when
    /// the inputs define none of ours.
    pub ingress_class: String,
    /// Serve Ingresses that name no class even when no class of ours is the default.
    pub watch_without_class: bool,
    pub default_backend_service: Option<ServiceRef>,
    /// Assume an IngressClass `ingress_class` (ours, default) when none of ours exists.
    pub assume_class: bool,
    /// Allow endpoints on loopback, link-local and unspecified addresses (file mode).
    pub allow_local_endpoints: bool,
    /// Our own listener addresses; endpoints pointing at them are refused.
    pub own_addresses: Vec<SocketAddr>,
    /// `--default-ssl-certificate`: a Secret parsed like TLS hosts' Secrets (last good
    /// kept), served for names no TLS host covers.
    pub default_ssl_certificate: Option<ObjectRef>,
    /// `--path-normalization on`: rule paths are normalised as request paths are
    /// ([`crate::model::path::normalize`]), with a diagnostic when that changes one.
    pub normalize_paths: bool,
    /// `spec.controllerName` of the GatewayClasses we serve. With `assume_class`, a
    /// GatewayClass `portcullis` of ours is assumed when the inputs define none of ours.
    pub gateway_controller_name: String,
    /// The Gateway listener port (protocol HTTP) served on the HTTP listener.
    pub gateway_http_port: u16,
    /// The Gateway listener port (protocol HTTPS) served on the HTTPS listener.
    pub gateway_https_port: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            controller_name: "portcullis.io/ingress-controller".into(),
            ingress_class: "portcullis".into(),
            watch_without_class: false,
            default_backend_service: None,
            assume_class: false,
            allow_local_endpoints: false,
            own_addresses: Vec::new(),
            default_ssl_certificate: None,
            normalize_paths: true,
            gateway_controller_name: "portcullis.io/gateway-controller".into(),
            gateway_http_port: 80,
            gateway_https_port: 443,
        }
    }
}

/// The hasher for maps that live only during a build: keys come from the API server
/// and the build must be fast at 10,000s of objects.
type FastMap<K, V> = foldhash::HashMap<K, V>;

/// A rule path as routing matches it: with `--path-normalization on` (`normalize`),
/// requests are routed by their normalised path, so the rule is too. A rule that
/// normalisation rewrites is matched in its normal form (with the warning to give); one
/// it refuses could never match (the error to give).
pub(super) fn normalize_rule_path(
    raw: &str,
    normalize: bool,
) -> Result<(Cow<'_, str>, Option<String>), String> {
    if !normalize {
        return Ok((Cow::Borrowed(raw), None));
    }
    match crate::model::path::normalize(raw) {
        Ok(Cow::Borrowed(p)) => Ok((Cow::Borrowed(p), None)),
        Ok(Cow::Owned(normal)) => {
            let warning = format!(
                "path {raw} is matched as {normal}: request paths are normalised before routing (--path-normalization on)"
            );
            Ok((Cow::Owned(normal), Some(warning)))
        }
        Err(e) => Err(format!(
            "path {raw} can never match a request: {e} (--path-normalization on refuses such requests)"
        )),
    }
}

/// Where an object stands in "oldest wins": its creationTimestamp (absent sorts first),
/// then `namespace/name` compared as one string, the order both Gateway API ("the Route
/// appearing first in alphabetical order by {namespace}/{name}") and Ingress precedence
/// name. (As a pair, `a` would sort before `a-b`; as `a/…` and `a-b/…`, after.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Age<'a> {
    created: Option<i64>,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl<'a> Age<'a> {
    pub(super) fn of(meta: &'a ObjectMeta) -> Age<'a> {
        let (namespace, name) = ns_name(meta);
        Age {
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_nanosecond() as i64),
            namespace,
            name,
        }
    }

    fn joined(&self) -> impl Iterator<Item = u8> + '_ {
        self.namespace
            .bytes()
            .chain(std::iter::once(b'/'))
            .chain(self.name.bytes())
    }
}

impl Ord for Age<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.created
            .cmp(&other.created)
            .then_with(|| self.joined().cmp(other.joined()))
    }
}

impl PartialOrd for Age<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// `(namespace, name)` borrowed from object metadata; namespace `default` when unset.
fn ns_name(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    )
}

fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

struct Diags(Vec<Diagnostic>);

impl Diags {
    fn push(
        &mut self,
        severity: Severity,
        kind: &str,
        obj: &ObjectRef,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) {
        self.0.push(Diagnostic {
            severity,
            kind: kind.to_string(),
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// Builds a snapshot from the inputs. Generation 0; the publisher stamps it.
pub fn build(inputs: &Inputs, options: &Options) -> Snapshot {
    build_with_certs(inputs, &inputs.last_good_certs, options)
}

/// What a build keeps so that a later build can start from its snapshot ([`rebuild`]):
/// after an EndpointSlice change only the clusters of its Services are resolved again,
/// and the diagnostics their endpoints cause are redone from this.
#[derive(Debug, Default)]
pub struct Reuse {
    /// Diagnostics that no EndpointSlice affects.
    fixed: Vec<Diagnostic>,
    /// Every backend that resolved to pod endpoints.
    uses: Vec<Use>,
    /// Per cluster, the diagnostics of what its Service or EndpointSlices point at
    /// and cannot be used (refused addresses, bad ExternalNames).
    refused: Vec<Vec<Diagnostic>>,
    /// EndpointSlices labelled with a Service that does not exist, by that Service.
    orphans: Vec<(ObjectRef, Diagnostic)>,
}

/// [`build`], with the last good certificates given apart from the inputs (and
/// `inputs.last_good_certs` unread), so that a caller holding them elsewhere need not
/// copy the inputs to set them.
pub fn build_with_certs(
    inputs: &Inputs,
    last_good_certs: &HashMap<ObjectRef, Arc<CertEntry>>,
    options: &Options,
) -> Snapshot {
    build_reusable(inputs, last_good_certs, options).0
}

/// [`build_with_certs`], and what [`rebuild`] needs to update the result.
pub fn build_reusable(
    inputs: &Inputs,
    last_good_certs: &HashMap<ObjectRef, Arc<CertEntry>>,
    options: &Options,
) -> (Snapshot, Reuse) {
    build_from(inputs, last_good_certs, options, None)
}

/// The full build. With `prior`, an earlier snapshot (and its [`Reuse`]) built with the
/// same options from the same Services and EndpointSlices, whose clusters are taken
/// instead of resolved again.
fn build_from<'a>(
    inputs: &'a Inputs,
    last_good_certs: &HashMap<ObjectRef, Arc<CertEntry>>,
    options: &'a Options,
    prior: Option<(&'a Snapshot, &'a Reuse)>,
) -> (Snapshot, Reuse) {
    let mut diags = Diags(Vec::new());

    // Class and ownership: our Ingresses, oldest first; the others with the reason.
    let classes = IngressClasses::new(inputs, options);
    let mut ours: Vec<(u32, &Ingress)> = Vec::new();
    let mut ignored = Vec::new();
    for (index, ing) in inputs.ingresses.iter().enumerate() {
        match classes.classify(ing, options) {
            Ok(()) => ours.push((index as u32, ing)),
            Err(reason) => {
                let id = object_ref(&ing.metadata);
                ignored.push(IgnoredIngress {
                    namespace: id.namespace,
                    name: id.name,
                    reason,
                });
            }
        }
    }
    ours.sort_by_cached_key(|(_, i)| ingress::age_key(i));
    let mut served_ingresses: Vec<ObjectRef> =
        ours.iter().map(|(_, i)| object_ref(&i.metadata)).collect();
    served_ingresses.sort();
    ignored.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Backends resolve through one resolver, shared by every source kind.
    let mut resolver = Resolver::new(inputs, options, prior.map(|(s, r)| Prior::new(s, r)));

    // Source kinds.
    let ingress::IngressOutput {
        routes,
        mut default_backend,
        default_backend_max_body_size,
        tls_hosts,
        mut tls_secrets,
        tls_policies,
    } = ingress::translate(&ours, &mut resolver, options, &mut diags);
    let mut gateways = gateway::Gateways::new(inputs, options, &mut diags);
    let (gateway_routes, route_infos) =
        httproute::translate(inputs, &mut gateways, &mut resolver, options, &mut diags);
    let routes = merge_by_age(inputs, routes, gateway_routes);
    let gateway_report = GatewayReport {
        classes: gateways.classes,
        gateways: gateways.infos.into_values().collect(),
        routes: route_infos,
    };
    if default_backend.is_none()
        && let Some(flag) = &options.default_backend_service
    {
        let port = PortKey::from(&flag.port);
        let cluster = resolver.cluster(
            (flag.service.namespace.as_str(), flag.service.name.as_str()),
            port,
        );
        if let Some(reason) = resolver.unresolved(cluster) {
            diags.push(
                Severity::Error,
                "Service",
                &flag.service,
                "--default-backend-service",
                reason,
            );
        }
        default_backend = Some((cluster, None));
    }

    // TLS material: the certificates of the Secrets TLS hosts name (last good kept).
    let certs = tls::certificates(
        inputs,
        &mut tls_secrets,
        last_good_certs,
        options,
        &mut diags,
    );

    // Orphans depend on Services and EndpointSlices only: a prior build's still hold.
    let orphans = match prior {
        Some((_, reuse)) => reuse.orphans.clone(),
        None => resolver.orphan_slices(),
    };

    let (table, failed) = RouteTable::build(routes);
    for (route, reason) in failed {
        diags.push(
            Severity::Error,
            route.source.kind.as_str(),
            &route.source.object,
            match route.source.kind {
                RouteKind::Ingress => format!(
                    "spec.rules[{}].http.paths[{}].path",
                    route.source.rule, route.source.match_index
                ),
                _ => format!(
                    "spec.rules[{}].matches[{}].path",
                    route.source.rule, route.source.match_index
                ),
            },
            reason,
        );
    }

    let clusters = resolver.clusters;
    let reuse = Reuse {
        fixed: diags.0,
        uses: resolver.uses,
        refused: resolver.refused,
        orphans,
    };
    let diagnostics = reuse.diagnostics(&clusters, inputs);
    let snapshot = Snapshot {
        generation: 0,
        routes: Arc::new(table),
        clusters,
        default_backend_source: default_backend.as_ref().and_then(|(_, src)| src.clone()),
        default_backend_max_body_size,
        default_backend: default_backend.map(|(c, _)| c),
        tls: Arc::new(TlsTable {
            hosts: tls_hosts,
            certs,
            policies: tls_policies,
        }),
        ignored,
        served_ingresses,
        gateway: Arc::new(gateway_report),
        diagnostics,
    };
    (snapshot, reuse)
}

/// Routes of every kind in one age order (oldest object first, then rule, then match),
/// numbered in that order: `ingress` and `gateway` are each in their own age order.
fn merge_by_age(inputs: &Inputs, ingress: Vec<Route>, gateway: Vec<Route>) -> Vec<Route> {
    let mut routes = if gateway.is_empty() {
        ingress
    } else if ingress.is_empty() {
        gateway
    } else {
        let ages: FastMap<(RouteKind, &str, &str), Age<'_>> = inputs
            .ingresses
            .iter()
            .map(|i| (RouteKind::Ingress, ingress::age_key(i)))
            .chain(
                inputs
                    .http_routes
                    .iter()
                    .map(|r| (RouteKind::HttpRoute, httproute::age_key(r))),
            )
            .map(|(kind, age)| ((kind, age.namespace, age.name), age))
            .collect();
        let age = |r: &Route| {
            ages.get(&(
                r.source.kind,
                r.source.object.namespace.as_str(),
                r.source.object.name.as_str(),
            ))
            .copied()
        };
        // Each object's routes are contiguous: one look-up per object, not per step.
        let ages_of = |routes: &[Route]| {
            let mut out: Vec<Option<Age<'_>>> = Vec::with_capacity(routes.len());
            let mut prev: Option<&Route> = None;
            for r in routes {
                let a = match (prev, out.last()) {
                    (Some(p), Some(&a))
                        if p.source.kind == r.source.kind && p.source.object == r.source.object =>
                    {
                        a
                    }
                    _ => age(r),
                };
                out.push(a);
                prev = Some(r);
            }
            out
        };
        let ingress_ages = ages_of(&ingress);
        let gateway_ages = ages_of(&gateway);
        let mut out = Vec::with_capacity(ingress.len() + gateway.len());
        let (mut i, mut g) = (0, 0);
        let mut a = ingress.into_iter();
        let mut b = gateway.into_iter();
        while i < ingress_ages.len() && g < gateway_ages.len() {
            if gateway_ages[g] < ingress_ages[i] {
                out.extend(b.next());
                g += 1;
            } else {
                out.extend(a.next());
                i += 1;
            }
        }
        out.extend(a);
        out.extend(b);
        out
    };
    for (i, r) in routes.iter_mut().enumerate() {
        r.order = i as u32;
    }
    routes
}

impl Reuse {
    /// All diagnostics of a build: the fixed ones and those the clusters' endpoints
    /// cause, sorted, without duplicates.
    fn diagnostics(&self, clusters: &[Arc<Cluster>], inputs: &Inputs) -> Vec<Diagnostic> {
        let mut diags = Diags(self.fixed.clone());
        for u in &self.uses {
            let cluster = &clusters[u.cluster as usize];
            if matches!(cluster.upstream, Upstream::Endpoints { .. })
                && cluster.active_endpoints().is_empty()
            {
                let (kind, meta, field) = match u.object {
                    UseObject::Ingress(i) => (
                        "Ingress",
                        &inputs.ingresses[i as usize].metadata,
                        format!("{}.service", u.field),
                    ),
                    UseObject::HttpRoute(i) => (
                        "HTTPRoute",
                        &inputs.http_routes[i as usize].metadata,
                        u.field.to_string(),
                    ),
                };
                diags.push(
                    Severity::Warning,
                    kind,
                    &object_ref(meta),
                    field,
                    format!(
                        "Service {} port {} has no ready or serving endpoints; the route answers 503",
                        cluster.service, cluster.port
                    ),
                );
            }
        }
        diags.0.extend(self.refused.iter().flatten().cloned());
        diags.0.extend(self.orphans.iter().map(|(_, d)| d.clone()));
        let mut diagnostics = diags.0;
        diagnostics.sort();
        diagnostics.dedup();
        diagnostics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: &str, name: &str, created: Option<&str>) -> ObjectMeta {
        serde_json::from_value(serde_json::json!({
            "namespace": ns, "name": name, "creationTimestamp": created,
        }))
        .expect("metadata")
    }

    #[test]
    fn age_is_creation_then_namespace_slash_name_as_one_string() {
        let (a, ab) = (meta("a", "z", None), meta("a-b", "a", None));
        // As strings `a-b/a` < `a/z` ('-' < '/'), though `a` < `a-b` as a pair.
        assert!(Age::of(&ab) < Age::of(&a));
        let (x1, x2) = (meta("x", "b", None), meta("x", "c", None));
        assert!(Age::of(&x1) < Age::of(&x2));
        let old = meta("z", "z", Some("2024-01-01T00:00:00Z"));
        let young = meta("a", "a", Some("2024-06-01T00:00:00Z"));
        assert!(Age::of(&old) < Age::of(&young));
        // Without a timestamp an object sorts first.
        assert!(Age::of(&a) < Age::of(&old));
    }
}
