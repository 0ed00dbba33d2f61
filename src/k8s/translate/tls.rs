//! Parsing and validating `kubernetes.io/tls` Secrets.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::model::{CertEntry, ObjectRef};

/// Why a Secret cannot serve TLS; the `field` names where the problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> SecretError {
    SecretError {
        field,
        reason: reason.into(),
    }
}

/// Reads `tls.crt` and `tls.key` of a `kubernetes.io/tls` Secret (from `data`, or from
/// `stringData` as manifest files may write it) and checks that the PEM parses, that the
/// key is usable and that it matches the leaf certificate.
pub fn parse_tls_secret(secret: &Secret) -> Result<CertEntry, SecretError> {
    let meta = &secret.metadata;
    // The same `default` namespace the build files Secrets under, so that the entry's
    // `secret` equals the key it is stored by.
    let id = ObjectRef::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    );
    match secret.type_.as_deref() {
        Some("kubernetes.io/tls") => {}
        other => {
            return Err(err(
                "type",
                format!(
                    "Secret type is {}, want kubernetes.io/tls",
                    other.unwrap_or("Opaque (unset)")
                ),
            ));
        }
    }
    let crt = secret_value(secret, "tls.crt").ok_or_else(|| err("data[tls.crt]", "missing"))?;
    let key = secret_value(secret, "tls.key").ok_or_else(|| err("data[tls.key]", "missing"))?;

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<_, _>>()
        .map_err(|e| err("data[tls.crt]", format!("PEM does not parse: {e}")))?;
    if chain.is_empty() {
        return Err(err("data[tls.crt]", "no CERTIFICATE block in PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| err("data[tls.key]", format!("PEM does not parse: {e}")))?;

    let provider = crate::tls::provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        err(
            "data[tls.key]",
            format!("key unusable or does not match the certificate: {e}"),
        )
    })?;

    let leaf = certified.cert[0].as_ref();
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| err("data[tls.crt]", format!("certificate does not parse: {e}")))?;
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

fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.as_bytes().to_vec());
    }
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
}
