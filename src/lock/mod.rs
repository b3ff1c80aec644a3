//! The lock engine: acquire (with waiting), release, extend, inspect, force-release, and the
//! server-side watchdog behind Hold streams.
//!
//! What it promises:
//! - **No polling.** A waiter subscribes to the lock's unlock channel before it retries, then
//!   sleeps until an unlock message or the holder's remaining lease, whichever comes first,
//!   capped by its own deadline. A lost pub/sub message therefore delays a waiter at most until
//!   the holder's lease ends.
//! - **Every wait has a deadline**, and a waiter whose caller went away (`gone` resolved) or
//!   whose server is shutting down stops waiting and never acquires afterwards: cancellation is
//!   only observed *between* attempts, never while an acquire script is in flight.
//! - **Fences** come from Redis (see `acquire.lua`): strictly increasing per name across
//!   grants, unchanged by re-entry, and still increasing after Redis loses its data.
//! - **Holds** renew every lease/3 until stopped, and report the lock LOST as soon as Redis no
//!   longer records them, or when renewals failed until the lease ran out.
//! - **Fair locks** are granted in the order waiters joined the lock's queue in Redis; only the
//!   head is woken; a departed waiter leaves the queue at once, a dead process's waiters lapse
//!   within 4/3 of `fair_waiter_timeout` (see `fair`).
//! - **Hand-off.** A release made in this process gives the lock straight to a waiter of this
//!   process when `release.lua` finds that waiter next in line (the fair queue's head, or, for a
//!   plain lock, any local waiter when no other replica has one): one script instead of free,
//!   publish, wake, retry. The waiter is told in-process; if it left meanwhile, the lock is
//!   released again on its behalf (and may be handed on), so a hand-off never strands a lock.
//!   If the release's answer is lost (timed out, or a retried command), the engine asks Redis
//!   whether the lock went to the waiter and tells it if so (`settle`).
//! - **A lost acquire answer strands nothing.** An Acquire that fails because Redis did not
//!   answer in time may still be run by Redis later; the engine then releases what it may have
//!   granted, under a token no caller ever saw (`disown`).
//!
//! Layout: `request` (typed, validated inputs), `store` (Redis keys and scripts), `waiters`
//! (pub/sub wake-ups), `fair` (the queue refresher).

pub mod admission;
mod fair;
pub mod request;
pub mod store;
pub mod waiters;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, oneshot},
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use request::{
    AcquireRequest, Invalid, Lease, LockName, Reentry, RequestId, Token, WaitTimeout,
};
pub use store::{Linger, LockState, NotOwner, Released, StoreError};

use crate::telemetry;
use store::{Attempt, LockStore, Op, ReleaseReply};
use waiters::{Offer, Place, Ticket, Waiters};

/// A lock granted to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub token: Token,
    pub fence: u64,
    pub lease: Duration,
    pub holds: u32,
    /// Fair grants that queued: the Redis time (us) at which the caller joined the queue.
    pub queued_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Granted(Grant),
    /// The wait ran out (or was zero) while someone else held the lock.
    TimedOut {
        holder_ttl: Duration,
    },
}

/// Why a hold ended without its owner asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Redis no longer records this hold (ForceRelease, Redis lost its data, lease ran out).
    NotHeld(NotOwner),
    /// Renewals kept failing (Redis unreachable) until the lease ran out.
    Expired,
    /// The server is shutting down; the lock was released first.
    ShuttingDown,
}

/// How a hold ended.
#[derive(Debug)]
pub enum HoldEnd<T> {
    /// `stop` resolved with `T`; the hold was then released with this result.
    Stopped(T, Result<Released, LockError>),
    Lost(Lost),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}", not_owner_message(*.0))]
    NotOwner(NotOwner),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the caller went away")]
    Cancelled,
    /// A load cap was reached; the message names it.
    #[error("{0}")]
    Exhausted(String),
}

impl LockError {
    /// The `outcome` label of this failure in the metrics (see `telemetry`); a failed ownership
    /// check is `refused`.
    pub fn outcome(&self) -> &'static str {
        match self {
            LockError::NotOwner(_) => "refused",
            LockError::Cancelled => "cancelled",
            LockError::ShuttingDown => "shutting_down",
            LockError::Exhausted(_) => "exhausted",
            LockError::Store(_) => "error",
        }
    }
}

fn not_owner_message(why: NotOwner) -> &'static str {
    match why {
        NotOwner::NotHeld => "not held: the lock is free",
        NotOwner::OtherOwner => "held by another owner: this token does not own the lock",
        NotOwner::Expired => "expired: this token's lease ended; the lock is no longer held by it",
    }
}

/// The wait metrics of one acquire: a wait is counted once it started (the lock was found
/// busy), and then once more by how it ended.
#[derive(Default)]
struct WaitCount {
    started: bool,
}

impl WaitCount {
    fn start(&mut self) {
        if !std::mem::replace(&mut self.started, true) {
            metrics::counter!(telemetry::WAITS_STARTED).increment(1);
        }
    }

    /// Counts how a started wait ended: granted (true), timed out (false), or why it failed.
    fn finish(self, granted: Result<bool, &LockError>) {
        if !self.started {
            return;
        }
        let outcome = match granted {
            Ok(true) => "granted",
            Ok(false) => "timed_out",
            Err(LockError::Cancelled) => "cancelled",
            Err(LockError::ShuttingDown) => "shutting_down",
            Err(_) => "error",
        };
        metrics::counter!(telemetry::WAIT_OUTCOMES, "outcome" => outcome).increment(1);
    }
}

/// What one release script did for its caller.
enum Step {
    Released(Released),
    /// The lock went to a waiter that had already left: it must be released for that token.
    Orphaned(Token),
}

impl Step {
    /// Gives `offer`'s candidate the lock a release handed it (`granted`). The releaser's
    /// hold is gone either way; if the candidate left meanwhile, the lock is `Orphaned` and
    /// must be released for it.
    fn handed(offer: Offer, granted: store::Granted) -> Step {
        metrics::counter!(telemetry::HAND_OFFS).increment(1);
        let to = offer.candidate.token;
        match offer.candidate.deliver(granted) {
            Ok(()) => Step::Released(Released::Free),
            Err(_) => Step::Orphaned(to),
        }
    }

    fn released(self) -> Released {
        match self {
            Step::Released(released) => released,
            // The caller's hold is gone either way.
            Step::Orphaned(_) => Released::Free,
        }
    }

    fn orphaned(&self) -> Option<Token> {
        match self {
            Step::Orphaned(token) => Some(*token),
            Step::Released(_) => None,
        }
    }
}

/// The engine shared by the gRPC services (and the stock engine).
pub struct LockEngine {
    store: LockStore,
    waiters: Waiters,
    /// Cancelled when the server shuts down: waits end, holds release.
    shutdown: CancellationToken,
    /// Fair waiters queued by this process, kept alive by `fair::refresh`.
    fair: Arc<fair::FairWaiting>,
    /// How long a fair waiter's queue entry lives without a refresh.
    fair_alive: Duration,
    /// Caps on waiting callers.
    admission: admission::Admission,
    /// Bounds the background releases of grants whose answer was lost (see `disown`):
    /// `max_lost_grant_releases` permits.
    disowning: Arc<Semaphore>,
}

/// First pause before `settle` or `disown` tries Redis again while it is unavailable
/// (doubling to 1 s).
const SETTLE_BACKOFF: Duration = Duration::from_millis(50);

/// The pauses between retries while Redis is unavailable, up to a deadline.
struct Backoff {
    next: Duration,
    give_up: Instant,
}

impl Backoff {
    fn until(give_up: Instant) -> Self {
        Self {
            next: SETTLE_BACKOFF,
            give_up,
        }
    }

    /// Sleeps before the next try; false (at once) when that try would come after `give_up`.
    async fn pause(&mut self) -> bool {
        if Instant::now() + self.next >= self.give_up {
            return false;
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Duration::from_secs(1));
        true
    }
}

/// Slack added to a holder's TTL before retrying, so the retry lands after the lease ended
/// even with Redis' millisecond rounding.
const TTL_SLACK: Duration = Duration::from_millis(2);

impl LockEngine {
    /// Builds the engine and starts its fair-queue refresher (which ends with the engine).
    pub fn start(
        store: LockStore,
        waiters: Waiters,
        shutdown: CancellationToken,
        limits: &crate::config::LockConfig,
    ) -> Arc<Self> {
        let fair_alive = limits.fair_waiter_timeout;
        let engine = Arc::new(Self {
            store,
            waiters,
            shutdown,
            fair: Arc::default(),
            fair_alive,
            admission: admission::Admission::new(limits.max_waiters_per_name, limits.max_waiters),
            disowning: Arc::new(Semaphore::new(limits.max_lost_grant_releases as usize)),
        });
        tokio::spawn(fair::refresh(Arc::downgrade(&engine), fair_alive));
        engine
    }

    pub fn store(&self) -> &LockStore {
        &self.store
    }

    /// The waiting caps, shared with the stock engine's order queues.
    pub fn admission(&self) -> &admission::Admission {
        &self.admission
    }

    /// Acquires `req.name`, waiting until `deadline` at the latest. `gone` resolves when the
    /// caller no longer wants the lock; the engine then stops waiting and returns `Cancelled`.
    pub async fn acquire(
        self: &Arc<Self>,
        req: &AcquireRequest,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Acquired, LockError> {
        let started = Instant::now();
        let (token, reenter) = match req.reenter {
            Some(reentry) => (reentry.token, true),
            None => (Token::generate(), false),
        };
        let result = self.acquire_inner(req, token, deadline, gone).await;
        if !reenter && matches!(result, Err(LockError::Store(StoreError::Unavailable(_)))) {
            self.disown(req, token);
        }
        let outcome = match &result {
            Ok(Acquired::Granted(_)) => "granted",
            Ok(Acquired::TimedOut { .. }) => "timed_out",
            Err(error) => error.outcome(),
        };
        metrics::histogram!(telemetry::ACQUIRE_SECONDS, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// `token`: `req.reenter`'s, or the fresh one this acquire grants under.
    async fn acquire_inner(
        self: &Arc<Self>,
        req: &AcquireRequest,
        token: Token,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Acquired, LockError> {
        let name = &req.name;
        let reenter = req.reenter.is_some();
        let grant = |g: store::Granted| {
            Acquired::Granted(Grant {
                token,
                fence: g.fence,
                lease: g.lease,
                holds: g.holds,
                queued_at: g.queued_at,
            })
        };
        if req.fair && !reenter {
            return self
                .acquire_fair(req, token, deadline, gone)
                .await
                .map(|g| match g {
                    Ok(g) => grant(g),
                    Err(holder_ttl) => Acquired::TimedOut { holder_ttl },
                });
        }

        // Fast path: an uncontended lock costs one script and no subscription. A caller that
        // may wait on a lock this process already waits on (contended, subscription in place)
        // goes straight to the waiting loop instead: one script instead of two.
        let channel = self.store.channel(name);
        let contended = !reenter && Instant::now() < deadline && self.waiters.is_watched(&channel);
        let mut holder_ttl = Duration::ZERO;
        let mut wait = WaitCount::default();
        if !contended {
            let reentry = req.reenter.map(|r| Op::of(r.request_id));
            holder_ttl = match self.attempt(name, token, reentry, req.lease, None).await? {
                Attempt::Granted(g) => return Ok(grant(g)),
                Attempt::Refused(why) => return Err(LockError::NotOwner(why)),
                Attempt::Busy { holder_ttl } => holder_ttl,
            };
            if Instant::now() >= deadline {
                return Ok(Acquired::TimedOut { holder_ttl });
            }
            wait.start();
        }

        let _slot = self.admission.admit(name)?;
        tokio::pin!(gone);
        let interest = tokio::select! {
            interest = self.waiters.watch(&channel) => interest,
            () = sleep_until(deadline) => return Ok(Acquired::TimedOut { holder_ttl }),
            () = &mut gone => return Err(LockError::Cancelled),
            () = self.shutdown.cancelled() => return Err(LockError::ShuttingDown),
        };
        // The token is unique to this request, so it doubles as the waiter id.
        let waiter_id = token.waiter_id();
        // In the line before the first registration is even sent: a local release then counts
        // this caller among the process's waiters (so it does not mistake it for another
        // replica's and give up the hand-off), while release.lua only ever hands the lock to a
        // waiter Redis already knows.
        let mut line = interest.line_up(token, req.lease, Place::Plain);
        let outcome = loop {
            let notified = interest.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .attempt(name, token, None, req.lease, Some((&waiter_id, left)))
                .await
            {
                Ok(Attempt::Granted(g)) => break Ok(grant(g)),
                Ok(Attempt::Busy { holder_ttl: ttl }) => holder_ttl = ttl,
                Ok(Attempt::Refused(why)) => break Err(LockError::NotOwner(why)),
                Err(error) => break Err(error),
            }
            wait.start();
            let now = Instant::now();
            if now >= deadline {
                break Ok(Acquired::TimedOut { holder_ttl });
            }
            // Sleep until an unlock message, or until the holder's lease ends in case the
            // message was lost, but never past our own deadline.
            let wake_at = (now + holder_ttl + TTL_SLACK).min(deadline);
            tokio::select! {
                biased;
                handed = line.handed() => break Ok(grant(handed)),
                () = &mut notified => {}
                () = sleep_until(wake_at) => {}
                () = &mut gone => break Err(LockError::Cancelled),
                () = self.shutdown.cancelled() => break Err(LockError::ShuttingDown),
            }
        };
        let outcome = match line.leave() {
            Some(handed) => {
                self.late_hand_off(name, token, outcome, handed, grant)
                    .await
            }
            None => outcome,
        };
        wait.finish(outcome.as_ref().map(|a| matches!(a, Acquired::Granted(_))));
        if !matches!(outcome, Ok(Acquired::Granted(_))) {
            // The entry would lapse at our deadline anyway; removing it keeps Inspect exact.
            if let Err(error) = self.store.leave_waiters(name, &waiter_id).await {
                debug!(lock = %name, %error, "could not remove waiter entry; it lapses at its deadline");
            }
        }
        drop(interest);
        outcome
    }

    /// The fair path: queue in Redis, wait to be named head, take the lock.
    /// Ok(Ok(grant)) or Ok(Err(holder_ttl)) when the wait ran out.
    async fn acquire_fair(
        self: &Arc<Self>,
        req: &AcquireRequest,
        token: Token,
        deadline: Instant,
        gone: impl Future<Output = ()>,
    ) -> Result<Result<store::Granted, Duration>, LockError> {
        let name = &req.name;
        let waits = Instant::now() < deadline;
        let _slot = if waits {
            Some(self.admission.admit(name)?)
        } else {
            None
        };
        let attempt = |joins: bool| async move {
            self.store
                .fair_acquire(name, token, req.lease, joins, self.fair_alive)
                .await
                .map_err(|e| self.store_error("fair_acquire", e))
        };
        // As for plain locks: a contended lock (this process already waits on it, subscribed)
        // skips the first try and joins the queue in the loop's first script.
        let channel = self.store.channel(name);
        let contended = waits && self.waiters.is_watched(&channel);
        let mut holder_ttl = Duration::ZERO;
        let mut wait = WaitCount::default();
        if !contended {
            holder_ttl = match attempt(waits).await?.0 {
                Attempt::Granted(g) => return Ok(Ok(g)),
                Attempt::Busy { holder_ttl } if !waits => return Ok(Err(holder_ttl)),
                Attempt::Busy { holder_ttl } => holder_ttl,
                Attempt::Refused(why) => return Err(LockError::NotOwner(why)),
            };
            wait.start();
        }
        // From here on we may be in the queue: every way out must leave it.
        let waiter_id = token.waiter_id();
        let _queued = self.fair.join(name, &waiter_id);
        tokio::pin!(gone);
        let mut line: Option<Ticket> = None;
        let outcome = async {
            let interest = tokio::select! {
                interest = self.waiters.watch(&channel) => interest,
                () = sleep_until(deadline) => return Ok(Err(holder_ttl)),
                () = &mut gone => return Err(LockError::Cancelled),
                () = self.shutdown.cancelled() => return Err(LockError::ShuttingDown),
            };
            let ticket = interest.fair_ticket(&waiter_id);
            loop {
                match attempt(true).await? {
                    (Attempt::Granted(g), _) => return Ok(Ok(g)),
                    (Attempt::Busy { holder_ttl: ttl }, order) => {
                        holder_ttl = ttl;
                        wait.start();
                        // Queued in Redis: a local release may hand us the lock when we are
                        // first in line. (order 0: the lock was just handed to us; the line
                        // we stand in already carries it.)
                        if line.is_none() && order != 0 {
                            line = Some(interest.line_up(token, req.lease, Place::Fair(order)));
                        }
                    }
                    (Attempt::Refused(why), _) => return Err(LockError::NotOwner(why)),
                }
                let now = Instant::now();
                if now >= deadline {
                    return Ok(Err(holder_ttl));
                }
                // Woken by name when we are first in line for a free lock (by the release, a
                // departing waiter, or the refresher); when the lock is held, also at the end
                // of the holder's lease, in case it never releases.
                let wake_at = if holder_ttl.is_zero() {
                    deadline
                } else {
                    (now + holder_ttl + TTL_SLACK).min(deadline)
                };
                let handed = async {
                    match line.as_mut() {
                        Some(line) => line.handed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    handed = handed => return Ok(Ok(handed)),
                    () = ticket.notified() => {}
                    () = sleep_until(wake_at) => {}
                    () = &mut gone => return Err(LockError::Cancelled),
                    () = self.shutdown.cancelled() => return Err(LockError::ShuttingDown),
                }
            }
        }
        .await;
        let outcome = match line.and_then(Ticket::leave) {
            Some(handed) => self.late_hand_off(name, token, outcome, handed, Ok).await,
            None => outcome,
        };
        wait.finish(outcome.as_ref().map(Result::is_ok));
        if !matches!(outcome, Ok(Ok(_)))
            && let Err(error) = self.store.fair_leave(name, &waiter_id).await
        {
            debug!(lock = %name, %error, "could not leave the fair queue; the entry lapses unrefreshed");
        }
        outcome
    }

    async fn attempt(
        &self,
        name: &LockName,
        token: Token,
        reenter: Option<Op>,
        lease: Lease,
        waiter: Option<(&str, Duration)>,
    ) -> Result<Attempt, LockError> {
        self.store
            .acquire(name, token, reenter, lease, waiter)
            .await
            .map_err(|e| self.store_error("acquire", e))
    }

    /// An acquire under the fresh `token` failed because an attempt lost its answer (Redis
    /// timed out, or the connection dropped), and its caller hears UNAVAILABLE. Redis may still
    /// run that attempt late and grant the lock to `token`, which nobody would ever release:
    /// the lock would sit idle until its lease ended. Releases it (and leaves the fair queue) in
    /// the background, retrying while Redis is unavailable, for at most the lease. The token
    /// never left this process, so this releases nothing a caller holds; Redis runs the release
    /// after the lost attempt, both going over the lock's connection in order.
    ///
    /// At most `max_lost_grant_releases` of these run at once: in a long Redis outage every
    /// failing Acquire would start one, each retrying for its whole lease. Past that, such a
    /// lock frees at the end of its lease, as every lock of a crashed holder does.
    fn disown(self: &Arc<Self>, req: &AcquireRequest, token: Token) {
        let Ok(permit) = self.disowning.clone().try_acquire_owned() else {
            debug!(lock = %req.name, "too many lost acquire answers being given back; this one frees at lease end if it was granted");
            return;
        };
        let (engine, name, fair) = (self.clone(), req.name.clone(), req.fair);
        let mut retry = Backoff::until(Instant::now() + req.lease.get());
        tokio::spawn(async move {
            let _permit = permit;
            let give_back = || async {
                if fair {
                    engine.store.fair_leave(&name, &token.waiter_id()).await?;
                }
                engine.release(&name, token, None).await
            };
            loop {
                match give_back().await {
                    Ok(_) => {
                        debug!(lock = %name, "released a grant whose answer was lost");
                        return;
                    }
                    Err(LockError::NotOwner(_)) => return, // the lost attempt granted nothing
                    Err(error) => {
                        if !retry.pause().await {
                            // Redis was away all along; its outage is logged already.
                            debug!(lock = %name, %error, "could not release what an acquire that lost its answer may have granted; if it did, the lock frees at lease end");
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Gives back one hold. When none is left, the lock goes to a waiter of this process if it
    /// is next in line (see the module docs), else it is freed and waiters are woken. A
    /// `request_id` the lock's latest hold-count change already carried (the caller retrying a
    /// release whose answer it lost) changes nothing and is answered as that release was.
    pub async fn release(
        self: &Arc<Self>,
        name: &LockName,
        token: Token,
        request_id: Option<RequestId>,
    ) -> Result<Released, LockError> {
        self.release_op(name, token, Linger::Keep, Op::of(request_id))
            .await
    }

    /// `release`, saying what stays of the lock in Redis once it is free (`Linger::Drop`: for
    /// a name that turned out to guard nothing).
    pub async fn release_with(
        self: &Arc<Self>,
        name: &LockName,
        token: Token,
        linger: Linger,
    ) -> Result<Released, LockError> {
        self.release_op(name, token, linger, Op::of(None)).await
    }

    async fn release_op(
        self: &Arc<Self>,
        name: &LockName,
        token: Token,
        linger: Linger,
        op: Op,
    ) -> Result<Released, LockError> {
        let channel = self.store.channel(name);
        let Some(offer) = self.waiters.offer(&channel) else {
            return self
                .release_once(name, token, None, linger, op)
                .await
                .0
                .map(Step::released);
        };
        // Once the script may hand the lock over, the waiter must hear of it even if our own
        // caller stops waiting for us (a cancelled RPC drops this future): finish in a task.
        let engine = self.clone();
        let name = name.clone();
        let (answer, answered) = oneshot::channel();
        tokio::spawn(async move {
            let (first, unsettled) = engine
                .release_once(&name, token, Some(offer), linger, op)
                .await;
            let mut orphaned = first.as_ref().ok().and_then(Step::orphaned);
            let mut result = first.map(Step::released);
            let mut answer = Some(answer);
            if let Some(offer) = unsettled {
                // A lost reply is reported as it is, at once. "Another owner" may be this very
                // release, retried by fred after its first run handed the lock over: that
                // caller hears back once it is settled.
                let retried = matches!(result, Err(LockError::NotOwner(NotOwner::OtherOwner)));
                if !retried && let Some(answer) = answer.take() {
                    let _ = answer.send(result.clone());
                }
                let settled = engine.settle(&name, offer, token).await;
                if retried && settled.is_some() {
                    result = Ok(Released::Free);
                }
                orphaned = settled.and_then(|step| step.orphaned());
            }
            if let Some(answer) = answer {
                let _ = answer.send(result);
            }
            while let Some(token) = orphaned {
                let offer = engine.waiters.offer(&channel);
                let (step, unsettled) = engine
                    .release_once(&name, token, offer, Linger::Keep, Op::of(None))
                    .await;
                orphaned = match (step, unsettled) {
                    (_, Some(offer)) => engine
                        .settle(&name, offer, token)
                        .await
                        .and_then(|s| s.orphaned()),
                    (Ok(step), None) => step.orphaned(),
                    (Err(error), None) => {
                        warn!(lock = %name, %error, "could not release a lock handed to a waiter that left; it frees at lease end");
                        None
                    }
                };
            }
        });
        answered.await.unwrap_or_else(|_| {
            Err(LockError::Store(StoreError::Unexpected(
                "the release task ended without an answer".into(),
            )))
        })
    }

    /// One release script, offering the lock to `offer`'s candidate if there is one. The offer
    /// goes back into the line unless the lock was handed to it, or unless it is not known
    /// whether it was: then it is returned, for `settle`.
    async fn release_once(
        &self,
        name: &LockName,
        token: Token,
        offer: Option<Offer>,
        linger: Linger,
        op: Op,
    ) -> (Result<Step, LockError>, Option<Offer>) {
        let hand_off = offer.as_ref().map(Offer::hand_off);
        let reply = self.store.release(name, token, hand_off, linger, op).await;
        let mut unsettled = None;
        let reply = match (reply, offer) {
            (Ok(Ok(ReleaseReply::Handed(granted))), Some(offer)) => {
                return (Ok(Step::handed(offer, granted)), None);
            }
            // This release ran before and handed the lock over: the caller's hold is gone.
            // Run again by fred (a dropped connection), the hand-off went to this offer's
            // candidate, which must hear of it; retried by the caller (same request_id), it
            // went to whoever was offered then, and `settle` finds this candidate was not.
            (reply @ Ok(Ok(ReleaseReply::HandedBefore)), offer) => {
                unsettled = offer;
                reply
            }
            // The script may have run and handed the lock over without us hearing of it: its
            // reply was lost (timed out), or fred retried it after a dropped connection and the
            // retry found the lock already handed (another owner).
            (reply @ (Err(_) | Ok(Err(NotOwner::OtherOwner))), Some(offer)) => {
                unsettled = Some(offer);
                reply
            }
            (reply, offer) => {
                if let Some(offer) = offer {
                    offer.decline();
                }
                reply
            }
        };
        let step = match reply {
            Ok(Ok(ReleaseReply::Released(released))) => Ok(Step::Released(released)),
            Ok(Ok(ReleaseReply::Handed(_))) => Err(self.store_error(
                "release",
                StoreError::Unexpected("release.lua handed the lock to nobody".into()),
            )),
            Ok(Ok(ReleaseReply::HandedBefore)) => Ok(Step::Released(Released::Free)),
            Ok(Err(why)) => Err(LockError::NotOwner(why)),
            Err(e) => Err(self.store_error("release", e)),
        };
        (step, unsettled)
    }

    /// The release made with `from` offered the lock to `offer`'s candidate and lost its
    /// answer, so whether `release.lua` handed the lock over is unknown. Asks Redis (on the
    /// lock's connection, so after that release ran; `handed.lua` tells a hand-off from a
    /// grant the candidate took by itself), retrying while Redis is unavailable for at most the
    /// candidate's lease (a lock handed over and never claimed frees by then anyway). Delivers
    /// the lock if it was handed over; otherwise the candidate goes back into the line.
    /// Returns what the release did when it did hand the lock over (`Orphaned` if the
    /// candidate left meanwhile), None when it did not (or it could not be learned).
    async fn settle(&self, name: &LockName, offer: Offer, from: Token) -> Option<Step> {
        let to = offer.candidate.token;
        let mut retry = Backoff::until(Instant::now() + offer.candidate.lease.get());
        loop {
            match self.store.handed_to(name, to, from).await {
                Ok(Some(granted)) => return Some(Step::handed(offer, granted)),
                Ok(None) => {
                    offer.decline();
                    return None;
                }
                Err(error) => {
                    let error = self.store_error("handed", error);
                    if !retry.pause().await {
                        warn!(lock = %name, %error, "could not learn whether a release handed the lock to a waiter of this process; if it did, the lock frees at lease end");
                        offer.decline();
                        return None;
                    }
                }
            }
        }
    }

    /// A hand-off reached a waiter just as it stopped waiting with `outcome`. If its caller is
    /// gone or the server is stopping, the lock is released again (and maybe handed on);
    /// otherwise the waiter takes it.
    async fn late_hand_off<T>(
        self: &Arc<Self>,
        name: &LockName,
        token: Token,
        outcome: Result<T, LockError>,
        handed: store::Granted,
        take: impl FnOnce(store::Granted) -> T,
    ) -> Result<T, LockError> {
        match outcome {
            Err(LockError::Cancelled | LockError::ShuttingDown) => {
                if let Err(error) = self.release(name, token, None).await {
                    warn!(lock = %name, %error, "could not release a lock handed to a waiter that left; it frees at lease end");
                }
                outcome
            }
            _ => Ok(take(handed)),
        }
    }

    /// Sets the remaining lease of a held lock to `lease`, counted from now.
    pub async fn extend(
        &self,
        name: &LockName,
        token: Token,
        lease: Lease,
    ) -> Result<Duration, LockError> {
        match self.store.extend(name, token, lease).await {
            Ok(Ok(lease)) => Ok(lease),
            Ok(Err(why)) => Err(LockError::NotOwner(why)),
            Err(e) => Err(self.store_error("extend", e)),
        }
    }

    pub async fn inspect(&self, name: &LockName) -> Result<LockState, LockError> {
        self.store
            .inspect(name)
            .await
            .map_err(|e| self.store_error("inspect", e))
    }

    /// Frees the lock whoever holds it. True when it was held, or when the ForceRelease with
    /// this `request_id` already freed it (a retry, which then changes nothing).
    pub async fn force_release(
        &self,
        name: &LockName,
        request_id: Option<RequestId>,
    ) -> Result<bool, LockError> {
        self.store
            .force_release(name, Op::of(request_id))
            .await
            .map_err(|e| self.store_error("force_release", e))
    }

    /// Keeps `grant` alive, renewing it every lease/3 (calling `renewed` with the new lease),
    /// until `stop` resolves (then releases it and returns `Stopped`) or the lock is lost.
    pub async fn hold<T>(
        self: &Arc<Self>,
        name: &LockName,
        grant: &Grant,
        lease: Lease,
        stop: impl Future<Output = T>,
        mut renewed: impl FnMut(Duration),
    ) -> HoldEnd<T> {
        let every = (lease.get() / 3).max(Duration::from_millis(1));
        let mut lease_end = Instant::now() + grant.lease;
        metrics::gauge!(telemetry::LIVE_HOLDS).increment(1.0);
        tokio::pin!(stop);
        // Messages on the lock's channel (a ForceRelease, a reconnect after Redis lost its data)
        // trigger an immediate renewal, which tells whether the hold still owns the lock. What
        // happened before the subscription was in place, the first renewal (right after it)
        // finds out.
        let interest = self.waiters.watch(&self.store.channel(name)).await;
        let mut next = Instant::now();
        let mut first_check = true;
        let end = loop {
            let changed = interest.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            tokio::select! {
                biased;
                stopped = &mut stop => {
                    let released = self.release(name, grant.token, None).await;
                    break HoldEnd::Stopped(stopped, released);
                }
                () = self.shutdown.cancelled() => {
                    if let Err(error) = self.release(name, grant.token, None).await {
                        warn!(lock = %name, %error, "could not release a held lock at shutdown; it frees at lease end");
                    }
                    break HoldEnd::Lost(Lost::ShuttingDown);
                }
                () = &mut changed => next = Instant::now(),
                () = sleep_until(next) => {
                    let asked = Instant::now();
                    match self.extend(name, grant.token, lease).await {
                        Ok(granted) => {
                            lease_end = asked + granted;
                            next = asked + every;
                            // The check right after the grant is not news to the client.
                            if !std::mem::take(&mut first_check) {
                                renewed(granted);
                            }
                        }
                        Err(LockError::NotOwner(why)) => break HoldEnd::Lost(Lost::NotHeld(why)),
                        Err(error) => {
                            let now = Instant::now();
                            if now >= lease_end {
                                break HoldEnd::Lost(Lost::Expired);
                            }
                            warn!(lock = %name, %error, "renewal failed; retrying before the lease ends");
                            next = (now + every.min(Duration::from_millis(200))).min(lease_end);
                        }
                    }
                }
            }
        };
        metrics::gauge!(telemetry::LIVE_HOLDS).decrement(1.0);
        end
    }

    fn store_error(&self, op: &'static str, error: StoreError) -> LockError {
        metrics::counter!(telemetry::REDIS_ERRORS, "op" => op).increment(1);
        LockError::Store(error)
    }
}
