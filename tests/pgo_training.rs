//! The Kubernetes half of `benches/pgo.sh`'s training run, kept out of the suite
//! (`#[ignore]`): it runs the binary named by `PORTCULLIS_PGO_BIN` (an instrumented
//! build) in Kubernetes mode against the test API server, so the profile covers the
//! kube-rs list/watch path, JSON decoding of every kind, the publisher's rebuilds and
//! the Ingress status writer. It fails when the initial sync is not published, when a
//! batch of ten changes does not move the snapshot generation, or when the process does
//! not exit cleanly, so a broken training run cannot pass unnoticed.
//!
//! ```sh
//! PORTCULLIS_PGO_BIN=target/pgo-gen/<host>/release/portcullis \
//!     cargo test --test pgo_training -- --ignored
//! ```
//!
//! No request is proxied: the endpoints are in 198.18.0.0/15 (the benchmarking range),
//! so nothing leaves the machine.

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/child.rs"]
mod child;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use apiserver::ApiServer;
use child::{LOOPBACK_LISTENERS, LoggedChild, admin_metric};
use serde_json::{Value, json};

const SLACK: Duration = Duration::from_secs(60);
/// Services, each with an Ingress and an EndpointSlice.
const APPS: usize = 1000;
/// Changes after the initial sync, cycling through the three kinds.
const CHANGES: usize = 1000;

fn ingress(i: usize, paths: usize) -> Value {
    let paths: Vec<Value> = (0..paths)
        .map(|p| {
            json!({"path": if p == 0 { "/".to_string() } else { format!("/v{p}") },
                "pathType": "Prefix",
                "backend": {"service": {"name": format!("app-{i}"), "port": {"number": 80}}}})
        })
        .collect();
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"namespace": "default", "name": format!("app-{i}")},
        "spec": {"ingressClassName": "portcullis",
            "rules": [{"host": format!("app-{i}.example"), "http": {"paths": paths}}]}})
}

fn service(i: usize, target_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": format!("app-{i}")},
        "spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": target_port, "protocol": "TCP"}]}})
}

fn slice(i: usize, hosts: &[u8], port: u16) -> Value {
    let endpoints: Vec<Value> = hosts
        .iter()
        .map(|h| {
            json!({"addresses": [format!("198.18.{}.{h}", i % 250)],
                "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": format!("app-{i}-abc"),
            "labels": {"kubernetes.io/service-name": format!("app-{i}")}},
        "addressType": "IPv4",
        "ports": [{"port": port, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// Waits (up to `SLACK`) for a snapshot generation above `last`.
async fn generation_above(admin: SocketAddr, last: u64) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + SLACK;
    while tokio::time::Instant::now() < deadline {
        if let Some(g) = admin_metric(admin, "portcullis_snapshot_generation").await
            && g > last
        {
            return Some(g);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the Kubernetes training load of benches/pgo.sh; needs PORTCULLIS_PGO_BIN"]
async fn kubernetes_mode_training_load() {
    let bin = std::env::var("PORTCULLIS_PGO_BIN")
        .expect("PORTCULLIS_PGO_BIN names the instrumented portcullis binary");
    let server = ApiServer::start().await;
    server.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "portcullis"},
        "spec": {"controller": "portcullis.io/ingress-controller"}}),
    );
    for i in 0..APPS {
        server.apply(service(i, 8080));
        server.apply(slice(i, &[1, 2], 8080));
        server.apply(ingress(i, 1));
    }

    let kubeconfig = server.kubeconfig_as("trainee");
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--kubeconfig"])
        .arg(&kubeconfig.path)
        .args(LOOPBACK_LISTENERS)
        .args(["--access-log", "off", "--shutdown-delay", "0s"])
        .env("POD_NAME", "trainee")
        .env("POD_NAMESPACE", "portcullis")
        .env("RUST_LOG", "info")
        .env_remove("POD_IP")
        .env_remove("KUBECONFIG");
    let mut trainee = LoggedChild::spawn("trainee", cmd);
    let admin = trainee.admin_addr(SLACK).await;

    // The first snapshot with every object.
    let synced = trainee
        .until(SLACK, |t| {
            t.logs().lines().any(|l| {
                l.contains("snapshot published") && l.contains(&format!(" virtual_hosts={APPS} "))
            })
        })
        .await;
    assert!(
        synced,
        "the initial sync was not published:\n{}",
        trainee.logs()
    );

    let mut last = admin_metric(admin, "portcullis_snapshot_generation")
        .await
        .expect("snapshot generation on /metrics");
    for n in 0..CHANGES {
        let i = n % APPS;
        match n % 3 {
            // Each change differs from the object's previous state: round `n / 3`
            // of each kind moves an endpoint, the path count or the target port.
            0 => server.apply(slice(i, &[1 + (n / 3 % 7) as u8, 9], 8080)),
            1 => server.apply(ingress(i, 2 + n / 3 % 2)),
            _ => server.apply(service(i, 8081 + (n / 3 % 2) as u16)),
        };
        if n % 10 == 9 {
            let now = generation_above(admin, last).await;
            assert!(
                now.is_some(),
                "change {n} was not published (generation {last}):\n{}",
                trainee.logs()
            );
            last = now.unwrap_or(last);
        }
    }

    trainee.terminate();
    let code = trainee.wait_exit(SLACK).await;
    assert_eq!(code, Some(0), "the trainee failed:\n{}", trainee.logs());
}
