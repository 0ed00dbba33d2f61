//! TLS certificates of a snapshot: which Secret serves which host.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use serde::Serialize;

use super::{HostPattern, ObjectRef};

/// A parsed, validated `kubernetes.io/tls` Secret: the chain, a signing key that matches
/// the leaf certificate, and what the debug views and metrics show about it.
#[derive(Clone, Serialize)]
pub struct CertEntry {
    pub secret: ObjectRef,
    #[serde(skip)]
    pub certified: Arc<CertifiedKey>,
    pub subject: String,
    pub issuer: String,
    /// DNS names from the subjectAltName extension.
    pub dns_names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the leaf certificate, lowercase hex.
    pub sha256: String,
}

impl fmt::Debug for CertEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertEntry")
            .field("secret", &self.secret)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// One host of an Ingress `tls` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsHost {
    /// The Secret named by the `tls` entry (always in the Ingress' namespace).
    pub secret: ObjectRef,
    pub ingress: ObjectRef,
}

/// TLS settings an Ingress asks for with annotations (`portcullis.io/ssl-redirect`,
/// `portcullis.io/hsts`); `None` leaves the global flag in charge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngressTls {
    /// Redirect plain HTTP requests for this Ingress' TLS hosts to HTTPS.
    pub ssl_redirect: Option<bool>,
    /// `Strict-Transport-Security` value for its responses over TLS.
    pub hsts: Option<String>,
}

/// TLS hosts and their certificates.
#[derive(Debug, Default)]
pub struct TlsTable {
    /// Host pattern → the Secret that serves it (oldest Ingress wins a conflict).
    pub hosts: BTreeMap<HostPattern, TlsHost>,
    /// Usable certificates by Secret. A host whose Secret is absent here is served with
    /// the default certificate.
    pub certs: HashMap<ObjectRef, Arc<CertEntry>>,
    /// Annotation settings by Ingress; only Ingresses that set one are present.
    pub policies: BTreeMap<ObjectRef, IngressTls>,
}

impl TlsTable {
    /// The TLS host entry for a server name: exact, then one-label wildcard.
    pub fn host_for(&self, server_name: &str) -> Option<&TlsHost> {
        // Plain-HTTP-only configurations ask on every request: no lookup keys to build.
        if self.hosts.is_empty() {
            return None;
        }
        if let Some(h) = self.hosts.get(&HostPattern::Exact(server_name.to_string())) {
            return Some(h);
        }
        let (label, suffix) = server_name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.hosts.get(&HostPattern::Wildcard(suffix.to_string()))
    }

    /// The certificate for a server name, if a usable one is configured.
    pub fn cert_for(&self, server_name: &str) -> Option<&Arc<CertEntry>> {
        self.certs.get(&self.host_for(server_name)?.secret)
    }
}
