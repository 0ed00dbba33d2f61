//! TLS termination with real clients: rustls (tokio-rustls) clients that check which
//! certificate was presented, reqwest and hyper over TLS, curl and openssl; certificate
//! rotation through the files source; 421, the opt-in redirect, HSTS; hostile clients.
//! Every certificate is made here at run time with rcgen (a test CA and leaves).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis::accesslog::{AccessLog, AccessLogFormat};
use portcullis::certs::{DevCa, PemPair};
use portcullis::k8s::Options;
use portcullis::metrics::Metrics;
use portcullis::model::{
    Conditions, HostPattern, ListenerKind, ObjectRef, PathRule, PathType, Route, RouteKind,
    RouteSource, RouteTable, Snapshot,
};
use portcullis::proxy::tls::TlsSettings;
use portcullis::proxy::{Proxy, ProxyConfig};
use portcullis::publish::Publisher;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------
// Certificates

/// A test CA and leaves it signs.
struct Pki {
    ca: DevCa,
}

impl Pki {
    fn new() -> Pki {
        portcullis::tls::install_default_provider();
        Pki {
            ca: DevCa::generate("Portcullis test CA").expect("test CA"),
        }
    }

    fn leaf(&self, hosts: &[&str]) -> PemPair {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        self.ca.issue(&hosts, 30).expect("test leaf")
    }

    fn secret(
        &self,
        ns: &str,
        name: &str,
        hosts: &[&str],
    ) -> (k8s_openapi::api::core::v1::Secret, Vec<u8>) {
        let pair = self.leaf(hosts);
        (
            tls_secret(ns, name, &pair.cert_pem, &pair.key_pem),
            leaf_der(&pair),
        )
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.ca.cert_pem.as_bytes()).expect("CA PEM")
    }
}

/// The DER of the first certificate of a PEM chain.
fn leaf_der(pair: &PemPair) -> Vec<u8> {
    CertificateDer::from_pem_slice(pair.cert_pem.as_bytes())
        .expect("leaf PEM")
        .to_vec()
}

// ---------------------------------------------------------------------------------
// Clients

/// A client that trusts the test CA only.
fn verifying_client(pki: &Pki, alpn: &[&[u8]]) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).expect("add CA");
    let mut cfg = ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// Accepts whatever certificate the server presents (signatures still checked), so that a
/// test can look at it.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn capturing_client(alpn: &[&[u8]]) -> ClientConfig {
    portcullis::tls::install_default_provider();
    let provider = portcullis::tls::provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// A TLS connection to `addr` with SNI `sni` (`None`: connect by IP address, which sends
/// no SNI).
async fn connect(addr: SocketAddr, sni: Option<&str>, cfg: ClientConfig) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_string()).expect("server name"),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// The leaf certificate the server presented.
fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .to_vec()
}

async fn presented_for(addr: SocketAddr, sni: Option<&str>) -> Vec<u8> {
    presented(&connect(addr, sni, capturing_client(&[])).await)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 client on one TLS connection.
async fn h1_on(stream: TlsStream<TcpStream>) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    sender
}

/// GET `path` with `Host: host` on `sender`; status, headers, body.
async fn send(sender: &mut Sender, host: &str, path: &str) -> (u16, http::HeaderMap, String) {
    sender.ready().await.expect("connection ready");
    let req = http::Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// One request on a new TLS connection with SNI `sni`.
async fn tls_get(
    addr: SocketAddr,
    sni: Option<&str>,
    host: &str,
    path: &str,
) -> (u16, http::HeaderMap, String) {
    let mut s = h1_on(connect(addr, sni, capturing_client(&[b"http/1.1"])).await).await;
    send(&mut s, host, path).await
}

/// reqwest over TLS to `host` resolved to `addr`, trusting the test CA.
fn reqwest_tls(pki: &Pki, alpn: &[&[u8]], host: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(verifying_client(pki, alpn))
        .resolve(host, addr)
        .build()
        .expect("reqwest client")
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in time: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------
// A proxy with both listeners

struct TlsProxy {
    http: SocketAddr,
    https: SocketAddr,
    snapshots: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    generated_default: Vec<u8>,
    proxy: Proxy,
    stop: Stopper,
}

impl TlsProxy {
    fn publish(&self, mut snapshot: Snapshot) {
        snapshot.generation = self.snapshots.load().generation + 1;
        self.snapshots.store(Arc::new(snapshot));
    }

    fn errors(&self, reason: &str) -> u64 {
        self.metrics
            .tls_handshake_errors_total
            .with_label_values(&[reason])
            .get()
    }
}

async fn start_tls(snapshot: Snapshot, tune: impl FnOnce(TlsSettings) -> TlsSettings) -> TlsProxy {
    let snapshots = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    start_tls_on(snapshots, snapshot, tune).await
}

async fn start_tls_on(
    snapshots: Arc<ArcSwap<Snapshot>>,
    snapshot: Snapshot,
    tune: impl FnOnce(TlsSettings) -> TlsSettings,
) -> TlsProxy {
    start_tls_logging(snapshots, snapshot, tune, AccessLog::off()).await
}

/// Like [`start_tls_on`], logging requests to `access_log`.
async fn start_tls_logging(
    snapshots: Arc<ArcSwap<Snapshot>>,
    mut snapshot: Snapshot,
    tune: impl FnOnce(TlsSettings) -> TlsSettings,
    access_log: AccessLog,
) -> TlsProxy {
    portcullis::tls::install_default_provider();
    if snapshot.generation == 0 && snapshots.load().generation == 0 {
        snapshot.generation = 1;
        snapshots.store(Arc::new(snapshot));
    }
    let metrics = Metrics::new();
    let proxy = Proxy::with_access_log(
        ProxyConfig::default(),
        snapshots.clone(),
        metrics.clone(),
        access_log,
    );
    let generated = portcullis::certs::generate_default().expect("default certificate");
    let generated_default = generated.certified.cert[0].to_vec();
    proxy
        .enable_tls(tune(TlsSettings::new(generated)))
        .expect("enable TLS");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let https = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
    let (http_addr, https_addr) = (
        http.local_addr().expect("addr"),
        https.local_addr().expect("addr"),
    );
    let (stop, rx) = Stopper::new();
    {
        let proxy = proxy.clone();
        let rx = rx.clone();
        tokio::spawn(async move { proxy.serve_http(http, rx).await });
    }
    {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve_https(https, rx).await });
    }
    TlsProxy {
        http: http_addr,
        https: https_addr,
        snapshots,
        metrics,
        generated_default,
        proxy,
        stop,
    }
}

/// Hosts: a.example (Secret a-tls), b.example (b-tls), x/y.w.example (wildcard w-tls),
/// m.example (Secret missing), plain.example (no TLS), all to one echo upstream.
struct Fixture {
    pki: Pki,
    echo: Echo,
    world: World,
    a: Vec<u8>,
    b: Vec<u8>,
    w: Vec<u8>,
}

async fn fixture() -> Fixture {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let (sa, a) = pki.secret("ns", "a-tls", &["a.example"]);
    let (sb, b) = pki.secret("ns", "b-tls", &["b.example"]);
    let (sw, w) = pki.secret("ns", "w-tls", &["*.w.example"]);
    let world = World::new()
        .backend("ns", "svc", 80, &[echo.addr])
        .secret(sa)
        .secret(sb)
        .secret(sw)
        .ingress(
            ingress("ns", "a")
                .host("a.example")
                .prefix("/", "svc", 80)
                .tls(&["a.example"], "a-tls"),
        )
        .ingress(
            ingress("ns", "b")
                .host("b.example")
                .prefix("/", "svc", 80)
                .tls(&["b.example"], "b-tls"),
        )
        .ingress(
            ingress("ns", "w")
                .host("x.w.example")
                .prefix("/", "svc", 80)
                .host("y.w.example")
                .prefix("/", "svc", 80)
                .tls(&["*.w.example"], "w-tls"),
        )
        .ingress(
            ingress("ns", "m")
                .host("m.example")
                .prefix("/", "svc", 80)
                .tls(&["m.example"], "missing-tls"),
        )
        .ingress(
            ingress("ns", "plain")
                .host("plain.example")
                .prefix("/", "svc", 80),
        );
    Fixture {
        pki,
        echo,
        world,
        a,
        b,
        w,
    }
}

// ---------------------------------------------------------------------------------
// Certificate choice

#[tokio::test]
async fn certificate_per_sni_exact_then_wildcard_then_default() {
    let f = fixture().await;
    let snap = f.world.snapshot();
    assert!(
        snap.diagnostics
            .iter()
            .any(|d| d.kind == "Secret" && d.name == "missing-tls"),
        "{:?}",
        snap.diagnostics
    );
    let p = start_tls(snap, |s| s).await;
    let cases: [(Option<&str>, &Vec<u8>); 8] = [
        (Some("a.example"), &f.a),
        (Some("A.Example"), &f.a),
        (Some("b.example"), &f.b),
        (Some("x.w.example"), &f.w),
        (Some("anything.w.example"), &f.w),
        // One label only: two labels below the wildcard is not covered.
        (Some("a.b.w.example"), &p.generated_default),
        (Some("unknown.example"), &p.generated_default),
        (None, &p.generated_default),
    ];
    for (sni, want) in cases {
        assert!(presented_for(p.https, sni).await == *want, "SNI {sni:?}");
    }
    // Missing Secret: its host gets the default certificate.
    assert_eq!(
        presented_for(p.https, Some("m.example")).await,
        p.generated_default
    );
    // The generated default certificate names itself.
    let (_, x509) = x509_parser::parse_x509_certificate(&p.generated_default).expect("x509");
    assert!(
        x509.subject()
            .to_string()
            .contains("Portcullis default certificate")
    );
    // Unknown SNI is not an error.
    assert_eq!(p.errors("other") + p.errors("incompatible"), 0);
}

#[tokio::test]
async fn invalid_secret_gets_the_default_and_only_own_namespace_secrets_count() {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let (other_ns, _) = pki.secret("other", "shared-tls", &["o.example"]);
    let broken = tls_secret("ns", "broken-tls", "not a pem", "not a key");
    let snap = World::new()
        .backend("ns", "svc", 80, &[echo.addr])
        .secret(other_ns)
        .secret(broken)
        .ingress(
            ingress("ns", "o")
                .host("o.example")
                .prefix("/", "svc", 80)
                .tls(&["o.example"], "shared-tls"),
        )
        .ingress(
            ingress("ns", "x")
                .host("x.example")
                .prefix("/", "svc", 80)
                .tls(&["x.example"], "broken-tls"),
        )
        .snapshot();
    let p = start_tls(snap, |s| s).await;
    // ns/shared-tls does not exist: other/shared-tls is not used for an Ingress in ns.
    assert_eq!(
        presented_for(p.https, Some("o.example")).await,
        p.generated_default
    );
    assert_eq!(
        presented_for(p.https, Some("x.example")).await,
        p.generated_default
    );
    let snap = p.snapshots.load();
    for name in ["shared-tls", "broken-tls"] {
        assert!(
            snap.diagnostics
                .iter()
                .any(|d| d.kind == "Secret" && d.namespace == "ns" && d.name == name),
            "{name}: {:?}",
            snap.diagnostics
        );
    }
}

#[tokio::test]
async fn default_ssl_certificate_flag_and_its_fallback() {
    let pki = Pki::new();
    let (dflt, dflt_der) = pki.secret("kube-system", "default-cert", &["fallback.example"]);
    let flag = ObjectRef::new("kube-system", "default-cert");
    let options = || Options {
        assume_class: true,
        allow_local_endpoints: true,
        default_ssl_certificate: Some(flag.clone()),
        ..Default::default()
    };
    let with = World::new().secret(dflt).snapshot_with(options());
    let p = start_tls(with, |s| TlsSettings {
        default_secret: Some(flag.clone()),
        ..s
    })
    .await;
    assert_eq!(
        presented_for(p.https, Some("nobody.example")).await,
        dflt_der
    );
    assert_eq!(presented_for(p.https, None).await, dflt_der);

    // The Secret goes away: the generated certificate, and a diagnostic naming the flag.
    let without = World::new().snapshot_with(options());
    assert!(
        without
            .diagnostics
            .iter()
            .any(|d| d.field == "--default-ssl-certificate" && d.name == "default-cert"),
        "{:?}",
        without.diagnostics
    );
    p.publish(without);
    assert_eq!(
        presented_for(p.https, Some("nobody.example")).await,
        p.generated_default
    );
}

// ---------------------------------------------------------------------------------
// Requests over TLS

#[tokio::test]
async fn reqwest_over_tls_with_alpn_h2_and_http11() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| s).await;
    let url = format!("https://a.example:{}/hello?x=1", p.https.port());
    for (alpn, want) in [
        (
            &[b"h2".as_slice(), b"http/1.1"][..],
            reqwest::Version::HTTP_2,
        ),
        (&[b"http/1.1".as_slice()][..], reqwest::Version::HTTP_11),
    ] {
        let client = reqwest_tls(&f.pki, alpn, "a.example", p.https);
        let resp = client.get(&url).send().await.expect("request over TLS");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), want);
        assert!(resp.headers().get("strict-transport-security").is_none());
        let seen: EchoSeen =
            serde_json::from_str(&resp.text().await.expect("body")).expect("echo JSON");
        assert_eq!(seen.uri, "/hello?x=1");
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert_eq!(
            seen.header("x-forwarded-port"),
            Some(p.https.port().to_string().as_str())
        );
    }
    assert!(
        p.metrics
            .tls_handshakes_total
            .with_label_values(&["1.3"])
            .get()
            >= 2
    );
    // The plain listener still says http.
    let seen: EchoSeen = client()
        .get(format!("http://{}/", p.http))
        .header("host", "a.example")
        .send()
        .await
        .expect("plain request")
        .text()
        .await
        .map(|t| serde_json::from_str(&t).expect("echo JSON"))
        .expect("body");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
}

#[tokio::test]
async fn tls12_client_is_served() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| s).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(f.pki.ca_der()).expect("add CA");
    let cfg = ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("TLS 1.2")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = connect(p.https, Some("b.example"), cfg).await;
    assert_eq!(presented(&stream), f.b);
    let mut s = h1_on(stream).await;
    assert_eq!(send(&mut s, "b.example", "/").await.0, 200);
    assert_eq!(
        p.metrics
            .tls_handshakes_total
            .with_label_values(&["1.2"])
            .get(),
        1
    );
}

/// A writer whose bytes the test can read.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn json_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("capture lock").clone();
        String::from_utf8(bytes)
            .expect("access log is UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("access log line is JSON"))
            .collect()
    }
}

#[tokio::test]
async fn access_log_names_the_negotiated_tls_version() {
    let f = fixture().await;
    let metrics = Metrics::new();
    let captured = Captured::default();
    let log = AccessLog::start(
        AccessLogFormat::Json,
        captured.clone(),
        metrics.access_log_dropped_total.clone(),
        64,
    );
    let snapshots = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let p = start_tls_logging(snapshots, f.world.snapshot(), |s| s, log).await;

    // TLS 1.3 (the client's default), then TLS 1.2, then plain HTTP.
    assert_eq!(
        tls_get(p.https, Some("a.example"), "a.example", "/v13")
            .await
            .0,
        200
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(f.pki.ca_der()).expect("add CA");
    let tls12 = ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("TLS 1.2")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut s = h1_on(connect(p.https, Some("b.example"), tls12).await).await;
    assert_eq!(send(&mut s, "b.example", "/v12").await.0, 200);
    assert_eq!(plain_get(p.http, "plain.example", "/plain").await.0, 200);

    eventually("three access log lines", async || {
        captured.json_lines().len() >= 3
    })
    .await;
    let lines = captured.json_lines();
    let version_of = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no access log line for {path}: {lines:?}"))["tls_version"]
            .clone()
    };
    assert_eq!(version_of("/v13"), "TLSv1.3");
    assert_eq!(version_of("/v12"), "TLSv1.2");
    assert!(
        version_of("/plain").is_null(),
        "plain HTTP has no TLS version"
    );
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_verifies_the_certificate_and_negotiates_h2() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| s).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &f.pki.ca.cert_pem).expect("write CA");
    let ca = ca.to_string_lossy().into_owned();
    let port = p.https.port();
    let resolve = format!("x.w.example:{port}:127.0.0.1");
    let url = format!("https://x.w.example:{port}/c");
    let curl_args = |extra: &'static [&'static str]| {
        let mut v: Vec<String> = vec![
            "--resolve".into(),
            resolve.clone(),
            "--cacert".into(),
            ca.clone(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(url.clone());
        v
    };
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let (ok, out) = run(curl_args(&[])).await.expect("curl");
    assert!(ok, "{out}");
    let seen: EchoSeen = serde_json::from_str(&out).expect("echo JSON");
    assert_eq!(seen.path, "/c");
    let (ok, out) = run(curl_args(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
    ]))
    .await
    .expect("curl");
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "2");
    let (ok, out) = run(curl_args(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
    ]))
    .await
    .expect("curl");
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "1.1");
    // Without the CA, curl refuses the certificate: it really is verified.
    let (ok, _) = run(vec!["--resolve".into(), resolve.clone(), url.clone()])
        .await
        .expect("curl");
    assert!(!ok);
}

// ---------------------------------------------------------------------------------
// 421

#[tokio::test]
async fn misdirected_requests_get_421() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| s).await;
    let cases: &[(Option<&str>, &str, u16)] = &[
        (Some("a.example"), "a.example", 200),
        // Another host with its own Secret.
        (Some("a.example"), "b.example", 421),
        // The same wildcard Secret covers both names.
        (Some("x.w.example"), "y.w.example", 200),
        (Some("x.w.example"), "a.example", 421),
        // Not a TLS host: nothing to compare.
        (Some("a.example"), "plain.example", 200),
        // No SNI: the connection chose the default certificate.
        (None, "a.example", 421),
        (None, "x.w.example", 421),
        (None, "plain.example", 200),
        // A TLS host whose Secret is missing gets the default certificate too.
        (None, "m.example", 200),
        (Some("m.example"), "plain.example", 200),
        (Some("unknown.example"), "m.example", 200),
        (Some("m.example"), "a.example", 421),
    ];
    for (sni, host, want) in cases {
        let (status, headers, body) = tls_get(p.https, *sni, host, "/").await;
        assert_eq!(status, *want, "SNI {sni:?} Host {host}: {body}");
        if status == 421 {
            assert_eq!(body, "misdirected request");
            assert!(headers.contains_key("x-request-id"));
        }
    }
    // A second request on the same connection follows the same rule.
    let mut s = h1_on(connect(p.https, Some("b.example"), capturing_client(&[])).await).await;
    assert_eq!(send(&mut s, "b.example", "/").await.0, 200);
    assert_eq!(send(&mut s, "a.example", "/").await.0, 421);
    assert_eq!(send(&mut s, "b.example:443", "/").await.0, 200);

    // HTTP/2 connection reuse: :authority decides, as browsers coalesce connections.
    let stream = connect(p.https, Some("x.w.example"), capturing_client(&[b"h2"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    for (authority, want) in [
        ("y.w.example", 200),
        ("a.example", 421),
        ("plain.example", 200),
    ] {
        let req = http::Request::get(format!("https://{authority}/"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = h2.send_request(req).await.expect("h2 response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status().as_u16(), want, ":authority {authority}");
    }
}

#[tokio::test]
async fn rotation_by_content_is_not_misdirection_but_a_new_secret_name_is() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| s).await;
    let mut s = h1_on(connect(p.https, Some("a.example"), capturing_client(&[])).await).await;
    assert_eq!(send(&mut s, "a.example", "/").await.0, 200);
    // Same Secret name, new content: the open connection keeps being served.
    let (rotated, rotated_der) = f.pki.secret("ns", "a-tls", &["a.example"]);
    let mut world = f.world.clone();
    world
        .secrets
        .retain(|x| x.metadata.name.as_deref() != Some("a-tls"));
    p.publish(world.clone().secret(rotated.clone()).snapshot());
    assert_eq!(presented_for(p.https, Some("a.example")).await, rotated_der);
    assert_eq!(send(&mut s, "a.example", "/").await.0, 200);
    // The Ingress now names another Secret: the old connection is misdirected.
    let (renamed, _) = f.pki.secret("ns", "a2-tls", &["a.example"]);
    let mut w2 = World::new()
        .backend("ns", "svc", 80, &[f.echo.addr])
        .secret(renamed)
        .ingress(
            ingress("ns", "a")
                .host("a.example")
                .prefix("/", "svc", 80)
                .tls(&["a.example"], "a2-tls"),
        );
    w2.secrets.push(rotated);
    p.publish(w2.snapshot());
    assert_eq!(send(&mut s, "a.example", "/").await.0, 421);
}

// ---------------------------------------------------------------------------------
// Redirect and HSTS

async fn plain_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = client
        .get(format!("http://{addr}{path}"))
        .header("host", host)
        .send()
        .await
        .expect("plain request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.expect("body"))
}

fn redirect_world(echo: &Echo, pki: &Pki) -> World {
    let (s, _) = pki.secret(
        "ns",
        "r-tls",
        &["r1.example", "r2.example", "r4.example", "r5.example"],
    );
    World::new()
        .backend("ns", "svc", 80, &[echo.addr])
        .secret(s)
        .ingress(
            ingress("ns", "r1")
                .annotation("portcullis.io/ssl-redirect", "true")
                .host("r1.example")
                .prefix("/", "svc", 80)
                .tls(&["r1.example"], "r-tls"),
        )
        .ingress(
            ingress("ns", "r2")
                .host("r2.example")
                .prefix("/", "svc", 80)
                .tls(&["r2.example"], "r-tls"),
        )
        // Opted in, but no tls entry: nothing to redirect to.
        .ingress(
            ingress("ns", "r3")
                .annotation("portcullis.io/ssl-redirect", "true")
                .host("r3.example")
                .prefix("/", "svc", 80),
        )
        // A tls entry without hosts covers the Ingress' own rule hosts.
        .ingress(
            ingress("ns", "r4")
                .annotation("portcullis.io/ssl-redirect", "true")
                .host("r4.example")
                .prefix("/", "svc", 80)
                .tls(&[], "r-tls"),
        )
        .ingress(
            ingress("ns", "r5")
                .annotation("portcullis.io/ssl-redirect", "false")
                .host("r5.example")
                .prefix("/", "svc", 80)
                .tls(&["r5.example"], "r-tls"),
        )
}

#[tokio::test]
async fn https_redirect_is_opt_in_per_ingress() {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let p = start_tls(redirect_world(&echo, &pki).snapshot(), |s| s).await;
    let port = p.https.port();
    let (status, headers, body) = plain_get(p.http, "R1.example:8080", "/p/q?x=1&y=2").await;
    assert_eq!(status, 308);
    assert_eq!(body, "");
    assert_eq!(
        headers["location"],
        format!("https://r1.example:{port}/p/q?x=1&y=2").as_str()
    );
    assert_eq!(plain_get(p.http, "r4.example", "/").await.0, 308);
    for host in ["r2.example", "r3.example", "r5.example"] {
        assert_eq!(plain_get(p.http, host, "/").await.0, 200, "{host}");
    }
    // The redirect target is served.
    let client = reqwest_tls(&pki, &[b"http/1.1"], "r1.example", p.https);
    let resp = client
        .get(format!("https://r1.example:{port}/p/q?x=1&y=2"))
        .send()
        .await
        .expect("follow the redirect");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn https_redirect_globally_with_opt_out_and_port_443() {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let p = start_tls(redirect_world(&echo, &pki).snapshot(), |s| TlsSettings {
        ssl_redirect: true,
        redirect_port: Some(443),
        ..s
    })
    .await;
    let (status, headers, _) = plain_get(p.http, "r2.example", "/a?b").await;
    assert_eq!(status, 308);
    assert_eq!(headers["location"], "https://r2.example/a?b");
    assert_eq!(plain_get(p.http, "r1.example", "/").await.0, 308);
    // Opted out, and a host without a tls entry.
    assert_eq!(plain_get(p.http, "r5.example", "/").await.0, 200);
    assert_eq!(plain_get(p.http, "r3.example", "/").await.0, 200);
    assert_eq!(plain_get(p.http, "nothing.example", "/").await.0, 404);

    let p = start_tls(redirect_world(&echo, &pki).snapshot(), |s| TlsSettings {
        ssl_redirect: true,
        redirect_port: Some(9443),
        ..s
    })
    .await;
    let (_, headers, _) = plain_get(p.http, "r2.example", "/").await;
    assert_eq!(headers["location"], "https://r2.example:9443/");
}

/// A Gateway API route exists on its Gateway listeners only: the HTTPS redirect of an
/// Ingress TLS host that covers its host must not send it where it is not served.
#[tokio::test]
async fn https_redirect_leaves_gateway_api_routes_on_their_listener() {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let (s, _) = pki.secret("ns", "w-tls", &["*.gw.example"]);
    let world = World::new()
        .backend("ns", "svc", 80, &[echo.addr])
        .secret(s)
        .ingress(
            ingress("ns", "w")
                .host("*.gw.example")
                .prefix("/", "svc", 80)
                .tls(&["*.gw.example"], "w-tls"),
        );
    let mut snap = world.snapshot();
    let mut routes: Vec<Route> = snap.routes.routes().cloned().collect();
    let cluster = routes[0]
        .first_cluster()
        .expect("the Ingress route forwards");
    let mut gateway_route = Route::forward(
        HostPattern::Exact("api.gw.example".into()),
        PathRule::new("/", PathType::Prefix).expect("a path"),
        RouteSource {
            kind: RouteKind::HttpRoute,
            object: ObjectRef::new("ns", "api"),
            rule: 0,
            match_index: 0,
        },
        cluster,
    );
    gateway_route.conditions = Some(Box::new(Conditions {
        listener: Some(ListenerKind::Http),
        ..Conditions::default()
    }));
    gateway_route.order = routes.len() as u32;
    routes.push(gateway_route);
    snap.routes = Arc::new(RouteTable::build(routes).0);
    let p = start_tls(snap, |s| TlsSettings {
        ssl_redirect: true,
        ..s
    })
    .await;
    assert_eq!(plain_get(p.http, "api.gw.example", "/").await.0, 200);
    assert_eq!(plain_get(p.http, "other.gw.example", "/").await.0, 308);
}

#[tokio::test]
async fn hsts_only_on_tls_responses() {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let (s, _) = pki.secret("ns", "h-tls", &["h1.example", "h2.example"]);
    let world = World::new()
        .backend("ns", "svc", 80, &[echo.addr])
        .secret(s)
        .ingress(
            ingress("ns", "h1")
                .annotation("portcullis.io/hsts", "max-age=60; includeSubDomains")
                .host("h1.example")
                .prefix("/", "svc", 80)
                .tls(&["h1.example"], "h-tls"),
        )
        .ingress(
            ingress("ns", "h2")
                .host("h2.example")
                .prefix("/", "svc", 80)
                .tls(&["h2.example"], "h-tls"),
        );
    let sts = "strict-transport-security";

    // Off by default; the annotation turns it on for its Ingress.
    let p = start_tls(world.snapshot(), |s| s).await;
    let (status, headers, _) = tls_get(p.https, Some("h1.example"), "h1.example", "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers[sts], "max-age=60; includeSubDomains");
    let (_, headers, _) = tls_get(p.https, Some("h2.example"), "h2.example", "/").await;
    assert!(headers.get(sts).is_none());
    let (_, headers, _) = plain_get(p.http, "h1.example", "/").await;
    assert!(headers.get(sts).is_none());

    // The flag: every TLS response, the annotation still wins, never on plain HTTP.
    let p = start_tls(world.snapshot(), |s| TlsSettings {
        hsts: Some(http::HeaderValue::from_static("max-age=10")),
        ..s
    })
    .await;
    let (_, headers, _) = tls_get(p.https, Some("h2.example"), "h2.example", "/").await;
    assert_eq!(headers[sts], "max-age=10");
    let (_, headers, _) = tls_get(p.https, Some("h1.example"), "h1.example", "/").await;
    assert_eq!(headers[sts], "max-age=60; includeSubDomains");
    let (status, headers, _) = tls_get(p.https, None, "nothing.example", "/").await;
    assert_eq!(status, 404);
    assert_eq!(headers[sts], "max-age=10");
    let (_, headers, _) = plain_get(p.http, "h2.example", "/").await;
    assert!(headers.get(sts).is_none());
}

#[test]
fn tls_annotations_are_read_and_checked() {
    let world = World::new()
        .ingress(
            ingress("ns", "good")
                .annotation("portcullis.io/ssl-redirect", "false")
                .annotation("portcullis.io/hsts", "max-age=5")
                .host("g.example")
                .prefix("/", "svc", 80),
        )
        .ingress(
            ingress("ns", "bad")
                .annotation("portcullis.io/ssl-redirect", "yes")
                .annotation("portcullis.io/hsts", "max-age=5\u{7}")
                .host("b.example")
                .prefix("/", "svc", 80),
        )
        .ingress(
            ingress("ns", "none")
                .host("n.example")
                .prefix("/", "svc", 80),
        );
    let snap = world.snapshot();
    let good = &snap.tls.policies[&ObjectRef::new("ns", "good")];
    assert_eq!(good.ssl_redirect, Some(false));
    assert_eq!(good.hsts.as_deref(), Some("max-age=5"));
    assert!(!snap.tls.policies.contains_key(&ObjectRef::new("ns", "bad")));
    assert!(
        !snap
            .tls
            .policies
            .contains_key(&ObjectRef::new("ns", "none"))
    );
    let bad: Vec<_> = snap
        .diagnostics
        .iter()
        .filter(|d| d.name == "bad" && d.field.starts_with("metadata.annotations"))
        .collect();
    assert_eq!(bad.len(), 2, "{:?}", snap.diagnostics);
}

// ---------------------------------------------------------------------------------
// Rotation through the files source and the publisher

fn write_manifests(dir: &Path, objects: Vec<serde_json::Value>) {
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let tmp = dir.join(".next.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list).expect("json")).expect("write");
    std::fs::rename(&tmp, dir.join("objects.json")).expect("rename");
}

fn objects(world: &World) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut push = |v: serde_json::Value, kind: &str, api: &str| {
        let mut v = v;
        v["kind"] = serde_json::json!(kind);
        v["apiVersion"] = serde_json::json!(api);
        out.push(v);
    };
    for i in &world.ingresses {
        push(
            serde_json::to_value(i).expect("json"),
            "Ingress",
            "networking.k8s.io/v1",
        );
    }
    for s in &world.services {
        push(serde_json::to_value(s).expect("json"), "Service", "v1");
    }
    for s in &world.slices {
        push(
            serde_json::to_value(s).expect("json"),
            "EndpointSlice",
            "discovery.k8s.io/v1",
        );
    }
    for s in &world.secrets {
        push(serde_json::to_value(s).expect("json"), "Secret", "v1");
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_through_files_new_handshakes_see_it_open_connections_keep_working() {
    let pki = Pki::new();
    let echo = start_echo("echo").await;
    let base = World::new().backend("ns", "svc", 80, &[echo.addr]).ingress(
        ingress("ns", "rot")
            .host("rot.example")
            .prefix("/", "svc", 80)
            .tls(&["rot.example"], "rot-tls"),
    );
    let v1 = pki.leaf(&["rot.example"]);
    let v2 = pki.leaf(&["rot.example"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let with = |pair: &PemPair| {
        base.clone()
            .secret(tls_secret("ns", "rot-tls", &pair.cert_pem, &pair.key_pem))
    };
    write_manifests(dir.path(), objects(&with(&v1)));

    let (tx, rx) = tokio::sync::watch::channel(None);
    let watcher = tokio::spawn(portcullis::files::watch(vec![dir.path().to_path_buf()], tx));
    let publisher = Arc::new(Publisher::new(Options {
        assume_class: true,
        allow_local_endpoints: true,
        ..Default::default()
    }));
    let publishing = tokio::spawn(publisher.clone().run(rx));
    let snapshots = publisher.snapshots.clone();
    eventually("the first snapshot", async || {
        snapshots.load().generation >= 1
    })
    .await;
    let p = start_tls_on(snapshots.clone(), Snapshot::default(), |s| s).await;

    let trusting = || verifying_client(&pki, &[b"http/1.1"]);
    let open = connect(p.https, Some("rot.example"), trusting()).await;
    assert_eq!(presented(&open), leaf_der(&v1));
    let mut open = h1_on(open).await;
    assert_eq!(send(&mut open, "rot.example", "/").await.0, 200);

    // The Secret is updated: the next handshake presents it.
    write_manifests(dir.path(), objects(&with(&v2)));
    let want = leaf_der(&v2);
    eventually("the rotated certificate is served", async || {
        presented(&connect(p.https, Some("rot.example"), trusting()).await) == want
    })
    .await;
    // The connection opened before keeps working.
    assert_eq!(send(&mut open, "rot.example", "/again").await.0, 200);

    // The Secret turns invalid: the last good certificate stays, with a diagnostic.
    let mut broken = base.clone();
    broken = broken.secret(tls_secret("ns", "rot-tls", &v1.cert_pem, &v2.key_pem));
    let generation = snapshots.load().generation;
    write_manifests(dir.path(), objects(&broken));
    eventually("the broken Secret is seen", async || {
        let s = snapshots.load();
        s.generation > generation
            && s.diagnostics
                .iter()
                .any(|d| d.kind == "Secret" && d.name == "rot-tls")
    })
    .await;
    let stream = connect(p.https, Some("rot.example"), trusting()).await;
    assert_eq!(presented(&stream), want);
    assert_eq!(
        send(&mut h1_on(stream).await, "rot.example", "/").await.0,
        200
    );
    assert_eq!(send(&mut open, "rot.example", "/still").await.0, 200);

    watcher.abort();
    publishing.abort();
}

// ---------------------------------------------------------------------------------
// Draining and shutdown

#[tokio::test(flavor = "multi_thread")]
async fn https_connections_drain_and_a_stalled_handshake_does_not_hold_up_shutdown() {
    let f = fixture().await;
    // A handshake timeout far beyond the test: only shutdown can end the stalled one.
    let p = start_tls(f.world.snapshot(), |s| TlsSettings {
        handshake_timeout: Duration::from_secs(600),
        ..s
    })
    .await;

    // Before draining: a keep-alive HTTP/1.1 connection and an HTTP/2 one over TLS, and
    // a client that connects and never sends its ClientHello.
    let mut h1 =
        h1_on(connect(p.https, Some("a.example"), capturing_client(&[b"http/1.1"])).await).await;
    let (status, headers, _) = send(&mut h1, "a.example", "/").await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("connection"), "{headers:?}");
    let h2_tls = connect(p.https, Some("a.example"), capturing_client(&[b"h2"])).await;
    let (mut h2, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(h2_tls),
    )
    .await
    .expect("h2 handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let mut stalled = TcpStream::connect(p.https).await.expect("connect");

    // Draining: the idle keep-alive connection that carried a request is closed; HTTPS
    // keeps accepting, HTTP/1 answers say Connection: close, and an HTTP/2 connection
    // gets GOAWAY once it has carried a request.
    p.proxy.start_draining();
    eventually("the idle HTTP/1.1 connection is closed", async || {
        h1.is_closed()
    })
    .await;
    let (status, headers, _) = tls_get(p.https, Some("a.example"), "a.example", "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["connection"], "close");
    let req = http::Request::get("https://a.example/")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = h2.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("h2 body");
    tokio::time::timeout(EVENTUALLY, h2_conn)
        .await
        .expect("GOAWAY closes the h2 connection")
        .expect("join")
        .expect("clean h2 shutdown");

    // Shutdown: the handshake in progress is abandoned at once.
    let stopped = tokio::time::Instant::now();
    p.stop.stop();
    read_until_closed(&mut stalled).await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        stopped.elapsed()
    );
}

// ---------------------------------------------------------------------------------
// Hostile and broken clients

/// Reads until the peer closes (or resets) the connection; must happen in time.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(EVENTUALLY, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the proxy closes the connection in time");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_clients_fail_cleanly_and_are_counted() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| TlsSettings {
        handshake_timeout: Duration::from_millis(300),
        ..s
    })
    .await;

    // Plain HTTP on the TLS port: a short 400 that says so.
    let answer = raw(p.https, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("this port speaks TLS"), "{answer}");

    // Binary garbage that is not TLS either.
    let mut s = TcpStream::connect(p.https).await.expect("connect");
    s.write_all(&[0x00, 0xff, 0x13, 0x37]).await.expect("write");
    read_until_closed(&mut s).await;

    // A truncated ClientHello, then the client goes away.
    let mut s = TcpStream::connect(p.https).await.expect("connect");
    s.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x01,
    ])
    .await
    .expect("write");
    s.shutdown().await.expect("shutdown");
    read_until_closed(&mut s).await;

    // A truncated ClientHello, then nothing: the handshake timeout closes it.
    let mut s = TcpStream::connect(p.https).await.expect("connect");
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .expect("write");
    read_until_closed(&mut s).await;

    // A client that connects and sends nothing.
    let mut s = TcpStream::connect(p.https).await.expect("connect");
    read_until_closed(&mut s).await;

    // TLS 1.0 and 1.1 only.
    for flag in ["-tls1", "-tls1_1"] {
        let addr = p.https.to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("openssl")
                .args([
                    "s_client",
                    flag,
                    "-connect",
                    &addr,
                    "-servername",
                    "a.example",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run openssl")
        })
        .await
        .expect("openssl");
        assert!(!out.status.success(), "openssl {flag} must fail");
    }

    // An unknown SNI is not an error: the default certificate.
    assert_eq!(
        presented_for(p.https, Some("nobody.example")).await,
        p.generated_default
    );

    eventually("every failure is counted by its reason", async || {
        p.errors("not_tls") == 2
            && p.errors("eof") == 1
            && p.errors("timeout") == 2
            && p.errors("protocol_version") == 2
    })
    .await;
    let text = p.metrics.render();
    assert!(
        text.contains("portcullis_tls_handshake_errors_total{reason=\"timeout\"} 2"),
        "{text}"
    );

    // The listener keeps serving others.
    let client = reqwest_tls(&f.pki, &[b"h2", b"http/1.1"], "a.example", p.https);
    let resp = client
        .get(format!("https://a.example:{}/", p.https.port()))
        .send()
        .await
        .expect("a good client is served");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        p.errors("other") + p.errors("incompatible") + p.errors("bad_message"),
        0
    );
}

#[tokio::test]
async fn openssl_s_client_sees_the_sni_certificate_and_alpn() {
    let f = fixture().await;
    let p = start_tls(f.world.snapshot(), |s| s).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &f.pki.ca.cert_pem).expect("write CA");
    let addr = p.https.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr,
                "-servername",
                "b.example",
                "-alpn",
                "h2,http/1.1",
                "-CAfile",
            ])
            .arg(&ca)
            .arg("-verify_return_error")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl")
    })
    .await
    .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("CN = b.example") || text.contains("CN=b.example"),
        "{text}"
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
}

// ---------------------------------------------------------------------------------
// Metrics

#[tokio::test]
async fn certificate_expiry_follows_the_snapshot() {
    let f = fixture().await;
    let snap = f.world.snapshot();
    let a_expiry = snap.tls.certs[&ObjectRef::new("ns", "a-tls")].not_after;
    let m = Metrics::new();
    m.observe_snapshot(&snap, 0.001);
    assert_eq!(
        m.certificate_expiry_timestamp_seconds
            .with_label_values(&["ns", "a-tls"])
            .get(),
        a_expiry
    );
    let text = m.render();
    assert!(
        text.contains(
            "portcullis_certificate_expiry_timestamp_seconds{namespace=\"ns\",secret=\"w-tls\"}"
        ),
        "{text}"
    );
    assert!(!text.contains("missing-tls"));
    // A Secret that goes away disappears from the metric.
    m.observe_snapshot(&Snapshot::default(), 0.001);
    assert!(!m.render().contains("a-tls"));
}

// ---------------------------------------------------------------------------------
// portcullis certs

#[test]
fn certs_command_makes_a_ca_once_and_leaves_that_verify() {
    portcullis::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let run = |hosts: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["certs", "--hosts", hosts, "--out"])
            .arg(&out)
            .output()
            .expect("run portcullis certs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = run("a.localhost,b.localhost");
    assert!(first.contains("Created the development CA"), "{first}");
    assert!(first.contains("kubectl create secret tls"), "{first}");
    let ca_pem = std::fs::read_to_string(out.join("ca.pem")).expect("ca.pem");
    let second = run("c.localhost");
    assert!(second.contains("Reusing the development CA"), "{second}");
    assert_eq!(
        std::fs::read_to_string(out.join("ca.pem")).expect("ca.pem"),
        ca_pem
    );

    #[cfg(unix)]
    for key in ["ca-key.pem", "a.localhost-key.pem", "c.localhost-key.pem"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(out.join(key))
            .expect(key)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }

    // Both leaves chain to the one CA, for their hosts.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA"))
        .expect("add CA");
    use rustls::client::danger::ServerCertVerifier as _;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        portcullis::tls::provider(),
    )
    .build()
    .expect("verifier");
    for (file, host) in [
        ("a.localhost.pem", "b.localhost"),
        ("c.localhost.pem", "c.localhost"),
    ] {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(out.join(file))
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("chain");
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(host).expect("name"),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{file} for {host}: {e}"));
    }

    // The Secret manifest loads as a usable kubernetes.io/tls Secret.
    let loaded =
        portcullis::files::load(&[out.join("a.localhost-secret.yaml")]).expect("secret yaml");
    assert_eq!(loaded.inputs.secrets.len(), 1);
    let entry = portcullis::k8s::translate::parse_tls_secret(&loaded.inputs.secrets[0])
        .expect("usable Secret");
    assert_eq!(entry.dns_names, vec!["a.localhost", "b.localhost"]);
}
