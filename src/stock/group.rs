//! Group commit for ReduceStock: orders for the same products that wait in this process are
//! served under one lock hold and one transaction, in arrival order, each keeping its own
//! all-or-nothing outcome and its own answer.
//!
//! The first order to arrive for a set of products starts a *leader*, a task of its own: it
//! takes the orders queued for those products so far (up to `stock_max_batch`), takes the
//! product locks (the lock still comes before the transaction), applies the orders in one
//! transaction, commits, releases the locks, and answers each. Then it hands leadership to the
//! first order still queued, which starts the next batch's leader under a fresh lock hold; so
//! no order waits for more than the batch ahead of it and its own. Each order waits only until
//! its own deadline: one whose deadline passes before its batch took it into the transaction
//! answers ABORTED then, and is skipped; once taken, its answer comes with its transaction's
//! end. An order whose caller went away before its batch took it is not applied.
//!
//! Inside the transaction each order is decided in memory against the stock read at the start
//! (minus the orders before it): enough of every item, or nothing at all. Then each product is
//! written once (fenced, `stock >= taken`) and the orders are inserted with multi-row INSERTs,
//! so a batch costs a handful of statements whatever its size.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{sync::oneshot, time::Instant};

use super::{
    Applied, DbError, Held, Order, OrderId, Product, ProductId, Shortage, StockEngine, StockError,
    Units, store,
};

type Answer = oneshot::Sender<Result<Applied, StockError>>;

struct Pending {
    order: Order,
    deadline: Instant,
    answer: Answer,
    /// Fired when this order becomes the leader of the next batch (taken when fired).
    promote: Option<oneshot::Sender<()>>,
    /// Set by whichever comes first: the batch taking the order into its transaction, or the
    /// order's own deadline passing while it waits (it then answers ABORTED itself and is
    /// skipped).
    claim: Arc<AtomicBool>,
}

/// Orders waiting for their batch, by the product set they lock. A key is present while a
/// leader is serving it.
#[derive(Default)]
pub(super) struct Groups {
    /// A std mutex: held to push or drain a queue, never across an await.
    queues: Mutex<HashMap<Vec<ProductId>, VecDeque<Pending>>>,
}

impl Groups {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<ProductId>, VecDeque<Pending>>> {
        // Each critical section is one push or drain: poisoning carries no information.
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Hands the leadership of `key` on when dropped (see `StockEngine::lead`).
struct HandOn<'a> {
    engine: &'a StockEngine,
    key: &'a [ProductId],
}

impl Drop for HandOn<'_> {
    fn drop(&mut self) {
        self.engine.hand_off(self.key);
    }
}

impl StockEngine {
    /// ReduceStock through group commit.
    pub(super) async fn reduce_grouped(
        self: &Arc<Self>,
        order: &Order,
        deadline: Instant,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<Applied, StockError> {
        let key: Vec<ProductId> = order.items.iter().map(|(p, _)| p.id.clone()).collect();
        // A queued order counts as a waiter on its first product's lock (load caps) until it
        // leads; a leader is counted by the lock engine while it waits for the locks.
        let mut slot = Some(self.locks.admission().admit(&order.items[0].0.lock)?);
        let (answer, mut answered) = oneshot::channel();
        let (promote, mut promoted) = oneshot::channel();
        let claim = Arc::new(AtomicBool::new(false));
        let pending = Pending {
            order: order.clone(),
            deadline,
            answer,
            promote: Some(promote),
            claim: claim.clone(),
        };
        let leads = {
            let mut queues = self.groups.queues();
            match queues.get_mut(&key) {
                Some(queue) => {
                    queue.push_back(pending);
                    false
                }
                None => {
                    queues.insert(key.clone(), VecDeque::from([pending]));
                    true
                }
            }
        };
        let lost = || {
            Err(StockError::Db(DbError::Other(
                "the order's batch ended without an answer".into(),
            )))
        };
        // A batch is served in a task of its own, to the end, whoever of its callers goes
        // away or runs out of time meanwhile; the answer comes from it.
        let lead = |slot: &mut Option<_>| {
            *slot = None;
            let (engine, key) = (self.clone(), key.clone());
            let products: Vec<Product> = order.items.iter().map(|(p, _)| p.clone()).collect();
            tokio::spawn(async move { engine.lead(&key, &products).await });
        };
        if leads {
            lead(&mut slot);
        }
        let expires = tokio::time::sleep_until(deadline);
        tokio::pin!(expires, gone);
        // Until the promotion comes, or cannot any more (the order went into a batch).
        let mut promotable = !leads;
        let mut taken = false;
        loop {
            let stop = tokio::select! {
                biased;
                result = &mut answered => return result.unwrap_or_else(|_| lost()),
                promotion = &mut promoted, if promotable => {
                    promotable = false;
                    if promotion.is_ok() {
                        lead(&mut slot);
                    }
                    continue;
                }
                () = &mut expires, if !taken => {
                    // Not yet taken into a transaction: the order will not be, and says so by
                    // its own wait timeout rather than when the batch ahead of it ends. Taken
                    // already: its transaction is under way, and its answer is near.
                    if claim.swap(true, Ordering::AcqRel) {
                        taken = true;
                        continue;
                    }
                    Err(StockError::LockTimeout(key[0].clone()))
                }
                // Skipped by its batch (unless the batch took it already): the answer channel
                // closes as this returns.
                () = &mut gone => Err(StockError::Lock(crate::lock::LockError::Cancelled)),
            };
            // It stops waiting: it refuses a promotion from now on, and serves one that raced
            // in all the same, or the orders queued behind it would wait for a leader that
            // never comes.
            if promotable {
                promoted.close();
                if promoted.try_recv().is_ok() {
                    lead(&mut slot);
                }
            }
            return stop;
        }
    }

    /// Serves one batch for `key` (the leader's own order is first in the queue), then hands
    /// leadership on.
    async fn lead(&self, key: &[ProductId], products: &[Product]) {
        // Handed on however this ends, a panic in the batch included: otherwise the orders
        // queued behind, and every later order for these products in this process, would wait
        // for a leader that never comes.
        let _hand_on = HandOn { engine: self, key };
        let batch: Vec<Pending> = {
            let mut queues = self.groups.queues();
            let Some(queue) = queues.get_mut(key) else {
                return;
            };
            let take = queue.len().min(self.config.stock_max_batch as usize);
            queue.drain(..take).collect()
        };
        if !batch.is_empty() {
            self.serve(key, products, batch).await;
        }
    }

    async fn serve(&self, key: &[ProductId], products: &[Product], batch: Vec<Pending>) {
        metrics::histogram!(crate::telemetry::STOCK_BATCH_SIZE).record(batch.len() as f64);
        let wait_until = batch
            .iter()
            .map(|p| p.deadline)
            .max()
            .unwrap_or_else(Instant::now);
        let held = match self
            .lock_all(products, wait_until, std::future::pending())
            .await
        {
            Ok(held) => held,
            Err(error) => {
                for pending in batch {
                    let _ = pending.answer.send(Err(error.clone()));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for pending in batch {
            if pending.answer.is_closed() {
                continue; // the caller went away: not applied
            }
            if pending.claim.swap(true, Ordering::AcqRel) {
                continue; // its deadline passed first: it answered ABORTED itself
            }
            if pending.deadline < now {
                let _ = pending
                    .answer
                    .send(Err(StockError::LockTimeout(key[0].clone())));
                continue;
            }
            live.push(pending);
        }
        let orders: Vec<&Order> = live.iter().map(|p| &p.order).collect();
        let results = self.apply_batch(&orders, &held).await;
        let unknown = super::unknown_products(&results);
        self.unlock_all_but_unknown(held, &unknown).await;
        for (pending, result) in live.into_iter().zip(results) {
            let _ = pending.answer.send(result);
        }
    }

    /// Panics if `orders` holds the order `--fault-panic-order` names (tests only).
    fn fault_panic(&self, orders: &[&Order]) {
        if let Some(id) = &self.config.fault_panic_order
            && orders.iter().any(|order| order.id.as_str() == id)
        {
            panic!("fault injection: a batch with order {id} panics");
        }
    }

    /// Makes the first order still queued for `key` the next leader; orders whose callers went
    /// away are dropped on the way. With nobody queued, the key goes: the next arrival leads.
    fn hand_off(&self, key: &[ProductId]) {
        let mut queues = self.groups.queues();
        let Some(queue) = queues.get_mut(key) else {
            return;
        };
        while let Some(front) = queue.front_mut() {
            if let Some(promote) = front.promote.take()
                && promote.send(()).is_ok()
            {
                return;
            }
            queue.pop_front();
        }
        queues.remove(key);
    }

    /// Applies `orders` (all on the same products) under `held`, one answer per order.
    async fn apply_batch(
        &self,
        orders: &[&Order],
        held: &Held,
    ) -> Vec<Result<Applied, StockError>> {
        if orders.is_empty() {
            return Vec::new();
        }
        match self.apply_batch_once(orders, held).await {
            Ok(results) => results,
            // An order id used concurrently for other products: find out which order it was
            // by applying the batch one order (one transaction) at a time, still under the locks.
            Err(StockError::Db(DbError::Duplicate(_))) => {
                let mut results = Vec::with_capacity(orders.len());
                for order in orders {
                    results.push(self.reduce_locked(order, held).await);
                }
                results
            }
            Err(error) => orders.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    async fn apply_batch_once(
        &self,
        orders: &[&Order],
        held: &Held,
    ) -> Result<Vec<Result<Applied, StockError>>, StockError> {
        let mut tx = self.store.begin().await?;
        let ids: Vec<&OrderId> = orders.iter().map(|o| &o.id).collect();
        let stored = store::find_orders(&mut tx, &ids).await?;

        let mut levels: BTreeMap<ProductId, Units> = BTreeMap::new();
        let mut missing = None;
        for (product, _) in &orders[0].items {
            match store::stock_in(&mut tx, &product.id).await? {
                Some(stock) => {
                    levels.insert(product.id.clone(), stock);
                }
                None => missing = Some(product.id.clone()),
            }
        }

        let mut results = Vec::with_capacity(orders.len());
        // Orders applied earlier in this batch, as they will be stored.
        let mut applied: HashMap<&OrderId, store::StoredOrder> = HashMap::new();
        let mut applied_in_order: Vec<&OrderId> = Vec::new();
        for order in orders {
            // Already applied before, or earlier in this batch (a double click): a replay.
            if let Some(previous) = stored.get(&order.id).or_else(|| applied.get(&order.id)) {
                results.push(previous.replay(order));
                continue;
            }
            if let Some(product) = &missing {
                results.push(Err(StockError::UnknownProduct(product.clone())));
                continue;
            }
            let shortages: Vec<Shortage> = order
                .items
                .iter()
                .filter_map(|(product, quantity)| {
                    let available = levels
                        .get(&product.id)
                        .copied()
                        .unwrap_or(Units::from_stored(0));
                    (available < *quantity).then(|| Shortage {
                        product: product.id.clone(),
                        requested: *quantity,
                        available,
                    })
                })
                .collect();
            if !shortages.is_empty() {
                results.push(Err(StockError::Insufficient(shortages)));
                continue;
            }
            let mut items = Vec::with_capacity(order.items.len());
            for (product, quantity) in &order.items {
                let level = levels
                    .entry(product.id.clone())
                    .or_insert(Units::from_stored(0));
                *level = Units::from_stored(level.get() - quantity.get());
                items.push((product.id.clone(), *quantity, *level));
            }
            let answer = Applied {
                levels: items
                    .iter()
                    .map(|(p, _, left)| (p.clone(), *left))
                    .collect(),
                replayed: false,
            };
            results.push(Ok(answer));
            applied_in_order.push(&order.id);
            applied.insert(
                &order.id,
                store::StoredOrder {
                    items,
                    restored: false,
                },
            );
        }

        if !applied.is_empty() {
            self.fault_delay().await;
            self.fault_panic(orders);
            let mut taken: BTreeMap<&ProductId, i64> = BTreeMap::new();
            for order in applied.values() {
                for (product, quantity, _) in &order.items {
                    *taken.entry(product).or_insert(0) += quantity.get();
                }
            }
            for (product, total) in taken {
                let left = store::take(
                    &mut tx,
                    product,
                    Units::from_stored(total),
                    held.fence(product),
                )
                .await?;
                if left.is_none() {
                    return Err(StockError::LeaseLost(product.clone()));
                }
            }
            let recorded: Vec<(&OrderId, &[store::RecordedItem])> = applied_in_order
                .iter()
                .map(|id| (*id, applied[id].items.as_slice()))
                .collect();
            store::insert_orders(&mut tx, &recorded, store::now_ms()).await?;
            self.commit(tx, held).await?;
        }
        Ok(results)
    }
}
