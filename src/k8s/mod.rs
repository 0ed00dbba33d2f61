//! Everything that knows Kubernetes object types: the inputs of a build and the
//! translation from objects to a [`Snapshot`](crate::model::Snapshot).

pub mod translate;
pub mod watch;

pub use translate::{Inputs, Options, build};
