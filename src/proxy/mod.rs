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
//! State that outlives a snapshot (round-robin positions, the upstream connection pool)
//! lives in [`Proxy`], never in the snapshot, so a swap neither resets balancing nor
//! drops pooled connections.

mod balance;
pub mod body;
mod errors;
mod forward;
mod handler;
pub mod headers;
pub(crate) mod listener;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::Snapshot;

pub use errors::{Origin, ProxyError};

/// Limits and timeouts of the data path. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Limit for opening an upstream TCP connection (DNS included for ExternalName).
    pub connect_timeout: Duration,
    /// Limit from handing a request to the upstream pool (connecting included) until
    /// its response headers arrive.
    pub response_timeout: Duration,
    /// How long a pooled upstream connection may sit idle before it is closed.
    pub idle_timeout: Duration,
    /// Limit for receiving a request's headers; also closes a connection that sends
    /// nothing at all.
    pub header_read_timeout: Duration,
    /// Limit on the HTTP/1 request head and on the HTTP/2 header list, in bytes. The
    /// HTTP/1 read buffer cannot be smaller than 8 KiB, so smaller values act as 8 KiB
    /// there.
    pub max_header_size: usize,
    /// Limit on a request body; `None` is unlimited. Exceeding it answers 413.
    pub max_body_size: Option<u64>,
    /// Downstream connections beyond this many are closed right after accept; `None`
    /// is unlimited.
    pub max_connections: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(4),
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 32 * 1024,
            max_body_size: None,
            max_connections: None,
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
    pub(crate) upstream: forward::UpstreamClient,
}

impl Proxy {
    /// A proxy that routes with whatever snapshot `snapshots` holds at each request.
    pub fn new(
        cfg: ProxyConfig,
        snapshots: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        let upstream = forward::UpstreamClient::new(&cfg, metrics.clone());
        Proxy {
            inner: Arc::new(Inner {
                cfg,
                snapshots,
                metrics,
                balancer: balance::Balancer::default(),
                upstream,
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
        listener::serve(self.inner.clone(), listener, "http", shutdown).await;
    }
}
