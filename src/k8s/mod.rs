//! Everything that knows Kubernetes object types: the inputs of a build and the
//! translation from objects to a [`Snapshot`](crate::model::Snapshot), and what
//! Kubernetes mode writes back: Ingress status, by the elected leader.

pub mod gateway_api;
pub mod leader;
pub mod status;
pub mod translate;
pub mod watch;

pub use translate::{Inputs, Options, build, build_with_certs};
