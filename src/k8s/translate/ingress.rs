//! Ingress, one source kind of translation: each rule path of an Ingress of ours
//! becomes a route; its `spec.defaultBackend`, TLS entries and `portcullis.io/*`
//! annotations become the default backend, TLS hosts and per-Ingress policies.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

use super::backends::{PortKey, Resolver};
use super::{
    Age, Diags, FastMap, HSTS_ANNOTATION, MAX_BODY_SIZE_ANNOTATION, Options,
    SSL_REDIRECT_ANNOTATION, normalize_rule_path, ns_name, object_ref,
};
use crate::model::tls::{IngressTls, TlsHost};
use crate::model::{
    ClusterId, HostPattern, ObjectRef, PathRule, PathType, Route, RouteKind, RouteSource, Severity,
    Upstream,
};

/// What the Ingresses of a build contribute besides diagnostics.
#[derive(Default)]
pub(super) struct IngressOutput {
    /// One per servable rule path, in age order (oldest Ingress, then rule, then path).
    pub routes: Vec<Route>,
    /// The default backend and the Ingress it came from (`None`: the flag).
    pub default_backend: Option<(ClusterId, Option<ObjectRef>)>,
    /// The request body limit of the Ingress the default backend came from.
    pub default_backend_max_body_size: Option<u64>,
    /// TLS hosts and the Secret each uses (the oldest Ingress' choice wins).
    pub tls_hosts: BTreeMap<HostPattern, TlsHost>,
    /// Every Secret a `spec.tls` entry names.
    pub tls_secrets: BTreeSet<ObjectRef>,
    /// Per-Ingress TLS annotations.
    pub tls_policies: BTreeMap<ObjectRef, IngressTls>,
}

/// Translates our Ingresses, given as (index in [`super::Inputs::ingresses`], Ingress)
/// in age order: routes with conflicts resolved oldest-first, the default backend, TLS
/// hosts and per-Ingress policies.
pub(super) fn translate<'a>(
    ours: &[(u32, &'a Ingress)],
    resolver: &mut Resolver<'a>,
    options: &Options,
    diags: &mut Diags,
) -> IngressOutput {
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
        if let Some(policy) = ingress_tls(ing, &id, diags) {
            tls_policies.insert(id.clone(), policy);
        }
        let max_body_size = ingress_max_body_size(ing, &id, diags);
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
                diags,
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
                let raw_path = match normalize_rule_path(raw_path, options.normalize_paths) {
                    Ok((path, warning)) => {
                        if let Some(w) = warning {
                            diags.push(
                                Severity::Warning,
                                "Ingress",
                                &id,
                                format!("{field}.path"),
                                w,
                            );
                        }
                        path
                    }
                    Err(e) => {
                        diags.push(Severity::Error, "Ingress", &id, format!("{field}.path"), e);
                        continue;
                    }
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
                    diags,
                ) else {
                    continue;
                };
                taken.insert(key, (ii, field));
                let mut route = Route::forward(
                    host.clone(),
                    rule_path,
                    RouteSource {
                        kind: RouteKind::Ingress,
                        object: id.clone(),
                        rule: ri,
                        match_index: pi,
                    },
                    cluster,
                );
                route.order = routes.len() as u32;
                route.max_body_size = max_body_size;
                routes.push(route);
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

    IngressOutput {
        routes,
        default_backend,
        default_backend_max_body_size,
        tls_hosts,
        tls_secrets,
        tls_policies,
    }
}

/// `spec.rules[R].http.paths[P]`, formatted only when a diagnostic needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct PathField {
    pub(super) ri: usize,
    pub(super) pi: usize,
}

/// Where an Ingress names a backend.
#[derive(Debug, Clone, Copy)]
pub(super) enum BackendField {
    /// `spec.rules[ri].http.paths[pi].backend`
    Path(PathField),
    /// `spec.defaultBackend`
    Default,
    /// An HTTPRoute's `spec.rules[rule].backendRefs[backend]`.
    RouteBackend { rule: u32, backend: u32 },
}

impl fmt::Display for BackendField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendField::Path(p) => write!(f, "{p}.backend"),
            BackendField::Default => f.write_str("spec.defaultBackend"),
            BackendField::RouteBackend { rule, backend } => {
                write!(f, "spec.rules[{rule}].backendRefs[{backend}]")
            }
        }
    }
}

/// A backend that resolved to pod endpoints: it gets a warning whenever the cluster
/// has no ready or serving endpoint.
#[derive(Debug, Clone, Copy)]
pub(super) struct Use {
    pub(super) cluster: ClusterId,
    /// The object, by index in its list of [`super::Inputs`].
    pub(super) object: UseObject,
    pub(super) field: BackendField,
}

/// Which object a [`Use`] is in.
#[derive(Debug, Clone, Copy)]
pub(super) enum UseObject {
    /// Index in [`super::Inputs::ingresses`].
    Ingress(u32),
    /// Index in [`super::Inputs::http_routes`].
    HttpRoute(u32),
}

impl fmt::Display for PathField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spec.rules[{}].http.paths[{}]", self.ri, self.pi)
    }
}

impl<'a> Resolver<'a> {
    /// The cluster of an Ingress backend, with a diagnostic when it is unresolved. `None`
    /// when the backend itself is malformed (no route is made for it). `ingress` is the
    /// Ingress and its index in [`Inputs::ingresses`]; a backend with pod endpoints is
    /// recorded in `uses`, so that it is warned about while they are empty.
    pub(super) fn backend(
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
                object: UseObject::Ingress(ingress_index),
                field,
            });
        }
        Some(id)
    }
}

/// The TLS annotations of an Ingress, if it sets any; malformed values are ignored with
/// a warning.
pub(super) fn ingress_tls(ing: &Ingress, id: &ObjectRef, diags: &mut Diags) -> Option<IngressTls> {
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
pub(super) fn ingress_max_body_size(
    ing: &Ingress,
    id: &ObjectRef,
    diags: &mut Diags,
) -> Option<u64> {
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
pub(super) fn age_key(ing: &Ingress) -> Age<'_> {
    Age::of(&ing.metadata)
}
