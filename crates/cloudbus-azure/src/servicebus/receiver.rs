//! Receiving from Service Bus: the peek-lock subscription driver (plain entities and
//! session-enabled ones, where it holds up to [`MAX_SESSIONS`] sessions at a time) and
//! the dead-letter sub-queue.
//!
//! Each receiver link is an fe2o3-amqp receiver with manual credit: a receive grants
//! credit for what it asks, takes what arrives, and drains the link when nothing came
//! within its slice, so that an idle consumer holds no locks. Settlements are AMQP
//! dispositions on the link the message came from (complete = accepted, abandon =
//! modified, dead-letter = rejected with `com.microsoft:dead-letter`, defer = modified
//! undeliverable-here); lock renewal, deferred messages and settlements without their
//! link go through the entity's `$management` node.
//!
//! A session's messages are locked by the session lock. A held session's lock is
//! renewed at half its life while every unsettled message of it is within its lease;
//! extending a message renews it too. A message left past its lease lets the session
//! lock run out, and the service gives the session (and the message) to the next
//! reader, as a lapsed message lock would.
//!
//! An unsettled message stays in the map of unsettled ones until its settlement is
//! done (marked as being settled meanwhile): a lock renewal running at the same time
//! still finds it, a second settlement is refused, and a settlement cancelled half-way
//! leaves it settleable. Lock renewals go as one `$management` request per
//! [`RENEW_BATCH`] lock tokens (a session's messages: one renewal of the session lock).
//! Leases come from the entity's lock duration, not from the service's lock time read
//! on this machine's clock, which may be skewed. A delivery that cannot be decoded, or
//! that has no lock token, is dead-lettered at once as malformed. A nack of a deferred
//! message sends it again (the service would keep it deferred). After `close`, what
//! was received can still be settled: a plain entity's messages by lock token through
//! the management node, a session's on its link, which stays open (without credit)
//! until they are settled or the session lock is gone.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use chrono::Utc;
use cloudbus_core::driver::{
    AckToken, BatchResults, DeadLetter, DeadLetterDriver, Payload, ReceivedMessage, Settlement,
    SubscriptionDriver,
};
use cloudbus_core::{Capabilities, Delivery, Error, ErrorKind, Result};
use fe2o3_amqp::Receiver;
use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::messaging::{Body, Data, Message, Modified, Properties};
use fe2o3_amqp::types::primitives::{Array, Symbol, Uuid, Value};
use tokio::sync::Mutex;

use super::config::{EntityKind, MAX_LOCK, MIN_LOCK, REDRIVE_PROPERTY};
use super::connection::{
    Amqp, Live, ReceiveMode, link_closed, lock, session_locked_until, session_of,
};
use super::context::ServiceBusContext;
use super::error::{self, Scope};
use super::management::{
    self, Management, PeekMessage, ReceiveBySequenceNumber, RenewLock, RenewSessionLock,
    UpdateDisposition,
};
use super::message::{
    AmqpMessage, annotation_time, lock_token_of, message_id_of, raw_of, restore, sequence_of,
    session_id_of, token_text,
};

/// The longest one receive call waits on a link before it drains it.
pub const RECEIVE_SLICE: Duration = Duration::from_millis(200);
/// How long a session must find nothing before it is let go.
pub const SESSION_IDLE: Duration = Duration::from_millis(500);
/// How long a receive waits for the session acceptor when it holds none.
pub const SESSION_SLICE: Duration = Duration::from_millis(30);
/// Most sessions one subscription driver holds at once.
pub const MAX_SESSIONS: usize = 32;
/// How long a receive waits for deliveries the service sent in answer to a drain.
const DRAIN_WAIT: Duration = Duration::from_millis(20);
/// How long past its lease an unsettled message is remembered (to answer a late
/// settle with LeaseExpired) before it is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Application properties a redrive leaves behind.
const DEAD_LETTER_PROPERTIES: [&str; 2] = ["DeadLetterReason", "DeadLetterErrorDescription"];
/// The condition of a rejection that dead-letters.
const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";
/// How many dead letters one page holds.
const DEAD_LETTER_PAGE: usize = 100;
/// Most lock tokens in one RenewLock request.
pub const RENEW_BATCH: usize = 100;
/// The dead-letter reason of a delivery that cannot be decoded as an AMQP message (the
/// consumer's reason for an event that cannot be decoded starts the same way).
const UNDECODABLE_REASON: &str = "malformed: the AMQP message cannot be decoded";
/// The dead-letter reason of a delivery without a lock token (it cannot be settled
/// by the management node, nor renewed).
const NO_LOCK_TOKEN_REASON: &str = "malformed: the message has no lock token";
/// How often the session acceptor looks at the sessions kept open after `close`.
const LINGER_TICK: Duration = Duration::from_millis(50);

/// A session's messages whose locks one session-lock renewal keeps: the session's
/// slot, its id, and the items `(index, key, lease)`.
type SessionRenewal = (Arc<Slot>, String, Vec<(usize, String, Duration)>);

/// Messages settled on one open link in one disposition: the link's slot, whether
/// they are completed (else abandoned), and the items `(index, key, delivery)`.
type LinkSettlement = (Arc<Slot>, bool, Vec<(usize, String, DeliveryInfo)>);

/// A receiver link and what the service said on attach.
struct Link {
    receiver: Receiver,
    /// The connection it is on.
    live: Arc<Live>,
    /// Sessions: until when the session is locked.
    locked_until: Option<SystemTime>,
}

impl Link {
    /// Receives up to `max`, waiting up to `wait` for the first; drains the link when
    /// none came (what the drain brings is returned too).
    async fn receive(
        &mut self,
        max: u32,
        wait: Duration,
        what: &str,
    ) -> std::result::Result<Vec<fe2o3_amqp::link::delivery::Delivery<Body<Value>>>, error::Failure>
    {
        // Always a new flow: it ends a drain the last receive began, and the credit
        // the link thinks it has may have been drained by the service meanwhile.
        self.receiver
            .set_credit(max)
            .await
            .map_err(|e| error::Failure {
                error: Error::with_source(ErrorKind::Unavailable, format!("{what}: credit"), e),
                scope: Scope::Link,
            })?;
        let mut out = Vec::new();
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.receiver.recv::<Body<Value>>()).await {
                Ok(Ok(d)) => {
                    out.push(d);
                    break;
                }
                Ok(Err(RecvError::MessageDecode(e))) => {
                    self.dead_letter_undecodable(e.info, e.source.to_string(), what)
                        .await;
                }
                Ok(Err(e)) => return Err(error::from_recv(e, what)),
                Err(_) => {
                    // Nothing within the slice: take the credit back, keeping what the
                    // service sent before it saw the drain.
                    self.receiver.drain().await.map_err(|e| error::Failure {
                        error: Error::with_source(
                            ErrorKind::Unavailable,
                            format!("{what}: drain"),
                            e,
                        ),
                        scope: Scope::Link,
                    })?;
                    match tokio::time::timeout(DRAIN_WAIT, self.receiver.recv::<Body<Value>>())
                        .await
                    {
                        Ok(Ok(d)) => out.push(d),
                        Ok(Err(RecvError::MessageDecode(e))) => {
                            self.dead_letter_undecodable(e.info, e.source.to_string(), what)
                                .await;
                        }
                        _ => {}
                    }
                    break;
                }
            }
        }
        if out.is_empty() {
            return Ok(out);
        }
        // What arrived with the first, without waiting.
        while out.len() < max as usize {
            match tokio::time::timeout(Duration::ZERO, self.receiver.recv::<Body<Value>>()).await {
                Ok(Ok(d)) => out.push(d),
                Ok(Err(RecvError::MessageDecode(e))) => {
                    self.dead_letter_undecodable(e.info, e.source.to_string(), what)
                        .await;
                }
                Ok(Err(e)) => {
                    let failure = error::from_recv(e, what);
                    if failure.scope != Scope::Operation {
                        // The link failed after these arrived: hand them over; their
                        // settlements go through the management node.
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Dead-letters a delivery fe2o3 could not decode (issue 28 item 22). Left
    /// unsettled, it came back at every lock expiry until the service dead-lettered it
    /// as MaxDeliveryCountExceeded, which says nothing of why, and no consumer ever saw
    /// it meanwhile.
    async fn dead_letter_undecodable(&self, info: DeliveryInfo, why: String, what: &str) {
        tracing::warn!(%what, error = %why, "dead-lettering a Service Bus message that cannot be decoded");
        if let Err(e) = self
            .receiver
            .reject(info, dead_letter_error(UNDECODABLE_REASON, &why))
            .await
        {
            tracing::warn!(%what, error = %e, "could not dead-letter a message that cannot be decoded; it comes back when its lock lapses");
        }
    }
}

/// A link and how many of its messages are unsettled (a session is only let go when
/// none are).
struct Slot {
    link: Mutex<Option<Link>>,
    unsettled: AtomicUsize,
    session: Option<String>,
    /// Since when reads of this session found nothing.
    idle_since: SyncMutex<Option<Instant>>,
    /// Sessions: when the session lock is to be renewed.
    renew_at: SyncMutex<Option<Instant>>,
    /// Sessions: when the session lock ends, unless renewed.
    lock_ends: SyncMutex<Option<Instant>>,
}

impl Slot {
    /// A slot for `link`; `lock` is the entity's lock duration, when known.
    fn new(link: Link, session: Option<String>, lock: Option<Duration>) -> Self {
        let locked_until = link.locked_until;
        let slot = Slot {
            link: Mutex::new(Some(link)),
            unsettled: AtomicUsize::new(0),
            session,
            idle_since: SyncMutex::new(None),
            renew_at: SyncMutex::new(None),
            lock_ends: SyncMutex::new(None),
        };
        if let Some(until) = locked_until {
            slot.renewed(until, lock);
        }
        slot
    }

    /// Records that the session lock runs until `until` (the service's clock): renewed
    /// at half its life. `duration` is the entity's lock duration, when known.
    fn renewed(&self, until: SystemTime, duration: Option<Duration>) {
        let by_clock = until
            .duration_since(SystemTime::now())
            .ok()
            .filter(|d| !d.is_zero());
        let left = lease_of(by_clock, duration);
        let now = Instant::now();
        *lock(&self.renew_at) = Some(now + left / 2);
        *lock(&self.lock_ends) = Some(now + left);
    }
}

/// The lease of a message (or a session) whose lock the service says runs `by_clock`
/// longer, read on this machine's clock (`None`: over already by it, or not said), on
/// an entity whose lock duration is `lock` (`None`: unknown). The service's clock and
/// this machine's differ by any skew: read alone, a clock ahead by more than the lock
/// duration gave no lease at all, no renewal, and acks refused here as LeaseExpired
/// (issue 28 item 21). The service grants the whole lock duration at each delivery, so
/// that is the lease; the local reading only shortens it, when it is within half the
/// lock duration (a message that waited in the link's buffer has less left). Without
/// the lock duration, the reading bounded by Service Bus's limits, and the shortest
/// lock when the reading is implausible.
fn lease_of(by_clock: Option<Duration>, lock: Option<Duration>) -> Duration {
    match lock {
        Some(lock) => by_clock
            .filter(|d| *d >= lock / 2)
            .map_or(lock, |d| d.min(lock)),
        None => by_clock
            .filter(|d| *d >= MIN_LOCK / 2)
            .map_or(MIN_LOCK, |d| d.min(MAX_LOCK)),
    }
}

/// How an unsettled message is settled.
#[derive(Clone)]
enum Origin {
    /// By a disposition on the link it came on.
    Link(DeliveryInfo),
    /// Through the management node (deferred messages taken by sequence number, and
    /// messages whose link is gone).
    Management,
}

/// One received, unsettled message.
struct InFlight {
    lock_token: Uuid,
    sequence: Option<i64>,
    origin: Origin,
    slot: Arc<Slot>,
    /// Until when the consumer may hold it (its lock, or the last extend).
    lease_until: Instant,
    /// A final settlement of it is under way (see [`Settling`]).
    settling: bool,
    /// A deferred message taken back by sequence number: the message, sent again on a
    /// nack (see `redeliver`).
    redeliver: Option<Arc<AmqpMessage>>,
}

/// What a final settlement needs of an unsettled message: a copy, as the entry stays in
/// the map (marked as being settled) while the settlement runs.
struct Target {
    key: String,
    lock_token: Uuid,
    sequence: Option<i64>,
    origin: Origin,
    slot: Arc<Slot>,
    redeliver: Option<Arc<AmqpMessage>>,
}

/// The error of a settlement of a message that is not (or no longer) unsettled here.
fn already_settled(key: &str, path: &str) -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        format!("no unsettled message with lock token {key} on {path}"),
    )
}

/// The unsettled messages of one settlement call, each marked as being settled in the
/// map while it runs. The entries stay in the map: one whose settlement is done is
/// removed with [`done`](Self::done); those still held when this is dropped (by a
/// settlement that failed and may be tried again, or one cancelled half-way) are
/// marked unsettled again, so that nothing received is lost from the map (issue 28
/// item 22: a cancelled `settle_batch` lost the entries it had taken out, and their
/// settlements said AlreadySettled while the messages came back).
struct Settling<'a> {
    owner: &'a ServiceBusSubscription,
    keys: HashSet<String>,
}

impl<'a> Settling<'a> {
    fn new(owner: &'a ServiceBusSubscription) -> Self {
        Settling {
            owner,
            keys: HashSet::new(),
        }
    }

    /// Marks the unsettled message of `key` as being settled, and answers what its
    /// settlement needs: AlreadySettled when there is none, or one is being settled
    /// already; LeaseExpired (the message forgotten) when its lease has passed.
    fn mark(
        &mut self,
        inflight: &mut HashMap<String, InFlight>,
        key: &str,
        label: &str,
    ) -> Result<Target> {
        let path = &self.owner.path;
        let Some(entry) = inflight.get_mut(key) else {
            return Err(already_settled(key, path));
        };
        if entry.settling {
            return Err(Error::new(
                ErrorKind::AlreadySettled,
                format!("the message with lock token {key} on {path} is being settled already"),
            ));
        }
        if Instant::now() > entry.lease_until {
            if let Some(entry) = inflight.remove(key) {
                entry.slot.unsettled.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                format!("the lock of {key} on {path} ran out before the {label}"),
            ));
        }
        entry.settling = true;
        self.keys.insert(key.to_owned());
        Ok(Target {
            key: key.to_owned(),
            lock_token: entry.lock_token.clone(),
            sequence: entry.sequence,
            origin: entry.origin.clone(),
            slot: entry.slot.clone(),
            redeliver: entry.redeliver.clone(),
        })
    }

    /// The settlement of `key` is over: the message is forgotten.
    fn done(&mut self, key: &str) {
        if !self.keys.remove(key) {
            return;
        }
        let removed = lock(&self.owner.inflight).remove(key);
        if let Some(entry) = removed {
            entry.slot.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The settlement of `key` failed and may be tried again: the message stays
    /// unsettled, settled next by way of `origin`.
    fn keep(&mut self, key: &str, origin: Origin) {
        if !self.keys.remove(key) {
            return;
        }
        if let Some(entry) = lock(&self.owner.inflight).get_mut(key) {
            entry.settling = false;
            entry.origin = origin;
        }
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut inflight = lock(&self.owner.inflight);
        for key in self.keys.drain() {
            if let Some(entry) = inflight.get_mut(&key) {
                entry.settling = false;
            }
        }
    }
}

/// What is done with an unsettled message: a portable settlement, or Service Bus's
/// defer.
#[derive(Clone, Copy)]
enum Action<'a> {
    Settle(&'a Settlement),
    Defer,
}

impl Action<'_> {
    fn label(self) -> &'static str {
        match self {
            Action::Settle(s) => s.status(),
            Action::Defer => "defer",
        }
    }
    /// The `disposition-status` of the management node's update-disposition.
    fn disposition_status(self) -> &'static str {
        match self {
            Action::Settle(Settlement::Ack) => "completed",
            Action::Settle(Settlement::DeadLetter { .. }) => "suspended",
            Action::Defer => "defered",
            Action::Settle(_) => "abandoned",
        }
    }
}

/// Receives from a queue or subscription in peek-lock mode: the driver of a Service
/// Bus [`Consumer`](cloudbus_core::Consumer). Beyond the portable settlements it can
/// [`defer`](Self::defer) a message and [`fetch_deferred`](Self::fetch_deferred) it
/// back; reach it with `consumer.driver().as_any().downcast_ref()`.
pub struct ServiceBusSubscription {
    shared: Arc<ServiceBusContext>,
    topic: String,
    subscription: String,
    path: String,
    management: Arc<Management>,
    slots: Arc<SyncMutex<Vec<Arc<Slot>>>>,
    /// Serializes opening links, so that concurrent receives do not open several.
    opening: Mutex<()>,
    inflight: SyncMutex<HashMap<String, InFlight>>,
    /// Messages received and not yet returned: deferred messages taken back by
    /// sequence number, and what a read got beyond the `max` asked for.
    pending: SyncMutex<VecDeque<ReceivedMessage>>,
    closed: Arc<AtomicBool>,
    /// The entity was found to exist.
    checked: AtomicBool,
    /// Where the next read of several sessions starts.
    rotation: AtomicUsize,
    /// Session-enabled entities: the task that accepts sessions, and the error that
    /// stopped it from accepting any (a missing entity, a refused key).
    acceptor: SyncMutex<Option<tokio::task::JoinHandle<()>>>,
    acceptor_error: Arc<SyncMutex<Option<Error>>>,
    /// The last `ActiveMessageCount` read, and when (see `queue_depth`).
    depth: SyncMutex<Option<(Instant, u64)>>,
    /// The entity's lock duration, read with the check that it exists (`None`: it
    /// could not be read).
    lock_duration: SyncMutex<Option<Duration>>,
    /// Sessions kept open after `close` while messages of them are unsettled (the
    /// acceptor closes them once they are settled or their lock is gone).
    lingering: Arc<SyncMutex<Vec<Arc<Slot>>>>,
}

/// How long a queue depth read from the management API is reused: the worker asks
/// every second, and each answer is an HTTP request to the namespace.
const QUEUE_DEPTH_TTL: Duration = Duration::from_secs(5);

impl ServiceBusSubscription {
    pub(crate) fn new(shared: Arc<ServiceBusContext>, topic: &str, subscription: &str) -> Self {
        let path = shared.path(topic, subscription);
        ServiceBusSubscription {
            management: shared.management(&path),
            shared,
            topic: topic.to_owned(),
            subscription: subscription.to_owned(),
            path,
            slots: Arc::new(SyncMutex::new(Vec::new())),
            opening: Mutex::new(()),
            inflight: SyncMutex::new(HashMap::new()),
            pending: SyncMutex::new(VecDeque::new()),
            closed: Arc::new(AtomicBool::new(false)),
            checked: AtomicBool::new(false),
            rotation: AtomicUsize::new(0),
            acceptor: SyncMutex::new(None),
            acceptor_error: Arc::new(SyncMutex::new(None)),
            depth: SyncMutex::new(None),
            lock_duration: SyncMutex::new(None),
            lingering: Arc::new(SyncMutex::new(Vec::new())),
        }
    }

    /// Fails with NotFound once, before the first link, when the entity is missing;
    /// reads its lock duration on the way.
    async fn check(&self) -> Result<()> {
        if !self.checked.load(Ordering::Acquire) {
            let duration = self
                .shared
                .check_subscription(&self.topic, &self.subscription)
                .await?;
            *lock(&self.lock_duration) = duration;
            self.checked.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The entity's lock duration, when known.
    fn lock_duration(&self) -> Option<Duration> {
        *lock(&self.lock_duration)
    }

    /// How many requests the `$management` node of this entity was sent by this bus
    /// (renewals, settlements by lock token, deferred messages): a diagnostic, for
    /// tests of how renewals are batched.
    #[doc(hidden)]
    pub fn management_requests(&self) -> u64 {
        self.management.requests()
    }

    /// Opens the plain (session-less) receiver.
    async fn open(&self) -> Result<Arc<Slot>> {
        self.check().await?;
        let (live, receiver) = self
            .shared
            .amqp
            .receiver(&self.path, ReceiveMode::PeekLock, None)
            .await
            .map_err(|f| f.error)?;
        let link = Link {
            receiver,
            live,
            locked_until: None,
        };
        let slot = Arc::new(Slot::new(link, None, self.lock_duration()));
        lock(&self.slots).push(slot.clone());
        Ok(slot)
    }

    /// Defers the message of `delivery`: Service Bus sets it aside (no receive returns
    /// it) until it is asked for by the sequence number returned here, with
    /// [`fetch_deferred`](Self::fetch_deferred). The delivery counts as settled:
    /// settling it again is `AlreadySettled`. Reach this through the consumer's driver.
    ///
    /// ```no_run
    /// # async fn demo(consumer: cloudbus_core::Consumer) -> cloudbus_core::Result<()> {
    /// use cloudbus_azure::servicebus::ServiceBusSubscription;
    /// let delivery = consumer.receive().await?;
    /// let Some(service_bus) = consumer.driver().as_any().downcast_ref::<ServiceBusSubscription>()
    /// else {
    ///     return Ok(()); // not a Service Bus consumer
    /// };
    /// let sequence = service_bus.defer(&delivery).await?;
    /// // ... later: the next receive returns it, locked, to be settled as usual.
    /// service_bus.fetch_deferred(&[sequence]).await?;
    /// consumer.receive().await?.ack().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn defer(&self, delivery: &Delivery) -> Result<i64> {
        let key = delivery.token().as_text().unwrap_or_default().to_owned();
        let sequence = lock(&self.inflight).get(&key).and_then(|i| i.sequence);
        self.act(delivery.token(), Action::Defer).await?;
        sequence.ok_or_else(|| {
            Error::invalid(format!(
                "deferred {key} on {}, but it has no sequence number",
                self.path
            ))
        })
    }

    /// Takes deferred messages back by their sequence numbers (from
    /// [`defer`](Self::defer)), locked; the next receives return them. Returns how
    /// many were found. On a session-enabled entity a message is found only through
    /// a session this consumer holds now.
    pub async fn fetch_deferred(&self, sequence_numbers: &[i64]) -> Result<usize> {
        if sequence_numbers.is_empty() {
            return Ok(0);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "the consumer of {} is closed",
                self.path
            )));
        }
        let links = self.links().await?;
        let Some(slot) = links.first() else {
            return Ok(0);
        };
        let mut body = management::body([
            (
                "sequence-numbers",
                Value::Array(Array::from(
                    sequence_numbers
                        .iter()
                        .map(|n| Value::Long(*n))
                        .collect::<Vec<_>>(),
                )),
            ),
            // 1: peek-lock (receiver settle mode second).
            ("receiver-settle-mode", Value::Uint(1)),
        ]);
        if let Some(session) = &slot.session {
            body.insert(
                Value::String("session-id".to_owned()),
                Value::String(session.clone()),
            );
        }
        let response = self
            .management
            .call::<ReceiveBySequenceNumber>(body, None)
            .await
            .map_err(|e| match e.kind() {
                // Gone: no deferred message has one of these sequence numbers.
                ErrorKind::LeaseExpired => Error::not_found(e.message()),
                _ => e,
            })?;
        let mut found = Vec::new();
        if let Some(messages) = response
            .body
            .as_ref()
            .and_then(|b| management::field(b, "messages"))
        {
            for item in management::items(messages) {
                let message =
                    management::field(item, "message").and_then(management::decode_message);
                let token = match management::field(item, "lock-token") {
                    Some(Value::Uuid(u)) => Some(u.clone()),
                    _ => None,
                };
                match (message, token) {
                    (Some(message), Some(token)) => found.push((message, token)),
                    _ => {
                        return Err(management::malformed(&format!(
                            "receive-by-sequence-number on {}",
                            self.path
                        )));
                    }
                }
            }
        }
        let count = found.len();
        let received: Vec<ReceivedMessage> = found
            .into_iter()
            .filter_map(|(message, token)| {
                self.convert(message, token, Origin::Management, slot, true)
            })
            .collect();
        lock(&self.pending).extend(received);
        Ok(count)
    }

    /// The links to read now: the plain receiver (opened on first use), or the sessions
    /// the acceptor holds (started on first use).
    async fn links(&self) -> Result<Vec<Arc<Slot>>> {
        if self.shared.config.sessions {
            self.check().await?;
            let mut acceptor = lock(&self.acceptor);
            if acceptor.is_none() {
                *acceptor = Some(tokio::spawn(accept_sessions(
                    self.shared.clone(),
                    self.path.clone(),
                    self.slots.clone(),
                    self.closed.clone(),
                    self.acceptor_error.clone(),
                    self.lingering.clone(),
                    self.lock_duration(),
                )));
            }
            drop(acceptor);
            let current = lock(&self.slots).clone();
            if current.is_empty()
                && let Some(e) = lock(&self.acceptor_error).take()
            {
                return Err(e);
            }
            return Ok(current);
        }
        let current = lock(&self.slots).clone();
        if !current.is_empty() {
            return Ok(current);
        }
        let _opening = self.opening.lock().await;
        let current = lock(&self.slots).clone();
        if !current.is_empty() {
            return Ok(current);
        }
        Ok(vec![self.open().await?])
    }

    /// Lets a session go once it has been idle for [`SESSION_IDLE`] with nothing of it
    /// unsettled.
    async fn release_idle(&self, slot: &Arc<Slot>) {
        if slot.session.is_none() {
            return;
        }
        {
            let mut idle = lock(&slot.idle_since);
            let since = *idle.get_or_insert_with(Instant::now);
            if since.elapsed() < SESSION_IDLE || slot.unsettled.load(Ordering::Acquire) > 0 {
                return;
            }
        }
        self.release(slot).await;
    }

    /// Renews a held session's lock when it is due, unless a message of it is past
    /// its lease (then the lock runs out, and the service gives the message to the
    /// next reader).
    async fn renew_session_if_due(&self, slot: &Arc<Slot>) -> Result<()> {
        let Some(session) = &slot.session else {
            return Ok(());
        };
        let now = Instant::now();
        let due = lock(&slot.renew_at).is_some_and(|at| at <= now);
        let leases_hold = || {
            lock(&self.inflight)
                .values()
                .filter(|i| Arc::ptr_eq(&i.slot, slot))
                .all(|i| i.lease_until > now)
        };
        if due && leases_hold() {
            let until = self.renew_session_lock(session).await?;
            slot.renewed(until, self.lock_duration());
        }
        Ok(())
    }

    /// Renews the lock of a session; returns until when it holds.
    async fn renew_session_lock(&self, session: &str) -> Result<SystemTime> {
        let response = self
            .management
            .call::<RenewSessionLock>(
                management::body([("session-id", Value::String(session.to_owned()))]),
                None,
            )
            .await?;
        let until = response
            .body
            .as_ref()
            .and_then(|b| management::field(b, "expiration"))
            .and_then(management::timestamp)
            .ok_or_else(|| management::malformed("renew-session-lock"))?;
        Ok(system_time(until.milliseconds()))
    }

    /// Lets a session go: its link is closed (the service gives back any message of
    /// it still locked).
    async fn release(&self, slot: &Arc<Slot>) {
        if slot.session.is_none() {
            return;
        }
        let link = slot.link.lock().await.take();
        lock(&self.slots).retain(|s| !Arc::ptr_eq(s, slot));
        if let Some(link) = link
            && let Err(e) = link.receiver.close().await
        {
            tracing::debug!(error = %e, "closing a drained Service Bus session");
        }
    }

    /// Drops a plain link that failed; the next receive opens a new one.
    async fn discard(&self, slot: &Arc<Slot>) {
        let link = slot.link.lock().await.take();
        lock(&self.slots).retain(|s| !Arc::ptr_eq(s, slot));
        if let Some(link) = link {
            tokio::spawn(async move {
                let _ = link.receiver.close().await;
            });
        }
    }

    /// The deliveries of received messages; those redriven to another subscription
    /// of the topic are completed here (they are not for this one), and those without
    /// a lock token dead-lettered as malformed.
    async fn accept(
        &self,
        deliveries: Vec<fe2o3_amqp::link::delivery::Delivery<Body<Value>>>,
        slot: &Arc<Slot>,
    ) -> Vec<ReceivedMessage> {
        let mut out = Vec::with_capacity(deliveries.len());
        let mut foreign = Vec::new();
        let mut malformed = Vec::new();
        for d in deliveries {
            let tag = d.delivery_tag().to_vec();
            let (info, message) = d.into_parts();
            let Some(token) = lock_token_of(&message, Some(&tag)) else {
                malformed.push(info);
                continue;
            };
            match self.convert(message, token.clone(), Origin::Link(info), slot, false) {
                Some(r) => out.push(r),
                None => foreign.push(token_text(&token)),
            }
        }
        if !malformed.is_empty() {
            // Without a lock token it can be neither renewed nor settled by the
            // management node, and left alone it would come back at every lock expiry
            // until MaxDeliveryCountExceeded (issue 28 item 22): dead-lettered now, on
            // its link.
            let guard = slot.link.lock().await;
            for info in malformed {
                tracing::warn!(path = %self.path, "dead-lettering a Service Bus message without a lock token");
                let rejected = match guard.as_ref() {
                    Some(link) => link
                        .receiver
                        .reject(
                            info,
                            dead_letter_error(
                                NO_LOCK_TOKEN_REASON,
                                "the delivery has neither an x-opt-lock-token annotation \
                                 nor a 16-byte delivery tag",
                            ),
                        )
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err("its link is closed".to_owned()),
                };
                if let Err(e) = rejected {
                    tracing::warn!(path = %self.path, error = %e, "could not dead-letter a message without a lock token; it comes back when its lock lapses");
                }
            }
        }
        for token in foreign {
            if let Err(e) = self
                .act(&AckToken::Text(token), Action::Settle(&Settlement::Ack))
                .await
            {
                tracing::warn!(error = %e, "completing a message redriven elsewhere");
            }
        }
        out
    }

    /// A received message as a delivery, remembered until it is settled; `None` for a
    /// message redriven to another subscription (remembered too, to be completed).
    /// `keep`: the message is kept, to be sent again on a nack (a deferred message).
    fn convert(
        &self,
        message: AmqpMessage,
        lock_token: Uuid,
        origin: Origin,
        slot: &Arc<Slot>,
        keep: bool,
    ) -> Option<ReceivedMessage> {
        let (mut raw, typed) = raw_of(&message, self.shared.config.prefix);
        let foreign = raw
            .attributes
            .remove(REDRIVE_PROPERTY)
            .is_some_and(|target| {
                self.shared.config.entities == EntityKind::Topics && target != self.subscription
            });
        let token = token_text(&lock_token);
        let attempt = message
            .header
            .as_ref()
            .map_or(1, |h| h.delivery_count.saturating_add(1));
        let by_clock = annotation_time(&message, "x-opt-locked-until")
            .and_then(|until| (until - Utc::now()).to_std().ok())
            .filter(|d| !d.is_zero());
        let lease = lease_of(by_clock, self.lock_duration());
        slot.unsettled.fetch_add(1, Ordering::AcqRel);
        let published_at = annotation_time(&message, "x-opt-enqueued-time");
        let ordering_key = session_id_of(&message);
        let sequence = sequence_of(&message);
        let redeliver = keep.then(|| Arc::new(message));
        lock(&self.inflight).insert(
            token.clone(),
            InFlight {
                lock_token,
                sequence,
                origin,
                slot: slot.clone(),
                lease_until: Instant::now() + lease,
                settling: false,
                redeliver,
            },
        );
        if foreign {
            return None;
        }
        let size = raw.size();
        let event = match self.shared.codec.decode(&raw) {
            Ok(mut event) => {
                restore(&mut event, typed);
                Ok(Arc::new(event))
            }
            Err(e) => Err((raw, e)),
        };
        Some(ReceivedMessage {
            event,
            token: AckToken::Text(token),
            attempt,
            lease: Some(lease),
            published_at,
            ordering_key,
            size,
        })
    }

    /// Forgets unsettled messages long past their lease (a consumer that never
    /// settles them must not grow this map without bound).
    fn forget_expired(&self) {
        let now = Instant::now();
        lock(&self.inflight).retain(|_, i| {
            let keep = i.settling || i.lease_until + FORGET_AFTER > now;
            if !keep {
                i.slot.unsettled.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }

    /// Does `action` with the unsettled message of `token`: on the link it came from,
    /// or through the management node. A settlement that failed and may succeed when
    /// tried again leaves the message unsettled (its lock token is kept), and so does
    /// one that was cancelled.
    async fn act(&self, token: &AckToken, action: Action<'_>) -> Result<()> {
        let key = token.as_text().unwrap_or_default();
        if let Action::Settle(Settlement::Extend { lease }) = action {
            return match self.renew(&[(0, key, *lease)]).await.pop() {
                Some((_, result)) => result,
                None => Err(already_settled(key, &self.path)),
            };
        }
        let mut settling = Settling::new(self);
        let marked = {
            let mut inflight = lock(&self.inflight);
            settling.mark(&mut inflight, key, action.label())
        };
        let mut target = marked?;
        let result = self.apply(&mut target, action).await;
        match &result {
            Err(e) if e.is_retryable() => settling.keep(key, target.origin.clone()),
            _ => settling.done(key),
        }
        result
    }

    /// Renews the locks of unsettled messages, `(index, key, lease)`; answers a result
    /// per item with its index. A plain entity's lock tokens go [`RENEW_BATCH`] to a
    /// RenewLock request (one at a time per message took 15 s for 500 messages at a
    /// 30 ms round trip, longer than the locks held: issue 28 item 10); a session's
    /// messages share the session lock, renewed once. The entries stay in the map
    /// meanwhile, so that a settlement of one of them goes ahead (issue 28 item 11: it
    /// was taken out of the map while its renewal ran, and an ack then said
    /// AlreadySettled and the message came back).
    async fn renew(&self, items: &[(usize, &str, Duration)]) -> Vec<(usize, Result<()>)> {
        let mut out = Vec::with_capacity(items.len());
        let mut plain: Vec<(usize, String, Uuid, Duration)> = Vec::new();
        let mut sessions: Vec<SessionRenewal> = Vec::new();
        {
            let now = Instant::now();
            let inflight = lock(&self.inflight);
            for &(i, key, lease) in items {
                let Some(entry) = inflight.get(key) else {
                    out.push((i, Err(already_settled(key, &self.path))));
                    continue;
                };
                if now > entry.lease_until {
                    out.push((
                        i,
                        Err(Error::new(
                            ErrorKind::LeaseExpired,
                            format!(
                                "the lock of {key} on {} ran out before the extend",
                                self.path
                            ),
                        )),
                    ));
                    continue;
                }
                match &entry.slot.session {
                    Some(session) => {
                        let item = (i, key.to_owned(), lease);
                        match sessions
                            .iter_mut()
                            .find(|(slot, _, _)| Arc::ptr_eq(slot, &entry.slot))
                        {
                            Some((_, _, group)) => group.push(item),
                            None => {
                                sessions.push((entry.slot.clone(), session.clone(), vec![item]))
                            }
                        }
                    }
                    None => plain.push((i, key.to_owned(), entry.lock_token.clone(), lease)),
                }
            }
        }
        let duration = self.lock_duration();
        for (slot, session, group) in sessions {
            let started = Instant::now();
            match self.renew_session_lock(&session).await {
                Ok(until) => {
                    slot.renewed(until, duration);
                    let ends = *lock(&slot.lock_ends);
                    let granted = ends.map(|ends| ends.saturating_duration_since(started));
                    let mut inflight = lock(&self.inflight);
                    for (i, key, lease) in group {
                        if let Some(entry) = inflight.get_mut(&key) {
                            let lease = granted.map_or(lease, |g| lease.min(g));
                            entry.lease_until = entry.lease_until.max(started + lease);
                        }
                        out.push((i, Ok(())));
                    }
                }
                Err(e) => out.extend(group.into_iter().map(|(i, _, _)| (i, Err(e.clone())))),
            }
        }
        for chunk in plain.chunks(RENEW_BATCH) {
            let started = Instant::now();
            let results = self.renew_locks(chunk).await;
            let mut inflight = lock(&self.inflight);
            for ((i, key, _, lease), result) in chunk.iter().zip(results) {
                match &result {
                    Ok(()) => {
                        if let Some(entry) = inflight.get_mut(key) {
                            // A renewal holds for the lock duration, whatever was asked.
                            let lease = duration.map_or(*lease, |d| (*lease).min(d));
                            entry.lease_until = entry.lease_until.max(started + lease);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::LeaseExpired => {
                        // The lock is lost: a settlement says so too, now.
                        if let Some(entry) = inflight.get_mut(key) {
                            entry.lease_until = entry.lease_until.min(Instant::now());
                        }
                    }
                    Err(_) => {}
                }
                out.push((*i, result));
            }
        }
        out
    }

    /// One RenewLock for `chunk` (`(index, key, lock token, lease)`), a result per
    /// item. When the service answers that a lock is lost (most often, a message
    /// settled while the renewal was on its way), the others are renewed again
    /// without those settled or being settled since, and, if that fails too, one by
    /// one, to tell which lock is lost.
    async fn renew_locks(&self, chunk: &[(usize, String, Uuid, Duration)]) -> Vec<Result<()>> {
        let request = |tokens: Vec<Uuid>| async move {
            let body = management::body([("lock-tokens", management::lock_tokens(&tokens))]);
            self.management
                .call::<RenewLock>(body, None)
                .await
                .map(|_| ())
        };
        let lost = match request(chunk.iter().map(|c| c.2.clone()).collect()).await {
            Err(e) if e.kind() == ErrorKind::LeaseExpired && chunk.len() > 1 => e,
            other => return chunk.iter().map(|_| other.clone()).collect(),
        };
        // Those settled (or being settled) since: nothing more to renew.
        let live: Vec<bool> = {
            let inflight = lock(&self.inflight);
            chunk
                .iter()
                .map(|(_, key, _, _)| inflight.get(key).is_some_and(|e| !e.settling))
                .collect()
        };
        let mut results: Vec<Option<Result<()>>> =
            live.iter().map(|l| (!*l).then_some(Ok(()))).collect();
        let left: Vec<Uuid> = chunk
            .iter()
            .zip(&live)
            .filter(|(_, live)| **live)
            .map(|(c, _)| c.2.clone())
            .collect();
        let again = if left.is_empty() {
            Ok(())
        } else if left.len() < chunk.len() {
            request(left).await
        } else {
            Err(lost)
        };
        match again {
            Err(e) if e.kind() == ErrorKind::LeaseExpired => {
                for (c, result) in chunk.iter().zip(results.iter_mut()) {
                    if result.is_none() {
                        *result = Some(request(vec![c.2.clone()]).await);
                    }
                }
            }
            other => {
                for result in results.iter_mut().filter(|r| r.is_none()) {
                    *result = Some(other.clone());
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    /// Completions and abandons of messages received on a link that is open: one
    /// disposition per link and outcome (fe2o3's `accept_all` and `modify_all`, a
    /// disposition frame per run of consecutive deliveries) instead of one per
    /// message. Answers a result per item it settled; the rest (dead-letters, deferred
    /// messages, messages whose link is closed) are settled one by one after.
    async fn settle_on_links(&self, items: &[(AckToken, Settlement)]) -> Vec<(usize, Result<()>)> {
        let mut settling = Settling::new(self);
        let mut groups: Vec<LinkSettlement> = Vec::new();
        {
            let now = Instant::now();
            let mut inflight = lock(&self.inflight);
            for (i, (token, settlement)) in items.iter().enumerate() {
                let complete = match settlement {
                    Settlement::Ack => true,
                    Settlement::Nack { .. } => false,
                    _ => continue,
                };
                let key = token.as_text().unwrap_or_default();
                let Some(entry) = inflight.get(key) else {
                    continue;
                };
                if entry.settling
                    || entry.lease_until <= now
                    || entry.redeliver.is_some()
                    || !matches!(entry.origin, Origin::Link(_))
                {
                    continue;
                }
                let Ok(target) = settling.mark(&mut inflight, key, "settle") else {
                    continue;
                };
                let Origin::Link(info) = target.origin else {
                    continue;
                };
                let item = (i, target.key, info);
                match groups
                    .iter_mut()
                    .find(|(slot, c, _)| *c == complete && Arc::ptr_eq(slot, &target.slot))
                {
                    Some((_, _, group)) => group.push(item),
                    None => groups.push((target.slot, complete, vec![item])),
                }
            }
        }
        let mut out = Vec::new();
        for (slot, complete, group) in groups {
            let settled = {
                let guard = slot.link.lock().await;
                match guard.as_ref() {
                    Some(link) => {
                        let infos = group.iter().map(|(_, _, info)| info.clone());
                        let disposed = if complete {
                            link.receiver.accept_all(infos).await
                        } else {
                            link.receiver.modify_all(infos, abandoned()).await
                        };
                        disposed.is_ok()
                    }
                    None => false,
                }
            };
            // Not settled (the link is gone): marked unsettled again as `settling`
            // drops, and settled one by one (through the management node).
            if settled {
                for (i, key, _) in group {
                    settling.done(&key);
                    out.push((i, Ok(())));
                }
            }
        }
        out
    }

    /// Does a final `action` with the message of `target`.
    async fn apply(&self, target: &mut Target, action: Action<'_>) -> Result<()> {
        let what = format!(
            "{} {} on {}",
            action.label(),
            token_text(&target.lock_token),
            self.path
        );
        if let (Action::Settle(Settlement::Nack { .. }), Some(message)) =
            (action, target.redeliver.clone())
        {
            return self.redeliver(target, &message).await;
        }
        if let Origin::Link(info) = target.origin.clone() {
            let guard = target.slot.link.lock().await;
            if let Some(link) = guard.as_ref() {
                let disposed = match action {
                    Action::Settle(Settlement::Ack) => link.receiver.accept(info).await,
                    Action::Settle(Settlement::DeadLetter {
                        reason,
                        description,
                    }) => {
                        link.receiver
                            .reject(info, dead_letter_error(reason, description))
                            .await
                    }
                    Action::Defer => {
                        link.receiver
                            .modify(
                                info,
                                Modified {
                                    delivery_failed: None,
                                    undeliverable_here: Some(true),
                                    message_annotations: None,
                                },
                            )
                            .await
                    }
                    Action::Settle(_) => link.receiver.modify(info, abandoned()).await,
                };
                match disposed {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::debug!(error = %e, %what, "the receiving link is gone");
                    }
                }
            }
            drop(guard);
            if target.slot.session.is_some() {
                // A session's messages can only be settled on the session's link.
                return Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!("{what}: the session's link is closed, and its lock with it"),
                ));
            }
            // The link is gone; the lock may still hold: settle by lock token.
            target.origin = Origin::Management;
        }
        self.dispose_by_token(target, action).await
    }

    /// Settles by lock token through the management node (update-disposition).
    async fn dispose_by_token(&self, target: &Target, action: Action<'_>) -> Result<()> {
        let mut body = management::body([
            (
                "lock-tokens",
                management::lock_tokens(std::slice::from_ref(&target.lock_token)),
            ),
            (
                "disposition-status",
                Value::String(action.disposition_status().to_owned()),
            ),
        ]);
        if let Action::Settle(Settlement::DeadLetter {
            reason,
            description,
        }) = action
        {
            body.insert(
                Value::String("deadletter-reason".to_owned()),
                Value::String(reason.clone()),
            );
            body.insert(
                Value::String("deadletter-description".to_owned()),
                Value::String(description.clone()),
            );
        }
        if let Some(session) = &target.slot.session {
            body.insert(
                Value::String("session-id".to_owned()),
                Value::String(session.clone()),
            );
        }
        self.management
            .call::<UpdateDisposition>(body, None)
            .await
            .map(|_| ())
    }

    /// A nack of a deferred message taken back by sequence number. Service Bus puts an
    /// abandoned deferred message back among the deferred ones, where no receive sees
    /// it again, while the consumer counts it as retried (issue 28 item 6). So it is
    /// sent again, as a new message for this subscription only, and the deferred one
    /// is completed. The copy's MessageId is made from the deferred message's sequence
    /// number: a nack tried again after the send went through is dropped by duplicate
    /// detection, not delivered twice. Its delivery count starts anew.
    async fn redeliver(&self, target: &Target, message: &AmqpMessage) -> Result<()> {
        let original = message_id_of(message).unwrap_or_default();
        let id = match target.sequence {
            Some(sequence) => format!("nack-{sequence}-{original}"),
            None => format!("nack-{}-{original}", token_text(&target.lock_token)),
        };
        let for_subscription = (self.shared.config.entities == EntityKind::Topics)
            .then_some(self.subscription.as_str());
        let copy = resend_copy(message, for_subscription, id);
        let what = format!(
            "send the deferred message {} of {} again",
            target.key, self.path
        );
        let (live, mut sender) = self.shared.sender(&self.topic).await?;
        let sent = sender.send(copy).await;
        let _ = sender.close().await;
        taken(&self.shared.amqp, &live, sent, &what)?;
        self.dispose_by_token(target, Action::Settle(&Settlement::Ack))
            .await
    }
}

/// The outcome of an abandon: the delivery failed (counted), the message is to be
/// delivered again.
fn abandoned() -> Modified {
    Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    }
}

/// A message that sends `message` again: the same body and application properties
/// (without the dead-letter reason), MessageId `id` (duplicate detection would drop a
/// copy with the old one), the content type and session; on a topic, the
/// [`REDRIVE_PROPERTY`] naming the one subscription it is for.
fn resend_copy(message: &AmqpMessage, subscription: Option<&str>, id: String) -> Message<Data> {
    let mut application = fe2o3_amqp::types::messaging::ApplicationProperties::builder();
    if let Some(existing) = &message.application_properties {
        for (k, v) in existing.0.iter() {
            if !DEAD_LETTER_PROPERTIES.contains(&k.as_str()) && k != REDRIVE_PROPERTY {
                application = application.insert(k.clone(), v.clone());
            }
        }
    }
    if let Some(subscription) = subscription {
        application = application.insert(
            REDRIVE_PROPERTY.to_owned(),
            fe2o3_amqp::types::primitives::SimpleValue::String(subscription.to_owned()),
        );
    }
    let properties = Properties {
        message_id: Some(fe2o3_amqp::types::messaging::MessageId::String(
            id.chars().take(128).collect(),
        )),
        content_type: message
            .properties
            .as_ref()
            .and_then(|p| p.content_type.clone()),
        group_id: session_id_of(message),
        ..Default::default()
    };
    Message::builder()
        .properties(properties)
        .application_properties(application.build())
        .data(fe2o3_amqp::types::primitives::Binary::from(
            super::message::body_bytes(message),
        ))
        .build()
}

/// The rejection that dead-letters, with the reason and description as the service
/// reads them.
fn dead_letter_error(reason: &str, description: &str) -> definitions::Error {
    let mut info = fe2o3_amqp::types::definitions::Fields::new();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String(reason.to_owned()),
    );
    info.insert(
        Symbol::from("DeadLetterErrorDescription"),
        Value::String(description.to_owned()),
    );
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(DEAD_LETTER_CONDITION)),
        None,
        info,
    )
}

/// A time from Unix milliseconds.
fn system_time(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Accepts sessions of a session-enabled queue or subscription while fewer than
/// [`MAX_SESSIONS`] are held, on a connection of its own: accepting waits for the
/// service, and must not hold up the bus's other links. Once the consumer is closed,
/// it closes the sessions kept open for their unsettled messages (`lingering`) as
/// they are done, then its connection. `duration`: the entity's lock duration.
async fn accept_sessions(
    shared: Arc<ServiceBusContext>,
    path: String,
    slots: Arc<SyncMutex<Vec<Arc<Slot>>>>,
    closed: Arc<AtomicBool>,
    error: Arc<SyncMutex<Option<Error>>>,
    lingering: Arc<SyncMutex<Vec<Arc<Slot>>>>,
    duration: Option<Duration>,
) {
    let amqp = Amqp::new(shared.config.clone());
    while !closed.load(Ordering::Acquire) {
        if lock(&slots).len() >= MAX_SESSIONS {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match amqp
            .receiver(&path, ReceiveMode::PeekLock, Some(None))
            .await
        {
            Ok((live, receiver)) => {
                let Some(session) = session_of(&receiver) else {
                    tracing::warn!(%path, "the service gave a session receiver without its session");
                    let _ = receiver.close().await;
                    continue;
                };
                let link = Link {
                    locked_until: session_locked_until(&receiver),
                    receiver,
                    live,
                };
                let slot = Arc::new(Slot::new(link, Some(session), duration));
                // `close` sets `closed` and takes the slots under the same lock, so a
                // session accepted meanwhile is either taken by it or closed here.
                let late = {
                    let mut held = lock(&slots);
                    if closed.load(Ordering::Acquire) {
                        Some(slot)
                    } else {
                        held.push(slot);
                        None
                    }
                };
                if let Some(slot) = late {
                    if let Some(link) = slot.link.lock().await.take() {
                        let _ = link.receiver.close().await;
                    }
                    break;
                }
            }
            Err(f) => {
                let pause = match f.error.kind() {
                    ErrorKind::NotFound | ErrorKind::PermissionDenied => {
                        *lock(&error) = Some(f.error);
                        Duration::from_secs(1)
                    }
                    // No session has messages now (the service answers after its
                    // timeout, the emulators at once), or the connection is being
                    // opened anew.
                    ErrorKind::Timeout | ErrorKind::Unavailable => Duration::from_millis(50),
                    _ => {
                        tracing::debug!(error = %f.error, %path, "accepting a session");
                        Duration::from_millis(200)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
    close_lingering(&lingering).await;
    amqp.close().await;
}

/// Waits until every session kept open after `close` has nothing unsettled or has
/// lost its lock, closing each then.
async fn close_lingering(lingering: &SyncMutex<Vec<Arc<Slot>>>) {
    loop {
        let done: Vec<Arc<Slot>> = {
            let mut held = lock(lingering);
            let now = Instant::now();
            let (done, kept): (Vec<_>, Vec<_>) = held.drain(..).partition(|slot| {
                let ends = *lock(&slot.lock_ends);
                slot.unsettled.load(Ordering::Acquire) == 0 || ends.is_none_or(|at| at <= now)
            });
            *held = kept;
            done
        };
        for slot in done {
            let link = slot.link.lock().await.take();
            if let Some(link) = link {
                link_closed(
                    || "close a session kept open after close".to_owned(),
                    link.receiver.close().await,
                );
            }
        }
        if lock(lingering).is_empty() {
            return;
        }
        tokio::time::sleep(LINGER_TICK).await;
    }
}

impl Drop for ServiceBusSubscription {
    /// A consumer dropped without `close` still ends its session acceptor; its links
    /// close as they are dropped.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[async_trait]
impl SubscriptionDriver for ServiceBusSubscription {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        let until = Instant::now() + wait;
        let max = max.max(1);
        let max_credit = u32::try_from(max).unwrap_or(u32::MAX);
        self.forget_expired();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::closed(format!(
                    "the consumer of {} is closed",
                    self.path
                )));
            }
            {
                let mut pending = lock(&self.pending);
                if !pending.is_empty() {
                    let take = pending.len().min(max);
                    return Ok(pending.drain(..take).collect());
                }
            }
            let links = self.links().await?;
            let remaining = until.saturating_duration_since(Instant::now());
            let slice = remaining.min(RECEIVE_SLICE).max(Duration::from_millis(20));
            // Every held session is read at once, each for its share of `max`
            // (sessions past the first `max` wait for the next call).
            let count = u32::try_from(links.len().max(1)).unwrap_or(u32::MAX);
            let offset = self.rotation.fetch_add(1, Ordering::Relaxed) % links.len().max(1);
            let turn = links.iter().cycle().skip(offset).take(links.len());
            let what = format!("receive from {}", self.path);
            let reads = turn.take(max).enumerate().map(|(i, slot)| {
                let what = &what;
                async move {
                    let i = u32::try_from(i).unwrap_or(u32::MAX);
                    let share = (max_credit / count + u32::from(i < max_credit % count)).max(1);
                    if let Err(e) = self.renew_session_if_due(slot).await {
                        return Some((
                            slot,
                            Err(error::Failure {
                                error: e,
                                scope: Scope::Link,
                            }),
                        ));
                    }
                    let mut guard = if slot.session.is_some() {
                        // Another receive is reading this session.
                        slot.link.try_lock().ok()?
                    } else {
                        slot.link.lock().await
                    };
                    let link = guard.as_mut()?;
                    let received = link.receive(share, slice, what).await;
                    if let Err(f) = &received {
                        self.shared.amqp.failed(&link.live, f);
                    }
                    Some((slot, received))
                }
            });
            let done: Vec<_> = futures::future::join_all(reads)
                .await
                .into_iter()
                .flatten()
                .collect();
            if done.is_empty() {
                // Sessions: none accepted yet, or every one is being read or settled
                // by another call: wait instead of spinning (a settle waiting for a
                // link must get it).
                tokio::time::sleep(remaining.min(SESSION_SLICE)).await;
            }
            let mut out = Vec::new();
            for (slot, received) in done {
                match received {
                    Ok(deliveries) if !deliveries.is_empty() => {
                        *lock(&slot.idle_since) = None;
                        out.extend(self.accept(deliveries, slot).await);
                    }
                    Ok(_) => self.release_idle(slot).await,
                    Err(f) => {
                        if slot.session.is_none() {
                            if f.scope != Scope::Operation {
                                self.discard(slot).await;
                            }
                            // A lost link or connection is opened anew while the
                            // caller's wait lasts.
                            if !f.error.is_retryable() || Instant::now() >= until {
                                return Err(f.error);
                            }
                            tracing::debug!(error = %f.error, "reopening a Service Bus receiver");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        tracing::debug!(error = %f.error, "a Service Bus session ended");
                        self.release(slot).await;
                    }
                }
            }
            if !out.is_empty() {
                if out.len() > max {
                    // Never more than asked: the rest waits for the next call.
                    lock(&self.pending).extend(out.drain(max..));
                }
                return Ok(out);
            }
            if Instant::now() >= until {
                return Ok(Vec::new());
            }
        }
    }

    /// Renewals go in batches of lock tokens (see `renew`) while completions and
    /// abandons of messages of one link go as one disposition per run of consecutive
    /// deliveries (see `settle_on_links`); the rest one by one. Nothing is taken out
    /// of the map of unsettled messages before its settlement is done, so a call that
    /// is cancelled leaves every message it had not settled settleable.
    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        self.forget_expired();
        let mut results: Vec<Option<Result<()>>> = items.iter().map(|_| None).collect();
        let renewals: Vec<(usize, &str, Duration)> = items
            .iter()
            .enumerate()
            .filter_map(|(i, (token, settlement))| match settlement {
                Settlement::Extend { lease } => {
                    Some((i, token.as_text().unwrap_or_default(), *lease))
                }
                _ => None,
            })
            .collect();
        let (renewed, on_links) =
            futures::join!(self.renew(&renewals), self.settle_on_links(items));
        for (i, result) in renewed.into_iter().chain(on_links) {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(result);
            }
        }
        let mut out = Vec::with_capacity(items.len());
        for ((token, settlement), done) in items.iter().zip(results) {
            out.push(match done {
                Some(result) => result,
                None => self.act(token, Action::Settle(settlement)).await,
            });
        }
        Ok(out)
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    /// `ActiveMessageCount` from the management API (a key without the Manage right
    /// cannot read it: then none), reused for `QUEUE_DEPTH_TTL` (5 s).
    async fn queue_depth(&self) -> Option<u64> {
        if let Some((at, depth)) = *lock(&self.depth)
            && at.elapsed() < QUEUE_DEPTH_TTL
        {
            return Some(depth);
        }
        match self.shared.admin.active_message_count(&self.path).await {
            Ok(Some(depth)) => {
                *lock(&self.depth) = Some((Instant::now(), depth));
                Some(depth)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(path = %self.path, error = %e, "could not read the queue depth");
                None
            }
        }
    }

    /// Stops receiving. What was received and not settled stays settleable, as
    /// [`Consumer::close`](cloudbus_core::Consumer::close) promises (issue 28 item 19:
    /// the map of unsettled messages was cleared, so a settlement after `close` said
    /// AlreadySettled and the message came back): a plain entity's messages are settled
    /// by lock token through the management node once their link is closed; a
    /// session's link (the only place its messages can be settled) stays open, with no
    /// credit, until they are settled or the session lock is gone. Messages received
    /// and never handed out are given back at once.
    async fn close(&self) -> Result<()> {
        // Sessions with unsettled messages are kept open; handed to the acceptor in the
        // same step as `closed` is set, so that it never closes its connection (and
        // their links with it) before it has them.
        let (kept, slots): (Vec<Arc<Slot>>, Vec<Arc<Slot>>) = {
            let mut held = lock(&self.slots);
            self.closed.store(true, Ordering::Release);
            let (kept, slots): (Vec<_>, Vec<_>) = held.drain(..).partition(|slot| {
                slot.session.is_some() && slot.unsettled.load(Ordering::Acquire) > 0
            });
            lock(&self.lingering).extend(kept.iter().cloned());
            (kept, slots)
        };
        let pending: Vec<ReceivedMessage> = lock(&self.pending).drain(..).collect();
        let nack = Settlement::Nack {
            delay: Duration::ZERO,
        };
        for message in pending {
            // A deferred message taken back and never handed out goes back to the
            // deferred ones; any other is abandoned.
            let deferred = message.token.as_text().is_some_and(|key| {
                lock(&self.inflight)
                    .get(key)
                    .is_some_and(|e| e.redeliver.is_some())
            });
            let action = if deferred {
                Action::Defer
            } else {
                Action::Settle(&nack)
            };
            if let Err(e) = self.act(&message.token, action).await {
                tracing::debug!(path = %self.path, error = %e, "giving back a message never handed out; it comes back when its lock lapses");
            }
        }
        for slot in kept {
            // No more deliveries on it: only its settlements.
            let mut guard = slot.link.lock().await;
            if let Some(link) = guard.as_mut()
                && let Err(e) = link.receiver.drain().await
            {
                tracing::debug!(path = %self.path, error = %e, "draining a session kept open after close");
            }
        }
        for slot in slots {
            let link = slot.link.lock().await.take();
            if let Some(link) = link {
                link_closed(
                    || format!("close the receiver of {}", self.path),
                    link.receiver.close().await,
                );
            }
        }
        if lock(&self.inflight).is_empty() {
            self.management.close().await;
        }
        // The acceptor sees `closed`, closes the sessions kept open once they are done,
        // and then its connection.
        lock(&self.acceptor).take();
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The dead-letter sub-queue of a queue or subscription.
pub struct ServiceBusDeadLetters {
    shared: Arc<ServiceBusContext>,
    topic: String,
    subscription: String,
    path: String,
    /// `<path>/$DeadLetterQueue`.
    queue: String,
}

/// What a dead letter looks like, from a received or a peeked message.
fn dead_letter_of(
    message: &AmqpMessage,
    source: &str,
    codec: &cloudbus_core::BinaryCodec,
    prefix: &str,
) -> DeadLetter {
    let (mut raw, typed) = raw_of(message, prefix);
    let reason = raw.attributes.remove(DEAD_LETTER_PROPERTIES[0]);
    let description = raw.attributes.remove(DEAD_LETTER_PROPERTIES[1]);
    raw.attributes.remove(REDRIVE_PROPERTY);
    let payload = match codec.decode(&raw) {
        Ok(mut event) => {
            restore(&mut event, typed);
            Payload::Event(Arc::new(event))
        }
        Err(_) => Payload::Raw(raw),
    };
    DeadLetter {
        payload,
        reason,
        description,
        source_entity: Some(source.to_owned()),
        attempts: message
            .header
            .as_ref()
            .map_or(0, |h| h.delivery_count.saturating_add(1)),
        dead_lettered_at: None,
    }
}

impl ServiceBusDeadLetters {
    pub(crate) fn new(shared: Arc<ServiceBusContext>, topic: &str, subscription: &str) -> Self {
        let path = shared.path(topic, subscription);
        ServiceBusDeadLetters {
            queue: format!("{path}/$DeadLetterQueue"),
            shared,
            topic: topic.to_owned(),
            subscription: subscription.to_owned(),
            path,
        }
    }

    async fn receiver(&self, mode: ReceiveMode) -> Result<Link> {
        let (live, receiver) = self
            .shared
            .amqp
            .receiver(&self.queue, mode, None)
            .await
            .map_err(|f| f.error)?;
        Ok(Link {
            receiver,
            live,
            locked_until: None,
        })
    }

    /// One page of dead letters (up to `max`), waiting at most half a second.
    async fn page(
        &self,
        link: &mut Link,
        max: usize,
    ) -> Result<Vec<fe2o3_amqp::link::delivery::Delivery<Body<Value>>>> {
        let what = format!("receive dead letters of {}", self.path);
        let mut out = Vec::new();
        while out.len() < max {
            let want = u32::try_from(max - out.len()).unwrap_or(u32::MAX);
            let got = link
                .receive(want, Duration::from_millis(500), &what)
                .await
                .map_err(|f| f.error)?;
            if got.is_empty() {
                break;
            }
            out.extend(got);
        }
        Ok(out)
    }

    /// The message that sends a dead letter back: the same body and properties, a new
    /// MessageId (duplicate detection would drop the old one), and on a topic the
    /// [`REDRIVE_PROPERTY`] naming the one subscription it is for.
    fn resend(&self, letter: &AmqpMessage) -> Message<Data> {
        let original = message_id_of(letter).unwrap_or_default();
        let sequence = sequence_of(letter).unwrap_or_default();
        let subscription = (self.shared.config.entities == EntityKind::Topics)
            .then_some(self.subscription.as_str());
        resend_copy(
            letter,
            subscription,
            format!("redrive-{sequence}-{original}"),
        )
    }
}

#[async_trait]
impl DeadLetterDriver for ServiceBusDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let management = self.shared.management(&self.queue);
        let mut out = Vec::new();
        let mut from: i64 = 0;
        while out.len() < max {
            let want = i32::try_from((max - out.len()).min(DEAD_LETTER_PAGE)).unwrap_or(100);
            let response = management
                .call::<PeekMessage>(
                    management::body([
                        ("from-sequence-number", Value::Long(from)),
                        ("message-count", Value::Int(want)),
                    ]),
                    None,
                )
                .await?;
            let messages: Vec<AmqpMessage> = response
                .body
                .as_ref()
                .and_then(|b| management::field(b, "messages"))
                .map(|m| {
                    management::items(m)
                        .into_iter()
                        .filter_map(|item| {
                            management::field(item, "message").and_then(management::decode_message)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let Some(last) = messages.last().and_then(sequence_of) else {
                break;
            };
            from = last + 1;
            out.extend(messages.iter().map(|m| {
                dead_letter_of(m, &self.path, &self.shared.codec, self.shared.config.prefix)
            }));
        }
        out.truncate(max);
        Ok(out)
    }

    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let mut link = self.receiver(ReceiveMode::PeekLock).await?;
        let (live, mut sender) = match self.shared.sender(&self.topic).await {
            Ok(s) => s,
            Err(e) => {
                let _ = link.receiver.close().await;
                return Err(e);
            }
        };
        let limit = max.unwrap_or(usize::MAX);
        let mut moved = 0;
        // The MessageIds this call sent back. A letter carrying one was dead-lettered
        // again since (a consumer that refuses it every time): redriving it once more
        // would go round for ever, so the redrive ends there.
        let mut resent_ids: HashSet<String> = HashSet::new();
        let mut came_back = false;
        let result: Result<()> = async {
            while moved < limit && !came_back {
                let letters = self
                    .page(&mut link, (limit - moved).min(DEAD_LETTER_PAGE))
                    .await?;
                if letters.is_empty() {
                    break;
                }
                for letter in letters {
                    let (info, message) = letter.into_parts();
                    if came_back
                        || message_id_of(&message).is_some_and(|id| resent_ids.contains(&id))
                    {
                        came_back = true;
                        // Unlocked, left in the dead-letter queue.
                        let _ = link.receiver.release(info).await;
                        continue;
                    }
                    let resent = self.resend(&message);
                    if let Some(fe2o3_amqp::types::messaging::MessageId::String(id)) = resent
                        .properties
                        .as_ref()
                        .and_then(|p| p.message_id.as_ref())
                    {
                        resent_ids.insert(id.clone());
                    }
                    let what = format!("redrive to {}", self.topic);
                    taken(&self.shared.amqp, &live, sender.send(resent).await, &what)?;
                    link.receiver.accept(info).await.map_err(|e| {
                        Error::with_source(
                            ErrorKind::Unavailable,
                            format!("complete a dead letter of {}", self.path),
                            e,
                        )
                    })?;
                    moved += 1;
                }
            }
            Ok(())
        }
        .await;
        let _ = sender.close().await;
        let _ = link.receiver.close().await;
        result.map(|()| moved)
    }

    /// Receives and deletes page by page: memory holds one page at a time.
    async fn purge(&self, max: Option<usize>) -> Result<usize> {
        let max = max.unwrap_or(usize::MAX);
        let mut link = self.receiver(ReceiveMode::ReceiveAndDelete).await?;
        let mut purged = 0;
        let result: Result<()> = async {
            while purged < max {
                let page = self
                    .page(&mut link, (max - purged).min(DEAD_LETTER_PAGE))
                    .await?;
                if page.is_empty() {
                    return Ok(());
                }
                purged += page.len();
            }
            Ok(())
        }
        .await;
        let _ = link.receiver.close().await;
        result.map(|()| purged)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Whether the service took a message a receiver sent itself (a nacked deferred
/// message's copy, a redriven letter): anything but `Accepted` is `Unavailable`, and a
/// failed send marks its connection failed.
fn taken(
    amqp: &Amqp,
    live: &Live,
    sent: std::result::Result<fe2o3_amqp::types::messaging::Outcome, fe2o3_amqp::link::SendError>,
    what: &str,
) -> Result<()> {
    match sent {
        Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_)) => Ok(()),
        Ok(other) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("{what}: the service did not take it ({other:?})"),
        )),
        Err(e) => {
            let f = error::from_send(e, what);
            amqp.failed(live, &f);
            Err(f.error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::admin::Admin;
    use super::super::config::ServiceBusConfig;
    use super::*;
    use cloudbus_core::codec::BinaryCodec;
    use fe2o3_amqp::types::messaging::{Batch, MessageAnnotations};
    use fe2o3_amqp::types::primitives::Timestamp;

    /// A consumer of queue `q` of an emulator namespace at `host`; nothing is opened
    /// until it is used.
    fn subscription(host: &str) -> ServiceBusSubscription {
        let config = ServiceBusConfig::from_connection_string(&format!(
            "Endpoint=sb://{host};SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
        ))
        .unwrap()
        .management_endpoint("http://127.0.0.1:1")
        .entities(EntityKind::Queues);
        let shared = Arc::new(ServiceBusContext {
            amqp: Arc::new(Amqp::new(config.clone())),
            admin: Admin::new(&config).unwrap(),
            codec: BinaryCodec::new(config.prefix),
            managements: Default::default(),
            config,
        });
        ServiceBusSubscription::new(shared, "q", "q")
    }

    /// A plain entity's slot whose link is gone: its messages are settled and renewed
    /// through the management node.
    fn detached_slot() -> Arc<Slot> {
        Arc::new(Slot {
            link: Mutex::new(None),
            unsettled: AtomicUsize::new(0),
            session: None,
            idle_since: SyncMutex::new(None),
            renew_at: SyncMutex::new(None),
            lock_ends: SyncMutex::new(None),
        })
    }

    /// Remembers an unsettled message of `slot`, leased for `lease`; answers its key.
    fn remember(sub: &ServiceBusSubscription, slot: &Arc<Slot>, lease: Duration) -> String {
        let lock_token = Uuid::from(*uuid::Uuid::new_v4().as_bytes());
        let key = token_text(&lock_token);
        slot.unsettled.fetch_add(1, Ordering::AcqRel);
        lock(&sub.inflight).insert(
            key.clone(),
            InFlight {
                lock_token,
                sequence: Some(1),
                origin: Origin::Management,
                slot: slot.clone(),
                lease_until: Instant::now() + lease,
                settling: false,
                redeliver: None,
            },
        );
        key
    }

    /// A server that takes connections and never answers: an AMQP connection to it
    /// waits for the server's protocol header (until `LINK_TIMEOUT`).
    async fn silent_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        port
    }

    #[test]
    fn leases_follow_the_lock_duration_whatever_the_clock() {
        let thirty = Some(Duration::from_secs(30));
        // This clock is ahead by more than the lock duration: none left by it.
        assert_eq!(lease_of(None, thirty), Duration::from_secs(30));
        // Ahead by 27 s: implausibly little left.
        assert_eq!(
            lease_of(Some(Duration::from_secs(3)), thirty),
            Duration::from_secs(30)
        );
        // 10 s in the link's buffer (or a clock 10 s ahead): the reading, shorter.
        assert_eq!(
            lease_of(Some(Duration::from_secs(20)), thirty),
            Duration::from_secs(20)
        );
        // A clock behind the service's: never more than the lock duration.
        assert_eq!(
            lease_of(Some(Duration::from_secs(90)), thirty),
            Duration::from_secs(30)
        );
        assert_eq!(lease_of(None, None), MIN_LOCK);
        assert_eq!(
            lease_of(Some(Duration::from_secs(45)), None),
            Duration::from_secs(45)
        );
        assert_eq!(lease_of(Some(Duration::from_secs(900)), None), MAX_LOCK);
    }

    /// Issue 28 item 21: the lease was `x-opt-locked-until` minus this machine's clock,
    /// so with this clock a minute ahead of the service's (and a 30 s lock) a message
    /// came with no lease (so no renewal) and was held here for the shortest lock only,
    /// its ack refused as LeaseExpired after 5 s. The lease is the lock duration now.
    #[test]
    fn a_clock_ahead_of_the_service_still_gets_the_lock_duration() {
        let sub = subscription("127.0.0.1:1");
        *lock(&sub.lock_duration) = Some(Duration::from_secs(30));
        let slot = detached_slot();
        // Locked for 30 s from the service's now, which is a minute behind this clock.
        let locked_until_ms = Utc::now().timestamp_millis() + 30_000 - 60_000;
        let message: AmqpMessage = Message::builder()
            .message_annotations(Some(
                MessageAnnotations::builder()
                    .insert(
                        Symbol::from("x-opt-locked-until"),
                        Value::Timestamp(Timestamp::from_milliseconds(locked_until_ms)),
                    )
                    .build(),
            ))
            .body(Body::Data(Batch::from(vec![Data::from(b"x".to_vec())])))
            .build();
        let token = Uuid::from([7u8; 16]);
        let received = sub
            .convert(message, token.clone(), Origin::Management, &slot, false)
            .expect("a delivery");
        assert_eq!(received.lease, Some(Duration::from_secs(30)));
        let until = lock(&sub.inflight)[&token_text(&token)].lease_until;
        assert!(
            until > Instant::now() + Duration::from_secs(25),
            "held here for less than the lock"
        );
    }

    /// Issue 28 item 11: a renewal took its message out of the map while it ran, and
    /// an ack at that moment said AlreadySettled (and the handled event came back).
    /// Here the renewal hangs on a server that never answers: its message stays in the
    /// map, and an ack meanwhile waits for the management node instead of failing.
    #[tokio::test]
    async fn an_ack_during_a_renewal_is_not_already_settled() {
        let port = silent_server().await;
        let sub = subscription(&format!("127.0.0.1:{port}"));
        let slot = detached_slot();
        let key = remember(&sub, &slot, Duration::from_secs(60));
        let token = AckToken::Text(key.clone());
        let extend = [(
            token.clone(),
            Settlement::Extend {
                lease: Duration::from_secs(30),
            },
        )];
        let mut renewal = std::pin::pin!(sub.settle_batch(&extend));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), renewal.as_mut())
                .await
                .is_err(),
            "the silent server answered"
        );
        assert!(
            lock(&sub.inflight).contains_key(&key),
            "the renewal took the message out of the map"
        );
        let ack = [(token, Settlement::Ack)];
        if let Ok(results) =
            tokio::time::timeout(Duration::from_millis(300), sub.settle_batch(&ack)).await
        {
            let results = results.unwrap();
            assert!(
                !matches!(&results[0], Err(e) if e.kind() == ErrorKind::AlreadySettled),
                "{results:?}"
            );
        }
        // (Timed out: it waited for the management node, which the renewal holds.)
        // The ack was cancelled: the message is still there, settleable.
        assert!(lock(&sub.inflight).get(&key).is_some_and(|e| !e.settling));
    }

    /// Issue 28 item 19: `close` cleared the map of unsettled messages, so a settlement
    /// after it said AlreadySettled (and the message came back), while
    /// `Consumer::close` promises that received deliveries can still be settled. After
    /// `close` the message is still known: settling it goes to the service (refused
    /// here, with nothing listening: Unavailable, and kept for a retry).
    #[tokio::test]
    async fn a_closed_consumer_still_knows_what_it_received() {
        let sub = subscription("127.0.0.1:1");
        let slot = detached_slot();
        let key = remember(&sub, &slot, Duration::from_secs(60));
        sub.close().await.unwrap();
        assert!(lock(&sub.inflight).contains_key(&key), "forgotten by close");
        let results = sub
            .settle_batch(&[(AckToken::Text(key.clone()), Settlement::Ack)])
            .await
            .unwrap();
        let e = results[0].as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(lock(&sub.inflight).get(&key).is_some_and(|e| !e.settling));
    }

    /// Issue 28 item 22: a `settle_batch` that was cancelled (its caller timed out or
    /// shut down) had taken its messages out of the map, so their settlements then
    /// said AlreadySettled while the messages came back. Cancelled now, it leaves
    /// every one of them settleable.
    #[tokio::test]
    async fn a_cancelled_settlement_leaves_its_messages_settleable() {
        let port = silent_server().await;
        let sub = subscription(&format!("127.0.0.1:{port}"));
        let slot = detached_slot();
        let keys: Vec<String> = (0..3)
            .map(|_| remember(&sub, &slot, Duration::from_secs(60)))
            .collect();
        let items: Vec<(AckToken, Settlement)> = keys
            .iter()
            .map(|k| (AckToken::Text(k.clone()), Settlement::Ack))
            .collect();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(200), sub.settle_batch(&items)).await;
        assert!(cancelled.is_err(), "the silent server answered");
        let inflight = lock(&sub.inflight);
        for key in &keys {
            assert!(
                inflight.get(key).is_some_and(|e| !e.settling),
                "{key} is lost from the map, or left marked as being settled"
            );
        }
        assert_eq!(slot.unsettled.load(Ordering::Acquire), 3);
    }

    #[test]
    fn settlements_map_to_disposition_statuses() {
        assert_eq!(
            Action::Settle(&Settlement::Ack).disposition_status(),
            "completed"
        );
        assert_eq!(Action::Defer.disposition_status(), "defered");
        let dl = Settlement::DeadLetter {
            reason: "r".into(),
            description: "d".into(),
        };
        assert_eq!(Action::Settle(&dl).disposition_status(), "suspended");
        let e = dead_letter_error("r", "d");
        assert_eq!(
            super::super::error::condition_symbol(&e.condition),
            DEAD_LETTER_CONDITION
        );
    }
}
