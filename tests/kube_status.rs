//! Kubernetes mode II: Ingress status and leader election, run as in a cluster: real
//! `portcullis run` processes (two replicas where it matters) against the fake API
//! server, each with its own bearer token so that the server's request log tells who
//! wrote what. Also the RBAC diff: the manifests grant exactly what the code uses.

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/child.rs"]
mod child;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use apiserver::{ApiRequest, ApiServer, Kubeconfig, eventually};
use child::{LOOPBACK_LISTENERS, LoggedChild, admin_metric};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde_json::{Value, json};

/// Generous limit for everything that should happen within a few seconds.
const SLACK: Duration = Duration::from_secs(30);
const NS: &str = "portcullis";
const LEASE: &str = "portcullis-leader";

/// A `portcullis run` child process; killed on drop.
struct Replica {
    proc: LoggedChild,
    _kubeconfig: Kubeconfig,
}

impl Replica {
    /// Starts `portcullis run` as pod `name` in namespace `portcullis`, with the given
    /// lease duration and extra flags.
    fn start(server: &ApiServer, name: &str, lease: &str, extra: &[&str]) -> Replica {
        Replica::start_in(name, lease, extra, server.kubeconfig_as(name), Some(NS))
    }

    /// Like [`Replica::start`], with its own kubeconfig and `POD_NAMESPACE` (unset when
    /// `None`).
    fn start_in(
        name: &str,
        lease: &str,
        extra: &[&str],
        kubeconfig: Kubeconfig,
        pod_namespace: Option<&str>,
    ) -> Replica {
        let mut args: Vec<String> = [
            "run",
            "--kubeconfig",
            &kubeconfig.path.display().to_string(),
            "--election-lease-duration",
            lease,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(LOOPBACK_LISTENERS.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args(&args)
            .env("POD_NAME", name)
            .env("RUST_LOG", "info")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_IP")
            .env_remove("KUBECONFIG");
        if let Some(ns) = pod_namespace {
            cmd.env("POD_NAMESPACE", ns);
        }
        Replica {
            proc: LoggedChild::spawn(name, cmd),
            _kubeconfig: kubeconfig,
        }
    }

    fn logs(&self) -> String {
        self.proc.logs()
    }

    /// The value of `portcullis_leader` on this replica's /metrics.
    async fn leader_metric(&self) -> Option<i64> {
        admin_metric(self.proc.admin_addr(SLACK).await, "portcullis_leader").await
    }

    fn terminate(&self) {
        self.proc.terminate();
    }

    /// Waits for the process to exit; its exit code.
    async fn wait_exit(&mut self) -> Option<i32> {
        self.proc.wait_exit(SLACK * 2).await
    }
}

fn class(name: &str, controller: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": name}, "spec": {"controller": controller}})
}

fn ingress(ns: &str, name: &str, class: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"ingressClassName": class, "rules": [{"host": format!("{name}.example"),
            "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": name, "port": {"number": 80}}}}]}}]}})
}

/// The classes: `portcullis` (ours) and `other` (another controller's).
fn seed_classes(server: &ApiServer) {
    server.apply(class("portcullis", "portcullis.io/ingress-controller"));
    server.apply(class("other", "example.com/other-controller"));
}

fn lease_holder(server: &ApiServer) -> Option<String> {
    server
        .get("leases", NS, LEASE)?
        .pointer("/spec/holderIdentity")?
        .as_str()
        .map(str::to_string)
}

/// `status.loadBalancer.ingress` of an Ingress; `Value::Null` when absent.
fn lb_status(server: &ApiServer, ns: &str, name: &str) -> Value {
    server
        .get("ingresses", ns, name)
        .and_then(|i| i.pointer("/status/loadBalancer/ingress").cloned())
        .unwrap_or(Value::Null)
}

fn status_writes(server: &ApiServer) -> Vec<ApiRequest> {
    server
        .requests()
        .into_iter()
        .filter(|r| {
            r.verb == "patch"
                && r.resource == "ingresses"
                && r.subresource.as_deref() == Some("status")
        })
        .collect()
}

fn writers(server: &ApiServer) -> BTreeSet<String> {
    status_writes(server)
        .into_iter()
        .map(|r| r.user.unwrap_or_default())
        .collect()
}

async fn wait_holder(server: &ApiServer, who: &str) {
    let ok = eventually(SLACK, || lease_holder(server).as_deref() == Some(who)).await;
    assert!(
        ok,
        "{who} never held the lease; holder {:?}",
        lease_holder(server)
    );
}

async fn wait_leader_metric(replica: &Replica, want: i64) {
    let deadline = tokio::time::Instant::now() + SLACK;
    loop {
        let got = replica.leader_metric().await;
        if got == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: portcullis_leader is {got:?}, not {want}",
            replica.proc.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_status(server: &ApiServer, ns: &str, name: &str, want: &Value) {
    let ok = eventually(SLACK, || lb_status(server, ns, name) == *want).await;
    assert!(
        ok,
        "status of {ns}/{name} is {} not {want}",
        lb_status(server, ns, name)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_status_and_a_clean_shutdown_hands_over() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.apply(ingress("apps", "web", "portcullis"));
    server.apply(ingress("apps", "foreign", "other"));
    let addr = ["--publish-status-address", "203.0.113.10,lb.example.com"];
    let want = json!([{"hostname": "lb.example.com"}, {"ip": "203.0.113.10"}]);

    // A long lease: a takeover before it could expire proves that A released it.
    let mut a = Replica::start(&server, "replica-a", "20s", &addr);
    wait_holder(&server, "replica-a").await;
    let b = Replica::start(&server, "replica-b", "20s", &addr);
    wait_status(&server, "apps", "web", &want).await;
    // B is up (it reads the lease too) before we look at who wrote.
    let ok = eventually(SLACK, || {
        server
            .requests()
            .iter()
            .any(|r| r.resource == "leases" && r.user.as_deref() == Some("replica-b"))
    })
    .await;
    assert!(ok, "replica-b never read the lease:\n{}", b.logs());
    assert_eq!(writers(&server), BTreeSet::from(["replica-a".to_string()]));
    assert_eq!(lb_status(&server, "apps", "foreign"), Value::Null);
    assert_eq!(a.leader_metric().await, Some(1));
    assert_eq!(b.leader_metric().await, Some(0));

    // Clean shutdown: A releases the lease, B takes over and writes from then on.
    a.terminate();
    assert_eq!(a.wait_exit().await, Some(0), "{}", a.logs());
    assert_ne!(
        lease_holder(&server).as_deref(),
        Some("replica-a"),
        "replica-a exited without releasing the lease:\n{}",
        a.logs()
    );
    wait_holder(&server, "replica-b").await;
    wait_leader_metric(&b, 1).await;
    let before = status_writes(&server).len();
    server.apply(ingress("apps", "shop", "portcullis"));
    wait_status(&server, "apps", "shop", &want).await;
    // The fake API server applies a patch before it logs the request: wait for the log.
    eventually(SLACK, || status_writes(&server).len() > before).await;
    let new: Vec<_> = status_writes(&server).into_iter().skip(before).collect();
    assert!(
        !new.is_empty() && new.iter().all(|r| r.user.as_deref() == Some("replica-b")),
        "{new:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_started_together_elect_one_writer() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.apply(ingress("apps", "web", "portcullis"));
    server.apply(ingress("apps", "shop", "portcullis"));
    let addr = ["--publish-status-address", "203.0.113.40"];
    let want = json!([{"ip": "203.0.113.40"}]);
    let a = Replica::start(&server, "replica-a", "2s", &addr);
    let b = Replica::start(&server, "replica-b", "2s", &addr);
    wait_status(&server, "apps", "web", &want).await;
    wait_status(&server, "apps", "shop", &want).await;
    let holder = lease_holder(&server).expect("a leader");
    assert_eq!(writers(&server), BTreeSet::from([holder.clone()]));
    let (leader, standby) = if holder == a.proc.name {
        (&a, &b)
    } else {
        (&b, &a)
    };
    wait_leader_metric(leader, 1).await;
    assert_eq!(standby.leader_metric().await, Some(0));
    // Both tried to create the Lease or read it; exactly one create succeeded.
    let creates = server
        .requests()
        .into_iter()
        .filter(|r| r.resource == "leases" && r.verb == "create" && r.status == 201)
        .count();
    assert_eq!(creates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leaders_lease_expires_and_the_standby_takes_over() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.apply(ingress("apps", "web", "portcullis"));
    let addr = ["--publish-status-address", "203.0.113.20"];
    let want = json!([{"ip": "203.0.113.20"}]);

    let mut a = Replica::start(&server, "replica-a", "2s", &addr);
    wait_holder(&server, "replica-a").await;
    let b = Replica::start(&server, "replica-b", "2s", &addr);
    wait_status(&server, "apps", "web", &want).await;

    // SIGKILL: no release; the lease still names A until it expires.
    a.proc.child.kill().expect("kill replica-a");
    let _ = a.wait_exit().await;
    assert_eq!(lease_holder(&server).as_deref(), Some("replica-a"));
    wait_holder(&server, "replica-b").await;
    let transitions = server
        .get("leases", NS, LEASE)
        .and_then(|l| l.pointer("/spec/leaseTransitions").and_then(Value::as_i64));
    assert_eq!(transitions, Some(1));

    let before = status_writes(&server).len();
    server.apply(ingress("apps", "shop", "portcullis"));
    wait_status(&server, "apps", "shop", &want).await;
    // The fake API server applies a patch before it logs the request: wait for the log.
    eventually(SLACK, || status_writes(&server).len() > before).await;
    let new: Vec<_> = status_writes(&server).into_iter().skip(before).collect();
    assert!(
        !new.is_empty() && new.iter().all(|r| r.user.as_deref() == Some("replica-b")),
        "{new:?}"
    );
    wait_leader_metric(&b, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_publish_service() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.apply(ingress("apps", "web", "portcullis"));
    let service = |lb: Value| {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": NS, "name": "portcullis"},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]},
            "status": {"loadBalancer": {"ingress": lb}}})
    };
    server.apply(service(json!([{"ip": "198.51.100.7", "ipMode": "VIP"}])));
    let a = Replica::start(
        &server,
        "replica-a",
        "2s",
        &["--publish-service", "portcullis/portcullis"],
    );
    wait_status(&server, "apps", "web", &json!([{"ip": "198.51.100.7"}])).await;

    // The load balancer changes address: every served Ingress follows.
    server.apply(ingress("apps", "shop", "portcullis"));
    server.apply(service(
        json!([{"hostname": "lb.example.net"}, {"ip": "198.51.100.8"}]),
    ));
    let want = json!([{"hostname": "lb.example.net"}, {"ip": "198.51.100.8"}]);
    wait_status(&server, "apps", "web", &want).await;
    wait_status(&server, "apps", "shop", &want).await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_cleared_when_an_ingress_stops_being_ours_and_only_then() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.apply(ingress("apps", "web", "portcullis"));
    // Another controller's Ingress with its own status: never touched.
    let mut foreign = ingress("apps", "foreign", "other");
    foreign["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}});
    server.apply(foreign);
    let a = Replica::start(
        &server,
        "replica-a",
        "2s",
        &["--publish-status-address", "203.0.113.30"],
    );
    let want = json!([{"ip": "203.0.113.30"}]);
    wait_status(&server, "apps", "web", &want).await;

    // Written once; unrelated changes republish the snapshot without rewriting it.
    server.apply(ingress("apps", "shop", "portcullis"));
    wait_status(&server, "apps", "shop", &want).await;
    let settled = status_writes(&server).len();
    assert_eq!(settled, 2, "{:?}", status_writes(&server));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status_writes(&server).len(), settled, "a write loop");

    // The class changes to another controller's: our status is taken out.
    server.apply(ingress("apps", "web", "other"));
    wait_status(&server, "apps", "web", &Value::Null).await;
    assert_eq!(
        lb_status(&server, "apps", "foreign"),
        json!([{"ip": "192.0.2.1"}])
    );
    assert!(
        status_writes(&server)
            .iter()
            .all(|r| r.name.as_deref() != Some("foreign")),
        "the foreign Ingress was written"
    );
    // And back: ours again, status again.
    server.apply(ingress("apps", "web", "portcullis"));
    wait_status(&server, "apps", "web", &want).await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pod_namespace_the_lease_is_in_the_kubeconfig_contexts_namespace() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    let addr = ["--publish-status-address", "203.0.113.50"];
    let kubeconfig = server.kubeconfig_as_in("replica-a", "ctx-ns");
    let a = Replica::start_in("replica-a", "2s", &addr, kubeconfig, None);
    let holder = |ns: &str| {
        server
            .get("leases", ns, LEASE)
            .and_then(|l| l.pointer("/spec/holderIdentity").cloned())
    };
    let ok = eventually(SLACK, || holder("ctx-ns").is_some()).await;
    assert!(ok, "no lease in ctx-ns:\n{}", a.logs());
    assert_eq!(holder("ctx-ns"), Some(json!("replica-a")));
    assert_eq!(holder("default"), None);
    assert_eq!(holder(NS), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_lease_is_one_error_naming_verb_resource_and_namespace() {
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.forbid("leases");
    let a = Replica::start(
        &server,
        "replica-a",
        "1s",
        &["--publish-status-address", "203.0.113.60"],
    );
    let line = format!(r#"cannot get leases.coordination.k8s.io in namespace "{NS}": forbidden"#);
    let logged = a
        .proc
        .until(SLACK, |c| c.logs().lines().any(|l| l.contains(&line)))
        .await;
    assert!(logged, "no `{line}` line:\n{}", a.logs());
    let error_line = a
        .logs()
        .lines()
        .find(|l| l.contains(&line))
        .map(str::to_string)
        .expect("found above");
    assert!(error_line.contains("ERROR"), "{error_line}");
    // Later rounds meet the same answer without repeating the line.
    let reads = |server: &ApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.resource == "leases" && r.status == 403)
            .count()
    };
    let ok = eventually(SLACK, || reads(&server) >= 3).await;
    assert!(ok, "the lease was not retried:\n{}", a.logs());
    let repeated = a.logs().lines().filter(|l| l.contains(&line)).count();
    assert_eq!(repeated, 1, "{}", a.logs());
}

/// (verb, group, resource or resource/subresource): one RBAC permission.
type Permission = (String, String, String);

/// The permissions a rule grants.
fn permissions(rule: &PolicyRule) -> Vec<Permission> {
    let mut out = Vec::new();
    for g in rule.api_groups.as_deref().unwrap_or_default() {
        for r in rule.resources.as_deref().unwrap_or_default() {
            for v in &rule.verbs {
                out.push((v.clone(), g.clone(), r.clone()));
            }
        }
    }
    out
}

fn read_manifest<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/base")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("read manifest");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_grant_exactly_what_the_code_uses() {
    let cluster_role: ClusterRole = read_manifest("clusterrole.yaml");
    let role: Role = read_manifest("role.yaml");
    let role_ns = role
        .metadata
        .namespace
        .clone()
        .expect("Role has a namespace");

    // Everything the code does in a cluster: initial sync of every kind, the publish
    // service, status writes, leader election (create, renew) and release.
    let server = ApiServer::start().await;
    seed_classes(&server);
    server.apply(ingress("apps", "web", "portcullis"));
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": NS, "name": "portcullis"},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}}));
    let mut a = Replica::start(
        &server,
        "replica-a",
        "2s",
        &["--publish-service", "portcullis/portcullis"],
    );
    wait_status(&server, "apps", "web", &json!([{"ip": "198.51.100.9"}])).await;
    let renewed = eventually(SLACK, || server.count("update", "leases") >= 2).await;
    assert!(renewed, "the lease was never renewed:\n{}", a.logs());
    a.terminate();
    assert_eq!(a.wait_exit().await, Some(0), "{}", a.logs());
    assert_eq!(lease_holder(&server), None, "not released:\n{}", a.logs());

    let requests = server.requests();
    // Non-resource URLs the code reads are granted to every authenticated user by the
    // default system:public-info-viewer and system:discovery ClusterRoles.
    for r in requests.iter().filter(|r| r.resource.is_empty()) {
        assert!(
            ["/version", "/api", "/apis"].contains(&r.path.as_str()),
            "non-resource request not covered by default roles: {r:?}"
        );
    }
    let cluster_rules: Vec<Permission> = cluster_role
        .rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .flat_map(permissions)
        .collect();
    let role_rules = role.rules.as_deref().unwrap_or_default();
    let mut used_cluster: BTreeSet<Permission> = BTreeSet::new();
    let mut used_role: BTreeSet<Permission> = BTreeSet::new();
    let mut denied = Vec::new();
    for r in requests.iter().filter(|r| !r.resource.is_empty()) {
        let resource = match &r.subresource {
            Some(sub) => format!("{}/{sub}", r.resource),
            None => r.resource.clone(),
        };
        let p: Permission = (r.verb.clone(), r.group.clone(), resource);
        let mut allowed = false;
        if cluster_rules.contains(&p) {
            used_cluster.insert(p.clone());
            allowed = true;
        }
        for rule in role_rules {
            let names = rule.resource_names.as_deref().unwrap_or_default();
            let name_ok = names.is_empty() || r.name.as_ref().is_some_and(|n| names.contains(n));
            if r.namespace.as_deref() == Some(role_ns.as_str())
                && name_ok
                && permissions(rule).contains(&p)
            {
                used_role.insert(p.clone());
                allowed = true;
            }
        }
        if !allowed {
            denied.push(format!(
                "{} {} {} ns={:?} name={:?}",
                p.0, p.1, p.2, r.namespace, r.name
            ));
        }
    }
    denied.sort();
    denied.dedup();
    assert!(
        denied.is_empty(),
        "the manifests do not grant what the code uses:\n{}",
        denied.join("\n")
    );
    let unused_cluster: Vec<_> = cluster_rules
        .iter()
        .filter(|p| !used_cluster.contains(*p))
        .collect();
    let unused_role: Vec<_> = role_rules
        .iter()
        .flat_map(permissions)
        .filter(|p| !used_role.contains(p))
        .collect();
    assert!(
        unused_cluster.is_empty() && unused_role.is_empty(),
        "the manifests grant more than the code uses: ClusterRole {unused_cluster:?}, Role {unused_role:?}"
    );
}
