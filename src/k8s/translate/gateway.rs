//! Gateway API class and ownership: which GatewayClasses are ours, which Gateways they
//! make ours, how each Gateway listener maps onto one of our listeners, which
//! namespaces' routes a listener admits, and which cross-namespace references
//! ReferenceGrants permit. Routes attach to what this stage builds
//! ([`super::httproute`]).

use std::collections::BTreeMap;

use super::{Diags, FastMap, Inputs, Options, ns_name, object_ref};
use crate::k8s::gateway_api::gateways::{
    GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom,
    GatewayListenersAllowedRoutesNamespacesSelector,
};
use crate::model::gateway::{GatewayInfo, ListenerInfo};
use crate::model::{HostPattern, ObjectRef, Severity};

/// Gateway API's API group.
pub(super) const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The GatewayClass assumed in file mode when the inputs define none of ours.
pub(super) const ASSUMED_CLASS: &str = "portcullis";

/// The label every namespace carries with its own name (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Which namespaces a listener admits routes from.
#[derive(Debug, Clone)]
pub(super) enum AllowedNamespaces {
    /// The Gateway's own namespace (the default).
    Same,
    All,
    /// Namespaces whose labels match; `None` when the selector is invalid (nothing
    /// matches).
    Selector(Option<Selector>),
}

/// A label selector: `matchLabels` and `matchExpressions`, all of which must hold.
#[derive(Debug, Clone, Default)]
pub(super) struct Selector {
    labels: BTreeMap<String, String>,
    /// (key, operator, values) with operator In, NotIn, Exists or DoesNotExist.
    expressions: Vec<(String, String, Vec<String>)>,
}

impl Selector {
    fn from_spec(s: &GatewayListenersAllowedRoutesNamespacesSelector) -> Result<Selector, String> {
        let mut expressions = Vec::new();
        for e in s.match_expressions.as_deref().unwrap_or_default() {
            let values = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("operator {} needs values", e.operator));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("operator {} takes no values", e.operator));
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => return Err(format!("unknown operator `{other}`")),
            }
            expressions.push((e.key.clone(), e.operator.clone(), values));
        }
        Ok(Selector {
            labels: s.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(k, op, values)| {
                let got = labels.get(k);
                match op.as_str() {
                    "In" => got.is_some_and(|v| values.contains(v)),
                    "NotIn" => got.is_none_or(|v| !values.contains(v)),
                    "Exists" => got.is_some(),
                    _ => got.is_none(),
                }
            })
    }
}

/// One listener of one of our Gateways, ready for routes to attach.
#[derive(Debug)]
pub(super) struct Listener {
    pub name: String,
    pub port: i32,
    /// The listener's hostname; `None` admits every host.
    pub hostname: Option<HostPattern>,
    /// Which of our listeners serves it (`http`); `None` when not programmed.
    pub served_on: Option<&'static str>,
    /// Whether HTTPRoutes may attach (by `allowedRoutes.kinds` and the protocol).
    pub admits_http_route: bool,
    pub namespaces: AllowedNamespaces,
    /// Index of this listener in its Gateway's [`GatewayInfo::listeners`].
    pub info: usize,
}

/// One Gateway of ours.
#[derive(Debug)]
pub(super) struct OurGateway {
    pub object: ObjectRef,
    pub listeners: Vec<Listener>,
}

/// (target namespace, from kind, from namespace) → the (kind, name) it may refer to
/// there (`None`: any name).
type Grants<'a> = FastMap<(&'a str, &'a str, &'a str), Vec<(&'a str, Option<&'a str>)>>;

/// Gateway API ownership for one build: our classes, our Gateways, namespace labels and
/// ReferenceGrants.
pub(super) struct Gateways<'a> {
    pub classes: Vec<(String, bool)>,
    /// Our Gateways by namespace/name.
    pub gateways: FastMap<(&'a str, &'a str), OurGateway>,
    /// What the report says of each Gateway, filled as routes attach.
    pub infos: BTreeMap<ObjectRef, GatewayInfo>,
    namespaces: FastMap<&'a str, &'a BTreeMap<String, String>>,
    grants: Grants<'a>,
}

impl<'a> Gateways<'a> {
    /// Our GatewayClasses (by `spec.controllerName`; with `options.assume_class`, a class
    /// `portcullis` when the inputs define none of ours), our Gateways and their
    /// listeners.
    pub(super) fn new(inputs: &'a Inputs, options: &Options, diags: &mut Diags) -> Self {
        let mut classes: Vec<(String, bool)> = inputs
            .gateway_classes
            .iter()
            .filter(|c| c.spec.controller_name == options.gateway_controller_name)
            .map(|c| (c.metadata.name.clone().unwrap_or_default(), true))
            .collect();
        if options.assume_class
            && classes.is_empty()
            && !inputs
                .gateway_classes
                .iter()
                .any(|c| c.metadata.name.as_deref() == Some(ASSUMED_CLASS))
        {
            classes.push((ASSUMED_CLASS.to_string(), true));
        }
        classes.sort();

        let namespaces = inputs
            .namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
            .collect();

        let mut grants: Grants<'a> = FastMap::default();
        for g in &inputs.reference_grants {
            let ns = ns_name(&g.metadata).0;
            for from in &g.spec.from {
                if from.group != GATEWAY_GROUP {
                    continue;
                }
                for to in &g.spec.to {
                    // Services are in the core group, written "".
                    if !to.group.is_empty() && to.group != "core" {
                        continue;
                    }
                    grants
                        .entry((ns, from.kind.as_str(), from.namespace.as_str()))
                        .or_default()
                        .push((to.kind.as_str(), to.name.as_deref()));
                }
            }
        }

        let mut gateways = FastMap::default();
        let mut infos = BTreeMap::new();
        for gw in &inputs.gateways {
            let class = gw.spec.gateway_class_name.as_str();
            if !classes.iter().any(|(c, _)| c == class) {
                continue;
            }
            let object = object_ref(&gw.metadata);
            let mut info = GatewayInfo {
                object: object.clone(),
                class: class.to_string(),
                generation: gw.metadata.generation,
                accepted: true,
                programmed: false,
                listeners: Vec::new(),
            };
            let mut listeners = Vec::new();
            for (li, l) in gw.spec.listeners.iter().enumerate() {
                let (listener, linfo) = listener(&object, li, l, options, diags);
                info.listeners.push(linfo);
                if let Some(mut listener) = listener {
                    listener.info = li;
                    listeners.push(listener);
                }
            }
            conflicts(&object, &mut info, &mut listeners, diags);
            info.programmed = info.listeners.iter().any(|l| l.programmed);
            gateways.insert(
                ns_name(&gw.metadata),
                OurGateway {
                    object: object.clone(),
                    listeners,
                },
            );
            infos.insert(object, info);
        }
        Gateways {
            classes,
            gateways,
            infos,
            namespaces,
            grants,
        }
    }

    /// Whether a listener of the Gateway in `gateway_ns` admits routes from `route_ns`.
    pub(super) fn admits(&self, listener: &Listener, gateway_ns: &str, route_ns: &str) -> bool {
        match &listener.namespaces {
            AllowedNamespaces::Same => gateway_ns == route_ns,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(None) => false,
            AllowedNamespaces::Selector(Some(sel)) => match self.namespaces.get(route_ns) {
                Some(labels) if labels.contains_key(NAMESPACE_NAME_LABEL) => sel.matches(labels),
                Some(labels) => {
                    let mut with_name = (*labels).clone();
                    with_name.insert(NAMESPACE_NAME_LABEL.into(), route_ns.into());
                    sel.matches(&with_name)
                }
                None => sel.matches(&BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_string(),
                    route_ns.to_string(),
                )])),
            },
        }
    }

    /// Whether a `from_kind` in `from_ns` may refer to the `to_kind` `to_name` in
    /// `to_ns`: always within a namespace, else only with a ReferenceGrant in `to_ns`.
    pub(super) fn permits(
        &self,
        from_kind: &str,
        from_ns: &str,
        to_kind: &str,
        to_ns: &str,
        to_name: &str,
    ) -> bool {
        from_ns == to_ns
            || self
                .grants
                .get(&(to_ns, from_kind, from_ns))
                .is_some_and(|tos| {
                    tos.iter()
                        .any(|(kind, name)| *kind == to_kind && name.is_none_or(|n| n == to_name))
                })
    }
}

/// A Gateway listener: the listener routes attach to (`None` when it is not usable at
/// all) and what the report says of it.
fn listener(
    gateway: &ObjectRef,
    li: usize,
    l: &GatewayListeners,
    options: &Options,
    diags: &mut Diags,
) -> (Option<Listener>, ListenerInfo) {
    let field = format!("spec.listeners[{li}]");
    let mut info = ListenerInfo {
        name: l.name.clone(),
        protocol: l.protocol.clone(),
        port: l.port,
        hostname: l.hostname.clone(),
        served_on: None,
        accepted: true,
        programmed: false,
        resolved_refs: true,
        conflicted: false,
        reason: "Accepted".into(),
        message: String::new(),
        attached_routes: 0,
    };
    let refuse = |diags: &mut Diags, info: &mut ListenerInfo, reason: &str, message: String| {
        info.accepted = false;
        info.reason = reason.into();
        info.message = message.clone();
        diags.push(
            Severity::Warning,
            "Gateway",
            gateway,
            field.clone(),
            format!("listener {} is not programmed: {message}", l.name),
        );
    };
    let hostname = match l.hostname.as_deref() {
        None | Some("") => None,
        Some(h) => match gateway_host(h) {
            Ok(p) => Some(p),
            Err(e) => {
                refuse(
                    diags,
                    &mut info,
                    "UnsupportedValue",
                    format!("hostname: {e}"),
                );
                return (None, info);
            }
        },
    };
    // Which route kinds the listener admits. Unspecified or empty `kinds` means the
    // kinds its protocol carries: HTTPRoute for HTTP and HTTPS, none we serve for any
    // other protocol (TCP, UDP, TLS carry TCPRoute, UDPRoute, TLSRoute). A listed kind
    // must also suit the protocol.
    let http_protocol = matches!(l.protocol.as_str(), "HTTP" | "HTTPS");
    let mut admits_http_route = http_protocol;
    if let Some(kinds) = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.kinds.as_ref())
        .filter(|k| !k.is_empty())
    {
        let mut unsupported = Vec::new();
        admits_http_route = false;
        for k in kinds {
            let group = k.group.as_deref().unwrap_or(GATEWAY_GROUP);
            if group == GATEWAY_GROUP && k.kind == "HTTPRoute" && http_protocol {
                admits_http_route = true;
            } else {
                unsupported.push(format!("{group}/{}", k.kind));
            }
        }
        if !unsupported.is_empty() {
            info.resolved_refs = false;
            info.reason = "InvalidRouteKinds".into();
            info.message = format!("unsupported route kinds: {}", unsupported.join(", "));
        }
    }
    let namespaces = match l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref())
    {
        None => AllowedNamespaces::Same,
        Some(n) => match n.from {
            None | Some(GatewayListenersAllowedRoutesNamespacesFrom::Same) => {
                AllowedNamespaces::Same
            }
            Some(GatewayListenersAllowedRoutesNamespacesFrom::All) => AllowedNamespaces::All,
            Some(GatewayListenersAllowedRoutesNamespacesFrom::Selector) => {
                match n.selector.as_ref().map(Selector::from_spec) {
                    Some(Ok(sel)) => AllowedNamespaces::Selector(Some(sel)),
                    Some(Err(e)) => {
                        diags.push(
                            Severity::Error,
                            "Gateway",
                            gateway,
                            format!("{field}.allowedRoutes.namespaces.selector"),
                            format!("{e}; no route attaches to listener {}", l.name),
                        );
                        AllowedNamespaces::Selector(None)
                    }
                    None => {
                        diags.push(
                            Severity::Error,
                            "Gateway",
                            gateway,
                            format!("{field}.allowedRoutes.namespaces.selector"),
                            format!(
                                "from: Selector needs a selector; no route attaches to listener {}",
                                l.name
                            ),
                        );
                        AllowedNamespaces::Selector(None)
                    }
                }
            }
        },
    };
    let served_on = match (l.protocol.as_str(), l.port) {
        ("HTTP", p) if p == i32::from(options.gateway_http_port) => Some("http"),
        ("HTTP", p) => {
            refuse(
                diags,
                &mut info,
                "PortUnavailable",
                format!(
                    "port {p}: HTTP listeners are served on port {} (--gateway-http-port)",
                    options.gateway_http_port
                ),
            );
            None
        }
        ("HTTPS", _) => {
            refuse(
                diags,
                &mut info,
                "UnsupportedProtocol",
                "HTTPS listeners are not served yet; use an HTTP listener".into(),
            );
            None
        }
        (other, _) => {
            refuse(
                diags,
                &mut info,
                "UnsupportedProtocol",
                format!("protocol {other} is not supported; use HTTP"),
            );
            None
        }
    };
    info.served_on = served_on;
    info.programmed = served_on.is_some();
    (
        Some(Listener {
            name: l.name.clone(),
            port: l.port,
            hostname,
            served_on,
            admits_http_route,
            namespaces,
            info: li,
        }),
        info,
    )
}

/// Listeners of one Gateway that a request could not be told apart by conflict, and
/// none of them wins (the spec: "ALL indistinct Listeners must not be accepted"):
/// - the same port and protocol and the same hostname (`HostnameConflict`);
/// - the same port with different protocols (`ProtocolConflict`): one socket speaks
///   one protocol.
///
/// Each is marked `Conflicted`, not programmed, and serves no route.
fn conflicts(
    gateway: &ObjectRef,
    info: &mut GatewayInfo,
    listeners: &mut [Listener],
    diags: &mut Diags,
) {
    let conflict = |a: &Listener, b: &Listener| -> Option<&'static str> {
        if a.port != b.port {
            return None;
        }
        let (pa, pb) = (
            &info.listeners[a.info].protocol,
            &info.listeners[b.info].protocol,
        );
        if pa != pb {
            Some("ProtocolConflict")
        } else if a.hostname == b.hostname {
            Some("HostnameConflict")
        } else {
            None
        }
    };
    // Per listener, the first listener it conflicts with and why.
    let found: Vec<Option<(&'static str, String)>> = listeners
        .iter()
        .enumerate()
        .map(|(i, a)| {
            listeners
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .find_map(|(_, b)| conflict(a, b).map(|why| (why, b.name.clone())))
        })
        .collect();
    for (l, found) in listeners.iter_mut().zip(found) {
        let Some((reason, other)) = found else {
            continue;
        };
        let li = &mut info.listeners[l.info];
        let what = if reason == "ProtocolConflict" {
            "the same port with another protocol"
        } else {
            "the same port, protocol and hostname"
        };
        li.conflicted = true;
        li.programmed = false;
        li.served_on = None;
        if li.accepted {
            li.accepted = false;
            li.reason = reason.into();
            li.message = format!("listener {other} has {what}");
        }
        l.served_on = None;
        diags.push(
            Severity::Error,
            "Gateway",
            gateway,
            format!("spec.listeners[{}]", l.info),
            format!(
                "listener {} conflicts with listener {other} ({what}); neither is programmed",
                l.name
            ),
        );
    }
}

/// A Gateway API hostname: exact, or `*.` + a domain covering any number of labels.
pub(super) fn gateway_host(h: &str) -> Result<HostPattern, String> {
    match HostPattern::parse(h)? {
        HostPattern::Wildcard(s) => Ok(HostPattern::Suffix(s)),
        HostPattern::Any => Err("hostname is empty".into()),
        p => Ok(p),
    }
}

/// The hostnames a route serves through a listener: the intersection of the listener's
/// hostname (`None`: any) and the route's (`[]`: any). `Ok(None)` when the route serves
/// every host the listener does and both are unrestricted; `Err(())` when they do not
/// intersect.
pub(super) fn intersect(
    listener: Option<&HostPattern>,
    route: &[HostPattern],
) -> Result<Vec<HostPattern>, ()> {
    let Some(l) = listener else {
        return Ok(if route.is_empty() {
            vec![HostPattern::Any]
        } else {
            route.to_vec()
        });
    };
    if route.is_empty() {
        return Ok(vec![l.clone()]);
    }
    let mut out = Vec::new();
    for r in route {
        let hit = match (l, r) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => (a == b).then(|| r.clone()),
            (HostPattern::Suffix(_), HostPattern::Exact(b)) => {
                l.matches(b).is_some().then(|| r.clone())
            }
            (HostPattern::Exact(a), HostPattern::Suffix(_)) => {
                r.matches(a).is_some().then(|| l.clone())
            }
            (HostPattern::Suffix(a), HostPattern::Suffix(b)) => {
                if b == a || b.ends_with(&format!(".{a}")) {
                    Some(r.clone())
                } else if a.ends_with(&format!(".{b}")) {
                    Some(l.clone())
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(h) = hit
            && !out.contains(&h)
        {
            out.push(h);
        }
    }
    if out.is_empty() { Err(()) } else { Ok(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostPattern {
        gateway_host(s).unwrap()
    }

    #[test]
    fn hostnames_intersect_as_the_spec_says() {
        let l = h("*.example.com");
        assert_eq!(
            intersect(Some(&l), &[h("a.example.com")]),
            Ok(vec![h("a.example.com")])
        );
        assert_eq!(
            intersect(Some(&l), &[h("*.a.example.com")]),
            Ok(vec![h("*.a.example.com")])
        );
        assert_eq!(intersect(Some(&l), &[h("example.com")]), Err(()));
        assert_eq!(intersect(Some(&l), &[]), Ok(vec![l.clone()]));
        let e = h("foo.example.com");
        assert_eq!(
            intersect(Some(&e), &[h("*.example.com")]),
            Ok(vec![e.clone()])
        );
        assert_eq!(
            intersect(Some(&h("*.a.example.com")), &[h("*.example.com")]),
            Ok(vec![h("*.a.example.com")])
        );
        assert_eq!(intersect(None, &[]), Ok(vec![HostPattern::Any]));
        assert_eq!(intersect(Some(&e), &[h("bar.example.com")]), Err(()));
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let sel = Selector {
            labels: BTreeMap::from([("env".into(), "prod".into())]),
            expressions: vec![("team".into(), "In".into(), vec!["a".into(), "b".into()])],
        };
        let l = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(sel.matches(&l(&[("env", "prod"), ("team", "a")])));
        assert!(!sel.matches(&l(&[("env", "prod"), ("team", "c")])));
        assert!(!sel.matches(&l(&[("team", "a")])));
    }
}
