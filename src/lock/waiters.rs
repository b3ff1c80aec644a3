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
//! - every message also wakes every local holder of the lock (Hold streams), so a ForceRelease
//!   is noticed at once rather than at the next renewal;
//! - after a reconnect (Redis restarted, data maybe lost) every local waiter and holder is woken
//!   to re-check.
//!
//! A lost message costs at most the holder's remaining lease: the engine never sleeps longer
//! than that (see `lock::LockEngine::acquire`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use fred::{
    clients::SubscriberClient,
    interfaces::{ClientLike, EventInterface, PubsubInterface},
};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, warn};

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
        lock_map(&self.channels)
    }
}

impl Waiters {
    /// Wakes the local fair waiter `waiter_id` on `channel`, if this process has it.
    pub fn wake_fair(&self, channel: &str, waiter_id: &str) {
        if let Some(entry) = self.inner.lock().get(channel)
            && let Some(wake) = lock_map(&entry.channel.fair).get(waiter_id)
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
        lock_map(&self.channel.fair).insert(waiter_id.to_owned(), wake.clone());
        FairTicket {
            interest: self,
            waiter_id: waiter_id.to_owned(),
            wake,
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
        lock_map(&self.interest.channel.fair).remove(&self.waiter_id);
    }
}

fn lock_map<V>(map: &Mutex<HashMap<String, V>>) -> MutexGuard<'_, HashMap<String, V>> {
    // Every critical section is one insert/remove/lookup: poisoning carries no information.
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

async fn apply_changes(subscriber: SubscriberClient, mut changes: mpsc::UnboundedReceiver<Change>) {
    while let Some(change) = changes.recv().await {
        match change {
            Change::Subscribe(name, channel) => {
                if let Err(error) = subscriber.subscribe(name.as_str()).await {
                    metrics::counter!(crate::telemetry::REDIS_ERRORS, "op" => "subscribe")
                        .increment(1);
                    warn!(channel = %name, %error, "subscribe failed; waiters fall back on the holder's lease");
                }
                channel.settled.send_replace(true);
            }
            Change::Unsubscribe(name) => {
                if let Err(error) = subscriber.unsubscribe(name.as_str()).await {
                    debug!(channel = %name, %error, "unsubscribe failed");
                }
            }
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
                                    if let Some(wake) = lock_map(&entry.channel.fair).get(waiter_id) {
                                        wake.notify_one();
                                    }
                                }
                                None => entry.channel.wake.notify_one(),
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
        for wake in lock_map(&entry.channel.fair).values() {
            wake.notify_one();
        }
    }
}
