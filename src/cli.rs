//! Command-line options. Every flag of `run` also reads an environment variable:
//! `PORTCULLIS_` + the flag name in capitals with `-` → `_` (repeatable flags take a
//! comma-separated list there).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::accesslog::AccessLogFormat;
use crate::k8s::Options;
use crate::k8s::translate::ServiceRef;
use crate::model::ObjectRef;
use crate::proxy::LoadBalance;

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A Kubernetes ingress controller and reverse proxy",
    long_about = "A Kubernetes ingress controller and reverse proxy.\n\n\
        With no subcommand, `run` is assumed: `portcullis --manifests examples/basic` serves \
        the Ingresses in those files. Try `portcullis demo` for a built-in example.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Box<RunArgs>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: from --manifests files, or from the Kubernetes API when --manifests is absent.
    Run(Box<RunArgs>),
    /// Print the diagnostics and a summary of what the manifests would serve.
    ///
    /// Exit status: 0 fine or warnings only, 1 at least one error, 2 usage or I/O error.
    Check(CheckArgs),
    /// Explain which rule a request to URL would take, and why.
    ///
    /// As with curl, -X sets the method and -H adds a header: Gateway API routes may
    /// match on them and on the URL's query, so
    /// `explain --manifests DIR -X POST -H 'x-canary: yes' 'http://shop.example/cart?v=2'`
    /// shows the HTTPRoute rule that request takes, its filters and its weighted backends.
    ///
    /// Exit status: 0 explained (routed or not), 2 usage or I/O error.
    Explain(ExplainArgs),
    /// A test upstream: answers every request with JSON describing it.
    Echo(EchoArgs),
    /// A built-in example: echo upstreams and embedded manifests, no cluster needed.
    Demo(DemoArgs),
    /// Local development certificates: a CA (created once, then reused) and a leaf
    /// certificate for the given hosts.
    Certs(CertsArgs),
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Host names the certificate covers (comma-separated; `*.` wildcards allowed). Files
    /// are named after the first.
    #[arg(long, value_name = "H1,H2", value_delimiter = ',', required = true)]
    pub hosts: Vec<String>,
    /// Folder for ca.pem, ca-key.pem, HOST.pem, HOST-key.pem and HOST-secret.yaml.
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub out: PathBuf,
}

/// Where objects come from and how they are translated (shared by run, check, explain).
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Files or folders of YAML/JSON Kubernetes objects (repeatable). Without it, `run`
    /// reads the Kubernetes API.
    #[arg(
        long = "manifests",
        value_name = "PATH",
        env = "PORTCULLIS_MANIFESTS",
        value_delimiter = ','
    )]
    pub manifests: Vec<PathBuf>,
    /// `spec.controller` of the IngressClasses we serve.
    #[arg(
        long,
        env = "PORTCULLIS_CONTROLLER_NAME",
        default_value = "portcullis.io/ingress-controller"
    )]
    pub controller_name: String,
    /// Value of the legacy `kubernetes.io/ingress.class` annotation we serve; in file mode
    /// also the class assumed (ours, default) when the files define none of ours.
    #[arg(long, env = "PORTCULLIS_INGRESS_CLASS", default_value = "portcullis")]
    pub ingress_class: String,
    /// Serve Ingresses that name no class even when no class of ours is the default.
    #[arg(long, env = "PORTCULLIS_WATCH_INGRESS_WITHOUT_CLASS")]
    pub watch_ingress_without_class: bool,
    /// Answers what no rule matches: NAMESPACE/NAME:PORT (port number or name).
    #[arg(
        long,
        value_name = "NS/NAME:PORT",
        env = "PORTCULLIS_DEFAULT_BACKEND_SERVICE"
    )]
    pub default_backend_service: Option<ServiceRef>,
    /// Certificate for names no TLS host covers: a kubernetes.io/tls Secret NAMESPACE/NAME.
    /// Default (or when the Secret is missing or invalid): a self-signed certificate
    /// generated at startup.
    #[arg(
        long,
        value_name = "NS/NAME",
        env = "PORTCULLIS_DEFAULT_SSL_CERTIFICATE",
        value_parser = parse_object_ref
    )]
    pub default_ssl_certificate: Option<ObjectRef>,
    /// `spec.controllerName` of the Gateway API GatewayClasses we serve. In file mode a
    /// GatewayClass `portcullis` of ours is assumed when the files define none of ours.
    #[arg(
        long,
        env = "PORTCULLIS_GATEWAY_CONTROLLER_NAME",
        default_value = "portcullis.io/gateway-controller"
    )]
    pub gateway_controller_name: String,
    /// The Gateway listener port served on the HTTP listener: a Gateway listener of
    /// protocol HTTP on this port is served; other ports are not programmed.
    #[arg(
        long,
        value_name = "PORT",
        env = "PORTCULLIS_GATEWAY_HTTP_PORT",
        default_value_t = 80
    )]
    pub gateway_http_port: u16,
    /// The Gateway listener port served on the HTTPS listener (protocol HTTPS).
    #[arg(
        long,
        value_name = "PORT",
        env = "PORTCULLIS_GATEWAY_HTTPS_PORT",
        default_value_t = 443
    )]
    pub gateway_https_port: u16,
}

impl SourceArgs {
    /// Translation options for file mode: an IngressClass of ours is assumed when the
    /// files define none, and loopback endpoints are allowed (local development).
    pub fn file_options(&self, own_addresses: Vec<SocketAddr>) -> Options {
        Options {
            controller_name: self.controller_name.clone(),
            ingress_class: self.ingress_class.clone(),
            watch_without_class: self.watch_ingress_without_class,
            default_backend_service: self.default_backend_service.clone(),
            assume_class: true,
            allow_local_endpoints: true,
            own_addresses,
            default_ssl_certificate: self.default_ssl_certificate.clone(),
            normalize_paths: true,
            gateway_controller_name: self.gateway_controller_name.clone(),
            gateway_http_port: self.gateway_http_port,
            gateway_https_port: self.gateway_https_port,
        }
    }

    /// Translation options for Kubernetes mode: endpoints on loopback, link-local and
    /// unspecified addresses, and at our own listeners, are refused.
    pub fn kube_options(&self, own_addresses: Vec<SocketAddr>) -> Options {
        Options {
            assume_class: false,
            allow_local_endpoints: false,
            ..self.file_options(own_addresses)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// The request method, as curl's -X. Gateway API routes may match on it (an
    /// HTTPRoute `method` match); Ingress rules never do.
    #[arg(
        short = 'X',
        long = "request",
        value_name = "METHOD",
        default_value = "GET",
        value_parser = parse_method
    )]
    pub method: http::Method,
    /// A request header 'Name: value', as curl's -H (repeatable). Gateway API routes may
    /// match on headers; Ingress rules never do. The host is the URL's, not a Host header.
    #[arg(
        short = 'H',
        long = "header",
        value_name = "NAME: VALUE",
        value_parser = parse_header
    )]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The request, such as http://foo.example.com/aaa/bbb?x=1 (the scheme may be
    /// omitted). The query takes part in Gateway API query parameter matches.
    pub url: String,
}

/// An HTTP method token, such as `GET` or `POST` (case is kept: methods are
/// case-sensitive).
fn parse_method(s: &str) -> Result<http::Method, String> {
    http::Method::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not an HTTP method"))
}

/// A header as curl's `-H` takes it: `Name: value` (the value's surrounding whitespace
/// trimmed; `Name:` alone is an empty value).
fn parse_header(s: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not a header: write 'Name: value'"))?;
    let name = http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("`{}` is not a header name", name.trim()))?;
    let value = http::HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of header {name} is not a valid header value"))?;
    Ok((name, value))
}

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Address to listen on, such as 127.0.0.1:9000.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Name reported in every answer.
    #[arg(long, default_value = "echo")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Print the demo's embedded manifests (with placeholder ports) and exit.
    #[arg(long)]
    pub print_manifests: bool,
}

/// `--load-balance`: the values of [`LoadBalance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadBalanceArg {
    P2c,
    RoundRobin,
}

impl From<LoadBalanceArg> for LoadBalance {
    fn from(arg: LoadBalanceArg) -> LoadBalance {
        match arg {
            LoadBalanceArg::P2c => LoadBalance::P2c,
            LoadBalanceArg::RoundRobin => LoadBalance::RoundRobin,
        }
    }
}

/// `--access-log`: the values of [`AccessLogFormat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessLogArg {
    Off,
    Json,
    Text,
}

impl From<AccessLogArg> for AccessLogFormat {
    fn from(arg: AccessLogArg) -> AccessLogFormat {
        match arg {
            AccessLogArg::Off => AccessLogFormat::Off,
            AccessLogArg::Json => AccessLogFormat::Json,
            AccessLogArg::Text => AccessLogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Listener addresses.
#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// Plain HTTP listener (HTTP/1.1 and HTTP/2 prior knowledge).
    #[arg(long, env = "PORTCULLIS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// TLS listener (TLS 1.2 and 1.3; HTTP/2 or HTTP/1.1 by ALPN).
    #[arg(long, env = "PORTCULLIS_HTTPS_ADDR", default_value = "127.0.0.1:8443")]
    pub https_addr: SocketAddr,
    /// Admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "PORTCULLIS_ADMIN_ADDR", default_value = "127.0.0.1:10254")]
    pub admin_addr: SocketAddr,
    /// Dashboard listener: the live dashboard at /, its JSON API at /api/v1/state, and
    /// /debug/snapshot. Keep it on loopback (requests must name it by IP or localhost).
    #[arg(
        long,
        env = "PORTCULLIS_DASHBOARD_ADDR",
        default_value = "127.0.0.1:10255"
    )]
    pub dashboard_addr: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Kubeconfig file for Kubernetes mode. Default: in-cluster configuration, then
    /// `KUBECONFIG` or ~/.kube/config.
    #[arg(long, value_name = "PATH", env = "PORTCULLIS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, value_name = "NAME", env = "PORTCULLIS_CONTEXT")]
    pub context: Option<String>,
    /// Namespace to watch (repeatable); all namespaces when not set.
    #[arg(
        long = "watch-namespace",
        value_name = "NS",
        env = "PORTCULLIS_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Limit for connecting to an upstream endpoint.
    #[arg(long, env = "PORTCULLIS_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// Limit for an upstream's response headers.
    #[arg(long, env = "PORTCULLIS_UPSTREAM_RESPONSE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub upstream_response_timeout: Duration,
    /// How long a pooled upstream connection may stay idle; below common backend
    /// keep-alives, such as Node's 5 s.
    #[arg(long, env = "PORTCULLIS_UPSTREAM_IDLE_TIMEOUT", default_value = "4s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// Limit for reading request headers; also closes a connection that sends nothing.
    #[arg(long, env = "PORTCULLIS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// A request body, a response body or an upgraded tunnel (WebSocket) that moves no
    /// byte for this long is aborted: a request body before the response with 408, else
    /// both connections closed (HTTP/1) or the stream reset (HTTP/2). A client that reads
    /// nothing of its response for this long has its connection closed. `0s` turns it off.
    #[arg(long, env = "PORTCULLIS_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,
    /// `on`: route, apply policies to and forward the normalised path (unreserved
    /// percent-escapes decoded, dot segments removed, slashes merged; 400 for a path
    /// climbing above `/`, an encoded `/` or `\`, a NUL, a bad escape, `..;`); rule paths
    /// are normalised alike. `off`: paths as received and as written.
    #[arg(long, value_enum, env = "PORTCULLIS_PATH_NORMALIZATION", default_value_t = OnOff::On)]
    pub path_normalization: OnOff,
    /// Largest request head: HTTP/1 headers and the HTTP/2 header list alike (431
    /// beyond it). Sizes: bytes, or with a unit K, KB, Ki, KiB, M, Mi, G, Gi (any case).
    #[arg(long, env = "PORTCULLIS_MAX_HEADER_SIZE", default_value = "32KiB", value_parser = parse_size)]
    pub max_header_size: u64,
    /// Largest request body (413 beyond it); unlimited when not set. An Ingress'
    /// `portcullis.io/max-body-size` annotation replaces it for that Ingress' routes.
    #[arg(long, env = "PORTCULLIS_MAX_BODY_SIZE", value_parser = parse_size)]
    pub max_body_size: Option<u64>,
    /// Refuse downstream connections beyond this many, counted across the HTTP and HTTPS
    /// listeners (closed at once, before any byte is read); unlimited when not set.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How a cluster's endpoints share requests: `p2c` (the less busy of two random
    /// endpoints, by requests in flight) or `round-robin`.
    #[arg(long, value_enum, env = "PORTCULLIS_LOAD_BALANCE", default_value_t = LoadBalanceArg::P2c)]
    pub load_balance: LoadBalanceArg,
    /// After SIGTERM/SIGINT: keep accepting this long with readiness failing, while
    /// clients are told to reconnect (HTTP/1 `Connection: close`, HTTP/2 GOAWAY).
    #[arg(long, env = "PORTCULLIS_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Then: how long in-flight requests and open upgrades (WebSocket) get to finish.
    #[arg(long, env = "PORTCULLIS_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Limit for a downstream TLS handshake; also closes a TLS connection that sends nothing.
    #[arg(long, env = "PORTCULLIS_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Redirect (308) plain HTTP requests for hosts with a `tls` entry to HTTPS. An Ingress
    /// opts out with the annotation portcullis.io/ssl-redirect: "false" (and, without this
    /// flag, in with "true").
    #[arg(long, env = "PORTCULLIS_SSL_REDIRECT")]
    pub ssl_redirect: bool,
    /// Port put in redirect URLs (omitted when 443). Default: the HTTPS listener's port.
    #[arg(long, value_name = "PORT", env = "PORTCULLIS_HTTPS_REDIRECT_PORT")]
    pub https_redirect_port: Option<u16>,
    /// Strict-Transport-Security value on TLS responses, such as `max-age=31536000`; off
    /// by default. An Ingress sets its own with the annotation portcullis.io/hsts.
    #[arg(long, value_name = "VALUE", env = "PORTCULLIS_HSTS", value_parser = parse_header_value)]
    pub hsts: Option<http::HeaderValue>,
    /// Access log on standard output, one line per request: `text` (logfmt key=value
    /// pairs), `json` (one object per line) or `off`.
    #[arg(long, value_enum, env = "PORTCULLIS_ACCESS_LOG", default_value_t = AccessLogArg::Text)]
    pub access_log: AccessLogArg,
    /// Log format.
    #[arg(long, value_enum, env = "PORTCULLIS_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub status: StatusArgs,
}

/// A switch written `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

/// Ingress status and leader election (Kubernetes mode only).
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Copy the load balancer addresses of this Service (NAMESPACE/NAME, usually the
    /// LoadBalancer Service in front of Portcullis) into the status of our Ingresses.
    #[arg(
        long,
        value_name = "NS/NAME",
        env = "PORTCULLIS_PUBLISH_SERVICE",
        value_parser = crate::k8s::status::parse_service_ref,
        conflicts_with = "publish_status_address"
    )]
    pub publish_service: Option<crate::model::ObjectRef>,
    /// Write these addresses (IPs or DNS names; repeatable) into the status of our
    /// Ingresses.
    #[arg(
        long,
        value_name = "ADDR",
        env = "PORTCULLIS_PUBLISH_STATUS_ADDRESS",
        value_delimiter = ','
    )]
    pub publish_status_address: Vec<crate::k8s::status::StatusAddress>,
    /// Name of the Lease that elects the one replica writing Ingress status, in the
    /// pod's namespace (`POD_NAMESPACE`), else the kubeconfig context's namespace, else
    /// `default`.
    #[arg(
        long,
        value_name = "NAME",
        env = "PORTCULLIS_ELECTION_ID",
        default_value = crate::k8s::leader::DEFAULT_LEASE_NAME
    )]
    pub election_id: String,
    /// Lease duration of the leader election; renewals every third of it (for tests).
    #[arg(
        long,
        env = "PORTCULLIS_ELECTION_LEASE_DURATION",
        default_value = "15s",
        value_parser = parse_duration,
        hide = true
    )]
    pub election_lease_duration: Duration,
}

impl StatusArgs {
    /// The Ingress status settings these flags ask for, with the Lease in
    /// `lease_namespace`; `None` when status is not written.
    pub fn settings(&self, lease_namespace: String) -> Option<crate::k8s::status::StatusSettings> {
        Some(crate::k8s::status::StatusSettings {
            source: self.source()?,
            lease: crate::k8s::leader::LeaseSettings::new(
                lease_namespace,
                self.election_id.clone(),
                self.election_lease_duration,
            ),
        })
    }

    /// Where Ingress status addresses come from; `None` when status is not written.
    pub fn source(&self) -> Option<crate::k8s::status::StatusSource> {
        use crate::k8s::status::StatusSource;
        match (
            &self.publish_service,
            self.publish_status_address.is_empty(),
        ) {
            (Some(svc), _) => Some(StatusSource::Service(svc.clone())),
            (None, false) => Some(StatusSource::Addresses(self.publish_status_address.clone())),
            (None, true) => None,
        }
    }
}

/// Parses `namespace/name`.
pub fn parse_object_ref(s: &str) -> Result<ObjectRef, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ObjectRef::new(ns, name))
        }
        _ => Err(format!("`{s}` is not NAMESPACE/NAME")),
    }
}

/// Parses a header value: visible ASCII and spaces.
pub fn parse_header_value(s: &str) -> Result<http::HeaderValue, String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("`{s}` is not a usable header value"));
    }
    http::HeaderValue::from_str(s).map_err(|e| format!("`{s}`: {e}"))
}

/// The longest duration any flag accepts: 365 days. Every duration flag becomes a
/// deadline (`Instant` + duration) somewhere, and a bound this size keeps that sum far
/// from overflowing on every platform.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Parses a duration written with a unit: `500ms`, `10s`, `2m`; at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}`: {e} (write it with a unit: 500ms, 10s, 2m)"))?;
    if d > MAX_DURATION {
        return Err(format!("`{s}` is longer than the maximum of 365d"));
    }
    Ok(d)
}

/// Parses a size: see [`crate::model::size`] for the grammar (`1048576`, `512k`, `32KiB`,
/// `10MiB`, case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    crate::model::size::parse_size(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("32KiB"), Ok(32 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2 MB"), Ok(2_000_000));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5XB").is_err());
    }

    #[test]
    fn data_path_flags_reach_the_proxy_config() {
        let cli = Cli::try_parse_from([
            "portcullis",
            "run",
            "--load-balance",
            "round-robin",
            "--shutdown-delay",
            "250ms",
            "--shutdown-grace",
            "2m",
            "--access-log",
            "json",
        ])
        .expect("valid flags");
        let Some(Command::Run(args)) = cli.command else {
            panic!("run subcommand");
        };
        let cfg = args.proxy_config();
        assert_eq!(cfg.load_balance, LoadBalance::RoundRobin);
        assert_eq!(cfg.access_log, AccessLogFormat::Json);
        assert_eq!(cfg.shutdown_delay, Duration::from_millis(250));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(120));
        let defaults = Cli::try_parse_from(["portcullis", "run"]).expect("no flags");
        let Some(Command::Run(args)) = defaults.command else {
            panic!("run subcommand");
        };
        let cfg = args.proxy_config();
        assert_eq!(cfg.load_balance, LoadBalance::P2c);
        assert_eq!(cfg.access_log, AccessLogFormat::Text);
        assert_eq!(cfg.shutdown_delay, Duration::from_secs(5));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("365d"), Ok(MAX_DURATION));
        for absurd in ["366d", "100000000y", "18446744073709551615s"] {
            assert!(parse_duration(absurd).is_err(), "{absurd}");
        }
        assert!(
            std::time::Instant::now()
                .checked_add(MAX_DURATION)
                .is_some()
        );
    }

    #[test]
    fn object_refs_and_header_values_parse() {
        assert_eq!(
            parse_object_ref("kube-system/default-cert"),
            Ok(ObjectRef::new("kube-system", "default-cert"))
        );
        for bad in ["nameonly", "/x", "x/", "a/b/c"] {
            assert!(parse_object_ref(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_header_value(" max-age=31536000; includeSubDomains ")
                .expect("valid")
                .to_str()
                .ok(),
            Some("max-age=31536000; includeSubDomains")
        );
        assert!(parse_header_value("").is_err());
        assert!(parse_header_value("a\u{7}b").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
