//! Leader election on a `coordination.k8s.io/v1` Lease, so that one replica alone
//! writes Ingress status.
//!
//! Not part of the data path: every replica serves traffic whether or not it leads.
//! The loop follows client-go's `leaderelection` with a Lease lock:
//!
//! - every `retry_period` a replica reads the Lease (`get`); one that does not exist is
//!   created with us as holder (`create`);
//! - the holder renews `spec.renewTime` with an `update` that carries the
//!   resourceVersion it read, so a concurrent writer gets 409 and reads again;
//! - another replica takes over when the Lease has no holder, or when its record has not
//!   changed for `leaseDurationSeconds` as measured on *our* clock since we first saw
//!   that record (so clock skew between nodes does not matter);
//! - a leader that cannot renew for `renew_deadline` steps down before its Lease can
//!   expire for the others;
//! - on a clean stop the leader releases the Lease (holder cleared, duration 1 s) so
//!   that another replica takes over at its next retry instead of after expiry.
//!
//! `kube-lease-manager` (which supports kube 5) was considered and not used: it takes
//! leases with server-side-apply and strategic-merge patches, relying on field-manager
//! conflicts rather than resourceVersion preconditions, and needs `patch` on leases.
//! This loop needs only `get`, `create` and `update`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Default Lease name (`--election-id`).
pub const DEFAULT_LEASE_NAME: &str = "portcullis-leader";

/// The Lease resource as RBAC names it, for error messages.
const LEASES: &str = "leases.coordination.k8s.io";

/// The Lease's namespace: `pod_namespace` (`POD_NAMESPACE`, from the downward API) when
/// set and not empty, else `client_namespace`, the client's default namespace (the
/// kubeconfig context's, or the service account's in a cluster), else `default`.
pub fn lease_namespace(pod_namespace: Option<&str>, client_namespace: &str) -> String {
    [pod_namespace.unwrap_or_default(), client_namespace]
        .into_iter()
        .find(|ns| !ns.is_empty())
        .unwrap_or("default")
        .to_string()
}

/// Which Lease, who we are, and the timings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Namespace of the Lease: see [`lease_namespace`].
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// `spec.holderIdentity` while we lead: unique per replica.
    pub identity: String,
    /// `spec.leaseDurationSeconds`: how long others wait before taking over a Lease
    /// whose holder stopped renewing.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down; below `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the Lease is read, renewed or tried.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Settings with client-go's ratios: renew deadline 2/3 and retry period 1/3 of the
    /// lease duration (15 s → 10 s and 5 s). Identity from [`identity`]; the namespace
    /// is usually [`lease_namespace`]'s choice.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        lease_duration: Duration,
    ) -> LeaseSettings {
        let lease_duration = lease_duration.max(Duration::from_secs(1));
        LeaseSettings {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity(),
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration / 3,
        }
    }
}

/// Our holder identity: `POD_NAME` (unique among running pods), else the host name with
/// a random suffix so that two processes on one host differ.
pub fn identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()) {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis".into());
    format!("{host}_{:08x}", fastrand::u32(..))
}

/// Called with `true` when we become leader and `false` when we stop (for metrics).
pub type LeaderHook = Arc<dyn Fn(bool) + Send + Sync>;

/// A running election. Dropping it leaves the loop running; call [`Elector::stop`] to
/// release the Lease.
pub struct Elector {
    leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Elector {
    /// Starts the election loop. It also stops (and releases the Lease) when `shutdown`
    /// resolves (the process' SIGTERM or SIGINT), so that a terminating pod hands over
    /// leadership while it drains.
    pub fn spawn(
        client: Client,
        settings: LeaseSettings,
        on_change: LeaderHook,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Elector {
        let (leader_tx, leader_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            client, settings, leader_tx, stop_rx, on_change, shutdown,
        ));
        Elector {
            leader: leader_rx,
            stop: stop_tx,
            task,
        }
    }

    /// Whether we lead, now and on every change.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Stops the loop and waits (at most 5 s) until the Lease is released.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            warn!("leader election did not stop within 5 s; the lease will expire instead");
        }
    }
}

/// What we last saw of the Lease, and when (on our clock).
struct Observed {
    /// holderIdentity, renewTime and resourceVersion: any change means the holder is alive.
    record: (Option<String>, Option<Timestamp>, Option<String>),
    at: Instant,
}

/// One round's outcome.
enum Round {
    /// We hold the Lease (acquired or renewed).
    Held,
    /// Someone else holds it.
    NotHeld,
    /// Our write met 409: someone wrote the Lease since we read it.
    Conflict,
    /// The API call failed; the state is unknown.
    Failed,
}

struct Election {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
    /// The verbs whose Forbidden answer has been logged, so that a missing permission is
    /// one error line rather than one per retry; cleared when a round succeeds.
    forbidden_logged: Vec<&'static str>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The error line for a Forbidden answer to `verb` on Leases in `namespace`: the
/// permission the Role lacks.
pub fn forbidden_message(verb: &str, namespace: &str) -> String {
    format!("cannot {verb} {LEASES} in namespace \"{namespace}\": forbidden")
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

impl Election {
    /// Logs a failed `verb` on the Lease: a Forbidden answer as an error naming the
    /// missing permission (once per verb until a round succeeds), anything else as a
    /// warning with `what`.
    fn failed(&mut self, verb: &'static str, e: &kube::Error, what: &str) {
        let s = &self.settings;
        if !is_forbidden(e) {
            warn!(namespace = %s.namespace, lease = %s.name, error = %e, "{what}");
        } else if self.forbidden_logged.contains(&verb) {
            debug!(namespace = %s.namespace, lease = %s.name, verb, "leader lease still forbidden");
        } else {
            self.forbidden_logged.push(verb);
            error!(
                namespace = %s.namespace,
                lease = %s.name,
                verb,
                resource = LEASES,
                "{}",
                forbidden_message(verb, &s.namespace)
            );
        }
    }

    /// Reads the Lease and acquires, renews or leaves it.
    async fn round(&mut self, leading: bool) -> Round {
        let s = &self.settings;
        let lease = match self.api.get_opt(&s.name).await {
            Ok(l) => l,
            Err(e) => {
                self.failed("get", &e, "cannot read the leader lease");
                return Round::Failed;
            }
        };
        let Some(mut lease) = lease else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0),
            lease.metadata.resource_version.clone(),
        );
        let changed = self.observed.as_ref().is_none_or(|o| o.record != record);
        if changed {
            self.observed = Some(Observed {
                record,
                at: Instant::now(),
            });
        }
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(s.identity.as_str());
        if !ours && holder.is_some() {
            let duration = spec
                .lease_duration_seconds
                .and_then(|d| u64::try_from(d).ok())
                .map_or(s.lease_duration, Duration::from_secs);
            let seen_for = self
                .observed
                .as_ref()
                .map_or(Duration::ZERO, |o| o.at.elapsed());
            if seen_for < duration {
                return Round::NotHeld;
            }
            info!(namespace = %s.namespace, lease = %s.name, previous = holder.unwrap_or_default(), "leader lease expired; taking over");
        }
        let mut next = spec.clone();
        let stamp = now();
        if !ours {
            next.holder_identity = Some(s.identity.clone());
            next.acquire_time = Some(stamp.clone());
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        } else if !leading {
            // We hold it from before (a restart under the same POD_NAME).
            next.acquire_time = Some(stamp.clone());
        }
        next.renew_time = Some(stamp);
        next.lease_duration_seconds = Some(seconds(s.lease_duration));
        lease.spec = Some(next);
        // The resourceVersion read above is the precondition: 409 if anyone wrote since.
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Round::Held,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!(namespace = %s.namespace, lease = %s.name, "leader lease changed under us; reading it again");
                Round::Conflict
            }
            Err(e) => {
                self.failed("update", &e, "cannot write the leader lease");
                Round::Failed
            }
        }
    }

    async fn create(&mut self) -> Round {
        let s = &self.settings;
        let stamp = now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                namespace: Some(s.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(s.identity.clone()),
                lease_duration_seconds: Some(seconds(s.lease_duration)),
                acquire_time: Some(stamp.clone()),
                renew_time: Some(stamp),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => Round::Held,
            Err(kube::Error::Api(e)) if e.code == 409 => Round::Conflict,
            Err(e) => {
                self.failed("create", &e, "cannot create the leader lease");
                Round::Failed
            }
        }
    }

    /// Gives the Lease up if we still hold it: no holder, 1 s duration.
    async fn release(&mut self) {
        let s = &self.settings;
        for _ in 0..3 {
            let mut lease = match self.api.get_opt(&s.name).await {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    self.failed("get", &e, "cannot read the leader lease to release it");
                    return;
                }
            };
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
                return;
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
            lease.spec = Some(spec);
            match self
                .api
                .replace(&s.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    info!(namespace = %s.namespace, lease = %s.name, "released the leader lease");
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => {
                    self.failed(
                        "update",
                        &e,
                        "cannot release the leader lease; it will expire",
                    );
                    return;
                }
            }
        }
    }
}

async fn run(
    client: Client,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
    on_change: LeaderHook,
    shutdown: impl Future<Output = ()>,
) {
    info!(
        namespace = %settings.namespace,
        lease = %settings.name,
        identity = %settings.identity,
        lease_duration_s = settings.lease_duration.as_secs_f64(),
        "leader election started"
    );
    let mut election = Election {
        api: Api::namespaced(client, &settings.namespace),
        settings: settings.clone(),
        observed: None,
        forbidden_logged: Vec::new(),
    };
    let set = |lead: bool| {
        if *leader.borrow() != lead {
            leader.send_replace(lead);
            on_change(lead);
            if lead {
                info!(identity = %settings.identity, lease = %settings.name, "became leader");
            } else {
                info!(identity = %settings.identity, lease = %settings.name, "stopped leading");
            }
        }
    };
    let mut last_renew: Option<Instant> = None;
    let mut reread = false;
    let signal = shutdown;
    tokio::pin!(signal);
    loop {
        let leading = *leader.borrow();
        let round = tokio::select! {
            r = election.round(leading) => r,
            _ = stop.wait_for(|s| *s) => break,
            _ = &mut signal => break,
        };
        if matches!(round, Round::Held | Round::NotHeld) {
            election.forbidden_logged.clear();
        }
        match round {
            Round::Held => {
                last_renew = Some(Instant::now());
                set(true);
            }
            Round::NotHeld => {
                last_renew = None;
                set(false);
            }
            // A 409 means our read was stale: read again at once (once in a row).
            Round::Conflict if !reread => {
                reread = true;
                continue;
            }
            Round::Conflict | Round::Failed => {
                if last_renew.is_none_or(|t| t.elapsed() >= settings.renew_deadline) {
                    last_renew = None;
                    set(false);
                }
            }
        }
        reread = false;
        let wait = settings.retry_period;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
            _ = &mut signal => break,
        }
    }
    // Stop writing before giving the Lease away, so that two leaders never overlap.
    let was_leading = *leader.borrow() || last_renew.is_some();
    set(false);
    if was_leading {
        election.release().await;
    }
    debug!(lease = %settings.name, "leader election stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_namespace_is_the_pods_then_the_contexts_then_default() {
        assert_eq!(lease_namespace(Some("pods"), "context"), "pods");
        assert_eq!(lease_namespace(None, "context"), "context");
        assert_eq!(lease_namespace(Some(""), "context"), "context");
        assert_eq!(lease_namespace(None, ""), "default");
    }

    #[test]
    fn forbidden_names_verb_resource_and_namespace() {
        assert_eq!(
            forbidden_message("get", "x"),
            r#"cannot get leases.coordination.k8s.io in namespace "x": forbidden"#
        );
    }
}
