//! TLS material, a stage of translation: parsing and validating `kubernetes.io/tls`
//! Secrets, and the certificates a snapshot serves, with the last good one kept.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;

use super::{Diags, Inputs, Options, object_ref};
use crate::model::{CertEntry, ObjectRef, Severity};
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

/// The certificates of `secrets` (the Secrets TLS hosts name, plus the
/// `--default-ssl-certificate` one, which is added to the set), by Secret. A Secret that
/// is missing or malformed is a diagnostic; a malformed one keeps its last good
/// certificate.
pub(super) fn certificates(
    inputs: &Inputs,
    tls_secrets: &mut BTreeSet<ObjectRef>,
    last_good_certs: &HashMap<ObjectRef, Arc<CertEntry>>,
    options: &Options,
    diags: &mut Diags,
) -> HashMap<ObjectRef, Arc<CertEntry>> {
    let secrets: HashMap<ObjectRef, &Secret> = inputs
        .secrets
        .iter()
        .map(|s| (object_ref(&s.metadata), s.as_ref()))
        .collect();
    let mut certs = HashMap::new();
    let flag_only = options
        .default_ssl_certificate
        .as_ref()
        .filter(|d| !tls_secrets.contains(*d));
    if let Some(d) = flag_only {
        tls_secrets.insert(d.clone());
    }
    for secret_id in tls_secrets.iter() {
        let parsed = match secrets.get(secret_id) {
            None if Some(secret_id) == flag_only => Err(SecretError {
                field: "--default-ssl-certificate",
                reason: "Secret not found: the generated self-signed certificate is the default"
                    .into(),
            }),
            None => Err(SecretError {
                field: "",
                reason: "Secret not found: its hosts get the default certificate".into(),
            }),
            Some(secret) => parse_tls_secret(secret),
        };
        match parsed {
            Ok(entry) => {
                certs.insert(secret_id.clone(), Arc::new(entry));
            }
            Err(e) => {
                let keep = secrets
                    .contains_key(secret_id)
                    .then(|| last_good_certs.get(secret_id))
                    .flatten();
                let reason = match keep {
                    Some(_) => format!("{}; the last good certificate stays in use", e.reason),
                    None if secrets.contains_key(secret_id) && Some(secret_id) == flag_only => {
                        format!(
                            "{}; the generated self-signed certificate is the default",
                            e.reason
                        )
                    }
                    None if secrets.contains_key(secret_id) => {
                        format!("{}; its hosts get the default certificate", e.reason)
                    }
                    None => e.reason,
                };
                diags.push(Severity::Error, "Secret", secret_id, e.field, reason);
                if let Some(entry) = keep {
                    certs.insert(secret_id.clone(), entry.clone());
                }
            }
        }
    }
    certs
}
