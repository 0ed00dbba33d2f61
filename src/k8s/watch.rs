//! Kubernetes mode's source: kube-rs reflectors for the five kinds Portcullis reads.
//!
//! One reflector per kind (and per namespace with `--watch-namespace`) keeps a store;
//! every watch event wakes one assembler, which sends the complete current objects to
//! the publisher. Nothing is sent before every reflector has finished its initial list,
//! so the first snapshot (and readiness) reflects the whole cluster. A lost watch backs
//! off and relists; the relist replaces a store atomically, which repairs deletes that
//! were missed. While the API server is unreachable the stores keep their content and
//! the last snapshot keeps serving.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::k8s::Inputs;
use crate::publish::SourceUpdate;

/// Where the Kubernetes API is and what to watch.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Namespaces to watch; empty for all.
    pub namespaces: Vec<String>,
}

/// Why no usable client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API configuration: not in a cluster ({in_cluster}), and no kubeconfig ({kubeconfig})"
    )]
    NoConfig {
        in_cluster: kube::config::InClusterError,
        kubeconfig: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot reach the Kubernetes API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("the Kubernetes API at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
}

/// Makes a client: `--kubeconfig` (with `--context`) when given; else in-cluster
/// configuration; else `KUBECONFIG` or `~/.kube/config` (with `--context`). The API server
/// is asked for its version once, so that a configuration that does not work is
/// reported at startup.
pub async fn client(settings: &KubeSettings) -> Result<Client, ClientError> {
    let options = kube::config::KubeConfigOptions {
        context: settings.context.clone(),
        ..Default::default()
    };
    let config = if let Some(path) = &settings.kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
            ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            }
        })?;
        kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .map_err(|source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?
    } else if settings.context.is_none()
        && let Ok(config) = kube::Config::incluster()
    {
        config
    } else {
        match kube::Config::from_kubeconfig(&options).await {
            Ok(c) => c,
            Err(kubeconfig) => match kube::Config::incluster() {
                Ok(c) if settings.context.is_none() => c,
                Ok(_) => {
                    return Err(ClientError::Kubeconfig {
                        path: "(KUBECONFIG or ~/.kube/config)".into(),
                        source: kubeconfig,
                    });
                }
                Err(in_cluster) => {
                    return Err(ClientError::NoConfig {
                        in_cluster,
                        kubeconfig,
                    });
                }
            },
        }
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(ClientError::Client)?;
    const PROBE: Duration = Duration::from_secs(10);
    match tokio::time::timeout(PROBE, client.apiserver_version()).await {
        Ok(Ok(v)) => info!(%url, version = %v.git_version, "connected to the Kubernetes API"),
        Ok(Err(source)) => return Err(ClientError::Unreachable { url, source }),
        Err(_) => {
            return Err(ClientError::Timeout {
                url,
                secs: PROBE.as_secs(),
            });
        }
    }
    Ok(client)
}

/// Called with the kind's name on every watch error (for metrics).
pub type ErrorHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Called with the kind's name each time its reflector starts a full list again after
/// the first one: the watch lost its place (410 Expired, a desync) and relisted.
pub type RestartHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// What the reflectors report besides objects.
#[derive(Clone)]
struct Hooks {
    on_error: ErrorHook,
    on_restart: RestartHook,
}

/// The stores of one kind, one per watched namespace (or one for all).
struct Stores<K: Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    stores: Vec<Store<K>>,
}

impl<K> Stores<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    /// Every object of the kind. In store (hash) order: translation does not depend on
    /// the order of its inputs.
    fn state(&self) -> Vec<Arc<K>> {
        self.stores.iter().flat_map(|s| s.state()).collect()
    }

    async fn wait_until_ready(&self) {
        for s in &self.stores {
            let _ = s.wait_until_ready().await;
        }
    }
}

fn start<K>(
    client: &Client,
    kind: &'static str,
    namespaces: &[String],
    namespaced: bool,
    fields: Option<&str>,
    changed: &Arc<Notify>,
    hooks: &Hooks,
) -> Stores<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    let apis: Vec<Api<K>> = if namespaced && !namespaces.is_empty() {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    } else {
        vec![Api::all(client.clone())]
    };
    Stores {
        stores: apis
            .into_iter()
            .map(|api| spawn_reflector(api, kind, fields, changed, hooks))
            .collect(),
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    kind: &'static str,
    fields: Option<&str>,
    changed: &Arc<Notify>,
    hooks: &Hooks,
) -> Store<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    let (reader, writer) = reflector::store();
    let mut config = watcher::Config::default();
    if let Some(f) = fields {
        config = config.fields(f);
    }
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|obj: &mut K| obj.managed_fields_mut().clear())
        .reflect(writer);
    let changed = changed.clone();
    let hooks = hooks.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut lists = 0u64;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {
                    lists += 1;
                    if lists > 1 {
                        info!(kind, "watch restarted with a full list");
                        (hooks.on_restart)(kind);
                    }
                }
                Ok(watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying with backoff, the last snapshot keeps serving");
                    (hooks.on_error)(kind);
                }
            }
        }
        debug!(kind, "watch stream ended");
    });
    reader
}

/// Watches the cluster and sends the complete current objects to `tx` after every change,
/// starting once every reflector has synced. Runs until `tx` is closed.
pub async fn run(
    client: Client,
    settings: KubeSettings,
    tx: watch::Sender<Option<Arc<SourceUpdate>>>,
    on_error: ErrorHook,
) {
    run_observed(client, settings, tx, on_error, Arc::new(|_| {})).await;
}

/// [`run`], also calling `on_restart` whenever a kind relists after its first list.
pub async fn run_observed(
    client: Client,
    settings: KubeSettings,
    tx: watch::Sender<Option<Arc<SourceUpdate>>>,
    on_error: ErrorHook,
    on_restart: RestartHook,
) {
    let hooks = Hooks {
        on_error,
        on_restart,
    };
    let changed = Arc::new(Notify::new());
    let ns = &settings.namespaces;
    let ingresses: Stores<Ingress> = start(&client, "Ingress", ns, true, None, &changed, &hooks);
    let services: Stores<Service> = start(&client, "Service", ns, true, None, &changed, &hooks);
    let slices: Stores<EndpointSlice> =
        start(&client, "EndpointSlice", ns, true, None, &changed, &hooks);
    let secrets: Stores<Secret> = start(
        &client,
        "Secret",
        ns,
        true,
        Some("type=kubernetes.io/tls"),
        &changed,
        &hooks,
    );
    let classes = Stores::<IngressClass> {
        stores: vec![spawn_reflector(
            Api::all(client.clone()),
            "IngressClass",
            None,
            &changed,
            &hooks,
        )],
    };

    tokio::select! {
        _ = async {
            ingresses.wait_until_ready().await;
            services.wait_until_ready().await;
            slices.wait_until_ready().await;
            secrets.wait_until_ready().await;
            classes.wait_until_ready().await;
        } => {}
        _ = tx.closed() => return,
    }
    info!("initial sync of all watched kinds complete");
    loop {
        let inputs = Inputs {
            ingresses: ingresses.state(),
            ingress_classes: classes.state(),
            services: services.state(),
            endpoint_slices: slices.state(),
            secrets: secrets.state(),
            ..Inputs::default()
        };
        tx.send_replace(Some(Arc::new(SourceUpdate {
            inputs,
            diagnostics: Vec::new(),
        })));
        tokio::select! {
            _ = changed.notified() => {}
            _ = tx.closed() => return,
        }
    }
}
