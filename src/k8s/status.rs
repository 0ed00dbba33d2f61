//! Ingress status: write our load balancer's addresses into `status.loadBalancer` of
//! every Ingress we serve, and take them out of Ingresses we stop serving.
//!
//! Beside the data flow, after publish: it reads the snapshot in force (which Ingresses
//! are ours, [`Snapshot::served_ingresses`]) and the source's current objects (their
//! status as the reflector last saw it), and writes only where the two differ, with a
//! JSON merge patch on the `status` subresource. Only the elected leader writes
//! ([`crate::k8s::leader`]); the others keep track so that they can take over.
//!
//! - **Ours** is every Ingress the translation classified as ours (IngressClass, legacy
//!   annotation or default class), whether or not its rules could be routed: the user
//!   asked this controller to serve it, and the address tells them where.
//! - **Addresses** come from `--publish-status-address` (fixed) or from the
//!   `status.loadBalancer.ingress` of the `--publish-service` Service, watched. Until that
//!   Service is seen (or while it does not exist) nothing is written, so a missing
//!   Service never wipes status; a Service without addresses yet means empty status.
//! - **Clearing**: an Ingress that this process saw served earlier, is no longer ours
//!   (class changed, annotation removed) and still carries exactly our addresses gets
//!   them removed. An Ingress whose status another controller already rewrote is left
//!   alone; so is one that stopped being ours while no Portcullis was running.
//! - Status is not cleared on shutdown: the next leader would write the same addresses.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{Ingress, IngressLoadBalancerIngress};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::k8s::leader::{Elector, LeaseSettings};
use crate::model::{ObjectRef, Snapshot};
use crate::publish::SourceUpdate;

/// One `--publish-status-address`: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatusAddress {
    Ip(IpAddr),
    Hostname(String),
}

impl std::str::FromStr for StatusAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(StatusAddress::Ip(ip));
        }
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("`{s}` is neither an IP address nor a DNS name"));
        }
        Ok(StatusAddress::Hostname(name))
    }
}

/// Parses `--publish-service`: `NAMESPACE/NAME`.
pub fn parse_service_ref(s: &str) -> Result<ObjectRef, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ObjectRef::new(ns, name))
        }
        _ => Err(format!("`{s}` is not NAMESPACE/NAME")),
    }
}

/// Where the addresses for Ingress status come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusSource {
    /// `--publish-service`: the LoadBalancer Service in front of Portcullis.
    Service(ObjectRef),
    /// `--publish-status-address`.
    Addresses(Vec<StatusAddress>),
}

/// The status entries for fixed addresses, in canonical order.
pub fn entries_of(addresses: &[StatusAddress]) -> Vec<IngressLoadBalancerIngress> {
    canonical(
        addresses
            .iter()
            .map(|a| match a {
                StatusAddress::Ip(ip) => IngressLoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ..Default::default()
                },
                StatusAddress::Hostname(h) => IngressLoadBalancerIngress {
                    hostname: Some(h.clone()),
                    ..Default::default()
                },
            })
            .collect(),
    )
}

/// The status entries a Service publishes (`ip` and `hostname` of its load balancer).
pub fn entries_of_service(svc: &Service) -> Vec<IngressLoadBalancerIngress> {
    let lb = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    canonical(
        lb.iter()
            .filter(|i| i.ip.is_some() || i.hostname.is_some())
            .map(|i| IngressLoadBalancerIngress {
                ip: i.ip.clone(),
                hostname: i.hostname.clone(),
                ports: None,
            })
            .collect(),
    )
}

/// Sorted by (ip, hostname), duplicates removed: the form that is compared and written.
fn canonical(mut entries: Vec<IngressLoadBalancerIngress>) -> Vec<IngressLoadBalancerIngress> {
    entries.sort_by(|a, b| (&a.ip, &a.hostname).cmp(&(&b.ip, &b.hostname)));
    entries.dedup();
    entries
}

/// The status entries an Ingress carries now.
fn current_entries(ing: &Ingress) -> Vec<IngressLoadBalancerIngress> {
    canonical(
        ing.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default(),
    )
}

fn ingress_ref(ing: &Ingress) -> ObjectRef {
    ObjectRef::new(
        ing.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        ing.metadata.name.clone().unwrap_or_default(),
    )
}

/// One status write.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub ingress: ObjectRef,
    /// The new entries; empty removes `status.loadBalancer.ingress`.
    pub entries: Vec<IngressLoadBalancerIngress>,
    /// resourceVersion of the Ingress this write was decided on.
    seen: Option<String>,
}

/// What the writer remembers between rounds; decides the writes of a round.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Ingresses this process has seen served, so that it may clear them later.
    once_served: BTreeSet<ObjectRef>,
    /// Writes not yet seen by the reflector: the resourceVersion they were decided on.
    /// While the reflector still shows that version, the same write is not repeated.
    in_flight: HashMap<ObjectRef, (Option<String>, Vec<IngressLoadBalancerIngress>)>,
}

impl Tracker {
    /// Notes which Ingresses the snapshot in force serves (leader or not).
    pub fn observe(&mut self, served: &[ObjectRef]) {
        self.once_served.extend(served.iter().cloned());
    }

    /// The writes that bring `ingresses` to `desired` (`None`: addresses not known
    /// yet, so nothing is written). Forgets Ingresses that are gone or no longer ours
    /// to clear.
    pub fn plan(
        &mut self,
        desired: Option<&[IngressLoadBalancerIngress]>,
        served: &[ObjectRef],
        ingresses: &[Arc<Ingress>],
    ) -> Vec<Write> {
        self.observe(served);
        let present: BTreeSet<ObjectRef> = ingresses.iter().map(|i| ingress_ref(i)).collect();
        self.once_served.retain(|r| present.contains(r));
        self.in_flight.retain(|r, _| present.contains(r));
        let Some(desired) = desired else {
            return Vec::new();
        };
        let served: BTreeSet<&ObjectRef> = served.iter().collect();
        let mut writes = Vec::new();
        for ing in ingresses {
            let id = ingress_ref(ing);
            let rv = ing.metadata.resource_version.clone();
            let current = current_entries(ing);
            let want = if served.contains(&id) {
                desired.to_vec()
            } else if self.once_served.contains(&id) {
                if current.is_empty() || current != desired {
                    // Cleared, or another controller's addresses now: not ours to touch.
                    self.once_served.remove(&id);
                    continue;
                }
                Vec::new()
            } else {
                continue;
            };
            if current == want {
                self.in_flight.remove(&id);
                continue;
            }
            if let Some((seen, wrote)) = self.in_flight.get(&id)
                && *seen == rv
                && *wrote == want
            {
                // Written already; the reflector has not caught up.
                continue;
            }
            writes.push(Write {
                ingress: id,
                entries: want,
                seen: rv,
            });
        }
        writes
    }

    /// Records a write that the API server accepted.
    pub fn written(&mut self, write: &Write) {
        self.in_flight.insert(
            write.ingress.clone(),
            (write.seen.clone(), write.entries.clone()),
        );
    }
}

/// Watches the `--publish-service` Service and sends its entries on every change:
/// `None` until the first list and while the Service does not exist.
fn watch_service(
    client: Client,
    service: ObjectRef,
) -> watch::Receiver<Option<Vec<IngressLoadBalancerIngress>>> {
    let (tx, rx) = watch::channel(None);
    let api: Api<Service> = Api::namespaced(client, &service.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", service.name));
    let (reader, writer): (Store<Service>, _) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitApply(_) | watcher::Event::Init) => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!(namespace = %service.namespace, name = %service.name, error = %e, "watching the publish service failed; retrying with backoff");
                    continue;
                }
            }
            let entries = reader.state().first().map(|svc| entries_of_service(svc));
            if entries.is_none() {
                warn!(namespace = %service.namespace, name = %service.name, "publish service not found; Ingress status is left as it is");
            }
            tx.send_if_modified(|cur| {
                let changed = *cur != entries;
                if changed {
                    info!(namespace = %service.namespace, name = %service.name, addresses = ?entries.as_deref().map(describe), "publish service addresses");
                    *cur = entries.clone();
                }
                changed
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    rx
}

fn describe(entries: &[IngressLoadBalancerIngress]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| e.ip.clone().or_else(|| e.hostname.clone()))
        .collect()
}

/// What the status writer reads.
pub struct StatusInputs {
    /// Whether we lead; only the leader writes.
    pub leader: watch::Receiver<bool>,
    /// The snapshot in force.
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    /// Bumped by the publisher after each publish (the generation).
    pub published: watch::Receiver<u64>,
    /// The source's current objects (Ingress status as last seen).
    pub sources: watch::Receiver<Option<Arc<SourceUpdate>>>,
}

/// How long to wait before retrying writes that failed.
const RETRY: Duration = Duration::from_secs(5);

/// Writes Ingress status while we lead, until the inputs' senders close.
pub async fn run(client: Client, source: StatusSource, mut inputs: StatusInputs) {
    // Fixed addresses: a channel whose sender lives as long as this loop.
    let (_fixed, mut addresses) = match &source {
        StatusSource::Addresses(a) => {
            let (tx, rx) = watch::channel(Some(entries_of(a)));
            (Some(tx), rx)
        }
        StatusSource::Service(svc) => (None, watch_service(client.clone(), svc.clone())),
    };
    info!(source = ?source, "ingress status writer started");
    let mut tracker = Tracker::default();
    loop {
        let snapshot = inputs.snapshots.load_full();
        let leading = *inputs.leader.borrow_and_update();
        inputs.published.borrow_and_update();
        let update = inputs.sources.borrow_and_update().clone();
        let desired = addresses.borrow_and_update().clone();
        let mut retry = false;
        tracker.observe(&snapshot.served_ingresses);
        if leading && let Some(update) = update {
            let writes = tracker.plan(
                desired.as_deref(),
                &snapshot.served_ingresses,
                &update.inputs.ingresses,
            );
            for w in writes {
                match write_status(&client, &w).await {
                    Ok(()) => tracker.written(&w),
                    Err(e) if is_not_found(&e) => {
                        debug!(namespace = %w.ingress.namespace, name = %w.ingress.name, "ingress gone before its status was written");
                    }
                    Err(e) => {
                        warn!(namespace = %w.ingress.namespace, name = %w.ingress.name, error = %e, "cannot write ingress status; retrying");
                        retry = true;
                    }
                }
            }
        }
        let closed = tokio::select! {
            r = inputs.leader.changed() => r.is_err(),
            r = inputs.published.changed() => r.is_err(),
            r = inputs.sources.changed() => r.is_err(),
            r = addresses.changed() => r.is_err(),
            _ = tokio::time::sleep(RETRY), if retry => false,
        };
        if closed {
            debug!("ingress status writer stopped");
            return;
        }
    }
}

/// What Ingress status needs: where the addresses come from, and the Lease that elects
/// the one replica writing them.
#[derive(Debug, Clone)]
pub struct StatusSettings {
    pub source: StatusSource,
    pub lease: LeaseSettings,
}

/// Starts leader election and the status writer (Kubernetes mode). The writer learns of
/// each publish through a hook on `publisher`, and reads Ingress status from `sources`.
/// The election stops and releases the Lease when `shutdown` resolves, or when the
/// returned [`Elector`] is stopped.
pub fn start(
    client: Client,
    settings: StatusSettings,
    metrics: &Arc<crate::metrics::Metrics>,
    publisher: &mut crate::publish::Publisher,
    sources: watch::Receiver<Option<Arc<SourceUpdate>>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Elector {
    let m = metrics.clone();
    let elector = Elector::spawn(
        client.clone(),
        settings.lease,
        Arc::new(move |lead| m.leader.set(i64::from(lead))),
        shutdown,
    );
    let (published_tx, published) = watch::channel(0);
    publisher.on_publish(Box::new(move |snap, _| {
        published_tx.send_replace(snap.generation);
    }));
    tokio::spawn(run(
        client,
        settings.source,
        StatusInputs {
            leader: elector.leader(),
            snapshots: publisher.snapshots.clone(),
            published,
            sources,
        },
    ));
    elector
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn write_status(client: &Client, w: &Write) -> Result<(), kube::Error> {
    let api: Api<Ingress> = Api::namespaced(client.clone(), &w.ingress.namespace);
    let entries = if w.entries.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::to_value(&w.entries).map_err(kube::Error::SerdeError)?
    };
    let patch = json!({"status": {"loadBalancer": {"ingress": entries}}});
    api.patch_status(
        &w.ingress.name,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    if w.entries.is_empty() {
        info!(namespace = %w.ingress.namespace, name = %w.ingress.name, "cleared ingress status: no longer ours");
    } else {
        info!(namespace = %w.ingress.namespace, name = %w.ingress.name, addresses = ?describe(&w.entries), "wrote ingress status");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IngressLoadBalancerStatus, IngressStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ing(name: &str, rv: &str, ips: &[&str]) -> Arc<Ingress> {
        Arc::new(Ingress {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            status: (!ips.is_empty()).then(|| IngressStatus {
                load_balancer: Some(IngressLoadBalancerStatus {
                    ingress: Some(
                        ips.iter()
                            .map(|ip| IngressLoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
            }),
            ..Default::default()
        })
    }

    fn addrs(s: &[&str]) -> Vec<IngressLoadBalancerIngress> {
        entries_of(
            &s.iter()
                .map(|a| a.parse().expect("address"))
                .collect::<Vec<_>>(),
        )
    }

    fn r(name: &str) -> ObjectRef {
        ObjectRef::new("ns", name)
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "10.0.0.1".parse(),
            Ok(StatusAddress::Ip([10, 0, 0, 1].into()))
        );
        assert_eq!(
            "LB.Example.com.".parse(),
            Ok(StatusAddress::Hostname("lb.example.com".into()))
        );
        assert!("not a name".parse::<StatusAddress>().is_err());
        assert!("-bad.example".parse::<StatusAddress>().is_err());
        assert_eq!(parse_service_ref("a/b"), Ok(ObjectRef::new("a", "b")));
        assert!(parse_service_ref("a").is_err());
        assert!(parse_service_ref("a/b/c").is_err());
    }

    #[test]
    fn writes_only_what_differs_and_not_twice() {
        let want = addrs(&["10.0.0.2", "10.0.0.1"]);
        let mut t = Tracker::default();
        let ings = vec![ing("a", "1", &["10.0.0.1", "10.0.0.2"]), ing("b", "1", &[])];
        let w = t.plan(Some(&want), &[r("a"), r("b")], &ings);
        assert_eq!(w.len(), 1, "only b differs: {w:?}");
        assert_eq!(w[0].ingress, r("b"));
        t.written(&w[0]);
        // The reflector still shows b at resourceVersion 1: no second write.
        assert!(t.plan(Some(&want), &[r("a"), r("b")], &ings).is_empty());
        // Someone else rewrote b: write again.
        let ings = vec![
            ing("a", "1", &["10.0.0.1", "10.0.0.2"]),
            ing("b", "7", &["1.1.1.1"]),
        ];
        assert_eq!(t.plan(Some(&want), &[r("a"), r("b")], &ings).len(), 1);
    }

    #[test]
    fn nothing_is_written_before_the_addresses_are_known() {
        let mut t = Tracker::default();
        assert!(t.plan(None, &[r("a")], &[ing("a", "1", &[])]).is_empty());
    }

    #[test]
    fn clears_only_ingresses_it_served_that_still_carry_its_addresses() {
        let want = addrs(&["10.0.0.1"]);
        let mut t = Tracker::default();
        let ings = [
            ing("was-ours", "1", &["10.0.0.1"]),
            ing("taken-over", "1", &["10.0.0.1"]),
            ing("never-ours", "1", &["10.0.0.1"]),
        ];
        t.observe(&[r("was-ours"), r("taken-over")]);
        let ings2 = vec![
            ings[0].clone(),
            ing("taken-over", "2", &["192.0.2.9"]),
            ings[2].clone(),
        ];
        let w = t.plan(Some(&want), &[], &ings2);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].ingress, r("was-ours"));
        assert!(w[0].entries.is_empty());
        t.written(&w[0]);
        // Once cleared it is forgotten.
        let ings3 = vec![ing("was-ours", "3", &[])];
        assert!(t.plan(Some(&want), &[], &ings3).is_empty());
        assert!(t.once_served.is_empty());
    }

    #[test]
    fn every_ingress_classified_as_ours_is_served_even_without_routes() {
        use crate::k8s::{Inputs, Options, build};
        let parse = |y: &str| Arc::new(serde_json::from_str::<Ingress>(y).expect("ingress"));
        let class: k8s_openapi::api::networking::v1::IngressClass = serde_json::from_str(
            r#"{"metadata":{"name":"portcullis"},"spec":{"controller":"portcullis.io/ingress-controller"}}"#,
        )
        .expect("class");
        let inputs = Inputs {
            ingresses: vec![
                parse(
                    r#"{"metadata":{"namespace":"ns","name":"empty"},"spec":{"ingressClassName":"portcullis"}}"#,
                ),
                parse(
                    r#"{"metadata":{"namespace":"ns","name":"legacy","annotations":{"kubernetes.io/ingress.class":"portcullis"}},"spec":{}}"#,
                ),
                parse(
                    r#"{"metadata":{"namespace":"ns","name":"theirs"},"spec":{"ingressClassName":"nginx"}}"#,
                ),
                parse(r#"{"metadata":{"namespace":"ns","name":"classless"},"spec":{}}"#),
            ],
            ingress_classes: vec![Arc::new(class)],
            ..Default::default()
        };
        let snap = build(&inputs, &Options::default());
        assert_eq!(snap.served_ingresses, vec![r("empty"), r("legacy")]);
    }

    #[test]
    fn service_entries_keep_ip_and_hostname_only() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let svc = Service {
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![
                        LoadBalancerIngress {
                            hostname: Some("lb.example".into()),
                            ip_mode: Some("VIP".into()),
                            ..Default::default()
                        },
                        LoadBalancerIngress {
                            ip: Some("203.0.113.5".into()),
                            ..Default::default()
                        },
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = entries_of_service(&svc);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].hostname.as_deref(), Some("lb.example"));
        assert_eq!(e[1].ip.as_deref(), Some("203.0.113.5"));
    }
}
