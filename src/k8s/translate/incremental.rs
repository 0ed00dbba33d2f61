//! Builds that start from the previous snapshot, for the two common kinds of change:
//! - only EndpointSlices changed (the pod churn of rolling updates and autoscaling, by
//!   far the most frequent change): routes, TLS and everything else the Ingresses,
//!   Services and Secrets decide are shared with the previous snapshot, and only the
//!   clusters of the Services whose slices changed are resolved again;
//! - Services and EndpointSlices are unchanged (an Ingress edit): the routing side is
//!   built again, and the clusters are taken from the previous snapshot instead of being
//!   resolved again.
//!
//! Either way the result equals what a full [`build_reusable`] of the new inputs gives
//! (the tests below check this on random changes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::backends::{Index, Resolver, slice_service};
use super::{
    CertEntry, Diagnostic, Inputs, ObjectRef, Options, Reuse, Snapshot, build_from, build_reusable,
};

/// How [`rebuild`] made a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// Only EndpointSlices changed: the clusters of their Services were resolved again;
    /// everything else is shared with the previous snapshot.
    Endpoints,
    /// Services and EndpointSlices are unchanged: built again, with the previous
    /// snapshot's clusters.
    Routes,
    /// Built from scratch.
    Full,
}

impl Rebuild {
    pub fn as_str(self) -> &'static str {
        match self {
            Rebuild::Endpoints => "endpoints",
            Rebuild::Routes => "routes",
            Rebuild::Full => "full",
        }
    }
}

/// The snapshot for `inputs`, given the snapshot `previous` and its [`Reuse`], both built
/// from `previous_inputs` with `options`, and the last good certificates `previous` holds.
pub fn rebuild(
    previous_inputs: &Inputs,
    inputs: &Inputs,
    previous: &Snapshot,
    reuse: &Reuse,
    options: &Options,
) -> (Snapshot, Reuse, Rebuild) {
    let certs: &HashMap<ObjectRef, Arc<CertEntry>> = &previous.tls.certs;
    if let Some((snapshot, reuse)) =
        rebuild_endpoints(previous_inputs, inputs, previous, reuse, options)
    {
        return (snapshot, reuse, Rebuild::Endpoints);
    }
    if same(&previous_inputs.services, &inputs.services)
        && same(&previous_inputs.endpoint_slices, &inputs.endpoint_slices)
        && reuse.refused.len() == previous.clusters.len()
    {
        let (snapshot, reuse) = build_from(inputs, certs, options, Some((previous, reuse)));
        return (snapshot, reuse, Rebuild::Routes);
    }
    let (snapshot, reuse) = build_reusable(inputs, certs, options);
    (snapshot, reuse, Rebuild::Full)
}

/// The snapshot for `inputs` when it differs from `previous_inputs` only in
/// EndpointSlices; `None` when anything else differs (an Ingress, IngressClass, Service
/// or Secret).
pub(super) fn rebuild_endpoints(
    previous_inputs: &Inputs,
    inputs: &Inputs,
    previous: &Snapshot,
    reuse: &Reuse,
    options: &Options,
) -> Option<(Snapshot, Reuse)> {
    if !same(&previous_inputs.ingresses, &inputs.ingresses)
        || !same(&previous_inputs.ingress_classes, &inputs.ingress_classes)
        || !same(&previous_inputs.services, &inputs.services)
        || !same(&previous_inputs.secrets, &inputs.secrets)
        || !same(&previous_inputs.namespaces, &inputs.namespaces)
        || !same(&previous_inputs.gateway_classes, &inputs.gateway_classes)
        || !same(&previous_inputs.gateways, &inputs.gateways)
        || !same(&previous_inputs.http_routes, &inputs.http_routes)
        || !same(&previous_inputs.reference_grants, &inputs.reference_grants)
        || reuse.refused.len() != previous.clusters.len()
    {
        return None;
    }
    let changed = changed_services(&previous_inputs.endpoint_slices, &inputs.endpoint_slices);
    let index = Index::new(inputs, changed.len(), |key| changed.contains(key));
    let resolver = Resolver::with_index(inputs, options, index);

    let mut clusters = previous.clusters.clone();
    let mut refused = reuse.refused.clone();
    for (cluster, refused) in clusters.iter_mut().zip(&mut refused) {
        let key = (
            cluster.service.namespace.as_str(),
            cluster.service.name.as_str(),
        );
        if !changed.contains(&key) {
            continue;
        }
        refused.clear();
        let again = resolver.resolve(&cluster.service, &cluster.port, refused);
        if again != **cluster {
            *cluster = Arc::new(again);
        }
    }

    let mut orphans: Vec<(ObjectRef, Diagnostic)> = reuse
        .orphans
        .iter()
        .filter(|(service, _)| {
            !changed.contains(&(service.namespace.as_str(), service.name.as_str()))
        })
        .cloned()
        .collect();
    // The resolver knows just the changed Services and their slices.
    orphans.extend(resolver.orphan_slices());

    let reuse = Reuse {
        fixed: reuse.fixed.clone(),
        uses: reuse.uses.clone(),
        refused,
        orphans,
    };
    let diagnostics = reuse.diagnostics(&clusters, inputs);
    let snapshot = Snapshot {
        generation: 0,
        routes: previous.routes.clone(),
        clusters,
        default_backend: previous.default_backend,
        default_backend_source: previous.default_backend_source.clone(),
        default_backend_max_body_size: previous.default_backend_max_body_size,
        tls: previous.tls.clone(),
        ignored: previous.ignored.clone(),
        served_ingresses: previous.served_ingresses.clone(),
        gateway: previous.gateway.clone(),
        diagnostics,
    };
    Some((snapshot, reuse))
}

/// Whether two lists hold the same objects in the same order: the same `Arc`s (a watch
/// cache keeps unchanged objects), or equal content (a re-read manifest file).
fn same<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// The Services (namespace, name) whose EndpointSlices differ between `before` and
/// `after`: those named by a slice that is in only one of the two lists (by identity,
/// so a changed slice counts on both sides, with its old and its new label).
fn changed_services<'a>(
    before: &'a [Arc<EndpointSlice>],
    after: &'a [Arc<EndpointSlice>],
) -> HashSet<(&'a str, &'a str), foldhash::fast::RandomState> {
    fn ids(
        slices: &[Arc<EndpointSlice>],
    ) -> HashSet<*const EndpointSlice, foldhash::fast::RandomState> {
        slices.iter().map(Arc::as_ptr).collect()
    }
    let (old, new) = (ids(before), ids(after));
    let mut changed = HashSet::default();
    let gone = before.iter().filter(|s| !new.contains(&Arc::as_ptr(s)));
    let came = after.iter().filter(|s| !old.contains(&Arc::as_ptr(s)));
    for slice in gone.chain(came) {
        if let Some(key) = slice_service(slice) {
            changed.insert(key);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use k8s_openapi::api::core::v1::{Namespace, Service};
    use k8s_openapi::api::networking::v1::Ingress;

    use crate::k8s::gateway_api::gateways::Gateway;
    use crate::k8s::gateway_api::httproutes::HttpRoute;
    use crate::k8s::gateway_api::referencegrants::ReferenceGrant;
    use proptest::prelude::*;
    use serde_json::json;

    use super::super::build_reusable;
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("a valid object"))
    }

    fn backend(service: &str, port: serde_json::Value) -> serde_json::Value {
        json!({"service": {"name": service, "port": port}})
    }

    fn ingress(name: &str, age: u32, spec: serde_json::Value) -> Arc<Ingress> {
        obj(json!({"metadata": {"namespace": "a", "name": name,
            "creationTimestamp": format!("2024-01-01T00:00:{age:02}Z"),
            "annotations": {"kubernetes.io/ingress.class": "portcullis"}}, "spec": spec}))
    }

    fn service(name: &str, spec: serde_json::Value) -> Arc<Service> {
        obj(json!({"metadata": {"namespace": "a", "name": name}, "spec": spec}))
    }

    /// Ingresses and Services that use every kind of cluster: one port and two ports by
    /// name and number, an ExternalName Service, a missing Service, a losing default
    /// backend, an ignored Ingress.
    fn fixed_inputs() -> Inputs {
        let path =
            |p: &str, b: serde_json::Value| json!({"path": p, "pathType": "Prefix", "backend": b});
        Inputs {
            ingresses: vec![
                ingress(
                    "web",
                    1,
                    json!({"rules": [{"host": "web.example", "http": {"paths": [
                        path("/", backend("one", json!({"number": 80}))),
                        path("/api", backend("two", json!({"name": "http"}))),
                        path("/metrics", backend("two", json!({"number": 9090}))),
                    ]}}]}),
                ),
                ingress(
                    "fallback",
                    2,
                    json!({
                    "defaultBackend": backend("one", json!({"number": 80})),
                    "rules": [{"host": "gone.example", "http": {"paths": [
                        path("/", backend("missing", json!({"number": 80}))),
                    ]}}]}),
                ),
                ingress(
                    "late",
                    3,
                    json!({"defaultBackend": backend("two", json!({"name": "http"}))}),
                ),
                ingress(
                    "ext",
                    4,
                    json!({"rules": [{"host": "ext.example", "http": {"paths": [
                        path("/", backend("external", json!({"number": 443}))),
                    ]}}]}),
                ),
                obj(json!({"metadata": {"namespace": "a", "name": "other",
                    "annotations": {"kubernetes.io/ingress.class": "nginx"}},
                    "spec": {"defaultBackend": backend("one", json!({"number": 80}))}})),
            ],
            services: vec![
                service("one", json!({"ports": [{"port": 80, "targetPort": 8080}]})),
                service(
                    "two",
                    json!({"ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "metrics", "port": 9090, "targetPort": 9090}]}),
                ),
                service(
                    "external",
                    json!({"type": "ExternalName", "externalName": "api.example.net"}),
                ),
                service("unused", json!({"ports": [{"port": 80}]})),
            ],
            gateway_classes: vec![obj(json!({"metadata": {"name": "ours"},
                "spec": {"controllerName": "portcullis.io/gateway-controller"}}))],
            gateways: vec![gateway_variant(0)],
            http_routes: vec![http_route_variant(9, 0), http_route_variant(8, 1)],
            ..Inputs::default()
        }
    }

    /// Gateway `a/gw` in one of a few shapes: one listener for every host and
    /// namespace; a wildcard listener admitting namespaces by label; and a listener
    /// pair that conflicts beside one on another port.
    fn gateway_variant(variant: u8) -> Arc<Gateway> {
        let listeners = match variant {
            0 => json!([{"name": "http", "port": 80, "protocol": "HTTP",
                "allowedRoutes": {"namespaces": {"from": "All"}}}]),
            1 => json!([{"name": "http", "port": 80, "protocol": "HTTP",
                "hostname": "*.gw.example",
                "allowedRoutes": {"namespaces": {"from": "Selector",
                    "selector": {"matchLabels": {"team": "x"}}}}},
                {"name": "same", "port": 80, "protocol": "HTTP", "hostname": "same.gw.example"}]),
            _ => json!([
                {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "dup.gw.example"},
                {"name": "dup", "port": 80, "protocol": "HTTP", "hostname": "dup.gw.example"},
                {"name": "alt", "port": 8080, "protocol": "HTTP"}]),
        };
        obj(json!({"metadata": {"namespace": "a", "name": "gw"},
            "spec": {"gatewayClassName": "ours", "listeners": listeners}}))
    }

    /// One of a few HTTPRoutes for slot `slot`: shared hosts and paths between slots,
    /// weighted backends (one missing, one ExternalName, weight 0), conditions,
    /// filters with a mirror, a redirect, a cross-namespace backend (ReferenceGrant),
    /// a parentRef that matches no listener, another namespace.
    fn http_route_variant(slot: usize, variant: u8) -> Arc<HttpRoute> {
        let name = format!("r{slot}");
        let created = format!("2024-01-01T00:00:{:02}Z", 30 + slot);
        let gw = json!([{"name": "gw", "namespace": "a"}]);
        let (ns, spec) = match variant {
            0 => (
                "a",
                json!({"parentRefs": gw, "hostnames": ["shared.gw.example"],
                "rules": [{"backendRefs": [{"name": "one", "port": 80}]}]}),
            ),
            1 => (
                "a",
                json!({"parentRefs": gw, "hostnames": ["shared.gw.example", "same.gw.example"],
                "rules": [{"matches": [{"path": {"type": "Exact", "value": "/x"},
                    "headers": [{"name": "x-env", "value": "canary"}]}],
                    "filters": [{"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"name": "unused", "port": 80}}}],
                    "backendRefs": [{"name": "two", "port": 80, "weight": 3},
                        {"name": "missing", "port": 80, "weight": 1}]}]}),
            ),
            2 => (
                "b",
                json!({"parentRefs": gw, "hostnames": ["cross.gw.example"],
                "rules": [{"backendRefs": [{"name": "one", "namespace": "a", "port": 80}]}]}),
            ),
            3 => (
                "a",
                json!({"parentRefs": [{"name": "gw", "sectionName": "nope"}],
                "rules": [{"backendRefs": [{"name": "two", "port": 9090}]}]}),
            ),
            4 => (
                "a",
                json!({"parentRefs": gw,
                "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+"}}],
                    "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/ext"}}],
                    "backendRefs": [{"name": "external", "port": 443}]}]}),
            ),
            _ => (
                "b",
                json!({"parentRefs": gw, "hostnames": ["*.wild.gw.example"],
                "rules": [{"backendRefs": [{"name": "unused", "port": 80, "weight": 0},
                    {"name": "two", "namespace": "a", "port": 80, "weight": 2}]}]}),
            ),
        };
        obj(
            json!({"metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "spec": spec}),
        )
    }

    /// A ReferenceGrant in `a` for HTTPRoutes of `b` to every Service there.
    fn grant() -> Arc<ReferenceGrant> {
        obj(json!({"metadata": {"namespace": "a", "name": "from-b"},
            "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                "namespace": "b"}], "to": [{"group": "", "kind": "Service"}]}}))
    }

    /// Namespace `b` with label `team` set to `team`.
    fn namespace_b(team: &str) -> Arc<Namespace> {
        obj(json!({"metadata": {"name": "b", "labels": {"team": team}}}))
    }

    /// An EndpointSlice in one of a few slots (its name), labelled with one of the
    /// Services above, a missing one or none, with addresses from a small pool (the
    /// loopback one is refused) and any conditions.
    #[derive(Debug, Clone)]
    struct SliceSpec {
        label: Option<&'static str>,
        ports: u8,
        endpoints: Vec<(u8, Option<bool>, Option<bool>)>,
    }

    fn slice(slot: usize, spec: &SliceSpec) -> Arc<EndpointSlice> {
        let labels = spec.label.map(|l| json!({"kubernetes.io/service-name": l}));
        let ports = match spec.ports {
            0 => json!([{"name": "", "port": 8080}]),
            1 => json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}]),
            _ => json!([{"name": "http", "port": 8081}]),
        };
        let addresses = ["10.0.0.1", "10.0.0.2", "127.0.0.1", "10.0.0.3", "not-an-ip"];
        let endpoints: Vec<_> = spec
            .endpoints
            .iter()
            .map(|(a, ready, serving)| {
                json!({"addresses": [addresses[*a as usize % addresses.len()]],
                       "conditions": {"ready": ready, "serving": serving}})
            })
            .collect();
        obj(
            json!({"metadata": {"namespace": "a", "name": format!("s{slot}"), "labels": labels},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
        )
    }

    fn slice_spec() -> impl Strategy<Value = SliceSpec> {
        let label = prop::sample::select(vec![
            Some("one"),
            Some("two"),
            Some("missing"),
            Some("unused"),
            Some("ghost"),
            None,
        ]);
        let endpoint = (0u8..5, any::<Option<bool>>(), any::<Option<bool>>());
        (label, 0u8..3, prop::collection::vec(endpoint, 0..4)).prop_map(
            |(label, ports, endpoints)| SliceSpec {
                label,
                ports,
                endpoints,
            },
        )
    }

    /// Per step, the slots that change: a new slice, or the slice removed.
    fn steps() -> impl Strategy<Value = Vec<Vec<(usize, Option<SliceSpec>)>>> {
        let change = (0usize..5, prop::option::weighted(0.8, slice_spec()));
        prop::collection::vec(prop::collection::vec(change, 1..4), 1..8)
    }

    /// Every field of the two snapshots is equal.
    fn assert_same(got: &Snapshot, want: &Snapshot) {
        let routes = |s: &Snapshot| format!("{:?}", s.routes.routes().collect::<Vec<_>>());
        assert_eq!(routes(got), routes(want));
        assert_eq!(got.clusters, want.clusters);
        assert_eq!(got.default_backend, want.default_backend);
        assert_eq!(got.default_backend_source, want.default_backend_source);
        assert_eq!(
            got.default_backend_max_body_size,
            want.default_backend_max_body_size
        );
        assert_eq!(got.tls.hosts, want.tls.hosts);
        assert_eq!(got.tls.policies, want.tls.policies);
        assert_eq!(got.ignored, want.ignored);
        assert_eq!(got.served_ingresses, want.served_ingresses);
        assert_eq!(got.gateway, want.gateway);
        assert_eq!(got.diagnostics, want.diagnostics);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Chained EndpointSlice-only updates give what a full build of the same inputs
        /// gives: clusters, diagnostics (empty clusters, refused addresses, orphan
        /// slices) and everything shared.
        #[test]
        fn endpoint_updates_equal_full_builds(start in prop::collection::vec(prop::option::of(slice_spec()), 5), steps in steps()) {
            let options = Options::default();
            let no_certs = HashMap::new();
            let mut slots: Vec<Option<Arc<EndpointSlice>>> = start
                .iter()
                .enumerate()
                .map(|(i, s)| s.as_ref().map(|s| slice(i, s)))
                .collect();
            let mut inputs = fixed_inputs();
            inputs.endpoint_slices = slots.iter().flatten().cloned().collect();
            let (mut snapshot, mut reuse) = build_reusable(&inputs, &no_certs, &options);
            for step in steps {
                for (slot, spec) in step {
                    slots[slot] = spec.map(|s| slice(slot, &s));
                }
                let mut next = inputs.clone();
                next.endpoint_slices = slots.iter().flatten().cloned().collect();
                let (want, _) = build_reusable(&next, &no_certs, &options);
                let (got, got_reuse) = rebuild_endpoints(&inputs, &next, &snapshot, &reuse, &options)
                    .expect("only EndpointSlices changed");
                assert_same(&got, &want);
                (inputs, snapshot, reuse) = (next, got, got_reuse);
            }
        }
    }

    /// One of a few Ingresses for slot `slot`: paths that conflict between slots, default
    /// backends, Services with endpoints, without, missing or ExternalName, another
    /// class, TLS.
    fn ingress_variant(slot: usize, variant: u8) -> Arc<Ingress> {
        let name = format!("i{slot}");
        let age = slot as u32 + 10;
        let path =
            |p: &str, b: serde_json::Value| json!({"path": p, "pathType": "Prefix", "backend": b});
        let host =
            |h: &str, paths: Vec<serde_json::Value>| json!({"host": h, "http": {"paths": paths}});
        match variant {
            0 => ingress(
                &name,
                age,
                json!({"rules": [host("shared.example", vec![
                    path("/", backend("one", json!({"number": 80}))),
                    path("/x", backend("two", json!({"name": "metrics"}))),
                ])]}),
            ),
            1 => ingress(
                &name,
                age,
                json!({"rules": [host("shared.example", vec![
                path("/", backend("two", json!({"name": "http"}))),
            ])], "defaultBackend": backend("unused", json!({"number": 80}))}),
            ),
            2 => ingress(
                &name,
                age,
                json!({"defaultBackend": backend("missing", json!({"number": 80}))}),
            ),
            3 => ingress(
                &name,
                age,
                json!({"rules": [host(&format!("{name}.example"), vec![
                path("/", backend("external", json!({"number": 443}))),
                path("/p", backend("one", json!({"name": "nope"}))),
            ])], "tls": [{"hosts": [format!("{name}.example")], "secretName": "cert"}]}),
            ),
            4 => obj(json!({"metadata": {"namespace": "a", "name": name,
                "annotations": {"kubernetes.io/ingress.class": "nginx"}},
                "spec": {"defaultBackend": backend("one", json!({"number": 80}))}})),
            _ => ingress(
                &name,
                age,
                json!({"rules": [host("*.wild.example", vec![
                    path("/", backend("unused", json!({"number": 80}))),
                    path("/two", backend("two", json!({"number": 9090}))),
                ])]}),
            ),
        }
    }

    /// One step of changes: Ingress and HTTPRoute slots that change (a variant, or
    /// removed), EndpointSlice slots that change, whether a Service changes, the
    /// Gateway's new variant, whether the ReferenceGrant is there, namespace `b`'s
    /// label.
    #[derive(Debug, Clone)]
    struct Step {
        ingresses: Vec<(usize, Option<u8>)>,
        routes: Vec<(usize, Option<u8>)>,
        slices: Vec<(usize, Option<SliceSpec>)>,
        service: bool,
        gateway: Option<u8>,
        grant: Option<bool>,
        team: Option<&'static str>,
    }

    fn mixed_steps() -> impl Strategy<Value = Vec<Step>> {
        let ingress = (0usize..4, prop::option::weighted(0.8, 0u8..6));
        let route = (0usize..4, prop::option::weighted(0.8, 0u8..6));
        let slice = (0usize..5, prop::option::weighted(0.8, slice_spec()));
        let step = (
            prop::collection::vec(ingress, 0..3),
            prop::collection::vec(route, 0..3),
            prop::collection::vec(slice, 0..3),
            prop::bool::weighted(0.15),
            prop::option::weighted(0.15, 0u8..3),
            prop::option::weighted(0.2, any::<bool>()),
            prop::option::weighted(0.15, prop::sample::select(vec!["x", "y"])),
        )
            .prop_map(
                |(ingresses, routes, slices, service, gateway, grant, team)| Step {
                    ingresses,
                    routes,
                    slices,
                    service,
                    gateway,
                    grant,
                    team,
                },
            );
        prop::collection::vec(step, 1..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Chained rebuilds after any mix of Ingress, HTTPRoute, Gateway, ReferenceGrant,
        /// Namespace, EndpointSlice and Service changes give what a full build gives
        /// (the Gateway report included), and take the cheapest way that is valid.
        #[test]
        fn rebuilds_equal_full_builds(steps in mixed_steps()) {
            let options = Options::default();
            let no_certs = HashMap::new();
            let mut ingresses: Vec<Option<Arc<Ingress>>> =
                (0..4).map(|i| Some(ingress_variant(i, i as u8))).collect();
            let mut routes: Vec<Option<Arc<HttpRoute>>> =
                (0..4).map(|i| Some(http_route_variant(i, 2 * i as u8))).collect();
            let mut slices: Vec<Option<Arc<EndpointSlice>>> = (0..5)
                .map(|i| Some(slice(i, &SliceSpec { label: Some(["one", "two", "unused", "ghost", "one"][i]), ports: 1, endpoints: vec![(i as u8, None, None)] })))
                .collect();
            let with = |base: &Inputs, ingresses: &[Option<Arc<Ingress>>], routes: &[Option<Arc<HttpRoute>>], slices: &[Option<Arc<EndpointSlice>>]| {
                let mut next = base.clone();
                next.ingresses.truncate(1);
                next.ingresses.extend(ingresses.iter().flatten().cloned());
                next.http_routes.truncate(2);
                next.http_routes.extend(routes.iter().flatten().cloned());
                next.endpoint_slices = slices.iter().flatten().cloned().collect();
                next
            };
            let mut base = fixed_inputs();
            base.ingresses.truncate(1);
            base.namespaces = vec![namespace_b("x")];
            let mut inputs = with(&base, &ingresses, &routes, &slices);
            let (mut snapshot, mut reuse) = build_reusable(&inputs, &no_certs, &options);
            for step in steps {
                for (slot, variant) in &step.ingresses {
                    ingresses[*slot] = variant.map(|v| ingress_variant(*slot, v));
                }
                for (slot, variant) in &step.routes {
                    routes[*slot] = variant.map(|v| http_route_variant(*slot, v));
                }
                for (slot, spec) in &step.slices {
                    slices[*slot] = spec.as_ref().map(|s| slice(*slot, s));
                }
                // Rebuilt from the same specs: changed objects are new `Arc`s, the rest
                // keep theirs, as in a watch cache.
                let mut next = with(&inputs, &ingresses, &routes, &slices);
                if step.service {
                    next.services[3] = service("unused", json!({"ports": [{"port": 80, "targetPort": 8080}]}));
                }
                if let Some(v) = step.gateway {
                    next.gateways = vec![gateway_variant(v)];
                }
                if let Some(present) = step.grant {
                    next.reference_grants = if present { vec![grant()] } else { Vec::new() };
                }
                if let Some(team) = step.team {
                    next.namespaces = vec![namespace_b(team)];
                }
                let (want, _) = build_reusable(&next, &snapshot.tls.certs, &options);
                let (got, got_reuse, how) = rebuild(&inputs, &next, &snapshot, &reuse, &options);
                assert_same(&got, &want);
                let services_same = same(&inputs.services, &next.services);
                let slices_same = same(&inputs.endpoint_slices, &next.endpoint_slices);
                let routing_same = same(&inputs.ingresses, &next.ingresses)
                    && same(&inputs.http_routes, &next.http_routes)
                    && same(&inputs.gateways, &next.gateways)
                    && same(&inputs.reference_grants, &next.reference_grants)
                    && same(&inputs.namespaces, &next.namespaces);
                let expected = if routing_same && services_same {
                    Rebuild::Endpoints
                } else if services_same && slices_same {
                    Rebuild::Routes
                } else {
                    Rebuild::Full
                };
                prop_assert_eq!(how, expected);
                (inputs, snapshot, reuse) = (next, got, got_reuse);
            }
        }
    }

    /// The fixed inputs attach HTTPRoutes (with a mirror, weights and a missing
    /// Service), so the proptests above exercise them; a check that they do.
    #[test]
    fn the_fixed_inputs_serve_http_routes() {
        let snapshot = build_reusable(&fixed_inputs(), &HashMap::new(), &Options::default()).0;
        let kinds: Vec<_> = snapshot.routes.routes().map(|r| r.source.kind).collect();
        assert!(
            kinds.contains(&crate::model::RouteKind::HttpRoute),
            "{kinds:?}"
        );
        assert_eq!(snapshot.gateway.routes.len(), 2, "{:?}", snapshot.gateway);
    }

    #[test]
    fn a_change_to_any_other_kind_needs_a_full_build() {
        let options = Options::default();
        let inputs = fixed_inputs();
        let (snapshot, reuse) = build_reusable(&inputs, &HashMap::new(), &options);
        let rebuild = |next: &Inputs| rebuild_endpoints(&inputs, next, &snapshot, &reuse, &options);

        assert!(rebuild(&inputs.clone()).is_some(), "nothing changed");
        let mut copied = inputs.clone();
        copied.services = inputs
            .services
            .iter()
            .map(|s| Arc::new((**s).clone()))
            .collect();
        assert!(
            rebuild(&copied).is_some(),
            "equal copies of the same objects"
        );

        let mut next = inputs.clone();
        next.ingresses[0] = ingress(
            "web",
            1,
            json!({"defaultBackend": backend("one", json!({"number": 80}))}),
        );
        assert!(rebuild(&next).is_none(), "an Ingress changed");
        let mut next = inputs.clone();
        next.http_routes[0] = http_route_variant(9, 3);
        assert!(rebuild(&next).is_none(), "an HTTPRoute changed");
        let mut next = inputs.clone();
        next.gateways[0] = gateway_variant(1);
        assert!(rebuild(&next).is_none(), "a Gateway changed");
        let mut next = inputs.clone();
        next.reference_grants.push(grant());
        assert!(rebuild(&next).is_none(), "a ReferenceGrant came");
        let mut next = inputs.clone();
        next.namespaces.push(namespace_b("x"));
        assert!(rebuild(&next).is_none(), "a Namespace came");
        let mut next = inputs.clone();
        next.services.pop();
        assert!(rebuild(&next).is_none(), "a Service was removed");
        let mut next = inputs.clone();
        next.services.swap(0, 1);
        assert!(
            rebuild(&next).is_none(),
            "the Services came in another order"
        );
    }
}
