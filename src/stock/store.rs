//! The SQL side of stock: connection, migrations, and every query, written once in portable SQL
//! for SQLite and PostgreSQL (sqlx's `Any` driver; `$N` placeholders work on both).
//!
//! Promises:
//! - every write to a product carries the fence of the product lock its caller holds, and is
//!   refused (`None` / `false`) when a newer fence already wrote the row;
//! - a stock level never goes below zero (checked in the UPDATE itself and by a CHECK
//!   constraint), whatever the callers did;
//! - SQLite transactions start with `BEGIN IMMEDIATE`, so a transaction that read a value can
//!   always write it (no SQLITE_BUSY_SNAPSHOT upgrade failures);
//! - SQLite commits sync the WAL (durable once acknowledged); the WAL is copied into the
//!   database file by a background task (`checkpoint_wal`), not inside a commit that holds
//!   product locks, and the `-wal` file is truncated once the store has been idle a second.

use std::{collections::HashMap, path::PathBuf, str::FromStr, time::Duration};

use sqlx::{
    Any, AnyConnection, AnyPool, Connection, Executor, Row, Transaction,
    any::{AnyPoolOptions, install_default_drivers},
    sqlite::SqliteConnectOptions,
};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::request::{OrderId, ProductId, Units};
use crate::config::{StockConfig, redacted_url};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub type Tx = Transaction<'static, Any>;

/// One item as recorded with its order: product, quantity, stock left right after the order.
pub type RecordedItem = (ProductId, Units, Units);

/// An order as stored.
#[derive(Debug, Clone)]
pub struct StoredOrder {
    /// Sorted by product id.
    pub items: Vec<RecordedItem>,
    pub restored: bool,
}

pub struct StockStore {
    pool: AnyPool,
    backend: Backend,
    /// SQLite: the background WAL checkpointer, stopped with the store.
    _checkpoints: Option<AbortOnDropHandle<()>>,
}

/// How often the SQLite WAL is checkpointed in the background.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Past this many WAL pages a committing transaction checkpoints the WAL itself (SQLite's
/// default is 1,000; see `checkpoint_wal`).
const WAL_PAGES_BEFORE_COMMITS_CHECKPOINT: u32 = 10_000;

/// A WAL file larger than this (SQLite's default checkpoint size: 1,000 pages of 4 KiB) is
/// truncated once the store is idle (see `checkpoint_wal`).
const WAL_BYTES_KEPT: u64 = 4 << 20;

/// How long no commit may have reached the WAL before its file is truncated.
const WAL_IDLE_BEFORE_TRUNCATE: Duration = Duration::from_secs(1);

impl StockStore {
    /// Connects, applies the embedded migrations, and returns the store.
    pub async fn connect(config: &StockConfig) -> Result<Self, DbError> {
        install_default_drivers();
        let url = config.database_url.as_str();
        let (backend, url, connections) = if url.starts_with("sqlite:") {
            // Create the file if it is missing.
            let url = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url, 1)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Backend::Postgres, url.to_owned(), config.database_pool_size)
        } else {
            return Err(DbError::Other(format!(
                "LATCHKEY_DATABASE_URL must start with sqlite: or postgres:, not {:?}",
                redacted_url(url)
            )));
        };
        let timeout_ms = config.database_timeout.as_millis().to_string();
        let pool = AnyPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(config.database_timeout)
            .after_connect(move |conn, _meta| {
                let timeout_ms = timeout_ms.clone();
                Box::pin(async move {
                    let settings: Vec<String> = match backend {
                        Backend::Sqlite => vec![
                            "PRAGMA journal_mode = WAL".into(),
                            format!("PRAGMA busy_timeout = {timeout_ms}"),
                            "PRAGMA foreign_keys = ON".into(),
                            // A multi-row INSERT inside a transaction keeps a statement journal
                            // (to undo just that statement if a row fails): in memory, not in a
                            // temporary file created, written and unlinked for every batch.
                            "PRAGMA temp_store = MEMORY".into(),
                            // The WAL is checkpointed in the background (`checkpoint_wal`); a
                            // commit checkpoints it itself only once it grew past this many
                            // pages (about 40 MB), which lets the WAL start over under sustained
                            // load and bounds it should the background task fail.
                            format!(
                                "PRAGMA wal_autocheckpoint = {WAL_PAGES_BEFORE_COMMITS_CHECKPOINT}"
                            ),
                        ],
                        Backend::Postgres => vec![
                            format!("SET statement_timeout = {timeout_ms}"),
                            format!("SET lock_timeout = {timeout_ms}"),
                        ],
                    };
                    for setting in settings {
                        conn.execute(sqlx::query(&setting)).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            // The pool says only that it gave up; one connection of our own says why.
            Err(sqlx::Error::PoolTimedOut) => {
                let timeout = config.database_timeout;
                let why = match tokio::time::timeout(timeout, AnyConnection::connect(&url)).await {
                    Ok(Err(error)) => error.to_string(),
                    Ok(Ok(_)) | Err(_) => "connecting took longer than that".to_owned(),
                };
                return Err(DbError::Unavailable(format!(
                    "no connection within {} (database_timeout): {why}",
                    humantime::format_duration(timeout)
                )));
            }
            Err(error) => return Err(error.into()),
        };
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| DbError::Other(format!("migrations failed: {e}")))?;
        let checkpoints = (backend == Backend::Sqlite)
            .then(|| AbortOnDropHandle::new(tokio::spawn(checkpoint_wal(url, CHECKPOINT_EVERY))));
        Ok(Self {
            pool,
            backend,
            _checkpoints: checkpoints,
        })
    }

    /// A round trip to the database, for health checks.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins a write transaction.
    pub async fn begin(&self) -> Result<Tx, DbError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// A product's committed stock, without a transaction.
    pub async fn stock(&self, product: &ProductId) -> Result<Option<Units>, DbError> {
        let stock: Option<i64> = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
            .bind(product.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(stock.map(Units::from_stored))
    }

    /// The products and quantities of an order, without a transaction (to know which locks to
    /// take before the transaction begins). None when the order is unknown.
    pub async fn order_items(
        &self,
        order: &OrderId,
    ) -> Result<Option<Vec<(ProductId, Units)>>, DbError> {
        let rows = sqlx::query("SELECT product_id, quantity FROM order_items WHERE order_id = $1")
            .bind(order.as_str())
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.iter()
            .map(|row| {
                Ok((
                    ProductId::from_stored(row.try_get(0)?),
                    Units::from_stored(row.try_get(1)?),
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map(Some)
            .map_err(DbError::from)
    }
}

/// Copies the SQLite WAL into the database file every `every`, on a connection of its own, and
/// gives the WAL's disk space back once the store has gone quiet.
///
/// SQLite would otherwise do it in whichever commit took the WAL past 1,000 pages: with group
/// commit writing about a hundred pages per batch, every eighth batch's commit also wrote a
/// thousand pages to the database file and synced it, while holding its product locks (about
/// 30% of the average commit time on a VM disk). A PASSIVE checkpoint never waits for, nor
/// blocks, the writer; durability is unchanged (each commit still syncs the WAL). Failures are
/// logged and retried.
///
/// SQLite starts the WAL over only when a writer finds every frame copied, which under
/// sustained load, with commits landing during each background pass, rarely happens: the WAL
/// then grows to `WAL_PAGES_BEFORE_COMMITS_CHECKPOINT` pages, where a commit checkpoints the few
/// frames this task has not copied yet and the WAL starts over. SQLite reuses the file from its
/// start and never shrinks it, so once nothing was written for `WAL_IDLE_BEFORE_TRUNCATE`,
/// every frame is copied and the file is larger than `WAL_BYTES_KEPT`, this task truncates it
/// (a TRUNCATE checkpoint; it never waits: a writer or reader in the way makes it a PASSIVE
/// one, and the next idle pass tries again).
async fn checkpoint_wal(url: String, every: Duration) {
    let wal = wal_file(&url);
    let mut conn: Option<AnyConnection> = None;
    let mut failing = false;
    let mut frames_before = None;
    let mut unwritten_since = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        // A connection that failed is dropped here, and the next pass opens a new one.
        let result = async {
            let mut c = match conn.take() {
                Some(c) => c,
                None => {
                    let mut c = AnyConnection::connect(&url).await?;
                    // Never wait for the lock a committing batch holds (see above).
                    c.execute("PRAGMA busy_timeout = 0").await?;
                    c
                }
            };
            let (busy, frames, copied): (i64, i64, i64) =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_one(&mut c)
                    .await?;
            // The WAL's frame count changes with every commit, a WAL started over included.
            if frames_before != Some(frames) {
                frames_before = Some(frames);
                unwritten_since = Instant::now();
            }
            // The file's size is looked up only once the WAL is idle and copied.
            let oversized = || {
                wal.as_deref()
                    .and_then(|wal| std::fs::metadata(wal).ok())
                    .is_some_and(|file| file.len() > WAL_BYTES_KEPT)
            };
            if busy == 0
                && frames == copied
                && unwritten_since.elapsed() >= WAL_IDLE_BEFORE_TRUNCATE
                && oversized()
            {
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
            }
            conn = Some(c);
            Ok::<(), sqlx::Error>(())
        }
        .await;
        match result {
            Ok(()) if failing => {
                info!("the SQLite WAL checkpoints again");
                failing = false;
            }
            Ok(()) => {}
            Err(error) => {
                if !failing {
                    warn!(%error, "cannot checkpoint the SQLite WAL; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// The `-wal` file beside the SQLite database `url` names; None for an in-memory database.
fn wal_file(url: &str) -> Option<PathBuf> {
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let db = options.get_filename();
    if db.as_os_str().is_empty() || db.as_os_str() == ":memory:" {
        return None;
    }
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    Some(PathBuf::from(wal))
}

/// The order `id` as stored, read inside `tx`.
pub async fn find_order(tx: &mut Tx, id: &OrderId) -> Result<Option<StoredOrder>, DbError> {
    Ok(find_orders(tx, &[id]).await?.remove(id))
}

/// The stored orders among `ids`, read inside `tx` (one query).
pub async fn find_orders(
    tx: &mut Tx,
    ids: &[&OrderId],
) -> Result<HashMap<OrderId, StoredOrder>, DbError> {
    let mut found: HashMap<OrderId, StoredOrder> = HashMap::new();
    for chunk in ids.chunks(PARAMS_PER_STATEMENT) {
        let placeholders = (1..=chunk.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT o.id, o.restored_ms, i.product_id, i.quantity, i.remaining \
             FROM orders o JOIN order_items i ON i.order_id = o.id WHERE o.id IN ({placeholders})"
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        for row in query.fetch_all(&mut **tx).await? {
            let id = OrderId::from_stored(row.try_get(0)?);
            let order = found.entry(id).or_insert_with(|| StoredOrder {
                items: Vec::new(),
                restored: false,
            });
            order.restored |= row.try_get::<Option<i64>, _>(1)?.is_some();
            order.items.push((
                ProductId::from_stored(row.try_get(2)?),
                Units::from_stored(row.try_get(3)?),
                Units::from_stored(row.try_get(4)?),
            ));
        }
    }
    for order in found.values_mut() {
        order.items.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(found)
}

/// Records many applied orders with few statements (multi-row INSERTs).
pub async fn insert_orders(
    tx: &mut Tx,
    orders: &[(&OrderId, &[RecordedItem])],
    now_ms: i64,
) -> Result<(), DbError> {
    for chunk in orders.chunks(PARAMS_PER_STATEMENT / 2) {
        let values = (0..chunk.len())
            .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("INSERT INTO orders (id, created_ms) VALUES {values}");
        let mut query = sqlx::query(&sql);
        for (id, _) in chunk {
            query = query.bind(id.as_str()).bind(now_ms);
        }
        query.execute(&mut **tx).await?;
    }
    let items: Vec<(&OrderId, &RecordedItem)> = orders
        .iter()
        .flat_map(|(id, items)| items.iter().map(move |item| (*id, item)))
        .collect();
    for chunk in items.chunks(PARAMS_PER_STATEMENT / 4) {
        let values = (0..chunk.len())
            .map(|i| {
                format!(
                    "(${}, ${}, ${}, ${})",
                    4 * i + 1,
                    4 * i + 2,
                    4 * i + 3,
                    4 * i + 4
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO order_items (order_id, product_id, quantity, remaining) VALUES {values}"
        );
        let mut query = sqlx::query(&sql);
        for (id, (product, quantity, remaining)) in chunk {
            query = query
                .bind(id.as_str())
                .bind(product.as_str())
                .bind(quantity.get())
                .bind(remaining.get());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Bind parameters per statement: well inside SQLite's (32766) and PostgreSQL's (65535) limits.
const PARAMS_PER_STATEMENT: usize = 4000;

/// A product's stock, read inside `tx`. None when the product does not exist.
pub async fn stock_in(tx: &mut Tx, product: &ProductId) -> Result<Option<Units>, DbError> {
    let stock: Option<i64> = sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
        .bind(product.as_str())
        .fetch_optional(&mut **tx)
        .await?;
    Ok(stock.map(Units::from_stored))
}

/// Takes `quantity` from a product under `fence`. Returns the stock left, or None when the row
/// was written by a newer fence (or, impossible under the lock, the stock is short).
pub async fn take(
    tx: &mut Tx,
    product: &ProductId,
    quantity: Units,
    fence: u64,
) -> Result<Option<Units>, DbError> {
    let left: Option<i64> = sqlx::query_scalar(
        "UPDATE products SET stock = stock - $1, last_fence = $2 \
         WHERE id = $3 AND last_fence <= $2 AND stock >= $1 RETURNING stock",
    )
    .bind(quantity.get())
    .bind(fence_sql(fence))
    .bind(product.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(left.map(Units::from_stored))
}

/// Gives `quantity` back to a product under `fence`. Returns the new stock, or None when the
/// row was written by a newer fence or the sum would not fit BIGINT.
pub async fn give_back(
    tx: &mut Tx,
    product: &ProductId,
    quantity: Units,
    fence: u64,
) -> Result<Option<Units>, DbError> {
    let stock: Option<i64> = sqlx::query_scalar(
        "UPDATE products SET stock = stock + $1, last_fence = $2 \
         WHERE id = $3 AND last_fence <= $2 AND stock <= $4 RETURNING stock",
    )
    .bind(quantity.get())
    .bind(fence_sql(fence))
    .bind(product.as_str())
    .bind(i64::MAX - quantity.get())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(stock.map(Units::from_stored))
}

/// Creates a product or sets its stock under `fence`. False when a newer fence wrote it.
pub async fn set_stock(
    tx: &mut Tx,
    product: &ProductId,
    stock: Units,
    fence: u64,
) -> Result<bool, DbError> {
    let written = sqlx::query(
        "INSERT INTO products (id, stock, last_fence) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET stock = excluded.stock, last_fence = excluded.last_fence \
         WHERE products.last_fence <= excluded.last_fence",
    )
    .bind(product.as_str())
    .bind(stock.get())
    .bind(fence_sql(fence))
    .execute(&mut **tx)
    .await?;
    Ok(written.rows_affected() == 1)
}

/// Marks an order restored. False when it already was.
pub async fn mark_restored(tx: &mut Tx, id: &OrderId, now_ms: i64) -> Result<bool, DbError> {
    let marked =
        sqlx::query("UPDATE orders SET restored_ms = $1 WHERE id = $2 AND restored_ms IS NULL")
            .bind(now_ms)
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
    Ok(marked.rows_affected() == 1)
}

/// Fences are Redis microsecond times (~2^51), far inside BIGINT.
fn fence_sql(fence: u64) -> i64 {
    i64::try_from(fence).unwrap_or(i64::MAX)
}

/// The database did not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// Unreachable, timed out, or locked for longer than the database timeout.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A write conflict (serialization failure, deadlock): nothing was written; retryable.
    #[error("the database reported a write conflict: {0}")]
    Conflict(String),
    /// A unique key already exists (an order id used concurrently for other items).
    #[error("duplicate key: {0}")]
    Duplicate(String),
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        let text = error.to_string();
        match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(text),
            sqlx::Error::Database(db) => match db.code().as_deref().unwrap_or_default() {
                // PostgreSQL serialization failure / deadlock; SQLite BUSY_SNAPSHOT.
                "40001" | "40P01" | "517" => Self::Conflict(text),
                // PostgreSQL unique violation; SQLite CONSTRAINT_PRIMARYKEY / CONSTRAINT_UNIQUE.
                "23505" | "1555" | "2067" => Self::Duplicate(text),
                // PostgreSQL: too many connections, statement timeout, lock timeout, connection
                // exceptions (08xxx), server shutting down (57P0x).
                "53300" | "57014" | "55P03" => Self::Unavailable(text),
                code if code.starts_with("08") || code.starts_with("57P") => {
                    Self::Unavailable(text)
                }
                // SQLite (numeric codes of at most 4 digits; PostgreSQL's have 5): BUSY, LOCKED,
                // IOERR, CANTOPEN and their extended codes (primary code in the low byte).
                code if code.len() <= 4
                    && code
                        .parse::<u32>()
                        .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 14)) =>
                {
                    Self::Unavailable(text)
                }
                _ => Self::Other(text),
            },
            _ => Self::Other(text),
        }
    }
}

/// Milliseconds since the Unix epoch, for the record only (never for ordering).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::time::{Instant, sleep};

    use super::*;

    /// A product's stock as the database file alone has it: a copy of the file opened without
    /// its WAL. None while the copy is not readable (caught mid-checkpoint) or lacks the row.
    async fn stock_in_file_alone(db: &Path, product: &ProductId) -> Option<Units> {
        let copy = db.with_extension("copy");
        std::fs::copy(db, &copy).ok()?;
        let pool = AnyPool::connect(&format!("sqlite://{}", copy.display()))
            .await
            .ok()?;
        let stock = match pool.begin().await {
            Ok(mut tx) => stock_in(&mut tx, product).await.ok().flatten(),
            Err(_) => None,
        };
        pool.close().await;
        stock
    }

    /// A store on a new SQLite file at `db`, with the default stock settings.
    async fn sqlite_store(db: &Path) -> StockStore {
        install_default_drivers();
        let mut config = crate::config::Config::for_redis(
            "127.0.0.1:0".parse().expect("an address"),
            "redis://127.0.0.1:1",
        )
        .stock;
        config.database_url = format!("sqlite://{}", db.display());
        StockStore::connect(&config)
            .await
            .expect("open the database")
    }

    #[tokio::test]
    async fn sqlite_commits_reach_the_database_file_in_the_background_not_only_its_wal() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("stock.db");
        let store = sqlite_store(&path).await;

        let mut tx = store.begin().await.expect("begin");
        let product = ProductId::from_stored("checkpointed".into());
        let written = set_stock(&mut tx, &product, Units::from_stored(7), 1).await;
        assert!(written.expect("set the stock"));
        tx.commit().await.expect("commit");

        // The commit is in the WAL at once (synced); it reaches the file itself only when the
        // WAL is checkpointed, which with one small transaction SQLite alone never does.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stock_in_file_alone(&path, &product).await != Some(Units::from_stored(7)) {
            assert!(
                Instant::now() < deadline,
                "the commit did not reach the database file in 10 s: the WAL is not checkpointed"
            );
            sleep(Duration::from_millis(50)).await;
        }
        // And the store still reads and writes after the checkpoints.
        assert_eq!(
            store.stock(&product).await.expect("read"),
            Some(Units::from_stored(7))
        );
    }

    #[tokio::test]
    async fn a_large_sqlite_wal_is_truncated_once_the_store_goes_quiet() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let wal = dir.path().join("stock.db-wal");
        let store = sqlite_store(&dir.path().join("stock.db")).await;

        // One burst: 50,000 products with long ids in one transaction, some 12 MB of pages,
        // all of them written to the WAL by its commit.
        let mut tx = store.begin().await.expect("begin");
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000) \
             INSERT INTO products (id, stock) SELECT printf('burst-%06d-%.100c', i, 'x'), 1 FROM n",
        )
        .execute(&mut *tx)
        .await
        .expect("insert the burst");
        tx.commit().await.expect("commit");
        let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
        let after_burst = wal_len();
        assert!(
            after_burst > WAL_BYTES_KEPT,
            "the burst left a WAL of {after_burst} bytes, not more than {WAL_BYTES_KEPT}"
        );

        // Nothing more is written: the background task copies the WAL and then truncates it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while wal_len() > 0 {
            assert!(
                Instant::now() < deadline,
                "the idle store's WAL is still {} bytes after 20 s (it was {after_burst})",
                wal_len()
            );
            sleep(Duration::from_millis(50)).await;
        }
        // Every product of the burst is still there, and the store still writes.
        let mut tx = store.begin().await.expect("begin");
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM products")
            .fetch_one(&mut *tx)
            .await
            .expect("count the products");
        assert_eq!(count, 50_000);
        let product = ProductId::from_stored("after-the-truncation".into());
        let written = set_stock(&mut tx, &product, Units::from_stored(3), 1).await;
        assert!(written.expect("set the stock"));
        tx.commit().await.expect("commit");
        assert_eq!(
            store.stock(&product).await.expect("read"),
            Some(Units::from_stored(3))
        );
    }
}
