//! Certificates Portcullis makes itself: the self-signed default certificate generated at
//! startup, and the local development CA and leaves of `portcullis certs` (also used by
//! `portcullis demo`).
//!
//! Everything is made with rcgen on the *ring* backend: ECDSA P-256 keys, SHA-256
//! signatures. Private keys are never logged; on disk they are written with mode 0600.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::model::{CertEntry, ObjectRef};

/// Common name of the certificate generated at startup when no `--default-ssl-certificate`
/// is given.
pub const DEFAULT_CERT_CN: &str = "Portcullis default certificate";
/// Common name of the local development CA.
pub const DEV_CA_CN: &str = "Portcullis development CA";
/// File names of the development CA inside the output folder.
pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Why a certificate could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the generated certificate is unusable: {0}")]
    Unusable(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no hosts given: pass --hosts a.localhost,b.localhost")]
    NoHosts,
    #[error("`{0}` is not a usable host name")]
    BadHost(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A certificate chain and its private key, PEM encoded.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair").finish_non_exhaustive()
    }
}

/// Turns a PEM chain and key into a [`CertEntry`] named `id`, with the same checks a
/// `kubernetes.io/tls` Secret gets ([`crate::tls::cert_entry`]).
pub fn entry_from_pem(id: &ObjectRef, pair: &PemPair) -> Result<CertEntry, CertsError> {
    crate::tls::cert_entry(
        id.clone(),
        pair.cert_pem.as_bytes(),
        pair.key_pem.as_bytes(),
    )
    .map_err(|e| CertsError::Unusable(e.to_string()))
}

/// The `ObjectRef` the generated default certificate is shown under (debug views). It is
/// not a Secret: no Secret can have an empty namespace.
pub fn generated_default_ref() -> ObjectRef {
    ObjectRef::new("", "portcullis-generated-default")
}

/// Generates the self-signed default certificate: CN [`DEFAULT_CERT_CN`], no DNS names,
/// valid from yesterday for ten years.
pub fn generate_default() -> Result<Arc<CertEntry>, CertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(DEFAULT_CERT_CN);
    set_validity(&mut params, 3650);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    let pair = PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    Ok(Arc::new(entry_from_pem(&generated_default_ref(), &pair)?))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Portcullis");
    dn
}

/// Valid from yesterday for `days` days.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let date = |d: i64| {
        let (y, m, day) = civil_from_days(d);
        rcgen::date_time_ymd(y, m, day)
    };
    params.not_before = date(today - 1);
    params.not_after = date(today + days);
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

/// A certificate authority that signs leaf certificates: the development CA, or a test CA.
pub struct DevCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn ca_params(cn: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl DevCa {
    /// A new CA named `cn`, valid for ten years, held in memory.
    pub fn generate(cn: &str) -> Result<DevCa, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(cn)?;
        set_validity(&mut params, 3650);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Reads the development CA from `dir` (`ca.pem`, `ca-key.pem`), or creates and
    /// writes it there. Returns the CA and whether it was created.
    pub fn load_or_create(dir: &Path) -> Result<(DevCa, bool), CertsError> {
        let cert_path = dir.join(CA_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            return Ok((DevCa { cert_pem, key }, false));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca = DevCa::generate(DEV_CA_CN)?;
        write_file(&cert_path, &ca.cert_pem, false)?;
        write_file(&key_path, &ca.key_pem(), true)?;
        Ok((ca, true))
    }

    /// A leaf certificate for `hosts` (DNS names or IP addresses; `*.` wildcards allowed)
    /// signed by this CA, ECDSA P-256, valid for `days` days. The chain PEM holds the leaf
    /// then the CA.
    pub fn issue(&self, hosts: &[String], days: i64) -> Result<PemPair, CertsError> {
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = hosts.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        set_validity(&mut params, days);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        // The CA's own name and key usages are what our CA parameters say: rebuild them
        // rather than parse the CA certificate.
        let issuer_cn = self.subject_cn().unwrap_or_else(|| DEV_CA_CN.to_string());
        let issuer = Issuer::new(ca_params(&issuer_cn)?, &self.key);
        let cert = params.signed_by(&leaf_key, &issuer)?;
        Ok(PemPair {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: leaf_key.serialize_pem(),
        })
    }

    fn subject_cn(&self) -> Option<String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok()?;
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        x509.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    }
}

/// Writes `contents` to `path`; secret files get mode 0600 from the start.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    #[cfg(unix)]
    if secret {
        // `mode` only applies when the file is created: tighten an existing one too.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// What `portcullis certs` wrote.
#[derive(Debug)]
pub struct Issued {
    pub ca_path: PathBuf,
    pub ca_key_path: PathBuf,
    pub ca_created: bool,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub secret_yaml_path: PathBuf,
}

/// `portcullis certs`: the development CA in `dir` (created once, then reused) and a leaf
/// certificate for `hosts`, written as `<first-host>.pem` and `<first-host>-key.pem`,
/// plus `<first-host>-secret.yaml`, a ready `kubernetes.io/tls` Secret.
pub fn issue_to_dir(dir: &Path, hosts: &[String]) -> Result<Issued, CertsError> {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    let first = hosts.first().ok_or(CertsError::NoHosts)?.clone();
    for h in &hosts {
        let ok = h
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*' | ':'));
        if !ok {
            return Err(CertsError::BadHost(h.clone()));
        }
    }
    let (ca, ca_created) = DevCa::load_or_create(dir)?;
    let pair = ca.issue(&hosts, 825)?;
    let stem = first.replace('*', "_wildcard");
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    let secret_yaml_path = dir.join(format!("{stem}-secret.yaml"));
    write_file(&cert_path, &pair.cert_pem, false)?;
    write_file(&key_path, &pair.key_pem, true)?;
    write_file(&secret_yaml_path, &secret_yaml(&stem, &pair), true)?;
    Ok(Issued {
        ca_path: dir.join(CA_FILE),
        ca_key_path: dir.join(CA_KEY_FILE),
        ca_created,
        cert_path,
        key_path,
        secret_yaml_path,
    })
}

/// A `kubernetes.io/tls` Secret manifest holding `pair`, named after the host.
pub fn secret_yaml(name: &str, pair: &PemPair) -> String {
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls");
    let _ = writeln!(
        out,
        "metadata:\n  name: {}-tls\nstringData:",
        name.trim_matches('-')
    );
    for (key, pem) in [("tls.crt", &pair.cert_pem), ("tls.key", &pair.key_pem)] {
        let _ = writeln!(out, "  {key}: |");
        for line in pem.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// `portcullis certs --hosts H1,H2 [--out DIR]`.
pub fn main(hosts: &[String], out: &Path) -> ExitCode {
    match issue_to_dir(out, hosts) {
        Ok(issued) => {
            let ca = issued.ca_path.display();
            if issued.ca_created {
                println!(
                    "Created the development CA: {ca} (key {})",
                    issued.ca_key_path.display()
                );
            } else {
                println!("Reusing the development CA: {ca}");
            }
            println!("Certificate: {}", issued.cert_path.display());
            println!("Key (mode 0600): {}", issued.key_path.display());
            println!("Secret manifest: {}", issued.secret_yaml_path.display());
            println!();
            println!("Trust the CA for one command:");
            println!("  curl --cacert {ca} https://HOST:8443/");
            println!("Trust it system-wide (Debian/Ubuntu):");
            println!(
                "  sudo cp {ca} /usr/local/share/ca-certificates/portcullis-dev-ca.crt && sudo update-ca-certificates"
            );
            println!("Use it in a cluster:");
            println!(
                "  kubectl create secret tls NAME --cert={} --key={}",
                issued.cert_path.display(),
                issued.key_path.display()
            );
            println!(
                "  or: kubectl apply -n NAMESPACE -f {}",
                issued.secret_yaml_path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn generated_default_is_usable() {
        crate::tls::install_default_provider();
        let entry = generate_default().expect("default certificate");
        assert!(entry.subject.contains(DEFAULT_CERT_CN), "{}", entry.subject);
        assert!(entry.not_after > entry.not_before);
    }

    #[test]
    fn leaf_chains_to_the_ca() {
        crate::tls::install_default_provider();
        let ca = DevCa::generate("test CA").expect("ca");
        let pair = ca
            .issue(&["a.localhost".into(), "*.b.localhost".into()], 30)
            .expect("leaf");
        let entry = entry_from_pem(&ObjectRef::new("ns", "s"), &pair).expect("entry");
        assert_eq!(entry.dns_names, vec!["a.localhost", "*.b.localhost"]);
        assert!(entry.issuer.contains("test CA"), "{}", entry.issuer);
        assert_eq!(entry.certified.cert.len(), 2);
    }
}
