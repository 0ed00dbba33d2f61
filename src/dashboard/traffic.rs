//! Live traffic per route for the dashboard: requests per second, error rate and
//! latency percentiles over a short rolling window of the proxy's own counters.
//!
//! The source is
//! `portcullis_request_duration_seconds{namespace,route_kind,route,service,code}`, the
//! histogram every answered request is observed in. A sampler copies its counts, summed
//! per route (namespace, kind and name), every [`INTERVAL`] while someone reads the
//! dashboard; a read
//! compares the counts at that moment with the oldest sample at most [`WINDOW`] old.
//! When nobody has read for [`IDLE`], sampling pauses and the next read measures over
//! the whole pause (the window it used is always in the answer), then sampling resumes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How far back the live figures look.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often the sampler copies the counters while the dashboard is read.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Sampling pauses when nobody has read the figures for this long.
pub const IDLE: Duration = Duration::from_secs(60);

/// `(namespace, route_kind, route)` as the metrics label a request: all empty when no
/// route matched (a 404 answered by Portcullis itself); kind and name empty for the
/// `--default-backend-service` default backend.
pub type RouteKey = (String, String, String);

/// Cumulative counts of one route at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Requests answered.
    pub requests: u64,
    /// Of those, answered with a 5xx status.
    pub errors: u64,
    /// `(upper bound in seconds, cumulative count)` of the duration histogram, the
    /// last bound being `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

impl Counts {
    fn add(&mut self, requests: u64, errors: u64, buckets: &[(f64, u64)]) {
        self.requests += requests;
        self.errors += errors;
        if self.buckets.len() < buckets.len() {
            self.buckets.resize(buckets.len(), (f64::INFINITY, 0));
        }
        for (mine, (bound, n)) in self.buckets.iter_mut().zip(buckets) {
            *mine = (*bound, mine.1 + n);
        }
    }

    /// `self - base`, per field; a base that does not fit (other buckets) counts as 0.
    fn since(&self, base: Option<&Counts>) -> Counts {
        let Some(base) = base else {
            return self.clone();
        };
        let same_bounds = base.buckets.len() == self.buckets.len()
            && base
                .buckets
                .iter()
                .zip(&self.buckets)
                .all(|(a, b)| a.0 == b.0);
        Counts {
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, (bound, n))| {
                    let before = if same_bounds { base.buckets[i].1 } else { 0 };
                    (*bound, n.saturating_sub(before))
                })
                .collect(),
        }
    }
}

/// Cumulative counts of every route that has answered a request.
pub type CountsByRoute = BTreeMap<RouteKey, Counts>;

/// Reads the request duration histogram, summed per route over Services and status
/// classes.
pub fn read_counts(metrics: &Metrics) -> CountsByRoute {
    let mut out = CountsByRoute::new();
    for family in metrics.request_duration_seconds.collect() {
        for m in family.get_metric() {
            let mut namespace = "";
            let mut kind = "";
            let mut route = "";
            let mut code = "";
            for l in m.get_label() {
                match l.name() {
                    "namespace" => namespace = l.value(),
                    "route_kind" => kind = l.value(),
                    "route" => route = l.value(),
                    "code" => code = l.value(),
                    _ => {}
                }
            }
            let h = m.get_histogram();
            let count = h.get_sample_count();
            let mut buckets: Vec<(f64, u64)> = h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .filter(|(bound, _)| bound.is_finite())
                .collect();
            buckets.push((f64::INFINITY, count));
            let errors = if code == "5xx" { count } else { 0 };
            out.entry((namespace.to_string(), kind.to_string(), route.to_string()))
                .or_default()
                .add(count, errors, &buckets);
        }
    }
    out
}

/// The live figures of one route (or of all together).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Live {
    /// Requests answered since the process started.
    pub requests_total: u64,
    /// Of those, 5xx answers.
    pub errors_total: u64,
    /// Requests answered within the window.
    pub requests: u64,
    /// Of those, 5xx answers.
    pub errors: u64,
    /// `requests / window_seconds`; null when there is no window yet.
    pub requests_per_second: Option<f64>,
    /// `errors / requests` within the window; null when it saw no request.
    pub error_rate: Option<f64>,
    /// Median and 99th percentile of the request duration (request received →
    /// response headers sent) within the window, in seconds, interpolated inside the
    /// histogram's buckets as Prometheus' `histogram_quantile` does; null when the
    /// window saw no request.
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

impl Live {
    fn new(now: &Counts, base: Option<&Counts>, window: Option<f64>) -> Live {
        let d = now.since(base);
        let seen = d.requests > 0;
        Live {
            requests_total: now.requests,
            errors_total: now.errors,
            requests: d.requests,
            errors: d.errors,
            requests_per_second: window.map(|w| d.requests as f64 / w),
            error_rate: seen.then(|| d.errors as f64 / d.requests as f64),
            p50_seconds: quantile(0.5, &d.buckets),
            p99_seconds: quantile(0.99, &d.buckets),
        }
    }
}

/// The live figures of one route.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteLive {
    /// Empty, as are `kind` and `name`, for requests no route matched; for the
    /// `--default-backend-service` default backend, its Service's.
    pub namespace: String,
    /// The `route_kind` label: `Ingress`, `HTTPRoute`, `GRPCRoute`, or empty.
    pub kind: String,
    /// The `route` label: the name of the object the route came from, or empty.
    pub name: String,
    #[serde(flatten)]
    pub live: Live,
}

/// The `traffic` part of the dashboard API.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrafficView {
    /// Seconds between the base sample and this answer; null when there is no sample
    /// to compare with yet.
    pub window_seconds: Option<f64>,
    /// All routes together.
    pub total: Live,
    /// Every route that has answered a request since the process started, sorted by
    /// namespace, kind and name; the unrouted entry (all empty) first when present.
    pub routes: Vec<RouteLive>,
}

/// The `q` quantile (0 < q ≤ 1) of a histogram given as `(upper bound, cumulative
/// count)` pairs ending with `+Inf`: linear interpolation inside the bucket where the
/// rank falls, 0 as the lower edge of the first bucket; a rank in the `+Inf` bucket
/// gives the highest finite bound. `None` when the histogram is empty.
pub fn quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0_f64, 0_u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if !bound.is_finite() {
                return Some(lower);
            }
            let inside = count.saturating_sub(below);
            if inside == 0 {
                return Some(bound);
            }
            return Some(lower + (bound - lower) * (rank - below as f64) / inside as f64);
        }
        lower = bound;
        below = count;
    }
    Some(lower)
}

/// Samples kept for the rolling window, oldest first.
#[derive(Debug, Default)]
pub struct Window {
    samples: VecDeque<(Instant, CountsByRoute)>,
}

impl Window {
    /// Adds a sample taken at `at`, dropping those no read can use any more: all
    /// older than [`WINDOW`] but the newest of them.
    pub fn push(&mut self, at: Instant, counts: CountsByRoute) {
        self.samples.push_back((at, counts));
        while self.samples.len() > 1
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// When the newest sample was taken.
    pub fn newest(&self) -> Option<Instant> {
        self.samples.back().map(|(t, _)| *t)
    }

    /// The live figures at `now`, given the counts at `now`: against the oldest
    /// sample at most [`WINDOW`] old, else the newest older one.
    pub fn view(&self, now: Instant, counts: &CountsByRoute) -> TrafficView {
        let base = self
            .samples
            .iter()
            .find(|(t, _)| now.saturating_duration_since(*t) <= WINDOW)
            .or(self.samples.back())
            .filter(|(t, _)| now > *t);
        let window = base.map(|(t, _)| now.saturating_duration_since(*t).as_secs_f64());
        let base_counts = base.map(|(_, c)| c);
        let mut total_now = Counts::default();
        let mut total_base = Counts::default();
        let routes = counts
            .iter()
            .map(|(key, c)| {
                let b = base_counts.and_then(|m| m.get(key));
                total_now.add(c.requests, c.errors, &c.buckets);
                if let Some(b) = b {
                    total_base.add(b.requests, b.errors, &b.buckets);
                }
                RouteLive {
                    namespace: key.0.clone(),
                    kind: key.1.clone(),
                    name: key.2.clone(),
                    live: Live::new(c, b, window),
                }
            })
            .collect();
        TrafficView {
            window_seconds: window,
            total: Live::new(&total_now, Some(&total_base), window),
            routes,
        }
    }
}

/// The rolling window over a proxy's metrics, shared by the dashboard's handlers and
/// its sampler.
pub struct Traffic {
    metrics: Arc<Metrics>,
    window: Mutex<Window>,
    /// Set by every read, cleared by the sampler when it goes idle.
    read_since_idle_check: AtomicBool,
}

impl Traffic {
    pub fn new(metrics: Arc<Metrics>) -> Traffic {
        Traffic {
            metrics,
            window: Mutex::new(Window::default()),
            read_since_idle_check: AtomicBool::new(false),
        }
    }

    /// The live figures now. Also stores the counts read as a sample when the newest
    /// one is older than [`INTERVAL`], so reads after a pause measure from here.
    pub fn view(&self) -> TrafficView {
        self.read_since_idle_check.store(true, Ordering::Release);
        let counts = read_counts(&self.metrics);
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let view = window.view(now, &counts);
        if window
            .newest()
            .is_none_or(|t| now.saturating_duration_since(t) >= INTERVAL)
        {
            window.push(now, counts);
        }
        view
    }

    fn sample(&self) {
        let counts = read_counts(&self.metrics);
        let now = Instant::now();
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(now, counts);
    }

    /// Reads the counters on a blocking thread: with thousands of routes that takes
    /// milliseconds, and the proxy's connections share the async workers.
    async fn sample_off_workers(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.sample()).await;
    }

    /// Samples every [`INTERVAL`] until `shutdown` becomes true: once at the start,
    /// then only while a read happened within the last [`IDLE`].
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        self.sample_off_workers().await;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_ticks = (IDLE.as_secs() / INTERVAL.as_secs().max(1)).max(1);
        let mut ticks_without_read = idle_ticks;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
            if self.read_since_idle_check.swap(false, Ordering::AcqRel) {
                ticks_without_read = 0;
            } else {
                ticks_without_read = ticks_without_read.saturating_add(1);
            }
            if ticks_without_read < idle_ticks {
                self.sample_off_workers().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, fast: u64) -> Counts {
        // Buckets 10 ms, 100 ms, +Inf: `fast` requests under 10 ms, the rest 10–100 ms.
        Counts {
            requests,
            errors,
            buckets: vec![(0.01, fast), (0.1, requests), (f64::INFINITY, requests)],
        }
    }

    fn by(key: &str, c: Counts) -> CountsByRoute {
        let mut m = CountsByRoute::new();
        m.insert(("ns".into(), "Ingress".into(), key.into()), c);
        m
    }

    #[test]
    fn counts_are_summed_per_route_kind_and_name() {
        use http::{Method, StatusCode};
        let m = Metrics::new();
        let get = |kind, route, service, status| {
            m.route("ns", kind, route, service)
                .observe_request(&m, &Method::GET, status, 0.001);
        };
        get("Ingress", "web", "a", StatusCode::OK);
        get("Ingress", "web", "b", StatusCode::BAD_GATEWAY);
        get("HTTPRoute", "web", "a", StatusCode::OK);
        m.route("", "", "", "")
            .observe_request(&m, &Method::GET, StatusCode::NOT_FOUND, 0.001);
        let counts = read_counts(&m);
        let key = |kind: &str, name: &str| ("ns".to_string(), kind.to_string(), name.to_string());
        assert_eq!(
            counts.keys().cloned().collect::<Vec<_>>(),
            [
                (String::new(), String::new(), String::new()),
                key("HTTPRoute", "web"),
                key("Ingress", "web")
            ]
        );
        let ingress = &counts[&key("Ingress", "web")];
        assert_eq!((ingress.requests, ingress.errors), (2, 1));
        assert_eq!(counts[&key("HTTPRoute", "web")].requests, 1);
    }

    #[test]
    fn quantile_interpolates_inside_buckets() {
        let b = [(0.01, 50), (0.1, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(0.5, &b), Some(0.01));
        let p75 = quantile(0.75, &b).expect("p75");
        assert!((p75 - 0.055).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(0.5, &[(0.01, 0), (f64::INFINITY, 0)]), None);
        assert_eq!(quantile(0.5, &[]), None);
        // A rank in the +Inf bucket gives the highest finite bound.
        assert_eq!(
            quantile(0.99, &[(0.01, 1), (f64::INFINITY, 10)]),
            Some(0.01)
        );
        // First bucket: from 0 up to its bound.
        let p = quantile(0.5, &[(0.01, 10), (f64::INFINITY, 10)]).expect("p50");
        assert!((p - 0.005).abs() < 1e-9, "{p}");
    }

    #[test]
    fn window_compares_with_the_oldest_sample_inside_it() {
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.view(t0, &by("a", counts(5, 0, 5))).window_seconds, None);
        w.push(t0, by("a", counts(10, 0, 10)));
        for s in 1..=12u64 {
            w.push(
                t0 + Duration::from_secs(s),
                by("a", counts(10 + s * 10, s, 10)),
            );
        }
        // At t0+13 s the oldest sample inside 10 s is the one of t0+3 s (40 requests).
        let now = t0 + Duration::from_secs(13);
        let v = w.view(now, &by("a", counts(140, 13, 10)));
        assert_eq!(v.window_seconds, Some(10.0));
        let a = &v.routes[0];
        assert_eq!(
            (a.namespace.as_str(), a.kind.as_str(), a.name.as_str()),
            ("ns", "Ingress", "a")
        );
        assert_eq!(a.live.requests_total, 140);
        assert_eq!(a.live.requests, 100);
        assert_eq!(a.live.errors, 10);
        assert_eq!(a.live.requests_per_second, Some(10.0));
        assert_eq!(a.live.error_rate, Some(0.1));
        // Every request of the window fell in the 10–100 ms bucket.
        let p50 = a.live.p50_seconds.expect("p50");
        assert!((p50 - 0.055).abs() < 1e-9, "{p50}");
        assert_eq!(v.total, a.live);
    }

    #[test]
    fn after_a_pause_the_window_is_the_pause() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.push(t0, by("a", counts(0, 0, 0)));
        let now = t0 + Duration::from_secs(300);
        let v = w.view(now, &by("a", counts(600, 0, 600)));
        assert_eq!(v.window_seconds, Some(300.0));
        assert_eq!(v.routes[0].live.requests_per_second, Some(2.0));
        assert_eq!(v.routes[0].live.error_rate, Some(0.0));
        // Samples older than the window go, except the newest of them.
        w.push(now, by("a", counts(600, 0, 600)));
        w.push(now + Duration::from_secs(11), by("a", counts(600, 0, 600)));
        assert_eq!(w.samples.len(), 2);
        assert_eq!(w.samples.front().map(|(t, _)| *t), Some(now));
    }

    #[test]
    fn a_route_new_in_the_window_counts_from_zero() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.push(t0, CountsByRoute::new());
        let v = w.view(t0 + Duration::from_secs(2), &by("b", counts(4, 4, 0)));
        let b = &v.routes[0].live;
        assert_eq!(b.requests, 4);
        assert_eq!(b.requests_per_second, Some(2.0));
        assert_eq!(b.error_rate, Some(1.0));
        // No request in the window: a rate of 0, no error rate or percentiles.
        let mut w = Window::default();
        w.push(t0, by("b", counts(4, 4, 0)));
        let v = w.view(t0 + Duration::from_secs(2), &by("b", counts(4, 4, 0)));
        let b = &v.routes[0].live;
        assert_eq!(b.requests_per_second, Some(0.0));
        assert_eq!(b.error_rate, None);
        assert_eq!(b.p99_seconds, None);
    }
}
