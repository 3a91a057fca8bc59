//! Receiving from Service Bus: the peek-lock subscription driver of plain entities and
//! session-enabled ones (whose sessions [`sessions`](super::sessions) accepts and
//! renews): receive, settle, lock renewal, and Service Bus's defer.
//!
//! Each receive reads the entity's links ([`Link`]s: manual credit, drained when
//! nothing comes within the slice). Settlements are AMQP dispositions on the link the
//! message came from (complete = accepted, abandon = modified, dead-letter = rejected
//! with `com.microsoft:dead-letter`, defer = modified undeliverable-here); lock
//! renewal, deferred messages and settlements without their link go through the
//! entity's `$management` node.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use cloudbus_core::Delivery;
use cloudbus_driver::driver::{
    AckToken, BatchResults, ReceivedMessage, Settlement, SubscriptionDriver,
};
use cloudbus_driver::{Capabilities, Error, ErrorKind, Result};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::messaging::{Body, Modified};
use fe2o3_amqp::types::primitives::{Array, Uuid, Value};
use tokio::sync::Mutex;

use super::config::{EntityKind, REDRIVE_PROPERTY};
use super::connection::{ReceiveMode, link_closed, lock, taken};
use super::context::ServiceBusContext;
use super::error::{self, Scope};
use super::link::{Link, Slot, dead_letter_error, lease_of};
use super::management::{self, Management, ReceiveBySequenceNumber, RenewLock, UpdateDisposition};
use super::message::{
    AmqpMessage, annotation_time, lock_token_of, message_id_of, raw_of, resend_copy, restore,
    sequence_of, session_id_of, token_text,
};
use super::sessions::{self, SESSION_SLICE, accept_sessions};

/// The longest one receive call waits on a link before it drains it.
pub const RECEIVE_SLICE: Duration = Duration::from_millis(200);
/// How long past its lease an unsettled message is remembered (to answer a late
/// settle with LeaseExpired) before it is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Most lock tokens in one RenewLock request.
pub const RENEW_BATCH: usize = 100;
/// The dead-letter reason of a delivery without a lock token (it cannot be settled
/// by the management node, nor renewed).
const NO_LOCK_TOKEN_REASON: &str = "malformed: the message has no lock token";

/// A session's messages whose locks one session-lock renewal keeps: the session's
/// slot, its id, and the items `(index, key, lease)`.
type SessionRenewal = (Arc<Slot>, String, Vec<(usize, String, Duration)>);

/// Messages settled on one open link in one disposition: the link's slot, whether
/// they are completed (else abandoned), and the items `(index, key, delivery)`.
type LinkSettlement = (Arc<Slot>, bool, Vec<(usize, String, DeliveryInfo)>);

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
/// back; reach it with `consumer.downcast::<ServiceBusSubscription>()`.
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
    /// let Some(service_bus) = consumer.downcast::<ServiceBusSubscription>() else {
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

    /// Renews a held session's lock when it is due (see [`sessions::renew_if_due`]),
    /// unless a message of it is past its lease (then the lock runs out, and the
    /// service gives the message to the next reader).
    async fn renew_session_if_due(&self, slot: &Arc<Slot>) -> Result<()> {
        sessions::renew_if_due(&self.management, slot, self.lock_duration(), |now| {
            lock(&self.inflight)
                .values()
                .filter(|i| Arc::ptr_eq(&i.slot, slot))
                .all(|i| i.lease_until > now)
        })
        .await
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
            partition: None,
            offset: None,
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
            match sessions::renew_session_lock(&self.management, &session).await {
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
                    Ok(_) => sessions::release_idle(&self.slots, slot).await,
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
                        sessions::release(&self.slots, slot).await;
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
}

#[cfg(test)]
mod tests {
    use super::super::admin::Admin;
    use super::super::config::ServiceBusConfig;
    use super::super::connection::Amqp;
    use super::*;
    use cloudbus_driver::codec::BinaryCodec;
    use fe2o3_amqp::types::messaging::{Batch, Data, Message, MessageAnnotations};
    use fe2o3_amqp::types::primitives::{Symbol, Timestamp};

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
    }
}
