//! The stock engine: SetStock, GetStock, ReduceStock and RestoreStock, each as
//! lock -> begin -> check -> update -> commit -> unlock.
//!
//! What it promises:
//! - **The lock comes first.** Every product's lock is held (taken through the lock engine,
//!   in sorted product order, so two orders never deadlock) before the transaction begins, and
//!   released only after it committed or rolled back. A transaction therefore never reads a
//!   snapshot older than the previous holder's commit.
//! - **All or nothing.** An order's items are checked first; if any is short, nothing is
//!   written. There is never a partial decrement to compensate.
//! - **Fenced writes.** Each product row is written with the fence of its lock grant and
//!   refused when a newer grant already wrote it; before committing, the engine checks (and
//!   renews) every lease. A holder whose lease ran out mid-transaction aborts (`LeaseLost`)
//!   instead of overwriting a newer holder's sale.
//! - **Once per order id.** A second ReduceStock with the same order id answers the original
//!   result (`replayed`); a second RestoreStock changes nothing.
//!
//! Layout: `request` (typed, validated inputs), `store` (SQL), `group` (group commit).

mod group;
pub mod request;
pub mod store;

use std::{future::Future, sync::Arc};

use tokio::time::Instant;
use tracing::{debug, warn};

pub use request::{Order, OrderId, Product, ProductId, Units};
pub use store::{Backend, DbError};

use crate::{
    config::{LockConfig, StockConfig},
    lock::{
        AcquireRequest, Acquired, Grant, Invalid, Lease, Linger, LockEngine, LockError, LockName,
        WaitTimeout,
    },
    telemetry,
};
use store::{StockStore, Tx};

/// A product whose stock does not cover its item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub product: ProductId,
    pub requested: Units,
    pub available: Units,
}

/// The answer to ReduceStock / RestoreStock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Stock level of each product of the order, sorted by product id.
    pub levels: Vec<(ProductId, Units)>,
    /// The order had already been applied (restored); nothing changed now.
    pub replayed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StockError {
    #[error("product {0} does not exist")]
    UnknownProduct(ProductId),
    #[error("order {0} does not exist")]
    UnknownOrder(OrderId),
    #[error("insufficient stock: {}", describe_shortages(.0))]
    Insufficient(Vec<Shortage>),
    #[error("order_id {0} was already used for a different set of items")]
    OrderIdReused(OrderId),
    #[error("restoring order {order} would push the stock of product {product} past {max}", max = i64::MAX)]
    Overflow { order: OrderId, product: ProductId },
    #[error("the lock of product {0} could not be had within the wait; nothing was changed")]
    LockTimeout(ProductId),
    #[error("the lease on product {0} ran out during the transaction; nothing was changed")]
    LeaseLost(ProductId),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl StockError {
    /// The `outcome` label of this failure in the stock metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            StockError::UnknownProduct(_) => "unknown_product",
            StockError::UnknownOrder(_) => "unknown_order",
            StockError::Insufficient(_) => "insufficient",
            StockError::OrderIdReused(_) => "order_id_reused",
            StockError::Overflow { .. } => "overflow",
            StockError::LockTimeout(_) => "lock_timeout",
            StockError::LeaseLost(_) => "lease_lost",
            // The engine takes its product locks afresh: an ownership refusal is a fault here.
            StockError::Lock(LockError::NotOwner(_)) => "error",
            StockError::Lock(error) => error.outcome(),
            StockError::Db(DbError::Conflict(_)) => "conflict",
            StockError::Db(_) => "error",
        }
    }
}

fn describe_shortages(shortages: &[Shortage]) -> String {
    shortages
        .iter()
        .map(|s| {
            format!(
                "product {} has {} available, {} requested",
                s.product,
                s.available.get(),
                s.requested.get()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl store::StoredOrder {
    /// The answer to `order` arriving again with this order's id: the original result when it
    /// has the same items, ALREADY_EXISTS when the id was used for other items.
    fn replay(&self, order: &Order) -> Result<Applied, StockError> {
        let same_items = self.items.len() == order.items.len()
            && self
                .items
                .iter()
                .zip(&order.items)
                .all(|((p, q, _), (product, quantity))| p == &product.id && q == quantity);
        if !same_items {
            return Err(StockError::OrderIdReused(order.id.clone()));
        }
        Ok(Applied {
            levels: self
                .items
                .iter()
                .map(|(p, _, left)| (p.clone(), *left))
                .collect(),
            replayed: true,
        })
    }
}

/// Product locks held for one operation, in lock order.
struct Held(Vec<(Product, Grant)>);

impl Held {
    fn fence(&self, product: &ProductId) -> u64 {
        self.0
            .iter()
            .find(|(p, _)| &p.id == product)
            .map_or(0, |(_, grant)| grant.fence)
    }
}

pub struct StockEngine {
    locks: Arc<LockEngine>,
    store: StockStore,
    config: StockConfig,
    /// Lock-name rules, to rebuild the lock names of stored orders' products.
    lock_limits: LockConfig,
    /// The lease of product locks, validated once against the lock limits.
    lease: Lease,
    /// ReduceStock orders waiting for their batch (group commit).
    groups: group::Groups,
}

impl StockEngine {
    pub fn new(
        locks: Arc<LockEngine>,
        store: StockStore,
        config: StockConfig,
        lock_limits: LockConfig,
    ) -> Result<Self, Invalid> {
        let lease = Lease::parse(Some(config.stock_lease), &lock_limits)?;
        Ok(Self {
            locks,
            store,
            config,
            lock_limits,
            lease,
            groups: group::Groups::default(),
        })
    }

    pub fn store(&self) -> &StockStore {
        &self.store
    }

    /// Reads a product's committed stock (no lock).
    pub async fn get(&self, product: &ProductId) -> Result<Units, StockError> {
        self.store
            .stock(product)
            .await?
            .ok_or_else(|| StockError::UnknownProduct(product.clone()))
    }

    /// Creates a product or sets its stock, under the product's lock.
    pub async fn set(
        &self,
        product: &Product,
        stock: Units,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Units, StockError> {
        let held = self
            .lock_all(std::slice::from_ref(product), deadline, gone)
            .await?;
        let result = async {
            let mut tx = self.store.begin().await?;
            if !store::set_stock(&mut tx, &product.id, stock, held.fence(&product.id)).await? {
                return Err(StockError::LeaseLost(product.id.clone()));
            }
            self.commit(tx, &held).await?;
            Ok(stock)
        }
        .await;
        self.unlock_all(held).await;
        result
    }

    /// Applies an order: all items or none, once per order id. Each answer is counted and timed
    /// by its outcome (`telemetry::REDUCE_STOCK_SECONDS`).
    pub async fn reduce(
        self: &Arc<Self>,
        order: &Order,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Applied, StockError> {
        let started = std::time::Instant::now();
        // An order with no wait left (`wait_timeout` 0) tries the locks once, on its own: in a
        // batch its deadline would pass before the batch even tried for them.
        let result = if self.config.stock_group_commit && Instant::now() < deadline {
            self.reduce_grouped(order, deadline, gone).await
        } else {
            self.reduce_alone(order, deadline, gone).await
        };
        let outcome = match &result {
            Ok(applied) if applied.replayed => "replayed",
            Ok(_) => "sold",
            Err(error) => error.outcome(),
        };
        metrics::histogram!(telemetry::REDUCE_STOCK_SECONDS, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// An order in a transaction of its own (group commit off).
    async fn reduce_alone(
        &self,
        order: &Order,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Applied, StockError> {
        let products: Vec<Product> = order.items.iter().map(|(p, _)| p.clone()).collect();
        let held = self.lock_all(&products, deadline, gone).await?;
        let result = self.reduce_locked(order, &held).await;
        let unknown = unknown_products(std::slice::from_ref(&result));
        self.unlock_all_but_unknown(held, &unknown).await;
        result
    }

    async fn reduce_locked(&self, order: &Order, held: &Held) -> Result<Applied, StockError> {
        let mut tx = self.store.begin().await?;
        if let Some(stored) = store::find_order(&mut tx, &order.id).await? {
            return stored.replay(order);
        }

        let mut shortages = Vec::new();
        for (product, quantity) in &order.items {
            let available = store::stock_in(&mut tx, &product.id)
                .await?
                .ok_or_else(|| StockError::UnknownProduct(product.id.clone()))?;
            if available < *quantity {
                shortages.push(Shortage {
                    product: product.id.clone(),
                    requested: *quantity,
                    available,
                });
            }
        }
        if !shortages.is_empty() {
            return Err(StockError::Insufficient(shortages));
        }
        self.fault_delay().await;

        let mut recorded = Vec::with_capacity(order.items.len());
        for (product, quantity) in &order.items {
            let left = store::take(&mut tx, &product.id, *quantity, held.fence(&product.id))
                .await?
                .ok_or_else(|| StockError::LeaseLost(product.id.clone()))?;
            recorded.push((product.id.clone(), *quantity, left));
        }
        match store::insert_orders(
            &mut tx,
            &[(&order.id, recorded.as_slice())],
            store::now_ms(),
        )
        .await
        {
            Err(DbError::Duplicate(_)) => return Err(StockError::OrderIdReused(order.id.clone())),
            other => other?,
        }
        self.commit(tx, held).await?;
        Ok(Applied {
            levels: recorded.into_iter().map(|(p, _, left)| (p, left)).collect(),
            replayed: false,
        })
    }

    /// Gives an order's quantities back, once.
    pub async fn restore(
        &self,
        order_id: &OrderId,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Applied, StockError> {
        // Which locks to take: read before any transaction (an order's items never change).
        let items = self
            .store
            .order_items(order_id)
            .await?
            .ok_or_else(|| StockError::UnknownOrder(order_id.clone()))?;
        let mut products = Vec::with_capacity(items.len());
        for (id, _) in &items {
            products.push(Product {
                lock: self.lock_name_of(id)?,
                id: id.clone(),
            });
        }
        products.sort_by(|a, b| a.id.cmp(&b.id));
        let held = self.lock_all(&products, deadline, gone).await?;
        let result = self.restore_locked(order_id, &held).await;
        self.unlock_all(held).await;
        result
    }

    async fn restore_locked(&self, order_id: &OrderId, held: &Held) -> Result<Applied, StockError> {
        let mut tx = self.store.begin().await?;
        let stored = store::find_order(&mut tx, order_id)
            .await?
            .ok_or_else(|| StockError::UnknownOrder(order_id.clone()))?;
        let mut levels = Vec::with_capacity(stored.items.len());
        if stored.restored {
            for (product, _, _) in stored.items {
                let stock = store::stock_in(&mut tx, &product)
                    .await?
                    .unwrap_or(Units::from_stored(0));
                levels.push((product, stock));
            }
            return Ok(Applied {
                levels,
                replayed: true,
            });
        }
        self.fault_delay().await;
        for (product, quantity, _) in stored.items {
            let current = store::stock_in(&mut tx, &product)
                .await?
                .unwrap_or(Units::from_stored(0));
            if current.get() > i64::MAX - quantity.get() {
                return Err(StockError::Overflow {
                    order: order_id.clone(),
                    product,
                });
            }
            let stock = store::give_back(&mut tx, &product, quantity, held.fence(&product))
                .await?
                .ok_or_else(|| StockError::LeaseLost(product.clone()))?;
            levels.push((product, stock));
        }
        store::mark_restored(&mut tx, order_id, store::now_ms()).await?;
        self.commit(tx, held).await?;
        Ok(Applied {
            levels,
            replayed: false,
        })
    }

    fn lock_name_of(&self, product: &ProductId) -> Result<LockName, StockError> {
        // Stored ids were validated when written; a failure here means the limits shrank since.
        LockName::parse(
            format!("{}{product}", request::LOCK_PREFIX),
            &self.lock_limits,
        )
        .map_err(|e| StockError::Db(DbError::Other(format!("stored product id {product}: {e}"))))
    }

    /// Takes the locks of `products` (already in lock order), or none of them.
    async fn lock_all(
        &self,
        products: &[Product],
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Held, StockError> {
        tokio::pin!(gone);
        let mut held = Held(Vec::with_capacity(products.len()));
        for product in products {
            let request = AcquireRequest {
                name: product.lock.clone(),
                lease: self.lease,
                wait: WaitTimeout::default(),
                reenter: None,
                fair: self.config.stock_fair,
            };
            let failure = match self.locks.acquire(&request, deadline, &mut gone).await {
                Ok(Acquired::Granted(grant)) => {
                    held.0.push((product.clone(), grant));
                    continue;
                }
                Ok(Acquired::TimedOut { .. }) => StockError::LockTimeout(product.id.clone()),
                Err(error) => StockError::Lock(error),
            };
            self.unlock_all(held).await;
            return Err(failure);
        }
        Ok(held)
    }

    async fn unlock_all(&self, held: Held) {
        self.unlock_all_but_unknown(held, &[]).await;
    }

    /// Releases `held`; the locks of products the database does not know (`unknown`, from
    /// the answers given under them) are deleted at once instead of lingering, so an order
    /// for a product that does not exist leaves nothing behind in Redis.
    async fn unlock_all_but_unknown(&self, held: Held, unknown: &[&ProductId]) {
        for (product, grant) in held.0.into_iter().rev() {
            let linger = if unknown.contains(&&product.id) {
                Linger::Drop
            } else {
                Linger::Keep
            };
            let released = self
                .locks
                .release_with(&product.lock, grant.token, linger)
                .await;
            if let Err(error) = released {
                // It frees itself when its lease ends.
                warn!(product = %product.id, %error, "could not release a product lock");
            }
        }
    }

    /// Commits `tx` if every lease is still ours (renewing each), else rolls back.
    async fn commit(&self, tx: Tx, held: &Held) -> Result<(), StockError> {
        for (product, grant) in &held.0 {
            match self
                .locks
                .extend(&product.lock, grant.token, self.lease)
                .await
            {
                Ok(_) => {}
                Err(LockError::NotOwner(why)) => {
                    debug!(product = %product.id, ?why, "lease lost before commit; rolling back");
                    return Err(StockError::LeaseLost(product.id.clone()));
                }
                Err(error) => return Err(error.into()),
            }
        }
        tx.commit().await.map_err(DbError::from)?;
        Ok(())
    }

    async fn fault_delay(&self) {
        if !self.config.fault_txn_delay.is_zero() {
            tokio::time::sleep(self.config.fault_txn_delay).await;
        }
    }
}

/// The products answers were refused for because the database does not know them.
fn unknown_products(results: &[Result<Applied, StockError>]) -> Vec<&ProductId> {
    results
        .iter()
        .filter_map(|result| match result {
            Err(StockError::UnknownProduct(product)) => Some(product),
            _ => None,
        })
        .collect()
}
