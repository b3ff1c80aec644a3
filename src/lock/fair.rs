//! Fair (FIFO) locks: which waiters this process has queued, and the refresher that keeps their
//! queue entries alive.
//!
//! The queue itself lives in Redis (`PREFIX:{name}:queue`, see `fair_acquire.lua`), so the
//! order holds across every latchkey replica. Each queued waiter's entry lapses after
//! `fair_waiter_timeout` unless its process refreshes it; this process refreshes all of its
//! waiters every third of that, one script per lock. A waiter whose process died therefore
//! stops blocking the queue at most 4/3 of the timeout after the death.
//!
//! The refresher also answers "whose turn is it?" for free locks: if the first live waiter is
//! one of ours, it is woken. That bounds the cost of a lost wake-up message, or of a dead
//! waiter ahead lapsing, to one refresh period.
//!
//! Mixing: a plain (non-fair) Acquire ignores the queue. It can take the lock when it happens
//! to be free, ahead of queued fair waiters, which keep their order among themselves. While fair
//! waiters queue, a release names the first of them, so plain waiters on the same name are not
//! woken and fall back on the holder's lease end. Use a name either fairly or not.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tracing::debug;

use super::{LockEngine, LockName};

/// Fair waiters of this process, by lock.
#[derive(Default)]
pub(super) struct FairWaiting {
    /// A std mutex: held for a map update or a snapshot, never across an await.
    by_lock: Mutex<HashMap<LockName, HashSet<String>>>,
}

impl FairWaiting {
    fn map(&self) -> MutexGuard<'_, HashMap<LockName, HashSet<String>>> {
        // Every critical section is one insert/remove/clone: poisoning carries no information.
        self.by_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a queued waiter until the returned guard is dropped.
    pub(super) fn join(self: &Arc<Self>, name: &LockName, waiter_id: &str) -> Queued {
        self.map()
            .entry(name.clone())
            .or_default()
            .insert(waiter_id.to_owned());
        Queued {
            registry: self.clone(),
            name: name.clone(),
            waiter_id: waiter_id.to_owned(),
        }
    }

    fn snapshot(&self) -> Vec<(LockName, Vec<String>)> {
        self.map()
            .iter()
            .map(|(name, ids)| (name.clone(), ids.iter().cloned().collect()))
            .collect()
    }
}

/// A waiter in this process's registry; dropping it removes it.
pub(super) struct Queued {
    registry: Arc<FairWaiting>,
    name: LockName,
    waiter_id: String,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut map = self.registry.map();
        if let Some(ids) = map.get_mut(&self.name) {
            ids.remove(&self.waiter_id);
            if ids.is_empty() {
                map.remove(&self.name);
            }
        }
    }
}

/// Refreshes this process's queued waiters every `alive / 3` until the engine is gone.
pub(super) async fn refresh(engine: Weak<LockEngine>, alive: Duration) {
    let mut every = tokio::time::interval(alive / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        for (name, ids) in engine.fair.snapshot() {
            match engine.store.fair_refresh(&name, &ids, alive).await {
                Ok(Some(head)) if ids.contains(&head) => {
                    engine
                        .waiters
                        .wake_fair(&engine.store.channel(&name), &head);
                }
                Ok(_) => {}
                Err(error) => {
                    debug!(lock = %name, %error, "fair refresh failed; retrying next period")
                }
            }
        }
    }
}
