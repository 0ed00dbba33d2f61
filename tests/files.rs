//! Manifest files as a source: formats, namespaces, diagnostics with file and line, and
//! the watch that keeps the last good configuration when a file breaks.

use std::sync::Arc;
use std::time::Duration;

use portcullis::files;
use portcullis::model::Severity;
use portcullis::publish::SourceUpdate;
use tokio::sync::watch;

const SERVICE: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";

#[test]
fn reads_multi_document_yaml_lists_and_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        format!(
            "{SERVICE}---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ignored}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        "apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: Service, metadata: {name: api, namespace: shop}, spec: {ports: [{port: 81}]}}\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("sub/c.json"),
        r#"{"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {"name": "pc"}, "spec": {"controller": "portcullis.io/ingress-controller"}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
    let loaded = files::load(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(loaded.files.len(), 3);
    assert_eq!(loaded.objects, 3);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let mut svcs: Vec<_> = loaded
        .inputs
        .services
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap(),
                s.metadata.name.as_deref().unwrap()
            )
        })
        .collect();
    svcs.sort();
    assert_eq!(svcs, ["default/web", "shop/api"]);
    assert_eq!(loaded.inputs.ingress_classes.len(), 1);
}

#[test]
fn wrong_api_version_and_bad_fields_are_diagnostics_naming_file_and_line() {
    let text = format!(
        "{SERVICE}---\napiVersion: extensions/v1beta1\nkind: Ingress\nmetadata: {{name: old}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: typed}}\nspec: {{ports: [{{port: eighty}}]}}\n"
    );
    let loaded = files::load_str("m.yaml", &text).unwrap();
    assert_eq!(
        loaded.inputs.services.len(),
        1,
        "the good Service still loads"
    );
    let d: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d[0].contains("Ingress default/old apiVersion: at m.yaml:6: apiVersion `extensions/v1beta1` is not supported"), "{d:?}");
    assert!(
        d[1].contains("Service default/typed spec.ports[0].port: at m.yaml:10"),
        "{d:?}"
    );
    assert!(
        loaded
            .diagnostics
            .iter()
            .all(|d| d.severity == Severity::Error)
    );
}

#[test]
fn duplicates_keep_the_later_definition_with_a_warning() {
    let text = format!(
        "{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: 81}}]}}\n"
    );
    let loaded = files::load_str("d.yaml", &text).unwrap();
    assert_eq!(loaded.inputs.services.len(), 1);
    let ports = loaded.inputs.services[0]
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap();
    assert_eq!(ports[0].port, 81);
    assert_eq!(loaded.diagnostics.len(), 1);
    assert_eq!(loaded.diagnostics[0].severity, Severity::Warning);
    assert!(loaded.diagnostics[0].reason.contains("d.yaml:1"));
}

#[test]
fn invalid_yaml_fails_the_whole_load_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.yaml"), SERVICE).unwrap();
    std::fs::write(dir.path().join("zbad.yaml"), "a: 1\nb: {c: [\n").unwrap();
    let err = files::load(&[dir.path().to_path_buf()]).unwrap_err();
    assert!(err.is_parse());
    let msg = err.to_string();
    assert!(msg.contains("zbad.yaml"), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
}

/// How long a test waits to be sure that no reload follows a write: many debounce
/// periods, and then some for a loaded machine.
const QUIET: Duration = Duration::from_millis(500);

async fn next_update(rx: &mut watch::Receiver<Option<Arc<SourceUpdate>>>) -> Arc<SourceUpdate> {
    tokio::time::timeout(Duration::from_secs(20), rx.changed())
        .await
        .expect("an update within 20 s")
        .expect("sender alive");
    rx.borrow_and_update().clone().expect("an update")
}

#[tokio::test]
async fn watch_reloads_on_change_and_keeps_the_last_good_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc.yaml");
    std::fs::write(&file, SERVICE).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(files::watch(vec![dir.path().to_path_buf()], tx));

    let first = next_update(&mut rx).await;
    assert_eq!(first.inputs.services.len(), 1);

    // A broken file sends nothing: the last good configuration stays.
    std::fs::write(&file, "kind: [\n").unwrap();
    tokio::time::sleep(QUIET).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a broken file must not replace the last good load"
    );

    // A fixed file is picked up.
    std::fs::write(&file, format!("{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: two}}\nspec: {{ports: [{{port: 80}}]}}\n")).unwrap();
    let fixed = next_update(&mut rx).await;
    assert_eq!(fixed.inputs.services.len(), 2);

    drop(rx);
    task.abort();
}

#[tokio::test]
async fn a_file_argument_ignores_other_files_in_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc.yaml");
    std::fs::write(&file, SERVICE).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(files::watch(vec![file.clone()], tx));
    next_update(&mut rx).await;

    // Neighbours of the watched file, manifests or not, cause no reload.
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    std::fs::write(dir.path().join("other.yaml"), SERVICE).unwrap();
    std::fs::create_dir(dir.path().join("profile")).unwrap();
    tokio::time::sleep(QUIET).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a write next to the watched file must not reload it"
    );

    // The file itself still does.
    std::fs::write(&file, format!("{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: two}}\nspec: {{ports: [{{port: 80}}]}}\n")).unwrap();
    assert_eq!(next_update(&mut rx).await.inputs.services.len(), 2);

    drop(rx);
    task.abort();
}

#[tokio::test]
async fn a_folder_argument_ignores_files_that_are_not_manifests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(files::watch(vec![dir.path().to_path_buf()], tx));
    next_update(&mut rx).await;

    std::fs::write(dir.path().join(".svc.yaml.swp"), "x").unwrap();
    std::fs::write(dir.path().join("README.md"), "x").unwrap();
    tokio::time::sleep(QUIET).await;
    assert!(
        !rx.has_changed().unwrap(),
        "non-manifest files must not reload"
    );

    // A new manifest in the folder does.
    std::fs::write(
        dir.path().join("two.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec: {ports: [{port: 80}]}\n",
    )
    .unwrap();
    assert_eq!(next_update(&mut rx).await.inputs.services.len(), 2);

    drop(rx);
    task.abort();
}

#[test]
fn a_file_with_thousands_of_documents_loads() {
    // More documents than the YAML parser's default budget (1,024) allows.
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..3_000 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n"
        ));
    }
    let file = dir.path().join("many.yaml");
    std::fs::write(&file, text).unwrap();
    let loaded = files::load(&[file]).expect("3,000 documents load");
    assert_eq!(loaded.objects, 3_000);
}

/// A Service `name` with one port, as a manifest file.
fn svc(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n"
    )
}

#[tokio::test]
async fn a_reload_parses_only_changed_files_and_keeps_the_objects_of_the_others() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), svc("a", 80)).unwrap();
    std::fs::write(dir.path().join("b.yaml"), svc("b", 80)).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(files::watch(vec![dir.path().to_path_buf()], tx));
    let by_name = |u: &SourceUpdate, name: &str| {
        u.inputs
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .cloned()
            .unwrap_or_else(|| panic!("Service {name} loaded"))
    };
    let first = next_update(&mut rx).await;

    std::fs::write(dir.path().join("b.yaml"), svc("b", 81)).unwrap();
    let second = next_update(&mut rx).await;
    assert!(
        Arc::ptr_eq(&by_name(&first, "a"), &by_name(&second, "a")),
        "the unchanged file keeps its objects"
    );
    let b = by_name(&second, "b");
    assert_eq!(b.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 81);

    // One file broken while another changes: nothing is sent, and once the broken file
    // is fixed both changes arrive together.
    std::fs::write(dir.path().join("a.yaml"), "kind: [\n").unwrap();
    std::fs::write(dir.path().join("b.yaml"), svc("b", 82)).unwrap();
    tokio::time::sleep(QUIET).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a broken file must not let the other change through"
    );
    std::fs::write(dir.path().join("a.yaml"), svc("a", 83)).unwrap();
    let third = next_update(&mut rx).await;
    let port = |u: &SourceUpdate, name: &str| {
        by_name(u, name)
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0]
            .port
    };
    assert_eq!((port(&third, "a"), port(&third, "b")), (83, 82));

    drop(rx);
    task.abort();
}

/// Waits (up to 20 s) for an update for which `done` holds; earlier updates may be
/// intermediate states.
async fn update_where(
    rx: &mut watch::Receiver<Option<Arc<SourceUpdate>>>,
    done: impl Fn(&SourceUpdate) -> bool,
) -> Arc<SourceUpdate> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let update = next_update(rx).await;
            if done(&update) {
                return update;
            }
        }
    })
    .await
    .expect("the expected update within 20 s")
}

/// A ConfigMap volume as the kubelet updates it: the files are links through `..data`,
/// which is swapped to a new hidden folder by a rename, then the old folder is removed.
#[cfg(unix)]
#[tokio::test]
async fn a_configmap_style_swap_of_the_data_link_is_read() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let two = format!(
        "{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: two}}\nspec: {{ports: [{{port: 80}}]}}\n"
    );
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(root.join("..v1/svc.yaml"), SERVICE).unwrap();
    symlink("..v1", root.join("..data")).unwrap();
    symlink("..data/svc.yaml", root.join("svc.yaml")).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(files::watch(vec![root.to_path_buf()], tx));
    assert_eq!(next_update(&mut rx).await.inputs.services.len(), 1);

    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(root.join("..v2/svc.yaml"), &two).unwrap();
    symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..v1")).unwrap();
    let swapped = update_where(&mut rx, |u| u.inputs.services.len() == 2).await;
    assert!(swapped.diagnostics.is_empty(), "{:?}", swapped.diagnostics);

    drop(rx);
    task.abort();
}

/// Files replaced by a rename, as editors and deployment tools write them, several in a
/// row: the last state of every file is what ends up loaded.
#[tokio::test]
async fn files_renamed_into_place_are_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(dir.path().join(format!("{name}.yaml")), svc(name, 80)).unwrap();
    }
    let (tx, mut rx) = watch::channel(None);
    let task = tokio::spawn(files::watch(vec![dir.path().to_path_buf()], tx));
    assert_eq!(next_update(&mut rx).await.inputs.services.len(), 3);

    for (round, name) in ["a", "b", "c", "a"].iter().enumerate() {
        let tmp = dir.path().join(format!(".{name}.yaml.tmp"));
        std::fs::write(&tmp, svc(name, 81 + round as u16)).unwrap();
        std::fs::rename(&tmp, dir.path().join(format!("{name}.yaml"))).unwrap();
    }
    let ports = |u: &SourceUpdate| {
        let mut p: Vec<(String, i32)> = u
            .inputs
            .services
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap_or_default(),
                    s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
                )
            })
            .collect();
        p.sort();
        p
    };
    let want = vec![
        ("a".to_string(), 84),
        ("b".to_string(), 82),
        ("c".to_string(), 83),
    ];
    update_where(&mut rx, |u| ports(u) == want).await;

    drop(rx);
    task.abort();
}
