//! Unlock notifications: one Redis subscriber connection per process, shared by every local
//! waiter.
//!
//! Promises:
//! - a lock's unlock channel is subscribed once however many local callers wait on it, and
//!   unsubscribed when the last one leaves;
//! - a waiter's interest is registered (and the SUBSCRIBE confirmed) before it retries, so an
//!   unlock published after its failed attempt always reaches it, unless Redis drops the message;
//! - each unlock message wakes one local waiter, in arrival order; a woken waiter that goes
//!   away before retrying passes the wake-up on (tokio's `Notify` semantics);
//! - a message `w:ID` (fair locks) wakes only the fair waiter ID, in whichever process has it;
//! - any other message (`released`, `forced`) means the lock is free and its fair queue has no
//!   live waiter: a local fair waiter is then one whose queue entry lapsed (its refresh came
//!   late, e.g. the process was frozen), so every one of them is woken to join again and try,
//!   instead of sleeping until its fallback bound;
//! - every message also wakes every local holder of the lock (Hold streams), so a ForceRelease
//!   is noticed at once rather than at the next renewal;
//! - after a reconnect (Redis restarted, data maybe lost) every local waiter and holder is woken
//!   to re-check;
//! - local waiters also stand in a *line* (`Interest::line_up`): a release made in this process
//!   may hand the lock straight to the first of them (see `lock::LockEngine::release`), which
//!   then learns of its grant through its `Ticket` without any Redis round trip or message.
//!
//! A lost message costs at most the holder's remaining lease: the engine never sleeps longer
//! than that (see `lock::LockEngine::acquire`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use fred::{
    clients::SubscriberClient,
    interfaces::{ClientLike, EventInterface, PubsubInterface},
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{
    Lease, Token,
    store::{Granted, HandOff, readable},
};

/// The shared hub; cheap to clone.
#[derive(Clone)]
pub struct Waiters {
    inner: Arc<Inner>,
}

struct Inner {
    /// Channel name -> local interest. A std mutex: it is held for a map lookup only, never
    /// across an await, and the dispatcher must not yield while holding it.
    channels: Mutex<HashMap<String, Entry>>,
    /// Subscription changes, applied in order by one task so that an UNSUBSCRIBE for a channel
    /// can never overtake the SUBSCRIBE of a waiter that arrived after it.
    changes: mpsc::UnboundedSender<Change>,
}

struct Entry {
    refs: usize,
    channel: Arc<Channel>,
}

struct Channel {
    /// Waiters: each unlock message wakes one of them.
    wake: Notify,
    /// Fair waiters by waiter id: a message `w:ID` wakes only that one (the head of the lock's
    /// queue), whichever process it lives in. A std mutex, for the same reason as `channels`.
    fair: Mutex<HashMap<String, Arc<Notify>>>,
    /// Holds (Hold streams) on this lock: every message wakes all of them to check at once
    /// that they still own the lock (a ForceRelease publishes too).
    check: Notify,
    /// Becomes true once the SUBSCRIBE was answered (or failed: waiters then fall back on the
    /// holder's TTL, which is always correct, only slower).
    settled: watch::Sender<bool>,
    /// Local waiters a local release may hand the lock to. A std mutex, as above.
    line: Mutex<Line>,
}

impl Channel {
    /// Wakes every local fair waiter of the lock, each to try again.
    fn wake_fair_waiters(&self) {
        for wake in locked(&self.fair).values() {
            wake.notify_one();
        }
    }
}

/// The local waiters of one lock, in the order a hand-off should pick them.
#[derive(Default)]
struct Line {
    /// Plain waiters, by local arrival.
    plain: BTreeMap<u64, Candidate>,
    /// Fair waiters, by their join order in the Redis queue.
    fair: BTreeMap<u64, Candidate>,
    /// The next plain arrival number.
    arrivals: u64,
}

/// A waiter's key in its lock's line.
#[derive(Debug, Clone, Copy)]
enum Spot {
    /// Join order in the Redis queue.
    Fair(u64),
    /// Local arrival number.
    Plain(u64),
}

impl Line {
    fn insert(&mut self, candidate: Candidate) {
        match candidate.spot {
            Spot::Fair(order) => self.fair.insert(order, candidate),
            Spot::Plain(arrival) => self.plain.insert(arrival, candidate),
        };
    }

    fn remove(&mut self, spot: Spot) {
        match spot {
            Spot::Fair(order) => self.fair.remove(&order),
            Spot::Plain(arrival) => self.plain.remove(&arrival),
        };
    }
}

/// A local waiter a release may hand the lock to.
pub struct Candidate {
    pub token: Token,
    pub lease: Lease,
    spot: Spot,
    grant: oneshot::Sender<Granted>,
}

impl Candidate {
    /// Tells the waiter the lock is now its own. Gives the grant back if the waiter already
    /// left: the caller must then release the lock for it.
    pub fn deliver(self, granted: Granted) -> Result<(), Granted> {
        self.grant.send(granted)
    }

    fn waiting(&self) -> bool {
        !self.grant.is_closed()
    }
}

/// Where a waiter stands in its lock's line.
#[derive(Debug, Clone, Copy)]
pub enum Place {
    Plain,
    /// A fair waiter, with its join order in the Redis queue.
    Fair(u64),
}

/// The first waiter of a lock's line, taken out of it for a release to try a hand-off.
pub struct Offer {
    channel: Arc<Channel>,
    pub candidate: Candidate,
    /// How many plain waiters this process has on the lock (the candidate included).
    pub plain_waiters: usize,
}

impl Offer {
    /// What `release.lua` needs to know about the candidate.
    pub fn hand_off(&self) -> HandOff {
        HandOff {
            to: self.candidate.token,
            lease: self.candidate.lease,
            fair: matches!(self.candidate.spot, Spot::Fair(_)),
            plain_waiters: self.plain_waiters,
        }
    }

    /// The hand-off did not happen: the candidate goes back to the front of the line, unless it
    /// left meanwhile.
    pub fn decline(self) {
        if !self.candidate.waiting() {
            return;
        }
        locked(&self.channel.line).insert(self.candidate);
    }
}

enum Change {
    Subscribe(String, Arc<Channel>),
    Unsubscribe(String),
}

impl Waiters {
    /// Starts the subscriber's background tasks. Returns at once, even if Redis is down.
    pub fn start(subscriber: SubscriberClient) -> Self {
        let (changes, change_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            channels: Mutex::new(HashMap::new()),
            changes,
        });
        subscriber.connect();
        // fred re-subscribes every tracked channel after a reconnect.
        subscriber.manage_subscriptions();
        tokio::spawn(apply_changes(subscriber.clone(), change_rx));
        tokio::spawn(dispatch(subscriber, Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Registers interest in `channel` and returns once the subscription is in place.
    pub async fn watch(&self, channel: &str) -> Interest {
        let interest = {
            let mut channels = self.inner.lock();
            let entry = channels.entry(channel.to_owned()).or_insert_with(|| {
                let channel_state = Arc::new(Channel {
                    wake: Notify::new(),
                    fair: Mutex::new(HashMap::new()),
                    check: Notify::new(),
                    settled: watch::Sender::new(false),
                    line: Mutex::default(),
                });
                // A send error means the change task is gone (runtime shutting down); waiters
                // then rely on the TTL bound.
                let _ = self
                    .inner
                    .changes
                    .send(Change::Subscribe(channel.to_owned(), channel_state.clone()));
                Entry {
                    refs: 0,
                    channel: channel_state,
                }
            });
            entry.refs += 1;
            Interest {
                hub: self.inner.clone(),
                name: channel.to_owned(),
                channel: entry.channel.clone(),
            }
        };
        let mut settled = interest.channel.settled.subscribe();
        // Err only if the sender is gone, which cannot happen while `interest` holds it.
        let _ = settled.wait_for(|settled| *settled).await;
        interest
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        locked(&self.channels)
    }
}

impl Waiters {
    /// Whether local callers already wait on `channel` with the subscription in place.
    pub fn is_watched(&self, channel: &str) -> bool {
        self.inner
            .lock()
            .get(channel)
            .is_some_and(|entry| *entry.channel.settled.borrow())
    }

    /// Takes the first local waiter of `channel`'s line (fair waiters first, in queue order;
    /// else plain ones, in arrival order), skipping waiters that left. None when nobody waits
    /// here.
    pub fn offer(&self, channel: &str) -> Option<Offer> {
        let channel = self.inner.lock().get(channel)?.channel.clone();
        let mut line = locked(&channel.line);
        // Waiters take themselves out of the line when they leave (`Ticket`), so these counts
        // are exact but for one that is leaving right now.
        let plain_waiters = line.plain.len();
        let candidate = loop {
            let (_, candidate) = match line.fair.pop_first() {
                Some(first) => first,
                None => line.plain.pop_first()?,
            };
            if candidate.waiting() {
                break candidate;
            }
        };
        drop(line);
        Some(Offer {
            channel,
            candidate,
            plain_waiters,
        })
    }

    /// Wakes the local fair waiter `waiter_id` on `channel`, if this process has it.
    pub fn wake_fair(&self, channel: &str, waiter_id: &str) {
        if let Some(entry) = self.inner.lock().get(channel)
            && let Some(wake) = locked(&entry.channel.fair).get(waiter_id)
        {
            wake.notify_one();
        }
    }
}

/// One local caller's interest in a lock's unlock channel. Dropping it gives the interest up.
pub struct Interest {
    hub: Arc<Inner>,
    name: String,
    channel: Arc<Channel>,
}

impl Interest {
    /// The wake-up future. Create and `enable` it *before* the acquire attempt it follows, so a
    /// message arriving during the attempt is not missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.channel.wake.notified()
    }

    /// For holders: resolves on the next message on the channel (or reconnect). Unlike
    /// `notified`, every holder sees every message, and no waiter's wake-up is taken away.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.channel.check.notified()
    }
}

impl Interest {
    /// Registers a fair waiter under `waiter_id` on this channel, so `w:ID` messages (and the
    /// fair refresher) can wake it by name. A wake-up that arrives while the waiter is busy is
    /// kept for its next wait (tokio `Notify` permit), so none is lost between attempts.
    pub fn fair_ticket(&self, waiter_id: &str) -> FairTicket<'_> {
        let wake = Arc::new(Notify::new());
        locked(&self.channel.fair).insert(waiter_id.to_owned(), wake.clone());
        FairTicket {
            interest: self,
            waiter_id: waiter_id.to_owned(),
            wake,
        }
    }
}

impl Interest {
    /// Puts a waiter holding `token` (asking for `lease`) into this lock's line, so a local
    /// release can hand it the lock. The waiter's registration in Redis may still be on its
    /// way: `release.lua` hands the lock only to a waiter Redis knows, but counts every one in
    /// the line as this process's when it looks for other replicas' waiters.
    pub fn line_up(&self, token: Token, lease: Lease, place: Place) -> Ticket {
        let (grant, granted) = oneshot::channel();
        let mut line = locked(&self.channel.line);
        let spot = match place {
            Place::Fair(order) => Spot::Fair(order),
            Place::Plain => {
                line.arrivals += 1;
                Spot::Plain(line.arrivals)
            }
        };
        line.insert(Candidate {
            token,
            lease,
            spot,
            grant,
        });
        Ticket {
            channel: self.channel.clone(),
            spot,
            granted: Some(granted),
        }
    }
}

/// A waiter's place in its lock's line. The waiter must `leave` it before giving up, to learn
/// whether a hand-off reached it meanwhile; dropping it leaves the line too (a grant that
/// arrives after that is given back by the release that made it).
pub struct Ticket {
    channel: Arc<Channel>,
    spot: Spot,
    /// None once the hand-off arrived, or the sending side vanished without one.
    granted: Option<oneshot::Receiver<Granted>>,
}

impl Ticket {
    /// Resolves when a local release handed the lock to this waiter. Never resolves after it
    /// resolved once, or if the release that took this waiter out of the line vanished
    /// without a word (it could only have been cut off by a panic or the runtime ending; the
    /// waiter then falls back on its ordinary retries).
    pub async fn handed(&mut self) -> Granted {
        let Some(granted) = self.granted.as_mut() else {
            return std::future::pending().await;
        };
        let result = granted.await;
        self.granted = None;
        match result {
            Ok(granted) => granted,
            Err(_) => std::future::pending().await,
        }
    }

    /// Leaves the line. Returns a grant that was handed over just before: the lock then
    /// belongs to this waiter, which must use it or release it.
    pub fn leave(mut self) -> Option<Granted> {
        self.step_out();
        let mut granted = self.granted.take()?;
        // From here on a release that took us out of the line earlier fails to deliver, and
        // releases the lock again itself.
        granted.close();
        granted.try_recv().ok()
    }

    fn step_out(&self) {
        locked(&self.channel.line).remove(self.spot);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.granted.is_some() {
            self.step_out();
        }
    }
}

/// A fair waiter's registration on its lock's channel; dropping it unregisters.
pub struct FairTicket<'a> {
    interest: &'a Interest,
    waiter_id: String,
    wake: Arc<Notify>,
}

impl FairTicket<'_> {
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }
}

impl Drop for FairTicket<'_> {
    fn drop(&mut self) {
        locked(&self.interest.channel.fair).remove(&self.waiter_id);
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is one insert/remove/lookup: poisoning carries no information.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut channels = self.hub.lock();
        if let Some(entry) = channels.get_mut(&self.name) {
            entry.refs -= 1;
            if entry.refs == 0 {
                channels.remove(&self.name);
                let _ = self
                    .hub
                    .changes
                    .send(Change::Unsubscribe(self.name.clone()));
            }
        }
    }
}

/// Most subscription changes applied before one confirming PING.
const CHANGE_BATCH: usize = 256;

async fn apply_changes(subscriber: SubscriberClient, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut batch = Vec::with_capacity(CHANGE_BATCH);
    while changes.recv_many(&mut batch, CHANGE_BATCH).await > 0 {
        let mut subscribed = Vec::new();
        for change in batch.drain(..) {
            match change {
                Change::Subscribe(name, channel) => {
                    if let Err(error) = subscriber.subscribe(name.as_str()).await {
                        metrics::counter!(crate::telemetry::REDIS_ERRORS, "op" => "subscribe")
                            .increment(1);
                        let error = readable(error);
                        warn!(channel = %name, %error, "subscribe failed; waiters fall back on the holder's lease");
                    }
                    subscribed.push(channel);
                }
                Change::Unsubscribe(name) => {
                    if let Err(error) = subscriber.unsubscribe(name.as_str()).await {
                        debug!(channel = %name, %error, "unsubscribe failed");
                    }
                }
            }
        }
        if subscribed.is_empty() {
            continue;
        }
        // fred answers SUBSCRIBE as soon as it is written, not when Redis has run it. A message
        // published in between would be lost to a waiter that already counts on the
        // subscription, so wait for a PING on the same connection: Redis runs one
        // connection's commands in order, so its reply means every SUBSCRIBE above is active.
        // (For Redis Cluster this must become SSUBSCRIBE per slot, which fred does answer only
        // once Redis confirms it.)
        if let Err(error) = subscriber.ping::<fred::types::Value>(None).await {
            debug!(%error, "could not confirm subscriptions; waiters fall back on the holder's lease");
        }
        for channel in subscribed {
            channel.settled.send_replace(true);
        }
    }
}

async fn dispatch(subscriber: SubscriberClient, hub: std::sync::Weak<Inner>) {
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        tokio::select! {
            message = messages.recv() => {
                let Some(hub) = hub.upgrade() else { return };
                match message {
                    Ok(message) => {
                        if let Some(entry) = hub.lock().get(&*message.channel) {
                            let text = message.value.as_str();
                            match text.as_deref().and_then(|t| t.strip_prefix("w:")) {
                                // The head of a fair queue, by name: nobody else is woken.
                                Some(waiter_id) => {
                                    if let Some(wake) = locked(&entry.channel.fair).get(waiter_id) {
                                        wake.notify_one();
                                    }
                                }
                                None => {
                                    entry.channel.wake.notify_one();
                                    entry.channel.wake_fair_waiters();
                                }
                            }
                            entry.channel.check.notify_waiters();
                        }
                    }
                    // We fell behind and messages were dropped: wake everyone to re-check.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => wake_all(&hub),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
            reconnect = reconnects.recv() => {
                let Some(hub) = hub.upgrade() else { return };
                match reconnect {
                    Ok(server) => {
                        debug!(%server, "subscriber reconnected; waking all waiters");
                        wake_all(&hub);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => wake_all(&hub),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

fn wake_all(hub: &Inner) {
    for entry in hub.lock().values() {
        entry.channel.wake.notify_waiters();
        entry.channel.check.notify_waiters();
        entry.channel.wake_fair_waiters();
    }
}
