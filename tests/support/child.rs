//! A `portcullis` child process whose stderr is collected line by line: its logs for
//! assertions and failure messages, the admin address it logged, SIGTERM and its exit
//! code. Killed on drop. With `PORTCULLIS_TEST_LOGS` set, each line is also echoed,
//! prefixed with the child's name.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The four listener flags of `portcullis run`, each on 127.0.0.1:0.
pub const LOOPBACK_LISTENERS: [&str; 8] = [
    "--http-addr",
    "127.0.0.1:0",
    "--https-addr",
    "127.0.0.1:0",
    "--admin-addr",
    "127.0.0.1:0",
    "--dashboard-addr",
    "127.0.0.1:0",
];

/// The value of the unlabelled metric `name` on the admin listener at `admin`
/// (`GET /metrics`); `None` when the listener does not answer or has no such line.
pub async fn admin_metric<T: std::str::FromStr>(admin: SocketAddr, name: &str) -> Option<T> {
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub struct LoggedChild {
    pub name: String,
    pub child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl LoggedChild {
    /// Starts `cmd` with stderr piped (and stdout discarded).
    pub fn spawn(name: &str, mut cmd: Command) -> LoggedChild {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        let who = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PORTCULLIS_TEST_LOGS").is_some() {
                    eprintln!("[{who}] {line}");
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        LoggedChild {
            name: name.into(),
            child,
            logs,
        }
    }

    /// Everything logged so far, one line each.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").join("\n")
    }

    /// Polls every 20 ms until `check` holds, for at most `within`; whether it did.
    pub async fn until(&self, within: Duration, mut check: impl FnMut(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if check(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin listener's address, from the "portcullis listening" log line.
    pub async fn admin_addr(&self, within: Duration) -> SocketAddr {
        let find = |c: &Self| -> Option<SocketAddr> {
            c.logs.lock().expect("log lock").iter().find_map(|l| {
                let rest = l.split("admin=").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            })
        };
        let logged = self.until(within, |c| find(c).is_some()).await;
        assert!(
            logged,
            "{} never logged its admin address:\n{}",
            self.name,
            self.logs()
        );
        find(self).expect("checked above")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `within` for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
