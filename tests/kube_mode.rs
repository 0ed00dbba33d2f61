//! Kubernetes mode end to end: the kube-rs reflectors read the test API server, the
//! publisher builds snapshots, and real HTTP requests through the proxy show what is
//! served — initial sync and readiness, add/modify/delete of each kind, relist after
//! 410, the API server gone, endpoint safety, and startup errors of the binary.

#[path = "support/apiserver.rs"]
mod apiserver;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use apiserver::{ApiServer, eventually};
use portcullis::k8s::Options;
use portcullis::k8s::watch::{ErrorHook, KubeSettings, RestartHook};
use portcullis::metrics::Metrics;
use portcullis::model::Snapshot;
use portcullis::proxy::{Proxy, ProxyConfig};
use portcullis::publish::Publisher;
use serde_json::{Value, json};
use support::{Stopper, ingress, service, slice, start_echo};
use tokio::net::TcpListener;
use tokio::sync::watch;

const PATIENCE: Duration = Duration::from_secs(30);

/// A Portcullis wired as `run` wires it in Kubernetes mode, in process.
struct Instance {
    addr: SocketAddr,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    _stop: Stopper,
    _tx_task: tokio::task::JoinHandle<()>,
}

impl Instance {
    async fn start(server: &ApiServer, options: Options) -> Instance {
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
        let mut publisher = Publisher::new(options);
        let m = metrics.clone();
        publisher.on_publish(Box::new(move |s, t| m.observe_snapshot(s, t.as_secs_f64())));
        let publisher = Arc::new(publisher);
        let (tx, rx) = watch::channel(None);
        let m = metrics.clone();
        let on_error: ErrorHook = Arc::new(move |kind| m.kube_watch_error(kind));
        let m = metrics.clone();
        let on_restart: RestartHook = Arc::new(move |kind| m.kube_watch_restart(kind));
        let tx_task = tokio::spawn(portcullis::k8s::watch::run_observed(
            client, settings, tx, on_error, on_restart,
        ));
        tokio::spawn(publisher.clone().run(rx));
        let proxy = Proxy::new(
            ProxyConfig::default(),
            publisher.snapshots.clone(),
            metrics.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = Stopper::new();
        tokio::spawn(async move { proxy.serve_http(listener, stop_rx).await });
        Instance {
            addr,
            publisher,
            metrics,
            _stop: stop,
            _tx_task: tx_task,
        }
    }

    fn ready(&self) -> bool {
        self.publisher.ready.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.publisher.snapshots.load_full()
    }

    /// (status, body) of GET http://host/path through the proxy.
    async fn get(&self, host: &str, path: &str) -> (u16, String) {
        let resp = support::client()
            .get(format!("http://{}{}", self.addr, path))
            .header("host", host)
            .send()
            .await
            .expect("request through the proxy");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// Polls until GET host/path answers `status` with a body containing `needle`.
    async fn eventually_serves(&self, host: &str, path: &str, status: u16, needle: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = (0, String::new());
        while tokio::time::Instant::now() < deadline {
            last = self.get(host, path).await;
            if last.0 == status && last.1.contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{host}{path}: wanted {status} containing {needle:?}, last got {last:?}");
    }
}

/// Kubernetes mode, but allowing loopback endpoints so that in-test upstreams can
/// serve; endpoint safety has its own test with the real defaults.
fn loopback_options() -> Options {
    Options {
        allow_local_endpoints: true,
        ..Options::default()
    }
}

fn class() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "portcullis", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
        "spec": {"controller": "portcullis.io/ingress-controller"},
    })
}

fn apply_backend(server: &ApiServer, ns: &str, name: &str, addrs: &[SocketAddr]) {
    server.apply(service(ns, name, 80));
    for s in slice(ns, name, addrs) {
        server.apply(s);
    }
}

#[tokio::test]
async fn serves_after_initial_sync_and_follows_every_kind() {
    support_init();
    let web = start_echo("web").await;
    let api = start_echo("api").await;
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(
        ingress("shop", "web")
            .host("shop.example")
            .prefix("/", "web", 80)
            .build(),
    );
    apply_backend(&server, "shop", "web", &[web.addr]);

    let portcullis = Instance::start(&server, loopback_options()).await;
    assert!(
        eventually(PATIENCE, || portcullis.ready()).await,
        "ready after the initial sync"
    );
    // Readiness means the first snapshot already has the route.
    assert_eq!(portcullis.snapshot().routes.routes().count(), 1);
    portcullis
        .eventually_serves("shop.example", "/", 200, "\"name\":\"web\"")
        .await;

    // Ingress added.
    server.apply(
        ingress("shop", "api")
            .host("shop.example")
            .prefix("/api", "api", 80)
            .build(),
    );
    portcullis
        .eventually_serves("shop.example", "/api/x", 503, "no endpoints for shop/api")
        .await;
    // Service and EndpointSlice added: the route becomes servable.
    apply_backend(&server, "shop", "api", &[api.addr]);
    portcullis
        .eventually_serves("shop.example", "/api/x", 200, "\"name\":\"api\"")
        .await;

    // Ingress modified: the path moves.
    server.apply(
        ingress("shop", "api")
            .host("shop.example")
            .prefix("/v2", "api", 80)
            .build(),
    );
    portcullis
        .eventually_serves("shop.example", "/v2", 200, "\"name\":\"api\"")
        .await;
    portcullis
        .eventually_serves("shop.example", "/api/x", 200, "\"name\":\"web\"")
        .await;

    // EndpointSlice modified: the web Service now points at the api upstream.
    for s in slice("shop", "web", &[api.addr]) {
        server.apply(s);
    }
    portcullis
        .eventually_serves("shop.example", "/", 200, "\"name\":\"api\"")
        .await;

    // Service deleted: the route stays and answers 503.
    server.delete("services", "shop", "web");
    portcullis
        .eventually_serves("shop.example", "/", 503, "no endpoints for shop/web")
        .await;

    // Ingress deleted: 404.
    server.delete("ingresses", "shop", "api");
    portcullis
        .eventually_serves("shop.example", "/v2", 503, "no endpoints for shop/web")
        .await;
    server.delete("ingresses", "shop", "web");
    portcullis
        .eventually_serves("shop.example", "/v2", 404, "no route for shop.example /v2")
        .await;

    // IngressClass deleted: with no default class of ours, class-less Ingresses are ignored.
    server.apply(
        ingress("shop", "web")
            .host("shop.example")
            .prefix("/", "web", 80)
            .build(),
    );
    apply_backend(&server, "shop", "web", &[web.addr]);
    portcullis
        .eventually_serves("shop.example", "/", 200, "\"name\":\"web\"")
        .await;
    server.delete("ingressclasses", "", "portcullis");
    portcullis
        .eventually_serves("shop.example", "/", 404, "no route")
        .await;
    assert!(
        eventually(PATIENCE, || portcullis
            .snapshot()
            .ignored
            .iter()
            .any(|i| i.name == "web"))
        .await
    );
}

#[tokio::test]
async fn tls_secrets_are_read_with_the_type_field_selector() {
    support_init();
    let server = ApiServer::start().await;
    server.apply(class());
    let mut ing = ingress("shop", "web")
        .host("shop.example")
        .prefix("/", "web", 80)
        .build();
    ing.spec.as_mut().unwrap().tls = Some(vec![k8s_openapi::api::networking::v1::IngressTLS {
        hosts: Some(vec!["shop.example".into()]),
        secret_name: Some("shop-tls".into()),
    }]);
    server.apply(ing);
    // An Opaque Secret of the same name is not listed (field selector type=kubernetes.io/tls).
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"namespace": "shop", "name": "shop-tls"}, "data": {},
    }));
    let portcullis = Instance::start(&server, loopback_options()).await;
    assert!(eventually(PATIENCE, || portcullis.ready()).await);
    let diag = |s: &Snapshot| {
        s.diagnostics
            .iter()
            .any(|d| d.kind == "Secret" && d.name == "shop-tls" && d.reason.contains("not found"))
    };
    assert!(
        diag(&portcullis.snapshot()),
        "{:?}",
        portcullis.snapshot().diagnostics
    );
    assert!(
        server.requests().iter().any(|r| r.resource == "secrets"
            && r.query.contains("fieldSelector=type%3Dkubernetes.io%2Ftls")),
        "secrets listed with the field selector: {:?}",
        server
            .requests()
            .iter()
            .filter(|r| r.resource == "secrets")
            .map(|r| r.query.clone())
            .collect::<Vec<_>>()
    );

    // A valid kubernetes.io/tls Secret appears: its certificate is loaded.
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example".into()]).unwrap();
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": "shop", "name": "shop-tls"},
        "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
    }));
    assert!(
        eventually(PATIENCE, || portcullis
            .snapshot()
            .tls
            .cert_for("shop.example")
            .is_some())
        .await,
        "certificate loaded: {:?}",
        portcullis.snapshot().diagnostics
    );
    // The Secret turns invalid: the last good certificate stays, with a diagnostic.
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": "shop", "name": "shop-tls"},
        "stringData": {"tls.crt": "garbage", "tls.key": "garbage"},
    }));
    assert!(
        eventually(PATIENCE, || {
            let s = portcullis.snapshot();
            s.tls.cert_for("shop.example").is_some()
                && s.diagnostics
                    .iter()
                    .any(|d| d.name == "shop-tls" && d.reason.contains("last good certificate"))
        })
        .await
    );
}

#[tokio::test]
async fn relist_after_410_repairs_a_missed_delete() {
    support_init();
    let web = start_echo("web").await;
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(
        ingress("shop", "a")
            .host("a.example")
            .prefix("/", "web", 80)
            .build(),
    );
    server.apply(
        ingress("shop", "b")
            .host("b.example")
            .prefix("/", "web", 80)
            .build(),
    );
    apply_backend(&server, "shop", "web", &[web.addr]);
    let portcullis = Instance::start(&server, loopback_options()).await;
    assert!(eventually(PATIENCE, || portcullis.ready()).await);
    portcullis
        .eventually_serves("b.example", "/", 200, "web")
        .await;

    // The API server goes away; meanwhile b is deleted and the watch history expires.
    server.stop().await;
    server.delete("ingresses", "shop", "b");
    server.expire_history();
    server.resume().await;
    portcullis
        .eventually_serves("b.example", "/", 404, "no route for b.example")
        .await;
    portcullis
        .eventually_serves("a.example", "/", 200, "web")
        .await;
    assert!(
        server.expired_watches() > 0,
        "the watch was answered 410 and the reflector relisted"
    );
    let restarts: u64 = [
        "Ingress",
        "IngressClass",
        "Service",
        "EndpointSlice",
        "Secret",
    ]
    .iter()
    .map(|k| {
        portcullis
            .metrics
            .kube_watch_restarts_total
            .with_label_values(&[k])
            .get()
    })
    .sum();
    assert!(restarts >= 1, "the relist is counted as a watch restart");
}

#[tokio::test]
async fn losing_the_api_server_keeps_serving_and_stays_ready() {
    support_init();
    let web = start_echo("web").await;
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(
        ingress("shop", "a")
            .host("a.example")
            .prefix("/", "web", 80)
            .build(),
    );
    apply_backend(&server, "shop", "web", &[web.addr]);
    let portcullis = Instance::start(&server, loopback_options()).await;
    assert!(eventually(PATIENCE, || portcullis.ready()).await);
    portcullis
        .eventually_serves("a.example", "/", 200, "web")
        .await;

    server.stop().await;
    server.drop_watches();
    // Watch errors are counted while the routes keep being served.
    let errors = |m: &Metrics| {
        [
            "Ingress",
            "Service",
            "EndpointSlice",
            "Secret",
            "IngressClass",
        ]
        .iter()
        .map(|k| m.kube_watch_errors_total.with_label_values(&[k]).get())
        .sum::<u64>()
    };
    assert!(
        eventually(PATIENCE, || errors(&portcullis.metrics) > 0).await,
        "watch errors counted"
    );
    for _ in 0..5 {
        assert_eq!(portcullis.get("a.example", "/").await.0, 200);
    }
    assert!(
        portcullis.ready(),
        "readiness stays while the last snapshot serves"
    );

    // Back again: changes flow.
    server.resume().await;
    server.delete("ingresses", "shop", "a");
    portcullis
        .eventually_serves("a.example", "/", 404, "no route")
        .await;
}

#[tokio::test]
async fn endpoint_safety_refuses_local_and_own_addresses() {
    support_init();
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(
        ingress("shop", "web")
            .host("loop.example")
            .prefix("/", "loop", 80)
            .host("ext.example")
            .prefix("/", "ext", 80)
            .host("ok.example")
            .prefix("/", "ok", 80)
            .build(),
    );
    let own: SocketAddr = "10.0.0.9:8080".parse().unwrap();
    apply_backend(
        &server,
        "shop",
        "loop",
        &[
            "127.0.0.1:9000".parse().unwrap(),
            "169.254.1.1:9001".parse().unwrap(),
        ],
    );
    apply_backend(
        &server,
        "shop",
        "ok",
        &["10.0.0.5:9000".parse().unwrap(), own],
    );
    server.apply(support::external_name("shop", "ext", "localhost", 80));
    let options = Options {
        own_addresses: vec![own],
        ..Options::default()
    };
    let portcullis = Instance::start(&server, options).await;
    assert!(eventually(PATIENCE, || portcullis.ready()).await);
    let snap = portcullis.snapshot();
    let diags: Vec<String> = snap.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        diags
            .iter()
            .any(|d| d.contains("127.0.0.1:9000") && d.contains("not allowed")),
        "{diags:?}"
    );
    assert!(
        diags.iter().any(|d| d.contains("169.254.1.1:9001")),
        "{diags:?}"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.contains("10.0.0.9:8080") && d.contains("own listeners")),
        "{diags:?}"
    );
    assert!(
        diags
            .iter()
            .any(|d| d.contains("ExternalName") && d.contains("loopback")),
        "{diags:?}"
    );
    // The refused loopback backend answers 503 instead of reaching this machine.
    let (status, body) = portcullis.get("loop.example", "/").await;
    assert_eq!((status, body.as_str()), (503, "no endpoints for shop/loop"));
    let (status, _) = portcullis.get("ext.example", "/").await;
    assert_eq!(status, 503);
    // The safe endpoint is kept.
    let ok = snap
        .clusters
        .iter()
        .find(|c| c.service.name == "ok")
        .expect("ok cluster");
    assert_eq!(
        ok.active_endpoints(),
        &["10.0.0.5:9000".parse::<SocketAddr>().unwrap()]
    );
}

/// `127.1` is a DNS name to translation, but the resolver reads it as 127.0.0.1: the
/// addresses an ExternalName resolves to are checked when connecting, over HTTP/1 and
/// h2c alike, and a name with only refused ones answers 502.
#[tokio::test]
async fn external_name_resolving_only_to_refused_addresses_answers_502() {
    support_init();
    let echo = start_echo("local").await;
    let port = i32::from(echo.addr.port());
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(
        ingress("shop", "web")
            .host("ext.example")
            .prefix("/", "ext", port)
            .host("h2c.example")
            .prefix("/", "h2c", port)
            .build(),
    );
    server.apply(support::external_name("shop", "ext", "127.1", port));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "h2c"},
        "spec": {"type": "ExternalName", "externalName": "127.1",
                 "ports": [{"port": port, "appProtocol": "kubernetes.io/h2c"}]},
    }));
    let portcullis = Instance::start(&server, Options::default()).await;
    for host in ["ext.example", "h2c.example"] {
        portcullis
            .eventually_serves(host, "/", 502, "upstream error: refused address")
            .await;
    }
    let (status, body) = portcullis.get("ext.example", "/").await;
    assert_eq!(
        (status, body.as_str()),
        (502, "upstream error: refused address")
    );
    assert!(
        portcullis
            .snapshot()
            .diagnostics
            .iter()
            .all(|d| d.name != "ext" && d.name != "h2c"),
        "the name itself is acceptable: {:?}",
        portcullis.snapshot().diagnostics
    );
}

#[tokio::test]
async fn watch_namespace_limits_what_is_read() {
    support_init();
    let server = ApiServer::start().await;
    server.apply(class());
    server.apply(
        ingress("shop", "a")
            .host("a.example")
            .prefix("/", "web", 80)
            .build(),
    );
    server.apply(
        ingress("other", "b")
            .host("b.example")
            .prefix("/", "web", 80)
            .build(),
    );
    let client = server.client();
    let publisher = Arc::new(Publisher::new(loopback_options()));
    let (tx, rx) = watch::channel(None);
    let settings = KubeSettings {
        namespaces: vec!["shop".into()],
        ..Default::default()
    };
    tokio::spawn(portcullis::k8s::watch::run(
        client,
        settings,
        tx,
        Arc::new(|_| {}),
    ));
    tokio::spawn(publisher.clone().run(rx));
    assert!(eventually(PATIENCE, || publisher.ready.load(Ordering::Acquire)).await);
    let snap = publisher.snapshots.load_full();
    let ingresses: Vec<String> = snap
        .routes
        .routes()
        .map(|r| r.source.object.to_string())
        .collect();
    assert_eq!(ingresses, ["shop/a"]);
    assert!(
        server
            .requests()
            .iter()
            .filter(|r| r.resource == "ingresses")
            .all(|r| r.namespace.as_deref() == Some("shop"))
    );
}

/// Runs the binary with `args` and every listener on 127.0.0.1:0; its exit code and
/// stderr.
fn portcullis_bin(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .args(support::child::LOOPBACK_LISTENERS)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run portcullis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_kubeconfig_that_does_not_work_is_one_line_and_exit_2() {
    let (code, err) = portcullis_bin(&["run", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("/nonexistent/kubeconfig"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );

    // A kubeconfig whose API server is not there.
    let server = ApiServer::start().await;
    let kubeconfig = server.kubeconfig();
    server.stop().await;
    let path = kubeconfig.path.display().to_string();
    let (code, err) = portcullis_bin(&["run", "--kubeconfig", &path]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: cannot reach the Kubernetes API at http://127.0.0.1:")),
        "{err}"
    );
}

fn support_init() {
    portcullis::tls::install_default_provider();
}
