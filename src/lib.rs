//! Portcullis: a Kubernetes Layer-7 ingress controller and reverse proxy.
//!
//! ```text
//!  sources                    translate (pure)            publish               serve
//!  kube watchers ─┐
//!  manifest files ┴─► Inputs ──► k8s::build() ──► Snapshot ──► ArcSwap<Snapshot> ──► listeners
//!                                    └──► diagnostics (inside the snapshot)          route ► pick endpoint
//!                                                                                     ► forward ► respond
//! ```
//!
//! - [`model`]: the routing domain (snapshot, route table, matching); no Kubernetes types.
//! - [`k8s`]: Kubernetes object types and their translation into a snapshot.
//! - [`files`]: manifest files as a source of objects (local development).
//! - [`publish`]: debounce, rebuild, swap.
//! - [`commands`]: the `check` and `explain` commands.
//! - [`proxy`]: the data path: listeners, routing per request, forwarding.
//! - [`admin`]: health, readiness, metrics and the `/debug/snapshot` view.
//! - [`dashboard`]: the live web dashboard, its JSON API and `/debug/snapshot`.
//! - [`metrics`]: the explicit prometheus registry and metric handles.
//! - [`accesslog`]: one line per request, written off the request path.
//! - [`echo`]: a test upstream that answers with JSON about each request.
//! - [`certs`]: the generated default certificate and `portcullis certs` (development CA).
//! - [`tls`]: the process' rustls crypto provider.
//! - [`views`]: routes as `check`, `explain` and the dashboard show them (conditions,
//!   filters, weighted backends).
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod certs;
pub mod cli;
pub mod commands;
pub mod dashboard;
pub mod echo;
pub mod files;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod publish;
pub mod run;
pub mod tls;
pub mod views;
