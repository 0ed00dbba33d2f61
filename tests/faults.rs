//! Faults under load: an endpoint killed mid-load, a rolling update played through the
//! Kubernetes source, the configuration source disappearing (API server stopped,
//! manifest folder deleted), 1,000 configuration changes through the source, and
//! upstreams that answer garbage or close mid-response.
//!
//! Every load is bounded in requests and in time; all traffic is on 127.0.0.1. The
//! claim each test checks is "no request that could have been served fails".

#[path = "support/apiserver.rs"]
mod apiserver;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiserver::{ApiServer, eventually};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis::k8s::Options;
use portcullis::k8s::watch::{ErrorHook, KubeSettings, RestartHook};
use portcullis::metrics::Metrics;
use portcullis::model::{Snapshot, Upstream};
use portcullis::proxy::{Ejection, Proxy, ProxyConfig};
use portcullis::publish::Publisher;
use serde_json::{Value, json};
use support::data_path::{Binary, manifest_dir, manifests_for};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

const NS: &str = "shop";
const HOST: &str = "shop.example";
/// Deadline for a whole load run; loads also stop after their request budget.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// A bounded load generator

/// One request of a load run.
#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    /// `Ok((status, upstream name))` or `Err(why)` when no complete response arrived.
    result: Result<(u16, String), String>,
}

/// Workers sending `GET http://HOST/` through the proxy on keep-alive connections (one
/// client per worker), until stopped, until `budget` requests were sent, or until
/// [`LOAD_DEADLINE`].
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    workers: Vec<JoinHandle<()>>,
}

#[derive(serde::Deserialize)]
struct Named {
    name: String,
}

impl Load {
    fn start(proxy: SocketAddr, workers: usize, budget: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + LOAD_DEADLINE;
        let workers = (0..workers)
            .map(|_| {
                let (stop, outcomes, sent) = (stop.clone(), outcomes.clone(), sent.clone());
                tokio::spawn(async move {
                    let client = client();
                    while !stop.load(Ordering::SeqCst)
                        && Instant::now() < deadline
                        && sent.fetch_add(1, Ordering::SeqCst) < budget
                    {
                        let started = Instant::now();
                        let result = one_request(&client, proxy).await;
                        outcomes
                            .lock()
                            .expect("outcomes")
                            .push(Outcome { started, result });
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            workers,
        }
    }

    fn count(&self) -> usize {
        self.outcomes.lock().expect("outcomes").len()
    }

    /// Waits until `n` more requests have completed than now.
    async fn advance(&self, n: usize) {
        let target = self.count() + n;
        let deadline = Instant::now() + LOAD_DEADLINE;
        while self.count() < target {
            assert!(
                Instant::now() < deadline,
                "load stalled at {} requests",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the workers and returns every outcome.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.await.expect("load worker did not panic");
        }
        std::mem::take(&mut *self.outcomes.lock().expect("outcomes"))
    }
}

async fn one_request(client: &reqwest::Client, proxy: SocketAddr) -> Result<(u16, String), String> {
    let send = async {
        let resp = client
            .get(format!("http://{proxy}/"))
            .header("host", HOST)
            .send()
            .await
            .map_err(|e| format!("send: {e:?}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| format!("body: {e:?}"))?;
        let name = serde_json::from_str::<Named>(&body)
            .map(|n| n.name)
            .unwrap_or(body);
        Ok((status, name))
    };
    tokio::time::timeout(PATIENCE, send)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// The outcomes that are not a 200.
fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((200, _))))
        .collect()
}

// ---------------------------------------------------------------------------------
// Upstreams that can die

/// An HTTP/1.1 upstream answering `{"name": NAME}` after a short pause (so that requests
/// are in flight when it dies), which can be killed (listener and every connection
/// closed at once, mid-request or not) or drained (listener closed, requests in flight
/// answered, idle keep-alive connections closed), as a pod is killed or shuts down.
struct Pod {
    addr: SocketAddr,
    stop: watch::Sender<Option<bool>>,
    task: Option<JoinHandle<()>>,
    in_flight: Arc<AtomicUsize>,
    /// Connections accepted that have not answered a request yet.
    unanswered: Arc<AtomicUsize>,
    served: Arc<AtomicU64>,
}

impl Pod {
    async fn start(name: &str) -> Pod {
        Pod::start_with(name, true).await
    }

    /// A pod that closes each connection after one response unless `keep_alive`, so
    /// that every request the proxy sends it goes on a connection of its own.
    async fn start_with(name: &str, keep_alive: bool) -> Pod {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind pod");
        let addr = listener.local_addr().expect("pod address");
        let (stop, mut stop_rx) = watch::channel(None::<bool>);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let name: Arc<str> = name.into();
        let (in_flight2, unanswered2, served2) =
            (in_flight.clone(), unanswered.clone(), served.clone());
        let task = tokio::spawn(async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            let mut conns = JoinSet::new();
            let drain = loop {
                let (s, _) = tokio::select! {
                    r = stop_rx.wait_for(Option::is_some) => {
                        break r.map(|v| *v == Some(true)).unwrap_or(false);
                    }
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                unanswered2.fetch_add(1, Ordering::SeqCst);
                let answered = Arc::new(AtomicBool::new(false));
                let (name, in_flight, unanswered, served) = (
                    name.clone(),
                    in_flight2.clone(),
                    unanswered2.clone(),
                    served2.clone(),
                );
                let svc = service_fn(move |_req: http::Request<Incoming>| {
                    let (name, in_flight, unanswered, served, answered) = (
                        name.clone(),
                        in_flight.clone(),
                        unanswered.clone(),
                        served.clone(),
                        answered.clone(),
                    );
                    async move {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        served.fetch_add(1, Ordering::SeqCst);
                        if !answered.swap(true, Ordering::SeqCst) {
                            unanswered.fetch_sub(1, Ordering::SeqCst);
                        }
                        let body = json!({"name": &*name}).to_string();
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(s), svc);
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    let _ = conn.await;
                });
            };
            drop(listener);
            if drain {
                // In-flight requests are answered; idle connections close at once.
                graceful.shutdown().await;
            }
            conns.shutdown().await;
        });
        Pod {
            addr,
            stop,
            task: Some(task),
            in_flight,
            unanswered,
            served,
        }
    }

    /// Kills the pod: returns once the listener and every connection are closed.
    /// Returns how many requests it may have lost: those in its handler when it died
    /// (their count is never decremented) plus one for each connection that had not
    /// answered anything yet (a request may have been in its socket buffer).
    async fn kill(&mut self) -> usize {
        let _ = self.stop.send(Some(false));
        if let Some(t) = self.task.take() {
            t.await.expect("pod task");
        }
        self.in_flight.load(Ordering::SeqCst) + self.unanswered.load(Ordering::SeqCst)
    }

    /// Shuts the pod down gracefully: returns once every connection is closed.
    async fn drain(&mut self) {
        let _ = self.stop.send(Some(true));
        if let Some(t) = self.task.take() {
            tokio::time::timeout(PATIENCE, t)
                .await
                .expect("pod drains in time")
                .expect("pod task");
        }
    }
}

// ---------------------------------------------------------------------------------
// 1. An endpoint killed mid-load

/// How an endpoint goes away under load.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Listener and every connection closed at once, requests in its handler lost (a
    /// SIGKILL).
    Kill,
    /// Listener closed, requests in flight answered, idle keep-alive connections closed
    /// (a graceful stop).
    Drain,
}

/// 32 keep-alive clients of GET load over two endpoints; `a` stops mid-load. Requests
/// already written to `a` when it died are retried on `b` (reset or closed before a
/// response), so no GET fails, before or after the stop, except beyond the retry budget
/// (which only fresh connections can reach).
async fn endpoint_stopped_mid_load(stop: Stop, keep_alive: bool) {
    let mut a = Pod::start_with("a", keep_alive).await;
    let b = Pod::start_with("b", keep_alive).await;
    let world = World::new()
        .ingress(ingress(NS, "web").host(HOST).prefix("/", "web", 80))
        .backend(NS, "web", 80, &[a.addr, b.addr]);
    let cfg = ProxyConfig {
        // Long enough that `a` stays ejected for the rest of the run once found dead.
        ejection: Ejection {
            base: Duration::from_secs(60),
            max: Duration::from_secs(60),
        },
        ..ProxyConfig::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;

    let load = Load::start(proxy.addr, 32, 4_000);
    load.advance(500).await;
    assert!(a.served.load(Ordering::SeqCst) > 0, "both endpoints served");
    let in_a = match stop {
        Stop::Kill => a.kill().await,
        Stop::Drain => {
            a.drain().await;
            0
        }
    };
    let stopped = Instant::now();
    load.advance(1_500).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    let retries = |reason: &str| {
        proxy
            .metrics
            .upstream_retries_total
            .with_label_values(&[NS, "web", reason])
            .get()
    };
    eprintln!(
        "{stop:?}, keep-alive {keep_alive}: {} requests, {} failed; a had up to {in_a} request(s) when it died; retries: reset_before_response {}, stale_connection {}, connect {}; budget exhausted {}",
        outcomes.len(),
        failed.len(),
        retries("reset_before_response"),
        retries("stale_connection"),
        retries("connect"),
        proxy
            .metrics
            .retry_budget_exhausted_total
            .with_label_values(&[NS, "web"])
            .get(),
    );
    // Requests the retry budget refused to retry (more of them in flight at once than
    // it allows) are the only ones that may fail; with keep-alive the stale-connection
    // retry, which is not budgeted, covers them all.
    let exhausted = proxy
        .metrics
        .retry_budget_exhausted_total
        .with_label_values(&[NS, "web"])
        .get();
    if keep_alive {
        assert_eq!(exhausted, 0);
    } else if in_a > 0 {
        // `a` had requests (or connections about to carry one) when it died: on fresh
        // connections only the reset retry can have saved them.
        assert!(
            retries("reset_before_response") > 0,
            "a had {in_a} request(s) and nothing was retried"
        );
    }
    assert!(
        failed.len() as u64 <= exhausted
            && failed.iter().all(|f| matches!(&f.result, Ok((502, _)))),
        "{stop:?}: {} of {} GETs failed, {exhausted} refused by the retry budget: {:?}",
        failed.len(),
        outcomes.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    let served_after = outcomes.iter().filter(|o| o.started >= stopped).count();
    assert!(
        served_after >= 1_000,
        "{served_after} requests after the stop"
    );
    assert!(
        outcomes
            .iter()
            .filter(|o| o.started >= stopped)
            .all(|o| matches!(&o.result, Ok((200, n)) if n == "b")),
        "after the stop everything is served by b"
    );
    assert!(
        proxy.proxy.is_ejected(a.addr),
        "the dead endpoint is ejected"
    );
    assert!(!proxy.proxy.is_ejected(b.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_load_fails_no_get() {
    endpoint_stopped_mid_load(Stop::Kill, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_stopped_gracefully_mid_load_fails_no_get() {
    endpoint_stopped_mid_load(Stop::Drain, true).await;
}

/// Without keep-alive every request is on a fresh connection, so the requests `a` had
/// when it was killed are retried as resets before a response (within the retry
/// budget), not as stale pooled connections. Without that retry 5 to 9 of them failed
/// in each of three runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_load_fails_no_get_on_fresh_connections() {
    endpoint_stopped_mid_load(Stop::Kill, false).await;
}

// ---------------------------------------------------------------------------------
// Kubernetes mode in process, as `run` wires it

struct Instance {
    addr: SocketAddr,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    _stop: Stopper,
}

impl Instance {
    async fn start(server: &ApiServer) -> Instance {
        portcullis::tls::install_default_provider();
        let kubeconfig = server.kubeconfig();
        let settings = KubeSettings {
            kubeconfig: Some(kubeconfig.path.clone()),
            ..Default::default()
        };
        let client = portcullis::k8s::watch::client(&settings)
            .await
            .expect("client from the kubeconfig");
        drop(kubeconfig);
        let metrics = Metrics::new();
        let mut publisher = Publisher::new(Options {
            // In-test upstreams listen on loopback.
            allow_local_endpoints: true,
            ..Options::default()
        });
        let m = metrics.clone();
        publisher.on_publish(Box::new(move |s, t| m.observe_snapshot(s, t.as_secs_f64())));
        let publisher = Arc::new(publisher);
        let (tx, rx) = watch::channel(None);
        let m = metrics.clone();
        let on_error: ErrorHook = Arc::new(move |kind| m.kube_watch_error(kind));
        let m = metrics.clone();
        let on_restart: RestartHook = Arc::new(move |kind| m.kube_watch_restart(kind));
        tokio::spawn(portcullis::k8s::watch::run_observed(
            client, settings, tx, on_error, on_restart,
        ));
        tokio::spawn(publisher.clone().run(rx));
        let proxy = Proxy::new(
            ProxyConfig::default(),
            publisher.snapshots.clone(),
            metrics.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (stop, stop_rx) = Stopper::new();
        tokio::spawn(async move { proxy.serve_http(listener, stop_rx).await });
        Instance {
            addr,
            publisher,
            metrics,
            _stop: stop,
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.publisher.snapshots.load_full()
    }

    /// The endpoints requests to `web` are balanced over in the snapshot in force.
    fn active(&self) -> Vec<SocketAddr> {
        let snap = self.snapshot();
        snap.clusters
            .iter()
            .find(|c| c.service.name == "web")
            .map(|c| c.active_endpoints().to_vec())
            .unwrap_or_default()
    }

    /// Every endpoint of `web` in the snapshot in force, with its conditions.
    fn endpoints(&self) -> Vec<portcullis::model::Endpoint> {
        let snap = self.snapshot();
        snap.clusters
            .iter()
            .find(|c| c.service.name == "web")
            .and_then(|c| match &c.upstream {
                Upstream::Endpoints { all, .. } => Some(all.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    async fn until(&self, what: &str, check: impl Fn(&Instance) -> bool) {
        assert!(
            eventually(PATIENCE, || check(self)).await,
            "never happened: {what}; endpoints now {:?}",
            self.endpoints()
        );
    }
}

fn class() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "portcullis", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
        "spec": {"controller": "portcullis.io/ingress-controller"},
    })
}

/// The EndpointSlice of one pod of `web`, as the EndpointSlice controller writes it:
/// `ready`, `serving` and `terminating` conditions.
fn pod_slice(addr: SocketAddr, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "namespace": NS,
            "name": format!("web-{}", addr.port()),
            "labels": {"kubernetes.io/service-name": "web"}
        },
        "addressType": "IPv4",
        "ports": [{"port": addr.port(), "protocol": "TCP"}],
        "endpoints": [{
            "addresses": [addr.ip().to_string()],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating}
        }]
    })
}

/// An API server with the class, the Ingress `shop/web` (`HOST` → `web:80`), the
/// Service and one ready slice per pod; and a Portcullis that serves it.
async fn kube_world(pods: &[&Pod]) -> (ApiServer, Instance) {
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(ingress(NS, "web").host(HOST).prefix("/", "web", 80).build());
    server.apply(service(NS, "web", 80));
    for p in pods {
        server.apply(pod_slice(p.addr, true, true, false));
    }
    let portcullis = Instance::start(&server).await;
    let want: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
    portcullis
        .until("every pod is active", |i| {
            let mut active = i.active();
            active.sort();
            let mut want = want.clone();
            want.sort();
            active == want
        })
        .await;
    (server, portcullis)
}

// ---------------------------------------------------------------------------------
// 2. A rolling update through the source

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_through_the_source_fails_no_request() {
    let mut old = [
        Pod::start("old-0").await,
        Pod::start("old-1").await,
        Pod::start("old-2").await,
    ];
    let (server, portcullis) = kube_world(&old.iter().collect::<Vec<_>>()).await;
    let load = Load::start(portcullis.addr, 12, 20_000);
    load.advance(200).await;

    // maxSurge 1, maxUnavailable 0, as a Deployment rolls by default: for each old pod,
    // a new one starts (not ready), becomes ready, then the old one goes terminating
    // (still serving, as during its preStop delay), leaves the slice, and only then
    // stops, draining what it was answering.
    let mut new = Vec::new();
    for (i, gone) in old.iter_mut().enumerate() {
        let pod = Pod::start(&format!("new-{i}")).await;
        server.apply(pod_slice(pod.addr, false, false, false));
        portcullis
            .until("the new pod is known, not ready", |p| {
                p.endpoints()
                    .iter()
                    .any(|e| e.address == pod.addr && !e.ready)
            })
            .await;
        load.advance(50).await;
        server.apply(pod_slice(pod.addr, true, true, false));
        portcullis
            .until("the new pod is active", |p| p.active().contains(&pod.addr))
            .await;
        load.advance(50).await;
        server.apply(pod_slice(gone.addr, false, true, true));
        portcullis
            .until("the old pod is terminating and no longer active", |p| {
                !p.active().contains(&gone.addr)
                    && p.endpoints()
                        .iter()
                        .any(|e| e.address == gone.addr && e.terminating)
            })
            .await;
        load.advance(50).await;
        server.delete("endpointslices", NS, &format!("web-{}", gone.addr.port()));
        portcullis
            .until("the old pod is gone from the snapshot", |p| {
                p.endpoints().iter().all(|e| e.address != gone.addr)
            })
            .await;
        gone.drain().await;
        load.advance(50).await;
        new.push(pod);
    }
    load.advance(300).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rolling update: {:?}",
        failed.len(),
        outcomes.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    // Nothing was ever sent to a pod that had stopped: no connect failed, no pooled
    // connection was found closed, no endpoint was ejected.
    for reason in ["connect", "stale_connection"] {
        assert_eq!(
            portcullis
                .metrics
                .upstream_retries_total
                .with_label_values(&[NS, "web", reason])
                .get(),
            0,
            "{reason} retries"
        );
    }
    assert_eq!(
        portcullis
            .metrics
            .endpoint_ejections_total
            .with_label_values(&[NS, "web"])
            .get(),
        0
    );
    let mut active = portcullis.active();
    active.sort();
    let mut want: Vec<_> = new.iter().map(|p| p.addr).collect();
    want.sort();
    assert_eq!(active, want, "only the new pods are left");
    for p in &new {
        assert!(p.served.load(Ordering::SeqCst) > 0, "every new pod served");
    }
    let tail = outcomes.iter().rev().take(100);
    assert!(
        tail.into_iter()
            .all(|o| matches!(&o.result, Ok((200, n)) if n.starts_with("new-"))),
        "the last requests all went to new pods"
    );
}

// ---------------------------------------------------------------------------------
// 3. The configuration source disappears

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_stopping_under_load_keeps_the_last_snapshot_serving() {
    let a = Pod::start("a").await;
    let b = Pod::start("b").await;
    let (server, portcullis) = kube_world(&[&a, &b]).await;
    let generation = portcullis.snapshot().generation;
    let load = Load::start(portcullis.addr, 8, 6_000);
    load.advance(300).await;

    server.stop().await;
    server.drop_watches();
    let errors = || {
        [
            "Ingress",
            "Service",
            "EndpointSlice",
            "Secret",
            "IngressClass",
        ]
        .iter()
        .map(|k| {
            portcullis
                .metrics
                .kube_watch_errors_total
                .with_label_values(&[k])
                .get()
        })
        .sum::<u64>()
    };
    assert!(
        eventually(PATIENCE, || errors() > 0).await,
        "the watches notice the API server is gone"
    );
    load.advance(1_500).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        portcullis.snapshot().generation,
        generation,
        "no snapshot was published from a source that is gone"
    );
    assert!(portcullis.publisher.ready.load(Ordering::SeqCst));
    assert!(a.served.load(Ordering::SeqCst) > 0 && b.served.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_folder_deleted_under_load_keeps_the_last_snapshot_serving() {
    let a = Pod::start("a").await;
    let b = Pod::start("b").await;
    let dir = manifest_dir(&manifests_for(HOST, "web", 80, &[a.addr, b.addr]));
    // A second file, so that the folder holds more than one thing to lose.
    std::fs::write(
        dir.path().join("more.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {ports: [{port: 80}]}\n",
    )
    .expect("write a second manifest");
    let portcullis = Binary::start(dir.path(), &[]);
    portcullis.wait_ready(200).await;

    let load = Load::start(portcullis.http, 8, 6_000);
    load.advance(300).await;
    let path = dir.path().to_path_buf();
    std::fs::remove_dir_all(&path).expect("delete the manifest folder");
    assert!(
        eventually(PATIENCE, || portcullis
            .logs()
            .iter()
            .any(|l| l.contains("the last good configuration stays in force")))
        .await,
        "the failed reload is logged; logs: {:?}",
        portcullis.logs()
    );
    load.advance(1_500).await;
    let outcomes = load.finish().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(portcullis.readyz().await, 200, "still ready");
    let published = portcullis
        .logs()
        .iter()
        .filter(|l| l.contains("\"snapshot published\""))
        .count();
    assert_eq!(published, 1, "nothing was published after the folder went");
    drop(dir);
}

// ---------------------------------------------------------------------------------
// 4. 1,000 configuration changes during load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_through_the_source_during_load_fail_no_request() {
    let pods = [
        Pod::start("p0").await,
        Pod::start("p1").await,
        Pod::start("p2").await,
    ];
    let (server, portcullis) = kube_world(&[&pods[0], &pods[1]]).await;
    let first = portcullis.snapshot().generation;
    let load = Load::start(portcullis.addr, 8, 50_000);
    load.advance(200).await;

    // Each change is one API write: the served route's endpoints move between the pods
    // (every pod stays up, at least one endpoint always ready), other Ingresses and
    // Services come and go, and the served Ingress is rewritten with a changing extra
    // path. Paced by the load, so that changes and requests interleave.
    for i in 0..1_000usize {
        match i % 4 {
            0 => {
                let p = &pods[(i / 4) % 3];
                let ready = (i / 12) % 2 == 0;
                server.apply(pod_slice(p.addr, true, true, false));
                let q = &pods[(i / 4 + 1) % 3];
                server.apply(pod_slice(q.addr, ready, ready, !ready));
            }
            1 => {
                server.apply(
                    ingress(NS, &format!("other-{}", i % 7))
                        .host(&format!("o{i}.example"))
                        .prefix("/", "other", 80)
                        .build(),
                );
            }
            2 => {
                server.apply(
                    ingress(NS, "web")
                        .host(HOST)
                        .prefix("/", "web", 80)
                        .prefix(&format!("/extra-{i}"), "other", 80)
                        .build(),
                );
            }
            _ => {
                if (i / 4) % 2 == 0 {
                    server.apply(service(NS, "other", 80));
                } else {
                    server.delete("services", NS, "other");
                }
            }
        }
        if i % 10 == 9 {
            load.advance(20).await;
        }
    }
    // The last change is published; then the load runs on a little.
    let rv = server.resource_version();
    portcullis
        .until("the last change is served", |p| {
            p.snapshot()
                .routes
                .routes()
                .any(|r| r.path.path == "/extra-998")
        })
        .await;
    load.advance(300).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during 1,000 changes: {:?}",
        failed.len(),
        outcomes.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    let published = portcullis.snapshot().generation - first;
    assert!(
        published >= 20,
        "the changes were published as they came ({published} snapshots for 1,000 writes up to resourceVersion {rv})"
    );
    assert!(outcomes.len() >= 2_000, "{} requests", outcomes.len());
    for p in &pods {
        assert!(p.served.load(Ordering::SeqCst) > 0, "every pod served");
    }
}

// ---------------------------------------------------------------------------------
// 5. Upstreams that answer garbage or close mid-response

/// Sends GETs for `paths` one after another on one HTTP/1.1 connection to the proxy;
/// returns (status, body) of each, or why it failed.
async fn on_one_connection(
    proxy: SocketAddr,
    paths: &[&str],
) -> Vec<Result<(u16, String), String>> {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let mut out = Vec::new();
    for path in paths {
        let req = http::Request::get(*path)
            .header("host", HOST)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("not ready: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        out.push(
            tokio::time::timeout(PATIENCE, result)
                .await
                .unwrap_or_else(|_| Err("no answer in time".into())),
        );
    }
    drop(sender);
    let _ = tokio::time::timeout(PATIENCE, conn).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_a_close_before_the_response_head_is_a_counted_502() {
    let good = Pod::start("good").await;
    let (garbage, _g) = start_canned(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let (half_head, _h) = start_canned(b"HTTP/1.1 200 OK\r\nContent-Le").await;
    let (bad_length, _l) =
        start_canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok").await;
    let (nothing, _n) = start_canned(b"").await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host(HOST)
                .prefix("/", "good", 80)
                .prefix("/garbage", "garbage", 80)
                .prefix("/half-head", "half-head", 80)
                .prefix("/bad-length", "bad-length", 80)
                .prefix("/nothing", "nothing", 80),
        )
        .backend(NS, "good", 80, &[good.addr])
        .backend(NS, "garbage", 80, &[garbage])
        .backend(NS, "half-head", 80, &[half_head])
        .backend(NS, "bad-length", 80, &[bad_length])
        .backend(NS, "nothing", 80, &[nothing]);
    let proxy = start_proxy(world.snapshot()).await;

    let broken = ["garbage", "half-head", "bad-length", "nothing"];
    for service in broken {
        // Bounded load on the broken route: 50 requests, 5 connections of 10 each, a
        // good request after each bad one on the same downstream connection.
        let mut tasks = JoinSet::new();
        for _ in 0..5 {
            let addr = proxy.addr;
            tasks.spawn(async move {
                let bad = format!("/{service}");
                let paths: Vec<&str> = (0..10).flat_map(|_| [bad.as_str(), "/"]).collect();
                on_one_connection(addr, &paths).await
            });
        }
        while let Some(results) = tasks.join_next().await {
            let results = results.expect("client task");
            for (i, r) in results.iter().enumerate() {
                match (i % 2, r) {
                    (0, Ok((502, body))) => {
                        assert!(body.starts_with("upstream error: "), "{service}: {body}")
                    }
                    (1, Ok((200, name))) => assert!(name.contains("good"), "{name}"),
                    _ => panic!("{service}: request {i} on the connection: {r:?}"),
                }
            }
        }
        assert_eq!(
            proxy
                .metrics
                .requests_total
                .with_label_values(&[NS, "Ingress", "web", service, "GET", "5xx"])
                .get(),
            50,
            "{service}: every bad answer counted as a 5xx"
        );
    }
    assert_eq!(
        proxy
            .metrics
            .requests_total
            .with_label_values(&[NS, "Ingress", "web", "good", "GET", "2xx"])
            .get(),
        200,
        "the good requests between them, on the same connections"
    );
}

/// An upstream that answers each request with a response head and part of the body
/// that head announces, then closes the connection.
async fn start_cut(head: &'static [u8], partial_body: &'static [u8]) -> (SocketAddr, Stopper) {
    use support::raw::Step;
    support::raw::start_scripted(vec![
        Step::Write(head),
        Step::Pause(Duration::from_millis(5)),
        Step::Write(partial_body),
        Step::Close,
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_mid_body_cuts_the_downstream_response_visibly() {
    let good = Pod::start("good").await;
    let (by_length, _l) = start_cut(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        b"only ten b",
    )
    .await;
    let (chunked, _c) = start_cut(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"a\r\nonly ten b\r\n",
    )
    .await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host(HOST)
                .prefix("/", "good", 80)
                .prefix("/by-length", "by-length", 80)
                .prefix("/chunked", "chunked", 80),
        )
        .backend(NS, "good", 80, &[good.addr])
        .backend(NS, "by-length", 80, &[by_length])
        .backend(NS, "chunked", 80, &[chunked]);
    let proxy = start_proxy(world.snapshot()).await;

    for path in ["/by-length", "/chunked"] {
        for _ in 0..20 {
            // The head (200) was already sent when the upstream went away: the client
            // must see the body fail, never a complete-looking short body, and the
            // downstream connection must not be reused after it.
            let results = on_one_connection(proxy.addr, &[path, "/"]).await;
            match &results[0] {
                Err(e) => assert!(e.starts_with("body: "), "{path}: {e}"),
                Ok(r) => panic!("{path}: a cut body arrived as complete: {r:?}"),
            }
            assert!(results[1].is_err(), "{path}: the connection was closed");
            // A new connection works at once.
            assert_eq!(
                on_one_connection(proxy.addr, &["/"]).await[0]
                    .as_ref()
                    .map(|r| r.0),
                Ok(200)
            );
        }
    }
    for service in ["by-length", "chunked"] {
        assert_eq!(
            proxy
                .metrics
                .upstream_body_errors_total
                .with_label_values(&[NS, "Ingress", "web", service])
                .get(),
            20,
            "{service}: every cut body counted"
        );
    }
    assert_eq!(
        proxy
            .metrics
            .upstream_body_errors_total
            .with_label_values(&[NS, "Ingress", "web", "good"])
            .get(),
        0
    );
    // Also through raw sockets: the proxy closes the connection rather than leaving
    // the client waiting for bytes that will never come.
    let answer = raw(
        proxy.addr,
        b"GET /by-length HTTP/1.1\r\nHost: shop.example\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 200);
    assert_eq!(raw_body(&answer), "only ten b");
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /chunked HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .ok();
    let text = String::from_utf8_lossy(&out);
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "no terminating chunk after a cut body: {text:?}"
    );
}

// ---------------------------------------------------------------------------------
// 6. The retry budget

/// An upstream that reads each request head, counts it in `held`, and resets the
/// connection once `gate` has moved past the value it had when the head arrived.
async fn start_gated_resetter() -> (SocketAddr, Arc<AtomicUsize>, watch::Sender<u32>) {
    start_resetter(true).await
}

/// An upstream that resets every connection after reading a request head: at once, or
/// (`gated`) as [`start_gated_resetter`] says.
async fn start_resetter(gated: bool) -> (SocketAddr, Arc<AtomicUsize>, watch::Sender<u32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let held = Arc::new(AtomicUsize::new(0));
    let (gate, gate_rx) = watch::channel(0u32);
    let counter = held.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (held, mut gate) = (counter.clone(), gate_rx.clone());
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let at = *gate.borrow_and_update();
                held.fetch_add(1, Ordering::SeqCst);
                if gated {
                    let _ = gate.wait_for(|g| *g > at).await;
                }
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            });
        }
    });
    (addr, held, gate)
}

/// Ten GETs in flight to a Service whose one endpoint then resets them all: three may
/// be retried at once (the budget's minimum; 20 % of ten is two), the other seven are
/// answered 502 at once and counted as budget exhausted. The three retries are held by
/// the upstream until it resets them too; a request is retried once only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_beyond_the_retry_budget_are_answered_not_retried() {
    let (flaky, held, gate) = start_gated_resetter().await;
    let world = World::new()
        .ingress(ingress(NS, "web").host(HOST).prefix("/", "flaky", 80))
        .backend(NS, "flaky", 80, &[flaky]);
    let proxy = start_proxy(world.snapshot()).await;

    let mut clients = JoinSet::new();
    for _ in 0..10 {
        let addr = proxy.addr;
        clients.spawn(async move { one_request(&client(), addr).await });
    }
    let until = |what: &'static str, check: Box<dyn Fn() -> bool + Send>| async move {
        assert!(eventually(PATIENCE, &check).await, "never: {what}");
    };
    let h = held.clone();
    until(
        "ten requests held",
        Box::new(move || h.load(Ordering::SeqCst) == 10),
    )
    .await;
    gate.send_replace(1);

    let metrics = proxy.metrics.clone();
    let retried = move || {
        metrics
            .upstream_retries_total
            .with_label_values(&[NS, "flaky", "reset_before_response"])
            .get()
    };
    let metrics = proxy.metrics.clone();
    let exhausted = move || {
        metrics
            .retry_budget_exhausted_total
            .with_label_values(&[NS, "flaky"])
            .get()
    };
    let mut answered = Vec::new();
    for _ in 0..7 {
        let r = tokio::time::timeout(PATIENCE, clients.join_next())
            .await
            .expect("seven answers without waiting for the retries")
            .expect("a client")
            .expect("client task");
        answered.push(r);
    }
    let h = held.clone();
    until(
        "the three retries held",
        Box::new(move || h.load(Ordering::SeqCst) == 13),
    )
    .await;
    assert_eq!(retried(), 3, "retries in flight stay within the budget");
    assert_eq!(exhausted(), 7);

    gate.send_replace(2);
    while let Some(r) = clients.join_next().await {
        answered.push(r.expect("client task"));
    }
    assert_eq!(answered.len(), 10);
    for r in &answered {
        assert!(
            matches!(r, Ok((502, body)) if body == "upstream error: connection reset"),
            "{r:?}"
        );
    }
    assert_eq!(retried(), 3, "a request is retried once");
    assert_eq!(exhausted(), 7);
    assert_eq!(held.load(Ordering::SeqCst), 13);
}

/// An idempotent request without a body that an endpoint resets before answering goes
/// to another endpoint; with one endpoint, to the same one once more. A POST, or a PUT
/// with a body, is never sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_response_is_retried_for_idempotent_requests_only() {
    let (resetter, hits, _gate) = start_resetter(false).await;
    let good = Pod::start("good").await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host(HOST)
                .prefix("/", "mixed", 80)
                .prefix("/only", "alone", 80),
        )
        .backend(NS, "mixed", 80, &[resetter, good.addr])
        .backend(NS, "alone", 80, &[resetter]);
    let cfg = ProxyConfig {
        // No ejection, so that the resetter keeps being picked.
        ejection: Ejection {
            base: Duration::ZERO,
            max: Duration::ZERO,
        },
        ..ProxyConfig::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let retried = |service: &str| {
        proxy
            .metrics
            .upstream_retries_total
            .with_label_values(&[NS, service, "reset_before_response"])
            .get()
    };
    let c = client();
    for method in [http::Method::GET, http::Method::HEAD, http::Method::DELETE] {
        for _ in 0..20 {
            let resp = c
                .request(method.clone(), format!("http://{}/", proxy.addr))
                .header("host", HOST)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 200, "{method}");
        }
    }
    let hit = hits.load(Ordering::SeqCst) as u64;
    assert!(hit > 0, "p2c picked the resetter in 60 requests");
    assert_eq!(
        retried("mixed"),
        hit,
        "every reset was retried on the other endpoint"
    );

    // One endpoint: retried on it once, then answered.
    let before = hits.load(Ordering::SeqCst);
    let resp = c
        .get(format!("http://{}/only", proxy.addr))
        .header("host", HOST)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 502);
    assert_eq!(hits.load(Ordering::SeqCst) - before, 2, "sent twice");
    assert_eq!(retried("alone"), 1);

    for (method, body) in [
        (http::Method::POST, ""),
        (http::Method::PUT, "a body"),
        (http::Method::GET, "a body"),
        (http::Method::PATCH, ""),
    ] {
        let before = hits.load(Ordering::SeqCst);
        let resp = c
            .request(method.clone(), format!("http://{}/only", proxy.addr))
            .header("host", HOST)
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 502, "{method}");
        assert_eq!(
            hits.load(Ordering::SeqCst) - before,
            1,
            "{method} sent once"
        );
    }
    assert_eq!(retried("alone"), 1);
}
