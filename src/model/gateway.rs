//! What translation learned about Gateway API objects: the Gateways and their
//! listeners, and where each route attached or why not. `check`, `explain`, the
//! dashboard and the status writer read this; the data path does not.
//!
//! Reasons are Gateway API's own condition reasons, so the same words appear in
//! diagnostics, in `check` and in `status.conditions`.

use serde::Serialize;

use super::{ObjectRef, RouteKind};

/// One Gateway of one of our GatewayClasses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayInfo {
    #[serde(flatten)]
    pub object: ObjectRef,
    pub class: String,
    /// `metadata.generation`, for `observedGeneration`.
    pub generation: Option<i64>,
    /// Whether the Gateway is accepted (its class is ours and accepted).
    pub accepted: bool,
    /// Whether at least one listener is programmed.
    pub programmed: bool,
    pub listeners: Vec<ListenerInfo>,
}

/// One listener of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    /// The listener's hostname; `None` matches every host.
    pub hostname: Option<String>,
    /// Which of our listeners serves it: `http` or `https`; `None` when not programmed.
    pub served_on: Option<&'static str>,
    /// `Accepted` condition: true, or false with `reason`.
    pub accepted: bool,
    pub programmed: bool,
    pub resolved_refs: bool,
    pub conflicted: bool,
    /// Condition reason when something is wrong (`PortUnavailable`,
    /// `UnsupportedProtocol`, `InvalidRouteKinds`, `HostnameConflict`, …), else
    /// `Accepted`.
    pub reason: String,
    pub message: String,
    /// How many routes attached to this listener.
    pub attached_routes: u32,
}

/// Why a route did or did not attach to one of its parentRefs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum AttachReason {
    Accepted,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
    NoMatchingParent,
    /// The rule's configuration cannot be served at all (Gateway API's
    /// `UnsupportedValue`).
    UnsupportedValue,
}

impl AttachReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachReason::Accepted => "Accepted",
            AttachReason::NotAllowedByListeners => "NotAllowedByListeners",
            AttachReason::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            AttachReason::NoMatchingParent => "NoMatchingParent",
            AttachReason::UnsupportedValue => "UnsupportedValue",
        }
    }
}

/// Whether a route's references resolved (the `ResolvedRefs` condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RefsReason {
    ResolvedRefs,
    BackendNotFound,
    RefNotPermitted,
    InvalidKind,
    UnsupportedProtocol,
}

impl RefsReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefsReason::ResolvedRefs => "ResolvedRefs",
            RefsReason::BackendNotFound => "BackendNotFound",
            RefsReason::RefNotPermitted => "RefNotPermitted",
            RefsReason::InvalidKind => "InvalidKind",
            RefsReason::UnsupportedProtocol => "UnsupportedProtocol",
        }
    }
}

/// One `status.parents[]` entry a route gets from us: its parentRef, and the
/// `Accepted` and `ResolvedRefs` conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteParentStatus {
    /// The Gateway the parentRef names.
    pub gateway: ObjectRef,
    pub section_name: Option<String>,
    pub port: Option<i32>,
    pub accepted: AttachReason,
    pub accepted_message: String,
    pub resolved_refs: RefsReason,
    pub resolved_refs_message: String,
}

/// A Gateway API route of ours (one of its parentRefs names a Gateway of ours), and
/// what became of each such parentRef.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    pub kind: RouteKind,
    #[serde(flatten)]
    pub object: ObjectRef,
    pub generation: Option<i64>,
    /// The hostnames the route serves, after intersection with its listeners; empty
    /// when it attached nowhere.
    pub hostnames: Vec<String>,
    pub parents: Vec<RouteParentStatus>,
}

/// Gateway API's part of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GatewayReport {
    /// GatewayClasses of ours, by name, with whether each is accepted.
    pub classes: Vec<(String, bool)>,
    /// Gateways of our classes, sorted by namespace/name.
    pub gateways: Vec<GatewayInfo>,
    /// Routes with at least one parentRef to a Gateway of ours, sorted by kind,
    /// namespace, name.
    pub routes: Vec<RouteInfo>,
}

impl GatewayReport {
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.gateways.is_empty() && self.routes.is_empty()
    }
}
