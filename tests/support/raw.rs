//! The one raw upstream of the tests: it accepts TCP connections on 127.0.0.1:0 and, on
//! each, reads a request head and plays a script of bytes, pauses and endings. For
//! answers no well-behaved server gives (garbage, a cut body, a reset, a stall).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Stopper, read_head};

/// One step of a script, played on each connection after its request head arrived.
#[derive(Debug, Clone)]
pub enum Step {
    /// Writes these bytes.
    Write(&'static [u8]),
    /// Waits, so that the bytes before and after reach the peer in separate reads.
    Pause(Duration),
    /// Closes the connection with FIN (`shutdown`); ends the script.
    Close,
    /// Closes the connection with RST (linger 0); ends the script.
    Reset,
    /// Keeps the connection open, reading and discarding, until the peer closes it;
    /// ends the script.
    Hold,
}

/// Starts an upstream that plays `script` on every connection it accepts, once the
/// request head has arrived (a connection closed before that is dropped). A script
/// that runs out of steps drops the connection. Serves until the [`Stopper`] is
/// dropped.
pub async fn start_scripted(script: Vec<Step>) -> (SocketAddr, Stopper) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind scripted upstream");
    let addr = listener.local_addr().expect("scripted upstream address");
    let script: Arc<[Step]> = script.into();
    let (stop, mut rx) = Stopper::new();
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            tokio::spawn(play(s, script.clone()));
        }
    });
    (addr, stop)
}

async fn play(mut s: TcpStream, script: Arc<[Step]>) {
    if read_head(&mut s).await.is_none() {
        return;
    }
    for step in script.iter() {
        match step {
            Step::Write(bytes) => {
                if s.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Step::Pause(d) => tokio::time::sleep(*d).await,
            Step::Close => {
                let _ = s.shutdown().await;
                return;
            }
            Step::Reset => {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                return;
            }
            Step::Hold => {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                return;
            }
        }
    }
}
