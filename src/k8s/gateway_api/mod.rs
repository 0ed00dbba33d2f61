//! Gateway API types, generated: do not edit. `generate.sh` in this folder rewrites
//! every file here.
//!
//! Source: the standard-channel CRDs of Gateway API v1.6.1
//! (<https://github.com/kubernetes-sigs/gateway-api>, commit
//! `8bb74df00e56ec8f944d48c25e6c1c9c2f6848e3`, `config/crd/standard/`).
//! Generator: kopium 0.24.1, per kind
//! `kopium -f gateway.networking.k8s.io_<kind>.yaml --api-version <version> --schema=disabled --docs --derive Default --derive PartialEq --smart-derive-elision`,
//! then rustfmt.
//!
//! One module per kind, at version `v1`, except ReferenceGrant: `v1beta1` in
//! [`referencegrants`] (served by the standard channel since Gateway API v0.6) and
//! `v1` in [`referencegrants_v1`] (since v1.5).
//! kopium names the types after the CRD's field paths (`HttpRouteRulesMatches`).
//! Clippy is off for these modules: the CRD descriptions trip its doc lints
//! (`doc_lazy_continuation`, `tabs_in_doc_comments`), and generated code is fixed in
//! the generator, not by hand.

#[allow(clippy::all)]
pub mod backendtlspolicies;
#[allow(clippy::all)]
pub mod gatewayclasses;
#[allow(clippy::all)]
pub mod gateways;
#[allow(clippy::all)]
pub mod grpcroutes;
#[allow(clippy::all)]
pub mod httproutes;
#[allow(clippy::all)]
pub mod referencegrants;
#[allow(clippy::all)]
pub mod referencegrants_v1;
