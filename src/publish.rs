//! Publish: turn source updates into snapshots and swap them in atomically.
//!
//! Sources send the complete current set of objects ([`SourceUpdate`]) on a `watch`
//! channel, which coalesces bursts by itself. For each change the publisher rebuilds
//! the whole snapshot off the async runtime (at once after a quiet spell, else
//! [`Publisher::debounce`] after the previous build), stamps the next generation and
//! stores it in the one `ArcSwap` that every request loads from. Requests in flight keep the snapshot they loaded; nothing is rebound or
//! closed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::k8s::translate::{Rebuild, Reuse, build_reusable, rebuild};
use crate::k8s::{Inputs, Options};
use crate::model::{Diagnostic, IgnoredIngress, Severity, Snapshot, Upstream};

/// Everything a source knows at one moment.
#[derive(Debug, Default)]
pub struct SourceUpdate {
    pub inputs: Inputs,
    /// Problems the source found before translation (such as an object that does not
    /// parse as its kind); they are added to the snapshot's diagnostics.
    pub diagnostics: Vec<Diagnostic>,
}

/// Called after each publish with the new snapshot and how long translate + swap took.
pub type PublishHook = Box<dyn Fn(&Snapshot, Duration) + Send + Sync>;

/// Builds and publishes snapshots.
pub struct Publisher {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    /// True once the first snapshot is published.
    pub ready: Arc<AtomicBool>,
    pub options: Options,
    /// The least time from the end of one build to the start of the next: a change
    /// after a quiet spell is built at once, and while changes keep coming each build
    /// takes all that arrived during this time and the build before. Zero for a source
    /// that debounces its own changes (the manifest files).
    pub debounce: Duration,
    hooks: Vec<PublishHook>,
    /// The last published snapshot, the update it was built from, and what lets the next
    /// build reuse it when only EndpointSlices changed.
    last: Mutex<Option<Built>>,
}

struct Built {
    snapshot: Arc<Snapshot>,
    update: Arc<SourceUpdate>,
    reuse: Reuse,
}

/// Builds a snapshot from a source update: translation plus the source's diagnostics,
/// with the certificates of `previous` as the last good ones. The inputs are read in
/// place, not copied.
pub fn build_snapshot(update: &SourceUpdate, options: &Options, previous: &Snapshot) -> Snapshot {
    let (mut snapshot, _) = build_reusable(&update.inputs, &previous.tls.certs, options);
    add_source_diagnostics(&mut snapshot, update);
    snapshot
}

fn add_source_diagnostics(snapshot: &mut Snapshot, update: &SourceUpdate) {
    if !update.diagnostics.is_empty() {
        snapshot
            .diagnostics
            .extend(update.diagnostics.iter().cloned());
        snapshot.diagnostics.sort();
    }
}

impl Publisher {
    pub fn new(options: Options) -> Publisher {
        Publisher {
            snapshots: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            ready: Arc::new(AtomicBool::new(false)),
            options,
            debounce: Duration::from_millis(10),
            hooks: Vec::new(),
            last: Mutex::new(None),
        }
    }

    /// Adds a function called after every publish (metrics, status).
    pub fn on_publish(&mut self, hook: PublishHook) {
        self.hooks.push(hook);
    }

    /// Builds, stamps and stores one snapshot; returns its generation. When the snapshot
    /// in force is this publisher's last one, the build starts from it ([`rebuild`]):
    /// after an EndpointSlice change only the clusters of its Service are resolved again.
    pub fn publish(&self, update: &Arc<SourceUpdate>) -> u64 {
        let started = Instant::now();
        // Under the lock, so that the snapshot built on is the latest even if two calls
        // overlapped.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.snapshots.load_full();
        let (mut snapshot, reuse, how) = match last
            .as_ref()
            .filter(|b| Arc::ptr_eq(&b.snapshot, &previous))
        {
            Some(b) => rebuild(
                &b.update.inputs,
                &update.inputs,
                &previous,
                &b.reuse,
                &self.options,
            ),
            None => {
                let (snapshot, reuse) =
                    build_reusable(&update.inputs, &previous.tls.certs, &self.options);
                (snapshot, reuse, Rebuild::Full)
            }
        };
        add_source_diagnostics(&mut snapshot, update);
        snapshot.generation = previous.generation + 1;
        let generation = snapshot.generation;
        let snapshot = Arc::new(snapshot);
        self.snapshots.store(snapshot.clone());
        self.ready.store(true, Ordering::Release);
        let took = started.elapsed();
        // The replaced state is dropped after this lock is released, off the swap's path.
        let replaced = last.replace(Built {
            snapshot: snapshot.clone(),
            update: update.clone(),
            reuse,
        });
        drop(last);
        drop(replaced);
        // Counted after the swap: requests get the new snapshot without waiting for logs.
        let counts = Counts::of(&snapshot);
        let before = Counts::of(&previous);
        info!(
            generation,
            virtual_hosts = counts.vhosts,
            routes = counts.routes,
            routes_delta = counts.routes as i64 - before.routes as i64,
            clusters = counts.clusters,
            endpoints = counts.endpoints,
            endpoints_delta = counts.endpoints as i64 - before.endpoints as i64,
            tls_hosts = counts.tls_hosts,
            errors = counts.errors,
            warnings = counts.warnings,
            took_ms = took.as_secs_f64() * 1000.0,
            build = how.as_str(),
            "snapshot published"
        );
        let known: HashSet<&Diagnostic> = previous.diagnostics.iter().collect();
        for d in snapshot.diagnostics.iter().filter(|d| !known.contains(d)) {
            warn!(severity = %d.severity, kind = %d.kind, namespace = %d.namespace, name = %d.name, field = %d.field, reason = %d.reason, "configuration problem");
        }
        let known: HashSet<&IgnoredIngress> = previous.ignored.iter().collect();
        for i in snapshot.ignored.iter().filter(|i| !known.contains(i)) {
            info!(namespace = %i.namespace, name = %i.name, reason = %i.reason, "ignoring ingress");
        }
        for hook in &self.hooks {
            hook(&snapshot, took);
        }
        generation
    }

    /// Publishes every update from `rx` until the channel closes. The first change after
    /// a quiet spell is built at once; further changes are built at least `debounce`
    /// after the previous build ended, all of them in one snapshot. An update already in
    /// the channel when this starts is published too.
    pub async fn run(self: Arc<Self>, mut rx: watch::Receiver<Option<Arc<SourceUpdate>>>) {
        // An update already in the channel counts as a change.
        rx.mark_changed();
        let mut next_build_at: Option<tokio::time::Instant> = None;
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            if let Some(at) = next_build_at
                && at > tokio::time::Instant::now()
            {
                tokio::time::sleep_until(at).await;
            }
            let Some(update) = rx.borrow_and_update().clone() else {
                continue;
            };
            let this = self.clone();
            // Translation is CPU work of up to tens of milliseconds: keep it off the
            // request-serving threads.
            if let Err(e) = tokio::task::spawn_blocking(move || this.publish(&update)).await {
                warn!(error = %e, "snapshot build failed; the previous snapshot stays in force");
            }
            next_build_at = Some(tokio::time::Instant::now() + self.debounce);
        }
    }
}

/// Sizes of a snapshot, for logs and summaries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub vhosts: usize,
    pub routes: usize,
    pub clusters: usize,
    pub endpoints: usize,
    pub tls_hosts: usize,
    pub errors: usize,
    pub warnings: usize,
}

impl Counts {
    pub fn of(s: &Snapshot) -> Counts {
        Counts {
            vhosts: s.routes.vhosts.len(),
            routes: s.routes.routes().count(),
            clusters: s.clusters.len(),
            endpoints: s
                .clusters
                .iter()
                .map(|c| match &c.upstream {
                    Upstream::Endpoints { active, .. } => active.len(),
                    _ => 0,
                })
                .sum(),
            tls_hosts: s.tls.hosts.len(),
            errors: s
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count(),
            warnings: s
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Warning)
                .count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> Option<Arc<SourceUpdate>> {
        Some(Arc::new(SourceUpdate {
            inputs: Inputs::default(),
            diagnostics: Vec::new(),
        }))
    }

    fn generation(p: &Publisher) -> u64 {
        p.snapshots.load().generation
    }

    /// Waits (up to 20 s) until `p` has published generation `want`.
    async fn published(p: &Publisher, want: u64) -> bool {
        for _ in 0..2000 {
            if generation(p) >= want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_change_after_a_quiet_spell_is_built_at_once_and_later_ones_wait_for_the_gap() {
        let mut publisher = Publisher::new(Options::default());
        // A gap no test run outlasts: the first build must not wait for it.
        publisher.debounce = Duration::from_secs(3600);
        let publisher = Arc::new(publisher);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(publisher.clone().run(rx));
        tx.send_replace(update());
        assert!(
            published(&publisher, 1).await,
            "the first change is built at once"
        );
        // Changes right after a build wait for the gap, all of them for one build.
        tx.send_replace(update());
        tx.send_replace(update());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(generation(&publisher), 1);
    }
}
