//! Manifest files as a source of Kubernetes objects (local development).
//!
//! `--manifests PATH` names files or folders of `.yaml`, `.yml` and `.json` files, with
//! multi-document YAML and `kind: List` supported. A file that does not parse fails the
//! whole load (so nothing is half-applied): the caller keeps what it had. An object that
//! parses as YAML but not as its kind is skipped with a diagnostic naming file, line and
//! field; the rest loads. [`watch()`] re-reads the files that changed when one changes,
//! and keeps the parsed objects (the same `Arc`s) of the others.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::k8s::gateway_api::gatewayclasses::GatewayClass;
use crate::k8s::gateway_api::gateways::Gateway;
use crate::k8s::gateway_api::httproutes::HttpRoute;
use crate::k8s::gateway_api::referencegrants::ReferenceGrant;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info};

use crate::k8s::Inputs;
use crate::model::{Diagnostic, Severity};
use crate::publish::SourceUpdate;

/// Why manifests could not be loaded. Names the file, and the line where known.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}: no .yaml, .yml or .json files found")]
    Empty(PathBuf),
}

impl LoadError {
    /// Whether this is a problem with the content (as opposed to reading the files).
    pub fn is_parse(&self) -> bool {
        matches!(self, LoadError::Parse { .. })
    }
}

/// The objects read from manifest files.
#[derive(Debug, Default)]
pub struct Loaded {
    pub inputs: Inputs,
    /// Objects skipped while reading, and why.
    pub diagnostics: Vec<Diagnostic>,
    /// The files that were read, in order.
    pub files: Vec<PathBuf>,
    /// Number of objects of the kinds Portcullis reads.
    pub objects: usize,
}

impl Loaded {
    pub fn into_update(self) -> SourceUpdate {
        SourceUpdate {
            inputs: self.inputs,
            diagnostics: self.diagnostics,
        }
    }
}

/// The files below `paths`: each path is a file, or a folder searched recursively for
/// `.yaml`, `.yml` and `.json` files (hidden entries skipped), in sorted order.
pub fn manifest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            let before = out.len();
            walk(path, &mut out)?;
            if out.len() == before {
                return Err(LoadError::Empty(path.clone()));
            }
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    // The entry type from the directory listing saves a `stat` per file; a symlink is
    // followed, as `Path::is_dir` does.
    let mut entries: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| {
            e.map(|e| {
                let p = e.path();
                let is_dir = match e.file_type() {
                    Ok(t) if !t.is_symlink() => t.is_dir(),
                    _ => p.is_dir(),
                };
                (p, is_dir)
            })
        })
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for (p, is_dir) in entries {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if is_dir {
            walk(&p, out)?;
        } else if is_manifest(&p) {
            out.push(p);
        }
    }
    Ok(())
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads every manifest below `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    FileCache::default().load(paths)
}

/// Reads manifests from text already in memory (the demo's embedded manifests).
pub fn load_str(name: &str, text: &str) -> Result<Loaded, LoadError> {
    let mut reader = Reader::default();
    reader.add_text(Path::new(name), text)?;
    Ok(finish([&reader]))
}

/// Manifest files as they last parsed, so that a reload parses only the files whose
/// content changed and keeps the objects (the same `Arc`s) of the others.
#[derive(Default)]
struct FileCache {
    files: HashMap<PathBuf, CachedFile>,
}

struct CachedFile {
    fingerprint: Fingerprint,
    /// When the content was read; a file modified about then may have changed again
    /// without a new timestamp, so its content is compared on the next reload.
    read_at: SystemTime,
    sha256: ring::digest::Digest,
    reader: Reader,
}

/// What `stat` says about a file: when any of it changes, the content is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64),
    #[cfg(unix)]
    changed: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino()),
            #[cfg(unix)]
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// File timestamps are coarse (a clock tick, two seconds on FAT) and may come from
/// another clock (network file systems): a file whose timestamp is this close to the
/// time it was read is compared by content on the next reload.
const RACY: Duration = Duration::from_secs(2);

impl CachedFile {
    /// Whether the file may have changed after it was read without a new fingerprint.
    fn racy(&self) -> bool {
        match self.fingerprint.modified {
            Some(m) => m + RACY >= self.read_at,
            None => true,
        }
    }
}

impl FileCache {
    /// Reads every manifest below `paths`, parsing only the files that are new or whose
    /// content changed since the last load. A file that does not parse fails the whole
    /// load, and the cache keeps what it had.
    fn load(&mut self, paths: &[PathBuf]) -> Result<Loaded, LoadError> {
        let files = manifest_files(paths)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Io { path, source }
        };
        let mut fresh: Vec<(PathBuf, CachedFile)> = Vec::new();
        let mut kept: Vec<(PathBuf, Fingerprint, SystemTime)> = Vec::new();
        for file in &files {
            let fingerprint = Fingerprint::of(&std::fs::metadata(file).map_err(io(file))?);
            let cached = self.files.get(file);
            if let Some(c) = cached
                && c.fingerprint == fingerprint
                && !c.racy()
            {
                continue;
            }
            let read_at = SystemTime::now();
            let text = std::fs::read_to_string(file).map_err(io(file))?;
            let sha256 = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            if let Some(c) = cached
                && c.sha256.as_ref() == sha256.as_ref()
            {
                kept.push((file.clone(), fingerprint, read_at));
                continue;
            }
            let mut reader = Reader::default();
            reader.add_text(file, &text)?;
            fresh.push((
                file.clone(),
                CachedFile {
                    fingerprint,
                    read_at,
                    sha256,
                    reader,
                },
            ));
        }
        if !fresh.is_empty() {
            debug!(files = fresh.len(), "manifest files parsed");
        }
        for (file, fingerprint, read_at) in kept {
            if let Some(c) = self.files.get_mut(&file) {
                c.fingerprint = fingerprint;
                c.read_at = read_at;
            }
        }
        self.files.extend(fresh);
        let listed: HashSet<&PathBuf> = files.iter().collect();
        self.files.retain(|path, _| listed.contains(path));
        let mut loaded = finish(
            files
                .iter()
                .filter_map(|f| Some(&self.files.get(f)?.reader)),
        );
        loaded.files = files;
        Ok(loaded)
    }
}

/// Where an object was defined: `file:line`.
type Origin = String;

/// The objects of one text, in order of definition.
#[derive(Default)]
struct Reader {
    ingresses: Vec<(Origin, Arc<Ingress>)>,
    classes: Vec<(Origin, Arc<IngressClass>)>,
    services: Vec<(Origin, Arc<Service>)>,
    slices: Vec<(Origin, Arc<EndpointSlice>)>,
    secrets: Vec<(Origin, Arc<Secret>)>,
    namespaces: Vec<(Origin, Arc<Namespace>)>,
    gateway_classes: Vec<(Origin, Arc<GatewayClass>)>,
    gateways: Vec<(Origin, Arc<Gateway>)>,
    http_routes: Vec<(Origin, Arc<HttpRoute>)>,
    reference_grants: Vec<(Origin, Arc<ReferenceGrant>)>,
    diagnostics: Vec<Diagnostic>,
}

/// YAML limits for manifest files. The parser's defaults (1,024 documents, 250,000 nodes)
/// are sized for small configuration files; an export of a whole cluster is larger, and
/// these files come from the operator. The alias and depth limits that stop "billion
/// laughs" style expansion keep their defaults.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 50_000_000,
            max_events: 100_000_000,
            max_total_scalar_bytes: 1 << 30,
        },
    }
}

impl Reader {
    fn add_text(&mut self, path: &Path, text: &str) -> Result<(), LoadError> {
        let parse_err = |message: String| LoadError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let docs: Vec<(usize, Value)> = if path.extension().and_then(|e| e.to_str()) == Some("json")
        {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| parse_err(format!("line {} column {}: {e}", e.line(), e.column())))?;
            vec![(1, v)]
        } else {
            let docs: Vec<serde_saphyr::Spanned<Value>> =
                serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| {
                    parse_err(
                        e.to_string()
                            .replace("<input>", &path.display().to_string()),
                    )
                })?;
            docs.into_iter()
                .map(|d| (d.referenced.line() as usize, d.value))
                .collect()
        };
        for (line, doc) in docs {
            let origin = format!("{}:{line}", path.display());
            self.add_value(&origin, doc);
        }
        Ok(())
    }

    fn add_value(&mut self, origin: &str, doc: Value) {
        let Value::Object(map) = &doc else {
            if !doc.is_null() {
                // Diagnostics always name a kind; a scalar or list document has none.
                self.diag(
                    "Object",
                    "",
                    "",
                    "",
                    format!("at {origin}: a document must be a Kubernetes object"),
                );
            }
            return;
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if kind == "List" || kind.ends_with("List") && map.contains_key("items") {
            if let Some(Value::Array(items)) = map.get("items") {
                for item in items.clone() {
                    self.add_value(origin, item);
                }
            }
            return;
        }
        let meta = map.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let want = match kind.as_str() {
            "Ingress" | "IngressClass" => "networking.k8s.io/v1",
            "Service" | "Secret" | "Namespace" => "v1",
            "EndpointSlice" => "discovery.k8s.io/v1",
            "GatewayClass" | "Gateway" | "HTTPRoute" => GATEWAY_V1,
            // Both versions are served (v1 since Gateway API v1.5) and share one schema.
            "ReferenceGrant" if api_version == GATEWAY_V1BETA1 => GATEWAY_V1BETA1,
            "ReferenceGrant" => GATEWAY_V1,
            "" => {
                // Diagnostics always name a kind; this object has none to name.
                self.diag(
                    "Object",
                    &namespace,
                    &name,
                    "kind",
                    format!("at {origin}: object has no kind"),
                );
                return;
            }
            other => {
                debug!(kind = other, %origin, "ignoring object of a kind Portcullis does not read");
                return;
            }
        };
        if api_version != want {
            self.diag(
                &kind,
                &namespace,
                &name,
                "apiVersion",
                format!("at {origin}: apiVersion `{api_version}` is not supported for {kind}; use {want}"),
            );
            return;
        }
        if name.is_empty() {
            self.diag(
                &kind,
                &namespace,
                "",
                "metadata.name",
                format!("at {origin}: object has no name"),
            );
            return;
        }
        let namespaced = !matches!(kind.as_str(), "IngressClass" | "Namespace" | "GatewayClass");
        let origin = origin.to_string();
        match kind.as_str() {
            "Ingress" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.ingresses
            }),
            "IngressClass" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.classes
            }),
            "Service" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.services
            }),
            "EndpointSlice" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.slices
            }),
            "Namespace" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.namespaces
            }),
            "GatewayClass" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.gateway_classes
            }),
            "Gateway" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.gateways
            }),
            "HTTPRoute" => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.http_routes
            }),
            "ReferenceGrant" => {
                self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                    &mut r.reference_grants
                })
            }
            _ => self.typed(origin, doc, namespaced, &kind, &namespace, &name, |r| {
                &mut r.secrets
            }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn typed<T: DeserializeOwned + HasMeta>(
        &mut self,
        origin: Origin,
        mut doc: Value,
        namespaced: bool,
        kind: &str,
        namespace: &str,
        name: &str,
        list: impl FnOnce(&mut Self) -> &mut Vec<(Origin, Arc<T>)>,
    ) {
        if namespaced && let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.entry("namespace")
                .or_insert_with(|| Value::String("default".into()));
        }
        match serde_path_to_error::deserialize::<_, T>(doc) {
            Ok(obj) => list(self).push((origin, Arc::new(obj))),
            Err(e) => {
                let field = e.path().to_string();
                let ns = if namespaced { namespace } else { "" };
                self.diag(
                    kind,
                    ns,
                    name,
                    if field == "." { "" } else { &field },
                    format!("at {origin}: {}; the object is skipped", e.inner()),
                );
            }
        }
    }

    fn diag(&mut self, kind: &str, namespace: &str, name: &str, field: &str, reason: String) {
        self.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            field: field.to_string(),
            reason,
        });
    }
}

/// The objects of texts read in this order, later definitions replacing earlier ones.
fn finish<'r, I>(readers: I) -> Loaded
where
    I: IntoIterator<Item = &'r Reader>,
    I::IntoIter: Clone,
{
    let readers = readers.into_iter();
    let mut objects = 0;
    let mut diags: Vec<Diagnostic> = readers
        .clone()
        .flat_map(|r| r.diagnostics.iter().cloned())
        .collect();
    let d = &mut diags;
    let n = &mut objects;
    let inputs = Inputs {
        ingresses: dedup("Ingress", readers.clone().flat_map(|r| &r.ingresses), d, n),
        ingress_classes: dedup(
            "IngressClass",
            readers.clone().flat_map(|r| &r.classes),
            d,
            n,
        ),
        services: dedup("Service", readers.clone().flat_map(|r| &r.services), d, n),
        endpoint_slices: dedup(
            "EndpointSlice",
            readers.clone().flat_map(|r| &r.slices),
            d,
            n,
        ),
        secrets: dedup("Secret", readers.clone().flat_map(|r| &r.secrets), d, n),
        namespaces: dedup(
            "Namespace",
            readers.clone().flat_map(|r| &r.namespaces),
            d,
            n,
        ),
        gateway_classes: dedup(
            "GatewayClass",
            readers.clone().flat_map(|r| &r.gateway_classes),
            d,
            n,
        ),
        gateways: dedup("Gateway", readers.clone().flat_map(|r| &r.gateways), d, n),
        http_routes: dedup(
            "HTTPRoute",
            readers.clone().flat_map(|r| &r.http_routes),
            d,
            n,
        ),
        reference_grants: dedup(
            "ReferenceGrant",
            readers.flat_map(|r| &r.reference_grants),
            d,
            n,
        ),
        last_good_certs: Default::default(),
    };
    Loaded {
        inputs,
        diagnostics: diags,
        files: Vec::new(),
        objects,
    }
}

/// Access to the identity of an object, for duplicate detection.
trait HasMeta {
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
        }
    )*};
}
has_meta!(
    Ingress,
    IngressClass,
    Service,
    EndpointSlice,
    Secret,
    Namespace,
    GatewayClass,
    Gateway,
    HttpRoute,
    ReferenceGrant
);

/// Gateway API's group and versions.
const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
const GATEWAY_V1BETA1: &str = "gateway.networking.k8s.io/v1beta1";

/// Keeps the last definition of each namespace/name, with a warning for the others, as
/// `kubectl apply` of the same files would leave it.
fn dedup<'r, T: HasMeta + 'r>(
    kind: &str,
    objs: impl Iterator<Item = &'r (Origin, Arc<T>)>,
    diags: &mut Vec<Diagnostic>,
    count: &mut usize,
) -> Vec<Arc<T>> {
    let mut index: foldhash::HashMap<(&str, &str), usize> = Default::default();
    let mut out: Vec<Option<&(Origin, Arc<T>)>> = Vec::new();
    for entry in objs {
        let (origin, obj) = entry;
        let key = (
            obj.meta().namespace.as_deref().unwrap_or_default(),
            obj.meta().name.as_deref().unwrap_or_default(),
        );
        if let Some(&i) = index.get(&key) {
            if let Some((first, _)) = &out[i] {
                diags.push(Diagnostic {
                    severity: Severity::Warning,
                    kind: kind.to_string(),
                    namespace: key.0.to_string(),
                    name: key.1.to_string(),
                    field: String::new(),
                    reason: format!(
                        "defined at {first} and again at {origin}; the later one is used"
                    ),
                });
            }
            out[i] = None;
        }
        index.insert(key, out.len());
        out.push(Some(entry));
    }
    let out: Vec<Arc<T>> = out.into_iter().flatten().map(|(_, o)| o.clone()).collect();
    *count += out.len();
    out
}

/// Whether a file event at `changed` can change what `load(paths)` reads. A file argument
/// is watched through its parent folder, so other files there (editor swap files, a
/// browser profile) must not cause reloads: only its own name counts. Below a folder
/// argument, manifest files count, and so do names without an extension, which may be
/// folders that were renamed or removed. Names starting with `..` always count: a
/// Kubernetes ConfigMap volume swaps its `..data` link to update every file at once.
fn touches_manifests(paths: &[PathBuf], changed: &Path) -> bool {
    let name = changed.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with("..") {
        return true;
    }
    paths.iter().any(|arg| {
        if arg.is_dir() {
            is_manifest(changed) || changed.extension().is_none()
        } else {
            arg.file_name()
                .is_some_and(|n| n == changed.file_name().unwrap_or_default())
        }
    })
}

/// How long file events must be quiet before the manifests are re-read after a file was
/// written in place (created, modified, truncated). Short, because a change should be
/// served within tens of milliseconds; a file caught half-written (a writer that pauses,
/// or opens the file more than once) either does not parse (and is read again when the
/// writer's next event comes) or is replaced by its complete content at that next
/// event.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(20);

/// How long file events must be quiet before the manifests are re-read when every event
/// was a rename, a removal or a metadata change: files replaced whole, as editors and
/// deployment tools write them (write a temporary file, rename it into place), so nothing
/// can be caught half-written. Only long enough to take a burst of them in one reload.
pub const RELOAD_SETTLE: Duration = Duration::from_millis(3);

/// What a file event says about the content at its paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileEvent {
    /// Replaced whole (renamed into place), removed, or only its metadata changed.
    Replaced,
    /// Written in place, or anything else (including a lost event queue): perhaps not
    /// complete yet.
    Written,
}

impl FileEvent {
    /// `None` for events that change nothing a load reads (opens, reads, closes).
    fn of(event: &notify::Event) -> Option<FileEvent> {
        use notify::EventKind;
        use notify::event::ModifyKind;
        if event.need_rescan() {
            return Some(FileEvent::Written);
        }
        match event.kind {
            EventKind::Access(_) => None,
            EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Metadata(_))
            | EventKind::Remove(_) => Some(FileEvent::Replaced),
            _ => Some(FileEvent::Written),
        }
    }
}

/// Loads the manifests, then watches them and sends every good load to `tx`. A reload
/// stats every file and parses only those whose content changed; the others keep their
/// objects. A load that fails is logged with file and line, and nothing is sent: the
/// last good configuration stays in force. Returns when `tx` is closed; errors only if
/// the watcher cannot start.
pub async fn watch(
    paths: Vec<PathBuf>,
    tx: watch::Sender<Option<Arc<SourceUpdate>>>,
) -> Result<(), notify::Error> {
    use notify::{RecursiveMode, Watcher};

    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<FileEvent>();
    let watched = paths.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // A lost event queue (inotify overflow) names no path: everything may have changed.
        if let Ok(ev) = res
            && (ev.need_rescan() || ev.paths.iter().any(|p| touches_manifests(&watched, p)))
            && let Some(event) = FileEvent::of(&ev)
        {
            let _ = event_tx.send(event);
        }
    })?;
    // Folders are watched recursively; a file is watched through its parent folder, so
    // that editors which replace the file (write + rename) are seen too.
    for p in &paths {
        if p.is_dir() {
            watcher.watch(p, RecursiveMode::Recursive)?;
        } else {
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            watcher.watch(parent, RecursiveMode::NonRecursive)?;
        }
    }

    // A reload stats every file and parses the changed ones: blocking work, kept off the
    // request-serving threads. The cache moves to the blocking thread and back.
    let paths = Arc::new(paths);
    let mut cache = Some(FileCache::default());
    let mut reload = async |tx: &watch::Sender<Option<Arc<SourceUpdate>>>| {
        let (mut c, p) = (cache.take().unwrap_or_default(), paths.clone());
        let (c, result) = match tokio::task::spawn_blocking(move || {
            let result = c.load(&p);
            (c, result)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                error!(error = %e, "manifests not loaded; the last good configuration stays in force");
                return;
            }
        };
        cache = Some(c);
        match result {
            Ok(loaded) => {
                info!(
                    files = loaded.files.len(),
                    objects = loaded.objects,
                    "manifests loaded"
                );
                tx.send_replace(Some(Arc::new(loaded.into_update())));
            }
            Err(e) => {
                error!(error = %e, "manifests not loaded; the last good configuration stays in force")
            }
        }
    };
    reload(&tx).await;
    loop {
        let first = tokio::select! {
            ev = event_rx.recv() => match ev { Some(ev) => ev, None => return Ok(()) },
            _ = tx.closed() => return Ok(()),
        };
        // Wait until events stop for a moment: briefly while every file was replaced
        // whole, longer once one was written in place.
        let mut quiet = RELOAD_SETTLE;
        let mut next = Some(first);
        while let Some(event) = next.take() {
            if event == FileEvent::Written {
                quiet = RELOAD_DEBOUNCE;
            }
            match tokio::time::timeout(quiet, event_rx.recv()).await {
                Ok(Some(event)) => next = Some(event),
                Ok(None) => return Ok(()),
                Err(_) => {}
            }
        }
        reload(&tx).await;
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, Flag, MetadataKind, ModifyKind, RemoveKind,
        RenameMode,
    };
    use notify::{Event, EventKind};

    use super::*;

    fn of(kind: EventKind) -> Option<FileEvent> {
        FileEvent::of(&Event::new(kind).add_path(PathBuf::from("/m/app.yaml")))
    }

    /// Only a burst of renames, removals and metadata changes is read after the short
    /// settle time: an in-place write, even one its writer closed, may be followed by
    /// another open that appends the rest.
    #[test]
    fn only_whole_replacements_settle_quickly() {
        use FileEvent::{Replaced, Written};
        for (kind, want) in [
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                Some(Replaced),
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                Some(Replaced),
            ),
            (EventKind::Remove(RemoveKind::File), Some(Replaced)),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                Some(Replaced),
            ),
            (EventKind::Create(CreateKind::File), Some(Written)),
            (EventKind::Create(CreateKind::Folder), Some(Written)),
            (
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                Some(Written),
            ),
            (EventKind::Modify(ModifyKind::Any), Some(Written)),
            (EventKind::Any, Some(Written)),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                None,
            ),
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), None),
        ] {
            assert_eq!(of(kind), want, "{kind:?}");
        }
        // A lost event queue names no file and may hide any change.
        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert_eq!(FileEvent::of(&overflow), Some(Written));
    }
}
