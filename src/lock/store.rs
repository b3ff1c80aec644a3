//! The Redis side of the lock engine: key layout, the Lua scripts, and one typed call per script.
//!
//! Every call is one EVALSHA (each connection loads the scripts whenever it connects; a call
//! that still meets NOSCRIPT loads its script itself), so each operation on a lock is atomic in
//! Redis. All keys and the channel of one lock share the hash tag `{name}`, so a lock lives in
//! one Redis Cluster slot. All commands for one lock go over the same pooled connection, so
//! Redis runs them in the order latchkey sent them. A command that a dropped connection caught
//! is sent again by fred; every script answers that repeat as its first run, never counting a
//! re-entry, release or force-release twice (the `op` id, kept as `op` or `forced`; see
//! prelude.lua). A caller's `request_id` becomes that id, so a caller's own retry of a re-entry
//! or release is recognized the same way.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use fred::{
    bytes::{BufMut, BytesMut},
    clients::{Client, Pool},
    interfaces::{ClientLike, EventInterface},
    types::{
        Builder, FromValue, Key, Value,
        config::{Config as FredConfig, ReconnectPolicy},
        scripts::Script,
    },
};
use uuid::Uuid;

use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use super::request::{Lease, LockName, RequestId, Token};
use crate::config::{LockConfig, RedisConfig};

/// Why a token may not act on a lock (Release, Extend, re-entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOwner {
    /// Nobody holds the lock.
    NotHeld,
    /// Somebody else holds it.
    OtherOwner,
    /// This token held it, but its lease ended.
    Expired,
}

impl NotOwner {
    fn from_code(code: i64) -> Option<Self> {
        match code {
            -1 => Some(Self::NotHeld),
            -2 => Some(Self::OtherOwner),
            -3 => Some(Self::Expired),
            _ => None,
        }
    }
}

/// A grant as Redis recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub fence: u64,
    pub holds: u32,
    pub lease: Duration,
    /// Fair grants: when the caller joined the queue (Redis us); 0 when it never queued.
    pub queued_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Granted(Granted),
    Busy { holder_ttl: Duration },
    Refused(NotOwner),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The caller no longer holds the lock: it is free, or was handed to a waiter.
    Free,
    /// The owner still has this many holds.
    StillHeld(u32),
}

/// A waiter a release may hand the lock to (see `release.lua`).
#[derive(Debug, Clone, Copy)]
pub struct HandOff {
    pub to: Token,
    pub lease: Lease,
    pub fair: bool,
    /// Plain waiters the caller's process has on the lock, `to` included.
    pub plain_waiters: usize,
}

/// What stays of a lock in Redis once a release frees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linger {
    /// The hash lingers for `lock_linger`: a late Release/Extend by the old owner is told
    /// "expired", and the fence stays for the next grant.
    Keep,
    /// The hash goes at once, for a lock that turned out to guard nothing (ReduceStock on an
    /// unknown product): asking for it leaves no trace. The next grant's fence then comes from
    /// Redis time alone, still above this one's (see acquire.lua).
    Drop,
}

/// The id of one call that changes a hold count (a re-entry, a release, a ForceRelease; `op`
/// and `forced` in prelude.lua): a decimal integer below 2^63, which Redis stores in a hash as
/// an 8-byte integer, not as text. fred sends a command again, with the same arguments, when a
/// dropped connection caught it; the id lets the script tell that repeat from a second call and
/// count it once. A caller's `request_id` becomes the id, so the caller's own retries of the
/// call are such repeats too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op(u64);

impl Op {
    /// The caller's id, or a random one when it sent none.
    pub fn of(request_id: Option<RequestId>) -> Self {
        match request_id {
            Some(id) => Self(id.get()),
            None => Self(rand::random::<u64>() >> 1),
        }
    }
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReply {
    Released(Released),
    /// The last hold was given back and the lock now belongs to the hand-off's waiter.
    Handed(Granted),
    /// A repeat of a release (same op) that handed the lock to a waiter: nothing changed now.
    /// Whether it was this call's candidate is for `handed_to` to say.
    HandedBefore,
}

/// What Inspect shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockState {
    pub held: bool,
    pub fence: u64,
    pub ttl: Duration,
    pub holds: u32,
    pub waiters: u32,
}

/// The Redis names of one lock, `<prefix>:{<name>}:<suffix>`: its hash (`lock`), its plain
/// waiters (`waiters`), its fair waiters in join order (`queue`), and the unlock channel
/// (`unlock`). The braces are the Redis Cluster hash tag.
mod suffix {
    pub const LOCK: &str = "lock";
    pub const WAITERS: &str = "waiters";
    pub const QUEUE: &str = "queue";
    pub const CHANNEL: &str = "unlock";
}

fn redis_name_parts<'a>(prefix: &'a str, name: &'a LockName, suffix: &'a str) -> [&'a str; 5] {
    [prefix, ":{", name.as_str(), "}:", suffix]
}

fn redis_name(prefix: &str, name: &LockName, suffix: &str) -> String {
    redis_name_parts(prefix, name, suffix).concat()
}

fn put_redis_name(buf: &mut BytesMut, prefix: &str, name: &LockName, suffix: &str) {
    for part in redis_name_parts(prefix, name, suffix) {
        buf.put_slice(part.as_bytes());
    }
}

/// The keys and arguments of one script call on one lock, written into one buffer and handed
/// to fred as slices of it: one allocation for the lot instead of one or two per value, and
/// fred's copy of them (kept to send the call again after NOSCRIPT) only counts references.
/// Keys come first, then arguments, as the script reads them (`KEYS`, then `ARGV`).
struct ScriptCall<'a> {
    prefix: &'a str,
    name: &'a LockName,
    buf: BytesMut,
    /// Where each value ends in `buf`.
    ends: Vec<usize>,
    keys: usize,
}

impl<'a> ScriptCall<'a> {
    fn on(prefix: &'a str, name: &'a LockName) -> Self {
        Self {
            prefix,
            name,
            // Enough for the largest call (release: three keys, the channel, two tokens,
            // four numbers and an op id) without growing.
            buf: BytesMut::with_capacity(4 * (prefix.len() + name.as_str().len() + 12) + 160),
            ends: Vec::with_capacity(12),
            keys: 0,
        }
    }

    /// One of the lock's keys (`suffix::*`); every key before the first argument.
    fn key(mut self, suffix: &str) -> Self {
        debug_assert_eq!(self.keys, self.ends.len(), "keys come before arguments");
        put_redis_name(&mut self.buf, self.prefix, self.name, suffix);
        self.keys += 1;
        self.end()
    }

    /// The lock's unlock channel, as an argument (scripts publish to it).
    fn channel(mut self) -> Self {
        put_redis_name(&mut self.buf, self.prefix, self.name, suffix::CHANNEL);
        self.end()
    }

    fn text(mut self, value: &str) -> Self {
        self.buf.put_slice(value.as_bytes());
        self.end()
    }

    fn number(mut self, value: u64) -> Self {
        self.buf
            .put_slice(itoa::Buffer::new().format(value).as_bytes());
        self.end()
    }

    fn flag(self, on: bool) -> Self {
        self.text(if on { "1" } else { "0" })
    }

    fn token(mut self, token: Token) -> Self {
        self.buf
            .put_slice(token.encode(&mut Uuid::encode_buffer()).as_bytes());
        self.end()
    }

    fn op(self, op: Op) -> Self {
        self.number(op.0)
    }

    fn end(mut self) -> Self {
        self.ends.push(self.buf.len());
        self
    }

    fn into_parts(self) -> (Vec<Key>, Value) {
        let bytes = self.buf.freeze();
        let mut start = 0;
        let mut values = self.ends.iter().map(|&end| {
            let value = bytes.slice(start..end);
            start = end;
            value
        });
        let keys = values.by_ref().take(self.keys).map(Key::from).collect();
        let args = values.map(Value::Bytes).collect();
        (keys, Value::Array(args))
    }
}

/// A script loaded from `src/lock/*.lua` with the shared prelude in front.
macro_rules! lock_script {
    ($file:literal) => {
        Script::from_lua(concat!(
            include_str!("prelude.lua"),
            "\n",
            include_str!($file)
        ))
    };
}

/// Typed calls to the lock scripts over a pool of Redis connections.
pub struct LockStore {
    pool: Pool,
    prefix: String,
    /// Lingering keeps the fence and the "expired" diagnosis for a while after a lease ends.
    linger_ms: u64,
    acquire: Script,
    release: Script,
    handed: Script,
    extend: Script,
    inspect: Script,
    force_release: Script,
    fair_acquire: Script,
    fair_refresh: Script,
    fair_leave: Script,
    /// One task per pooled connection loading every script each time it (re)connects, and one
    /// recording its connection errors, stopped with the store.
    _listeners: Vec<AbortOnDropHandle<Result<(), fred::error::Error>>>,
    /// What the latest failed connection attempt said ("Connection refused", a TLS or AUTH
    /// failure), until a connection succeeds again: a command that times out meanwhile says
    /// why Redis is not answering, not only that it is not.
    connection_error: Arc<Mutex<Option<String>>>,
}

/// The fred config shared by the command pool and the subscriber: reconnect forever with
/// backoff, and never let one command wait longer than the Redis timeout, so no RPC hangs
/// while Redis is away.
pub fn fred_builder(config: &RedisConfig) -> Result<Builder, fred::error::Error> {
    let mut fred = FredConfig::from_url(&config.redis_url)?;
    // Starting while Redis is down is allowed: keep reconnecting instead of failing init.
    fred.fail_fast = false;
    let mut builder = Builder::from_config(fred);
    let timeout = config.redis_timeout;
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .with_performance_config(|perf| perf.default_command_timeout = timeout)
        .with_connection_config(|conn| {
            conn.connection_timeout = timeout;
            conn.internal_command_timeout = timeout;
            // A command caught by a dropped connection is retried once after reconnecting.
            conn.max_command_attempts = 2;
            conn.tcp.nodelay = Some(true);
        });
    Ok(builder)
}

impl LockStore {
    /// Builds the pool and starts connecting in the background; returns at once even if Redis
    /// is unreachable. Must be called inside a Tokio runtime.
    ///
    /// Every connection loads all the scripts whenever it connects, so a Redis that restarted or
    /// failed over (and lost its script cache) has them again before callers need them, instead
    /// of every caller in flight hitting NOSCRIPT and loading them itself. A call that still
    /// finds a script missing (it raced the reload) loads it as before.
    pub fn connect(redis: &RedisConfig, locks: &LockConfig) -> Result<Self, fred::error::Error> {
        let pool = fred_builder(redis)?.build_pool(usize::from(redis.redis_pool_size))?;
        let mut store = Self {
            pool,
            prefix: locks.key_prefix.clone(),
            linger_ms: u64::try_from(locks.linger.as_millis()).unwrap_or(u64::MAX),
            acquire: lock_script!("acquire.lua"),
            release: lock_script!("release.lua"),
            handed: lock_script!("handed.lua"),
            extend: lock_script!("extend.lua"),
            inspect: lock_script!("inspect.lua"),
            force_release: lock_script!("force_release.lua"),
            fair_acquire: lock_script!("fair_acquire.lua"),
            fair_refresh: lock_script!("fair_refresh.lua"),
            fair_leave: lock_script!("fair_leave.lua"),
            _listeners: Vec::new(),
            connection_error: Arc::default(),
        };
        let scripts = Arc::new(store.scripts());
        // Registered before connecting, so the first connection's events are not missed.
        for client in store.pool.clients() {
            let failed = store.connection_error.clone();
            let errors = client.on_error(move |(error, _server)| {
                *failed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    Some(readable(error).to_string());
                std::future::ready(Ok(()))
            });
            let (loader, scripts, failed) = (
                client.clone(),
                scripts.clone(),
                store.connection_error.clone(),
            );
            let reloads = client.on_reconnect(move |_server| {
                *failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                let (client, scripts) = (loader.clone(), scripts.clone());
                async move {
                    for script in scripts.iter() {
                        if let Err(error) = script.load(&client).await {
                            debug!(%error, "could not load the lock scripts after connecting; calls load them on NOSCRIPT");
                            break;
                        }
                    }
                    Ok(())
                }
            });
            store._listeners.push(AbortOnDropHandle::new(errors));
            store._listeners.push(AbortOnDropHandle::new(reloads));
        }
        store.pool.connect_pool();
        Ok(store)
    }

    fn scripts(&self) -> Vec<Script> {
        [
            &self.acquire,
            &self.release,
            &self.handed,
            &self.extend,
            &self.inspect,
            &self.force_release,
            &self.fair_acquire,
            &self.fair_refresh,
            &self.fair_leave,
        ]
        .into_iter()
        .cloned()
        .collect()
    }

    fn call<'a>(&'a self, name: &'a LockName) -> ScriptCall<'a> {
        ScriptCall::on(&self.prefix, name)
    }

    /// A call for the scripts that may touch all three keys: the lock, its plain waiters and
    /// its fair queue (a release may hand the lock to either kind of waiter).
    fn call_on_every_key<'a>(&'a self, name: &'a LockName) -> ScriptCall<'a> {
        self.call(name)
            .key(suffix::LOCK)
            .key(suffix::WAITERS)
            .key(suffix::QUEUE)
    }

    /// The lock's unlock channel (what local waiters watch).
    pub fn channel(&self, name: &LockName) -> String {
        redis_name(&self.prefix, name, suffix::CHANNEL)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// One acquire attempt. `waiter`: the caller's waiter id (`token.waiter_id()`: a release
    /// hands the lock to a waiter by looking its token up in the waiter set) and time left
    /// until its deadline, to be registered in the lock's waiter set if the lock is busy.
    pub async fn acquire(
        &self,
        name: &LockName,
        token: Token,
        reenter: Option<Op>,
        lease: Lease,
        waiter: Option<(&str, Duration)>,
    ) -> Result<Attempt, StoreError> {
        let (waiter_id, wait_ms) = waiter.map_or(("", 0), |(id, left)| (id, millis(left).max(1)));
        let call = self
            .call(name)
            .key(suffix::LOCK)
            .key(suffix::WAITERS)
            .token(token)
            .flag(reenter.is_some())
            .number(lease.millis())
            .number(self.linger_ms)
            .text(waiter_id)
            .number(wait_ms);
        let call = match reenter {
            Some(op) => call.op(op),
            None => call.text(""),
        };
        let reply: Vec<i64> = self.run(name, &self.acquire, call).await?;
        match reply.as_slice() {
            [1, fence, holds, lease_ms] => Ok(Attempt::Granted(Granted {
                fence: to_u64(*fence),
                holds: to_u32(*holds),
                lease: Duration::from_millis(to_u64(*lease_ms)),
                queued_at: 0,
            })),
            [0, ttl_ms] => Ok(Attempt::Busy {
                holder_ttl: Duration::from_millis(to_u64(*ttl_ms)),
            }),
            [code] => NotOwner::from_code(*code)
                .map(Attempt::Refused)
                .ok_or_else(|| StoreError::unexpected("acquire", &reply)),
            _ => Err(StoreError::unexpected("acquire", &reply)),
        }
    }

    /// Whether the release made with `from` handed the lock to `to` (see handed.lua), and
    /// with how much lease left: asked after that release lost its answer. Changes nothing.
    /// Runs on the lock's connection, so Redis answers it only after that release ran.
    pub async fn handed_to(
        &self,
        name: &LockName,
        to: Token,
        from: Token,
    ) -> Result<Option<Granted>, StoreError> {
        let call = self.call(name).key(suffix::LOCK).token(to).token(from);
        let reply: Vec<i64> = self.run(name, &self.handed, call).await?;
        match reply.as_slice() {
            [1, fence, holds, lease_ms] => Ok(Some(Granted {
                fence: to_u64(*fence),
                holds: to_u32(*holds),
                lease: Duration::from_millis(to_u64(*lease_ms)),
                queued_at: 0,
            })),
            [0] => Ok(None),
            _ => Err(StoreError::unexpected("handed", &reply)),
        }
    }

    /// Removes a waiter entry that will not be granted (timed out, cancelled).
    pub async fn leave_waiters(&self, name: &LockName, waiter_id: &str) -> Result<(), StoreError> {
        use fred::interfaces::SortedSetsInterface;
        let waiters = redis_name(&self.prefix, name, suffix::WAITERS);
        let _: i64 = Box::pin(self.client_for(name).zrem(waiters, waiter_id))
            .await
            .map_err(|error| self.explained(error))?;
        Ok(())
    }

    /// Gives back one hold of `token`. With `hand_off`, a lock left without holds goes straight
    /// to that waiter when `release.lua` finds it eligible (see there), instead of being freed.
    pub async fn release(
        &self,
        name: &LockName,
        token: Token,
        hand_off: Option<HandOff>,
        linger: Linger,
        op: Op,
    ) -> Result<Result<ReleaseReply, NotOwner>, StoreError> {
        let linger_ms = match linger {
            Linger::Keep => self.linger_ms,
            Linger::Drop => 0,
        };
        let call = self
            .call_on_every_key(name)
            .token(token)
            .number(linger_ms)
            .channel();
        let call = match hand_off {
            Some(h) => call
                .token(h.to)
                .number(h.lease.millis())
                .text(if h.fair { "fair" } else { "plain" })
                .number(u64::try_from(h.plain_waiters).unwrap_or(u64::MAX)),
            None => call.text("").number(0).text("plain").number(0),
        };
        let reply: Vec<i64> = self.run(name, &self.release, call.op(op)).await?;
        match reply.as_slice() {
            [1, _] => Ok(Ok(ReleaseReply::Released(Released::Free))),
            [2, fence, lease_ms, queued_at] => Ok(Ok(ReleaseReply::Handed(Granted {
                fence: to_u64(*fence),
                holds: 1,
                lease: Duration::from_millis(to_u64(*lease_ms)),
                queued_at: to_u64(*queued_at),
            }))),
            [0, holds] => Ok(Ok(ReleaseReply::Released(Released::StillHeld(to_u32(
                *holds,
            ))))),
            [3] => Ok(Ok(ReleaseReply::HandedBefore)),
            [code] => NotOwner::from_code(*code)
                .map(Err)
                .ok_or_else(|| StoreError::unexpected("release", &reply)),
            _ => Err(StoreError::unexpected("release", &reply)),
        }
    }

    pub async fn extend(
        &self,
        name: &LockName,
        token: Token,
        lease: Lease,
    ) -> Result<Result<Duration, NotOwner>, StoreError> {
        let call = self
            .call(name)
            .key(suffix::LOCK)
            .token(token)
            .number(lease.millis())
            .number(self.linger_ms);
        let reply: Vec<i64> = self.run(name, &self.extend, call).await?;
        match reply.as_slice() {
            [1, lease_ms] => Ok(Ok(Duration::from_millis(to_u64(*lease_ms)))),
            [code] => NotOwner::from_code(*code)
                .map(Err)
                .ok_or_else(|| StoreError::unexpected("extend", &reply)),
            _ => Err(StoreError::unexpected("extend", &reply)),
        }
    }

    pub async fn inspect(&self, name: &LockName) -> Result<LockState, StoreError> {
        let call = self.call(name).key(suffix::LOCK).key(suffix::WAITERS);
        let reply: Vec<i64> = self.run(name, &self.inspect, call).await?;
        match reply.as_slice() {
            [held, fence, ttl_ms, holds, waiters] => Ok(LockState {
                held: *held == 1,
                fence: to_u64(*fence),
                ttl: Duration::from_millis(to_u64(*ttl_ms)),
                holds: to_u32(*holds),
                waiters: to_u32(*waiters),
            }),
            _ => Err(StoreError::unexpected("inspect", &reply)),
        }
    }

    pub async fn force_release(&self, name: &LockName, op: Op) -> Result<bool, StoreError> {
        let call = self
            .call_on_every_key(name)
            .number(self.linger_ms)
            .channel()
            .op(op);
        let released: i64 = self.run(name, &self.force_release, call).await?;
        Ok(released == 1)
    }

    /// One fair acquire attempt: granted if the lock is free and the caller first in line.
    /// `joins`: queue the caller (it waits) when not granted. `alive`: how long its queue entry
    /// lives unless refreshed.
    pub async fn fair_acquire(
        &self,
        name: &LockName,
        token: Token,
        lease: Lease,
        joins: bool,
        alive: Duration,
    ) -> Result<(Attempt, u64), StoreError> {
        let call = self
            .call_on_every_key(name)
            .token(token)
            .number(lease.millis())
            .number(self.linger_ms)
            .flag(joins)
            .number(millis(alive));
        let reply: Vec<i64> = self.run(name, &self.fair_acquire, call).await?;
        match reply.as_slice() {
            [1, fence, holds, lease_ms, queued_at] => Ok((
                Attempt::Granted(Granted {
                    fence: to_u64(*fence),
                    holds: to_u32(*holds),
                    lease: Duration::from_millis(to_u64(*lease_ms)),
                    queued_at: to_u64(*queued_at),
                }),
                to_u64(*queued_at),
            )),
            [0, ttl_ms, _position, order] => Ok((
                Attempt::Busy {
                    holder_ttl: Duration::from_millis(to_u64(*ttl_ms)),
                },
                to_u64(*order),
            )),
            _ => Err(StoreError::unexpected("fair_acquire", &reply)),
        }
    }

    /// Keeps this process's queued waiters on `name` alive; returns the first live waiter if
    /// the lock is free (whose turn it is).
    pub async fn fair_refresh(
        &self,
        name: &LockName,
        waiter_ids: &[String],
        alive: Duration,
    ) -> Result<Option<String>, StoreError> {
        let call = self.call_on_every_key(name).number(millis(alive));
        let call = waiter_ids.iter().fold(call, |call, id| call.text(id));
        let head: Option<String> = self.run(name, &self.fair_refresh, call).await?;
        Ok(head)
    }

    /// Takes a fair waiter out of the queue (timed out, cancelled), telling the next in line
    /// if the lock is free.
    pub async fn fair_leave(&self, name: &LockName, waiter_id: &str) -> Result<(), StoreError> {
        let call = self.call_on_every_key(name).text(waiter_id).channel();
        let _: i64 = self.run(name, &self.fair_leave, call).await?;
        Ok(())
    }

    /// The pooled connection every command on `name` goes over, so Redis runs them in the
    /// order they were sent (see `handed_to`).
    fn client_for(&self, name: &LockName) -> &Client {
        let clients = self.pool.clients();
        let mut hasher = DefaultHasher::new();
        name.as_str().hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % clients.len().max(1) as u64).unwrap_or(0);
        clients.get(index).unwrap_or_else(|| self.pool.next())
    }

    /// Runs `script` on `name`'s connection (EVALSHA, reloaded on NOSCRIPT).
    ///
    /// The call is boxed: fred's EVALSHA future is several kilobytes, and kept inline it
    /// would make every future that awaits a script that large, copied on each spawn and box.
    async fn run<R: FromValue>(
        &self,
        name: &LockName,
        script: &Script,
        call: ScriptCall<'_>,
    ) -> Result<R, fred::error::Error> {
        let (keys, args) = call.into_parts();
        Box::pin(script.evalsha_with_reload(self.client_for(name), keys, args))
            .await
            .map_err(|error| self.explained(error))
    }

    /// A round trip to Redis, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self
            .pool
            .next()
            .ping(None)
            .await
            .map_err(|error| self.explained(error))?;
        Ok(())
    }

    /// `error`, followed by why the latest connection attempt failed when the command timed
    /// out or never reached Redis while latchkey cannot connect ("Request timed out" alone
    /// does not tell a refused connection from a wrong password or a stalled Redis).
    fn explained(&self, error: fred::error::Error) -> fred::error::Error {
        use fred::error::ErrorKind;
        let error = readable(error);
        if !matches!(
            error.kind(),
            ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled
        ) {
            return error;
        }
        let cause = self
            .connection_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match cause {
            Some(cause) => fred::error::Error::new(
                error.kind().clone(),
                format!(
                    "{}; the latest connection attempt failed: {cause}",
                    error.details()
                ),
            ),
            None => error,
        }
    }
}

/// `error` with an IO failure worded the way `std::io::Error` displays it
/// (`Connection refused (os error 111)`). fred words it by the error's `Debug` form (`Os { code:
/// 111, kind: ConnectionRefused, message: "Connection refused" }`), which ends up in UNAVAILABLE
/// messages and the log; any other error, or a form not recognised, is left as fred wrote it.
pub(super) fn readable(error: fred::error::Error) -> fred::error::Error {
    match io_error_text(error.details()) {
        Some(text) if *error.kind() == fred::error::ErrorKind::IO => {
            fred::error::Error::new(error.kind().clone(), text)
        }
        _ => error,
    }
}

/// The `Display` text of the `std::io::Error` whose `Debug` text is `debug`, for the two forms a
/// socket error takes: an OS error and an error with a custom message.
fn io_error_text(debug: &str) -> Option<String> {
    if let Some(os) = debug.strip_prefix("Os { code: ") {
        let (code, rest) = os.split_once(", kind: ")?;
        let (_kind, rest) = rest.split_once(", message: \"")?;
        let message = rest.strip_suffix("\" }")?;
        return Some(format!("{message} (os error {code})"));
    }
    let custom = debug.strip_prefix("Custom { kind: ")?;
    let (_kind, rest) = custom.split_once(", error: \"")?;
    rest.strip_suffix("\" }").map(str::to_owned)
}

/// Redis did not answer as expected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Unreachable, timed out, or the connection dropped: the caller may retry.
    #[error("Redis is unavailable: {0}")]
    Unavailable(fred::error::Error),
    /// Redis answered with an error or a reply the scripts never produce: a bug or a foreign
    /// writer on latchkey's keys.
    #[error("Redis answered unexpectedly: {0}")]
    Unexpected(String),
}

impl StoreError {
    fn unexpected(script: &str, reply: &[i64]) -> Self {
        Self::Unexpected(format!("{script}.lua replied {reply:?}"))
    }
}

impl From<fred::error::Error> for StoreError {
    fn from(error: fred::error::Error) -> Self {
        use fred::error::ErrorKind;
        match error.kind() {
            ErrorKind::IO
            | ErrorKind::Timeout
            | ErrorKind::Canceled
            | ErrorKind::Backpressure
            | ErrorKind::Cluster
            | ErrorKind::Routing => Self::Unavailable(error),
            // LOADING / BUSY (a running DEBUG SLEEP or long script) are transient too.
            _ if error.details().starts_with("LOADING") || error.details().starts_with("BUSY") => {
                Self::Unavailable(error)
            }
            _ => Self::Unexpected(error.to_string()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn name(raw: &str) -> LockName {
        let limits = Config::for_redis("127.0.0.1:0".parse().unwrap(), "redis://127.0.0.1:1").locks;
        LockName::parse(raw.to_owned(), &limits).unwrap()
    }

    fn text(value: &[u8]) -> &str {
        std::str::from_utf8(value).unwrap()
    }

    /// The script arguments a call sends, as text.
    fn arguments(args: &Value) -> Vec<&str> {
        let Value::Array(args) = args else {
            panic!("the arguments go as one array, got {args:?}");
        };
        args.iter()
            .map(|arg| text(arg.as_bytes().unwrap()))
            .collect()
    }

    #[test]
    fn a_script_call_sends_each_key_and_argument_as_its_own_value_empty_ones_included() {
        let name = name("orders/é");
        let token = Token::generate();
        let (keys, args) = ScriptCall::on("lk", &name)
            .key(suffix::LOCK)
            .key(suffix::QUEUE)
            .token(token)
            .text("")
            .number(u64::MAX)
            .channel()
            .flag(false)
            .into_parts();
        let keys: Vec<&str> = keys.iter().map(|key| text(key.as_bytes())).collect();
        assert_eq!(keys, ["lk:{orders/é}:lock", "lk:{orders/é}:queue"]);
        // In Redis a token has no dashes (see Token::encode); clients see them.
        let token = token.to_string().replace('-', "");
        assert_eq!(token.len(), 32);
        assert_eq!(
            arguments(&args),
            [
                token.as_str(),
                "",
                "18446744073709551615",
                "lk:{orders/é}:unlock",
                "0"
            ]
        );
    }

    #[test]
    fn each_call_gets_its_own_op_id_a_decimal_integer_redis_stores_as_one() {
        let name = name("a");
        let op = |request_id| {
            let (_, args) = ScriptCall::on("lk", &name)
                .op(Op::of(request_id))
                .into_parts();
            arguments(&args)[0].to_owned()
        };
        let caller = RequestId::parse(&Uuid::new_v4().to_string()).expect("a UUID");
        let (first, second, mine, mine_again) = (op(None), op(None), op(caller), op(caller));
        for id in [&first, &second, &mine] {
            // Redis keeps a hash value as an integer only if it reads back as the same text:
            // digits, no leading zero, within i64.
            let value: i64 = id.parse().unwrap_or_else(|_| panic!("{id:?}"));
            assert!(value >= 0 && value.to_string() == *id, "{id:?}");
        }
        assert_ne!(first, second);
        assert_eq!(
            mine, mine_again,
            "a caller's retry carries its first run's id"
        );
    }

    #[test]
    fn an_io_error_reads_as_std_displays_it_not_as_its_debug_form() {
        let refused = std::io::Error::from_raw_os_error(111);
        let custom = std::io::Error::other("TLS handshake eof");
        for io in [refused, custom] {
            let (debug, display) = (format!("{io:?}"), io.to_string());
            // How fred turns a socket error into its own (its `From<io::Error>`).
            let fred_made = fred::error::Error::from(io);
            assert_eq!(fred_made.details(), debug, "fred's wording changed");
            let error = readable(fred_made);
            assert_eq!(error.details(), display);
            assert_eq!(*error.kind(), fred::error::ErrorKind::IO);
        }
    }

    #[test]
    fn an_error_that_is_not_an_io_error_keeps_fred_s_words() {
        for (kind, details) in [
            (fred::error::ErrorKind::Timeout, "Request timed out."),
            (fred::error::ErrorKind::IO, "Connection closed."),
            (
                fred::error::ErrorKind::Unknown,
                "Os { code: 1, kind: X, message: \"y\" }",
            ),
        ] {
            let error = readable(fred::error::Error::new(kind.clone(), details));
            assert_eq!((error.kind(), error.details()), (&kind, details));
        }
    }

    #[test]
    fn the_unlock_channel_waiters_watch_is_the_one_scripts_publish_to() {
        let name = name("a");
        let (_, args) = ScriptCall::on("latchkey", &name).channel().into_parts();
        let watched = redis_name("latchkey", &name, suffix::CHANNEL);
        assert_eq!(arguments(&args), [watched.as_str()]);
        assert_eq!(watched, "latchkey:{a}:unlock");
    }
}
