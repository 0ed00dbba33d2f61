//! Endpoint selection: which upstream address of a cluster gets the next request.
//!
//! Round robin, with one position per cluster (Service and port) kept in a long-lived
//! table owned by the proxy, so a snapshot swap does not reset where each cluster's
//! rotation stands.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::model::{Cluster, ObjectRef, PortRef, Upstream};

/// Clusters the table remembers before it is cleared; positions are only a fairness
/// aid, so forgetting them under heavy Service churn is harmless.
const MAX_CLUSTERS: usize = 16 * 1024;

/// Where to send a request.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// Round-robin positions by cluster.
#[derive(Debug, Default)]
pub struct Balancer {
    positions: RwLock<HashMap<(ObjectRef, PortRef), Arc<AtomicUsize>>>,
}

impl Balancer {
    /// The next target of `cluster`, or `None` when it has nothing to send to.
    pub fn pick(&self, cluster: &Cluster) -> Option<Target> {
        match &cluster.upstream {
            Upstream::Endpoints { active, .. } => match active.len() {
                0 => None,
                1 => Some(Target::Addr(active[0])),
                n => {
                    let i = self.next(cluster) % n;
                    active.get(i).copied().map(Target::Addr)
                }
            },
            Upstream::ExternalName { host, port } => Some(Target::Name {
                host: host.clone(),
                port: *port,
            }),
            Upstream::Unresolved { .. } => None,
        }
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

    #[test]
    fn rotates_and_survives_a_new_cluster_value() {
        let b = Balancer::default();
        let c = cluster(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let first: Vec<_> = (0..3).filter_map(|_| b.pick(&c)).collect();
        let mut sorted = first.clone();
        sorted.sort_by_key(|t| t.authority());
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "each endpoint once per round: {first:?}");
        // A new snapshot carries a new Cluster value for the same Service port: the
        // rotation continues where it stood.
        let c2 = cluster(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let next: Vec<_> = (0..3).filter_map(|_| b.pick(&c2)).collect();
        assert_eq!(first, next);
    }

    #[test]
    fn nothing_to_pick() {
        let b = Balancer::default();
        assert_eq!(b.pick(&cluster(&[])), None);
        let mut c = cluster(&[]);
        c.upstream = Upstream::Unresolved {
            reason: "gone".into(),
        };
        assert_eq!(b.pick(&c), None);
    }
}
