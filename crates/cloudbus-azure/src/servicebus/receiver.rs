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
        match tokio::time::timeout(wait, self.receiver.recv::<Body<Value>>()).await {
            Ok(Ok(d)) => out.push(d),
            Ok(Err(e)) => return Err(error::from_recv(e, what)),
            Err(_) => {
                // Nothing within the slice: take the credit back, keeping what the
                // service sent before it saw the drain.
                self.receiver.drain().await.map_err(|e| error::Failure {
                    error: Error::with_source(ErrorKind::Unavailable, format!("{what}: drain"), e),
                    scope: Scope::Link,
                })?;
                if let Ok(Ok(d)) =
                    tokio::time::timeout(DRAIN_WAIT, self.receiver.recv::<Body<Value>>()).await
                {
                    out.push(d);
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
}

impl Slot {
    fn new(link: Link, session: Option<String>) -> Self {
        Slot {
            renew_at: SyncMutex::new(link.locked_until.map(renewal_time)),
            link: Mutex::new(Some(link)),
            unsettled: AtomicUsize::new(0),
            session,
            idle_since: SyncMutex::new(None),
        }
    }
}

/// Half the remaining life of a lock that runs until `locked_until` (half the
/// shortest lock Service Bus allows when the time is unknown or past).
fn renewal_time(locked_until: SystemTime) -> Instant {
    let remaining = locked_until
        .duration_since(SystemTime::now())
        .unwrap_or(MIN_LOCK)
        .min(MAX_LOCK);
    Instant::now() + remaining / 2
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
}

/// What is done with an unsettled message: a portable settlement, or Service Bus's
/// defer.
#[derive(Clone, Copy)]
enum Action<'a> {
    Settle(&'a Settlement),
    Defer,
}

impl Action<'_> {
    /// Whether the message leaves the consumer's hands (all but extend).
    fn is_final(self) -> bool {
        match self {
            Action::Settle(s) => s.is_final(),
            Action::Defer => true,
        }
    }
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
        }
    }

    /// Fails with NotFound once, before the first link, when the entity is missing.
    async fn check(&self) -> Result<()> {
        if !self.checked.load(Ordering::Acquire) {
            self.shared
                .check(&self.topic, Some(&self.subscription))
                .await?;
            self.checked.store(true, Ordering::Release);
        }
        Ok(())
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
        let slot = Arc::new(Slot::new(link, None));
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
            .filter_map(|(message, token)| self.convert(message, token, Origin::Management, slot))
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
            *lock(&slot.renew_at) = Some(renewal_time(until));
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
    /// of the topic are completed here (they are not for this one).
    async fn accept(
        &self,
        deliveries: Vec<fe2o3_amqp::link::delivery::Delivery<Body<Value>>>,
        slot: &Arc<Slot>,
    ) -> Vec<ReceivedMessage> {
        let mut out = Vec::with_capacity(deliveries.len());
        let mut foreign = Vec::new();
        for d in deliveries {
            let tag = d.delivery_tag().to_vec();
            let (info, message) = d.into_parts();
            let Some(token) = lock_token_of(&message, Some(&tag)) else {
                tracing::warn!(path = %self.path, "a Service Bus message without a lock token");
                continue;
            };
            match self.convert(message, token.clone(), Origin::Link(info), slot) {
                Some(r) => out.push(r),
                None => foreign.push(token_text(&token)),
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
    fn convert(
        &self,
        message: AmqpMessage,
        lock_token: Uuid,
        origin: Origin,
        slot: &Arc<Slot>,
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
        let lease = annotation_time(&message, "x-opt-locked-until")
            .and_then(|until| (until - Utc::now()).to_std().ok());
        slot.unsettled.fetch_add(1, Ordering::AcqRel);
        lock(&self.inflight).insert(
            token.clone(),
            InFlight {
                lock_token,
                sequence: sequence_of(&message),
                origin,
                slot: slot.clone(),
                lease_until: Instant::now() + lease.unwrap_or(MIN_LOCK),
            },
        );
        if foreign {
            return None;
        }
        let published_at = annotation_time(&message, "x-opt-enqueued-time");
        let ordering_key = session_id_of(&message);
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
            lease,
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
            let keep = i.lease_until + FORGET_AFTER > now;
            if !keep {
                i.slot.unsettled.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }

    /// Does `action` with the unsettled message of `token`: on the link it came from,
    /// or through the management node. A settlement that failed and may succeed when
    /// tried again leaves the message unsettled (its lock token is kept).
    async fn act(&self, token: &AckToken, action: Action<'_>) -> Result<()> {
        let key = token.as_text().unwrap_or_default().to_owned();
        let Some(mut inflight) = lock(&self.inflight).remove(&key) else {
            return Err(Error::new(
                ErrorKind::AlreadySettled,
                format!(
                    "no unsettled message with lock token {key} on {}",
                    self.path
                ),
            ));
        };
        let slot = inflight.slot.clone();
        let result = if Instant::now() > inflight.lease_until {
            Err(Error::new(
                ErrorKind::LeaseExpired,
                format!(
                    "the lock of {key} on {} ran out before the {}",
                    self.path,
                    action.label()
                ),
            ))
        } else {
            self.apply(&mut inflight, action).await
        };
        let keep = match &result {
            Ok(()) => !action.is_final(),
            Err(e) => e.is_retryable(),
        };
        if keep {
            lock(&self.inflight).insert(key, inflight);
        } else {
            slot.unsettled.fetch_sub(1, Ordering::AcqRel);
        }
        result
    }

    async fn apply(&self, inflight: &mut InFlight, action: Action<'_>) -> Result<()> {
        let what = format!(
            "{} {} on {}",
            action.label(),
            token_text(&inflight.lock_token),
            self.path
        );
        if let Action::Settle(Settlement::Extend { lease }) = action {
            let lease = *lease;
            match &inflight.slot.session {
                // A session message's lock is the session lock.
                Some(session) => {
                    let until = self.renew_session_lock(session).await?;
                    *lock(&inflight.slot.renew_at) = Some(renewal_time(until));
                }
                None => {
                    let body = management::body([(
                        "lock-tokens",
                        management::lock_tokens(std::slice::from_ref(&inflight.lock_token)),
                    )]);
                    self.management.call::<RenewLock>(body, None).await?;
                }
            }
            inflight.lease_until = Instant::now() + lease;
            return Ok(());
        }
        if let Origin::Link(info) = inflight.origin.clone() {
            let mut guard = inflight.slot.link.lock().await;
            if let Some(link) = guard.as_mut() {
                {
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
                        Action::Settle(_) => {
                            link.receiver
                                .modify(
                                    info,
                                    Modified {
                                        delivery_failed: Some(true),
                                        undeliverable_here: None,
                                        message_annotations: None,
                                    },
                                )
                                .await
                        }
                    };
                    match disposed {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            tracing::debug!(error = %e, %what, "the receiving link is gone");
                        }
                    }
                }
            }
            drop(guard);
            if inflight.slot.session.is_some() {
                // A session's messages can only be settled on the session's link.
                return Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!("{what}: the session's link is closed, and its lock with it"),
                ));
            }
            // The link is gone; the lock may still hold: settle by lock token.
            inflight.origin = Origin::Management;
        }
        let mut body = management::body([
            (
                "lock-tokens",
                management::lock_tokens(std::slice::from_ref(&inflight.lock_token)),
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
        if let Some(session) = &inflight.slot.session {
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
/// service, and must not hold up the bus's other links.
async fn accept_sessions(
    shared: Arc<ServiceBusContext>,
    path: String,
    slots: Arc<SyncMutex<Vec<Arc<Slot>>>>,
    closed: Arc<AtomicBool>,
    error: Arc<SyncMutex<Option<Error>>>,
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
                let slot = Arc::new(Slot::new(link, Some(session)));
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
    amqp.close().await;
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

    /// Completions of messages of one link go as one disposition per run of
    /// consecutive deliveries (fe2o3's `accept_all`); everything else one by one.
    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let mut results: Vec<Option<Result<()>>> = items.iter().map(|_| None).collect();
        // Acks of messages received on a link, by link, taken out of the map (so that
        // no other settlement races them) while their locks hold.
        let mut by_link: Vec<(Arc<Slot>, Vec<(usize, String, InFlight, DeliveryInfo)>)> =
            Vec::new();
        {
            let now = Instant::now();
            let mut inflight = lock(&self.inflight);
            for (i, (token, settlement)) in items.iter().enumerate() {
                if !matches!(settlement, Settlement::Ack) {
                    continue;
                }
                let key = token.as_text().unwrap_or_default();
                let Some(entry) = inflight.get(key) else {
                    continue;
                };
                let Origin::Link(info) = entry.origin.clone() else {
                    continue;
                };
                if entry.lease_until <= now {
                    continue;
                }
                let Some(entry) = inflight.remove(key) else {
                    continue;
                };
                let slot = entry.slot.clone();
                let item = (i, key.to_owned(), entry, info);
                match by_link.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &slot)) {
                    Some((_, group)) => group.push(item),
                    None => by_link.push((slot, vec![item])),
                }
            }
        }
        for (slot, group) in by_link {
            let accepted = {
                let guard = slot.link.lock().await;
                match guard.as_ref() {
                    Some(link) => link
                        .receiver
                        .accept_all(group.iter().map(|(_, _, _, info)| info.clone()))
                        .await
                        .is_ok(),
                    None => false,
                }
            };
            if accepted {
                slot.unsettled.fetch_sub(group.len(), Ordering::AcqRel);
                for (i, _, _, _) in group {
                    results[i] = Some(Ok(()));
                }
            } else {
                // The link is gone: back into the map, settled one by one below
                // (through the management node).
                let mut inflight = lock(&self.inflight);
                for (_, key, entry, _) in group {
                    inflight.insert(key, entry);
                }
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

    async fn close(&self) -> Result<()> {
        let slots: Vec<Arc<Slot>> = {
            let mut held = lock(&self.slots);
            self.closed.store(true, Ordering::Release);
            held.drain(..).collect()
        };
        for slot in slots {
            let link = slot.link.lock().await.take();
            if let Some(link) = link {
                link_closed(
                    || format!("close the receiver of {}", self.path),
                    link.receiver.close().await,
                );
            }
        }
        lock(&self.inflight).clear();
        lock(&self.pending).clear();
        self.management.close().await;
        // The acceptor sees `closed` and closes its connection.
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
        let mut application = fe2o3_amqp::types::messaging::ApplicationProperties::builder();
        if let Some(existing) = &letter.application_properties {
            for (k, v) in existing.0.iter() {
                if !DEAD_LETTER_PROPERTIES.contains(&k.as_str()) && k != REDRIVE_PROPERTY {
                    application = application.insert(k.clone(), v.clone());
                }
            }
        }
        if self.shared.config.entities == EntityKind::Topics {
            application = application.insert(
                REDRIVE_PROPERTY.to_owned(),
                fe2o3_amqp::types::primitives::SimpleValue::String(self.subscription.clone()),
            );
        }
        let original = message_id_of(letter).unwrap_or_default();
        let sequence = sequence_of(letter).unwrap_or_default();
        let id: String = format!("redrive-{sequence}-{original}")
            .chars()
            .take(128)
            .collect();
        let properties = Properties {
            message_id: Some(fe2o3_amqp::types::messaging::MessageId::String(id)),
            content_type: letter
                .properties
                .as_ref()
                .and_then(|p| p.content_type.clone()),
            group_id: session_id_of(letter),
            ..Default::default()
        };
        Message::builder()
            .properties(properties)
            .application_properties(application.build())
            .data(fe2o3_amqp::types::primitives::Binary::from(
                super::message::body_bytes(letter),
            ))
            .build()
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
                    match sender.send(resent).await {
                        Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_)) => {}
                        Ok(other) => {
                            return Err(Error::new(
                                ErrorKind::Unavailable,
                                format!("{what}: the service did not take it ({other:?})"),
                            ));
                        }
                        Err(e) => {
                            let f = error::from_send(e, &what);
                            self.shared.amqp.failed(&live, &f);
                            return Err(f.error);
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
