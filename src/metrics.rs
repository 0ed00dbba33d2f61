//! Metrics: the explicit prometheus [`Registry`] and the handles the data path and the
//! publisher record into.
//!
//! Everything registers into [`Metrics::registry`], never into the global default
//! registry, so that each test (and each proxy in one process) reads its own counters.
//! Labels stay bounded: namespace, route kind, route, service, method (standard methods
//! or `OTHER`) and the status class; never a path, host or client address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::model::{Snapshot, Upstream};

/// The git commit this binary was built from (short hash), or `unknown`: set by
/// `build.rs`, or by `PORTCULLIS_GIT_SHA` at build time where there is no `.git`.
pub const GIT_SHA: &str = match option_env!("PORTCULLIS_GIT_SHA") {
    Some(sha) => sha,
    None => "unknown",
};

/// Buckets of the request and upstream response histograms, in seconds (11 buckets).
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of the upstream connect histogram, in seconds (10 buckets).
const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];
/// Buckets of the request and response body size histograms, in bytes: powers of four
/// from 64 B to 64 MiB (11 buckets).
const SIZE_BUCKETS: &[f64] = &[
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
/// Buckets of the snapshot publish histogram, in seconds (10 buckets).
const PUBLISH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// The values of the `route_kind` label: the kind of object a route came from, or `""`
/// when no route matched and for the `--default-backend-service` default backend.
pub const ROUTE_KINDS: [&str; 4] = ["", "Ingress", "HTTPRoute", "GRPCRoute"];

/// The route a request took, as metric labels, in label order. Empty strings when no
/// route matched. Shared strings: a clone (one per logged request) copies no text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteLabels {
    /// The route's namespace; for a default backend, its Service's.
    pub namespace: Arc<str>,
    /// One of [`ROUTE_KINDS`]: `Ingress`, `HTTPRoute`, `GRPCRoute`, or `""` when no
    /// route matched and for the `--default-backend-service` default backend.
    pub route_kind: &'static str,
    /// The name of the object the route came from (an Ingress' `spec.defaultBackend`
    /// is that Ingress'); `""` when `route_kind` is.
    pub route: Arc<str>,
    pub service: Arc<str>,
}

/// The registry and every metric handle of the process.
pub struct Metrics {
    pub registry: Registry,
    /// `portcullis_requests_total{namespace,route_kind,route,service,method,code}`.
    pub requests_total: IntCounterVec,
    /// `portcullis_request_duration_seconds{namespace,route_kind,route,service,code}`:
    /// until the response headers are sent downstream.
    pub request_duration_seconds: HistogramVec,
    /// `portcullis_request_size_bytes{namespace,route_kind,route,service}`: request body
    /// bytes read from downstream, observed when the exchange ends.
    pub request_size_bytes: HistogramVec,
    /// `portcullis_response_size_bytes{namespace,route_kind,route,service}`: response
    /// body bytes sent downstream, observed when the response body ends.
    pub response_size_bytes: HistogramVec,
    /// `portcullis_upstream_connect_duration_seconds{service}`, service as `ns/name`.
    pub upstream_connect_duration_seconds: HistogramVec,
    /// `portcullis_upstream_response_duration_seconds{service}`, service as `ns/name`:
    /// from sending the request upstream until its response headers arrive.
    pub upstream_response_duration_seconds: HistogramVec,
    /// `portcullis_open_connections{listener,protocol}`; protocol is `detecting` until
    /// the first request, then `http1` or `h2`.
    pub open_connections: IntGaugeVec,
    /// `portcullis_connections_total{listener}`: downstream connections accepted.
    pub connections_total: IntCounterVec,
    pub snapshot_generation: IntGauge,
    pub snapshot_publish_timestamp_seconds: Gauge,
    pub snapshot_publish_duration_seconds: Histogram,
    /// `portcullis_diagnostics{kind,severity}`: diagnostics of the snapshot in force.
    pub diagnostics: IntGaugeVec,
    /// `portcullis_endpoints{namespace,service,state}`: distinct endpoint IPs of each
    /// Service routed to in the snapshot in force, by state `ready`,
    /// `serving_terminating` (still serving but not ready: terminating pods) and
    /// `not_ready`. A routed Service that does not resolve has all three at 0.
    pub endpoints: IntGaugeVec,
    /// `portcullis_build_info{version,git_sha}`: always 1.
    pub build_info: IntGaugeVec,
    /// `portcullis_kube_watch_errors_total{kind}`: failed lists and watches of the
    /// Kubernetes API, by object kind.
    pub kube_watch_errors_total: IntCounterVec,
    /// `portcullis_kube_watch_restarts_total{kind}`: relists of a kind after its first
    /// list (a watch that lost its place and started over).
    pub kube_watch_restarts_total: IntCounterVec,
    /// `portcullis_access_log_dropped_total`: access log lines dropped because the
    /// writer fell behind (the request is never held up for its log line).
    pub access_log_dropped_total: IntCounter,
    /// `portcullis_endpoint_ejections_total{namespace,service}`: endpoints taken out of
    /// balancing for a backoff window after refusing or resetting a connection.
    pub endpoint_ejections_total: IntCounterVec,
    /// `portcullis_upstream_retries_total{namespace,service,reason}`: requests sent a
    /// second time; reason `connect` (another endpoint after a failed connect) or
    /// `stale_connection` (a fresh connection after a pooled one turned out closed).
    pub upstream_retries_total: IntCounterVec,
    /// `portcullis_upstream_body_errors_total{namespace,route_kind,route,service}`:
    /// responses whose upstream body failed (the upstream closed, reset or broke framing)
    /// after the head had been sent downstream, so the downstream connection or stream was
    /// aborted.
    pub upstream_body_errors_total: IntCounterVec,
    /// `portcullis_retry_budget_exhausted_total{namespace,service}`: failed attempts that
    /// could have been retried, answered instead because the Service's retry budget was
    /// spent.
    pub retry_budget_exhausted_total: IntCounterVec,
    /// `portcullis_mirror_dropped_total{namespace,service,reason}`: request copies of a
    /// `RequestMirror` filter that were not sent or not delivered whole, by the mirror's
    /// Service; reason `in_flight_limit`, `no_endpoints`, `body_overflow`,
    /// `body_aborted`, `timeout` or `upstream_error`.
    pub mirror_dropped_total: IntCounterVec,
    /// `portcullis_stream_idle_timeouts_total{direction}`: streams aborted after moving no
    /// byte for `--stream-idle-timeout`; direction `request` (the request body from
    /// downstream), `response` (the response body from upstream) or `tunnel` (an
    /// upgraded connection, both ways).
    pub stream_idle_timeouts_total: IntCounterVec,
    /// `portcullis_path_normalization_rejected_total`: requests answered 400 because
    /// their path could not be normalised.
    pub path_normalization_rejected_total: IntCounter,
    /// `portcullis_leader`: 1 while this replica holds the leader Lease and so writes
    /// Ingress status, else 0.
    pub leader: IntGauge,
    /// `portcullis_tls_handshakes_total{version}`: completed downstream TLS handshakes,
    /// version `1.2` or `1.3`.
    pub tls_handshakes_total: IntCounterVec,
    /// `portcullis_tls_handshake_errors_total{reason}`: failed downstream handshakes;
    /// reason is one of `timeout`, `eof`, `not_tls`, `protocol_version`, `incompatible`,
    /// `bad_message`, `client_alert`, `other`.
    pub tls_handshake_errors_total: IntCounterVec,
    /// `portcullis_certificate_expiry_timestamp_seconds{namespace,secret}`: notAfter of
    /// each usable certificate in the snapshot in force (Unix seconds).
    pub certificate_expiry_timestamp_seconds: IntGaugeVec,
    /// The per-route series handles the data path records into: see [`Metrics::route`].
    route_series: RouteSeriesCache,
    /// The label sets of the snapshot gauges last published, so that the next publish
    /// removes only the series that are gone.
    published: Mutex<PublishedSeries>,
}

/// Label sets of the gauges [`Metrics::observe_snapshot`] sets, as last published.
#[derive(Debug, Default)]
struct PublishedSeries {
    diagnostics: BTreeSet<Vec<String>>,
    certificate_expiry: BTreeSet<Vec<String>>,
    endpoints: BTreeSet<Vec<String>>,
}

/// Sets every series of `gauge` in `next`, then removes the series of `previous` that
/// `next` lacks, and leaves `previous` naming `next`'s series. A series present before
/// and after is never absent in between, so a concurrent scrape sees each one. `step`
/// runs after each change to the gauge (tests gather the registry there).
fn replace_series(
    gauge: &IntGaugeVec,
    previous: &mut BTreeSet<Vec<String>>,
    next: BTreeMap<Vec<String>, i64>,
    step: &mut dyn FnMut(),
) {
    for (labels, value) in &next {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        gauge.with_label_values(&labels).set(*value);
        step();
    }
    for gone in previous.iter().filter(|l| !next.contains_key(*l)) {
        let labels: Vec<&str> = gone.iter().map(String::as_str).collect();
        // A series that is already absent needs no removal.
        let _ = gauge.remove_label_values(&labels);
        step();
    }
    *previous = next.into_keys().collect();
}

impl Metrics {
    /// Creates the registry and registers every metric. `build_info{version,git_sha}` is
    /// set to 1.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "portcullis_requests_total",
                "Requests answered, by route and status class.",
            ),
            &[
                "namespace",
                "route_kind",
                "route",
                "service",
                "method",
                "code",
            ],
        )
        .expect("static metric definition is valid");
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_request_duration_seconds",
                "Time from receiving a request to sending its response headers.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["namespace", "route_kind", "route", "service", "code"],
        )
        .expect("static metric definition is valid");
        let request_size_bytes = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_request_size_bytes",
                "Request body bytes read from downstream, per request.",
            )
            .buckets(SIZE_BUCKETS.to_vec()),
            &["namespace", "route_kind", "route", "service"],
        )
        .expect("static metric definition is valid");
        let response_size_bytes = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_response_size_bytes",
                "Response body bytes sent downstream, per request.",
            )
            .buckets(SIZE_BUCKETS.to_vec()),
            &["namespace", "route_kind", "route", "service"],
        )
        .expect("static metric definition is valid");
        let upstream_connect_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_upstream_connect_duration_seconds",
                "Time to open a new upstream connection.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
            &["service"],
        )
        .expect("static metric definition is valid");
        let upstream_response_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_upstream_response_duration_seconds",
                "Time from sending a request upstream to receiving its response headers.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["service"],
        )
        .expect("static metric definition is valid");
        let open_connections = IntGaugeVec::new(
            Opts::new(
                "portcullis_open_connections",
                "Open downstream connections.",
            ),
            &["listener", "protocol"],
        )
        .expect("static metric definition is valid");
        let connections_total = IntCounterVec::new(
            Opts::new(
                "portcullis_connections_total",
                "Downstream connections accepted.",
            ),
            &["listener"],
        )
        .expect("static metric definition is valid");
        let snapshot_generation = IntGauge::new(
            "portcullis_snapshot_generation",
            "Generation of the snapshot in force.",
        )
        .expect("static metric definition is valid");
        let snapshot_publish_timestamp_seconds = Gauge::new(
            "portcullis_snapshot_publish_timestamp_seconds",
            "When the snapshot in force was published (Unix seconds).",
        )
        .expect("static metric definition is valid");
        let snapshot_publish_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_snapshot_publish_duration_seconds",
                "Time to build and publish a snapshot.",
            )
            .buckets(PUBLISH_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let diagnostics = IntGaugeVec::new(
            Opts::new(
                "portcullis_diagnostics",
                "Diagnostics of the snapshot in force.",
            ),
            &["kind", "severity"],
        )
        .expect("static metric definition is valid");
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "portcullis_endpoints",
                "Endpoints of each Service in the snapshot in force, by state.",
            ),
            &["namespace", "service", "state"],
        )
        .expect("static metric definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "portcullis_build_info",
                "Always 1; labelled with the version and the git commit it was built from.",
            ),
            &["version", "git_sha"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_SHA])
            .set(1);
        let kube_watch_errors_total = IntCounterVec::new(
            Opts::new(
                "portcullis_kube_watch_errors_total",
                "Failed lists and watches of the Kubernetes API, by object kind; each is retried with backoff.",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        let kube_watch_restarts_total = IntCounterVec::new(
            Opts::new(
                "portcullis_kube_watch_restarts_total",
                "Relists of the Kubernetes API after the first list, by object kind.",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        let access_log_dropped_total = IntCounter::new(
            "portcullis_access_log_dropped_total",
            "Access log lines dropped because the log writer fell behind.",
        )
        .expect("static metric definition is valid");
        let leader = IntGauge::new(
            "portcullis_leader",
            "1 while this replica holds the leader Lease (and writes Ingress status), else 0.",
        )
        .expect("static metric definition is valid");

        let endpoint_ejections_total = IntCounterVec::new(
            Opts::new(
                "portcullis_endpoint_ejections_total",
                "Endpoints ejected from balancing after refusing or resetting a connection.",
            ),
            &["namespace", "service"],
        )
        .expect("static metric definition is valid");
        let upstream_retries_total = IntCounterVec::new(
            Opts::new(
                "portcullis_upstream_retries_total",
                "Requests retried upstream, by reason (connect, stale_connection, reset_before_response).",
            ),
            &["namespace", "service", "reason"],
        )
        .expect("static metric definition is valid");
        let upstream_body_errors_total = IntCounterVec::new(
            Opts::new(
                "portcullis_upstream_body_errors_total",
                "Responses cut short because the upstream body failed after the head was sent.",
            ),
            &["namespace", "route_kind", "route", "service"],
        )
        .expect("static metric definition is valid");
        let retry_budget_exhausted_total = IntCounterVec::new(
            Opts::new(
                "portcullis_retry_budget_exhausted_total",
                "Retryable upstream failures answered because the Service's retry budget was spent.",
            ),
            &["namespace", "service"],
        )
        .expect("static metric definition is valid");
        let mirror_dropped_total = IntCounterVec::new(
            Opts::new(
                "portcullis_mirror_dropped_total",
                "Mirrored request copies not sent or not delivered whole, by the mirror's Service and reason.",
            ),
            &["namespace", "service", "reason"],
        )
        .expect("static metric definition is valid");
        let stream_idle_timeouts_total = IntCounterVec::new(
            Opts::new(
                "portcullis_stream_idle_timeouts_total",
                "Streams aborted after moving no byte for the stream idle timeout, by direction (request, response, tunnel).",
            ),
            &["direction"],
        )
        .expect("static metric definition is valid");
        let path_normalization_rejected_total = IntCounter::new(
            "portcullis_path_normalization_rejected_total",
            "Requests answered 400 because their path could not be normalised.",
        )
        .expect("static metric definition is valid");
        let tls_handshakes_total = IntCounterVec::new(
            Opts::new(
                "portcullis_tls_handshakes_total",
                "Completed downstream TLS handshakes, by protocol version.",
            ),
            &["version"],
        )
        .expect("static metric definition is valid");
        let tls_handshake_errors_total = IntCounterVec::new(
            Opts::new(
                "portcullis_tls_handshake_errors_total",
                "Failed downstream TLS handshakes, by reason.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let certificate_expiry_timestamp_seconds = IntGaugeVec::new(
            Opts::new(
                "portcullis_certificate_expiry_timestamp_seconds",
                "When each certificate in the snapshot in force expires (Unix seconds).",
            ),
            &["namespace", "secret"],
        )
        .expect("static metric definition is valid");

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests_total.clone()),
            Box::new(request_duration_seconds.clone()),
            Box::new(request_size_bytes.clone()),
            Box::new(response_size_bytes.clone()),
            Box::new(connections_total.clone()),
            Box::new(kube_watch_restarts_total.clone()),
            Box::new(access_log_dropped_total.clone()),
            Box::new(upstream_connect_duration_seconds.clone()),
            Box::new(upstream_response_duration_seconds.clone()),
            Box::new(open_connections.clone()),
            Box::new(snapshot_generation.clone()),
            Box::new(snapshot_publish_timestamp_seconds.clone()),
            Box::new(snapshot_publish_duration_seconds.clone()),
            Box::new(diagnostics.clone()),
            Box::new(endpoints.clone()),
            Box::new(build_info.clone()),
            Box::new(kube_watch_errors_total.clone()),
            Box::new(endpoint_ejections_total.clone()),
            Box::new(upstream_retries_total.clone()),
            Box::new(upstream_body_errors_total.clone()),
            Box::new(retry_budget_exhausted_total.clone()),
            Box::new(mirror_dropped_total.clone()),
            Box::new(stream_idle_timeouts_total.clone()),
            Box::new(path_normalization_rejected_total.clone()),
            Box::new(leader.clone()),
            Box::new(tls_handshakes_total.clone()),
            Box::new(tls_handshake_errors_total.clone()),
            Box::new(certificate_expiry_timestamp_seconds.clone()),
        ];
        for c in collectors {
            registry
                .register(c)
                .expect("metric names are unique within the registry");
        }
        Arc::new(Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            request_size_bytes,
            response_size_bytes,
            connections_total,
            kube_watch_restarts_total,
            access_log_dropped_total,
            upstream_connect_duration_seconds,
            upstream_response_duration_seconds,
            open_connections,
            snapshot_generation,
            snapshot_publish_timestamp_seconds,
            snapshot_publish_duration_seconds,
            diagnostics,
            endpoints,
            build_info,
            kube_watch_errors_total,
            endpoint_ejections_total,
            upstream_retries_total,
            upstream_body_errors_total,
            retry_budget_exhausted_total,
            mirror_dropped_total,
            stream_idle_timeouts_total,
            path_normalization_rejected_total,
            leader,
            tls_handshakes_total,
            tls_handshake_errors_total,
            certificate_expiry_timestamp_seconds,
            route_series: RouteSeriesCache::default(),
            published: Mutex::default(),
        })
    }

    /// The series of the route `route_kind` `namespace`/`route` → `service`, looked up
    /// once per request instead of once per metric. `route_kind` is one of
    /// [`ROUTE_KINDS`]; all four are empty when no route matched, and `route_kind` and
    /// `route` are for the `--default-backend-service` default backend.
    pub fn route(
        &self,
        namespace: &str,
        route_kind: &'static str,
        route: &str,
        service: &str,
    ) -> Arc<RouteSeries> {
        self.route_series
            .get(namespace, route_kind, route, namespace, service)
    }

    /// [`Metrics::route`] for a route whose Service may be in another namespace (a
    /// Gateway API backendRef permitted by a ReferenceGrant): the upstream histograms'
    /// `service` label is the Service's own `ns/name`.
    pub fn route_to(
        &self,
        namespace: &str,
        route_kind: &'static str,
        route: &str,
        service: &crate::model::ObjectRef,
    ) -> Arc<RouteSeries> {
        self.route_series.get(
            namespace,
            route_kind,
            route,
            &service.namespace,
            &service.name,
        )
    }

    /// Counts one failed list or watch of `kind`.
    pub fn kube_watch_error(&self, kind: &str) {
        self.kube_watch_errors_total
            .with_label_values(&[kind])
            .inc();
    }

    /// Counts one relist of `kind` after its first list.
    pub fn kube_watch_restart(&self, kind: &str) {
        self.kube_watch_restarts_total
            .with_label_values(&[kind])
            .inc();
    }

    /// Records the body sizes of one finished exchange.
    pub fn observe_sizes(&self, route: &RouteLabels, request_bytes: u64, response_bytes: u64) {
        let labels = [
            &*route.namespace,
            route.route_kind,
            &*route.route,
            &*route.service,
        ];
        self.request_size_bytes
            .with_label_values(&labels)
            .observe(request_bytes as f64);
        self.response_size_bytes
            .with_label_values(&labels)
            .observe(response_bytes as f64);
    }

    /// Records one answered request: the counter (with method) and the duration
    /// histogram (without).
    pub fn observe_request(
        &self,
        route: &RouteLabels,
        method: &Method,
        status: StatusCode,
        seconds: f64,
    ) {
        let code = status_class(status);
        self.requests_total
            .with_label_values(&[
                &*route.namespace,
                route.route_kind,
                &*route.route,
                &*route.service,
                method_label(method),
                code,
            ])
            .inc();
        self.request_duration_seconds
            .with_label_values(&[
                &*route.namespace,
                route.route_kind,
                &*route.route,
                &*route.service,
                code,
            ])
            .observe(seconds);
    }

    /// Sets the snapshot gauges from the snapshot just published: generation, publish
    /// time (now) and duration, diagnostic counts, endpoints per Service and certificate
    /// expiry per Secret. Gauges of kinds, Services and Secrets no longer present are
    /// removed.
    pub fn observe_snapshot(&self, snap: &Snapshot, publish_seconds: f64) {
        self.observe_snapshot_stepwise(snap, publish_seconds, &mut || {});
    }

    /// [`Metrics::observe_snapshot`], running `step` after each change to a labelled
    /// gauge, so that tests can gather the registry at every intermediate state.
    fn observe_snapshot_stepwise(
        &self,
        snap: &Snapshot,
        publish_seconds: f64,
        step: &mut dyn FnMut(),
    ) {
        // One publish at a time, so that the label sets stay those of the gauges.
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        self.snapshot_generation
            .set(i64::try_from(snap.generation).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.snapshot_publish_timestamp_seconds.set(now);
        self.snapshot_publish_duration_seconds
            .observe(publish_seconds);

        let mut diags: BTreeMap<Vec<String>, i64> = BTreeMap::new();
        for d in &snap.diagnostics {
            *diags
                .entry(vec![d.kind.clone(), d.severity.to_string()])
                .or_default() += 1;
        }
        replace_series(&self.diagnostics, &mut published.diagnostics, diags, step);

        let expiry: BTreeMap<Vec<String>, i64> = snap
            .tls
            .certs
            .values()
            .map(|cert| {
                let secret = &cert.secret;
                (
                    vec![secret.namespace.clone(), secret.name.clone()],
                    cert.not_after,
                )
            })
            .collect();
        replace_series(
            &self.certificate_expiry_timestamp_seconds,
            &mut published.certificate_expiry,
            expiry,
            step,
        );

        // Per Service, each endpoint IP once, in its best state across the Service's ports.
        let mut services: HashMap<(&str, &str), HashMap<IpAddr, u8>> = HashMap::new();
        let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
        for cluster in &snap.clusters {
            let key = (
                cluster.service.namespace.as_str(),
                cluster.service.name.as_str(),
            );
            // A routed Service that does not resolve shows as having no endpoints, so
            // that "no ready endpoints" alerts see it; ExternalNames have none to count.
            let all = match &cluster.upstream {
                Upstream::Endpoints { all, .. } => all.as_slice(),
                Upstream::Unresolved { .. } => &[],
                Upstream::ExternalName { .. } => continue,
            };
            seen.insert(key);
            let ips = services.entry(key).or_default();
            for e in all {
                let state = if e.ready {
                    2
                } else if e.serving {
                    1
                } else {
                    0
                };
                let cur = ips.entry(e.address.ip()).or_insert(state);
                *cur = (*cur).max(state);
            }
        }
        let mut endpoints: BTreeMap<Vec<String>, i64> = BTreeMap::new();
        for key in seen {
            let mut counts = [0i64; 3];
            if let Some(ips) = services.get(&key) {
                for state in ips.values() {
                    counts[usize::from(*state)] += 1;
                }
            }
            for (state, n) in ["not_ready", "serving_terminating", "ready"]
                .iter()
                .zip(counts)
            {
                endpoints.insert(vec![key.0.into(), key.1.into(), (*state).into()], n);
            }
        }
        replace_series(&self.endpoints, &mut published.endpoints, endpoints, step);
    }

    /// The registry in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let families = self.registry.gather();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The `method` label: the standard method, or `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    METHOD_LABELS[method_index(method)]
}

/// The `code` label: `1xx` … `5xx`.
pub fn status_class(status: StatusCode) -> &'static str {
    CODE_LABELS[status_index(status)]
}

/// Methods with a `method` label of their own, in [`method_label`]'s order; `OTHER` last.
const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "OTHER",
];
/// The `code` label values, in [`status_class`]'s order.
const CODE_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Route series cached before the cache is cleared and starts over; the series
/// themselves stay in the registry, only their handles are forgotten.
const MAX_CACHED_ROUTES: usize = 16 * 1024;

/// The metric series of one route (namespace, route kind, route, service), resolved once and
/// shared by every request that takes the route, so that the request path neither
/// hashes label values nor formats the `ns/name` service label per request. Each series
/// is created in the registry on first use, exactly as `with_label_values` would: a
/// route shows only the method and code combinations it has answered.
pub struct RouteSeries {
    /// The route's labels; empty strings when no route matched.
    pub labels: RouteLabels,
    /// `ns/name`: the `service` label of the upstream histograms: the Service's own
    /// namespace (the route's, for an Ingress backend or a default backend, whose route
    /// labels carry the Service's namespace; the backendRef's for a Gateway API route)
    /// and the service label.
    pub service_key: String,
    requests: [[OnceLock<IntCounter>; CODE_LABELS.len()]; METHOD_LABELS.len()],
    duration: [OnceLock<Histogram>; CODE_LABELS.len()],
    request_size: OnceLock<Histogram>,
    response_size: OnceLock<Histogram>,
    upstream_response: OnceLock<Histogram>,
    upstream_connect: OnceLock<Histogram>,
}

impl fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteSeries")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RouteSeries {
    fn new(labels: RouteLabels, service_namespace: &str) -> RouteSeries {
        let service_key = if service_namespace.is_empty() && labels.service.is_empty() {
            String::new()
        } else {
            format!("{service_namespace}/{}", labels.service)
        };
        RouteSeries {
            labels,
            service_key,
            requests: Default::default(),
            duration: Default::default(),
            request_size: OnceLock::new(),
            response_size: OnceLock::new(),
            upstream_response: OnceLock::new(),
            upstream_connect: OnceLock::new(),
        }
    }

    /// The label values in label order: namespace, route_kind, route, service.
    fn route_labels(&self) -> [&str; 4] {
        [
            &*self.labels.namespace,
            self.labels.route_kind,
            &*self.labels.route,
            &*self.labels.service,
        ]
    }

    /// Records one answered request: `portcullis_requests_total` (with method) and
    /// `portcullis_request_duration_seconds` (without).
    #[inline]
    pub fn observe_request(
        &self,
        metrics: &Metrics,
        method: &Method,
        status: StatusCode,
        seconds: f64,
    ) {
        let m = method_index(method);
        let c = status_index(status);
        let [ns, kind, route, service] = self.route_labels();
        self.requests[m][c]
            .get_or_init(|| {
                metrics.requests_total.with_label_values(&[
                    ns,
                    kind,
                    route,
                    service,
                    METHOD_LABELS[m],
                    CODE_LABELS[c],
                ])
            })
            .inc();
        self.duration[c]
            .get_or_init(|| {
                metrics.request_duration_seconds.with_label_values(&[
                    ns,
                    kind,
                    route,
                    service,
                    CODE_LABELS[c],
                ])
            })
            .observe(seconds);
    }

    /// Records the body sizes of one finished exchange.
    #[inline]
    pub fn observe_sizes(&self, metrics: &Metrics, request_bytes: u64, response_bytes: u64) {
        let labels = self.route_labels();
        self.request_size
            .get_or_init(|| metrics.request_size_bytes.with_label_values(&labels))
            .observe(request_bytes as f64);
        self.response_size
            .get_or_init(|| metrics.response_size_bytes.with_label_values(&labels))
            .observe(response_bytes as f64);
    }

    /// `portcullis_upstream_response_duration_seconds{service="ns/name"}`.
    pub fn upstream_response(&self, metrics: &Metrics) -> &Histogram {
        self.upstream_response.get_or_init(|| {
            metrics
                .upstream_response_duration_seconds
                .with_label_values(&[self.service_key.as_str()])
        })
    }

    /// `portcullis_upstream_connect_duration_seconds{service="ns/name"}`.
    pub fn upstream_connect(&self, metrics: &Metrics) -> &Histogram {
        self.upstream_connect.get_or_init(|| {
            metrics
                .upstream_connect_duration_seconds
                .with_label_values(&[self.service_key.as_str()])
        })
    }
}

/// [`RouteSeries`] by route: see [`Metrics::route`].
#[derive(Default)]
pub struct RouteSeriesCache {
    /// Keyed by a hash of the four labels; entries with equal hashes share a bucket.
    routes: RwLock<HashMap<u64, Vec<Arc<RouteSeries>>>>,
    len: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for RouteSeriesCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteSeriesCache")
            .field("len", &self.len.load(std::sync::atomic::Ordering::Relaxed))
            .finish()
    }
}

impl RouteSeriesCache {
    /// The series of the route `route_kind` `namespace`/`route` → `service`, created on
    /// first use.
    pub fn get(
        &self,
        namespace: &str,
        route_kind: &'static str,
        route: &str,
        service_namespace: &str,
        service: &str,
    ) -> Arc<RouteSeries> {
        use std::hash::BuildHasher;
        debug_assert!(
            ROUTE_KINDS.contains(&route_kind),
            "route_kind {route_kind:?} is not one of {ROUTE_KINDS:?}"
        );
        let key = foldhash::fast::FixedState::with_seed(0x706f_7274).hash_one((
            namespace,
            route_kind,
            route,
            service_namespace,
            service,
        ));
        let matches = |s: &Arc<RouteSeries>| {
            *s.labels.namespace == *namespace
                && s.labels.route_kind == route_kind
                && *s.labels.route == *route
                && *s.labels.service == *service
                && s.service_key
                    .split_once('/')
                    .map_or(service_namespace.is_empty(), |(ns, _)| {
                        ns == service_namespace
                    })
        };
        {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = routes.get(&key).and_then(|b| b.iter().find(|s| matches(s))) {
                return found.clone();
            }
        }
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = routes.get(&key).and_then(|b| b.iter().find(|s| matches(s))) {
            return found.clone();
        }
        if self.len.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CACHED_ROUTES {
            routes.clear();
            self.len.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let series = Arc::new(RouteSeries::new(
            RouteLabels {
                namespace: namespace.into(),
                route_kind,
                route: route.into(),
                service: service.into(),
            },
            service_namespace,
        ));
        routes.entry(key).or_default().push(series.clone());
        self.len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        series
    }
}

/// The position of `method`'s label in [`METHOD_LABELS`].
fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => 9,
    }
}

/// The position of `status`' class in [`CODE_LABELS`].
fn status_index(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(
            method_label(&Method::from_bytes(b"PROPFIND").expect("valid method")),
            "OTHER"
        );
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::SWITCHING_PROTOCOLS), "1xx");
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
    }

    #[test]
    fn request_metrics_are_readable_from_the_registry() {
        let m = Metrics::new();
        let route = RouteLabels {
            namespace: "ns".into(),
            route_kind: "Ingress",
            route: "web".into(),
            service: "svc".into(),
        };
        m.observe_request(&route, &Method::GET, StatusCode::OK, 0.01);
        m.observe_request(&route, &Method::GET, StatusCode::OK, 0.01);
        m.observe_sizes(&route, 3, 12);
        let n = m
            .requests_total
            .with_label_values(&["ns", "Ingress", "web", "svc", "GET", "2xx"])
            .get();
        assert_eq!(n, 2);
        let text = m.render();
        assert!(text.contains("portcullis_build_info"));
        assert!(text.contains("portcullis_request_duration_seconds_bucket"));
    }

    #[test]
    fn route_series_record_into_the_labelled_series() {
        let m = Metrics::new();
        let web = m.route("ns", "Ingress", "web", "svc");
        assert!(Arc::ptr_eq(&web, &m.route("ns", "Ingress", "web", "svc")));
        let other = m.route("ns", "Ingress", "web", "svc2");
        assert!(!Arc::ptr_eq(&web, &other));
        // The same name of another kind is another route.
        let http_route = m.route("ns", "HTTPRoute", "web", "svc");
        assert!(!Arc::ptr_eq(&web, &http_route));
        web.observe_request(&m, &Method::GET, StatusCode::OK, 0.01);
        m.route("ns", "Ingress", "web", "svc").observe_request(
            &m,
            &Method::GET,
            StatusCode::OK,
            0.01,
        );
        http_route.observe_request(&m, &Method::GET, StatusCode::OK, 0.01);
        web.observe_request(&m, &Method::POST, StatusCode::BAD_GATEWAY, 0.01);
        web.observe_sizes(&m, 3, 12);
        web.upstream_response(&m).observe(0.001);
        let get = m
            .requests_total
            .with_label_values(&["ns", "Ingress", "web", "svc", "GET", "2xx"])
            .get();
        let post = m
            .requests_total
            .with_label_values(&["ns", "Ingress", "web", "svc", "POST", "5xx"])
            .get();
        let http_get = m
            .requests_total
            .with_label_values(&["ns", "HTTPRoute", "web", "svc", "GET", "2xx"])
            .get();
        assert_eq!((get, post, http_get), (2, 1, 1));
        let size = m
            .response_size_bytes
            .with_label_values(&["ns", "Ingress", "web", "svc"])
            .get_sample_sum();
        assert_eq!(size, 12.0);
        // Upstream histograms label the Service alone, whatever routed to it.
        let upstream = m
            .upstream_response_duration_seconds
            .with_label_values(&["ns/svc"])
            .get_sample_count();
        assert_eq!(upstream, 1);
        // Only the combinations that were recorded exist.
        let text = m.render();
        assert!(!text.contains("method=\"HEAD\""), "{text}");
        assert!(!text.contains("svc2"), "{text}");
    }

    #[test]
    fn route_series_are_labelled_route_kind_and_route_in_order() {
        use prometheus::core::Collector;
        let m = Metrics::new();
        let route = ["namespace", "route_kind", "route", "service"];
        let defined = |c: &dyn Collector| c.desc()[0].variable_labels.clone();
        let with = |tail: &[&str]| -> Vec<String> {
            route.iter().chain(tail).map(|l| l.to_string()).collect()
        };
        assert_eq!(defined(&m.requests_total), with(&["method", "code"]));
        assert_eq!(defined(&m.request_duration_seconds), with(&["code"]));
        assert_eq!(defined(&m.request_size_bytes), with(&[]));
        assert_eq!(defined(&m.response_size_bytes), with(&[]));
        assert_eq!(defined(&m.upstream_body_errors_total), with(&[]));

        // The exposition sorts labels by name.
        m.route("ns", "Ingress", "web", "svc").observe_request(
            &m,
            &Method::GET,
            StatusCode::OK,
            0.01,
        );
        m.route("", "", "", "")
            .observe_request(&m, &Method::GET, StatusCode::NOT_FOUND, 0.01);
        m.route("ns", "GRPCRoute", "rpc", "svc")
            .observe_sizes(&m, 1, 2);
        assert_eq!(
            series(&m.registry, "portcullis_requests_total"),
            BTreeSet::from([
                "code=2xx,method=GET,namespace=ns,route=web,route_kind=Ingress,service=svc"
                    .to_string(),
                "code=4xx,method=GET,namespace=,route=,route_kind=,service=".to_string(),
            ])
        );
        assert_eq!(
            series(&m.registry, "portcullis_response_size_bytes"),
            BTreeSet::from(["namespace=ns,route=rpc,route_kind=GRPCRoute,service=svc".into()])
        );
        let text = m.render();
        assert!(!text.contains("ingress="), "{text}");
    }

    fn snapshot(services: &[(&str, &[(&str, bool)])], diagnostics: &[&str]) -> Snapshot {
        use crate::model::{Cluster, Diagnostic, Endpoint, ObjectRef, PortRef, Severity};
        Snapshot {
            clusters: services
                .iter()
                .map(|(name, endpoints)| {
                    let all: Vec<Endpoint> = endpoints
                        .iter()
                        .map(|(addr, ready)| Endpoint {
                            address: addr.parse().expect("test address"),
                            ready: *ready,
                            serving: *ready,
                            terminating: false,
                        })
                        .collect();
                    Arc::new(Cluster {
                        service: ObjectRef::new("ns", *name),
                        port: PortRef::Number(80),
                        service_port: Some(80),
                        app_protocol: None,
                        upstream: Upstream::Endpoints {
                            active: all.iter().map(|e| e.address).collect(),
                            all,
                        },
                    })
                })
                .collect(),
            diagnostics: diagnostics
                .iter()
                .map(|kind| Diagnostic {
                    severity: Severity::Warning,
                    kind: (*kind).into(),
                    namespace: "ns".into(),
                    name: "x".into(),
                    field: "spec".into(),
                    reason: "test".into(),
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    /// The label sets of `name`'s series in a gathered registry, as `k=v,…` strings.
    fn series(registry: &Registry, name: &str) -> BTreeSet<String> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    #[test]
    fn a_scrape_during_a_publish_sees_every_series_that_stays() {
        let m = Metrics::new();
        let before = snapshot(
            &[
                ("web", &[("10.0.0.1:80", true)]),
                ("gone", &[("10.0.0.2:80", true)]),
            ],
            &["Ingress", "Service"],
        );
        let after = snapshot(
            &[("web", &[("10.0.0.1:80", true), ("10.0.0.3:80", false)])],
            &["Ingress"],
        );
        m.observe_snapshot(&before, 0.001);
        let web: BTreeSet<String> = ["not_ready", "serving_terminating", "ready"]
            .iter()
            .map(|s| format!("namespace=ns,service=web,state={s}"))
            .collect();
        let ingress = "kind=Ingress,severity=warning".to_string();
        assert!(series(&m.registry, "portcullis_endpoints").is_superset(&web));
        assert!(series(&m.registry, "portcullis_diagnostics").contains(&ingress));

        let mut scrapes = 0;
        m.observe_snapshot_stepwise(&after, 0.001, &mut || {
            scrapes += 1;
            let endpoints = series(&m.registry, "portcullis_endpoints");
            assert!(
                endpoints.is_superset(&web),
                "scrape {scrapes}: {endpoints:?}"
            );
            let diagnostics = series(&m.registry, "portcullis_diagnostics");
            assert!(
                diagnostics.contains(&ingress),
                "scrape {scrapes}: {diagnostics:?}"
            );
        });
        assert!(scrapes > 0);
        // What is gone is removed, and the values are the new ones.
        let endpoints = series(&m.registry, "portcullis_endpoints");
        assert_eq!(endpoints, web);
        assert_eq!(
            series(&m.registry, "portcullis_diagnostics"),
            BTreeSet::from([ingress])
        );
        assert_eq!(
            m.endpoints
                .with_label_values(&["ns", "web", "not_ready"])
                .get(),
            1
        );
    }
}
