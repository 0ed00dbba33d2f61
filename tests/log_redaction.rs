//! Secrets never reach the logs: the real binary at `RUST_LOG=debug` (every crate), with
//! TLS Secrets loaded from manifests (one good, one whose key does not match, one that
//! is not PEM at all), serving HTTPS and plain HTTP requests that carry `Authorization`
//! and `Cookie` headers — routed, unrouted, and failing upstream. Neither standard
//! error (the log, text and JSON formats) nor standard output (the access log) may
//! contain PEM armour, key bytes in any encoding the Secret used, or the header values.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::certs::DevCa;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use support::{EVENTUALLY, refusing_port, start_echo};

const AUTHORIZATION: &str = "Bearer tok-3f9a1c7e5b2d4a6c8e0f";
const BASIC: &str = "Basic dXNlcjpodW50ZXIyLXBhc3N3b3Jk";
const COOKIE: &str = "session=ck-71d2e9a4b6c8f0e1; csrftoken=ck-0a1b2c3d4e5f";

/// The base64 body lines of a PEM document (what a careless log would show).
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect()
}

/// A running binary whose standard output and standard error are collected.
struct Logged {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logged {
    fn start(dir: &std::path::Path, log_format: &str, access_log: &str) -> Logged {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--manifests"])
            .arg(dir)
            .args(support::child::LOOPBACK_LISTENERS)
            .args(["--log-format", log_format, "--access-log", access_log])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        for (stream, tag) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, "stdout"),
            (Box::new(stderr), "stderr"),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    lines
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{tag}: {line}"));
                }
            });
        }
        Logged { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The port of `listener` from its "listening" log line, in either format.
    async fn port(&self, listener: &str) -> u16 {
        let deadline = tokio::time::Instant::now() + EVENTUALLY;
        loop {
            for l in self.lines() {
                if !l.contains("listening") {
                    continue;
                }
                let json = l
                    .strip_prefix("stderr: ")
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok());
                if let Some(v) = json {
                    if v["listener"] == listener
                        && let Some(p) = v["port"].as_u64()
                    {
                        return p as u16;
                    }
                } else if l.contains(&format!("listener={listener} "))
                    || l.contains(&format!("listener=\"{listener}\""))
                {
                    let port = l
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("port="))
                        .and_then(|p| p.parse().ok());
                    if let Some(p) = port {
                        return p;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `listening` line for {listener}: {:?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn manifests(
    good_cert: &str,
    good_key: &str,
    wrong_key: &str,
    echo: SocketAddr,
    dead: SocketAddr,
) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let endpoint = |name: &str, a: SocketAddr| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: {p}}}]\nendpoints:\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n",
            p = a.port(),
            ip = a.ip()
        )
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: good}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{crt}  tls.key: |\n{key}\
---\napiVersion: v1\nkind: Secret\nmetadata: {{name: mismatched}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{crt}  tls.key: |\n{wrong}\
---\napiVersion: v1\nkind: Secret\nmetadata: {{name: garbled}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: not-a-certificate-{garble}\n  tls.key: not-a-key-{garble}\n\
---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: web}}\nspec:\n  tls:\n    - {{hosts: [secure.example], secretName: good}}\n    - {{hosts: [other.example], secretName: mismatched}}\n    - {{hosts: [third.example], secretName: garbled}}\n    - {{hosts: [fourth.example], secretName: missing}}\n  rules:\n    - host: secure.example\n      http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: echo, port: {{number: 80}}}}}}}}, {{path: /dead, pathType: Prefix, backend: {{service: {{name: dead, port: {{number: 80}}}}}}}}]}}\n    - host: other.example\n      http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: echo, port: {{number: 80}}}}}}}}]}}\n\
---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo}}\nspec: {{ports: [{{port: 80, targetPort: {ep}}}]}}\n\
---\napiVersion: v1\nkind: Service\nmetadata: {{name: dead}}\nspec: {{ports: [{{port: 80, targetPort: {dp}}}]}}\n{e1}{e2}",
        crt = indent(good_cert),
        key = indent(good_key),
        wrong = indent(wrong_key),
        garble = "Z2FyYmxlZC1zZWNyZXQtbWF0ZXJpYWw",
        ep = echo.port(),
        dp = dead.port(),
        e1 = endpoint("echo", echo),
        e2 = endpoint("dead", dead),
    )
}

fn https_client(ca_pem: &str, https: SocketAddr) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
        .expect("add CA");
    let tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .no_proxy()
        .use_preconfigured_tls(tls)
        .resolve("secure.example", https)
        .resolve("other.example", https)
        .build()
        .expect("https client")
}

async fn send_everything(http: SocketAddr, https: SocketAddr, ca_pem: &str) -> usize {
    let plain = support::client();
    let tls = https_client(ca_pem, https);
    let mut answered = 0;
    for (auth, path) in [
        (AUTHORIZATION, "/"),
        (BASIC, "/dead/x"),
        (AUTHORIZATION, "/nowhere"),
    ] {
        for host in ["secure.example", "unknown.example"] {
            let resp = plain
                .get(format!("http://{http}{path}"))
                .header("host", host)
                .header("authorization", auth)
                .header("cookie", COOKIE)
                .header("proxy-authorization", auth)
                .send()
                .await
                .expect("plain request answered");
            resp.text().await.expect("plain body");
            answered += 1;
        }
        let resp = tls
            .get(format!("https://secure.example:{}{path}", https.port()))
            .header("authorization", auth)
            .header("cookie", COOKIE)
            .send()
            .await
            .expect("https request answered");
        resp.text().await.expect("https body");
        answered += 1;
    }
    // A host whose Secret is broken: the default certificate, which the client rejects.
    let rejected = tls
        .get(format!("https://other.example:{}/", https.port()))
        .header("authorization", AUTHORIZATION)
        .header("cookie", COOKIE)
        .send()
        .await;
    assert!(
        rejected.is_err(),
        "other.example gets the default certificate"
    );
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_and_the_access_log_carry_no_key_material_or_credentials() {
    portcullis::tls::install_default_provider();
    let ca = DevCa::generate("Redaction test CA").expect("CA");
    let good = ca
        .issue(&["secure.example".into(), "other.example".into()], 30)
        .expect("leaf");
    let wrong = ca
        .issue(&["other.example".into()], 30)
        .expect("second leaf");
    let echo = start_echo("echo").await;
    let refusing = refusing_port();
    let dead = refusing.addr;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("objects.yaml"),
        manifests(
            &good.cert_pem,
            &good.key_pem,
            &wrong.key_pem,
            echo.addr,
            dead,
        ),
    )
    .expect("write manifests");

    let mut forbidden: Vec<String> = vec![
        "-----BEGIN".into(),
        "PRIVATE KEY".into(),
        "tok-3f9a1c7e5b2d4a6c8e0f".into(),
        "dXNlcjpodW50ZXIyLXBhc3N3b3Jk".into(),
        "ck-71d2e9a4b6c8f0e1".into(),
        "ck-0a1b2c3d4e5f".into(),
        "Z2FyYmxlZC1zZWNyZXQtbWF0ZXJpYWw".into(),
    ];
    forbidden.extend(pem_body_lines(&good.key_pem));
    forbidden.extend(pem_body_lines(&wrong.key_pem));

    for (log_format, access_log) in [("json", "json"), ("text", "text")] {
        let bin = Logged::start(dir.path(), log_format, access_log);
        let http = SocketAddr::from(([127, 0, 0, 1], bin.port("http").await));
        let https = SocketAddr::from(([127, 0, 0, 1], bin.port("https").await));
        let answered = send_everything(http, https, &ca.cert_pem).await;
        assert_eq!(answered, 9);
        // The access log lines of those requests are written (and flushed) by then or
        // soon after; the last request's line marks the end.
        let deadline = tokio::time::Instant::now() + EVENTUALLY;
        while bin
            .lines()
            .iter()
            .filter(|l| l.starts_with("stdout: ") && l.contains("secure.example"))
            .count()
            < 6
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "access log lines missing: {:?}",
                bin.lines()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lines = bin.lines();
        // The run really was at debug level, with the Secret problems reported.
        assert!(
            lines
                .iter()
                .any(|l| l.contains("DEBUG") || l.contains("\"level\":\"DEBUG\"")),
            "{log_format}: no debug lines"
        );
        for secret in ["mismatched", "garbled", "missing"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with("stderr: ") && l.contains(secret)),
                "{log_format}: the problem with Secret {secret} is logged"
            );
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("request answered by the proxy")),
            "{log_format}: the upstream failure is logged at debug"
        );
        for l in &lines {
            for f in &forbidden {
                assert!(
                    !l.contains(f.as_str()),
                    "{log_format}: a log line contains secret material {f:?}: {l}"
                );
            }
        }
        // `REDACTION_SHOW=1 cargo test --test log_redaction -- --nocapture` prints what
        // was checked.
        if std::env::var_os("REDACTION_SHOW").is_some() {
            eprintln!("{}", lines.join("\n"));
        }
        eprintln!(
            "{log_format}: {} lines checked against {} forbidden strings",
            lines.len(),
            forbidden.len()
        );
    }
    // The manifests the test used really contain what is forbidden in the logs.
    let yaml = std::fs::read_to_string(dir.path().join("objects.yaml")).expect("read back");
    assert!(yaml.contains("PRIVATE KEY") && yaml.contains(&pem_body_lines(&good.key_pem)[0]));
}
