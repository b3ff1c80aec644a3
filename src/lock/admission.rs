//! Load caps: how many callers may wait, per lock name and per server, so a flood of waiters
//! is refused (RESOURCE_EXHAUSTED) instead of taking the server down.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use super::{LockError, LockName};

/// Counts of current waiters. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    per_name_limit: usize,
    total_limit: usize,
    /// A std mutex: one map update per admission, never held across an await.
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_name: HashMap<LockName, usize>,
}

impl Admission {
    pub fn new(per_name_limit: u32, total_limit: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_name_limit: per_name_limit as usize,
                total_limit: total_limit as usize,
                counts: Mutex::new(Counts::default()),
            }),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Each critical section is a pair of counter updates: poisoning carries no information.
        self.inner
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A waiting slot on `name`, released when dropped; refused when a cap is reached.
    pub fn admit(&self, name: &LockName) -> Result<Slot, LockError> {
        let mut counts = self.counts();
        if counts.total >= self.inner.total_limit {
            return Err(LockError::Exhausted(format!(
                "this server already has {} waiting callers, the limit (max_waiters)",
                self.inner.total_limit
            )));
        }
        let waiting = counts.by_name.entry(name.clone()).or_insert(0);
        if *waiting >= self.inner.per_name_limit {
            return Err(LockError::Exhausted(format!(
                "lock {name} already has {} waiting callers on this server, the limit (max_waiters_per_name)",
                self.inner.per_name_limit
            )));
        }
        *waiting += 1;
        counts.total += 1;
        Ok(Slot {
            admission: self.clone(),
            name: name.clone(),
        })
    }
}

/// One admitted waiter.
pub struct Slot {
    admission: Admission,
    name: LockName,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(waiting) = counts.by_name.get_mut(&self.name) {
            *waiting -= 1;
            if *waiting == 0 {
                counts.by_name.remove(&self.name);
            }
        }
    }
}
