//! `portcullis run`, `echo` and `demo`: wire sources, the publisher and the listeners
//! together on one tokio runtime, and stop them on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{AdminState, serve_admin};
use crate::cli::{DemoArgs, EchoArgs, ListenArgs, LogFormat, RunArgs};
use crate::dashboard::{DashboardState, serve_dashboard};
use crate::k8s::watch::{ErrorHook, KubeSettings, RestartHook};
use crate::metrics::Metrics;
use crate::proxy::tls::FallbackLog;
use crate::proxy::{Proxy, ProxyConfig, TlsSettings};
use crate::publish::{Publisher, SourceUpdate};

/// Starts logging to stderr: `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(2)
        })
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        error!(listener = what, %addr, error = %e, "cannot listen");
        eprintln!("error: cannot listen on {addr} ({what}): {e}");
        ExitCode::from(2)
    })
}

impl RunArgs {
    /// The proxy settings these flags ask for.
    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            connect_timeout: self.upstream_connect_timeout,
            response_timeout: self.upstream_response_timeout,
            idle_timeout: self.upstream_idle_timeout,
            header_read_timeout: self.header_read_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            path_normalization: self.path_normalization.is_on(),
            max_header_size: usize::try_from(self.max_header_size).unwrap_or(usize::MAX),
            max_body_size: self.max_body_size,
            max_connections: self.max_connections,
            load_balance: self.load_balance.into(),
            shutdown_delay: self.shutdown_delay,
            shutdown_grace: self.shutdown_grace,
            access_log: self.access_log.into(),
            ..ProxyConfig::default()
        }
    }

    /// The TLS settings these flags ask for, around the certificate generated at startup.
    pub fn tls_settings(&self, generated_default: Arc<crate::model::CertEntry>) -> TlsSettings {
        TlsSettings {
            default_secret: self.source.default_ssl_certificate.clone(),
            handshake_timeout: self.tls_handshake_timeout,
            ssl_redirect: self.ssl_redirect,
            hsts: self.hsts.clone(),
            redirect_port: self.https_redirect_port,
            ..TlsSettings::new(generated_default)
        }
    }
}

/// Generates the self-signed default certificate and logs its fingerprint.
fn generated_default() -> Result<Arc<crate::model::CertEntry>, ExitCode> {
    match crate::certs::generate_default() {
        Ok(c) => {
            crate::proxy::tls::log_generated_default(&c);
            Ok(c)
        }
        Err(e) => {
            eprintln!("error: cannot generate the default certificate: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// The listeners of a running Portcullis, bound.
pub struct Listeners {
    pub http: TcpListener,
    pub https: TcpListener,
    pub admin: TcpListener,
    pub dashboard: TcpListener,
}

impl Listeners {
    pub async fn bind(addrs: &ListenArgs) -> Result<Listeners, ExitCode> {
        Ok(Listeners {
            http: bind("http", addrs.http_addr).await?,
            https: bind("https", addrs.https_addr).await?,
            admin: bind("admin", addrs.admin_addr).await?,
            dashboard: bind("dashboard", addrs.dashboard_addr).await?,
        })
    }

    /// The bound addresses (ports resolved when `:0` was asked for).
    pub fn addrs(&self) -> ListenArgs {
        let addr = |l: &TcpListener| {
            l.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        ListenArgs {
            http_addr: addr(&self.http),
            https_addr: addr(&self.https),
            admin_addr: addr(&self.admin),
            dashboard_addr: addr(&self.dashboard),
        }
    }
}

/// Serves until SIGTERM/SIGINT: the publisher fed by `updates`, and every listener.
///
/// At the signal readiness turns false and the proxy starts draining (HTTP/1 responses
/// carry `Connection: close`, HTTP/2 connections get GOAWAY) while the listeners keep
/// accepting for `shutdown_delay`, so that load balancers notice before connections
/// are refused; a second signal cuts the delay short. Then the listeners close, and
/// in-flight requests and open upgrades get `shutdown_grace` to finish.
pub async fn serve(
    listeners: Listeners,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    proxy_config: ProxyConfig,
    tls: TlsSettings,
    updates: watch::Receiver<Option<Arc<SourceUpdate>>>,
) {
    let publisher = Arc::new(publisher);
    let snapshots = publisher.snapshots.clone();
    let ready = publisher.ready.clone();
    let (stop_tx, stop_rx) = watch::channel(false);

    let publishing = tokio::spawn(publisher.clone().run(updates));
    let delay = proxy_config.shutdown_delay;
    let grace = proxy_config.shutdown_grace;
    let proxy = Proxy::new(proxy_config, snapshots.clone(), metrics.clone());
    if let Err(e) = proxy.enable_tls(tls) {
        error!(error = %e, "cannot set up TLS");
    }
    let mut tasks = tokio::task::JoinSet::new();
    {
        let proxy = proxy.clone();
        let stop = stop_rx.clone();
        tasks.spawn(async move { proxy.serve_http(listeners.http, stop).await });
    }
    {
        let proxy = proxy.clone();
        let stop = stop_rx.clone();
        tasks.spawn(async move { proxy.serve_https(listeners.https, stop).await });
    }
    tasks.spawn(serve_admin(
        listeners.admin,
        AdminState {
            snapshots: snapshots.clone(),
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        stop_rx.clone(),
    ));
    tasks.spawn(serve_dashboard(
        listeners.dashboard,
        DashboardState {
            snapshots,
            metrics: metrics.clone(),
            proxy: proxy.clone(),
        },
        stop_rx.clone(),
    ));

    shutdown_signal().await;
    info!(
        delay_seconds = delay.as_secs_f64(),
        grace_seconds = grace.as_secs_f64(),
        "shutting down: readiness fails; still accepting for the shutdown delay"
    );
    ready.store(false, Ordering::Release);
    proxy.start_draining();
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown_signal() => info!("second signal: shutdown delay cut short"),
    }
    info!("listeners closed; in-flight work gets the shutdown grace");
    let _ = stop_tx.send(true);
    publishing.abort();
    let drained = tokio::time::timeout(grace, async {
        while tasks.join_next().await.is_some() {}
        proxy.tunnels_closed().await;
    })
    .await;
    if drained.is_err() {
        warn!("shutdown grace over with work still in flight; closing it");
    }
    info!("stopped");
}

/// Resolves at SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn new_publisher(options: crate::k8s::Options, metrics: &Arc<Metrics>) -> Publisher {
    let mut publisher = Publisher::new(options);
    let m = metrics.clone();
    publisher.on_publish(Box::new(move |snap, took| {
        m.observe_snapshot(snap, took.as_secs_f64())
    }));
    let fallbacks = FallbackLog::default();
    publisher.on_publish(Box::new(move |snap, _| fallbacks.observe(snap)));
    publisher
}

/// Addresses that are Portcullis itself: the listeners, and each listener's port on the
/// pod's own address (`POD_IP`, set from the downward API in the cluster manifests).
fn own_addresses(listen: &ListenArgs) -> Vec<SocketAddr> {
    let mut own = vec![
        listen.http_addr,
        listen.https_addr,
        listen.admin_addr,
        listen.dashboard_addr,
    ];
    if let Some(ip) = std::env::var("POD_IP").ok().and_then(|s| s.parse().ok()) {
        own.extend(own.clone().iter().map(|a| SocketAddr::new(ip, a.port())));
    }
    own
}

/// `portcullis run`: from `--manifests` files, or from the Kubernetes API without them.
pub fn main(args: RunArgs) -> ExitCode {
    init_logging(args.log_format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let metrics = Metrics::new();
        let (tx, rx) = watch::channel(None);
        let own = own_addresses(&args.listen);
        // Kubernetes mode: the client and the source's objects, for Ingress status.
        let mut kube = None;
        let options = if args.source.manifests.is_empty() {
            let settings = KubeSettings {
                kubeconfig: args.kubeconfig.clone(),
                context: args.context.clone(),
                namespaces: args.watch_namespaces.clone(),
            };
            let client = match crate::k8s::watch::client(&settings).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let m = metrics.clone();
            let on_error: ErrorHook = Arc::new(move |kind| m.kube_watch_error(kind));
            let m = metrics.clone();
            let on_restart: RestartHook = Arc::new(move |kind| m.kube_watch_restart(kind));
            kube = Some((client.clone(), tx.subscribe()));
            tokio::spawn(crate::k8s::watch::run_observed(
                client, settings, tx, on_error, on_restart,
            ));
            args.source.kube_options(own)
        } else {
            // Files that cannot be read at all are a usage error; files that do not
            // parse are logged and watched until they do.
            if let Err(e) = crate::files::manifest_files(&args.source.manifests) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            if args.status.source().is_some() {
                tracing::warn!("--publish-service and --publish-status-address apply in Kubernetes mode only; ignored with --manifests");
            }
            let paths = args.source.manifests.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::files::watch(paths, tx).await {
                    error!(error = %e, "cannot watch the manifest files; changes will not be seen");
                }
            });
            args.source.file_options(own)
        };
        let options = crate::k8s::Options {
            normalize_paths: args.path_normalization.is_on(),
            ..options
        };
        let listeners = match Listeners::bind(&args.listen).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let tls = match generated_default() {
            Ok(c) => args.tls_settings(c),
            Err(code) => return code,
        };
        // ExternalName answers are held to the rules translation applies to endpoints.
        let proxy_config = ProxyConfig {
            endpoint_policy: options.endpoint_policy(),
            ..args.proxy_config()
        };
        let mut publisher = new_publisher(options, &metrics);
        if kube.is_none() {
            // The manifest files are debounced where they are read (files::RELOAD_DEBOUNCE).
            publisher.debounce = Duration::ZERO;
        }
        let elector = kube.and_then(|(client, sources)| {
            let namespace = crate::k8s::leader::lease_namespace(
                std::env::var("POD_NAMESPACE").ok().as_deref(),
                client.default_namespace(),
            );
            let settings = args.status.settings(namespace)?;
            Some(crate::k8s::status::start(
                client,
                settings,
                &metrics,
                &mut publisher,
                sources,
                shutdown_signal(),
            ))
        });
        let bound = listeners.addrs();
        info!(
            http = %bound.http_addr,
            https = %bound.https_addr,
            admin = %bound.admin_addr,
            dashboard = %bound.dashboard_addr,
            source = if args.source.manifests.is_empty() { "kubernetes" } else { "files" },
            "portcullis listening"
        );
        serve(listeners, publisher, metrics, proxy_config, tls, rx).await;
        if let Some(elector) = elector {
            elector.stop().await;
        }
        ExitCode::SUCCESS
    })
}

/// `portcullis echo`.
pub fn echo(args: EchoArgs) -> ExitCode {
    init_logging(LogFormat::Text);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let listener = match bind("echo", args.listen).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        info!(addr = %args.listen, name = %args.name, "echo upstream listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(crate::echo::serve(listener, args.name, stop_rx));
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        ExitCode::SUCCESS
    })
}

/// The demo's embedded manifests, with `${…_PORT}` placeholders.
pub const DEMO_MANIFESTS: &str = include_str!("demo/manifests.yaml");

/// Starts the demo's echo upstreams on loopback and returns them with the manifests
/// filled in with their ports. The upstreams stop when `stop` turns true.
pub async fn start_demo_upstreams(
    stop: watch::Receiver<bool>,
) -> std::io::Result<(String, Vec<(String, SocketAddr)>)> {
    let mut manifests = DEMO_MANIFESTS.to_string();
    let mut upstreams = Vec::new();
    for (name, placeholder) in [
        ("web-1", "${WEB_1_PORT}"),
        ("web-2", "${WEB_2_PORT}"),
        ("api-1", "${API_1_PORT}"),
        ("stable-1", "${STABLE_1_PORT}"),
        ("canary-1", "${CANARY_1_PORT}"),
    ] {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        manifests = manifests.replace(placeholder, &addr.port().to_string());
        tokio::spawn(crate::echo::serve(listener, name.to_string(), stop.clone()));
        upstreams.push((name.to_string(), addr));
    }
    Ok((manifests, upstreams))
}

/// The demo's TLS material: a CA written to a temporary folder (for `curl --cacert`) and
/// the `demo/demo-tls` Secret its Ingress names, for demo.localhost and api.localhost. The
/// folder is removed on drop.
struct DemoTls {
    dir: std::path::PathBuf,
    ca_path: std::path::PathBuf,
    secret: k8s_openapi::api::core::v1::Secret,
}

impl DemoTls {
    fn create() -> Result<DemoTls, String> {
        let ca = crate::certs::DevCa::generate("Portcullis demo CA").map_err(|e| e.to_string())?;
        let pair = ca
            .issue(&["demo.localhost".into(), "api.localhost".into()], 30)
            .map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, &ca.cert_pem)
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        let secret = k8s_openapi::api::core::v1::Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                namespace: Some("demo".into()),
                name: Some("demo-tls".into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            string_data: Some(
                [("tls.crt", pair.cert_pem), ("tls.key", pair.key_pem)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
            ..Default::default()
        };
        Ok(DemoTls {
            dir,
            ca_path,
            secret,
        })
    }
}

impl Drop for DemoTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `portcullis demo`.
pub fn demo(args: DemoArgs) -> ExitCode {
    if args.print_manifests {
        print!("{DEMO_MANIFESTS}");
        return ExitCode::SUCCESS;
    }
    init_logging(LogFormat::Text);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let listeners = match Listeners::bind(&args.listen).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let (_upstreams_stop, upstreams_stop_rx) = watch::channel(false);
        let (manifests, upstreams) = match start_demo_upstreams(upstreams_stop_rx).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: cannot start the demo upstreams: {e}");
                return ExitCode::from(2);
            }
        };
        let mut loaded = match crate::files::load_str("demo/manifests.yaml", &manifests) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: the embedded demo manifests do not load: {e}");
                return ExitCode::from(2);
            }
        };
        let demo_tls = match DemoTls::create() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot make the demo's certificates: {e}");
                return ExitCode::from(2);
            }
        };
        loaded.inputs.secrets.push(Arc::new(demo_tls.secret.clone()));
        let tls = match generated_default() {
            Ok(c) => TlsSettings::new(c),
            Err(code) => return code,
        };
        let metrics = Metrics::new();
        let options = crate::k8s::Options {
            assume_class: true,
            allow_local_endpoints: true,
            own_addresses: own_addresses(&args.listen),
            ..Default::default()
        };
        let endpoint_policy = options.endpoint_policy();
        let publisher = new_publisher(options, &metrics);
        // Published before the curl lines are printed, so that they work at once.
        publisher.publish(&Arc::new(loaded.into_update()));
        let (_tx, rx) = watch::channel(None);
        let bound = listeners.addrs();
        let http = bound.http_addr;
        let host = match http.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let base = format!("http://{host}:{}", http.port());
        let https = bound.https_addr;
        let https_ip = match https.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let ca = demo_tls.ca_path.display();
        let tls_base = format!(
            "--cacert {ca} --resolve demo.localhost:{port}:{https_ip} https://demo.localhost:{port}",
            port = https.port()
        );
        println!(
            "Portcullis demo: proxy on http://{http} and https://{https}, admin on http://{}, dashboard on http://{}",
            bound.admin_addr, bound.dashboard_addr
        );
        for (name, addr) in &upstreams {
            println!("  upstream {name} (echo) on {addr}");
        }
        println!("\nTry:");
        println!(
            "  curl -s {base}/ -H 'Host: demo.localhost'            # web-1 and web-2 in turn"
        );
        println!("  curl -s {base}/api/users -H 'Host: demo.localhost'   # path split: api-1");
        println!("  curl -s {base}/ -H 'Host: api.localhost'             # second host: api-1");
        println!("  curl -s {base}/ -H 'Host: unknown.example'           # default backend: web");
        println!(
            "  curl -s {base}/ -H 'Host: shop.localhost' -H 'x-canary: yes'   # HTTPRoute header match: canary-1"
        );
        println!(
            "  for i in $(seq 20); do curl -s {base}/ -H 'Host: shop.localhost' | grep -o '\"name\":\"[a-z0-9-]*\"'; done | sort | uniq -c   # HTTPRoute 90/10 split: about 18 stable-1, 2 canary-1"
        );
        println!("  curl -s {tls_base}/     # HTTPS, certificate from the demo CA");
        println!(
            "  curl -s --http2 -o /dev/null -w '%{{http_version}}\\n' {tls_base}/     # HTTP/2 via ALPN"
        );
        println!(
            "  curl -s http://{}/debug/snapshot            # what is served",
            bound.dashboard_addr
        );
        println!(
            "  curl -s http://{}/metrics                   # Prometheus metrics",
            bound.admin_addr
        );
        println!(
            "  curl -s http://{}/api/v1/state              # the dashboard's live state",
            bound.dashboard_addr
        );
        println!(
            "\nThe live dashboard: open http://{}/ in a browser.",
            bound.dashboard_addr
        );
        println!("The demo's manifests: `portcullis demo --print-manifests`. Ctrl-C stops.");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        // Nothing balances traffic onto the demo, so Ctrl-C need not wait for anyone;
        // round robin makes "web-1 and web-2 in turn" hold line by line.
        let config = ProxyConfig {
            shutdown_delay: Duration::ZERO,
            load_balance: crate::proxy::LoadBalance::RoundRobin,
            endpoint_policy,
            ..ProxyConfig::default()
        };
        serve(listeners, publisher, metrics, config, tls, rx).await;
        drop(demo_tls);
        ExitCode::SUCCESS
    })
}
