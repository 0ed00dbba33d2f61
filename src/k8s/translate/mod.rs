//! Translation: a pure function from Kubernetes objects to a routing [`Snapshot`].
//!
//! [`build`] does no I/O and reads no clock. A bad object, or a bad part of one, is
//! skipped with a [`Diagnostic`] naming kind, namespace/name and field; it never stops
//! the rest of the table from building. The output is the same whatever the order of
//! the inputs.

mod incremental;
mod tls;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::safety::{self, EndpointPolicy};
use crate::model::tls::{IngressTls, TlsHost};
use crate::model::{
    CertEntry, Cluster, ClusterId, Diagnostic, Endpoint, HostPattern, IgnoredIngress, ObjectRef,
    PathRule, PathType, PortRef, Route, RouteTable, Severity, Snapshot, TlsTable, Upstream,
};

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
        }
    }
}

/// The hasher for maps that live only during a build: keys come from the API server
/// and the build must be fast at 10,000s of objects.
type FastMap<K, V> = foldhash::HashMap<K, V>;

/// `spec.rules[R].http.paths[P]`, formatted only when a diagnostic needs it.
#[derive(Debug, Clone, Copy)]
struct PathField {
    ri: usize,
    pi: usize,
}

/// Where an Ingress names a backend.
#[derive(Debug, Clone, Copy)]
enum BackendField {
    /// `spec.rules[ri].http.paths[pi].backend`
    Path(PathField),
    /// `spec.defaultBackend`
    Default,
}

impl fmt::Display for BackendField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendField::Path(p) => write!(f, "{p}.backend"),
            BackendField::Default => f.write_str("spec.defaultBackend"),
        }
    }
}

/// An Ingress backend that resolved to pod endpoints: it gets a warning whenever the
/// cluster has no ready or serving endpoint.
#[derive(Debug, Clone, Copy)]
struct Use {
    cluster: ClusterId,
    /// Index in [`Inputs::ingresses`].
    ingress: u32,
    field: BackendField,
}

impl fmt::Display for PathField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spec.rules[{}].http.paths[{}]", self.ri, self.pi)
    }
}

/// A Service port as a backend names it, borrowed from the Ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortKey<'a> {
    Number(i32),
    Name(&'a str),
}

impl<'a> From<&'a PortRef> for PortKey<'a> {
    fn from(port: &'a PortRef) -> Self {
        match port {
            PortRef::Number(n) => PortKey::Number(*n),
            PortRef::Name(name) => PortKey::Name(name),
        }
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

    // Which IngressClasses are ours, and whether one of ours is the default.
    let mut classes: FastMap<&str, (bool, Option<&str>)> = FastMap::default();
    let mut default_ours = false;
    for class in &inputs.ingress_classes {
        let name = class.metadata.name.as_deref().unwrap_or_default();
        let controller = class.spec.as_ref().and_then(|s| s.controller.as_deref());
        let ours = controller == Some(options.controller_name.as_str());
        let is_default = class
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|v| v == "true");
        default_ours |= ours && is_default;
        classes.insert(name, (ours, controller));
    }
    if options.assume_class
        && !classes.values().any(|(ours, _)| *ours)
        && !classes.contains_key(options.ingress_class.as_str())
    {
        classes.insert(options.ingress_class.as_str(), (true, None));
        default_ours = true;
    }

    // Our Ingresses, oldest first; the others with the reason.
    let mut ours: Vec<(u32, &Ingress)> = Vec::new();
    let mut ignored = Vec::new();
    for (index, ing) in inputs.ingresses.iter().enumerate() {
        match classify(ing, &classes, default_ours, options) {
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
    ours.sort_by_cached_key(|(_, i)| age_key(i));
    let mut served_ingresses: Vec<ObjectRef> =
        ours.iter().map(|(_, i)| object_ref(&i.metadata)).collect();
    served_ingresses.sort();
    ignored.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut resolver = Resolver::new(inputs, options, prior.map(|(s, r)| Prior::new(s, r)));

    // Routes, conflicts, default backends and TLS hosts, in age order.
    let paths_hint: usize = ours
        .iter()
        .filter_map(|(_, i)| i.spec.as_ref()?.rules.as_ref())
        .flatten()
        .filter_map(|r| Some(r.http.as_ref()?.paths.len()))
        .sum();
    let mut routes = Vec::with_capacity(paths_hint);
    // Rule hosts, numbered, so that the conflict key below borrows instead of cloning.
    let mut host_ids: FastMap<HostPattern, u32> =
        FastMap::with_capacity_and_hasher(ours.len(), Default::default());
    // (host id, match key, exact) → the Ingress (index in `ours`) and path serving it.
    let mut taken: FastMap<(u32, Cow<'_, str>, bool), (usize, PathField)> =
        FastMap::with_capacity_and_hasher(paths_hint, Default::default());
    // The default backend and the Ingress it came from (`None`: the flag).
    let mut default_backend: Option<(ClusterId, Option<ObjectRef>)> = None;
    let mut default_backend_max_body_size = None;
    let mut tls_hosts: BTreeMap<HostPattern, TlsHost> = BTreeMap::new();
    let mut tls_secrets: BTreeSet<ObjectRef> = BTreeSet::new();
    let mut tls_policies: BTreeMap<ObjectRef, IngressTls> = BTreeMap::new();
    for (ii, &(input_index, ing)) in ours.iter().enumerate() {
        let id = object_ref(&ing.metadata);
        let namespace = ns_name(&ing.metadata).0;
        if let Some(policy) = ingress_tls(ing, &id, &mut diags) {
            tls_policies.insert(id.clone(), policy);
        }
        let max_body_size = ingress_max_body_size(ing, &id, &mut diags);
        let Some(spec) = ing.spec.as_ref() else {
            diags.push(Severity::Warning, "Ingress", &id, "spec", "has no spec");
            continue;
        };
        let rules = spec.rules.as_deref().unwrap_or_default();
        if rules.is_empty() && spec.default_backend.is_none() {
            diags.push(
                Severity::Warning,
                "Ingress",
                &id,
                "spec",
                "has no rules and no defaultBackend; it routes nothing",
            );
        }
        if let Some(backend) = &spec.default_backend
            && let Some(cluster) = resolver.backend(
                backend,
                namespace,
                (&id, input_index),
                BackendField::Default,
                &mut diags,
            )
        {
            match &default_backend {
                None => {
                    default_backend = Some((cluster, Some(id.clone())));
                    default_backend_max_body_size = max_body_size;
                }
                Some((_, winner)) => diags.push(
                    Severity::Warning,
                    "Ingress",
                    &id,
                    "spec.defaultBackend",
                    format!(
                        "ignored: the older Ingress {} already sets the default backend",
                        winner.as_ref().map(ToString::to_string).unwrap_or_default()
                    ),
                ),
            }
        }
        let mut rule_hosts = Vec::new();
        for (ri, rule) in rules.iter().enumerate() {
            let host = match HostPattern::parse(rule.host.as_deref().unwrap_or_default()) {
                Ok(h) => h,
                Err(reason) => {
                    diags.push(
                        Severity::Error,
                        "Ingress",
                        &id,
                        format!("spec.rules[{ri}].host"),
                        reason,
                    );
                    continue;
                }
            };
            if host != HostPattern::Any && spec.tls.is_some() {
                rule_hosts.push(host.clone());
            }
            let Some(http) = &rule.http else { continue };
            let host_id = match host_ids.get(&host) {
                Some(&n) => n,
                None => {
                    let n = host_ids.len() as u32;
                    host_ids.insert(host.clone(), n);
                    n
                }
            };
            for (pi, p) in http.paths.iter().enumerate() {
                let field = PathField { ri, pi };
                let path_type = match PathType::parse(&p.path_type) {
                    Some(t) => t,
                    None if p.path_type.is_empty() => {
                        diags.push(
                            Severity::Error,
                            "Ingress",
                            &id,
                            format!("{field}.pathType"),
                            "pathType is required (Exact, Prefix or ImplementationSpecific)",
                        );
                        continue;
                    }
                    None => {
                        diags.push(
                            Severity::Error,
                            "Ingress",
                            &id,
                            format!("{field}.pathType"),
                            format!(
                                "unknown pathType `{}` (want Exact, Prefix or ImplementationSpecific)",
                                p.path_type
                            ),
                        );
                        continue;
                    }
                };
                let raw_path = match p.path.as_deref() {
                    Some(s) if !s.is_empty() => s,
                    _ if path_type == PathType::ImplementationSpecific => "/",
                    _ => {
                        diags.push(
                            Severity::Error,
                            "Ingress",
                            &id,
                            format!("{field}.path"),
                            format!("path is required for pathType {path_type}"),
                        );
                        continue;
                    }
                };
                // With --path-normalization on, requests are routed by their normalised
                // path, so the rule is too: a rule that normalisation would rewrite is
                // matched in its normal form, and one it refuses could never match.
                let raw_path: Cow<'_, str> = if options.normalize_paths {
                    match crate::model::path::normalize(raw_path) {
                        Ok(Cow::Borrowed(p)) => Cow::Borrowed(p),
                        Ok(Cow::Owned(normal)) => {
                            diags.push(
                                Severity::Warning,
                                "Ingress",
                                &id,
                                format!("{field}.path"),
                                format!(
                                    "path {raw_path} is matched as {normal}: request paths are normalised before routing (--path-normalization on)"
                                ),
                            );
                            Cow::Owned(normal)
                        }
                        Err(e) => {
                            diags.push(
                                Severity::Error,
                                "Ingress",
                                &id,
                                format!("{field}.path"),
                                format!(
                                    "path {raw_path} can never match a request: {e} (--path-normalization on refuses such requests)"
                                ),
                            );
                            continue;
                        }
                    }
                } else {
                    Cow::Borrowed(raw_path)
                };
                let rule_path = match PathRule::new(&raw_path, path_type) {
                    Ok(r) => r,
                    Err(reason) => {
                        diags.push(
                            Severity::Error,
                            "Ingress",
                            &id,
                            format!("{field}.path"),
                            reason,
                        );
                        continue;
                    }
                };
                let match_key = match raw_path.clone() {
                    Cow::Borrowed(p) if path_type.is_exact() => Cow::Borrowed(p),
                    Cow::Borrowed(p) => Cow::Borrowed(p.trim_end_matches('/')),
                    Cow::Owned(p) if path_type.is_exact() => Cow::Owned(p),
                    Cow::Owned(p) => Cow::Owned(p.trim_end_matches('/').to_string()),
                };
                let key = (host_id, match_key, path_type.is_exact());
                if let Some(&(winner, winner_field)) = taken.get(&key) {
                    let winner = object_ref(&ours[winner].1.metadata);
                    // The same Ingress repeating a path is a slip, not a conflict between
                    // owners: name the earlier path rather than the Ingress itself.
                    let (severity, reason) = if winner == id {
                        (
                            Severity::Warning,
                            format!(
                                "duplicate: host {host} path {raw_path} ({path_type}) is already served by {winner_field} of this Ingress"
                            ),
                        )
                    } else {
                        (
                            Severity::Error,
                            format!(
                                "conflict: host {host} path {raw_path} ({path_type}) is already served by the older Ingress {winner}"
                            ),
                        )
                    };
                    diags.push(severity, "Ingress", &id, field.to_string(), reason);
                    continue;
                }
                let Some(cluster) = resolver.backend(
                    &p.backend,
                    namespace,
                    (&id, input_index),
                    BackendField::Path(field),
                    &mut diags,
                ) else {
                    continue;
                };
                taken.insert(key, (ii, field));
                routes.push(Route {
                    host: host.clone(),
                    path: rule_path,
                    ingress: id.clone(),
                    rule_index: ri,
                    path_index: pi,
                    order: routes.len() as u32,
                    cluster,
                    max_body_size,
                });
            }
        }
        for (ti, tls) in spec.tls.as_deref().unwrap_or_default().iter().enumerate() {
            let field = format!("spec.tls[{ti}]");
            let Some(secret_name) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
                diags.push(
                    Severity::Warning,
                    "Ingress",
                    &id,
                    format!("{field}.secretName"),
                    "no secretName: these hosts get the default certificate",
                );
                continue;
            };
            let secret = ObjectRef::new(id.namespace.clone(), secret_name);
            let hosts: Vec<HostPattern> = match tls.hosts.as_deref() {
                Some(hs) if !hs.is_empty() => {
                    let mut out = Vec::new();
                    for (hi, h) in hs.iter().enumerate() {
                        match HostPattern::parse(h) {
                            Ok(HostPattern::Any) | Err(_) => diags.push(
                                Severity::Error,
                                "Ingress",
                                &id,
                                format!("{field}.hosts[{hi}]"),
                                format!("`{h}` is not a valid TLS host"),
                            ),
                            Ok(p) => out.push(p),
                        }
                    }
                    out
                }
                // A tls entry without hosts covers the Ingress' own rule hosts.
                _ => rule_hosts.clone(),
            };
            tls_secrets.insert(secret.clone());
            for host in hosts {
                match tls_hosts.get(&host) {
                    Some(existing) if existing.secret != secret => diags.push(
                        Severity::Error,
                        "Ingress",
                        &id,
                        field.clone(),
                        format!(
                            "TLS host {host} already uses Secret {} from the older Ingress {}",
                            existing.secret, existing.ingress
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        tls_hosts.insert(
                            host,
                            TlsHost {
                                secret: secret.clone(),
                                ingress: id.clone(),
                            },
                        );
                    }
                }
            }
        }
    }

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

    // Certificates of the Secrets our TLS hosts name.
    let secrets: HashMap<ObjectRef, &Secret> = inputs
        .secrets
        .iter()
        .map(|s| (object_ref(&s.metadata), s.as_ref()))
        .collect();
    let mut certs = HashMap::new();
    let flag_only = options
        .default_ssl_certificate
        .as_ref()
        .filter(|d| !tls_secrets.contains(*d));
    if let Some(d) = flag_only {
        tls_secrets.insert(d.clone());
    }
    for secret_id in &tls_secrets {
        let parsed = match secrets.get(secret_id) {
            None if Some(secret_id) == flag_only => Err(SecretError {
                field: "--default-ssl-certificate",
                reason: "Secret not found: the generated self-signed certificate is the default"
                    .into(),
            }),
            None => Err(SecretError {
                field: "",
                reason: "Secret not found: its hosts get the default certificate".into(),
            }),
            Some(secret) => parse_tls_secret(secret),
        };
        match parsed {
            Ok(entry) => {
                certs.insert(secret_id.clone(), Arc::new(entry));
            }
            Err(e) => {
                let keep = secrets
                    .contains_key(secret_id)
                    .then(|| last_good_certs.get(secret_id))
                    .flatten();
                let reason = match keep {
                    Some(_) => format!("{}; the last good certificate stays in use", e.reason),
                    None if secrets.contains_key(secret_id) && Some(secret_id) == flag_only => {
                        format!(
                            "{}; the generated self-signed certificate is the default",
                            e.reason
                        )
                    }
                    None if secrets.contains_key(secret_id) => {
                        format!("{}; its hosts get the default certificate", e.reason)
                    }
                    None => e.reason,
                };
                diags.push(Severity::Error, "Secret", secret_id, e.field, reason);
                if let Some(entry) = keep {
                    certs.insert(secret_id.clone(), entry.clone());
                }
            }
        }
    }

    // Orphans depend on Services and EndpointSlices only: a prior build's still hold.
    let orphans = match prior {
        Some((_, reuse)) => reuse.orphans.clone(),
        None => resolver.orphan_slices(),
    };

    let (table, failed) = RouteTable::build(routes);
    for (route, reason) in failed {
        diags.push(
            Severity::Error,
            "Ingress",
            &route.ingress,
            format!(
                "spec.rules[{}].http.paths[{}].path",
                route.rule_index, route.path_index
            ),
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
    let diagnostics = reuse.diagnostics(&clusters, &inputs.ingresses);
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
        diagnostics,
    };
    (snapshot, reuse)
}

impl Reuse {
    /// All diagnostics of a build: the fixed ones and those the clusters' endpoints
    /// cause, sorted, without duplicates.
    fn diagnostics(
        &self,
        clusters: &[Arc<Cluster>],
        ingresses: &[Arc<Ingress>],
    ) -> Vec<Diagnostic> {
        let mut diags = Diags(self.fixed.clone());
        for u in &self.uses {
            let cluster = &clusters[u.cluster as usize];
            if matches!(cluster.upstream, Upstream::Endpoints { .. })
                && cluster.active_endpoints().is_empty()
            {
                diags.push(
                    Severity::Warning,
                    "Ingress",
                    &object_ref(&ingresses[u.ingress as usize].metadata),
                    format!("{}.service", u.field),
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

/// The TLS annotations of an Ingress, if it sets any; malformed values are ignored with
/// a warning.
fn ingress_tls(ing: &Ingress, id: &ObjectRef, diags: &mut Diags) -> Option<IngressTls> {
    let annotations = ing.metadata.annotations.as_ref()?;
    let mut policy = IngressTls::default();
    if let Some(v) = annotations.get(SSL_REDIRECT_ANNOTATION) {
        match v.trim() {
            "true" => policy.ssl_redirect = Some(true),
            "false" => policy.ssl_redirect = Some(false),
            other => diags.push(
                Severity::Warning,
                "Ingress",
                id,
                format!("metadata.annotations[{SSL_REDIRECT_ANNOTATION}]"),
                format!("`{other}` is neither \"true\" nor \"false\"; ignored"),
            ),
        }
    }
    if let Some(v) = annotations.get(HSTS_ANNOTATION) {
        let v = v.trim();
        if !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            policy.hsts = Some(v.to_string());
        } else {
            diags.push(
                Severity::Warning,
                "Ingress",
                id,
                format!("metadata.annotations[{HSTS_ANNOTATION}]"),
                "not a usable header value (visible ASCII, such as max-age=31536000); ignored",
            );
        }
    }
    (policy != IngressTls::default()).then_some(policy)
}

/// The Ingress' `portcullis.io/max-body-size`, if it sets a valid one. An invalid value
/// is an error diagnostic, and the Ingress keeps the global limit.
fn ingress_max_body_size(ing: &Ingress, id: &ObjectRef, diags: &mut Diags) -> Option<u64> {
    let value = ing
        .metadata
        .annotations
        .as_ref()?
        .get(MAX_BODY_SIZE_ANNOTATION)?;
    match crate::model::size::parse_size(value) {
        Ok(n) => Some(n),
        Err(reason) => {
            diags.push(
                Severity::Error,
                "Ingress",
                id,
                format!("metadata.annotations[{MAX_BODY_SIZE_ANNOTATION}]"),
                format!("{reason}; the global --max-body-size applies to this Ingress"),
            );
            None
        }
    }
}

/// Sort key for "oldest wins": creationTimestamp (absent sorts first), then
/// namespace/name.
fn age_key(ing: &Ingress) -> (Option<i64>, (&str, &str)) {
    let ts = ing
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_nanosecond() as i64);
    (ts, ns_name(&ing.metadata))
}

/// `Ok` when the Ingress is ours, else the reason it is ignored.
fn classify(
    ing: &Ingress,
    classes: &FastMap<&str, (bool, Option<&str>)>,
    default_ours: bool,
    options: &Options,
) -> Result<(), String> {
    let class_name = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref());
    if let Some(name) = class_name {
        return match classes.get(name) {
            Some((true, _)) => Ok(()),
            Some((false, controller)) => Err(format!(
                "IngressClass {name} belongs to controller {}, not {}",
                controller.unwrap_or("(none)"),
                options.controller_name
            )),
            None => Err(format!("IngressClass {name} not found")),
        };
    }
    let annotation = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION));
    if let Some(value) = annotation {
        return if *value == options.ingress_class {
            Ok(())
        } else {
            Err(format!(
                "annotation {LEGACY_CLASS_ANNOTATION}={value} is not {}",
                options.ingress_class
            ))
        };
    }
    if default_ours || options.watch_without_class {
        Ok(())
    } else {
        Err("names no IngressClass, and no IngressClass of ours is the default".into())
    }
}

/// Services, and EndpointSlices by the Service they are labelled with.
struct Index<'a> {
    /// By (namespace, name), borrowed from the inputs.
    services: FastMap<(&'a str, &'a str), &'a Service>,
    /// By the (namespace, name) of the Service they are labelled with, sorted by name.
    slices: FastMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> Index<'a> {
    /// The Services (and the EndpointSlices labelled with them) whose `(namespace, name)`
    /// `keep` accepts; `capacity` is how many to expect.
    fn new(inputs: &'a Inputs, capacity: usize, keep: impl Fn(&(&str, &str)) -> bool) -> Self {
        let services = inputs
            .services
            .iter()
            .map(|s| (ns_name(&s.metadata), s.as_ref()))
            .filter(|(key, _)| keep(key))
            .collect();
        let mut slices: FastMap<(&str, &str), Vec<&EndpointSlice>> =
            FastMap::with_capacity_and_hasher(capacity, Default::default());
        for s in &inputs.endpoint_slices {
            if let Some(key) = slice_service(s)
                && keep(&key)
            {
                slices.entry(key).or_default().push(s);
            }
        }
        for list in slices.values_mut() {
            if list.len() > 1 {
                list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            }
        }
        Index { services, slices }
    }
}

/// The clusters of an earlier build from the same Services, EndpointSlices and options:
/// a cluster found here is taken as it is instead of being resolved again.
struct Prior<'a> {
    /// Service (namespace, name) → its clusters in `clusters`.
    ids: FastMap<(&'a str, &'a str), Vec<(PortKey<'a>, ClusterId)>>,
    clusters: &'a [Arc<Cluster>],
    refused: &'a [Vec<Diagnostic>],
}

impl<'a> Prior<'a> {
    fn new(snapshot: &'a Snapshot, reuse: &'a Reuse) -> Self {
        let mut ids: FastMap<(&str, &str), Vec<(PortKey, ClusterId)>> =
            FastMap::with_capacity_and_hasher(snapshot.clusters.len(), Default::default());
        for (id, c) in snapshot.clusters.iter().enumerate() {
            let port = PortKey::from(&c.port);
            ids.entry((c.service.namespace.as_str(), c.service.name.as_str()))
                .or_default()
                .push((port, id as ClusterId));
        }
        Prior {
            ids,
            clusters: &snapshot.clusters,
            refused: &reuse.refused,
        }
    }
}

/// Resolves backends to clusters, once per Service port.
struct Resolver<'a> {
    inputs: &'a Inputs,
    /// Built when a cluster is first resolved.
    index: OnceCell<Index<'a>>,
    prior: Option<Prior<'a>>,
    /// Service (namespace, name) → the clusters made for its ports.
    ids: FastMap<(&'a str, &'a str), Vec<(PortKey<'a>, ClusterId)>>,
    clusters: Vec<Arc<Cluster>>,
    /// The endpoint safety rules of `options`.
    policy: EndpointPolicy,
    /// Per cluster, the diagnostics of what its Service or EndpointSlices point at and
    /// cannot be used (refused addresses, bad ExternalNames).
    refused: Vec<Vec<Diagnostic>>,
    /// Every backend that resolved to pod endpoints.
    uses: Vec<Use>,
}

impl<'a> Resolver<'a> {
    /// A resolver over all of `inputs`; with `prior`, clusters of an earlier build from
    /// the same Services and EndpointSlices are taken from there.
    fn new(inputs: &'a Inputs, options: &'a Options, prior: Option<Prior<'a>>) -> Self {
        Self::with(
            inputs,
            options,
            OnceCell::new(),
            prior,
            inputs.services.len(),
        )
    }

    /// A resolver that knows only what `index` holds, for a few clusters.
    fn with_index(inputs: &'a Inputs, options: &'a Options, index: Index<'a>) -> Self {
        Self::with(inputs, options, OnceCell::from(index), None, 0)
    }

    fn with(
        inputs: &'a Inputs,
        options: &'a Options,
        index: OnceCell<Index<'a>>,
        prior: Option<Prior<'a>>,
        capacity: usize,
    ) -> Self {
        Resolver {
            policy: options.endpoint_policy(),
            inputs,
            index,
            prior,
            ids: FastMap::with_capacity_and_hasher(capacity, Default::default()),
            clusters: Vec::with_capacity(capacity),
            refused: Vec::with_capacity(capacity),
            uses: Vec::new(),
        }
    }

    fn index(&self) -> &Index<'a> {
        self.index
            .get_or_init(|| Index::new(self.inputs, self.inputs.services.len(), |_| true))
    }

    /// The cluster of an Ingress backend, with a diagnostic when it is unresolved. `None`
    /// when the backend itself is malformed (no route is made for it). `ingress` is the
    /// Ingress and its index in [`Inputs::ingresses`]; a backend with pod endpoints is
    /// recorded in `uses`, so that it is warned about while they are empty.
    fn backend(
        &mut self,
        backend: &'a IngressBackend,
        namespace: &'a str,
        (ingress, ingress_index): (&ObjectRef, u32),
        field: BackendField,
        diags: &mut Diags,
    ) -> Option<ClusterId> {
        let Some(svc) = &backend.service else {
            let reason = if backend.resource.is_some() {
                "resource backends are not supported; use service"
            } else {
                "backend names no service"
            };
            diags.push(
                Severity::Error,
                "Ingress",
                ingress,
                field.to_string(),
                reason,
            );
            return None;
        };
        let port = match svc.port.as_ref().map(|p| (p.number, p.name.as_deref())) {
            Some((Some(n), _)) => PortKey::Number(n),
            Some((None, Some(name))) if !name.is_empty() => PortKey::Name(name),
            _ => {
                diags.push(
                    Severity::Error,
                    "Ingress",
                    ingress,
                    format!("{field}.service.port"),
                    "service port needs a number or a name",
                );
                return None;
            }
        };
        let id = self.cluster((namespace, svc.name.as_str()), port);
        if let Some(reason) = self.unresolved(id) {
            diags.push(
                Severity::Error,
                "Ingress",
                ingress,
                format!("{field}.service"),
                format!("{reason}; the route answers 503 until it is fixed"),
            );
        } else if matches!(
            self.clusters[id as usize].upstream,
            Upstream::Endpoints { .. }
        ) {
            self.uses.push(Use {
                cluster: id,
                ingress: ingress_index,
                field,
            });
        }
        Some(id)
    }

    fn unresolved(&self, id: ClusterId) -> Option<&str> {
        match &self.clusters[id as usize].upstream {
            Upstream::Unresolved { reason } => Some(reason),
            _ => None,
        }
    }

    /// The cluster of a Service port, resolved on first use. Looking up one already made
    /// allocates nothing.
    fn cluster(&mut self, service: (&'a str, &'a str), port: PortKey<'a>) -> ClusterId {
        if let Some(ports) = self.ids.get(&service)
            && let Some(&(_, id)) = ports.iter().find(|(p, _)| *p == port)
        {
            return id;
        }
        let prior = self.prior.as_ref().and_then(|prior| {
            let ports = prior.ids.get(&service)?;
            let &(_, old) = ports.iter().find(|(p, _)| *p == port)?;
            Some((
                prior.clusters[old as usize].clone(),
                prior.refused[old as usize].clone(),
            ))
        });
        let (cluster, refused) = match prior {
            Some(found) => found,
            None => {
                let port_ref = match port {
                    PortKey::Number(n) => PortRef::Number(n),
                    PortKey::Name(name) => PortRef::Name(name.to_string()),
                };
                let mut refused = Vec::new();
                let cluster = self.resolve(
                    &ObjectRef::new(service.0, service.1),
                    &port_ref,
                    &mut refused,
                );
                (Arc::new(cluster), refused)
            }
        };
        let id = self.clusters.len() as ClusterId;
        self.clusters.push(cluster);
        self.refused.push(refused);
        self.ids.entry(service).or_default().push((port, id));
        id
    }

    /// The cluster of a Service port; what its Service or EndpointSlices point at and
    /// cannot be used (refused addresses, bad ExternalNames) is added to `refused`.
    fn resolve(
        &self,
        service: &ObjectRef,
        port: &PortRef,
        refused: &mut Vec<Diagnostic>,
    ) -> Cluster {
        let mut cluster = Cluster {
            service: service.clone(),
            port: port.clone(),
            service_port: None,
            app_protocol: None,
            upstream: Upstream::Unresolved {
                reason: String::new(),
            },
        };
        let unresolved = |reason: String| Upstream::Unresolved { reason };
        let key = (service.namespace.as_str(), service.name.as_str());
        let index = self.index();
        let Some(svc) = index.services.get(&key).copied() else {
            cluster.upstream = unresolved(format!("Service {service} not found"));
            return cluster;
        };
        let empty;
        let spec: &ServiceSpec = match svc.spec.as_ref() {
            Some(spec) => spec,
            None => {
                empty = ServiceSpec::default();
                &empty
            }
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let sp: Option<&ServicePort> = ports.iter().find(|p| match port {
            PortRef::Number(n) => p.port == *n,
            PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
        });

        if spec.type_.as_deref() == Some("ExternalName") {
            let host = spec.external_name.clone().unwrap_or_default();
            let number = match (sp, port) {
                (Some(p), _) => p.port,
                (None, PortRef::Number(n)) => *n,
                (None, PortRef::Name(name)) => {
                    cluster.upstream =
                        unresolved(format!("Service {service} has no port named {name}"));
                    return cluster;
                }
            };
            cluster.service_port = Some(number);
            cluster.app_protocol = sp.and_then(|p| p.app_protocol.clone());
            cluster.upstream = match external_name_problem(&host, number, &self.policy) {
                Some(reason) => {
                    refused.push(Diagnostic {
                        severity: Severity::Error,
                        kind: "Service".into(),
                        namespace: service.namespace.clone(),
                        name: service.name.clone(),
                        field: "spec.externalName".into(),
                        reason: format!("{reason}; its routes answer 503"),
                    });
                    unresolved(format!("ExternalName Service {service}: {reason}"))
                }
                None => match u16::try_from(number) {
                    Ok(port) if port > 0 => Upstream::ExternalName { host, port },
                    _ => unresolved(format!("Service {service} port {number} is out of range")),
                },
            };
            return cluster;
        }

        let Some(sp) = sp else {
            cluster.upstream = unresolved(match port {
                PortRef::Number(n) => format!("Service {service} has no port {n}"),
                PortRef::Name(name) => format!("Service {service} has no port named {name}"),
            });
            return cluster;
        };
        cluster.service_port = Some(sp.port);
        cluster.app_protocol = sp.app_protocol.clone();

        let slices = index
            .slices
            .get(&key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut all: Vec<Endpoint> = Vec::with_capacity(
            slices
                .iter()
                .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
                .sum(),
        );
        for slice in slices {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue;
            }
            let Some(target) = slice_port(slice, sp, ports.len()) else {
                continue;
            };
            let mut refuse = |field: String, reason: String| {
                let slice = object_ref(&slice.metadata);
                refused.push(Diagnostic {
                    severity: Severity::Warning,
                    kind: "EndpointSlice".into(),
                    namespace: slice.namespace,
                    name: slice.name,
                    field,
                    reason,
                });
            };
            for (i, ep) in slice
                .endpoints
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let Some(address) = ep.addresses.first() else {
                    continue;
                };
                let ip = match slice_address(address, &slice.address_type) {
                    Ok(ip) => ip,
                    Err(reason) => {
                        refuse(format!("endpoints[{i}].addresses[0]"), reason);
                        continue;
                    }
                };
                let addr = SocketAddr::new(ip, target);
                if let Some(reason) = self.policy.refusal(addr) {
                    refuse(
                        "endpoints".into(),
                        format!("endpoint refused: {addr}: {reason}"),
                    );
                    continue;
                }
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let endpoint = Endpoint {
                    address: addr,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                };
                all.push(endpoint);
            }
        }
        // Sorted by address; the same address in two slices (during slice churn) is
        // merged into its best view.
        all.sort_unstable_by_key(|e| e.address);
        all.dedup_by(|later, kept| {
            if later.address != kept.address {
                return false;
            }
            kept.ready |= later.ready;
            kept.serving |= later.serving;
            kept.terminating &= later.terminating;
            true
        });
        let mut active: Vec<SocketAddr> =
            all.iter().filter(|e| e.ready).map(|e| e.address).collect();
        if active.is_empty() {
            active = all
                .iter()
                .filter(|e| e.serving)
                .map(|e| e.address)
                .collect();
        }
        cluster.upstream = Upstream::Endpoints { all, active };
        cluster
    }

    /// Diagnostics for EndpointSlices whose Service is missing, by that Service.
    fn orphan_slices(&self) -> Vec<(ObjectRef, Diagnostic)> {
        let mut out = Vec::new();
        let index = self.index();
        for (service, slices) in &index.slices {
            if !index.services.contains_key(service) {
                let service = ObjectRef::new(service.0, service.1);
                for s in slices {
                    let slice = object_ref(&s.metadata);
                    out.push((
                        service.clone(),
                        Diagnostic {
                            severity: Severity::Warning,
                            kind: "EndpointSlice".into(),
                            namespace: slice.namespace,
                            name: slice.name,
                            field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                            reason: format!("Service {service} not found"),
                        },
                    ));
                }
            }
        }
        out
    }
}

/// The `(namespace, name)` of the Service an EndpointSlice is labelled with, if any.
fn slice_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((ns_name(&slice.metadata).0, svc.as_str()))
}

/// The EndpointSlice port that carries a Service port: matched by port name (as the
/// EndpointSlice controller writes it), else by a numeric targetPort, else the only port
/// of a single-port slice for a single-port Service (hand-written slices).
fn slice_port(slice: &EndpointSlice, sp: &ServicePort, service_ports: usize) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let want = sp.name.as_deref().unwrap_or("");
    let found = ports
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == want)
        .or_else(|| match &sp.target_port {
            Some(IntOrString::Int(n)) => ports.iter().find(|p| p.port == Some(*n)),
            _ => None,
        })
        .or_else(|| (ports.len() == 1 && service_ports == 1).then(|| &ports[0]))?;
    found
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
}

impl Options {
    /// The endpoint safety rules of this build (shared with the data path).
    pub fn endpoint_policy(&self) -> EndpointPolicy {
        EndpointPolicy {
            allow_local: self.allow_local_endpoints,
            own_addresses: self.own_addresses.clone(),
        }
    }
}

/// Why an ExternalName value must not be used on the Service port `port`, if it must
/// not: not a DNS name, a loopback name outside file mode, or an IP literal the endpoint
/// rules refuse (its own listeners included, by port). The addresses a name resolves to
/// are checked when connecting.
fn external_name_problem(host: &str, port: i32, policy: &EndpointPolicy) -> Option<String> {
    if host.is_empty() {
        return Some("spec.externalName is empty".into());
    }
    if !safety::is_dns_name(host) {
        return Some(format!("`{host}` is not a valid DNS name"));
    }
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    if !policy.allow_local && (lower == "localhost" || lower.ends_with(".localhost")) {
        return Some(format!("{host} is loopback"));
    }
    if let Ok(ip) = lower.parse::<IpAddr>() {
        // A port out of range is refused later, with its own reason.
        let port = u16::try_from(port).unwrap_or(0);
        return policy
            .refusal(SocketAddr::new(ip, port))
            .map(|r| format!("{host}: {r}"));
    }
    None
}

/// An EndpointSlice endpoint's address, or why it does not fit the slice's
/// `addressType` (`IPv4` or `IPv6`).
fn slice_address(address: &str, address_type: &str) -> Result<IpAddr, String> {
    match (address.parse::<IpAddr>(), address_type) {
        (Ok(ip @ IpAddr::V4(_)), "IPv4") | (Ok(ip @ IpAddr::V6(_)), "IPv6") => Ok(ip),
        _ => Err(format!(
            "`{address}` is not an {address_type} address, as the slice's addressType says; refused"
        )),
    }
}
