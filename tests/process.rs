//! The real binary as a child process: bounded memory for 100 MiB bodies in both
//! directions (peak RSS read from /proc), and graceful shutdown on SIGTERM.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::data_path::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;
const BIG: usize = 100 * MIB;
/// What the proxy's peak RSS must stay under while 100 MiB pass each way.
const RSS_LIMIT_KIB: u64 = 100 * 1024;

/// An upstream for big bodies: `POST /upload` counts the body and answers the count,
/// `GET /download` streams 100 MiB in 1 MiB chunks.
async fn start_bulk() -> (std::net::SocketAddr, Stopper) {
    start_hyper(|req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/download" {
            let chunk = Bytes::from(vec![b'd'; MIB]);
            return http::Response::builder()
                .header("content-length", BIG.to_string())
                .body(repeated_body(chunk, BIG))
                .expect("response");
        }
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => break,
            }
        }
        let text: &'static str = Box::leak(n.to_string().into_boxed_str());
        http::Response::new(text_body(text))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_up_and_down_with_bounded_proxy_memory() {
    let (bulk, _stop) = start_bulk().await;
    let dir = manifest_dir(&manifests_for("bulk.example", "bulk", 80, &[bulk]));
    let bin = Binary::start(dir.path(), &["--shutdown-delay", "0s"]);
    bin.wait_ready(200).await;
    let before = bin.peak_rss_kib();

    // Upload: a declared length, written from one reused 1 MiB buffer.
    let mut s = TcpStream::connect(bin.http).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: bulk.example\r\nContent-Length: {BIG}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![b'u'; MIB];
    for _ in 0..BIG / MIB {
        s.write_all(&chunk).await.expect("upload chunk");
    }
    let mut answer = String::new();
    tokio::time::timeout(EVENTUALLY, s.read_to_string(&mut answer))
        .await
        .expect("upload answered in time")
        .expect("read answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&format!("\r\n\r\n{BIG}")), "{answer}");

    // Download: read and count, never held whole.
    let mut resp = client()
        .get(format!("http://{}/download", bin.http))
        .header("host", "bulk.example")
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    let mut got = 0usize;
    while let Some(c) = tokio::time::timeout(EVENTUALLY, resp.chunk())
        .await
        .expect("download progresses")
        .expect("read chunk")
    {
        assert!(c.iter().all(|b| *b == b'd'));
        got += c.len();
    }
    assert_eq!(got, BIG);

    let peak = bin.peak_rss_kib();
    eprintln!("proxy peak RSS: {before} KiB before, {peak} KiB after 100 MiB up and 100 MiB down");
    assert!(
        peak < RSS_LIMIT_KIB,
        "proxy peak RSS {peak} KiB is not bounded (limit {RSS_LIMIT_KIB} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero() {
    let (gated, arrived, release) = start_gated().await;
    let echo = start_echo("echo").await;
    let mut yaml = manifests_for("slow.example", "slow", 80, &[gated]);
    yaml.push_str("---\n");
    yaml.push_str(&manifests_for("fast.example", "fast", 80, &[echo.addr]));
    let dir = manifest_dir(&yaml);
    // A delay far longer than the test: a second SIGTERM cuts it short, so nothing
    // here races a clock.
    let mut bin = Binary::start(
        dir.path(),
        &["--shutdown-delay", "10m", "--shutdown-grace", "10m"],
    );
    bin.wait_ready(200).await;

    // A keep-alive HTTP/2 connection opened before the signal, to see its GOAWAY.
    let h2 = TcpStream::connect(bin.http).await.expect("connect h2");
    let (mut h2_send, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .expect("h2 handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let req = http::Request::builder()
        .uri("http://fast.example/before")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = h2_send.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);

    // A request in flight when the signal comes.
    let url = format!("http://{}/slow", bin.http);
    let in_flight = tokio::spawn(async move {
        let resp = client()
            .get(url)
            .header("host", "slow.example")
            .send()
            .await
            .expect("answered despite shutdown");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    });
    arrived.await.expect("request reached the upstream");

    bin.terminate();
    bin.wait_ready(503).await;

    // During the delay: still accepting; HTTP/1 answers say Connection: close, and the
    // connection is closed after the answer (raw() reads until the peer closes).
    let answer = raw(
        bin.http,
        b"GET /during HTTP/1.1\r\nHost: fast.example\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    // The HTTP/2 connection got GOAWAY: its connection task ends.
    tokio::time::timeout(EVENTUALLY, h2_conn)
        .await
        .expect("GOAWAY closes the idle h2 connection")
        .expect("join")
        .expect("clean h2 shutdown");

    // A second signal ends the delay: the listener closes.
    bin.terminate();
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while TcpStream::connect(bin.http).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        bin.child.try_wait().expect("child status").is_none(),
        "waits for the in-flight request"
    );

    release.send(()).expect("upstream waiting");
    assert_eq!(in_flight.await.expect("join"), (200, "ok".to_string()));
    assert_eq!(bin.wait_exit().await, 0);
}
