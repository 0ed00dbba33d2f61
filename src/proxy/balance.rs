//! Endpoint selection: which upstream address of a cluster gets the next request, and
//! passive health (ejection of endpoints that refuse or reset connections).
//!
//! Everything here outlives snapshots: per-endpoint state (in-flight requests,
//! consecutive failures, ejection deadline) is keyed by endpoint address, round-robin
//! positions by cluster (Service and port). A new snapshot carries new `Cluster` values
//! that find the same state, so a configuration change neither resets balancing nor
//! re-admits an ejected endpoint early.
//!
//! - **p2c** (default): two distinct candidates at random, the one with fewer requests
//!   in flight wins. In-flight counts are held by an [`InFlight`] guard that the
//!   response body carries, so a long download counts until its last byte.
//! - **round-robin**: one rotating position per cluster.
//!
//! Ejected endpoints are skipped until their backoff window ends. When every endpoint
//! of a cluster is ejected the cluster is in *panic mode* (Envoy's term): ejection is
//! ignored and all endpoints are balanced over, rather than answering 503.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::uri::Authority;

use crate::metrics::Metrics;
use crate::model::{Cluster, ObjectRef, PortRef, Upstream};

/// Hashing of the balancer's tables: keys are addresses and object names from the
/// snapshot, not chosen by clients.
type FoldHash = foldhash::fast::RandomState;

/// Clusters the round-robin table remembers before it is cleared; positions are only a
/// fairness aid, so forgetting them under heavy Service churn is harmless.
const MAX_CLUSTERS: usize = 16 * 1024;

/// Endpoint states kept before idle ones (nothing in flight, not ejected) are pruned.
const MAX_ENDPOINTS: usize = 64 * 1024;

/// Clusters up to this size are scanned by p2c; larger ones are sampled.
const SCAN_LIMIT: usize = 16;

/// Random draws p2c makes in a large cluster before it falls back to a scan.
const SAMPLES: usize = 8;

/// The `appProtocol` that asks for HTTP/2 cleartext (prior knowledge) upstream.
pub const H2C: &str = "kubernetes.io/h2c";

/// How a cluster's endpoints share its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalance {
    /// Power of two choices on least requests in flight.
    #[default]
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
}

/// Backoff of passive health: the first ejection lasts `base`, each further
/// consecutive one twice as long, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Where to send a request; also the key of the upstream connection pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A pod endpoint.
    Addr(SocketAddr),
    /// An ExternalName: resolved when connecting.
    Name { host: String, port: u16 },
}

impl Target {
    /// `host:port` as a URI authority.
    pub fn authority(&self) -> String {
        match self {
            Target::Addr(a) => a.to_string(),
            Target::Name { host, port } => {
                let host = host.trim_end_matches('.');
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }
        }
    }

    /// The endpoint address, when the target is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Target::Addr(a) => Some(*a),
            Target::Name { .. } => None,
        }
    }
}

/// Passive health of one endpoint in one word, so that a failure and a success never
/// interleave half-applied: consecutive failures in the top [`Health::FAILURE_BITS`]
/// bits, the end of the ejection (microseconds after the balancer's epoch; 0 =
/// admitted) in the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Health(u64);

impl Health {
    const FAILURE_BITS: u32 = 6;
    const UNTIL_BITS: u32 = 64 - Health::FAILURE_BITS;
    const UNTIL_MASK: u64 = (1 << Health::UNTIL_BITS) - 1;
    /// Failures are counted up to this many; the backoff is capped far below it.
    const MAX_FAILURES: u32 = (1 << Health::FAILURE_BITS) - 1;
    const ADMITTED: Health = Health(0);

    fn new(failures: u32, until: u64) -> Health {
        let failures = u64::from(failures.min(Health::MAX_FAILURES));
        Health(failures << Health::UNTIL_BITS | until.min(Health::UNTIL_MASK))
    }

    /// Consecutive ejections without a success in between.
    fn failures(self) -> u32 {
        // The shift leaves FAILURE_BITS bits, which fit a u32.
        (self.0 >> Health::UNTIL_BITS) as u32
    }

    /// Ejected until this many microseconds after the epoch; 0 = admitted.
    fn until(self) -> u64 {
        self.0 & Health::UNTIL_MASK
    }

    /// The state after a failure at `now`: one more failure, ejected for the backoff
    /// window that the failures before it earn. Returns the window too.
    fn after_failure(self, now: u64, ejection: Ejection) -> (Health, Duration) {
        let n = self.failures().min(16);
        let window = ejection.base.saturating_mul(1u32 << n).min(ejection.max);
        let until = now.saturating_add(micros(window)).max(1);
        (Health::new(self.failures() + 1, until), window)
    }

    /// The state a success at `now` moves to from `seen`, the state it read, for a
    /// request sent when the state was `picked`: admitted with no failures. `None` when
    /// there is nothing to clear, or when `seen`'s ejection is still in force and began
    /// after the request was sent: that answer says nothing new (an endpoint shutting
    /// down answers what it has while it refuses new connections). A request sent during
    /// the ejection (panic mode) that is answered re-admits the endpoint.
    fn after_success(seen: Health, now: u64, picked: Health) -> Option<Health> {
        (seen != Health::ADMITTED && (seen == picked || seen.until() <= now))
            .then_some(Health::ADMITTED)
    }
}

/// Long-lived state of one endpoint address.
#[derive(Debug)]
struct EndpointState {
    /// The address as a URI authority, formatted once.
    authority: Authority,
    in_flight: AtomicUsize,
    /// Failures and ejection, as a [`Health`] word.
    health: AtomicU64,
    /// The balancer's epoch, which [`Health`] deadlines count from.
    epoch: Instant,
}

impl EndpointState {
    fn new(addr: SocketAddr, epoch: Instant) -> EndpointState {
        EndpointState {
            authority: authority_of(addr),
            in_flight: AtomicUsize::new(0),
            health: AtomicU64::new(Health::ADMITTED.0),
            epoch,
        }
    }

    fn health(&self) -> Health {
        Health(self.health.load(Ordering::Acquire))
    }

    /// A response came back to a request sent when the state was `picked`: the failure
    /// count is cleared, unless an ejection that began after it was sent is in force.
    /// Reads the clock only for an endpoint that has failed.
    #[inline]
    fn succeeded(&self, picked: Health) {
        let seen = self.health();
        if seen != Health::ADMITTED {
            self.succeeded_from(seen, micros(self.epoch.elapsed()), picked);
        }
    }

    /// Clears the failures of `seen`, the state this success read at `now`, only if the
    /// state is still `seen`: a failure reported since then is newer than this success
    /// and stands (its ejection is not erased).
    fn succeeded_from(&self, seen: Health, now: u64, picked: Health) {
        if let Some(next) = Health::after_success(seen, now, picked) {
            let _ =
                self.health
                    .compare_exchange(seen.0, next.0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Records a failure at `now`; returns the ejection window it earned.
    fn failed(&self, now: u64, ejection: Ejection) -> Duration {
        let mut seen = self.health();
        loop {
            let (next, window) = seen.after_failure(now, ejection);
            match self.health.compare_exchange_weak(
                seen.0,
                next.0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return window,
                Err(actual) => seen = Health(actual),
            }
        }
    }

    /// Not ejected at `now` (microseconds after the epoch).
    fn admitted(&self, now: u64) -> bool {
        self.health().until() <= now
    }
}

/// Counts one request in flight on an endpoint until dropped. The response body
/// carries it, so the count falls when the body finishes or is dropped.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
    /// The endpoint's health when the request was sent to it.
    picked: Health,
}

impl InFlight {
    /// Reports a response from this guard's endpoint: its failure count and any ejection
    /// end, so the backoff starts from the beginning again (no lookup by address) —
    /// unless an ejection that began after this request was sent is in force.
    pub fn succeeded(&self) {
        self.state.succeeded(self.picked);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A chosen target and, for pod endpoints, its in-flight guard.
#[derive(Debug)]
pub struct Picked {
    pub target: Target,
    /// The target as the authority of the upstream request URI; `None` when an
    /// ExternalName is not a valid authority.
    pub authority: Option<Authority>,
    pub guard: Option<InFlight>,
}

/// `addr` as a URI authority (`[v6]:port` for IPv6).
fn authority_of(addr: SocketAddr) -> Authority {
    // A socket address always formats as a valid authority.
    Authority::try_from(addr.to_string().as_str())
        .unwrap_or_else(|_| Authority::from_static("invalid.endpoint"))
}

/// Balancing and passive-health state of every cluster and endpoint.
#[derive(Debug)]
pub struct Balancer {
    policy: LoadBalance,
    ejection: Ejection,
    epoch: Instant,
    positions: RwLock<HashMap<(ObjectRef, PortRef), Arc<AtomicUsize>, FoldHash>>,
    endpoints: RwLock<HashMap<SocketAddr, Arc<EndpointState>, FoldHash>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer::new(LoadBalance::default(), Ejection::default())
    }
}

impl Balancer {
    pub fn new(policy: LoadBalance, ejection: Ejection) -> Balancer {
        Balancer {
            policy,
            ejection,
            epoch: Instant::now(),
            positions: RwLock::default(),
            endpoints: RwLock::default(),
        }
    }

    /// The next target of `cluster`, skipping `exclude` (endpoints that already failed
    /// this request), or `None` when nothing is left to send to.
    pub fn pick(&self, cluster: &Cluster, exclude: &[SocketAddr]) -> Option<Picked> {
        match &cluster.upstream {
            Upstream::Endpoints { active, .. } => {
                let (addr, state) = match self.policy {
                    LoadBalance::RoundRobin => self.pick_round_robin(cluster, active, exclude)?,
                    LoadBalance::P2c => self.pick_p2c(active, exclude)?,
                };
                state.in_flight.fetch_add(1, Ordering::AcqRel);
                Some(Picked {
                    target: Target::Addr(addr),
                    authority: Some(state.authority.clone()),
                    guard: Some(InFlight {
                        picked: state.health(),
                        state,
                    }),
                })
            }
            Upstream::ExternalName { host, port } => {
                if exclude.is_empty() {
                    let target = Target::Name {
                        host: host.clone(),
                        port: *port,
                    };
                    Some(Picked {
                        authority: Authority::try_from(target.authority().as_str()).ok(),
                        target,
                        guard: None,
                    })
                } else {
                    None
                }
            }
            Upstream::Unresolved { .. } => None,
        }
    }

    /// Round robin: the first usable endpoint from the cluster's next position on,
    /// skipping ejected ones unless all are (panic mode).
    fn pick_round_robin(
        &self,
        cluster: &Cluster,
        active: &[SocketAddr],
        exclude: &[SocketAddr],
    ) -> Option<(SocketAddr, Arc<EndpointState>)> {
        let n = active.len();
        if n == 0 {
            return None;
        }
        let now = self.now();
        let start = self.next(cluster);
        let mut panic_choice = None;
        for k in 0..n {
            let addr = active[start.wrapping_add(k) % n];
            if exclude.contains(&addr) {
                continue;
            }
            let state = self.state(addr);
            if state.admitted(now) {
                return Some((addr, state));
            }
            panic_choice.get_or_insert((addr, state));
        }
        panic_choice
    }

    /// Power of two choices: two distinct usable endpoints at random, the one with
    /// fewer requests in flight. Large clusters are sampled; small ones (and large
    /// ones where sampling finds nothing admitted) are scanned, which also finds
    /// panic mode.
    fn pick_p2c(
        &self,
        active: &[SocketAddr],
        exclude: &[SocketAddr],
    ) -> Option<(SocketAddr, Arc<EndpointState>)> {
        let n = active.len();
        let now = self.now();
        if n > SCAN_LIMIT {
            let mut found: Vec<(SocketAddr, Arc<EndpointState>)> = Vec::with_capacity(2);
            for _ in 0..SAMPLES {
                let addr = active[fastrand::usize(..n)];
                if exclude.contains(&addr) || found.iter().any(|(a, _)| *a == addr) {
                    continue;
                }
                let state = self.state(addr);
                if state.admitted(now) {
                    found.push((addr, state));
                    if found.len() == 2 {
                        break;
                    }
                }
            }
            if !found.is_empty() {
                return least_loaded_of_two(found);
            }
        }
        if n <= SCAN_LIMIT {
            return self.pick_p2c_small(active, exclude, now);
        }
        let usable: Vec<(SocketAddr, Arc<EndpointState>)> = active
            .iter()
            .filter(|a| !exclude.contains(a))
            .map(|a| (*a, self.state(*a)))
            .collect();
        let admitted: Vec<(SocketAddr, Arc<EndpointState>)> = usable
            .iter()
            .filter(|(_, s)| s.admitted(now))
            .cloned()
            .collect();
        // Panic mode: every usable endpoint is ejected, so ejection is ignored.
        let pool = if admitted.is_empty() {
            usable
        } else {
            admitted
        };
        least_loaded_of_two(pool)
    }

    /// p2c over a cluster of at most [`SCAN_LIMIT`] endpoints, without allocating: the
    /// same choice as the scan in [`Balancer::pick_p2c`] (two distinct admitted
    /// endpoints at random, or any two usable ones in panic mode; fewer in flight wins).
    fn pick_p2c_small(
        &self,
        active: &[SocketAddr],
        exclude: &[SocketAddr],
        now: u64,
    ) -> Option<(SocketAddr, Arc<EndpointState>)> {
        let mut pool: [Option<(SocketAddr, Arc<EndpointState>)>; SCAN_LIMIT] =
            [const { None }; SCAN_LIMIT];
        let (mut usable, mut admitted) = (0, 0);
        for addr in active.iter().take(SCAN_LIMIT) {
            if exclude.contains(addr) {
                continue;
            }
            let state = self.state(*addr);
            let ok = state.admitted(now);
            pool[usable] = Some((*addr, state));
            // Admitted endpoints first, so that they are the pool when there are any.
            if ok {
                pool.swap(admitted, usable);
                admitted += 1;
            }
            usable += 1;
        }
        // Panic mode: every usable endpoint is ejected, so ejection is ignored.
        let n = if admitted == 0 { usable } else { admitted };
        let load = |k: usize| {
            pool[k]
                .as_ref()
                .map_or(usize::MAX, |(_, s)| s.in_flight.load(Ordering::Acquire))
        };
        let winner = match n {
            0 => return None,
            1 => 0,
            _ => {
                let (i, j) = two_distinct(n);
                if load(j) < load(i) { j } else { i }
            }
        };
        pool[winner].take()
    }

    /// Records that `addr` refused or reset a connection: it is ejected for the next
    /// backoff window, counted under `service` in `endpoint_ejections_total`.
    pub fn report_failure(&self, addr: SocketAddr, service: &ObjectRef, metrics: &Metrics) {
        let window = self.state(addr).failed(self.now(), self.ejection);
        metrics
            .endpoint_ejections_total
            .with_label_values(&[service.namespace.as_str(), service.name.as_str()])
            .inc();
        tracing::info!(
            namespace = %service.namespace,
            service = %service.name,
            endpoint = %addr,
            seconds = window.as_secs_f64(),
            "endpoint ejected"
        );
    }

    /// Requests in flight on `addr` (for tests and debug views).
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        let read = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        read.get(&addr)
            .map_or(0, |s| s.in_flight.load(Ordering::Acquire))
    }

    /// Requests in flight across `cluster`'s active endpoints: the load the retry budget
    /// measures against. Scans the cluster, so it is for the retry path only.
    pub fn cluster_in_flight(&self, cluster: &Cluster) -> usize {
        let Upstream::Endpoints { active, .. } = &cluster.upstream else {
            return 0;
        };
        let read = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        active
            .iter()
            .filter_map(|a| read.get(a))
            .map(|s| s.in_flight.load(Ordering::Acquire))
            .sum()
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        let now = self.now();
        let read = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        read.get(&addr).is_some_and(|s| !s.admitted(now))
    }

    /// Microseconds since the balancer's epoch.
    fn now(&self) -> u64 {
        micros(self.epoch.elapsed())
    }

    fn state(&self, addr: SocketAddr) -> Arc<EndpointState> {
        {
            let read = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = read.get(&addr) {
                return s.clone();
            }
        }
        let now = self.now();
        let mut write = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        if write.len() >= MAX_ENDPOINTS {
            // Forget endpoints nobody holds: nothing in flight, not ejected.
            write.retain(|_, s| Arc::strong_count(s) > 1 || !s.admitted(now));
        }
        write
            .entry(addr)
            .or_insert_with(|| Arc::new(EndpointState::new(addr, self.epoch)))
            .clone()
    }

    fn next(&self, cluster: &Cluster) -> usize {
        let key = (cluster.service.clone(), cluster.port.clone());
        {
            let read = self.positions.read().unwrap_or_else(|e| e.into_inner());
            if let Some(pos) = read.get(&key) {
                return pos.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut write = self.positions.write().unwrap_or_else(|e| e.into_inner());
        if write.len() >= MAX_CLUSTERS {
            write.clear();
        }
        write
            .entry(key)
            .or_insert_with(|| Arc::new(AtomicUsize::new(fastrand::usize(..))))
            .fetch_add(1, Ordering::Relaxed)
    }
}

/// Two distinct entries of `pool` at random (or its only one); the one with fewer
/// requests in flight.
fn least_loaded_of_two(
    mut pool: Vec<(SocketAddr, Arc<EndpointState>)>,
) -> Option<(SocketAddr, Arc<EndpointState>)> {
    let n = pool.len();
    if n <= 1 {
        return pool.pop();
    }
    let (i, j) = two_distinct(n);
    let load = |k: usize| pool[k].1.in_flight.load(Ordering::Acquire);
    let winner = if load(j) < load(i) { j } else { i };
    Some(pool.swap_remove(winner))
}

/// Two distinct indices below `n` (at least 2), uniformly at random.
fn two_distinct(n: usize) -> (usize, usize) {
    let i = fastrand::usize(..n);
    let mut j = fastrand::usize(..n - 1);
    if j >= i {
        j += 1;
    }
    (i, j)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Whether a cluster asks for HTTP/2 cleartext upstream.
pub fn is_h2c(cluster: &Cluster) -> bool {
    cluster
        .app_protocol
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case(H2C))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(active: &[&str]) -> Cluster {
        Cluster {
            service: ObjectRef::new("ns", "svc"),
            port: PortRef::Number(80),
            service_port: Some(80),
            app_protocol: None,
            upstream: Upstream::Endpoints {
                all: Vec::new(),
                active: active
                    .iter()
                    .map(|a| a.parse().expect("test address"))
                    .collect(),
            },
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn rr() -> Balancer {
        Balancer::new(LoadBalance::RoundRobin, Ejection::default())
    }

    #[test]
    fn rotates_and_survives_a_new_cluster_value() {
        let b = rr();
        let c = cluster(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let first: Vec<_> = (0..3)
            .filter_map(|_| b.pick(&c, &[]).map(|p| p.target))
            .collect();
        let mut sorted = first.clone();
        sorted.sort_by_key(|t| t.authority());
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "each endpoint once per round: {first:?}");
        // A new snapshot carries a new Cluster value for the same Service port: the
        // rotation continues where it stood.
        let c2 = cluster(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let next: Vec<_> = (0..3)
            .filter_map(|_| b.pick(&c2, &[]).map(|p| p.target))
            .collect();
        assert_eq!(first, next);
    }

    #[test]
    fn nothing_to_pick() {
        let b = Balancer::default();
        assert!(b.pick(&cluster(&[]), &[]).is_none());
        let mut c = cluster(&[]);
        c.upstream = Upstream::Unresolved {
            reason: "gone".into(),
        };
        assert!(b.pick(&c, &[]).is_none());
        let one = cluster(&["10.0.0.1:80"]);
        assert!(b.pick(&one, &[addr("10.0.0.1:80")]).is_none());
    }

    #[test]
    fn p2c_prefers_the_endpoint_with_fewer_requests_in_flight() {
        let b = Balancer::default();
        let c = cluster(&["10.0.0.1:80", "10.0.0.2:80"]);
        // Hold requests on whichever endpoint comes first; with two endpoints p2c
        // always compares both, so every later pick goes to the idle one.
        let held = b.pick(&c, &[]).expect("an endpoint");
        let busy = held.target.addr().expect("address");
        for _ in 0..20 {
            let p = b.pick(&c, &[]).expect("an endpoint");
            assert_ne!(p.target.addr(), Some(busy));
        }
        assert_eq!(b.in_flight(busy), 1);
        drop(held);
        assert_eq!(b.in_flight(busy), 0, "the guard gives the request back");
    }

    #[test]
    fn ejection_backs_off_and_panic_mode_uses_everything() {
        let metrics = Metrics::new();
        let b = Balancer::new(
            LoadBalance::RoundRobin,
            Ejection {
                base: Duration::from_secs(60),
                max: Duration::from_secs(120),
            },
        );
        let c = cluster(&["10.0.0.1:80", "10.0.0.2:80"]);
        let bad = addr("10.0.0.1:80");
        b.report_failure(bad, &c.service, &metrics);
        assert!(b.is_ejected(bad));
        for _ in 0..10 {
            let p = b.pick(&c, &[]).expect("an endpoint");
            assert_eq!(p.target.addr(), Some(addr("10.0.0.2:80")));
        }
        // Both ejected: panic mode balances over both again.
        b.report_failure(addr("10.0.0.2:80"), &c.service, &metrics);
        let mut seen: Vec<_> = (0..10)
            .filter_map(|_| b.pick(&c, &[]).and_then(|p| p.target.addr()))
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 2, "{seen:?}");
        // Success re-admits at once and resets the backoff.
        let from_bad = (0..10)
            .filter_map(|_| b.pick(&c, &[]))
            .find(|p| p.target.addr() == Some(bad))
            .expect("panic mode picks the ejected endpoint too");
        from_bad
            .guard
            .as_ref()
            .expect("pod endpoints carry a guard")
            .succeeded();
        assert!(!b.is_ejected(bad));
        assert_eq!(
            metrics
                .endpoint_ejections_total
                .with_label_values(&["ns", "svc"])
                .get(),
            2
        );
    }

    #[test]
    fn large_clusters_are_sampled_and_still_find_the_last_admitted_endpoint() {
        let metrics = Metrics::new();
        let b = Balancer::new(
            LoadBalance::P2c,
            Ejection {
                base: Duration::from_secs(60),
                max: Duration::from_secs(60),
            },
        );
        let addrs: Vec<String> = (1..=100).map(|i| format!("10.0.1.{i}:80")).collect();
        let c = cluster(&addrs.iter().map(String::as_str).collect::<Vec<_>>());
        let mut spread: Vec<_> = (0..200)
            .filter_map(|_| b.pick(&c, &[]).and_then(|p| p.target.addr()))
            .collect();
        spread.sort();
        spread.dedup();
        assert!(spread.len() > 50, "p2c spreads: {}", spread.len());
        for a in &addrs[1..] {
            b.report_failure(addr(a), &c.service, &metrics);
        }
        for _ in 0..20 {
            let p = b.pick(&c, &[]).expect("an endpoint");
            assert_eq!(p.target.addr(), Some(addr(&addrs[0])));
        }
        // Excluding the last admitted one leaves only ejected ones: panic mode.
        assert!(b.pick(&c, &[addr(&addrs[0])]).is_some());
    }

    #[test]
    fn a_failure_between_a_success_read_and_its_write_stands() {
        let metrics = Metrics::new();
        let b = Balancer::new(
            LoadBalance::P2c,
            Ejection {
                base: Duration::from_secs(60),
                max: Duration::from_secs(120),
            },
        );
        let svc = ObjectRef::new("ns", "svc");
        let a = addr("10.0.0.7:80");
        b.report_failure(a, &svc, &metrics);
        let state = b.state(a);
        // The losing order: a success reads the state, a failure is reported, then the
        // success writes.
        let seen = state.health();
        assert_eq!(seen.failures(), 1);
        b.report_failure(a, &svc, &metrics);
        // Read after its ejection ended (as far as it knows).
        state.succeeded_from(seen, seen.until(), Health::ADMITTED);
        assert!(b.is_ejected(a), "the newer failure's ejection stands");
        assert_eq!(state.health().failures(), 2);
        // An answer to a request sent before the ejection does not shorten it.
        state.succeeded(Health::ADMITTED);
        assert!(b.is_ejected(a));
        assert_eq!(state.health().failures(), 2);
        // One to a request sent during it (panic mode) re-admits the endpoint.
        state.succeeded(state.health());
        assert!(!b.is_ejected(a));
        assert_eq!(state.health(), Health::ADMITTED);
    }

    #[test]
    fn health_transitions_are_pure() {
        let ejection = Ejection {
            base: Duration::from_millis(10),
            max: Duration::from_millis(25),
        };
        let (h1, w1) = Health::ADMITTED.after_failure(1_000, ejection);
        assert_eq!((h1.failures(), h1.until(), w1), (1, 11_000, ejection.base));
        let (h2, w2) = h1.after_failure(2_000, ejection);
        assert_eq!((h2.failures(), h2.until()), (2, 22_000));
        assert_eq!(w2, Duration::from_millis(20));
        let (h3, _) = h2.after_failure(3_000, ejection);
        assert_eq!((h3.failures(), h3.until()), (3, 28_000), "capped at max");
        let before = Health::ADMITTED;
        assert_eq!(
            Health::after_success(h3, 28_000, before),
            Some(Health::ADMITTED)
        );
        assert_eq!(
            Health::after_success(h3, 27_999, before),
            None,
            "still ejected since after the request was sent"
        );
        assert_eq!(
            Health::after_success(h3, 27_999, h3),
            Some(Health::ADMITTED),
            "sent while ejected: panic mode"
        );
        assert_eq!(Health::after_success(Health::ADMITTED, 0, before), None);
        // The counter saturates instead of spilling into the deadline.
        let many = Health::new(Health::MAX_FAILURES, 5);
        let (next, _) = many.after_failure(0, ejection);
        assert_eq!(next.failures(), Health::MAX_FAILURES);
        assert_eq!(next.until(), 25_000);
    }

    #[test]
    fn ejection_window_doubles_up_to_the_cap() {
        let metrics = Metrics::new();
        let b = Balancer::new(
            LoadBalance::P2c,
            Ejection {
                base: Duration::from_millis(1),
                max: Duration::from_millis(4),
            },
        );
        let svc = ObjectRef::new("ns", "svc");
        let a = addr("10.0.0.9:80");
        let mut windows = Vec::new();
        for _ in 0..5 {
            let before = b.now();
            b.report_failure(a, &svc, &metrics);
            let until = b.state(a).health().until();
            windows.push(Duration::from_micros(until - before).as_millis());
        }
        // Each window is at least its nominal length (plus a little clock slack).
        for (w, nominal) in windows.iter().zip([1u128, 2, 4, 4, 4]) {
            assert!(*w >= nominal && *w < nominal + 1000, "{windows:?}");
        }
    }
}
