//! Typed, validated stock values. Their constructors enforce the configured limits; the stock
//! engine and the SQL layer trust them.

use std::{collections::BTreeMap, fmt};

use crate::{
    config::{LockConfig, StockConfig},
    lock::{Invalid, LockName},
};

/// Prefix of every product lock's name: product `p-1` is guarded by the lock `stock/p-1`, which
/// LockService callers can take too (to hold a product still by hand).
pub const LOCK_PREFIX: &str = "stock/";

/// A product id: 1..=max_product_id_len bytes, no control characters, no braces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProductId(String);

/// A product id with the name of the lock that guards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: ProductId,
    pub lock: LockName,
}

impl ProductId {
    pub fn parse(raw: String, stock: &StockConfig, locks: &LockConfig) -> Result<Product, Invalid> {
        if raw.is_empty() {
            return Err(Invalid("must not be empty".into()));
        }
        let max = stock.max_product_id_len as usize;
        if raw.len() > max {
            return Err(Invalid(format!(
                "is {} bytes long, the limit is {max} bytes (max_product_id_len)",
                raw.len()
            )));
        }
        // The lock name's rules (printable, no braces) are the product id's rules.
        let lock = LockName::parse(format!("{LOCK_PREFIX}{raw}"), locks)?;
        Ok(Product {
            id: Self(raw),
            lock,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from the database, which only ever stores validated ids.
    pub(crate) fn from_stored(raw: String) -> Self {
        Self(raw)
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An order's idempotency key: 1..=max_order_id_len bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderId(String);

impl OrderId {
    pub fn parse(raw: String, stock: &StockConfig) -> Result<Self, Invalid> {
        if raw.is_empty() {
            return Err(Invalid("must not be empty".into()));
        }
        let max = stock.max_order_id_len as usize;
        if raw.len() > max {
            return Err(Invalid(format!(
                "is {} bytes long, the limit is {max} bytes (max_order_id_len)",
                raw.len()
            )));
        }
        Invalid::unless_printable(&raw)?;
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from the database, which only ever stores validated ids.
    pub(crate) fn from_stored(raw: String) -> Self {
        Self(raw)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A quantity or stock level that fits SQL BIGINT: 0..=i64::MAX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Units(i64);

impl Units {
    pub fn stock(raw: u64) -> Result<Self, Invalid> {
        i64::try_from(raw)
            .map(Self)
            .map_err(|_| Invalid(format!("{raw} is above {} (SQL BIGINT)", i64::MAX)))
    }

    pub fn quantity(raw: u64) -> Result<Self, Invalid> {
        if raw == 0 {
            return Err(Invalid("must be at least 1".into()));
        }
        Self::stock(raw)
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn as_u64(self) -> u64 {
        // Non-negative by construction.
        self.0.unsigned_abs()
    }

    pub(crate) fn from_stored(n: i64) -> Self {
        Self(n.max(0))
    }
}

/// An order: products sorted by id (the lock order), each once, quantities merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub items: Vec<(Product, Units)>,
}

impl Order {
    /// Merges repeated products and sorts by product id. There must be 1..=max_order_items
    /// items, counted as sent (before merging).
    pub fn new(
        id: OrderId,
        items: Vec<(Product, Units)>,
        stock: &StockConfig,
    ) -> Result<Self, Invalid> {
        if items.is_empty() {
            return Err(Invalid(
                "must not be empty: an order has at least one item".into(),
            ));
        }
        let max = stock.max_order_items as usize;
        if items.len() > max {
            return Err(Invalid(format!(
                "has {} items, the limit is {max} (max_order_items)",
                items.len()
            )));
        }
        let mut merged = BTreeMap::<ProductId, (Product, i64)>::new();
        for (product, quantity) in items {
            let id = product.id.clone();
            let (_, total) = merged.entry(id.clone()).or_insert((product, 0));
            *total = total.checked_add(quantity.get()).ok_or_else(|| {
                Invalid(format!(
                    "the quantities of product {id} add up to more than {} (SQL BIGINT)",
                    i64::MAX
                ))
            })?;
        }
        Ok(Self {
            id,
            items: merged.into_values().map(|(p, q)| (p, Units(q))).collect(),
        })
    }
}
