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
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod files;
pub mod k8s;
pub mod model;
pub mod publish;
pub mod tls;
