//! Data path II in process: load balancing, passive health, safe retries, upgrades,
//! h2c upstreams (gRPC) and streamed responses. Real sockets on 127.0.0.1, real
//! clients (reqwest, tokio-tungstenite, tonic).

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portcullis::proxy::{Ejection, LoadBalance, ProxyConfig};
use support::data_path::*;
use support::*;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const NS: &str = "ns";

fn retries(proxy: &TestProxy, service: &str, reason: &str) -> u64 {
    proxy
        .metrics
        .upstream_retries_total
        .with_label_values(&[NS, service, reason])
        .get()
}

fn ejections(proxy: &TestProxy, service: &str) -> u64 {
    proxy
        .metrics
        .endpoint_ejections_total
        .with_label_values(&[NS, service])
        .get()
}

fn long_ejection() -> Ejection {
    Ejection {
        base: Duration::from_secs(600),
        max: Duration::from_secs(600),
    }
}

#[tokio::test]
async fn p2c_avoids_the_endpoint_whose_response_body_is_still_streaming() {
    let (slow, _s) = start_headers_only().await;
    let fast = start_echo("fast").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[slow, fast.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let client = client();

    // Until one request lands on `slow`: its headers arrive, its body never ends.
    let mut held = None;
    for _ in 0..50 {
        let resp = client
            .get(proxy.url("/"))
            .header("host", "a.example")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        if resp.headers().get("x-name").is_some_and(|v| v == "slow") {
            held = Some(resp);
            break;
        }
        resp.text().await.expect("fast body");
    }
    let held = held.expect("p2c picks the slow endpoint at some point");
    assert_eq!(
        proxy.proxy.in_flight(slow),
        1,
        "counted while the body streams, not released at the headers"
    );

    // With two endpoints p2c compares both every time: all go to the idle one.
    for _ in 0..20 {
        let seen = get_echo(&proxy, "a.example", "/").await;
        assert_eq!(seen.name, "fast");
    }

    // Dropping the response body gives the request back.
    drop(held);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while proxy.proxy.in_flight(slow) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "in-flight never fell"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.proxy.in_flight(fast.addr), 0);
}

#[tokio::test]
async fn a_refused_endpoint_is_retried_elsewhere_ejected_and_counted() {
    let refusing = refusing_port();
    let refused = refusing.addr;
    let good = start_echo("good").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[refused, good.addr]);
    let cfg = ProxyConfig {
        load_balance: LoadBalance::RoundRobin,
        ejection: long_ejection(),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    for _ in 0..10 {
        // POST with a body: a failed connect sent nothing, so even this is retried.
        let resp = client()
            .post(proxy.url("/"))
            .header("host", "a.example")
            .body("payload")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        let seen: EchoSeen = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
        assert_eq!((seen.name.as_str(), seen.body_bytes), ("good", 7));
    }
    // Round robin reaches the refused endpoint within two requests; it is then
    // ejected for the (long) window, so exactly one retry and one ejection happen.
    assert_eq!(retries(&proxy, "svc", "connect"), 1);
    assert_eq!(ejections(&proxy, "svc"), 1);
    assert!(proxy.proxy.is_ejected(refused));
    assert!(!proxy.proxy.is_ejected(good.addr));
    let metrics = proxy.metrics.render();
    assert!(
        metrics.contains(
            r#"portcullis_upstream_retries_total{namespace="ns",reason="connect",service="svc"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"portcullis_endpoint_ejections_total{namespace="ns",service="svc"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn when_every_endpoint_is_ejected_all_are_used_again_panic_mode() {
    let (refusing1, refusing2) = (refusing_port(), refusing_port());
    let (r1, r2) = (refusing1.addr, refusing2.addr);
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[r1, r2]);
    let cfg = ProxyConfig {
        ejection: long_ejection(),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    // The first request fails on one endpoint, retries on the other: both ejected.
    let (status, _, body) = get(&proxy, "a.example", "/").await;
    assert_eq!(
        (status, body.as_str()),
        (502, "upstream error: connection refused")
    );
    assert!(proxy.proxy.is_ejected(r1) && proxy.proxy.is_ejected(r2));
    // Panic mode: still sent (and still refused), never a 503 for "no endpoints".
    for _ in 0..3 {
        let (status, _, body) = get(&proxy, "a.example", "/").await;
        assert_eq!(
            (status, body.as_str()),
            (502, "upstream error: connection refused")
        );
    }
}

#[tokio::test]
async fn an_ejected_endpoint_is_readmitted_after_its_window() {
    let refusing = refusing_port();
    let flaky = refusing.addr;
    let good = start_echo("good").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[flaky, good.addr]);
    let cfg = ProxyConfig {
        load_balance: LoadBalance::RoundRobin,
        // Long enough that a slow machine does not see the window end between the two
        // requests below (which would eject the endpoint a second time).
        ejection: Ejection {
            base: Duration::from_millis(500),
            max: Duration::from_secs(5),
        },
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    for _ in 0..2 {
        assert_eq!(get_echo(&proxy, "a.example", "/").await.name, "good");
    }
    assert!(
        ejections(&proxy, "svc") >= 1,
        "the refusing endpoint is ejected"
    );

    // The endpoint comes back on the same address; once its window is over it gets
    // traffic again, and its success clears the backoff.
    let listener = refusing.into_listener();
    let (_stop, rx) = Stopper::new();
    tokio::spawn(portcullis::echo::serve(listener, "flaky".into(), rx));
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if get_echo(&proxy, "a.example", "/").await.name == "flaky" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never re-admitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!proxy.proxy.is_ejected(flaky));
}

#[tokio::test]
async fn a_stale_pooled_connection_is_retried_once_on_a_fresh_one() {
    let (up, mut accepted, _stop) = start_stale_after_one().await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;
    let client = client();

    // First request: a new upstream connection, answered, kept in the pool.
    let (status, _, body) = get(&proxy, "a.example", "/one").await;
    assert_eq!((status, body.as_str()), (200, "first"));
    accepted.recv().await.expect("first connection");

    // Second (GET, no body): sent on the pooled connection, which the upstream closes
    // without answering. Retried once on a fresh connection, which answers.
    let (status, _, body) = get(&proxy, "a.example", "/two").await;
    assert_eq!((status, body.as_str()), (200, "first"));
    accepted
        .recv()
        .await
        .expect("a fresh connection for the retry");
    assert_eq!(retries(&proxy, "svc", "stale_connection"), 1);
    assert_eq!(
        ejections(&proxy, "svc"),
        0,
        "a stale connection says nothing about the endpoint's health"
    );

    // The retry's connection went back to the pool: the next request takes it, the
    // upstream closes that one too, and the request is retried on a third connection.
    let (status, _, body) = get(&proxy, "a.example", "/three").await;
    assert_eq!((status, body.as_str()), (200, "first"));
    accepted
        .recv()
        .await
        .expect("a fresh connection for the second retry");
    assert_eq!(retries(&proxy, "svc", "stale_connection"), 2);

    // A POST whose body was already streamed upstream is never sent twice: it goes on
    // that pooled connection, which the upstream closes on it.
    let resp = client
        .post(proxy.url("/four"))
        .header("host", "a.example")
        .body("not twice")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.text().await.expect("body"),
        "upstream error: connection closed before response"
    );
    assert_eq!(retries(&proxy, "svc", "stale_connection"), 2);
    assert!(accepted.try_recv().is_err(), "no connection for a retry");
}

fn connects(proxy: &TestProxy, service: &str) -> u64 {
    proxy
        .metrics
        .upstream_connect_duration_seconds
        .with_label_values(&[&format!("{NS}/{service}")])
        .get_sample_count()
}

#[tokio::test]
async fn sequential_requests_reuse_one_pooled_upstream_connection() {
    let up = start_counted("pooled", None).await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    for i in 0..20 {
        let (status, _, body) = get(&proxy, "a.example", &format!("/{i}")).await;
        assert_eq!((status, body.as_str()), (200, "pooled"), "request {i}");
    }
    assert_eq!(
        up.accepted(),
        1,
        "20 sequential requests, one upstream connection"
    );
    assert_eq!(connects(&proxy, "svc"), 1);
}

#[tokio::test]
async fn a_chunked_response_read_to_the_end_returns_its_connection() {
    let (up, _stop) = start_hyper(|_req| async {
        http::Response::new(repeated_body(Bytes::from_static(b"0123456789abcdef"), 4096))
    })
    .await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;
    for _ in 0..5 {
        let (status, headers, body) = get(&proxy, "a.example", "/").await;
        assert_eq!((status, body.len()), (200, 4096));
        assert!(
            headers.get("content-length").is_none(),
            "streamed, not sized"
        );
    }
    assert_eq!(
        connects(&proxy, "svc"),
        1,
        "one connection for five chunked bodies"
    );
}

#[tokio::test]
async fn a_pooled_connection_idle_past_the_timeout_is_not_reused() {
    let up = start_counted("pooled", None).await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up.addr]);
    let idle_timeout = Duration::from_millis(300);
    let cfg = ProxyConfig {
        idle_timeout,
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    assert_eq!(get(&proxy, "a.example", "/").await.0, 200);
    assert_eq!(up.accepted(), 1);
    // Waiting out the idle timeout is the behaviour under test.
    tokio::time::sleep(idle_timeout * 2).await;
    assert_eq!(get(&proxy, "a.example", "/").await.0, 200);
    assert_eq!(
        up.accepted(),
        2,
        "the expired connection is not taken again"
    );
    assert_eq!(connects(&proxy, "svc"), 2);
}

#[tokio::test]
async fn an_upstream_closing_idle_keepalive_connections_costs_no_request() {
    // The upstream's keep-alive timeout (50 ms) is far below the proxy's (4 s).
    let mut up = start_counted("fresh", Some(Duration::from_millis(50))).await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    for round in 1..=5 {
        let (status, _, body) = get(&proxy, "a.example", "/").await;
        assert_eq!((status, body.as_str()), (200, "fresh"), "round {round}");
        tokio::time::timeout(EVENTUALLY, up.closed.recv())
            .await
            .expect("the upstream closes the idle connection in time")
            .expect("upstream alive");
    }
    assert_eq!(up.accepted(), 5, "a new connection after each close");
    assert_eq!(
        ejections(&proxy, "svc"),
        0,
        "a closed idle connection says nothing about the endpoint's health"
    );
}

#[tokio::test]
async fn each_endpoint_keeps_its_own_pooled_connections() {
    let a = start_counted("a", None).await;
    let b = start_counted("b", None).await;
    let world = World::new()
        .ingress(
            ingress(NS, "web-a")
                .host("a.example")
                .prefix("/", "svc-a", 80),
        )
        .ingress(
            ingress(NS, "web-b")
                .host("b.example")
                .prefix("/", "svc-b", 80),
        )
        .backend(NS, "svc-a", 80, &[a.addr])
        .backend(NS, "svc-b", 80, &[b.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    for i in 0..5 {
        for (host, name) in [("a.example", "a"), ("b.example", "b")] {
            let (status, _, body) = get(&proxy, host, "/").await;
            assert_eq!((status, body.as_str()), (200, name), "{host}, round {i}");
        }
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
}

#[tokio::test]
async fn a_websocket_stays_open_and_echoing_across_100_snapshot_swaps() {
    let (ws_up, _stop) = start_ws_echo().await;
    let other = start_echo("other").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("ws.example").prefix("/", "ws", 80))
        .backend(NS, "ws", 80, &[ws_up]);
    let proxy = start_proxy(world.snapshot()).await;

    let stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.example/chat", stream)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("x-request-id"));

    for i in 0..100 {
        // Each swap is a new generation, alternating between two configurations.
        let next = if i % 2 == 0 {
            world
                .clone()
                .ingress(
                    ingress(NS, "extra")
                        .host("b.example")
                        .prefix("/", "other", 80),
                )
                .backend(NS, "other", 80, &[other.addr])
        } else {
            world.clone()
        };
        proxy.publish(next.snapshot());
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let echoed = tokio::time::timeout(EVENTUALLY, ws.next())
            .await
            .expect("echo in time")
            .expect("socket open")
            .expect("frame");
        assert_eq!(echoed, Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send binary");
    let echoed = ws.next().await.expect("open").expect("frame");
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.expect("close");
    // The closing handshake completes through the tunnel, then both sides hang up.
    tokio::time::timeout(EVENTUALLY, async { while ws.next().await.is_some() {} })
        .await
        .expect("close handshake in time");
    drop(ws);
    tokio::time::timeout(EVENTUALLY, proxy.proxy.tunnels_closed())
        .await
        .expect("the tunnel ends with the WebSocket");
}

#[tokio::test]
async fn grpc_over_h2c_unary_and_server_streaming_with_trailers() {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_client::HealthClient;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gRPC upstream");
    let grpc_addr = listener.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // A host-less rule, so the client's :authority (the proxy address) routes.
    let world = World::new()
        .ingress(ingress(NS, "grpc").prefix("/", "grpc", 50051))
        .service(data_path::service_h2c(NS, "grpc", 50051))
        .slices(slice(NS, "grpc", &[grpc_addr]));
    let proxy = start_proxy(world.snapshot()).await;

    let channel = tonic::transport::Endpoint::from_shared(proxy.url(""))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the proxy");
    let mut client = HealthClient::new(channel);

    // Unary: the message, then grpc-status in the trailers.
    let resp = client
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect("unary call through the proxy");
    assert_eq!(resp.get_ref().status, Wire::Serving as i32);

    // An error status comes back as such.
    let err = client
        .check(HealthCheckRequest {
            service: "unknown".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Server streaming, event by event: the second message is only produced after
    // the first has arrived through the proxy.
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("first").expect("message");
    assert_eq!(first.status, Wire::Serving as i32);
    reporter
        .set_service_status("orders", ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(EVENTUALLY, stream.message())
        .await
        .expect("second message in time")
        .expect("second")
        .expect("message");
    assert_eq!(second.status, Wire::NotServing as i32);
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let (events_tx, events_rx) = mpsc::channel::<mpsc::Receiver<Bytes>>(1);
    let events_rx = std::sync::Arc::new(tokio::sync::Mutex::new(events_rx));
    let (up, _stop) = start_hyper(move |_req| {
        let events_rx = events_rx.clone();
        async move {
            let rx = events_rx
                .lock()
                .await
                .recv()
                .await
                .expect("the test hands over an event channel");
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(channel_body(rx))
                .expect("response")
        }
    })
    .await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "sse", 80))
        .backend(NS, "sse", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;

    let (tx, rx) = mpsc::channel::<Bytes>(1);
    events_tx.send(rx).await.expect("upstream waiting");
    let mut resp = client()
        .get(proxy.url("/events"))
        .header("host", "a.example")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    for i in 1..=3 {
        let event = format!("id: {i}\ndata: event {i}\n\n");
        tx.send(Bytes::from(event.clone()))
            .await
            .expect("upstream streaming");
        // Event i must arrive before event i+1 exists at all.
        let mut got = Vec::new();
        while got.len() < event.len() {
            let chunk = tokio::time::timeout(EVENTUALLY, resp.chunk())
                .await
                .expect("event in time")
                .expect("read")
                .expect("stream open");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8_lossy(&got), event);
    }
    drop(tx);
    assert!(resp.chunk().await.expect("end").is_none());
}

/// An upstream that resets every connection (RST, not FIN) once a request head has
/// arrived.
async fn start_resetter() -> (std::net::SocketAddr, Stopper) {
    support::raw::start_scripted(vec![support::raw::Step::Reset]).await
}

#[tokio::test]
async fn a_reset_on_a_fresh_connection_ejects_and_only_an_idempotent_request_is_retried() {
    let (resetter, _r) = start_resetter().await;
    let good = start_echo("good").await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/", "svc", 80)
                .prefix("/alone", "alone", 80),
        )
        .backend(NS, "svc", 80, &[resetter, good.addr])
        .backend(NS, "alone", 80, &[resetter]);
    let cfg = ProxyConfig {
        load_balance: LoadBalance::RoundRobin,
        ejection: long_ejection(),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, _, _) = get(&proxy, "a.example", "/").await;
        statuses.push(status);
    }
    // The GET the resetter got went on to the other endpoint.
    assert_eq!(statuses, [200; 6]);
    assert_eq!(ejections(&proxy, "svc"), 1);
    assert!(proxy.proxy.is_ejected(resetter));
    assert_eq!(retries(&proxy, "svc", "reset_before_response"), 1);
    assert_eq!(retries(&proxy, "svc", "connect"), 0);
    assert_eq!(retries(&proxy, "svc", "stale_connection"), 0);

    // A POST may have been acted on: answered 502, never sent again.
    let resp = client()
        .post(proxy.url("/alone"))
        .header("host", "a.example")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.text().await.expect("body"),
        "upstream error: connection reset"
    );
    assert_eq!(retries(&proxy, "alone", "reset_before_response"), 0);
}

#[tokio::test]
async fn an_upstream_answering_before_the_request_body_ends_still_gets_all_of_it() {
    // The upstream answers at once and reads the request body afterwards, as servers
    // that reject or accept an upload early do.
    let (up, _stop, mut got_rx) = start_early_answer(|| text_body("early")).await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;

    // A raw HTTP/1.1 client: it reads the answer before it sends the rest of the body.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chunk = vec![b'x'; 16 * 1024];
    let total = 4 * chunk.len();
    let mut conn = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: {total}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.expect("head");
    conn.write_all(&chunk).await.expect("first chunk");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"early") {
        let n = tokio::time::timeout(EVENTUALLY, conn.read(&mut buf))
            .await
            .expect("the answer comes while the upload goes on")
            .expect("read");
        assert!(n > 0, "connection closed before the answer");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // The rest of the upload, after the answer: it still reaches the upstream in full.
    for _ in 1..4 {
        conn.write_all(&chunk).await.expect("upload open");
    }
    let got = tokio::time::timeout(EVENTUALLY, got_rx.recv())
        .await
        .expect("the upstream read the whole body in time")
        .expect("upstream handler ran");
    assert_eq!(got, Ok(total));

    let (status, _, body) = get(&proxy, "a.example", "/after").await;
    assert_eq!((status, body.as_str()), (200, "early"));
}

#[tokio::test]
async fn an_upload_goes_on_while_the_client_has_not_read_an_early_answer() {
    // The upstream streams a large answer at once and reads the upload meanwhile; the
    // client (half duplex, like most) reads nothing before its upload is done. Neither
    // direction may wait for the other: the upload must not depend on the answer being
    // read. The sizes are beyond what the sockets on the way can buffer.
    const UPLOAD: usize = 48 << 20;
    const ANSWER: usize = 16 << 20;
    let (up, _stop, mut got_rx) =
        start_early_answer(|| repeated_body(Bytes::from(vec![b'a'; 64 * 1024]), ANSWER)).await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive buffer, so the unread answer backs up into the proxy at once.
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let mut conn = socket.connect(proxy.addr).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: {UPLOAD}\r\nConnection: close\r\n\r\n"
    );
    let chunk = vec![b'x'; 1 << 20];
    let upload = async {
        conn.write_all(head.as_bytes()).await?;
        for _ in 0..UPLOAD / chunk.len() {
            conn.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(EVENTUALLY, upload)
        .await
        .expect("the whole upload is taken while the answer is unread")
        .expect("upload");
    let got = tokio::time::timeout(EVENTUALLY, got_rx.recv())
        .await
        .expect("the upstream read the whole body in time")
        .expect("upstream handler ran");
    assert_eq!(got, Ok(UPLOAD));

    let mut answer = Vec::new();
    tokio::time::timeout(EVENTUALLY, conn.read_to_end(&mut answer))
        .await
        .expect("the answer in time")
        .expect("read");
    let body_at = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    // Chunked framing: the body holds at least the answer's bytes.
    assert!(answer.len() - body_at > ANSWER, "{} bytes", answer.len());
}

/// An h2c upstream (the `h2` crate's server) that refuses every stream with
/// `RST_STREAM(REFUSED_STREAM)`, counting the streams it refused.
async fn start_refusing_h2c() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused)
}

/// RFC 9113 8.7: a stream refused with REFUSED_STREAM was not processed, so any request
/// whose body can still be sent goes on to another endpoint, a POST included.
#[tokio::test]
async fn an_h2c_stream_refused_by_one_endpoint_goes_to_another() {
    let (refusing, refused) = start_refusing_h2c().await;
    let (good, _stop) = start_hyper(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let method = req.method().to_string();
        http::Response::new(
            http_body_util::Full::new(Bytes::from(method))
                .map_err(|never| match never {})
                .boxed(),
        )
    })
    .await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "h2", 80))
        .service(service_h2c(NS, "h2", 80))
        .slices(slice(NS, "h2", &[refusing, good]));
    let cfg = ProxyConfig {
        // No ejection, so that every request may be sent to the refusing endpoint first.
        ejection: Ejection {
            base: Duration::ZERO,
            max: Duration::ZERO,
        },
        // The endpoints are on loopback, as in file mode.
        endpoint_policy: portcullis::model::safety::EndpointPolicy {
            allow_local: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let c = client();
    for method in [http::Method::GET, http::Method::POST, http::Method::DELETE] {
        for _ in 0..10 {
            let resp = c
                .request(method.clone(), proxy.url("/"))
                .header("host", "a.example")
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 200, "{method}");
            assert_eq!(resp.text().await.expect("body"), method.as_str());
        }
    }
    let refused = refused.load(std::sync::atomic::Ordering::SeqCst) as u64;
    assert!(
        refused > 0,
        "p2c picked the refusing endpoint in 30 requests"
    );
    assert_eq!(retries(&proxy, "h2", "connect"), refused);
}
