//! The data path: accept downstream connections, route each request against the
//! snapshot in force, pick an endpoint, forward, respond.
//!
//! ```text
//!  listener (accept, limits, first-request deadline)
//!    └► handler (one snapshot load ► decision ► endpoint from balance)
//!         └► forward (headers, pooled upstream client, timeouts) ► response
//!  errors: every failure becomes a short text/plain answer carrying x-request-id
//! ```
//!
//! State that outlives a snapshot (in-flight counts, ejections, round-robin positions,
//! the upstream connection pools, open upgrade tunnels) lives in [`Proxy`], never in
//! the snapshot, so a swap neither resets balancing nor drops pooled connections.
//!
//! Shutdown has two steps: [`Proxy::start_draining`] keeps listeners accepting but
//! asks every client to go elsewhere (HTTP/1 responses carry `Connection: close`,
//! HTTP/2 connections get GOAWAY); the `shutdown` signal of [`Proxy::serve_http`] then
//! closes the listener and waits for open connections, and
//! [`Proxy::tunnels_closed`] for upgraded ones. Mirror copies of requests are never
//! waited for: they hold no downstream connection, and end when the proxy is dropped.

mod balance;
pub mod body;
mod errors;
mod forward;
mod handler;
pub mod headers;
pub(crate) mod listener;
mod mirror;
mod observe;
pub mod retry;
pub mod tls;
mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::accesslog::{AccessLog, AccessLogFormat};
use crate::metrics::Metrics;
use crate::model::Snapshot;
use crate::model::safety::EndpointPolicy;

pub use balance::{Ejection, LoadBalance};
pub use errors::{Origin, ProxyError};
pub use mirror::{DEFAULT_MAX_IN_FLIGHT as DEFAULT_MAX_MIRRORS_IN_FLIGHT, DropReason};
pub use tls::TlsSettings;

/// Limits and timeouts of the data path. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Limit for opening an upstream TCP connection (DNS included for ExternalName).
    pub connect_timeout: Duration,
    /// Limit from handing a request to the upstream pool (connecting included) until
    /// its response headers arrive.
    pub response_timeout: Duration,
    /// How long a pooled upstream connection may sit idle and still be reused; the idle
    /// sweep closes it about 1.5 times this long after its last use.
    pub idle_timeout: Duration,
    /// Limit for receiving a request's headers; also closes a connection that sends
    /// nothing at all.
    pub header_read_timeout: Duration,
    /// A request body, a response body or an upgraded tunnel that moves no byte for this
    /// long is aborted (and counted in `stream_idle_timeouts_total{direction}`); zero
    /// turns it off.
    pub stream_idle_timeout: Duration,
    /// Route and forward the normalised path ([`crate::model::path::normalize`]); off:
    /// the path as received.
    pub path_normalization: bool,
    /// Limit on the HTTP/1 request head and on the HTTP/2 header list, in bytes. The
    /// HTTP/1 read buffer cannot be smaller than 8 KiB, so smaller values act as 8 KiB
    /// there.
    pub max_header_size: usize,
    /// Limit on a request body; `None` is unlimited. Exceeding it answers 413.
    pub max_body_size: Option<u64>,
    /// Downstream connections beyond this many, counted across the HTTP and HTTPS
    /// listeners, are closed right after accept; `None` is unlimited.
    pub max_connections: Option<usize>,
    /// How a cluster's endpoints share its requests.
    pub load_balance: LoadBalance,
    /// Backoff of passive health for endpoints that refuse or reset connections.
    pub ejection: Ejection,
    /// After SIGTERM: how long listeners keep accepting while clients are asked to
    /// go elsewhere (readiness already failing).
    pub shutdown_delay: Duration,
    /// Then: how long in-flight requests and open upgrades get to finish.
    pub shutdown_grace: Duration,
    /// The access log on standard output that [`Proxy::new`] starts; `Off` by default
    /// here (the `run` command's flag defaults to `text`).
    pub access_log: AccessLogFormat,
    /// The addresses an ExternalName may resolve to when connecting: translation's
    /// rules ([`EndpointPolicy`]). The default is Kubernetes mode's (loopback,
    /// link-local and unspecified refused); file mode allows local addresses.
    pub endpoint_policy: EndpointPolicy,
    /// Copies of requests (Gateway API `RequestMirror`) in flight at once, across the
    /// proxy; a copy beyond this is not sent and counted in
    /// `portcullis_mirror_dropped_total{reason="in_flight_limit"}`.
    pub max_mirrors_in_flight: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(4),
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(300),
            path_normalization: true,
            max_header_size: 32 * 1024,
            max_body_size: None,
            max_connections: None,
            load_balance: LoadBalance::P2c,
            ejection: Ejection::default(),
            shutdown_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            access_log: AccessLogFormat::Off,
            endpoint_policy: EndpointPolicy::default(),
            max_mirrors_in_flight: mirror::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// The reverse proxy. Cheap to clone: clones share the configuration, the snapshot
/// store, the upstream pool and the balancing state.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: ProxyConfig,
    pub(crate) snapshots: Arc<ArcSwap<Snapshot>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) balancer: balance::Balancer,
    /// Shared with the mirror copies' tasks.
    pub(crate) upstream: Arc<forward::UpstreamClient>,
    /// True once draining began: see [`Proxy::start_draining`].
    pub(crate) draining: watch::Sender<bool>,
    /// Open upgrade tunnels.
    pub(crate) tunnels: upgrade::Tunnels,
    /// Set once by [`Proxy::enable_tls`]: certificates, redirect and HSTS settings.
    pub(crate) tls: std::sync::OnceLock<Arc<tls::TlsState>>,
    /// Where finished requests are logged.
    pub(crate) access_log: AccessLog,
    /// Permits for `max_connections`, shared by all listeners of this proxy.
    pub(crate) connection_limit: Option<Arc<tokio::sync::Semaphore>>,
    /// Retries in flight by Service.
    pub(crate) retry_budget: retry::RetryBudget,
    /// The stream idle limit of request bodies, and their timeout counter.
    pub(crate) request_idle: body::RequestIdle,
    /// `stream_idle_timeouts_total{direction="tunnel"}`.
    pub(crate) tunnel_idle_timeouts: prometheus::IntCounter,
    /// Mirror copies in flight, and their bound.
    pub(crate) mirrors: mirror::Mirrors,
}

impl Proxy {
    /// A proxy that routes with whatever snapshot `snapshots` holds at each request,
    /// logging requests to standard output in `cfg.access_log`'s format.
    pub fn new(
        cfg: ProxyConfig,
        snapshots: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        let log = AccessLog::stdout(cfg.access_log, metrics.access_log_dropped_total.clone());
        Proxy::with_access_log(cfg, snapshots, metrics, log)
    }

    /// Like [`Proxy::new`], logging requests to `access_log` (whatever
    /// `cfg.access_log` says).
    pub fn with_access_log(
        cfg: ProxyConfig,
        snapshots: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
    ) -> Proxy {
        let upstream = Arc::new(forward::UpstreamClient::new(&cfg, metrics.clone()));
        let mirrors = mirror::Mirrors::new(cfg.max_mirrors_in_flight);
        let cfg_limit = cfg
            .max_connections
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        let request_idle = body::RequestIdle {
            limit: cfg.stream_idle_timeout,
            timeouts: metrics
                .stream_idle_timeouts_total
                .with_label_values(&["request"]),
        };
        // The response direction is counted where the response body fails; made here so
        // that all three series exist from the start.
        metrics
            .stream_idle_timeouts_total
            .with_label_values(&["response"]);
        let tunnel_idle_timeouts = metrics
            .stream_idle_timeouts_total
            .with_label_values(&["tunnel"]);
        Proxy {
            inner: Arc::new(Inner {
                balancer: balance::Balancer::new(cfg.load_balance, cfg.ejection),
                retry_budget: retry::RetryBudget::default(),
                request_idle,
                tunnel_idle_timeouts,
                mirrors,
                cfg,
                snapshots,
                metrics,
                upstream,
                draining: watch::Sender::new(false),
                tunnels: upgrade::Tunnels::default(),
                tls: std::sync::OnceLock::new(),
                access_log,
                connection_limit: cfg_limit,
            }),
        }
    }

    /// The configuration this proxy was built with.
    pub fn config(&self) -> &ProxyConfig {
        &self.inner.cfg
    }

    /// Serves plain HTTP (HTTP/1.1 keep-alive and HTTP/2 prior knowledge on the same
    /// port) on `listener` until `shutdown` becomes true (or its sender is dropped);
    /// then stops accepting and returns once in-flight connections have finished (idle
    /// keep-alive connections are closed at once). Callers that need a bound on the
    /// drain wrap this in a timeout.
    pub async fn serve_http(&self, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        listener::serve(self.inner.clone(), listener, "http", None, shutdown).await;
    }

    /// Turns on TLS with `settings`: certificates for [`Proxy::serve_https`], and the
    /// redirect and HSTS rules on every listener. Only the first call has an effect; call
    /// it before serving.
    pub fn enable_tls(&self, settings: TlsSettings) -> Result<(), rustls::Error> {
        let state = tls::TlsState::new(
            settings,
            self.inner.snapshots.clone(),
            self.inner.metrics.clone(),
        )?;
        let _ = self.inner.tls.set(Arc::new(state));
        Ok(())
    }

    /// Serves HTTPS on `listener` until `shutdown`, like [`Proxy::serve_http`]: TLS 1.2
    /// and 1.3, a certificate per handshake from the snapshot in force, ALPN `h2` or
    /// `http/1.1`. Without [`Proxy::enable_tls`], a generated default certificate and
    /// default settings are used.
    pub async fn serve_https(&self, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        let state = match self.inner.tls.get() {
            Some(s) => s.clone(),
            None => {
                let made = crate::certs::generate_default()
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        crate::proxy::tls::log_generated_default(&c);
                        self.enable_tls(TlsSettings::new(c))
                            .map_err(|e| e.to_string())
                    });
                match (made, self.inner.tls.get()) {
                    (Ok(()), Some(s)) => s.clone(),
                    (Err(e), _) => {
                        tracing::error!(error = %e, "cannot set up TLS; the HTTPS listener is not served");
                        return;
                    }
                    (Ok(()), None) => return,
                }
            }
        };
        if let Ok(addr) = listener.local_addr() {
            state.set_https_port(addr.port());
        }
        listener::serve(self.inner.clone(), listener, "https", Some(state), shutdown).await;
    }

    /// Starts draining: listeners keep accepting, but every HTTP/1 response from now on
    /// carries `Connection: close`, and HTTP/2 connections get GOAWAY once they have
    /// carried a request.
    pub fn start_draining(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Resolves once no upgrade tunnel (such as a WebSocket) is open.
    pub async fn tunnels_closed(&self) {
        self.inner.tunnels.closed().await;
    }

    /// Request copies for mirrors in flight now, across the proxy.
    pub fn mirrors_in_flight(&self) -> usize {
        self.inner.mirrors.in_flight()
    }

    /// Requests in flight on the endpoint `addr`, across all clusters (response bodies
    /// still streaming included).
    pub fn in_flight(&self, addr: std::net::SocketAddr) -> usize {
        self.inner.balancer.in_flight(addr)
    }

    /// Whether passive health has ejected the endpoint `addr` right now.
    pub fn is_ejected(&self, addr: std::net::SocketAddr) -> bool {
        self.inner.balancer.is_ejected(addr)
    }
}
