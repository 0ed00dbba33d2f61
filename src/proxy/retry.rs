//! The retry budget (Envoy's `retry_budget`): retries in flight to one Service stay at
//! or below `max(MIN_CONCURRENCY, PERCENT % of its active requests)`, so a dying
//! Service whose connections reset is not sent twice its load.
//!
//! The retries it bounds are the ones to another endpoint after a connection was reset
//! or closed before the response. Two kinds are not budgeted: a retry after a refused
//! connect sends nothing twice; and the stale keep-alive retry (a pooled connection
//! closed or reset before the response) goes once to the same endpoint on a new
//! connection, which an endpoint that died refuses, so that it too sends nothing twice
//! then. An endpoint that accepts connections and resets every request on them gets an
//! idempotent request at most twice that way, plus the budgeted retry elsewhere. Like
//! every piece of balancing state, the budget outlives snapshots: it is keyed by
//! Service, and a permit is held only while its retry waits for a response head.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::ObjectRef;

/// Retries always allowed in flight per Service, however few requests it has.
pub const MIN_CONCURRENCY: usize = 3;

/// Share of a Service's active requests that may be retries in flight.
pub const PERCENT: usize = 20;

/// Hashing of the budget's table: keys are Service names from the snapshot.
type FoldHash = foldhash::fast::RandomState;

/// Retries in flight, by Service. Touched only on the retry path, never by a request
/// that succeeds at once.
#[derive(Debug, Default)]
pub struct RetryBudget {
    in_flight: Mutex<HashMap<ObjectRef, usize, FoldHash>>,
}

impl RetryBudget {
    /// The most retries `service` may have in flight with `active` requests in flight.
    pub fn limit(active: usize) -> usize {
        MIN_CONCURRENCY.max(active.saturating_mul(PERCENT) / 100)
    }

    /// A permit for one more retry to `service`, which has `active` requests in flight
    /// (this one included); `None` when the budget is spent. The retry counts until the
    /// permit is dropped.
    pub fn try_acquire(&self, service: &ObjectRef, active: usize) -> Option<RetryPermit<'_>> {
        let mut table = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = table.entry(service.clone()).or_default();
        if *n >= Self::limit(active) {
            return None;
        }
        *n += 1;
        Some(RetryPermit {
            budget: self,
            service: service.clone(),
        })
    }

    /// Retries in flight to `service` now.
    pub fn in_flight(&self, service: &ObjectRef) -> usize {
        let table = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        table.get(service).copied().unwrap_or(0)
    }

    fn release(&self, service: &ObjectRef) {
        let mut table = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = table.get_mut(service) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.remove(service);
            }
        }
    }
}

/// One retry in flight, counted against its Service's budget until dropped.
#[derive(Debug)]
pub struct RetryPermit<'a> {
    budget: &'a RetryBudget,
    service: ObjectRef,
}

impl Drop for RetryPermit<'_> {
    fn drop(&mut self) {
        self.budget.release(&self.service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_three_then_a_fifth_of_the_active_requests() {
        assert_eq!(RetryBudget::limit(0), 3);
        assert_eq!(RetryBudget::limit(10), 3);
        assert_eq!(RetryBudget::limit(20), 4);
        assert_eq!(RetryBudget::limit(100), 20);
        assert_eq!(RetryBudget::limit(usize::MAX), usize::MAX / 100);
    }

    #[test]
    fn permits_are_counted_per_service_and_given_back() {
        let budget = RetryBudget::default();
        let web = ObjectRef::new("shop", "web");
        let api = ObjectRef::new("shop", "api");
        let held: Vec<_> = (0..3)
            .map(|_| budget.try_acquire(&web, 1).expect("within the minimum"))
            .collect();
        assert!(
            budget.try_acquire(&web, 1).is_none(),
            "the fourth is refused"
        );
        assert!(
            budget.try_acquire(&web, 20).is_some(),
            "20 active requests allow a fourth"
        );
        assert!(
            budget.try_acquire(&api, 1).is_some(),
            "another Service's own"
        );
        assert_eq!(budget.in_flight(&web), 3);
        drop(held);
        assert_eq!(budget.in_flight(&web), 0);
        assert!(budget.try_acquire(&web, 1).is_some());
    }
}
