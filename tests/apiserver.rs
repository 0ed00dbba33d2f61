//! The fake API server against real kube-rs 5: `Api`, `watcher` and `reflector` see
//! what a real API server would show them, including expiry, outages and conflicts.

#[path = "support/apiserver.rs"]
mod apiserver;

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use apiserver::{ApiServer, Options, eventually};
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Generous: these are "eventually" bounds, not expectations about speed.
const PATIENCE: Duration = Duration::from_secs(30);

fn ingress(ns: &str, name: &str, host: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
        "spec": {"rules": [{"host": host}]},
    })
}

fn secret(ns: &str, name: &str, type_: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "type": type_,
        "data": {},
    })
}

/// Runs a reflector (with kube's default backoff) in the background; the store is
/// ready once the first list is in.
async fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(PATIENCE, reader.wait_until_ready())
        .await
        .expect("reflector ready in time")
        .expect("store writer alive");
    (reader, task)
}

/// `namespace/name` of everything in the store, sorted.
fn keys<K>(store: &Store<K>) -> Vec<String>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut keys: Vec<String> = store
        .state()
        .iter()
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
        .collect();
    keys.sort();
    keys
}

fn host_of(store: &Store<Ingress>, ns: &str, name: &str) -> Option<String> {
    let obj = store.get(&reflector::ObjectRef::new(name).within(ns))?;
    obj.spec.as_ref()?.rules.as_ref()?.first()?.host.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_api_lists_and_gets_without_discovery() {
    let server = ApiServer::start().await;
    server.apply(ingress("team-a", "web", "a.example.com"));
    server.apply(ingress("team-b", "api", "b.example.com"));
    server.apply(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "portcullis"}, "spec": {"controller": "example.com/portcullis"},
    }));
    let client = server.client();

    let all = Api::<Ingress>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list ingresses");
    let mut names: Vec<String> = all.items.iter().map(|i| i.name_any()).collect();
    names.sort();
    assert_eq!(names, ["api", "web"]);
    let list_rv: u64 = all
        .metadata
        .resource_version
        .expect("list carries a resourceVersion")
        .parse()
        .expect("resourceVersion is an integer");
    assert_eq!(list_rv, server.resource_version());

    let team_a = Api::<Ingress>::namespaced(client.clone(), "team-a");
    let only_a = team_a
        .list(&ListParams::default())
        .await
        .expect("list team-a");
    assert_eq!(only_a.items.len(), 1);
    let web = team_a.get("web").await.expect("get web");
    assert!(web.metadata.uid.is_some(), "uid filled in");
    assert!(
        web.metadata.creation_timestamp.is_some(),
        "creationTimestamp filled in"
    );
    assert_eq!(web.metadata.generation, Some(1));

    match team_a.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
        }
        other => panic!("expected a 404 Status, got {other:?}"),
    }

    let classes = Api::<IngressClass>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list ingressclasses");
    assert_eq!(classes.items.len(), 1);
    assert_eq!(classes.items[0].namespace(), None, "cluster-scoped");

    let log = server.requests();
    let seen: Vec<(&str, &str, Option<&str>)> = log
        .iter()
        .map(|r| (r.verb.as_str(), r.resource.as_str(), r.namespace.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            ("list", "ingresses", None),
            ("list", "ingresses", Some("team-a")),
            ("get", "ingresses", Some("team-a")),
            ("get", "ingresses", Some("team-a")),
            ("list", "ingressclasses", None),
        ],
        "typed Api calls need no discovery requests"
    );
    assert_eq!(log[3].status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_with_continue_tokens() {
    let server = ApiServer::start().await;
    for i in 0..7 {
        server.apply(secret("ns", &format!("s{i}"), "Opaque", json!({})));
    }
    let api = Api::<Secret>::namespaced(server.client(), "ns");

    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(3);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.expect("list page");
        pages += 1;
        assert!(page.items.len() <= 3);
        names.extend(page.items.iter().map(|s| s.name_any()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3, "{:?} {:?}", names, server.requests());
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);

    // The watcher pages through the same list with its own page size. kube-core drops
    // the "any" semantic's resourceVersion=0 whenever a limit is set (a real API server
    // would serve RV=0 from its cache and ignore the limit), so paging wins.
    let config = watcher::Config::default().page_size(2).any_semantic();
    let (store, task) = reflect(api, config).await;
    assert_eq!(store.state().len(), 7);
    let lists: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.verb == "list")
        .map(|r| r.query)
        .collect();
    assert_eq!(lists.len(), 3 + 4);
    assert_eq!(lists[3], "&limit=2", "{lists:?}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_sees_initial_objects_then_changes() {
    let server = ApiServer::start().await;
    server.apply(ingress("default", "one", "one.example.com"));
    server.apply(ingress("default", "two", "two.example.com"));
    let (store, task) = reflect(
        Api::<Ingress>::all(server.client()),
        watcher::Config::default(),
    )
    .await;
    assert_eq!(keys(&store), ["default/one", "default/two"]);

    server.apply(ingress("other", "three", "three.example.com"));
    assert!(
        eventually(PATIENCE, || keys(&store)
            .contains(&"other/three".to_string()))
        .await,
        "ADDED reaches the store"
    );

    server
        .update(ingress("default", "one", "uno.example.com"))
        .expect("update one");
    assert!(
        eventually(PATIENCE, || host_of(&store, "default", "one").as_deref()
            == Some("uno.example.com"))
        .await,
        "MODIFIED reaches the store"
    );

    server
        .delete("ingresses", "default", "two")
        .expect("two existed");
    assert!(
        eventually(PATIENCE, || keys(&store) == ["default/one", "other/three"]).await,
        "DELETED reaches the store: {:?}",
        keys(&store)
    );

    // What kube 5's default watcher sends: paged list (limit=500, no resourceVersion),
    // then a watch from the list's resourceVersion with bookmarks and a 290 s timeout.
    let log = server.requests();
    assert!(
        log.iter().all(|r| !r.resource.is_empty()),
        "no discovery: {log:?}"
    );
    let list = log.iter().find(|r| r.verb == "list").expect("a list");
    assert_eq!(list.query, "&limit=500");
    let watch = log.iter().find(|r| r.verb == "watch").expect("a watch");
    assert!(watch.query.contains("watch=true"), "{}", watch.query);
    assert!(
        watch.query.contains("allowWatchBookmarks=true"),
        "{}",
        watch.query
    );
    assert!(
        watch.query.contains("timeoutSeconds=290"),
        "{}",
        watch.query
    );
    assert!(
        !watch.query.contains("sendInitialEvents"),
        "{}",
        watch.query
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_and_field_selectors() {
    let server = ApiServer::start().await;
    server.apply(secret(
        "ns",
        "tls-a",
        "kubernetes.io/tls",
        json!({"tier": "edge"}),
    ));
    server.apply(secret(
        "ns",
        "tls-b",
        "kubernetes.io/tls",
        json!({"tier": "core"}),
    ));
    server.apply(secret(
        "ns",
        "opaque",
        "Opaque",
        json!({"tier": "edge", "team": "x"}),
    ));
    server.apply(secret("other", "tls-c", "kubernetes.io/tls", json!({})));
    let api = Api::<Secret>::all(server.client());
    let names = |list: kube::core::ObjectList<Secret>| {
        let mut n: Vec<String> = list.items.iter().map(|s| s.name_any()).collect();
        n.sort();
        n
    };

    let tls = api
        .list(&ListParams::default().fields("type=kubernetes.io/tls"))
        .await
        .expect("list tls");
    assert_eq!(names(tls), ["tls-a", "tls-b", "tls-c"]);
    let by_ns = api
        .list(&ListParams::default().fields("metadata.namespace=ns,metadata.name!=tls-a"))
        .await
        .expect("list by namespace");
    assert_eq!(names(by_ns), ["opaque", "tls-b"]);
    let edge = api
        .list(&ListParams::default().labels("tier=edge"))
        .await
        .expect("list edge");
    assert_eq!(names(edge), ["opaque", "tls-a"]);
    let not_edge = api
        .list(&ListParams::default().labels("tier!=edge"))
        .await
        .expect("list not edge");
    assert_eq!(names(not_edge), ["tls-b", "tls-c"]);
    let with_team = api
        .list(&ListParams::default().labels("tier,team"))
        .await
        .expect("list with team");
    assert_eq!(names(with_team), ["opaque"]);
    let set_based = api
        .list(&ListParams::default().labels("tier in (edge,core),!team"))
        .await
        .expect("list set-based");
    assert_eq!(names(set_based), ["tls-a", "tls-b"]);

    // A selected watch turns objects entering or leaving the selection into ADDED and
    // DELETED, as a real API server does.
    let config = watcher::Config::default()
        .fields("type=kubernetes.io/tls")
        .labels("tier=edge");
    let (store, task) = reflect(api, config).await;
    assert_eq!(keys(&store), ["ns/tls-a"]);
    server.apply(secret(
        "ns",
        "tls-b",
        "kubernetes.io/tls",
        json!({"tier": "edge"}),
    ));
    server.apply(secret(
        "ns",
        "tls-a",
        "kubernetes.io/tls",
        json!({"tier": "core"}),
    ));
    server.apply(secret("ns", "opaque", "Opaque", json!({"tier": "edge"})));
    assert!(
        eventually(PATIENCE, || keys(&store) == ["ns/tls-b"]).await,
        "selection follows label changes: {:?}",
        keys(&store)
    );
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.verb == "watch")
        .expect("a watch");
    assert!(
        watch.query.contains("labelSelector=tier%3Dedge"),
        "{}",
        watch.query
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_history_makes_the_reflector_relist() {
    let server = ApiServer::start().await;
    for name in ["a", "b", "c"] {
        server.apply(ingress("default", name, "x.example.com"));
    }
    let (store, task) = reflect(
        Api::<Ingress>::all(server.client()),
        watcher::Config::default(),
    )
    .await;
    assert_eq!(keys(&store).len(), 3);
    assert!(eventually(PATIENCE, || server.count("watch", "ingresses") == 1).await);

    // 410 on the open watch (and on any re-watch from an old resourceVersion): the
    // watcher has to start over with a list.
    server.expire_history();
    server.drop_watches();
    assert!(
        eventually(PATIENCE, || server.expired_watches() >= 1
            && server.count("list", "ingresses") >= 2)
        .await,
        "relist after 410: {:?}",
        server.requests()
    );
    // The re-watch after the relist is open (or at least asked for) before the outage.
    assert!(eventually(PATIENCE, || server.count("watch", "ingresses") >= 2).await);

    // A delete that happens while the client cannot watch, whose event is then lost
    // from history: only the relist after the 410 can repair the store.
    server.stop().await;
    let lists_before = server.count("list", "ingresses");
    let expired_before = server.expired_watches();
    server
        .delete("ingresses", "default", "b")
        .expect("b existed");
    server.expire_history();
    server.resume().await;
    assert!(
        eventually(PATIENCE, || keys(&store) == ["default/a", "default/c"]).await,
        "store repaired by relist: {:?}",
        keys(&store)
    );
    assert!(server.expired_watches() > expired_before, "a 410 was sent");
    assert!(
        server.count("list", "ingresses") > lists_before,
        "a relist was made"
    );

    // And it keeps watching afterwards.
    server.apply(ingress("default", "d", "x.example.com"));
    assert!(eventually(PATIENCE, || keys(&store).len() == 3).await);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_recovers_after_the_api_server_comes_back() {
    let server = ApiServer::start().await;
    server.apply(ingress("default", "keep", "keep.example.com"));
    server.apply(ingress("default", "gone", "gone.example.com"));
    let (store, task) = reflect(
        Api::<Ingress>::all(server.client()),
        watcher::Config::default(),
    )
    .await;
    assert_eq!(keys(&store), ["default/gone", "default/keep"]);

    server.stop().await;
    let probe = Api::<Ingress>::all(server.client())
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(
            probe,
            Err(kube::Error::HyperError(_) | kube::Error::Service(_))
        ),
        "a stopped server refuses connections: {probe:?}"
    );
    server
        .delete("ingresses", "default", "gone")
        .expect("gone existed");
    server.apply(ingress("default", "new", "new.example.com"));
    server
        .update(ingress("default", "keep", "kept.example.com"))
        .expect("update keep");
    server.resume().await;

    // History still covers the outage, so the watcher resumes by watching (no relist).
    assert!(
        eventually(PATIENCE, || keys(&store) == ["default/keep", "default/new"]
            && host_of(&store, "default", "keep").as_deref()
                == Some("kept.example.com"))
        .await,
        "store caught up: {:?}",
        keys(&store)
    );
    assert_eq!(server.count("list", "ingresses"), 1, "resumed from history");
    assert_eq!(server.expired_watches(), 0);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watcher_is_served_too() {
    let server = ApiServer::start().await;
    server.apply(ingress("default", "one", "one.example.com"));
    let (store, task) = reflect(
        Api::<Ingress>::all(server.client()),
        watcher::Config::default().streaming_lists(),
    )
    .await;
    assert_eq!(keys(&store), ["default/one"]);
    server.apply(ingress("default", "two", "two.example.com"));
    assert!(eventually(PATIENCE, || keys(&store).len() == 2).await);
    assert_eq!(
        server.count("list", "ingresses"),
        0,
        "no list with streaming lists"
    );
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.verb == "watch")
        .expect("a watch");
    assert!(
        watch.query.contains("sendInitialEvents=true"),
        "{}",
        watch.query
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watch_events_bookmarks_timeout_and_410() {
    let server = ApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    })
    .await;
    server.apply(ingress("default", "one", "one.example.com"));
    let api = Api::<Ingress>::all(server.client());
    let rv = server.resource_version().to_string();

    // From a current resourceVersion: only later changes, bookmarks while idle, and
    // the stream ends after timeoutSeconds.
    let mut events = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .expect("watch")
        .boxed();
    server.apply(ingress("default", "two", "two.example.com"));
    let mut added = Vec::new();
    let mut bookmarks = 0;
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = events.next().await {
            match event.expect("watch event") {
                WatchEvent::Added(i) => added.push(i.name_any()),
                WatchEvent::Bookmark(b) => {
                    assert!(b.metadata.resource_version.parse::<u64>().is_ok());
                    bookmarks += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "timeoutSeconds ends the stream");
    assert_eq!(added, ["two"]);
    assert!(bookmarks >= 1, "idle watch gets bookmarks");

    // From an expired resourceVersion: one ERROR event carrying a 410 Status.
    server.expire_history();
    let mut events = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(PATIENCE, events.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_patch_and_lease_conflict() {
    let server = ApiServer::start().await;
    server.apply(ingress("default", "web", "web.example.com"));
    let client = server.client();
    let ingresses = Api::<Ingress>::namespaced(client.clone(), "default");

    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}});
    let patched = ingresses
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("merge-patch status");
    let ip = |i: &Ingress| {
        i.status
            .as_ref()?
            .load_balancer
            .as_ref()?
            .ingress
            .as_ref()?[0]
            .ip
            .clone()
    };
    assert_eq!(ip(&patched).as_deref(), Some("127.0.0.1"));
    assert_eq!(
        patched.metadata.generation,
        Some(1),
        "status does not bump generation"
    );

    let apply = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example.com"}]}},
    });
    let applied = ingresses
        .patch_status(
            "web",
            &PatchParams::apply("portcullis"),
            &Patch::Apply(&apply),
        )
        .await
        .expect("apply-patch status");
    let lb = applied.status.and_then(|s| s.load_balancer?.ingress);
    assert_eq!(lb.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        lb.expect("lb")[0].hostname.as_deref(),
        Some("lb.example.com")
    );

    // The main resource ignores status, as with a real status subresource.
    let spec_patch = json!({"status": {"loadBalancer": {}}, "metadata": {"labels": {"x": "y"}}});
    ingresses
        .patch("web", &PatchParams::default(), &Patch::Merge(&spec_patch))
        .await
        .expect("merge-patch main resource");
    let stored = server.get("ingresses", "default", "web").expect("web");
    assert_eq!(
        stored["status"]["loadBalancer"]["ingress"][0]["hostname"],
        "lb.example.com"
    );
    assert_eq!(stored["metadata"]["labels"]["x"], "y");

    // Leases: create, update with the current resourceVersion, then a stale one.
    let leases = Api::<Lease>::namespaced(client, "default");
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "portcullis-leader"},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
    }))
    .expect("lease");
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create");
    let mut renewed = created.clone();
    renewed.spec.as_mut().expect("spec").holder_identity = Some("pod-b".into());
    let renewed = leases
        .replace("portcullis-leader", &PostParams::default(), &renewed)
        .await
        .expect("replace with current resourceVersion");
    assert_ne!(renewed.resource_version(), created.resource_version());
    match leases
        .replace("portcullis-leader", &PostParams::default(), &created)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 409);
            assert_eq!(status.reason, "Conflict");
        }
        other => panic!("expected 409 Conflict, got {other:?}"),
    }
    match leases.create(&PostParams::default(), &lease).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.reason, "AlreadyExists"),
        other => panic!("expected 409 AlreadyExists, got {other:?}"),
    }
    let held = leases.get("portcullis-leader").await.expect("get lease");
    assert_eq!(
        held.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("pod-b")
    );

    // The log reads like RBAC: verb, resource, subresource.
    let mut rbac: Vec<(String, String, Option<String>)> = server
        .requests()
        .into_iter()
        .map(|r| (r.verb, r.resource, r.subresource))
        .collect();
    rbac.sort();
    rbac.dedup();
    let s = |v: &str, r: &str, sub: Option<&str>| (v.into(), r.into(), sub.map(Into::into));
    assert_eq!(
        rbac,
        [
            s("create", "leases", None),
            s("get", "leases", None),
            s("patch", "ingresses", None),
            s("patch", "ingresses", Some("status")),
            s("update", "leases", None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_file_drives_a_client() {
    let server = ApiServer::start().await;
    server.apply(ingress("default", "web", "web.example.com"));
    let kubeconfig = server.kubeconfig();
    let parsed = kube::config::Kubeconfig::read_from(&kubeconfig.path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
        .await
        .expect("config from kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let client = kube::Client::try_from(config).expect("client");
    let ingresses = Api::<Ingress>::default_namespaced(client)
        .list(&ListParams::default())
        .await
        .expect("list");
    assert_eq!(ingresses.items.len(), 1);

    // Discovery answers too, for code that asks.
    let core = server
        .client()
        .list_core_api_versions()
        .await
        .expect("/api");
    assert_eq!(core.versions, ["v1"]);
    let networking = server
        .client()
        .list_api_group_resources("networking.k8s.io/v1")
        .await
        .expect("/apis/networking.k8s.io/v1");
    assert!(
        networking
            .resources
            .iter()
            .any(|r| r.name == "ingresses/status")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_resume_without_relisting() {
    let server = ApiServer::start().await;
    server.apply(ingress("default", "one", "one.example.com"));
    let (store, task) = reflect(
        Api::<Ingress>::all(server.client()),
        watcher::Config::default(),
    )
    .await;
    assert!(eventually(PATIENCE, || server.count("watch", "ingresses") == 1).await);

    server.drop_watches();
    assert!(
        eventually(PATIENCE, || server.count("watch", "ingresses") >= 2).await,
        "the watcher re-watches after a clean end of stream"
    );
    server.apply(ingress("default", "two", "two.example.com"));
    assert!(eventually(PATIENCE, || keys(&store).len() == 2).await);
    assert_eq!(
        server.count("list", "ingresses"),
        1,
        "history covered the gap"
    );
    assert_eq!(server.expired_watches(), 0);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_history_expires_old_resource_versions() {
    let server = ApiServer::start_with(Options {
        history_limit: 2,
        ..Options::default()
    })
    .await;
    let api = Api::<Ingress>::all(server.client());
    server.apply(ingress("default", "a", "a.example.com"));
    let old = server.resource_version().to_string();
    for host in ["b", "c", "d"] {
        server.apply(ingress("default", "a", &format!("{host}.example.com")));
    }
    // Two changes are kept: a watch from just before them still works ...
    let recent = (server.resource_version() - 2).to_string();
    let mut events = api
        .watch(&WatchParams::default().timeout(1), &recent)
        .await
        .expect("watch")
        .boxed();
    let mut modified = 0;
    while let Some(Ok(event)) = events.next().await {
        match event {
            WatchEvent::Modified(_) => modified += 1,
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(modified, 2);
    // ... one from before the window gets 410 Expired.
    let mut events = api
        .watch(&WatchParams::default(), &old)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(PATIENCE, events.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert_eq!(server.expired_watches(), 1);
}
