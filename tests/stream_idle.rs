//! `--stream-idle-timeout`: a request body, a response body or an upgraded tunnel that
//! moves no byte for the limit is aborted, counted and logged, and nothing holds a
//! connection or an upstream for ever. The limit is tiny here; each test waits for the
//! outcome (bounded by `EVENTUALLY`), never for a fixed time.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use portcullis::proxy::ProxyConfig;
use support::data_path::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const NS: &str = "ns";
const IDLE: Duration = Duration::from_millis(300);

async fn proxy_to(up: std::net::SocketAddr, idle: Duration) -> TestProxy {
    let world = World::new()
        .ingress(ingress(NS, "web").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let cfg = ProxyConfig {
        stream_idle_timeout: idle,
        ..ProxyConfig::default()
    };
    start_proxy_with(world.snapshot(), cfg).await
}

fn idle_timeouts(proxy: &TestProxy, direction: &str) -> u64 {
    proxy
        .metrics
        .stream_idle_timeouts_total
        .with_label_values(&[direction])
        .get()
}

/// Reads until the peer closes; what arrived.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    timeout(EVENTUALLY, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// An upstream that reads each request body to its end before answering; what each
/// read gave (`Err` when the body was cut off) goes to the returned receiver.
async fn start_body_reader() -> (
    std::net::SocketAddr,
    Stopper,
    mpsc::UnboundedReceiver<Result<usize, String>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (addr, stop) = start_hyper(move |req: http::Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(body_outcome(req).await);
            http::Response::new(text_body("read"))
        }
    })
    .await;
    (addr, stop, rx)
}

/// A connection that sent a request head announcing 100 body bytes, and 10 of them.
async fn send_stalled_upload(proxy: &TestProxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .expect("write");
    s
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_and_both_connections_close() {
    let (up, _stop, mut got) = start_body_reader().await;
    let proxy = proxy_to(up, IDLE).await;
    let mut s = send_stalled_upload(&proxy).await;
    // Nothing more is sent; the connection stays open from this side.
    let answer = read_to_close(&mut s).await;
    assert_eq!(raw_status(&answer), 408, "{answer}");
    assert_eq!(raw_body(&answer), "request body idle timeout");
    let upstream = timeout(EVENTUALLY, got.recv())
        .await
        .expect("the upstream learns in time")
        .expect("a result");
    assert!(
        upstream.is_err(),
        "the upstream request was aborted: {upstream:?}"
    );
    assert_eq!(idle_timeouts(&proxy, "request"), 1);
    assert_eq!(idle_timeouts(&proxy, "response"), 0);
}

#[tokio::test]
async fn a_stalled_upload_after_an_early_answer_does_not_hold_the_upstream() {
    // The upstream answers at once and reads the body afterwards: the rest of the upload
    // goes on in a task of its own, which the idle limit must end.
    let (up, _stop, mut got) = start_early_answer(|| text_body("early")).await;
    let proxy = proxy_to(up, IDLE).await;
    let mut s = send_stalled_upload(&proxy).await;
    let answer = read_to_close(&mut s).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert_eq!(raw_body(&answer), "early");
    let upstream = timeout(EVENTUALLY, got.recv())
        .await
        .expect("the upstream body ends in time")
        .expect("a result");
    assert!(upstream.is_err(), "{upstream:?}");
    assert_eq!(idle_timeouts(&proxy, "request"), 1);
}

/// An upstream that answers with a head and `0123456789`, then neither sends more nor
/// closes; the returned receiver hears when the proxy dropped the response.
async fn start_staller() -> (std::net::SocketAddr, Stopper, mpsc::UnboundedReceiver<()>) {
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    let (addr, stop) = start_hyper(move |req: http::Request<hyper::body::Incoming>| {
        let closed_tx = closed_tx.clone();
        async move {
            if req.uri().path() == "/ok" {
                return http::Response::new(text_body("ok"));
            }
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.send(Bytes::from_static(b"0123456789")).await;
            tokio::spawn(async move {
                tx.closed().await;
                let _ = closed_tx.send(());
            });
            http::Response::new(channel_body(rx))
        }
    })
    .await;
    (addr, stop, closed_rx)
}

#[tokio::test]
async fn an_upstream_that_stalls_after_its_head_is_cut_off_over_http1() {
    let (up, _stop, mut closed) = start_staller().await;
    let proxy = proxy_to(up, IDLE).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"GET /stall HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut s).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert!(answer.contains("0123456789"), "{answer}");
    assert!(
        !answer.ends_with("0\r\n\r\n"),
        "the chunked body must not end cleanly: {answer:?}"
    );
    timeout(EVENTUALLY, closed.recv())
        .await
        .expect("the upstream response is dropped in time");
    assert_eq!(idle_timeouts(&proxy, "response"), 1);
    assert_eq!(
        proxy
            .metrics
            .upstream_body_errors_total
            .with_label_values(&[NS, "Ingress", "web", "svc"])
            .get(),
        0,
        "an idle upstream is counted as that, not as a body error"
    );
}

#[tokio::test]
async fn an_upstream_that_stalls_after_its_head_resets_only_its_http2_stream() {
    let (up, _stop, mut closed) = start_staller().await;
    let proxy = proxy_to(up, IDLE).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = h2.get(proxy.url("/stall")).send().await.expect("head");
    assert_eq!(resp.status(), 200);
    let body = timeout(EVENTUALLY, resp.bytes())
        .await
        .expect("the body ends in time");
    assert!(body.is_err(), "the stream is reset: {body:?}");
    timeout(EVENTUALLY, closed.recv())
        .await
        .expect("the upstream response is dropped in time");
    // The same HTTP/2 connection carries on.
    let ok = h2.get(proxy.url("/ok")).send().await.expect("send");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.expect("body"), "ok");
    assert_eq!(idle_timeouts(&proxy, "response"), 1);
}

#[tokio::test]
async fn an_idle_websocket_is_closed_and_a_busy_one_is_not() {
    let (ws_up, _stop) = start_ws_echo().await;
    // Busy: a message every 100 ms for 2.5 s, ten times the gaps between them, under a
    // 1 s limit.
    let proxy = proxy_to(ws_up, Duration::from_secs(1)).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.example/chat", stream)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..25 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let echoed = timeout(EVENTUALLY, ws.next())
            .await
            .expect("echo in time")
            .expect("the tunnel is open")
            .expect("frame");
        assert_eq!(echoed, Message::text(text));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(idle_timeouts(&proxy, "tunnel"), 0);

    // Idle: after one echo, nothing either way until the proxy closes the tunnel.
    let proxy = proxy_to(ws_up, IDLE).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.example/chat", stream)
        .await
        .expect("WebSocket handshake through the proxy");
    ws.send(Message::text("hello")).await.expect("send");
    let echoed = timeout(EVENTUALLY, ws.next()).await.expect("echo in time");
    assert!(matches!(echoed, Some(Ok(m)) if m == Message::text("hello")));
    let end = timeout(EVENTUALLY, ws.next())
        .await
        .expect("the proxy closes the idle tunnel in time");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert_eq!(idle_timeouts(&proxy, "tunnel"), 1);
    // The in-flight count the tunnel held is released with it.
    assert!(eventually_in_flight_zero(&proxy, ws_up).await);
}

async fn eventually_in_flight_zero(proxy: &TestProxy, addr: std::net::SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while tokio::time::Instant::now() < deadline {
        if proxy.proxy.in_flight(addr) == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A limit the slow-but-moving tests can keep under with margin on a busy machine.
const SLOW_IDLE: Duration = Duration::from_secs(1);

#[tokio::test]
async fn an_upload_that_keeps_moving_slowly_is_never_cut() {
    let (up, _stop, mut got) = start_body_reader().await;
    let proxy = proxy_to(up, SLOW_IDLE).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    // A byte every 200 ms: 2.4 s in all, more than twice the limit.
    for b in b"0123456789ab" {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(&[*b]).await.expect("write");
    }
    let answer = read_to_close(&mut s).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let upstream = timeout(EVENTUALLY, got.recv()).await.expect("in time");
    assert_eq!(upstream, Some(Ok(12)));
    assert_eq!(idle_timeouts(&proxy, "request"), 0);
}

#[tokio::test]
async fn a_response_that_keeps_moving_slowly_is_never_cut() {
    let (up, _stop) = start_hyper(|_req: http::Request<hyper::body::Incoming>| async {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for b in b"0123456789ab" {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if tx.send(Bytes::copy_from_slice(&[*b])).await.is_err() {
                    return;
                }
            }
        });
        http::Response::new(channel_body(rx))
    })
    .await;
    let proxy = proxy_to(up, SLOW_IDLE).await;
    let resp = client().get(proxy.url("/slow")).send().await.expect("head");
    assert_eq!(resp.status(), 200);
    let body = timeout(EVENTUALLY, resp.bytes())
        .await
        .expect("in time")
        .expect("the whole body");
    assert_eq!(&body[..], b"0123456789ab");
    assert_eq!(idle_timeouts(&proxy, "response"), 0);
}

#[tokio::test]
async fn a_zero_limit_turns_the_timeout_off() {
    let (up, _stop, _closed) = start_staller().await;
    let proxy = proxy_to(up, Duration::ZERO).await;
    let resp = client()
        .get(proxy.url("/stall"))
        .send()
        .await
        .expect("head");
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let first = resp.chunk().await.expect("a chunk");
    assert_eq!(first.as_deref(), Some(&b"0123456789"[..]));
    // Still waiting, not cut, well past where any idle limit this test suite uses
    // would have fired.
    let more = timeout(Duration::from_secs(2), resp.chunk()).await;
    assert!(more.is_err(), "the stalled body stays open: {more:?}");
    assert_eq!(idle_timeouts(&proxy, "response"), 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_upstream_released() {
    // The upstream streams up to 64 MiB in 64 KiB chunks as fast as it may, and says
    // when the proxy dropped the response.
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let (up, _stop) = start_hyper(move |_req: http::Request<hyper::body::Incoming>| {
        let dropped_tx = dropped_tx.clone();
        async move {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                for _ in 0..1024 {
                    if tx.send(chunk.clone()).await.is_err() {
                        let _ = dropped_tx.send(());
                        return;
                    }
                }
            });
            http::Response::new(channel_body(rx))
        }
    })
    .await;
    let proxy = proxy_to(up, IDLE).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .expect("write");
    // Never read: the socket buffers fill, and the proxy's writes wait on this client.
    timeout(EVENTUALLY, dropped.recv())
        .await
        .expect("the proxy gives up on the client in time");
    assert_eq!(idle_timeouts(&proxy, "response"), 1);
    // The connection was closed: what is left to read ends, short of 64 MiB.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let ended = timeout(EVENTUALLY, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection ends");
    assert!(got < 64 * 1024 * 1024, "{got} bytes");
}

#[tokio::test]
async fn an_upload_the_upstream_stops_reading_after_an_early_answer_is_cut_off() {
    // The upstream answers at once, then holds the request body unread until told to
    // read it: it then finds it cut short.
    let (read_tx, read_rx) = tokio::sync::watch::channel(false);
    let (got_tx, mut got) = mpsc::unbounded_channel();
    let (up, _stop) = start_hyper(move |req: http::Request<hyper::body::Incoming>| {
        let (mut read_rx, got_tx) = (read_rx.clone(), got_tx.clone());
        async move {
            tokio::spawn(async move {
                let _ = read_rx.wait_for(|go| *go).await;
                let r = req.into_body().collect().await.map(|b| b.to_bytes().len());
                let _ = got_tx.send(r.map_err(|e| e.to_string()));
            });
            http::Response::new(text_body("early"))
        }
    })
    .await;
    let proxy = proxy_to(up, IDLE).await;
    let s = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    // The client uploads 64 MiB as fast as the proxy takes it (bounded), and reads the
    // early answer meanwhile.
    let writer = tokio::spawn(async move {
        let total = 64 * 1024 * 1024;
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: {total}\r\n\r\n");
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..total / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut answer = vec![0u8; 4096];
    let n = timeout(EVENTUALLY, rd.read(&mut answer))
        .await
        .expect("the early answer in time")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));

    assert!(
        tokio::time::timeout(EVENTUALLY, async {
            while idle_timeouts(&proxy, "request") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok(),
        "the stalled upload is cut off in time"
    );
    read_tx.send_replace(true);
    let upstream = timeout(EVENTUALLY, got.recv()).await.expect("in time");
    assert!(matches!(upstream, Some(Err(_))), "{upstream:?}");
    drop(rd);
    writer.abort();
    assert_eq!(idle_timeouts(&proxy, "request"), 1);
}
