//! The process' one rustls crypto provider, and the one place certificate PEM is parsed.
//!
//! Every TLS configuration (proxy listeners, upstream and Kubernetes clients, test
//! clients) uses the provider returned here; `install_default_provider` makes it the
//! process default so that crates which ask rustls for the default get the same one.
//! [`cert_entry`] turns a PEM chain and key into the [`CertEntry`] the proxy serves:
//! translation uses it for `kubernetes.io/tls` Secrets, [`crate::certs`] for the
//! certificates it generates.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::model::{CertEntry, ObjectRef};

/// The crypto provider Portcullis uses: *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    match CryptoProvider::get_default() {
        Some(p) => p.clone(),
        None => Arc::new(rustls::crypto::ring::default_provider()),
    }
}

/// Installs [`provider`] as the process default. Safe to call more than once.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which half of a certificate pair a [`PemError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemPart {
    /// The certificate chain (a Secret's `tls.crt`).
    Chain,
    /// The private key (a Secret's `tls.key`).
    Key,
}

impl fmt::Display for PemPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PemPart::Chain => "certificate chain",
            PemPart::Key => "private key",
        })
    }
}

/// Why a PEM chain and key cannot serve TLS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{part}: {reason}")]
pub struct PemError {
    pub part: PemPart,
    pub reason: String,
}

fn pem_err(part: PemPart, reason: impl Into<String>) -> PemError {
    PemError {
        part,
        reason: reason.into(),
    }
}

/// Parses a PEM certificate chain (leaf first) and private key into a [`CertEntry`]
/// named `id`. Checks that both parse, that the chain has a certificate, and that the
/// key is usable with [`provider`] and matches the leaf; reads the leaf's subject,
/// issuer, DNS names, validity and SHA-256.
pub fn cert_entry(id: ObjectRef, chain_pem: &[u8], key_pem: &[u8]) -> Result<CertEntry, PemError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(PemPart::Chain, format!("PEM does not parse: {e}")))?;
    if chain.is_empty() {
        return Err(pem_err(PemPart::Chain, "no CERTIFICATE block in PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| pem_err(PemPart::Key, format!("PEM does not parse: {e}")))?;

    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        pem_err(
            PemPart::Key,
            format!("key unusable or does not match the certificate: {e}"),
        )
    })?;

    let leaf = certified.cert[0].as_ref();
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| pem_err(PemPart::Chain, format!("certificate does not parse: {e}")))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                dns_names.push(n.to_string());
            }
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
    let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(CertEntry {
        secret: id,
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        dns_names,
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
        sha256,
        certified: Arc::new(certified),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::DevCa;

    #[test]
    fn a_pem_pair_becomes_an_entry_and_each_half_is_blamed_for_its_fault() {
        let ca = DevCa::generate("test CA").expect("CA");
        let pair = ca.issue(&["a.example".into()], 1).expect("leaf");
        let id = ObjectRef::new("ns", "s");
        let entry = cert_entry(
            id.clone(),
            pair.cert_pem.as_bytes(),
            pair.key_pem.as_bytes(),
        )
        .expect("usable pair");
        assert_eq!(entry.secret, id);
        assert_eq!(entry.dns_names, vec!["a.example".to_string()]);
        assert_eq!(entry.certified.cert.len(), 2, "leaf and CA");
        assert!(entry.not_after > entry.not_before);

        let other = ca.issue(&["b.example".into()], 1).expect("leaf");
        let mismatched = cert_entry(
            id.clone(),
            pair.cert_pem.as_bytes(),
            other.key_pem.as_bytes(),
        )
        .expect_err("another leaf's key");
        assert_eq!(mismatched.part, PemPart::Key);
        let no_chain = cert_entry(id.clone(), b"not pem", pair.key_pem.as_bytes())
            .expect_err("no certificate");
        assert_eq!(no_chain.part, PemPart::Chain);
        let no_key = cert_entry(id, pair.cert_pem.as_bytes(), b"").expect_err("no key");
        assert_eq!(no_key.part, PemPart::Key);
        assert!(no_key.to_string().starts_with("private key: "), "{no_key}");
    }
}
