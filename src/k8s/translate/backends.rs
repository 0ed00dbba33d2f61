//! Backend resolution, the second stage of translation: a Service port becomes a
//! [`Cluster`] (Service → EndpointSlices → endpoints, or an ExternalName), once per
//! build, with the endpoint safety rules applied. Every source kind asks the same
//! [`Resolver`], so a Service named by an Ingress and an HTTPRoute is one cluster.

use std::cell::OnceCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ingress::Use;
use super::{FastMap, Inputs, Options, Reuse, SERVICE_NAME_LABEL, ns_name, object_ref};
use crate::model::safety::{self, EndpointPolicy};
use crate::model::{
    Cluster, ClusterId, Diagnostic, Endpoint, ObjectRef, PortRef, Severity, Snapshot, Upstream,
};

/// A Service port as a backend names it, borrowed from the Ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PortKey<'a> {
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

/// Services, and EndpointSlices by the Service they are labelled with.
pub(super) struct Index<'a> {
    /// By (namespace, name), borrowed from the inputs.
    pub(super) services: FastMap<(&'a str, &'a str), &'a Service>,
    /// By the (namespace, name) of the Service they are labelled with, sorted by name.
    pub(super) slices: FastMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> Index<'a> {
    /// The Services (and the EndpointSlices labelled with them) whose `(namespace, name)`
    /// `keep` accepts; `capacity` is how many to expect.
    pub(super) fn new(
        inputs: &'a Inputs,
        capacity: usize,
        keep: impl Fn(&(&str, &str)) -> bool,
    ) -> Self {
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
pub(super) struct Prior<'a> {
    /// Service (namespace, name) → its clusters in `clusters`.
    pub(super) ids: FastMap<(&'a str, &'a str), Vec<(PortKey<'a>, ClusterId)>>,
    pub(super) clusters: &'a [Arc<Cluster>],
    pub(super) refused: &'a [Vec<Diagnostic>],
}

impl<'a> Prior<'a> {
    pub(super) fn new(snapshot: &'a Snapshot, reuse: &'a Reuse) -> Self {
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
pub(super) struct Resolver<'a> {
    pub(super) inputs: &'a Inputs,
    /// Built when a cluster is first resolved.
    pub(super) index: OnceCell<Index<'a>>,
    pub(super) prior: Option<Prior<'a>>,
    /// Service (namespace, name) → the clusters made for its ports.
    pub(super) ids: FastMap<(&'a str, &'a str), Vec<(PortKey<'a>, ClusterId)>>,
    pub(super) clusters: Vec<Arc<Cluster>>,
    /// The endpoint safety rules of `options`.
    pub(super) policy: EndpointPolicy,
    /// Per cluster, the diagnostics of what its Service or EndpointSlices point at and
    /// cannot be used (refused addresses, bad ExternalNames).
    pub(super) refused: Vec<Vec<Diagnostic>>,
    /// Every backend that resolved to pod endpoints.
    pub(super) uses: Vec<Use>,
}

impl<'a> Resolver<'a> {
    /// A resolver over all of `inputs`; with `prior`, clusters of an earlier build from
    /// the same Services and EndpointSlices are taken from there.
    pub(super) fn new(inputs: &'a Inputs, options: &'a Options, prior: Option<Prior<'a>>) -> Self {
        Self::with(
            inputs,
            options,
            OnceCell::new(),
            prior,
            inputs.services.len(),
        )
    }

    /// A resolver that knows only what `index` holds, for a few clusters.
    pub(super) fn with_index(inputs: &'a Inputs, options: &'a Options, index: Index<'a>) -> Self {
        Self::with(inputs, options, OnceCell::from(index), None, 0)
    }

    pub(super) fn with(
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

    /// The Service's `(namespace, name)` as the inputs hold them, if it exists.
    pub(super) fn service_key(&self, namespace: &str, name: &str) -> Option<(&'a str, &'a str)> {
        let index = self.index();
        let service: &'a Service = index.services.get(&(namespace, name)).copied()?;
        Some(ns_name(&service.metadata))
    }

    pub(super) fn index(&self) -> &Index<'a> {
        self.index
            .get_or_init(|| Index::new(self.inputs, self.inputs.services.len(), |_| true))
    }

    pub(super) fn unresolved(&self, id: ClusterId) -> Option<&str> {
        match &self.clusters[id as usize].upstream {
            Upstream::Unresolved { reason } => Some(reason),
            _ => None,
        }
    }

    /// The cluster of a Service port, resolved on first use. Looking up one already made
    /// allocates nothing.
    pub(super) fn cluster(&mut self, service: (&'a str, &'a str), port: PortKey<'a>) -> ClusterId {
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
    pub(super) fn resolve(
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
    pub(super) fn orphan_slices(&self) -> Vec<(ObjectRef, Diagnostic)> {
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
pub(super) fn slice_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((ns_name(&slice.metadata).0, svc.as_str()))
}

/// The EndpointSlice port that carries a Service port: matched by port name (as the
/// EndpointSlice controller writes it), else by a numeric targetPort, else the only port
/// of a single-port slice for a single-port Service (hand-written slices).
pub(super) fn slice_port(
    slice: &EndpointSlice,
    sp: &ServicePort,
    service_ports: usize,
) -> Option<u16> {
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
pub(super) fn external_name_problem(
    host: &str,
    port: i32,
    policy: &EndpointPolicy,
) -> Option<String> {
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
pub(super) fn slice_address(address: &str, address_type: &str) -> Result<IpAddr, String> {
    match (address.parse::<IpAddr>(), address_type) {
        (Ok(ip @ IpAddr::V4(_)), "IPv4") | (Ok(ip @ IpAddr::V6(_)), "IPv6") => Ok(ip),
        _ => Err(format!(
            "`{address}` is not an {address_type} address, as the slice's addressType says; refused"
        )),
    }
}
