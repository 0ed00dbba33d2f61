//! A fake Kubernetes API server for integration tests: never a live cluster.
//!
//! It sits where the cluster would be in the data flow (the source of the objects the
//! kube watchers collect) and speaks enough of the real list/watch protocol for
//! kube-rs 5's `Api`, `watcher` and `reflector`: plain HTTP/1.1 on `127.0.0.1:0`, JSON
//! only, objects kept as `serde_json::Value` per resource, one global
//! monotonically increasing resourceVersion, bounded per-resource watch history with
//! `410 Expired`, bookmarks, label/field selectors, paginated lists, streaming lists
//! (`sendInitialEvents`), get/create/update/patch/delete and `Status` errors.
//!
//! Tests drive it through [`ApiServer`]'s methods (seed and change objects, expire
//! history, drop watches, stop and resume the listener) and read back the
//! [`ApiRequest`] log, which uses RBAC's verbs so it can be diffed against a ClusterRole.
//!
//! Include it with `#[path = "support/apiserver.rs"] mod apiserver;`:
//!
//! ```ignore
//! let server = ApiServer::start().await;            // 127.0.0.1:0, serving already
//! server.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
//!     "metadata": {"namespace": "default", "name": "web"}, "spec": {}}));
//! let ingresses = Api::<Ingress>::all(server.client());  // or server.kubeconfig().path
//! let (reader, writer) = reflector::store();
//! tokio::spawn(reflector(writer, watcher(ingresses, Default::default()))
//!     .default_backoff().for_each(|_| async {}));
//! reader.wait_until_ready().await?;
//! server.delete("ingresses", "default", "web");     // the store sees DELETED
//! server.expire_history(); server.drop_watches();   // 410 Expired, then a relist
//! server.stop().await; server.resume().await;       // outage on the same port
//! assert!(server.requests().iter().all(|r| r.verb != "create"));
//! ```
//!
//! Not modelled: authentication (a bearer token is recorded as [`ApiRequest::user`],
//! never checked) and authorization, admission, protobuf, JSON
//! patch (`application/json-patch+json` gets 415), strategic merge (treated as JSON
//! merge patch), field managers (apply is a JSON merge patch that creates what is
//! missing), delete preconditions and finalizers, create-on-update (a PUT of a missing
//! object is 404), `resourceVersionMatch=Exact` (lists always show the current state).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// One resource type the server knows: where it lives in the API and how it is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: &'static str,
    /// API version inside the group.
    pub version: &'static str,
    /// Plural, lower-case resource name as it appears in URLs and RBAC rules.
    pub plural: &'static str,
    /// `kind` of one object.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the resource has a `status` subresource (main updates keep the stored
    /// status; status updates change nothing else).
    pub has_status: bool,
}

impl ResourceType {
    /// `apiVersion` as written in objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every resource type served. Plural names are unique, so tests name a resource by
/// its plural alone.
pub const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "networking.k8s.io",
        version: "v1",
        plural: "ingresses",
        kind: "Ingress",
        namespaced: true,
        has_status: true,
    },
    ResourceType {
        group: "networking.k8s.io",
        version: "v1",
        plural: "ingressclasses",
        kind: "IngressClass",
        namespaced: false,
        has_status: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        has_status: true,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        has_status: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        has_status: false,
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        has_status: false,
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        has_status: false,
    },
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        has_status: false,
    },
];

fn resource_by_plural(plural: &str) -> Option<&'static ResourceType> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

fn resource_by_path(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

fn resource_by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// One request the server answered, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// RBAC verb: `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// API group of the resource; empty for the core group and for non-resource URLs.
    pub group: String,
    /// Plural resource name; empty for non-resource URLs (discovery, `/version`).
    pub resource: String,
    /// Subresource such as `status`, if any.
    pub subresource: Option<String>,
    /// Namespace from the URL; `None` for cluster-wide requests.
    pub namespace: Option<String>,
    /// Object name from the URL, for get/update/patch/delete.
    pub name: Option<String>,
    /// The URL path (without the query).
    pub path: String,
    /// The raw query string, as the client sent it.
    pub query: String,
    /// HTTP status sent. A watch that was answered with an in-stream `410 Expired`
    /// error event is logged as 410 although the HTTP status line said 200.
    pub status: u16,
    /// The bearer token the client sent, if any: who asked. Tokens are not checked;
    /// [`ApiServer::kubeconfig_as`] gives each client its own, so that tests can tell
    /// several clients (such as replicas) apart.
    pub user: Option<String>,
}

/// Knobs for a server; `Default` suits most tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many events each resource's watch history keeps before a watch from an
    /// older resourceVersion is answered with `410 Expired`.
    pub history_limit: usize,
    /// How often an idle watch that asked for bookmarks gets a BOOKMARK event.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// One change in a resource's history.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: ChangeKind,
    /// The object after the change (for deletes: the deleted object, stamped with the
    /// deletion's resourceVersion).
    object: Value,
    /// The object before the change, for selector transitions on MODIFIED.
    old: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Default)]
struct History {
    changes: VecDeque<Change>,
    /// Watches from a resourceVersion below this have missed events: 410 Expired.
    floor: u64,
}

type Key = (String, String);

struct State {
    rv: u64,
    uid_counter: u64,
    expired_watches: usize,
    objects: HashMap<&'static str, BTreeMap<Key, Value>>,
    history: HashMap<&'static str, History>,
    requests: Vec<ApiRequest>,
    /// Resources (plural names) every request for is answered 403 Forbidden.
    forbidden: BTreeSet<String>,
}

struct Shared {
    options: Options,
    state: Mutex<State>,
    /// Carries the latest resourceVersion; bumped on every change so watches wake up.
    changes: watch::Sender<u64>,
    /// Bumped by `drop_watches`: every open watch ends its stream.
    drops: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the server state from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to a running fake API server. Dropping it shuts the server down.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    serving: Mutex<Option<JoinHandle<()>>>,
}

/// An error from a write through the harness API, shaped like the server's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code (404, 409, 422, ...).
    pub code: u16,
    /// The Kubernetes `Status` reason (`NotFound`, `Conflict`, `AlreadyExists`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn status(&self) -> Value {
        status_json(self.code, self.reason, &self.message)
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

impl ApiServer {
    /// Starts a server with default [`Options`] on `127.0.0.1:0`. It accepts
    /// connections once this returns.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts a server with the given options on `127.0.0.1:0`.
    pub async fn start_with(options: Options) -> Self {
        let listener = bind("127.0.0.1:0".parse().expect("literal socket address"))
            .expect("bind 127.0.0.1:0 for the fake API server");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shared = Arc::new(Shared {
            options,
            state: Mutex::new(State {
                rv: 1,
                uid_counter: 0,
                expired_watches: 0,
                objects: HashMap::new(),
                history: HashMap::new(),
                requests: Vec::new(),
                forbidden: BTreeSet::new(),
            }),
            changes: watch::channel(1).0,
            drops: watch::channel(0).0,
        });
        let serving = tokio::spawn(serve(listener, shared.clone()));
        Self {
            shared,
            addr,
            serving: Mutex::new(Some(serving)),
        }
    }

    /// The listening address (loopback, port fixed for the life of the handle).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client pointing straight at this server: no auth, no TLS, namespace
    /// `default`. Installs ring as the rustls process default first.
    pub fn client(&self) -> kube::Client {
        install_crypto_provider();
        let config = kube::Config::new(self.url().parse().expect("server URL is a valid URI"));
        kube::Client::try_from(config).expect("kube client for the fake API server")
    }

    /// Kubeconfig YAML for this server: one cluster, one context, no credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        self.kubeconfig_yaml_with_user("{}")
    }

    /// Like [`Self::kubeconfig`], with bearer token `user`: requests made with it are
    /// logged with [`ApiRequest::user`] set to `user`.
    pub fn kubeconfig_as(&self, user: &str) -> Kubeconfig {
        self.kubeconfig_as_in(user, "default")
    }

    /// Like [`Self::kubeconfig_as`], with `namespace` as the context's namespace.
    pub fn kubeconfig_as_in(&self, user: &str, namespace: &str) -> Kubeconfig {
        let dir = tempfile::tempdir().expect("temporary directory for a kubeconfig");
        let path = dir.path().join("kubeconfig");
        let yaml = self
            .kubeconfig_yaml_with_user(&format!("{{token: {user}}}"))
            .replace("namespace: default\n", &format!("namespace: {namespace}\n"));
        std::fs::write(&path, yaml).expect("write kubeconfig");
        Kubeconfig { _dir: dir, path }
    }

    /// From now on, every request for `resource` (plural name, such as `"leases"`) is
    /// answered `403 Forbidden` with the API server's message naming user, verb,
    /// resource and namespace, as when RBAC grants nothing on it.
    pub fn forbid(&self, resource: &str) {
        self.shared.lock().forbidden.insert(resource.to_string());
    }

    fn kubeconfig_yaml_with_user(&self, user: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n\
             \x20 cluster:\n\
             \x20   server: {url}\n\
             users:\n\
             - name: fake\n\
             \x20 user: {user}\n\
             contexts:\n\
             - name: fake\n\
             \x20 context:\n\
             \x20   cluster: fake\n\
             \x20   user: fake\n\
             \x20   namespace: default\n\
             current-context: fake\n",
            url = self.url(),
        )
    }

    /// Writes [`Self::kubeconfig_yaml`] to `kubeconfig` in a fresh temporary directory.
    /// The file lives as long as the returned [`Kubeconfig`].
    pub fn kubeconfig(&self) -> Kubeconfig {
        let dir = tempfile::tempdir().expect("temporary directory for a kubeconfig");
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml()).expect("write kubeconfig");
        Kubeconfig { _dir: dir, path }
    }

    /// Creates or replaces an object (upsert), like `kubectl apply` without field
    /// management. The object needs `apiVersion`, `kind` and `metadata.name`
    /// (and `metadata.namespace` for namespaced kinds; `default` if missing). Fills
    /// `uid` and `creationTimestamp` when absent and stamps a new resourceVersion,
    /// unless nothing changed. Returns the stored object. Panics on a malformed object.
    pub fn apply(&self, obj: impl serde::Serialize) -> Value {
        let mut obj = serde_json::to_value(obj).expect("object serializes to JSON");
        // An upsert has no precondition.
        metadata_mut(&mut obj).remove("resourceVersion");
        let (rt, ns, name) = identify(&obj).unwrap_or_else(|e| panic!("apply: {}", e.message));
        let mut st = self.shared.lock();
        let exists = st.get(rt, &ns, &name).is_some();
        let out = if exists {
            st.replace(&self.shared, rt, &ns, &name, obj, Replace::All)
        } else {
            st.create(&self.shared, rt, &ns, obj)
        };
        out.unwrap_or_else(|e| panic!("apply {}/{ns}/{name}: {}", rt.plural, e.message))
    }

    /// Creates an object; `Err` with 409 `AlreadyExists` if it exists.
    pub fn create(&self, obj: impl serde::Serialize) -> Result<Value, ApiError> {
        let obj = serde_json::to_value(obj).expect("object serializes to JSON");
        let (rt, ns, _) = identify(&obj)?;
        self.shared.lock().create(&self.shared, rt, &ns, obj)
    }

    /// Replaces an existing object; `Err` 404 if missing, 409 `Conflict` if the object
    /// carries a `metadata.resourceVersion` that is not the stored one.
    pub fn update(&self, obj: impl serde::Serialize) -> Result<Value, ApiError> {
        let obj = serde_json::to_value(obj).expect("object serializes to JSON");
        let (rt, ns, name) = identify(&obj)?;
        self.shared
            .lock()
            .replace(&self.shared, rt, &ns, &name, obj, Replace::All)
    }

    /// Deletes an object by plural resource name (`"ingresses"`), namespace (ignored
    /// for cluster-scoped kinds) and name. Returns the deleted object, if it existed.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let rt =
            resource_by_plural(resource).unwrap_or_else(|| panic!("unknown resource {resource:?}"));
        let ns = if rt.namespaced { namespace } else { "" };
        self.shared.lock().delete(&self.shared, rt, ns, name).ok()
    }

    /// The stored object, if any.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let rt =
            resource_by_plural(resource).unwrap_or_else(|| panic!("unknown resource {resource:?}"));
        let ns = if rt.namespaced { namespace } else { "" };
        self.shared.lock().get(rt, ns, name).cloned()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets all watch history: every watch (open or new) from a resourceVersion
    /// issued before this call is answered with a `410 Expired` error event. Lists
    /// made afterwards return a newer resourceVersion that can be watched again.
    pub fn expire_history(&self) {
        let mut st = self.shared.lock();
        st.rv += 1;
        let floor = st.rv;
        for rt in RESOURCES {
            let h = st.history.entry(rt.plural).or_default();
            h.changes.clear();
            h.floor = floor;
        }
        self.shared.changes.send_replace(floor);
    }

    /// Ends every open watch stream cleanly (the final chunk is sent), as an API server
    /// does when a watch times out; clients are expected to re-watch.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// Closes the listener and every open connection: clients get connection refused
    /// until [`Self::resume`]. Objects and history are kept. Idempotent.
    pub async fn stop(&self) {
        let handle = self.serving.lock().expect("serving lock").take();
        if let Some(handle) = handle {
            handle.abort();
            // Wait until the listener and connections are really gone.
            let _ = handle.await;
        }
    }

    /// Same as [`Self::stop`]; reads better next to [`Self::resume`].
    pub async fn pause(&self) {
        self.stop().await;
    }

    /// Listens again on the same port after [`Self::stop`]. Idempotent.
    pub async fn resume(&self) {
        let mut serving = self.serving.lock().expect("serving lock");
        if serving.is_some() {
            return;
        }
        let listener = bind(self.addr).expect("rebind the fake API server's port");
        *serving = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.lock().requests.clone()
    }

    /// How many watches (new or already open) were ended with a `410 Expired` event.
    pub fn expired_watches(&self) -> usize {
        self.shared.lock().expired_watches
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// How many logged requests match `verb` on `resource` (plural).
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Ok(mut serving) = self.serving.lock()
            && let Some(handle) = serving.take()
        {
            handle.abort();
        }
        // Open watch producers end when their receivers go with the connections.
        self.shared.drops.send_modify(|g| *g += 1);
    }
}

/// A kubeconfig file in a temporary directory; removed on drop.
pub struct Kubeconfig {
    _dir: tempfile::TempDir,
    /// Path of the kubeconfig file.
    pub path: PathBuf,
}

/// Installs ring as the rustls process-wide crypto provider, ignoring the error when
/// one is already installed (the project's choice; kube's rustls needs one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes; returns whether
/// it became true. The way tests wait for eventual consistency.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // resume() rebinds the same port while closed connections may sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Accept loop. Owns every connection task, so aborting it closes them all.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON value serializes");
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("static response parts are valid")
}

/// Where a request points, parsed from its path.
struct Target {
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Resource(Target),
    Discovery(Value),
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => {
            return Route::Discovery(json!({
                "major": "1", "minor": "37", "gitVersion": "v1.37.0-portcullis-fake",
                "platform": "linux/amd64"
            }));
        }
        ["api"] => {
            return Route::Discovery(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
            }));
        }
        ["apis"] => return Route::Discovery(group_list()),
        ["api", "v1"] => return Route::Discovery(resource_list("", "v1")),
        ["apis", g, v] => return Route::Discovery(resource_list(g, v)),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::NotFound,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return Route::NotFound,
    };
    let Some(rt) = resource_by_path(group, version, plural) else {
        return Route::NotFound;
    };
    if namespace.is_some() && !rt.namespaced {
        return Route::NotFound;
    }
    Route::Resource(Target {
        rt,
        namespace,
        name,
        subresource,
    })
}

fn group_list() -> Value {
    let mut groups: Vec<(&str, &str)> = RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| (r.group, r.version))
        .collect();
    groups.sort();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Value {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let mut resources = Vec::new();
    for rt in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({
            "name": rt.plural, "singularName": rt.kind.to_lowercase(), "namespaced": rt.namespaced,
            "kind": rt.kind, "verbs": verbs,
        }));
        if rt.has_status {
            resources.push(json!({
                "name": format!("{}/status", rt.plural), "singularName": "", "namespaced": rt.namespaced,
                "kind": rt.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// Outer handler: always answers, and logs what it answered.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let query = parse_query(&raw_query);
    let method = req.method().clone();
    let user = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };

    let target = match route(&path) {
        Route::Resource(t) => t,
        Route::Discovery(value) => {
            let code = if method == Method::GET { 200 } else { 405 };
            shared.lock().log(ApiRequest {
                user: user.clone(),
                ..ApiRequest::non_resource(&method, &path, &raw_query, code)
            });
            return if code == 200 {
                json_response(200, &value)
            } else {
                json_response(
                    405,
                    &status_json(405, "MethodNotAllowed", "method not allowed"),
                )
            };
        }
        Route::NotFound => {
            shared.lock().log(ApiRequest {
                user,
                ..ApiRequest::non_resource(&method, &path, &raw_query, 404)
            });
            return json_response(
                404,
                &status_json(
                    404,
                    "NotFound",
                    &format!("the server could not find {path}"),
                ),
            );
        }
    };

    let is_watch = matches!(
        query.get("watch").map(String::as_str),
        Some("1" | "true" | "True")
    );
    let verb = match (&method, &target.name) {
        (&Method::GET, None) if is_watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        _ => "unsupported",
    };
    let mut logged = ApiRequest {
        verb: verb.to_string(),
        group: target.rt.group.to_string(),
        resource: target.rt.plural.to_string(),
        subresource: target.subresource.clone(),
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        path,
        query: raw_query,
        status: 200,
        user,
    };

    if shared.lock().forbidden.contains(target.rt.plural) {
        let e = forbidden(&logged);
        logged.status = e.code;
        shared.lock().log(logged);
        return json_response(e.code, &e.status());
    }
    if verb == "watch" {
        return start_watch(&shared, &target, &query, logged);
    }
    let result = match verb {
        "list" => list(&shared, &target, &query),
        "get" => get(&shared, &target),
        "create" => create(&shared, &target, &body),
        "update" => update(&shared, &target, &body),
        "patch" => patch(&shared, &target, &content_type, &body),
        "delete" => delete(&shared, &target),
        _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
    };
    let (code, value) = match result {
        Ok((code, v)) => (code, v),
        Err(e) => (e.code, e.status()),
    };
    logged.status = code;
    shared.lock().log(logged);
    json_response(code, &value)
}

/// The API server's answer when RBAC does not allow `request`.
fn forbidden(request: &ApiRequest) -> ApiError {
    let resource = if request.group.is_empty() {
        request.resource.clone()
    } else {
        format!("{}.{}", request.resource, request.group)
    };
    let user = request.user.as_deref().unwrap_or("system:anonymous");
    let scope = match &request.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    ApiError::new(
        403,
        "Forbidden",
        format!(
            "{resource} \"{name}\" is forbidden: User \"{user}\" cannot {verb} resource \"{plural}\" in API group \"{group}\"{scope}",
            name = request.name.as_deref().unwrap_or_default(),
            verb = request.verb,
            plural = request.resource,
            group = request.group,
        ),
    )
}

impl ApiRequest {
    fn non_resource(method: &Method, path: &str, query: &str, status: u16) -> Self {
        Self {
            verb: method.as_str().to_lowercase(),
            group: String::new(),
            resource: String::new(),
            subresource: None,
            namespace: None,
            name: None,
            path: path.to_string(),
            query: query.to_string(),
            status,
            user: None,
        }
    }
}

fn scope_ns(target: &Target) -> Result<String, ApiError> {
    if !target.rt.namespaced {
        return Ok(String::new());
    }
    target.namespace.clone().ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!(
                "{} is namespaced: use /namespaces/{{ns}}/",
                target.rt.plural
            ),
        )
    })
}

fn check_subresource(target: &Target) -> Result<bool, ApiError> {
    match target.subresource.as_deref() {
        None => Ok(false),
        Some("status") if target.rt.has_status => Ok(true),
        Some(other) => Err(ApiError::new(
            404,
            "NotFound",
            format!("{}/{other} is not served", target.rt.plural),
        )),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("body is not JSON: {e}")))
}

fn get(shared: &Shared, target: &Target) -> Result<(u16, Value), ApiError> {
    check_subresource(target)?;
    let ns = scope_ns(target)?;
    let name = target.name.as_deref().unwrap_or_default();
    shared
        .lock()
        .get(target.rt, &ns, name)
        .cloned()
        .map(|v| (200, v))
        .ok_or_else(|| not_found(target.rt, name))
}

fn create(shared: &Shared, target: &Target, body: &[u8]) -> Result<(u16, Value), ApiError> {
    check_subresource(target)?;
    let mut obj = parse_body(body)?;
    let ns = match &target.namespace {
        Some(ns) => ns.clone(),
        None if target.rt.namespaced => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "create of a namespaced kind needs a namespace in the URL",
            ));
        }
        None => String::new(),
    };
    fill_type_meta(&mut obj, target.rt);
    shared
        .lock()
        .create(shared, target.rt, &ns, obj)
        .map(|v| (201, v))
}

fn update(shared: &Shared, target: &Target, body: &[u8]) -> Result<(u16, Value), ApiError> {
    let status_only = check_subresource(target)?;
    let ns = scope_ns(target)?;
    let name = target.name.as_deref().unwrap_or_default();
    let mut obj = parse_body(body)?;
    fill_type_meta(&mut obj, target.rt);
    let mode = if status_only {
        Replace::Status
    } else {
        Replace::Spec
    };
    shared
        .lock()
        .replace(shared, target.rt, &ns, name, obj, mode)
        .map(|v| (200, v))
}

fn patch(
    shared: &Shared,
    target: &Target,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Value), ApiError> {
    let status_only = check_subresource(target)?;
    let ns = scope_ns(target)?;
    let name = target.name.as_deref().unwrap_or_default();
    let patch = parse_body(body)?;
    let media = content_type.split(';').next().unwrap_or("").trim();
    let is_apply = match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" | "application/apply-patch+json" => true,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("patch type {other:?} is not supported by the fake API server"),
            ));
        }
    };
    let mut st = shared.lock();
    let current = match st.get(target.rt, &ns, name) {
        Some(v) => v.clone(),
        None if is_apply && !status_only => {
            // Server-side apply creates what does not exist.
            let mut obj = patch;
            fill_type_meta(&mut obj, target.rt);
            set_path(&mut obj, &["metadata", "name"], json!(name));
            return st.create(shared, target.rt, &ns, obj).map(|v| (201, v));
        }
        None => return Err(not_found(target.rt, name)),
    };
    // A resourceVersion in the patch is a precondition, as on a real server.
    if let Some(rv) = patch
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && Some(rv)
            != current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return Err(conflict(target.rt, name));
    }
    let mut merged = current.clone();
    merge_patch(&mut merged, &patch);
    if let Some(meta) = merged.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    let mode = if status_only {
        Replace::Status
    } else {
        Replace::Spec
    };
    st.replace(shared, target.rt, &ns, name, merged, mode)
        .map(|v| (200, v))
}

fn delete(shared: &Shared, target: &Target) -> Result<(u16, Value), ApiError> {
    if target.subresource.is_some() {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "cannot delete a subresource",
        ));
    }
    let ns = scope_ns(target)?;
    let name = target.name.as_deref().unwrap_or_default();
    shared
        .lock()
        .delete(shared, target.rt, &ns, name)
        .map(|v| (200, v))
}

fn list(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<(u16, Value), ApiError> {
    let selector = Selector::from_query(query)?;
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return Err(ApiError::new(400, "BadRequest", "limit is not a number")),
    };
    let st = shared.lock();
    // A continue token is "<list resourceVersion>/<namespace>/<name>" of the last item
    // sent; later pages report the first page's resourceVersion like a real server.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let rv = parts.next().and_then(|r| r.parse::<u64>().ok());
            let (Some(rv), Some(ns), Some(name)) = (rv, parts.next(), parts.next()) else {
                return Err(ApiError::new(400, "BadRequest", "malformed continue token"));
            };
            if rv < st.history_floor(target.rt) {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                ));
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
        None => (st.rv, None),
    };
    let mut items = Vec::new();
    let mut next = None;
    let mut last = None;
    if let Some(objects) = st.objects.get(target.rt.plural) {
        let lower = match &after {
            Some(key) => std::ops::Bound::Excluded(key.clone()),
            None => std::ops::Bound::Unbounded,
        };
        for ((ns, name), obj) in objects.range((lower, std::ops::Bound::Unbounded)) {
            if let Some(want) = &target.namespace
                && want != ns
            {
                continue;
            }
            if !selector.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() == l) {
                // More remain: continue after the last item sent.
                next = last.map(|(ns, name): (&String, &String)| format!("{list_rv}/{ns}/{name}"));
                break;
            }
            items.push(obj.clone());
            last = Some((ns, name));
        }
    }
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(list_rv.to_string()));
    if let Some(token) = next {
        metadata.insert("continue".into(), json!(token));
    }
    Ok((
        200,
        json!({
            "kind": format!("{}List", target.rt.kind),
            "apiVersion": target.rt.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    ))
}

fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{}.{} \"{name}\" not found", rt.plural, rt.group),
    )
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            rt.plural, rt.group
        ),
    )
}

/// Which parts of the stored object a replace may change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// Everything (harness writes).
    All,
    /// Everything but `status` when the kind has a status subresource (main resource).
    Spec,
    /// Only `status` (status subresource).
    Status,
}

impl State {
    fn log(&mut self, request: ApiRequest) {
        self.requests.push(request);
    }

    fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(rt.plural)?
            .get(&(ns.to_string(), name.to_string()))
    }

    fn history_floor(&self, rt: &ResourceType) -> u64 {
        self.history.get(rt.plural).map_or(0, |h| h.floor)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, shared: &Shared, rt: &'static ResourceType, change: Change) {
        let limit = shared.options.history_limit.max(1);
        let h = self.history.entry(rt.plural).or_default();
        h.changes.push_back(change);
        while h.changes.len() > limit {
            if let Some(evicted) = h.changes.pop_front() {
                h.floor = h.floor.max(evicted.rv);
            }
        }
        shared.changes.send_replace(self.rv);
    }

    fn create(
        &mut self,
        shared: &Shared,
        rt: &'static ResourceType,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name is required"))?
            .to_string();
        if self.get(rt, ns, &name).is_some() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", rt.plural, rt.group),
            ));
        }
        self.uid_counter += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.uid_counter);
        let rv = self.next_rv();
        let meta = metadata_mut(&mut obj);
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.entry("uid").or_insert(json!(uid));
        meta.entry("creationTimestamp")
            .or_insert(json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects
            .entry(rt.plural)
            .or_default()
            .insert((ns.to_string(), name), obj.clone());
        self.record(
            shared,
            rt,
            Change {
                rv,
                kind: ChangeKind::Added,
                object: obj.clone(),
                old: None,
            },
        );
        Ok(obj)
    }

    fn replace(
        &mut self,
        shared: &Shared,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
        mode: Replace,
    ) -> Result<Value, ApiError> {
        let Some(current) = self.get(rt, ns, name).cloned() else {
            return Err(not_found(rt, name));
        };
        if obj.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "metadata.name does not match the URL",
            ));
        }
        if let Some(rv) = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|rv| !rv.is_empty())
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(conflict(rt, name));
        }
        match mode {
            Replace::All => {}
            Replace::Spec if rt.has_status => {
                set_or_remove(&mut obj, "status", current.get("status").cloned());
            }
            Replace::Spec => {}
            Replace::Status => {
                let status = obj.get("status").cloned();
                obj = current.clone();
                set_or_remove(&mut obj, "status", status);
            }
        }
        // Server-owned metadata survives any write.
        let old_meta = current.get("metadata").cloned().unwrap_or_default();
        let meta = metadata_mut(&mut obj);
        for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        if obj == current {
            // A no-op write does not bump the resourceVersion, as on a real server.
            return Ok(obj);
        }
        if strip_meta_status(&obj) != strip_meta_status(&current) {
            let generation = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut obj).insert("generation".into(), json!(generation + 1));
        }
        let rv = self.next_rv();
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects
            .entry(rt.plural)
            .or_default()
            .insert((ns.to_string(), name.to_string()), obj.clone());
        self.record(
            shared,
            rt,
            Change {
                rv,
                kind: ChangeKind::Modified,
                object: obj.clone(),
                old: Some(current),
            },
        );
        Ok(obj)
    }

    fn delete(
        &mut self,
        shared: &Shared,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = (ns.to_string(), name.to_string());
        let Some(mut obj) = self
            .objects
            .get_mut(rt.plural)
            .and_then(|objects| objects.remove(&key))
        else {
            return Err(not_found(rt, name));
        };
        let rv = self.next_rv();
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.record(
            shared,
            rt,
            Change {
                rv,
                kind: ChangeKind::Deleted,
                object: obj.clone(),
                old: None,
            },
        );
        Ok(obj)
    }
}

fn strip_meta_status(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    v
}

fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = obj.as_object_mut() {
        match value {
            Some(v) => map.insert(field.to_string(), v),
            None => map.remove(field),
        };
    }
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let map = obj.as_object_mut().expect("made an object above");
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("made an object above")
}

fn set_path(obj: &mut Value, path: &[&str], value: Value) {
    let mut cur = obj;
    for (i, key) in path.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let map = cur.as_object_mut().expect("made an object above");
        if i + 1 == path.len() {
            map.insert(key.to_string(), value);
            return;
        }
        cur = map.entry(key.to_string()).or_insert_with(|| json!({}));
    }
}

fn fill_type_meta(obj: &mut Value, rt: &ResourceType) {
    if let Some(map) = obj.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| json!(rt.api_version()));
        map.entry("kind").or_insert_with(|| json!(rt.kind));
    }
}

/// Resource type, namespace and name of a harness-supplied object.
fn identify(obj: &Value) -> Result<(&'static ResourceType, String, String), ApiError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let rt = resource_by_kind(api_version, kind).ok_or_else(|| {
        ApiError::new(
            400,
            "BadRequest",
            format!("unknown apiVersion/kind {api_version:?}/{kind:?}"),
        )
    })?;
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name is required"))?;
    let ns = if rt.namespaced {
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    } else {
        ""
    };
    Ok((rt, ns.to_string(), name.to_string()))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch_map {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Seconds-precision UTC timestamp, as Kubernetes writes creationTimestamp.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&hi), Some(&lo)) if hex(hi).is_some() && hex(lo).is_some() => {
                let value = hex(hi).unwrap_or(0) * 16 + hex(lo).unwrap_or(0);
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed label selector plus field selector; all terms must hold.
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<LabelTerm>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug)]
enum LabelTerm {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    fn from_query(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let mut sel = Selector::default();
        if let Some(ls) = query.get("labelSelector") {
            for term in split_terms(ls) {
                sel.labels.push(parse_label_term(&term)?);
            }
        }
        if let Some(fs) = query.get("fieldSelector") {
            for term in split_terms(fs) {
                let (path, negate, value) = if let Some((k, v)) = term.split_once("!=") {
                    (k, true, v)
                } else if let Some((k, v)) = term.split_once("==") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once('=') {
                    (k, false, v)
                } else {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        format!("invalid field selector term {term:?}"),
                    ));
                };
                sel.fields
                    .push((path.trim().to_string(), negate, value.trim().to_string()));
            }
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|term| match term {
            LabelTerm::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
            LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        });
        labels_ok
            && self.fields.iter().all(|(path, negate, want)| {
                let pointer = format!("/{}", path.replace('.', "/"));
                let got = match obj.pointer(&pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (got == *want) != *negate
            })
    }
}

/// Splits on commas that are not inside parentheses (`a in (x,y),b`).
fn split_terms(s: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_term(term: &str) -> Result<LabelTerm, ApiError> {
    let bad = || {
        ApiError::new(
            400,
            "BadRequest",
            format!("invalid label selector {term:?}"),
        )
    };
    let set = |rest: &str| -> Result<Vec<String>, ApiError> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(bad)?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelTerm::NotEq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Ok(LabelTerm::Eq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Ok(LabelTerm::Eq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(LabelTerm::NotIn(k.trim().into(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(LabelTerm::In(k.trim().into(), set(rest)?));
    }
    if let Some(k) = term.strip_prefix('!') {
        return Ok(LabelTerm::NotExists(k.trim().into()));
    }
    if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
        return Err(bad());
    }
    Ok(LabelTerm::Exists(term.into()))
}

/// Answers a watch: a chunked stream of newline-delimited JSON events, fed by a task
/// that reads the resource's history from the requested resourceVersion.
fn start_watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    mut logged: ApiRequest,
) -> Response<Body> {
    let selector = match Selector::from_query(query) {
        Ok(s) => s,
        Err(e) => {
            logged.status = e.code;
            shared.lock().log(logged);
            return json_response(e.code, &e.status());
        }
    };
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);

    let mut st = shared.lock();
    let rt = target.rt;
    // "" and "0" mean "start now, beginning with synthetic ADDED for what exists";
    // sendInitialEvents asks for the same and a closing bookmark.
    let (position, initial): (u64, Vec<Value>) =
        if rv_param.is_empty() || rv_param == "0" || send_initial {
            let initial = st
                .objects
                .get(rt.plural)
                .into_iter()
                .flat_map(|m| m.iter())
                .filter(|((ns, _), obj)| {
                    target.namespace.as_ref().is_none_or(|want| want == ns) && selector.matches(obj)
                })
                .map(|(_, obj)| obj.clone())
                .collect();
            (st.rv, initial)
        } else {
            match rv_param.parse::<u64>() {
                Ok(rv) => (rv, Vec::new()),
                Err(_) => {
                    drop(st);
                    let e = ApiError::new(400, "BadRequest", "resourceVersion is not a number");
                    logged.status = e.code;
                    shared.lock().log(logged);
                    return json_response(e.code, &e.status());
                }
            }
        };
    // Subscribed under the state lock, so no change or drop after this point is missed.
    let changes = shared.changes.subscribe();
    let drops = shared.drops.subscribe();
    let expired = position < st.history_floor(rt);
    logged.status = if expired { 410 } else { 200 };
    st.log(logged);
    drop(st);

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stream = WatchStream {
        shared: shared.clone(),
        rt,
        namespace: target.namespace.clone(),
        selector,
        position,
        bookmarks,
        changes,
        drops,
        tx,
    };
    tokio::spawn(stream.run(initial, send_initial, expired, timeout));

    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    }));
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(body))
        .expect("static response parts are valid")
}

struct WatchStream {
    shared: Arc<Shared>,
    rt: &'static ResourceType,
    namespace: Option<String>,
    selector: Selector,
    /// The resourceVersion up to which this watch has delivered everything.
    position: u64,
    bookmarks: bool,
    /// Wakes the stream on every change (subscribed when the request was answered).
    changes: watch::Receiver<u64>,
    /// Ends the stream on `drop_watches`.
    drops: watch::Receiver<u64>,
    tx: mpsc::Sender<Bytes>,
}

impl WatchStream {
    async fn run(
        mut self,
        initial: Vec<Value>,
        send_initial: bool,
        expired: bool,
        timeout: Option<Duration>,
    ) {
        if expired {
            self.send_expired().await;
            return;
        }
        for obj in initial {
            if !self.send("ADDED", obj).await {
                return;
            }
        }
        if send_initial {
            let bookmark = self.bookmark(true);
            if !self.send_raw(bookmark).await {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(self.shared.options.bookmark_interval);
        ticker.tick().await; // the first tick is immediate
        loop {
            // Drain history past our position.
            let (events, expired) = {
                let st = self.shared.lock();
                let h = st.history.get(self.rt.plural);
                let floor = h.map_or(0, |h| h.floor);
                if self.position < floor {
                    (Vec::new(), true)
                } else {
                    let events: Vec<Change> = h
                        .into_iter()
                        .flat_map(|h| h.changes.iter())
                        .filter(|c| c.rv > self.position)
                        .cloned()
                        .collect();
                    (events, false)
                }
            };
            if expired {
                self.send_expired().await;
                return;
            }
            for change in events {
                self.position = change.rv;
                if let Some((kind, obj)) = self.filter(change)
                    && !self.send(kind, obj).await
                {
                    return;
                }
            }
            let sleep_until = deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(24 * 3600));
            tokio::select! {
                changed = self.changes.changed() => if changed.is_err() { return },
                _ = self.drops.changed() => return,
                _ = tokio::time::sleep_until(sleep_until) => return,
                _ = ticker.tick() => if self.bookmarks && !self.bookmark_if_idle().await { return },
            }
        }
    }

    /// Sends a BOOKMARK at the global resourceVersion when no change to this resource
    /// is pending past our position, i.e. everything up to it has been delivered.
    /// False once the client has gone.
    async fn bookmark_if_idle(&mut self) -> bool {
        let bookmark = {
            let st = self.shared.lock();
            let pending = st
                .history
                .get(self.rt.plural)
                .and_then(|h| h.changes.back())
                .is_some_and(|c| c.rv > self.position);
            if pending {
                return true;
            }
            self.position = self.position.max(st.rv);
            self.bookmark(false)
        };
        self.send_raw(bookmark).await
    }

    /// Applies selectors to a change, turning selector transitions into ADDED/DELETED.
    fn filter(&self, change: Change) -> Option<(&'static str, Value)> {
        let in_scope = |obj: &Value| {
            let ns_ok = self.namespace.as_ref().is_none_or(|want| {
                obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(want)
            });
            ns_ok && self.selector.matches(obj)
        };
        let new = in_scope(&change.object);
        match change.kind {
            ChangeKind::Added => new.then_some(("ADDED", change.object)),
            ChangeKind::Deleted => new.then_some(("DELETED", change.object)),
            ChangeKind::Modified => {
                let old = change.old.as_ref().is_some_and(in_scope);
                match (old, new) {
                    (true, true) => Some(("MODIFIED", change.object)),
                    (false, true) => Some(("ADDED", change.object)),
                    (true, false) => Some(("DELETED", change.object)),
                    (false, false) => None,
                }
            }
        }
    }

    fn bookmark(&self, initial_events_end: bool) -> Value {
        let mut metadata = json!({"resourceVersion": self.position.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({
            "type": "BOOKMARK",
            "object": {"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": metadata},
        })
    }

    async fn send_expired(&self) {
        let message = {
            let mut st = self.shared.lock();
            st.expired_watches += 1;
            format!(
                "too old resource version: {} ({})",
                self.position,
                st.history_floor(self.rt)
            )
        };
        let status = status_json(410, "Expired", &message);
        self.send_raw(json!({"type": "ERROR", "object": status}))
            .await;
    }

    async fn send(&self, kind: &str, object: Value) -> bool {
        self.send_raw(json!({"type": kind, "object": object})).await
    }

    /// False once the client has gone.
    async fn send_raw(&self, event: Value) -> bool {
        let mut line = serde_json::to_vec(&event).expect("JSON value serializes");
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }
}
