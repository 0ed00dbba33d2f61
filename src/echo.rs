//! A test upstream: answers every request with JSON describing what it received.
//!
//! Sits at the far end of the data flow, where a pod would be. Tests and `portcullis
//! echo` use it to see exactly what the proxy forwarded: method, path, query, host,
//! headers and the body size (counted while streaming, never buffered).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::body::{ProxyBody, full};
use crate::proxy::listener::serve_simple;

/// What the echo upstream answers with.
#[derive(Debug, Serialize)]
pub struct EchoReply {
    /// The name this echo upstream was started with.
    pub name: String,
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The request target as received (path and query; absolute for absolute-form).
    pub uri: String,
    /// `Host`, else the request authority; empty when neither is present.
    pub host: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Header names in lower case; a string, or a list for repeated headers.
    pub headers: BTreeMap<String, Value>,
    pub body_bytes: u64,
}

/// Serves echo replies on `listener` (HTTP/1.1 and h2c) until `shutdown` becomes true.
/// Every request, any method and path, gets `200 application/json` with an
/// [`EchoReply`].
pub async fn serve(listener: TcpListener, name: String, shutdown: watch::Receiver<bool>) {
    let name: std::sync::Arc<str> = name.into();
    serve_simple(listener, "echo", shutdown, move |req| {
        let name = name.clone();
        async move { reply(&name, req).await }
    })
    .await;
}

async fn reply(name: &str, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let mut headers: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in &parts.headers {
        let v = Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
        match headers.get_mut(k.as_str()) {
            None => {
                headers.insert(k.as_str().to_string(), v);
            }
            Some(Value::Array(list)) => list.push(v),
            Some(first) => {
                let prev = first.take();
                *first = Value::Array(vec![prev, v]);
            }
        }
    }
    let host = parts
        .headers
        .get(HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let echo = EchoReply {
        name: name.to_string(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        uri: parts.uri.to_string(),
        host,
        version: format!("{:?}", parts.version),
        headers,
        body_bytes,
    };
    let json = serde_json::to_vec(&echo).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(Bytes::from(json)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
