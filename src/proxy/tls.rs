//! TLS termination: the HTTPS listener's handshake, certificate choice per ClientHello from
//! the snapshot in force, and the TLS rules applied to each request (421, the opt-in
//! HTTPS redirect, HSTS).
//!
//! ```text
//!  accept ► first byte 0x16? (else: not_tls) ► rustls handshake within handshake_timeout
//!    └► ClientHello: one snapshot load ► exact SNI, one-label wildcard, default ► cert
//!  connection: ALPN h2 ► HTTP/2, else HTTP/1.1 ► the same request handler as plain HTTP
//! ```
//!
//! The certificate a connection chose is remembered by identity ([`CertId`]: the Secret's
//! namespace/name, or the generated default), never by bytes, so that a rotated Secret does
//! not make open connections misdirected.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::uri::Uri;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::errors::ProxyError;
use super::handler::ConnState;
use crate::metrics::Metrics;
use crate::model::{CertEntry, ObjectRef, Snapshot};

/// TLS settings of a proxy: the default certificate and the global flags.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The certificate made at startup; served for names no TLS host covers when
    /// `default_secret` is unset, missing or invalid.
    pub generated_default: Arc<CertEntry>,
    /// `--default-ssl-certificate`: looked up in each snapshot's certificates.
    pub default_secret: Option<ObjectRef>,
    /// Limit for a TLS handshake, from accept to the last handshake message.
    pub handshake_timeout: Duration,
    /// `--ssl-redirect`: redirect plain requests for TLS hosts unless an Ingress opts out.
    pub ssl_redirect: bool,
    /// `--hsts`: `Strict-Transport-Security` on TLS responses unless an Ingress sets its own.
    pub hsts: Option<HeaderValue>,
    /// `--https-redirect-port`; `None`: the HTTPS listener's port.
    pub redirect_port: Option<u16>,
}

impl TlsSettings {
    /// Settings with the documented defaults around `generated_default`.
    pub fn new(generated_default: Arc<CertEntry>) -> TlsSettings {
        TlsSettings {
            generated_default,
            default_secret: None,
            handshake_timeout: Duration::from_secs(10),
            ssl_redirect: false,
            hsts: None,
            redirect_port: None,
        }
    }
}

/// Which certificate a connection chose: a Secret by namespace/name, or the generated
/// default certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertId {
    Secret(ObjectRef),
    Generated,
}

/// A certificate choice.
#[derive(Debug, Clone)]
pub struct Selected {
    pub id: CertId,
    pub certified: Arc<CertifiedKey>,
}

/// Lowercase, without a trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The certificate for `server_name` under `snapshot`: the exact TLS host, then a
/// one-label wildcard TLS host, when its Secret is usable; else the default certificate
/// (`--default-ssl-certificate` when usable, else the generated one).
pub fn select(snapshot: &Snapshot, settings: &TlsSettings, server_name: Option<&str>) -> Selected {
    if let Some(name) = server_name {
        let name = normalise(name);
        if let Some(entry) = snapshot.tls.cert_for(&name) {
            return Selected {
                id: CertId::Secret(entry.secret.clone()),
                certified: entry.certified.clone(),
            };
        }
    }
    default_cert(snapshot, settings)
}

fn default_cert(snapshot: &Snapshot, settings: &TlsSettings) -> Selected {
    if let Some(entry) = settings
        .default_secret
        .as_ref()
        .and_then(|d| snapshot.tls.certs.get(d))
    {
        return Selected {
            id: CertId::Secret(entry.secret.clone()),
            certified: entry.certified.clone(),
        };
    }
    Selected {
        id: CertId::Generated,
        certified: settings.generated_default.certified.clone(),
    }
}

/// A `ResolvesServerCert` that chooses from the snapshot in force: one `load()` per
/// ClientHello.
#[derive(Debug)]
pub struct SnapshotResolver {
    snapshots: Arc<ArcSwap<Snapshot>>,
    settings: Arc<TlsSettings>,
}

impl SnapshotResolver {
    pub fn new(snapshots: Arc<ArcSwap<Snapshot>>, settings: Arc<TlsSettings>) -> Self {
        SnapshotResolver {
            snapshots,
            settings,
        }
    }

    /// The choice for a server name under the snapshot in force.
    pub fn choose(&self, server_name: Option<&str>) -> Selected {
        select(&self.snapshots.load(), &self.settings, server_name)
    }
}

impl ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()).certified)
    }
}

/// One connection's resolver: chooses like [`SnapshotResolver`] and remembers the choice
/// for the 421 rule.
#[derive(Debug)]
struct ConnResolver {
    shared: Arc<SnapshotResolver>,
    chosen: Mutex<Option<CertId>>,
}

impl ResolvesServerCert for ConnResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let selected = self.shared.choose(hello.server_name());
        let mut chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        *chosen = Some(selected.id);
        Some(selected.certified)
    }
}

/// The server configuration: TLS 1.2 and 1.3 only, rustls' default suites of the
/// process provider, ALPN `h2` then `http/1.1`.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What a TLS connection settled at handshake.
#[derive(Debug, Clone)]
pub struct TlsConnInfo {
    /// The SNI the client sent, normalised.
    pub server_name: Option<String>,
    /// The certificate the connection chose.
    pub cert: CertId,
    /// ALPN chose `h2`.
    pub h2: bool,
    /// The negotiated protocol version `TLSv1.3` or `TLSv1.2` (the
    /// access log's `tls_version`); `other` for anything else.
    pub version: &'static str,
}

/// A failed handshake: the metric reason and the cause for the debug log.
#[derive(Debug)]
pub(crate) struct HandshakeFailure {
    pub reason: &'static str,
    pub detail: String,
}

/// TLS state of a proxy: settings, the shared configuration, the HTTPS listener's port.
pub(crate) struct TlsState {
    pub(crate) settings: Arc<TlsSettings>,
    resolver: Arc<SnapshotResolver>,
    base: ServerConfig,
    /// Port of the HTTPS listener once it serves; 0 before.
    https_port: AtomicU16,
    metrics: Arc<Metrics>,
}

impl TlsState {
    pub(crate) fn new(
        settings: TlsSettings,
        snapshots: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> Result<TlsState, rustls::Error> {
        let settings = Arc::new(settings);
        let resolver = Arc::new(SnapshotResolver::new(snapshots, settings.clone()));
        let base = server_config(resolver.clone())?;
        Ok(TlsState {
            settings,
            resolver,
            base,
            https_port: AtomicU16::new(0),
            metrics,
        })
    }

    pub(crate) fn set_https_port(&self, port: u16) {
        self.https_port.store(port, Ordering::Release);
    }

    /// The port redirects point at: the flag, else the HTTPS listener's port.
    fn redirect_port(&self) -> Option<u16> {
        self.settings
            .redirect_port
            .or_else(|| Some(self.https_port.load(Ordering::Acquire)).filter(|p| *p != 0))
    }

    /// Runs the handshake on `stream` within the handshake timeout, counting the outcome.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, TlsConnInfo), HandshakeFailure> {
        let result = tokio::time::timeout(self.settings.handshake_timeout, self.handshake(stream))
            .await
            .unwrap_or_else(|_| {
                Err(HandshakeFailure {
                    reason: "timeout",
                    detail: "no complete handshake within tls_handshake_timeout".into(),
                })
            });
        match &result {
            Ok((_, info)) => {
                let version = match info.version {
                    "TLSv1.3" => "1.3",
                    "TLSv1.2" => "1.2",
                    _ => "other",
                };
                self.metrics
                    .tls_handshakes_total
                    .with_label_values(&[version])
                    .inc();
            }
            Err(f) => self
                .metrics
                .tls_handshake_errors_total
                .with_label_values(&[f.reason])
                .inc(),
        }
        result
    }

    async fn handshake(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, TlsConnInfo), HandshakeFailure> {
        // The record header and the start of the ClientHello: content type 0x16, and the
        // client's highest version at bytes 9-10 (0x0303 from TLS 1.2 and 1.3 clients).
        let mut head = [0u8; 11];
        let old_client = match stream.peek(&mut head).await {
            Ok(0) => return Err(failure("eof", "closed before sending anything")),
            Ok(_) if head[0] != 0x16 => return Err(not_tls(stream, head[0]).await),
            Ok(n) => {
                n == head.len()
                    && head[5] == 0x01
                    && u16::from_be_bytes([head[9], head[10]]) < 0x0303
            }
            Err(e) => return Err(failure("eof", e.to_string())),
        };
        let conn = Arc::new(ConnResolver {
            shared: self.resolver.clone(),
            chosen: Mutex::new(None),
        });
        let mut cfg = self.base.clone();
        cfg.cert_resolver = conn.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let stream = acceptor.accept(stream).await.map_err(|e| {
            let mut f = classify(e);
            // rustls trips over what TLS 1.0/1.1 ClientHellos lack before it looks at the
            // version; the version is the reason that matters.
            if old_client && matches!(f.reason, "incompatible" | "bad_message" | "other") {
                f.reason = "protocol_version";
            }
            f
        })?;
        let session = stream.get_ref().1;
        let server_name = session.server_name().map(normalise);
        let chosen = conn.chosen.lock().unwrap_or_else(|e| e.into_inner()).take();
        // A resumed session skips certificate resolution: it keeps the certificate of the
        // session it resumes, which was chosen for the same SNI.
        let cert = chosen.unwrap_or_else(|| self.resolver.choose(server_name.as_deref()).id);
        let h2 = session.alpn_protocol() == Some(b"h2");
        let version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "other",
        };
        Ok((
            stream,
            TlsConnInfo {
                server_name,
                cert,
                h2,
                version,
            },
        ))
    }

    /// The TLS rules for one request under the request's snapshot: 421 on a TLS
    /// connection whose certificate is not the one the request's host gets; the opt-in
    /// redirect on a plain connection. Returns the HSTS value for a TLS response.
    pub(crate) fn check_request(
        &self,
        conn: &ConnState,
        snapshot: &Snapshot,
        host: Option<&str>,
        ingress: Option<&ObjectRef>,
        uri: &Uri,
    ) -> Result<Option<HeaderValue>, ProxyError> {
        let policy = ingress.and_then(|i| snapshot.tls.policies.get(i));
        let tls_host = host.filter(|h| snapshot.tls.host_for(h).is_some());
        match &conn.tls {
            Some(info) => {
                if let Some(h) = tls_host
                    && select(snapshot, &self.settings, Some(h)).id != info.cert
                {
                    return Err(ProxyError::Misdirected);
                }
                Ok(match policy.and_then(|p| p.hsts.as_deref()) {
                    Some(v) => HeaderValue::from_str(v).ok(),
                    None => self.settings.hsts.clone(),
                })
            }
            None => {
                let Some(h) = tls_host else { return Ok(None) };
                let wanted = policy
                    .and_then(|p| p.ssl_redirect)
                    .unwrap_or(self.settings.ssl_redirect);
                let Some(port) = self.redirect_port().filter(|_| wanted) else {
                    return Ok(None);
                };
                let pq = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
                let location = if port == 443 {
                    format!("https://{h}{pq}")
                } else {
                    format!("https://{h}:{port}{pq}")
                };
                match HeaderValue::from_str(&location) {
                    Ok(location) => Err(ProxyError::HttpsRedirect(location)),
                    Err(_) => Ok(None),
                }
            }
        }
    }
}

fn failure(reason: &'static str, detail: impl Into<String>) -> HandshakeFailure {
    HandshakeFailure {
        reason,
        detail: detail.into(),
    }
}

/// Answers a plain HTTP request on the TLS port with a short 400, as far as the peer
/// listens, then gives up on the connection.
async fn not_tls(mut stream: TcpStream, first: u8) -> HandshakeFailure {
    if first.is_ascii_uppercase() {
        let body = "this port speaks TLS: use https://\n";
        let resp = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
    failure(
        "not_tls",
        format!("first byte {first:#04x} is not a TLS handshake record"),
    )
}

/// The metric reason of a failed rustls handshake.
fn classify(err: std::io::Error) -> HandshakeFailure {
    use std::io::ErrorKind;
    let detail = err.to_string();
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        let reason = match tls {
            rustls::Error::PeerIncompatible(p) => match p {
                rustls::PeerIncompatible::SupportedVersionsExtensionRequired
                | rustls::PeerIncompatible::Tls12NotOffered
                | rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
                | rustls::PeerIncompatible::ServerDoesNotSupportTls12Or13 => "protocol_version",
                _ => "incompatible",
            },
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => "not_tls",
            rustls::Error::InvalidMessage(_) => "bad_message",
            rustls::Error::AlertReceived(_) => "client_alert",
            _ => "other",
        };
        return failure(reason, detail);
    }
    let reason = match err.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => "eof",
        _ => "other",
    };
    failure(reason, detail)
}

/// Logs, at warn, each TLS host that a published snapshot serves with the default
/// certificate because its Secret is missing or invalid: once when it starts, not on every
/// publish.
#[derive(Debug, Default)]
pub struct FallbackLog {
    last: Mutex<Vec<(String, ObjectRef)>>,
}

impl FallbackLog {
    pub fn observe(&self, snapshot: &Snapshot) {
        let now: Vec<(String, ObjectRef)> = snapshot
            .tls
            .hosts
            .iter()
            .filter(|(_, t)| !snapshot.tls.certs.contains_key(&t.secret))
            .map(|(h, t)| (h.to_string(), t.secret.clone()))
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (host, secret) in now.iter().filter(|f| !last.contains(f)) {
            warn!(%host, %secret, "TLS host has no usable certificate: it gets the default certificate");
        }
        *last = now;
    }
}

/// Logs the default certificate at startup: its SHA-256 fingerprint, so that a client
/// that sees it can tell.
pub fn log_generated_default(entry: &CertEntry) {
    info!(
        subject = %entry.subject,
        sha256 = %entry.sha256,
        "generated the self-signed default certificate"
    );
}

pub(crate) fn log_handshake_failure(peer: std::net::SocketAddr, f: &HandshakeFailure) {
    debug!(%peer, reason = f.reason, detail = %f.detail, "TLS handshake failed");
}
