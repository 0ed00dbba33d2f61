//! The cluster manifests agree with the code: the Deployment's arguments parse with the
//! real command line, its ports, probes and environment match what those flags bind and
//! read, and the names that tie the objects together (ServiceAccount, Role, Lease,
//! Service, IngressClass) line up. Schema validation of the rendered kustomizations is
//! `.ci/validate-manifests`; the RBAC rules are diffed against real requests in
//! `tests/kube_status.rs`.

use std::path::Path;

use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use portcullis::cli::{Cli, Command, RunArgs};

fn read<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/base")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("read manifest");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn container(d: &Deployment) -> &Container {
    let pod = d.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

fn run_args(c: &Container) -> RunArgs {
    let args = c.args.clone().unwrap_or_default();
    let argv = std::iter::once("portcullis".to_string()).chain(args);
    match Cli::try_parse_from(argv) {
        Ok(cli) => match cli.command {
            Some(Command::Run(run)) => *run,
            other => panic!("the Deployment does not run `run`: {other:?}"),
        },
        Err(e) => panic!("the Deployment's arguments do not parse: {e}"),
    }
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"))
        .container_port
}

#[test]
fn the_deployment_runs_flags_that_exist_and_matches_them() {
    let d: Deployment = read("deployment.yaml");
    let c = container(&d);
    let args = run_args(c);
    assert!(args.source.manifests.is_empty(), "Kubernetes mode");
    assert_eq!(
        portcullis::accesslog::AccessLogFormat::from(args.access_log),
        portcullis::accesslog::AccessLogFormat::Json,
        "log collectors in the cluster get one JSON object per request"
    );
    assert_eq!(
        args.listen.http_addr.port() as i32,
        container_port(c, "http")
    );
    assert_eq!(
        args.listen.admin_addr.port() as i32,
        container_port(c, "admin")
    );
    assert_eq!(container_port(c, "admin"), 10254);
    assert_eq!(
        args.listen.https_addr.port() as i32,
        container_port(c, "https")
    );
    assert_eq!(container_port(c, "https"), 8443);
    assert!(
        args.listen.admin_addr.ip().is_unspecified(),
        "probes reach it"
    );
    assert!(
        args.listen.dashboard_addr.ip().is_loopback(),
        "the dashboard stays on loopback"
    );
    // Reached with `kubectl port-forward` only: no container port announces it.
    assert!(
        !c.ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|p| p.container_port == i32::from(args.listen.dashboard_addr.port())),
        "the dashboard port is not a container port"
    );

    // Probes on the admin port.
    let probe_path = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = p.and_then(|p| p.http_get.as_ref()).expect("httpGet probe");
        assert_eq!(get.port, IntOrString::String("admin".into()));
        get.path.clone().unwrap_or_default()
    };
    assert_eq!(probe_path(c.liveness_probe.as_ref()), "/healthz");
    assert_eq!(probe_path(c.readiness_probe.as_ref()), "/readyz");

    // The downward API gives what the code reads.
    let env = c.env.as_deref().unwrap_or_default();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ] {
        let got = env
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(got, Some(field), "{name}");
    }

    // Hardened: non-root, read-only, no capabilities, RuntimeDefault seccomp.
    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let pod = d.spec.template.spec.as_ref().expect("pod spec");
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let resources = c.resources.as_ref().expect("resources");
    for key in ["cpu", "memory"] {
        assert!(
            resources
                .requests
                .as_ref()
                .is_some_and(|r| r.contains_key(key))
        );
        assert!(
            resources
                .limits
                .as_ref()
                .is_some_and(|r| r.contains_key(key))
        );
    }
    // Shutdown delay 5 s + grace 30 s + margin.
    assert!(pod.termination_grace_period_seconds.unwrap_or(30) > 35);
    assert!(pod.topology_spread_constraints.is_some());
    assert_eq!(d.spec.replicas, Some(2));
}

#[test]
fn the_names_that_tie_the_objects_together_line_up() {
    let d: Deployment = read("deployment.yaml");
    let ns = d.metadata.namespace.clone().expect("namespace");
    let args = run_args(container(&d));
    let pod = d.spec.template.spec.as_ref().expect("pod spec");
    let labels = d
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod labels");

    // ServiceAccount, bound to both roles.
    let sa: ServiceAccount = read("serviceaccount.yaml");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(sa.metadata.namespace.as_deref(), Some(ns.as_str()));
    let crb: ClusterRoleBinding = read("clusterrolebinding.yaml");
    let rb: RoleBinding = read("rolebinding.yaml");
    for subjects in [&crb.subjects, &rb.subjects] {
        let s = &subjects.as_deref().expect("subjects")[0];
        assert_eq!(s.kind, "ServiceAccount");
        assert_eq!(Some(&s.name), sa.metadata.name.as_ref());
        assert_eq!(s.namespace.as_deref(), Some(ns.as_str()));
    }
    let role: Role = read("role.yaml");
    assert_eq!(rb.role_ref.name, role.metadata.name.clone().expect("name"));
    assert_eq!(role.metadata.namespace.as_deref(), Some(ns.as_str()));
    // The Lease the code elects on is the one the Role names.
    let names: Vec<String> = role
        .rules
        .as_deref()
        .unwrap_or_default()
        .iter()
        .flat_map(|r| r.resource_names.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, vec![args.status.election_id.clone()]);

    // --publish-service names the Service, which selects the pods and their ports.
    let svc: Service = read("service.yaml");
    let publish = args
        .status
        .publish_service
        .clone()
        .expect("--publish-service");
    assert_eq!(Some(&publish.namespace), svc.metadata.namespace.as_ref());
    assert_eq!(Some(&publish.name), svc.metadata.name.as_ref());
    let spec = svc.spec.as_ref().expect("service spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    for (k, v) in spec.selector.as_ref().expect("selector") {
        assert_eq!(labels.get(k), Some(v));
    }
    let ports: Vec<(i32, Option<IntOrString>)> = spec
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| (p.port, p.target_port.clone()))
        .collect();
    assert_eq!(
        ports,
        vec![
            (80, Some(IntOrString::String("http".into()))),
            (443, Some(IntOrString::String("https".into())))
        ]
    );

    let pdb: PodDisruptionBudget = read("poddisruptionbudget.yaml");
    let pdb_spec = pdb.spec.as_ref().expect("pdb spec");
    assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
    for (k, v) in pdb_spec
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .expect("pdb selector")
    {
        assert_eq!(labels.get(k), Some(v));
    }

    // Our controller name; not the default class unless the overlay says so.
    let class: IngressClass = read("ingressclass.yaml");
    assert_eq!(
        class.spec.as_ref().and_then(|s| s.controller.clone()),
        Some(args.source.controller_name.clone())
    );
    assert_eq!(class.metadata.name, Some(args.source.ingress_class.clone()));
    assert!(class.metadata.annotations.is_none());
}

/// The JSON-patch operations of `overlay`'s patch for the object of `kind`.
fn overlay_ops(overlay: &str, kind: &str) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/overlays")
        .join(overlay)
        .join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).expect("read overlay");
    let k: serde_json::Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let patch = k["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .find(|p| p["target"]["kind"] == kind)
        .unwrap_or_else(|| panic!("{overlay} patches no {kind}"));
    serde_saphyr::from_str(patch["patch"].as_str().expect("patch text")).expect("patch ops")
}

/// An HTTPS redirect names the port clients reach: the Service's (443, or the nodeport
/// overlay's nodePort), not the pod's 8443.
#[test]
fn https_redirects_name_the_port_the_service_exposes() {
    let d: Deployment = read("deployment.yaml");
    let c = container(&d);
    let args = run_args(c);
    let svc: Service = read("service.yaml");
    let https = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|p| p.target_port == Some(IntOrString::String("https".into())))
        .expect("a Service port for https");
    assert_eq!(
        args.https_redirect_port.map(i32::from),
        Some(https.port),
        "--https-redirect-port is the Service's HTTPS port"
    );
    assert_ne!(https.port, container_port(c, "https"));

    // The nodeport overlay swaps that argument for its nodePort, at the index it checks.
    let nodeport = overlay_ops("nodeport", "Service")
        .iter()
        .find(|op| op["op"] == "add" && op["path"] == "/spec/ports/1/nodePort")
        .and_then(|op| op["value"].as_i64())
        .expect("the https nodePort");
    let ops = overlay_ops("nodeport", "Deployment");
    let at = |kind: &str| {
        ops.iter()
            .find(|op| op["op"] == kind)
            .unwrap_or_else(|| panic!("no {kind} op"))
    };
    let (test, replace) = (at("test"), at("replace"));
    assert_eq!(test["path"], replace["path"]);
    let index: usize = test["path"]
        .as_str()
        .and_then(|p| p.strip_prefix("/spec/template/spec/containers/0/args/"))
        .and_then(|i| i.parse().ok())
        .expect("an args index");
    let base_args = c.args.as_deref().unwrap_or_default();
    assert_eq!(test["value"], base_args[index].as_str());
    assert_eq!(
        base_args[index],
        format!("--https-redirect-port={}", https.port)
    );
    assert_eq!(
        replace["value"],
        format!("--https-redirect-port={nodeport}").as_str()
    );
}
