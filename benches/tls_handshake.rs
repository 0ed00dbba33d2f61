//! Full TLS 1.3 handshakes in memory (rustls client and server, no sockets), with the
//! server choosing its certificate the way the HTTPS listener does: `SnapshotResolver`
//! over a snapshot, one server configuration clone per connection. ECDSA P-256 and RSA
//! 2048 certificates, each signed by a CA of the same key type; the client verifies the
//! chain; no resumption.
//!
//! `cargo bench --bench tls_handshake` measures the *ring* provider, the one Portcullis
//! uses. `cargo bench --bench tls_handshake --features bench-aws-lc` adds aws-lc-rs for
//! comparison (the feature only exists for this bench; the binary stays ring-only).
//!
//! RSA keys come from `openssl genpkey` (ring cannot generate RSA keys); without openssl
//! the RSA cases are skipped.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::model::tls::TlsHost;
use portcullis::model::{CertEntry, HostPattern, ObjectRef, Snapshot, TlsTable};
use portcullis::proxy::tls::{SnapshotResolver, TlsSettings};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

const HOST: &str = "bench.example";

/// A CA and a leaf for [`HOST`], both with keys made by `key()`.
struct Chain {
    ca_der: CertificateDer<'static>,
    leaf_der: CertificateDer<'static>,
    leaf_key_der: Vec<u8>,
}

fn chain(key: impl Fn() -> Option<KeyPair>) -> Option<Chain> {
    let ca_key = key()?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).ok()?;
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).ok()?;
    let issuer = Issuer::new(ca, &ca_key);
    let leaf_key = key()?;
    let leaf = CertificateParams::new(vec![HOST.to_string()]).ok()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).ok()?;
    Some(Chain {
        ca_der: ca_cert.der().clone(),
        leaf_der: leaf_cert.der().clone(),
        leaf_key_der: leaf_key.serialize_der(),
    })
}

fn rsa_2048() -> Option<KeyPair> {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    KeyPair::from_pem(std::str::from_utf8(&out.stdout).ok()?).ok()
}

/// A snapshot serving [`HOST`] with `chain`, its key loaded by `provider`.
fn snapshot(chain: &Chain, provider: &CryptoProvider) -> Snapshot {
    let secret = ObjectRef::new("bench", "bench-tls");
    let key = PrivateKeyDer::try_from(chain.leaf_key_der.clone()).expect("PKCS#8 key");
    let certified = CertifiedKey::from_der(vec![chain.leaf_der.clone()], key, provider)
        .expect("key matches the certificate");
    let entry = CertEntry {
        secret: secret.clone(),
        certified: Arc::new(certified),
        subject: String::new(),
        issuer: String::new(),
        dns_names: vec![HOST.into()],
        not_before: 0,
        not_after: 0,
        sha256: String::new(),
    };
    let mut hosts = BTreeMap::new();
    hosts.insert(
        HostPattern::Exact(HOST.into()),
        TlsHost {
            secret: secret.clone(),
            ingress: ObjectRef::new("bench", "bench"),
        },
    );
    let mut certs = HashMap::new();
    certs.insert(secret, Arc::new(entry));
    Snapshot {
        tls: Arc::new(TlsTable {
            hosts,
            certs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Setup {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn setup(chain: &Chain, provider: Arc<CryptoProvider>) -> Setup {
    let snapshots = Arc::new(ArcSwap::from_pointee(snapshot(chain, &provider)));
    let default = portcullis::certs::generate_default().expect("default certificate");
    let resolver = Arc::new(SnapshotResolver::new(
        snapshots,
        Arc::new(TlsSettings::new(default)),
    ));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(chain.ca_der.clone()).expect("CA");
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Setup {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

fn transfer(from: &mut Connection, to: &mut Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets().expect("handshake");
    }
}

/// One full handshake. The server configuration is cloned per connection, as the HTTPS
/// listener does to remember the choice.
fn handshake(s: &Setup) {
    let name = ServerName::try_from(HOST).expect("name");
    let mut client =
        Connection::Client(ClientConnection::new(s.client.clone(), name).expect("client"));
    let server_cfg = Arc::new((*s.server).clone());
    let mut server = Connection::Server(ServerConnection::new(server_cfg).expect("server"));
    while client.is_handshaking() || server.is_handshaking() {
        transfer(&mut client, &mut server);
        transfer(&mut server, &mut client);
    }
}

fn providers() -> Vec<(&'static str, Arc<CryptoProvider>)> {
    #[allow(unused_mut)]
    let mut v = vec![("ring", Arc::new(rustls::crypto::ring::default_provider()))];
    #[cfg(feature = "bench-aws-lc")]
    v.push((
        "aws-lc-rs",
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    ));
    v
}

fn bench(c: &mut Criterion) {
    portcullis::tls::install_default_provider();
    let ecdsa = chain(|| KeyPair::generate().ok()).expect("ECDSA chain");
    let rsa = chain(rsa_2048);
    if rsa.is_none() {
        eprintln!("openssl not found: skipping the RSA 2048 cases");
    }
    let mut group = c.benchmark_group("tls13_full_handshake");
    for (provider_name, provider) in providers() {
        for (key_name, chain) in [("ecdsa_p256", Some(&ecdsa)), ("rsa_2048", rsa.as_ref())] {
            let Some(chain) = chain else { continue };
            let s = setup(chain, provider.clone());
            handshake(&s);
            group.bench_function(format!("{provider_name}/{key_name}"), |b| {
                b.iter(|| handshake(&s))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
