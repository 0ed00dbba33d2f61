//! Access log: one line per request, written off the request's path.
//!
//! The data path hands a finished request's [`Entry`] to [`AccessLog::log`], which
//! never blocks: entries go into a bounded channel, and when it is full the entry is
//! dropped and counted in `portcullis_access_log_dropped_total`. A dedicated thread
//! formats entries (`text` or `json`, see [`AccessLogFormat`]) into a buffered writer
//! (stdout in production) and flushes whenever the channel runs empty, then rests for a
//! few milliseconds, so that under load many lines share one wake-up and one write. Formatting happens on that thread: the request only moves
//! values it already holds (cheap clones of its URI and headers) into the entry.
//!
//! The path is logged without its query string; no header other than `Host` and
//! `User-Agent` is logged.

use std::fmt;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;
use http::{Method, Uri};
use prometheus::IntCounter;

use crate::metrics::RouteLabels;

/// Entries that may wait for the writer before new ones are dropped.
pub const DEFAULT_CAPACITY: usize = 4096;

/// `--access-log`: `off`, `json` (one JSON object per line) or `text` (logfmt:
/// `key=value` pairs, values quoted when they contain spaces or quotes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    #[default]
    Off,
    Json,
    Text,
}

/// Where a request was sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// A pod endpoint.
    Addr(SocketAddr),
    /// An ExternalName Service's DNS name and port.
    Name { host: String, port: u16 },
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddr::Addr(a) => a.fmt(f),
            UpstreamAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One finished request, as the data path saw it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request head arrived.
    pub time: SystemTime,
    /// The downstream peer.
    pub client: SocketAddr,
    pub method: Method,
    /// `Host` as received, else the authority of the request target.
    pub host: Option<HeaderValue>,
    /// The request target; only its path is logged.
    pub uri: Uri,
    pub status: u16,
    /// Request body bytes read from downstream.
    pub bytes_in: u64,
    /// Response body bytes sent downstream.
    pub bytes_out: u64,
    /// From the request head's arrival until the response body ended.
    pub duration: Duration,
    /// The last upstream the request was sent to; `None` when it was answered by the
    /// proxy itself before any attempt.
    pub upstream: Option<UpstreamAddr>,
    /// From the first upstream attempt until the upstream's response headers.
    pub upstream_duration: Option<Duration>,
    /// The route taken; empty strings when none matched.
    pub route: RouteLabels,
    pub request_id: HeaderValue,
    pub user_agent: Option<HeaderValue>,
    /// The TLS protocol version of the downstream connection (`TLSv1.3`), `None` on
    /// plain HTTP.
    pub tls_version: Option<&'static str>,
}

/// The sending side of the access log. Cheap to clone; `off` does nothing at all.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Entry>>,
    dropped: Option<IntCounter>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl AccessLog {
    /// An access log that logs nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            tx: None,
            dropped: None,
        }
    }

    /// Logs in `format` to standard output; `off` starts nothing.
    pub fn stdout(format: AccessLogFormat, dropped: IntCounter) -> AccessLog {
        AccessLog::start(format, io::stdout(), dropped, DEFAULT_CAPACITY)
    }

    /// Logs in `format` to `writer` from a dedicated thread, with room for `capacity`
    /// waiting entries; lines beyond that are dropped and counted in `dropped`. The
    /// thread ends, after flushing, once every clone of the returned handle is gone.
    pub fn start<W: Write + Send + 'static>(
        format: AccessLogFormat,
        writer: W,
        dropped: IntCounter,
        capacity: usize,
    ) -> AccessLog {
        if format == AccessLogFormat::Off {
            return AccessLog::off();
        }
        let (tx, rx) = sync_channel(capacity.max(1));
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(format, &rx, writer));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer; access logging is off");
            return AccessLog::off();
        }
        AccessLog {
            tx: Some(tx),
            dropped: Some(dropped),
        }
    }

    /// Whether entries are logged (so whether the data path should collect them).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands `entry` to the writer without waiting; drops and counts it when the
    /// writer is behind.
    pub fn log(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if let Some(d) = &self.dropped {
                    d.inc();
                }
            }
            // The writer thread is gone (its output failed): nothing left to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Entries written before a flush even while more keep arriving.
const MAX_BATCH: usize = 1024;

/// How long the writer rests after each flush. Entries queue meanwhile without waking
/// it, so under load one wake-up and one write cover many requests instead of one each;
/// a line reaches the output at most this much later.
const FLUSH_INTERVAL: Duration = Duration::from_millis(10);

fn write_loop<W: Write>(format: AccessLogFormat, rx: &Receiver<Entry>, writer: W) {
    let mut out = BufWriter::with_capacity(64 * 1024, writer);
    while let Ok(first) = rx.recv() {
        let mut result = write_entry(&mut out, format, &first);
        let mut n = 1;
        while result.is_ok() && n < MAX_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            result = write_entry(&mut out, format, &next);
            n += 1;
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                return;
            }
            tracing::warn!(error = %e, "writing the access log failed");
        }
        std::thread::sleep(FLUSH_INTERVAL);
    }
    let _ = out.flush();
}

/// Writes one entry as one line.
pub fn write_entry<W: Write>(w: &mut W, format: AccessLogFormat, e: &Entry) -> io::Result<()> {
    match format {
        AccessLogFormat::Off => Ok(()),
        AccessLogFormat::Json => {
            write_json(w, e)?;
            w.write_all(b"\n")
        }
        AccessLogFormat::Text => write_text(w, e),
    }
}

/// `host` as logged: `Host`, or `-`.
fn header_str(v: Option<&HeaderValue>) -> Option<&[u8]> {
    v.map(HeaderValue::as_bytes).filter(|b| !b.is_empty())
}

fn write_text<W: Write>(w: &mut W, e: &Entry) -> io::Result<()> {
    write!(w, "time={} client={} method=", Rfc3339(e.time), e.client)?;
    text_value(w, e.method.as_str().as_bytes())?;
    w.write_all(b" host=")?;
    text_opt(w, header_str(e.host.as_ref()))?;
    w.write_all(b" path=")?;
    text_value(w, e.uri.path().as_bytes())?;
    write!(
        w,
        " status={} bytes_in={} bytes_out={} duration={:.6} upstream=",
        e.status,
        e.bytes_in,
        e.bytes_out,
        e.duration.as_secs_f64()
    )?;
    match &e.upstream {
        Some(UpstreamAddr::Addr(a)) => write!(w, "{a}")?,
        Some(UpstreamAddr::Name { host, port }) => {
            text_value(w, host.as_bytes())?;
            write!(w, ":{port}")?;
        }
        None => w.write_all(b"-")?,
    }
    match e.upstream_duration {
        Some(d) => write!(w, " upstream_duration={:.6}", d.as_secs_f64())?,
        None => w.write_all(b" upstream_duration=-")?,
    }
    for (key, v) in [
        (" namespace=", &*e.route.namespace),
        (" route_kind=", e.route.route_kind),
        (" route=", &*e.route.route),
        (" service=", &*e.route.service),
    ] {
        w.write_all(key.as_bytes())?;
        text_opt(w, Some(v.as_bytes()).filter(|b| !b.is_empty()))?;
    }
    w.write_all(b" request_id=")?;
    text_opt(w, Some(e.request_id.as_bytes()).filter(|b| !b.is_empty()))?;
    w.write_all(b" user_agent=")?;
    text_opt(w, header_str(e.user_agent.as_ref()))?;
    w.write_all(b" tls=")?;
    text_opt(w, e.tls_version.map(str::as_bytes))?;
    w.write_all(b"\n")
}

fn text_opt<W: Write>(w: &mut W, v: Option<&[u8]>) -> io::Result<()> {
    match v {
        Some(v) => text_value(w, v),
        None => w.write_all(b"-"),
    }
}

/// A logfmt value: bare when it is plain visible ASCII without `"`, `=` or `\`;
/// otherwise quoted, with `"` and `\` escaped and other bytes outside visible ASCII
/// as `\xNN`, so a line can never be split or forged by what a client sent.
fn text_value<W: Write>(w: &mut W, v: &[u8]) -> io::Result<()> {
    let plain = !v.is_empty()
        && v.iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if plain {
        return w.write_all(v);
    }
    w.write_all(b"\"")?;
    for &b in v {
        match b {
            b'"' => w.write_all(b"\\\"")?,
            b'\\' => w.write_all(b"\\\\")?,
            b' ' => w.write_all(b" ")?,
            b if b.is_ascii_graphic() => w.write_all(&[b])?,
            b => write!(w, "\\x{b:02x}")?,
        }
    }
    w.write_all(b"\"")
}

/// Writes the JSON form of an entry: one object, fields in a fixed order, absent values
/// `null`, durations in seconds. Formatted by hand into the writer's buffer (no `Value`,
/// no per-field `fmt` machinery): strings are copied as they are unless they need JSON
/// escapes, numbers are written digit by digit.
fn write_json<W: Write>(w: &mut W, e: &Entry) -> io::Result<()> {
    w.write_all(b"{\"time\":\"")?;
    w.write_all(&rfc3339_bytes(e.time))?;
    w.write_all(b"\",\"client\":\"")?;
    write_socket_addr(w, e.client)?;
    w.write_all(b"\",\"method\":")?;
    json_str(w, e.method.as_str().as_bytes())?;
    w.write_all(b",\"host\":")?;
    json_header(w, e.host.as_ref())?;
    w.write_all(b",\"path\":")?;
    json_str(w, e.uri.path().as_bytes())?;
    w.write_all(b",\"status\":")?;
    write_u64(w, u64::from(e.status))?;
    w.write_all(b",\"bytes_in\":")?;
    write_u64(w, e.bytes_in)?;
    w.write_all(b",\"bytes_out\":")?;
    write_u64(w, e.bytes_out)?;
    w.write_all(b",\"duration_seconds\":")?;
    write_seconds(w, e.duration)?;
    w.write_all(b",\"upstream\":")?;
    match &e.upstream {
        Some(UpstreamAddr::Addr(a)) => {
            w.write_all(b"\"")?;
            write_socket_addr(w, *a)?;
            w.write_all(b"\"")?;
        }
        Some(UpstreamAddr::Name { host, port }) => {
            json_str(w, format!("{host}:{port}").as_bytes())?;
        }
        None => w.write_all(b"null")?,
    }
    w.write_all(b",\"upstream_duration_seconds\":")?;
    match e.upstream_duration {
        Some(d) => write_seconds(w, d)?,
        None => w.write_all(b"null")?,
    }
    for (key, v) in [
        (&b",\"namespace\":"[..], &*e.route.namespace),
        (b",\"route_kind\":", e.route.route_kind),
        (b",\"route\":", &*e.route.route),
        (b",\"service\":", &*e.route.service),
    ] {
        w.write_all(key)?;
        if v.is_empty() {
            w.write_all(b"null")?;
        } else {
            json_str(w, v.as_bytes())?;
        }
    }
    w.write_all(b",\"request_id\":")?;
    json_header(w, Some(&e.request_id))?;
    w.write_all(b",\"user_agent\":")?;
    json_header(w, e.user_agent.as_ref())?;
    w.write_all(b",\"tls_version\":")?;
    match e.tls_version {
        Some(v) => json_str(w, v.as_bytes())?,
        None => w.write_all(b"null")?,
    }
    w.write_all(b"}")
}

/// A header value as a JSON string (its text, bytes that are not UTF-8 replaced with
/// U+FFFD), or `null`.
fn json_header<W: Write>(w: &mut W, v: Option<&HeaderValue>) -> io::Result<()> {
    match v {
        None => w.write_all(b"null"),
        Some(v) => match std::str::from_utf8(v.as_bytes()) {
            Ok(t) => json_str(w, t.as_bytes()),
            Err(_) => json_str(w, String::from_utf8_lossy(v.as_bytes()).as_bytes()),
        },
    }
}

/// A JSON string from UTF-8 text: `"` and `\` escaped, control characters as `\n`,
/// `\r`, `\t`, `\b`, `\f` or `\u00XX`; everything else as it is.
fn json_str<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(b"\"")?;
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                w.write_all(&s[start..i])?;
                start = i + 1;
                const HEX: &[u8; 16] = b"0123456789abcdef";
                w.write_all(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ])?;
                continue;
            }
            _ => continue,
        };
        w.write_all(&s[start..i])?;
        w.write_all(esc)?;
        start = i + 1;
    }
    w.write_all(&s[start..])?;
    w.write_all(b"\"")
}

/// An unsigned integer in decimal.
fn write_u64<W: Write>(w: &mut W, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.write_all(&buf[i..])
}

/// A duration in seconds as a JSON number with up to nanosecond digits, trailing zeros
/// dropped (`0.0015`, `2.0`): the value `Duration::as_secs_f64` gives.
fn write_seconds<W: Write>(w: &mut W, d: Duration) -> io::Result<()> {
    write_u64(w, d.as_secs())?;
    let mut frac = [0u8; 10];
    frac[0] = b'.';
    let mut nanos = d.subsec_nanos();
    for slot in frac[1..].iter_mut().rev() {
        *slot = b'0' + (nanos % 10) as u8;
        nanos /= 10;
    }
    let mut end = frac.len();
    while end > 2 && frac[end - 1] == b'0' {
        end -= 1;
    }
    w.write_all(&frac[..end])
}

/// A socket address as `1.2.3.4:80` or `[::1]:80`.
fn write_socket_addr<W: Write>(w: &mut W, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(a) => {
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    w.write_all(b".")?;
                }
                write_u64(w, u64::from(octet))?;
            }
            w.write_all(b":")?;
            write_u64(w, u64::from(a.port()))
        }
        SocketAddr::V6(a) => write!(w, "{a}"),
    }
}

/// `Rfc3339`'s text without the formatting machinery: `2025-01-31T12:34:56.789Z`.
fn rfc3339_bytes(t: SystemTime) -> [u8; 24] {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for k in (at..at + width).rev() {
            out[k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, u64::try_from(y.clamp(0, 9999)).unwrap_or(0));
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(d));
    put(11, 2, rem / 3600);
    put(14, 2, (rem / 60) % 60);
    put(17, 2, rem % 60);
    put(20, 3, u64::from(since.subsec_millis()));
    out
}

/// A time as RFC 3339 in UTC with milliseconds: `2025-01-31T12:34:56.789Z`.
pub struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let days = i64::try_from(secs / 86_400).unwrap_or(0);
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60,
            since.subsec_millis()
        )
    }
}

/// Year, month, day of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: UNIX_EPOCH + Duration::from_millis(1_764_301_895_123),
            client: "127.0.0.1:5000".parse().expect("addr"),
            method: Method::GET,
            host: Some(HeaderValue::from_static("a.example")),
            uri: "/x/y?token=secret".parse().expect("uri"),
            status: 200,
            bytes_in: 3,
            bytes_out: 12,
            duration: Duration::from_micros(1500),
            upstream: Some(UpstreamAddr::Addr("10.0.0.1:8080".parse().expect("addr"))),
            upstream_duration: Some(Duration::from_micros(1000)),
            route: RouteLabels {
                namespace: "ns".into(),
                route_kind: "Ingress",
                route: "web".into(),
                service: "svc".into(),
            },
            request_id: HeaderValue::from_static("req-1"),
            user_agent: Some(HeaderValue::from_static("curl/8.5.0 (x)")),
            tls_version: None,
        }
    }

    fn line(format: AccessLogFormat, e: &Entry) -> String {
        let mut out = Vec::new();
        write_entry(&mut out, format, e).expect("write");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(Rfc3339(UNIX_EPOCH).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Rfc3339(UNIX_EPOCH + Duration::from_millis(1_764_301_895_123)).to_string(),
            "2025-11-28T03:51:35.123Z"
        );
        // A leap day.
        assert_eq!(
            Rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)).to_string(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn text_line_has_every_field_and_no_query() {
        let l = line(AccessLogFormat::Text, &entry());
        assert_eq!(
            l,
            "time=2025-11-28T03:51:35.123Z client=127.0.0.1:5000 method=GET host=a.example \
             path=/x/y status=200 bytes_in=3 bytes_out=12 duration=0.001500 \
             upstream=10.0.0.1:8080 upstream_duration=0.001000 namespace=ns route_kind=Ingress \
             route=web service=svc request_id=req-1 user_agent=\"curl/8.5.0 (x)\" tls=-\n"
        );
    }

    #[test]
    fn text_values_cannot_forge_fields_or_lines() {
        let mut e = entry();
        e.host = Some(HeaderValue::from_bytes(b"a\" b=c\xff").expect("header"));
        e.route = RouteLabels::default();
        e.upstream = None;
        e.upstream_duration = None;
        let l = line(AccessLogFormat::Text, &e);
        assert!(l.contains(r#" host="a\" b=c\xff" "#), "{l}");
        assert!(
            l.contains(" namespace=- route_kind=- route=- service=- "),
            "{l}"
        );
        assert!(l.contains(" upstream=- upstream_duration=- "), "{l}");
        assert_eq!(l.matches('\n').count(), 1);
    }

    #[test]
    fn json_strings_are_escaped_and_numbers_exact() {
        let mut e = entry();
        e.host = Some(HeaderValue::from_bytes(b"a\"b\\c\td\xff").expect("header"));
        e.uri = "/p%20q".parse().expect("uri");
        e.user_agent = Some(HeaderValue::from_bytes(b"ua \xe2\x82\xac").expect("header"));
        // Header values cannot hold control characters other than tab; labels can.
        e.route.route = "x\u{1}y\n".into();
        e.duration = Duration::new(2, 0);
        e.upstream_duration = Some(Duration::new(0, 123_456_789));
        e.client = "[2001:db8::1]:443".parse().expect("addr");
        e.time = UNIX_EPOCH + Duration::from_millis(951_782_400_007);
        let l = line(AccessLogFormat::Json, &e);
        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["host"], "a\"b\\c\td\u{fffd}", "{l}");
        assert_eq!(v["user_agent"], "ua \u{20ac}", "{l}");
        assert_eq!(v["route"], "x\u{1}y\n", "{l}");
        assert!(l.contains(r#""route":"x\u0001y\n""#), "{l}");
        assert_eq!(v["route_kind"], "Ingress", "{l}");
        assert_eq!(v["path"], "/p%20q");
        assert_eq!(v["client"], "[2001:db8::1]:443");
        assert_eq!(v["time"], "2000-02-29T00:00:00.007Z");
        assert_eq!(v["duration_seconds"], 2.0);
        assert_eq!(v["upstream_duration_seconds"], 0.123456789);
        assert_eq!(v["bytes_out"], 12);
        assert_eq!(l.matches('\n').count(), 1);
        assert!(l.ends_with("}\n"), "{l}");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 18, "{keys:?}");
    }

    #[test]
    fn json_line_parses_with_nulls_for_absent_values() {
        let mut e = entry();
        e.tls_version = Some("TLSv1.3");
        let v: serde_json::Value =
            serde_json::from_str(&line(AccessLogFormat::Json, &e)).expect("json");
        assert_eq!(v["time"], "2025-11-28T03:51:35.123Z");
        assert_eq!(v["path"], "/x/y");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "10.0.0.1:8080");
        assert_eq!(v["tls_version"], "TLSv1.3");
        assert_eq!(v["duration_seconds"], 0.0015);
        e.route = RouteLabels::default();
        e.user_agent = None;
        let v: serde_json::Value =
            serde_json::from_str(&line(AccessLogFormat::Json, &e)).expect("json");
        assert!(v["namespace"].is_null());
        assert!(v["route_kind"].is_null() && v["route"].is_null());
        assert!(v["user_agent"].is_null());
    }
}
