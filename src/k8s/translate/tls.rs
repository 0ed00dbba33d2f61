//! Parsing and validating `kubernetes.io/tls` Secrets.

use k8s_openapi::api::core::v1::Secret;

use crate::model::{CertEntry, ObjectRef};
use crate::tls::PemPart;

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
/// key is usable and that it matches the leaf certificate ([`crate::tls::cert_entry`]).
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
    crate::tls::cert_entry(id, &crt, &key).map_err(|e| {
        let field = match e.part {
            PemPart::Chain => "data[tls.crt]",
            PemPart::Key => "data[tls.key]",
        };
        err(field, e.reason)
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
