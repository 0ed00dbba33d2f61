//! Snapshot swaps under load: 1,000 swaps while 20,000 requests run over 50 keep-alive
//! connections. Every request must succeed and reach an upstream that the snapshot in
//! force at routing time named.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::sync::Notify;

const CONNECTIONS: usize = 50;
const PER_CONNECTION: usize = 400;
const SWAPS: u64 = 1_000;
/// Completed requests between two swaps, so that the swaps spread over the run and
/// requests keep running after the last one.
const REQUESTS_PER_SWAP: u64 = 18;

/// The upstream names a generation routes to: even generations to set A, odd to B.
fn names_for(generation: u64) -> [&'static str; 2] {
    if generation.is_multiple_of(2) {
        ["a0", "a1"]
    } else {
        ["b0", "b1"]
    }
}

#[derive(serde::Deserialize)]
struct Seen {
    name: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_swaps_under_load_never_misroute_or_fail() {
    let a0 = start_echo("a0").await;
    let a1 = start_echo("a1").await;
    let b0 = start_echo("b0").await;
    let b1 = start_echo("b1").await;
    let world = World::new()
        .backend("ns", "svc-a", 80, &[a0.addr, a1.addr])
        .backend("ns", "svc-b", 80, &[b0.addr, b1.addr]);
    let snapshot_for = |generation: u64| {
        let svc = if generation.is_multiple_of(2) {
            "svc-a"
        } else {
            "svc-b"
        };
        let mut snap = world
            .clone()
            .ingress(
                ingress("ns", "web")
                    .host("swap.example")
                    .prefix("/", svc, 80),
            )
            .snapshot();
        snap.generation = generation;
        snap
    };
    // start_proxy publishes generation 1.
    let proxy = start_proxy(snapshot_for(1)).await;
    assert_eq!(proxy.snapshots.load().generation, 1);

    // `started` is raised before a generation is stored, `stored` after; a request that
    // read `stored` = g0 before sending and `started` = g1 after its answer was routed
    // by a generation in g0..=g1.
    let started = Arc::new(AtomicU64::new(1));
    let stored = Arc::new(AtomicU64::new(1));
    let completed = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());

    let swapper = {
        let snapshots = proxy.snapshots.clone();
        let (started, stored, completed, progress) = (
            started.clone(),
            stored.clone(),
            completed.clone(),
            progress.clone(),
        );
        let snaps: Vec<_> = (2..2 + SWAPS).map(snapshot_for).collect();
        tokio::spawn(async move {
            for (i, snap) in snaps.into_iter().enumerate() {
                while completed.load(Ordering::SeqCst) < i as u64 * REQUESTS_PER_SWAP {
                    progress.notified().await;
                }
                let generation = snap.generation;
                started.store(generation, Ordering::SeqCst);
                snapshots.store(Arc::new(snap));
                stored.store(generation, Ordering::SeqCst);
            }
        })
    };

    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let addr = proxy.addr;
        let (started, stored, completed, progress) = (
            started.clone(),
            stored.clone(),
            completed.clone(),
            progress.clone(),
        );
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut seen = BTreeSet::new();
            for _ in 0..PER_CONNECTION {
                let g0 = stored.load(Ordering::SeqCst);
                let req = http::Request::get("/swap")
                    .header("host", "swap.example")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                sender.ready().await.expect("connection stays usable");
                let resp = sender.send_request(req).await.expect("response");
                let status = resp.status();
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                let g1 = started.load(Ordering::SeqCst);
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                let name = serde_json::from_slice::<Seen>(&body)
                    .expect("echo json")
                    .name;
                let allowed: BTreeSet<&str> = (g0..=g1.min(g0 + 1)).flat_map(names_for).collect();
                assert!(
                    allowed.contains(name.as_str()),
                    "answer from {name}, but generations {g0}..={g1} route to {allowed:?}"
                );
                seen.insert(name);
                completed.fetch_add(1, Ordering::SeqCst);
                progress.notify_one();
            }
            seen
        }));
    }

    let mut names = BTreeSet::new();
    for w in workers {
        names.extend(w.await.expect("worker succeeded"));
    }
    swapper.await.expect("swapper finished");
    assert_eq!(
        completed.load(Ordering::SeqCst),
        (CONNECTIONS * PER_CONNECTION) as u64
    );
    assert_eq!(proxy.snapshots.load().generation, 1 + SWAPS);
    assert_eq!(
        names,
        ["a0", "a1", "b0", "b1"]
            .into_iter()
            .map(String::from)
            .collect(),
        "both upstream sets served, each endpoint used"
    );
    let served: u64 = proxy
        .metrics
        .requests_total
        .with_label_values(&["ns", "Ingress", "web", "svc-a", "GET", "2xx"])
        .get()
        + proxy
            .metrics
            .requests_total
            .with_label_values(&["ns", "Ingress", "web", "svc-b", "GET", "2xx"])
            .get();
    assert_eq!(served, (CONNECTIONS * PER_CONNECTION) as u64);
}
