//! The data path end to end: real sockets on 127.0.0.1, echo upstreams, real clients
//! (reqwest, raw TCP, curl).

mod support;

use std::time::Duration;

use portcullis::proxy::{LoadBalance, ProxyConfig};
use support::*;

const NS: &str = "ns";

fn is_hex_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn routes_by_host_and_path_to_the_right_upstream() {
    let a = start_echo("a").await;
    let b = start_echo("b").await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/", "svc-a", 80),
        )
        .ingress(
            ingress(NS, "api")
                .host("b.example")
                .prefix("/api", "svc-b", 80)
                .exact("/exact", "svc-a", 80),
        )
        .backend(NS, "svc-a", 80, &[a.addr])
        .backend(NS, "svc-b", 80, &[b.addr]);
    let proxy = start_proxy(world.snapshot()).await;

    let seen = get_echo(&proxy, "a.example", "/anything").await;
    assert_eq!(seen.name, "a");
    assert_eq!(seen.path, "/anything");

    let seen = get_echo(&proxy, "b.example", "/api/v1?q=1&x=%20y").await;
    assert_eq!(seen.name, "b");
    assert_eq!(seen.uri, "/api/v1?q=1&x=%20y", "query passed as received");

    let seen = get_echo(&proxy, "B.EXAMPLE", "/exact").await;
    assert_eq!(seen.name, "a", "host matching ignores case");

    // Prefix matches whole path elements only.
    let (status, headers, body) = get(&proxy, "b.example", "/apix").await;
    assert_eq!(status, 404);
    assert_eq!(body, "no route for b.example /apix");
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert!(headers.contains_key("x-request-id"));

    let (status, _, body) = get(&proxy, "c.example", "/").await;
    assert_eq!((status, body.as_str()), (404, "no route for c.example /"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn default_backend_answers_what_no_rule_matches() {
    let a = start_echo("a").await;
    let d = start_echo("default").await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/", "svc-a", 80),
        )
        .ingress(ingress(NS, "fallback").default_backend("svc-d", 80))
        .backend(NS, "svc-a", 80, &[a.addr])
        .backend(NS, "svc-d", 80, &[d.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    assert_eq!(get_echo(&proxy, "a.example", "/").await.name, "a");
    assert_eq!(get_echo(&proxy, "other.example", "/").await.name, "default");
}

#[tokio::test]
async fn no_endpoints_is_503_naming_the_service() {
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/missing", "gone", 80)
                .prefix("/notready", "idle", 80),
        )
        .service(service(NS, "idle", 80))
        .slices(slice_with(
            NS,
            "idle",
            &["127.0.0.1:9".parse().expect("addr")],
            false,
        ));
    let proxy = start_proxy(world.snapshot()).await;
    for (path, svc) in [("/missing", "gone"), ("/notready", "idle")] {
        let (status, headers, body) = get(&proxy, "a.example", path).await;
        assert_eq!(status, 503, "{path}");
        assert_eq!(body, format!("no endpoints for ns/{svc}"));
        assert!(is_hex_id(headers["x-request-id"].to_str().expect("ascii")));
    }
}

#[tokio::test]
async fn round_robin_spreads_over_endpoints() {
    let e1 = start_echo("e1").await;
    let e2 = start_echo("e2").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[e1.addr, e2.addr]);
    let cfg = ProxyConfig {
        load_balance: LoadBalance::RoundRobin,
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..10 {
        *counts
            .entry(get_echo(&proxy, "a.example", "/").await.name)
            .or_insert(0) += 1;
    }
    assert_eq!(counts.get("e1"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("e2"), Some(&5), "{counts:?}");
}

/// The harness' refusing endpoint: connects are refused, and while the guard lives no
/// other socket can take the port (what "bind, release, hope" could not promise).
#[tokio::test]
async fn the_refusing_port_refuses_and_stays_reserved() {
    let refusing = refusing_port();
    for _ in 0..3 {
        let err = tokio::net::TcpStream::connect(refusing.addr)
            .await
            .expect_err("nothing accepts on the refusing port");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    assert!(
        tokio::net::TcpListener::bind(refusing.addr).await.is_err(),
        "the port stays reserved"
    );
    // Turned into a listener, the same port accepts.
    let addr = refusing.addr;
    let listener = refusing.into_listener();
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    client.expect("connect once listening");
    accepted.expect("accept");
}

#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    let refusing = refusing_port();
    let refused = refusing.addr;
    let (garbage, _g) = start_canned(b"this is not http\r\n\r\n").await;
    let (silent, _s) = start_silent().await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/refused", "refused", 80)
                .prefix("/garbage", "garbage", 80)
                .prefix("/silent", "silent", 80),
        )
        .backend(NS, "refused", 80, &[refused])
        .backend(NS, "garbage", 80, &[garbage])
        .backend(NS, "silent", 80, &[silent]);
    let cfg = ProxyConfig {
        response_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;

    let (status, headers, body) = get(&proxy, "a.example", "/refused").await;
    assert_eq!(status, 502);
    assert_eq!(body, "upstream error: connection refused");
    assert!(headers.contains_key("x-request-id"));

    let (status, _, body) = get(&proxy, "a.example", "/garbage").await;
    assert_eq!(status, 502);
    assert!(body.starts_with("upstream error: "), "{body}");

    let (status, headers, body) = get(&proxy, "a.example", "/silent").await;
    assert_eq!((status, body.as_str()), (504, "upstream timeout"));
    assert!(headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn bodies_stream_and_the_size_limit_answers_413() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let cfg = ProxyConfig {
        max_body_size: Some(100_000),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;

    // Under the limit: forwarded in full.
    let resp = client()
        .post(proxy.url("/upload"))
        .header("host", "a.example")
        .body(vec![7u8; 99_999])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let seen: EchoSeen = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!(seen.body_bytes, 99_999);

    // Declared too large: refused before any upstream work.
    let resp = client()
        .post(proxy.url("/upload"))
        .header("host", "a.example")
        .body(vec![7u8; 100_001])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 413);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.text().await.expect("body"), "request body too large");

    // Chunked, no length declared: cut off while streaming.
    let mut req = b"POST /upload HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..30 {
        req.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        req.extend_from_slice(&[b'x'; 8192]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(proxy.addr, &req).await;
    assert_eq!(raw_status(&resp), 413, "{resp}");
    assert!(resp.ends_with("request body too large"), "{resp}");
}

#[tokio::test]
async fn large_bodies_pass_both_ways_without_a_limit() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let size = 8 * 1024 * 1024;
    let resp = client()
        .put(proxy.url("/big"))
        .header("host", "a.example")
        .body(vec![1u8; size])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let seen: EchoSeen = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!(seen.body_bytes, size as u64);
    assert_eq!(seen.method, "PUT");
}

#[tokio::test]
async fn request_id_is_kept_when_valid_and_generated_otherwise() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;

    let send = |id: Option<String>| {
        let mut req = client().get(proxy.url("/")).header("host", "a.example");
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        async move {
            let resp = req.send().await.expect("send");
            let returned = resp.headers()["x-request-id"]
                .to_str()
                .expect("ascii")
                .to_string();
            let seen: EchoSeen =
                serde_json::from_str(&resp.text().await.expect("body")).expect("json");
            (returned, seen.header("x-request-id").map(str::to_string))
        }
    };

    let (returned, upstream) = send(Some("trace-abc_123".into())).await;
    assert_eq!(returned, "trace-abc_123");
    assert_eq!(upstream.as_deref(), Some("trace-abc_123"));

    let max = "k".repeat(128);
    assert_eq!(send(Some(max.clone())).await.0, max);

    for bad in ["k".repeat(129), "with space".to_string()] {
        let (returned, upstream) = send(Some(bad.clone())).await;
        assert!(is_hex_id(&returned), "{bad:?} -> {returned}");
        assert_eq!(upstream.as_deref(), Some(returned.as_str()));
    }

    let (returned, upstream) = send(None).await;
    assert!(is_hex_id(&returned));
    assert_eq!(upstream.as_deref(), Some(returned.as_str()));
}

#[tokio::test]
async fn forwarded_headers_and_host_passthrough() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let resp = client()
        .get(proxy.url("/"))
        .header("host", "A.Example:8080")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-port", "1")
        .header("x-real-ip", "203.0.113.9")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let seen: EchoSeen = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!(seen.host, "A.Example:8080", "Host passes unchanged");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("A.Example:8080"));
    let port = proxy.addr.port().to_string();
    assert_eq!(seen.header("x-forwarded-port"), Some(port.as_str()));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(
        seen.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(seen.header("tracestate"), Some("vendor=opaque"));
    assert_eq!(seen.version, "HTTP/1.1");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_from_requests() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let resp = raw(
        proxy.addr,
        b"GET /hop HTTP/1.1\r\nHost: a.example\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
          Trailer: x-sum\r\nUpgrade: foo/1\r\nX-Keep: yes\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    let seen: EchoSeen = serde_json::from_str(raw_body(&resp)).expect("echo json");
    for gone in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(seen.headers.get(gone).is_none(), "{gone} reached upstream");
    }
    assert_eq!(seen.header("te"), Some("trailers"));
    assert_eq!(seen.header("x-keep"), Some("yes"));
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_from_responses() {
    let (up, _stop) = start_canned(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\nX-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: foo/1\r\n\
          X-Keep: yes\r\nX-Request-Id: from-upstream\r\n\r\nok",
    )
    .await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;
    let (status, headers, body) = get(&proxy, "a.example", "/").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    for gone in ["x-secret", "keep-alive", "proxy-connection", "upgrade"] {
        assert!(!headers.contains_key(gone), "{gone} reached downstream");
    }
    assert_eq!(headers["x-keep"], "yes");
    let id = headers["x-request-id"].to_str().expect("ascii");
    assert!(is_hex_id(id), "the proxy's id wins: {id}");
}

#[tokio::test]
async fn h2c_downstream_reaches_an_http1_upstream_with_host_synthesised() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("a.example", proxy.addr)
        .resolve("b.example", proxy.addr)
        .build()
        .expect("h2 client");
    let url = format!("http://a.example:{}/h2?x=1", proxy.addr.port());
    let resp = h2.get(&url).send().await.expect("send");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let seen: EchoSeen = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.host, format!("a.example:{}", proxy.addr.port()));
    assert_eq!(seen.uri, "/h2?x=1");

    // Generated answers work over h2 too.
    let url = format!("http://b.example:{}/none", proxy.addr.port());
    let resp = h2.get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(
        resp.text().await.expect("body"),
        "no route for b.example /none"
    );
}

#[tokio::test]
async fn curl_over_h2c_and_http1() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let port = proxy.addr.port();
    for extra in [&["--http2-prior-knowledge"][..], &["--http1.1"][..]] {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend([
            "-sS".into(),
            "-i".into(),
            "--noproxy".into(),
            "*".into(),
            "--resolve".into(),
            format!("a.example:{port}:127.0.0.1"),
            "-H".into(),
            "x-request-id: curl-1".into(),
            format!("http://a.example:{port}/curl?q=2"),
        ]);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("/usr/bin/curl")
                .args(&args)
                .output()
                .expect("run curl")
        })
        .await
        .expect("join");
        assert!(out.status.success(), "curl failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let first = head.lines().next().unwrap_or_default();
        assert!(first.ends_with(" 200") || first.contains(" 200 "), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("x-request-id: curl-1"),
            "{head}"
        );
        let seen: EchoSeen = serde_json::from_str(body).expect("echo json");
        assert_eq!(seen.uri, "/curl?q=2");
        assert_eq!(seen.host, format!("a.example:{port}"));
    }
}

#[tokio::test]
async fn external_name_resolves_when_connecting() {
    let a = start_echo("ext").await;
    let port = i32::from(a.addr.port());
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/", "ext", port),
        )
        .service(external_name(NS, "ext", "localhost", port));
    let proxy = start_proxy(world.snapshot()).await;
    let seen = get_echo(&proxy, "a.example", "/x").await;
    assert_eq!(seen.name, "ext");
    assert_eq!(seen.host, "a.example", "Host passes unchanged");
}

#[tokio::test]
async fn external_name_that_is_not_a_dns_name_answers_503_and_keeps_the_connection() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(
            ingress(NS, "web")
                .host("a.example")
                .prefix("/", "ext", 80)
                .host("b.example")
                .prefix("/", "svc", 80),
        )
        .service(external_name(NS, "ext", "bad name!", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    // Two requests on one keep-alive connection: the configuration error is no reason to
    // close it, and the next request is served.
    let resp = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), 503, "{resp}");
    assert!(resp.contains("no endpoints for ns/ext"), "{resp}");
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        2,
        "the second request is answered on the same connection: {resp}"
    );
    assert!(resp.contains("\"name\":\"a\""), "{resp}");
}

#[tokio::test]
async fn host_and_authority_that_differ_are_400() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let resp = raw(
        proxy.addr,
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), 400, "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("x-request-id: "),
        "{resp}"
    );

    // Absolute-form with a matching Host is routed by the authority.
    let resp = raw(
        proxy.addr,
        b"GET http://a.example/abs HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    let seen: EchoSeen = serde_json::from_str(raw_body(&resp)).expect("echo json");
    assert_eq!(seen.uri, "/abs");
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed() {
    let cfg = ProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let proxy = start_proxy_with(World::new().snapshot(), cfg).await;
    // Sends nothing at all.
    let out = raw(proxy.addr, b"").await;
    assert_eq!(out, "", "closed without an answer");
    // Sends part of a head and stops.
    let out = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: a.exa").await;
    assert!(!out.contains(" 200 "), "{out}");
    // Sends part of the HTTP/2 preface and stops.
    let out = raw(proxy.addr, b"PRI * HTTP/2.0\r\n").await;
    assert_eq!(out, "");
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let big = "v".repeat(40 * 1024);
    let req =
        format!("GET / HTTP/1.1\r\nHost: a.example\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let resp = raw(proxy.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&resp), 431, "{}", &resp[..resp.len().min(200)]);

    // Just under the limit passes.
    let ok = "v".repeat(30 * 1024);
    let req =
        format!("GET / HTTP/1.1\r\nHost: a.example\r\nX-Big: {ok}\r\nConnection: close\r\n\r\n");
    let resp = raw(proxy.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&resp), 200);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let cfg = ProxyConfig {
        max_connections: Some(1),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;

    // The first connection holds the only slot (keep-alive, answered once).
    let mut first = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // A second one is closed without an answer.
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out, "");

    // Once the first goes away, the slot is free again (eventually).
    drop(first);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        if out.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    assert_eq!(get_echo(&proxy, "a.example", "/").await.name, "a");
    let addr = proxy.addr;
    proxy.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn swapping_a_snapshot_reroutes_the_next_request() {
    let a = start_echo("a").await;
    let b = start_echo("b").await;
    let to = |svc: &str| {
        World::new()
            .ingress(ingress(NS, "web").host("a.example").prefix("/", svc, 80))
            .backend(NS, "svc-a", 80, &[a.addr])
            .backend(NS, "svc-b", 80, &[b.addr])
            .snapshot()
    };
    let proxy = start_proxy(to("svc-a")).await;
    let c = client();
    let send = || async {
        let r = c
            .get(proxy.url("/"))
            .header("host", "a.example")
            .send()
            .await
            .expect("send");
        let seen: EchoSeen = serde_json::from_str(&r.text().await.expect("body")).expect("json");
        seen.name
    };
    assert_eq!(send().await, "a");
    proxy.publish(to("svc-b"));
    assert_eq!(
        send().await,
        "b",
        "same keep-alive connection, new snapshot"
    );
    proxy.publish(to("svc-a"));
    assert_eq!(send().await, "a");
}

#[tokio::test]
async fn upstream_connect_timeout_is_504() {
    // A listener whose accept queue is full drops further SYNs, so connecting to it
    // hangs: fill the queue (nobody accepts) until a connect attempt stalls.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let bind: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&bind.into()).expect("bind");
    socket.listen(0).expect("listen");
    let stalled = socket
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet address");
    let mut held = Vec::new();
    for _ in 0..64 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(stalled),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => panic!("connect failed: {e}"),
            Err(_) => break,
        }
    }

    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[stalled]);
    let cfg = ProxyConfig {
        connect_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let (status, headers, body) = get(&proxy, "a.example", "/").await;
    assert_eq!((status, body.as_str()), (504, "upstream timeout"));
    assert!(headers.contains_key("x-request-id"));
    drop(socket);
}

#[tokio::test]
async fn expect_continue_is_answered_downstream_and_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\
          Expect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write head");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(EVENTUALLY, s.read(&mut buf))
        .await
        .expect("100 Continue in time")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"hello").await.expect("write body");
    let mut out = Vec::new();
    tokio::time::timeout(EVENTUALLY, s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(raw_status(&out), 200, "{out}");
    let seen: EchoSeen = serde_json::from_str(raw_body(&out)).expect("echo json");
    assert_eq!(seen.body_bytes, 5);
    assert!(seen.headers.get("expect").is_none());
}

#[tokio::test]
async fn oversized_h2_header_lists_are_refused() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[a.addr]);
    let cfg = ProxyConfig {
        max_header_size: 16 * 1024,
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("a.example", proxy.addr)
        .build()
        .expect("h2 client");
    let url = format!("http://a.example:{}/", proxy.addr.port());
    let ok = h2
        .get(&url)
        .header("x-small", "v".repeat(8 * 1024))
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), 200);
    let big = h2
        .get(&url)
        .header("x-big", "v".repeat(32 * 1024))
        .send()
        .await;
    assert_eq!(big.expect("the proxy answers").status(), 431);
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_closed_when_idle() {
    let (up, mut closed, _stop) = start_keepalive_watch().await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let cfg = ProxyConfig {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    for _ in 0..5 {
        let (status, _, body) = get(&proxy, "a.example", "/").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    let connects = proxy
        .metrics
        .upstream_connect_duration_seconds
        .with_label_values(&["ns/svc"])
        .get_sample_count();
    assert_eq!(
        connects, 1,
        "sequential requests reuse one pooled connection"
    );

    // The idle pooled connection is closed by the proxy.
    tokio::time::timeout(EVENTUALLY, closed.recv())
        .await
        .expect("idle upstream connection closed in time")
        .expect("watcher alive");

    // And the next request opens a new one.
    assert_eq!(get(&proxy, "a.example", "/").await.0, 200);
    let connects = proxy
        .metrics
        .upstream_connect_duration_seconds
        .with_label_values(&["ns/svc"])
        .get_sample_count();
    assert_eq!(connects, 2);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let (up, arrived, release) = start_gated().await;
    let world = World::new()
        .ingress(ingress(NS, "web").host("a.example").prefix("/", "svc", 80))
        .backend(NS, "svc", 80, &[up]);
    let proxy = start_proxy(world.snapshot()).await;
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move {
        let resp = client()
            .get(url)
            .header("host", "a.example")
            .send()
            .await
            .expect("answered despite shutdown");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    });
    arrived.await.expect("request reached the upstream");
    let addr = proxy.addr;
    let draining = tokio::spawn(proxy.shutdown());
    // New connections are refused once the listener is gone.
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::task::yield_now().await;
    }
    assert!(!draining.is_finished(), "waits for the in-flight request");
    release.send(()).expect("upstream waiting");
    assert_eq!(in_flight.await.expect("join"), (200, "ok".to_string()));
    tokio::time::timeout(EVENTUALLY, draining)
        .await
        .expect("drained in time")
        .expect("join");
}
