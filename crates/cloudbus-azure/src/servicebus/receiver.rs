//! Receiving from Service Bus: the peek-lock subscription driver (plain entities and
//! session-enabled ones, where it holds up to [`MAX_SESSIONS`] sessions at a time) and
//! the dead-letter sub-queue.
//!
//! An azservicebus receiver settles only the messages it received, and every call
//! takes it by `&mut`. So each link sits behind an async mutex, and a receive holds it
//! for at most [`RECEIVE_SLICE`] at a time: a settlement waits at most that long.
//!
//! A session's messages are locked by the session lock. A held session's lock is
//! renewed at half its life while every unsettled message of it is within its lease;
//! extending a message renews it too. A message left past its lease lets the session
//! lock run out, and the service gives the session (and the message) to the next
//! reader, as a lapsed message lock would.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azservicebus::primitives::service_bus_peeked_message::ServiceBusPeekedMessage;
use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusReceiveMode, ServiceBusReceivedMessage, ServiceBusReceiver,
    ServiceBusReceiverOptions, ServiceBusSessionReceiver, ServiceBusSessionReceiverOptions,
    SubQueue,
};
use chrono::{DateTime, Utc};
use cloudbus_core::codec::RawMessage;
use cloudbus_core::driver::{
    AckToken, BatchResults, DeadLetter, DeadLetterDriver, Payload, ReceivedMessage, Settlement,
    SubscriptionDriver,
};
use cloudbus_core::{Capabilities, Delivery, Error, ErrorKind, Event, ExtensionValue, Result};
use fe2o3_amqp_types::messaging::annotations::AnnotationKey;
use fe2o3_amqp_types::messaging::{ApplicationProperties, Body, Message};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};
use tokio::sync::Mutex;

use super::{
    ATTRIBUTE_PREFIX, CONTENT_TYPE, EntityKind, LINK_TIMEOUT, MAX_LOCK, MIN_LOCK, REDRIVE_PROPERTY,
    Shared, connection_lost, sb_error, text_of,
};

/// The longest one receive call holds a link.
pub const RECEIVE_SLICE: Duration = Duration::from_millis(200);
/// How long a session must find nothing before it is let go.
pub const SESSION_IDLE: Duration = Duration::from_millis(500);
/// How long a receive waits for the session acceptor when it holds none.
pub const SESSION_SLICE: Duration = Duration::from_millis(30);
/// Most sessions one subscription driver holds at once.
pub const MAX_SESSIONS: usize = 32;
/// Application properties a redrive leaves behind.
const DEAD_LETTER_PROPERTIES: [&str; 2] = ["DeadLetterReason", "DeadLetterErrorDescription"];

/// A receiver: plain, or holding one session.
enum Link {
    Plain(ServiceBusReceiver),
    Session(ServiceBusSessionReceiver),
}

macro_rules! on_link {
    ($link:expr, $r:ident => $body:expr) => {
        match $link {
            Link::Plain($r) => $body,
            Link::Session($r) => $body,
        }
    };
}

impl Link {
    async fn receive(
        &mut self,
        max: u32,
        wait: Duration,
    ) -> std::result::Result<Vec<ServiceBusReceivedMessage>, azure_core::Error> {
        on_link!(self, r => r.receive_messages_with_max_wait_time(max, Some(wait)).await)
    }

    async fn apply(
        &mut self,
        message: &mut ServiceBusReceivedMessage,
        action: Action<'_>,
    ) -> std::result::Result<(), azure_core::Error> {
        let settlement = match action {
            Action::Defer => {
                return on_link!(self, r => r.defer_message(&*message, None).await);
            }
            Action::Settle(settlement) => settlement,
        };
        match settlement {
            Settlement::Ack => on_link!(self, r => r.complete_message(&*message).await),
            Settlement::Nack { .. } => {
                on_link!(self, r => r.abandon_message(&*message, None).await)
            }
            Settlement::DeadLetter {
                reason,
                description,
            } => {
                let options = DeadLetterOptions {
                    dead_letter_reason: Some(reason.clone()),
                    dead_letter_error_description: Some(description.clone()),
                    properties_to_modify: None,
                };
                on_link!(self, r => r.dead_letter_message(&*message, options).await)
            }
            // A session message's lock is the session lock (Microsoft's clients refuse
            // a message lock renewal on a session receiver).
            Settlement::Extend { .. } => match self {
                Link::Plain(r) => r.renew_message_lock(message).await,
                Link::Session(r) => r.renew_session_lock().await,
            },
        }
    }

    /// Sessions: when to renew the session lock next (half its remaining life).
    fn session_renewal(&self) -> Option<Instant> {
        match self {
            Link::Plain(_) => None,
            Link::Session(r) => Some(renewal_time(r.session_locked_until())),
        }
    }

    async fn dispose(self) -> std::result::Result<(), azure_core::Error> {
        on_link!(self, r => r.dispose().await)
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
            renew_at: SyncMutex::new(link.session_renewal()),
            link: Mutex::new(Some(link)),
            unsettled: AtomicUsize::new(0),
            session,
            idle_since: SyncMutex::new(None),
        }
    }
}

/// Half the remaining life of a lock that runs until `locked_until` (half the
/// shortest lock Service Bus allows when the time is unknown or past).
fn renewal_time(locked_until: time::OffsetDateTime) -> Instant {
    let remaining = Duration::try_from(locked_until - time::OffsetDateTime::now_utc())
        .unwrap_or(MIN_LOCK)
        .min(MAX_LOCK);
    Instant::now() + remaining / 2
}

/// One received, unsettled message.
struct Inflight {
    message: ServiceBusReceivedMessage,
    slot: Arc<Slot>,
    /// Until when the consumer may hold it (its lock, or the last extend).
    lease_until: Instant,
}

/// Receives from a queue or subscription in peek-lock mode: the driver of a Service
/// Bus [`Consumer`](cloudbus_core::Consumer). Beyond the portable settlements it can
/// [`defer`](Self::defer) a message and [`fetch_deferred`](Self::fetch_deferred) it
/// back; reach it with `consumer.driver().as_any().downcast_ref()`.
pub struct ServiceBusSubscription {
    shared: Arc<Shared>,
    topic: String,
    subscription: String,
    path: String,
    slots: Arc<SyncMutex<Vec<Arc<Slot>>>>,
    /// Serializes opening links, so that concurrent receives do not open several.
    opening: Mutex<()>,
    inflight: SyncMutex<HashMap<String, Inflight>>,
    /// Deferred messages taken back by sequence number, for the next receive.
    fetched: SyncMutex<Vec<ReceivedMessage>>,
    closed: Arc<AtomicBool>,
    /// The entity was found to exist.
    checked: AtomicBool,
    /// Where the next read of several sessions starts.
    rotation: AtomicUsize,
    /// Session-enabled entities: the task that accepts sessions, and the error that
    /// stopped it from accepting any (a missing entity, a refused key).
    acceptor: SyncMutex<Option<tokio::task::JoinHandle<()>>>,
    acceptor_error: Arc<SyncMutex<Option<Error>>>,
}

/// A lock token as text (the settlement key).
fn token_text(token: &fe2o3_amqp_types::primitives::Uuid) -> String {
    token
        .as_inner()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn lock<T>(m: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message annotation of a received or peeked message.
fn annotation<'a>(message: &'a Message<Body<Value>>, name: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .get(&name as &dyn AnnotationKey)
}

/// An annotation that is a timestamp.
fn annotation_time(message: &Message<Body<Value>>, name: &str) -> Option<DateTime<Utc>> {
    match annotation(message, name)? {
        Value::Timestamp(t) => DateTime::from_timestamp_millis(t.milliseconds()),
        _ => None,
    }
}

/// A message's sequence number (azservicebus's own accessor panics on a malformed
/// annotation; a message from the network must not).
fn sequence_of(message: &Message<Body<Value>>) -> Option<i64> {
    match annotation(message, "x-opt-sequence-number")? {
        Value::Long(n) => Some(*n),
        _ => None,
    }
}

/// The body of a message: its data sections, or a value's text.
fn body_bytes(message: &Message<Body<Value>>) -> Vec<u8> {
    match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            other => format!("{other:?}").into_bytes(),
        },
        _ => Vec::new(),
    }
}

/// A received message as a raw message: body, text attributes, `content-type`; and
/// the typed extension values to restore after decoding.
fn raw_of(message: &Message<Body<Value>>) -> (RawMessage, Vec<(String, ExtensionValue)>) {
    let mut raw = RawMessage::new(body_bytes(message));
    let mut typed = Vec::new();
    if let Some(props) = &message.application_properties {
        for (k, v) in props.0.iter() {
            if let Some(ext) = k.strip_prefix(ATTRIBUTE_PREFIX) {
                match v {
                    SimpleValue::Int(n) => {
                        typed.push((ext.to_owned(), ExtensionValue::Integer(i64::from(*n))))
                    }
                    SimpleValue::Long(n) => {
                        typed.push((ext.to_owned(), ExtensionValue::Integer(*n)))
                    }
                    SimpleValue::Bool(b) => {
                        typed.push((ext.to_owned(), ExtensionValue::Boolean(*b)))
                    }
                    _ => {}
                }
            }
            if let Some(text) = text_of(v) {
                raw.attributes.insert(k.clone(), text);
            }
        }
    }
    if let Some(ct) = message
        .properties
        .as_ref()
        .and_then(|p| p.content_type.as_ref())
    {
        raw.attributes.insert(CONTENT_TYPE.to_owned(), ct.0.clone());
    }
    (raw, typed)
}

impl ServiceBusSubscription {
    pub(crate) fn new(shared: Arc<Shared>, topic: &str, subscription: &str) -> Self {
        let path = shared.path(topic, subscription);
        ServiceBusSubscription {
            shared,
            topic: topic.to_owned(),
            subscription: subscription.to_owned(),
            path,
            slots: Arc::new(SyncMutex::new(Vec::new())),
            opening: Mutex::new(()),
            inflight: SyncMutex::new(HashMap::new()),
            fetched: SyncMutex::new(Vec::new()),
            closed: Arc::new(AtomicBool::new(false)),
            checked: AtomicBool::new(false),
            rotation: AtomicUsize::new(0),
            acceptor: SyncMutex::new(None),
            acceptor_error: Arc::new(SyncMutex::new(None)),
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
        let mut client = self.shared.client.lock().await;
        let (topic, sub) = (&self.topic, &self.subscription);
        let options = ServiceBusReceiverOptions::default();
        let open = async {
            if self.shared.config.entities == EntityKind::Queues {
                client
                    .create_receiver_for_queue(topic.clone(), options)
                    .await
            } else {
                client
                    .create_receiver_for_subscription(topic, sub, options)
                    .await
            }
        };
        let receiver = tokio::time::timeout(LINK_TIMEOUT, open)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "opening a receiver for {} took longer than {LINK_TIMEOUT:?}",
                        self.path
                    ),
                )
            })?
            .map_err(|e| sb_error(e, &format!("open a receiver for {}", self.path)))?;
        let slot = Arc::new(Slot::new(Link::Plain(receiver), None));
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
        let sequence = lock(&self.inflight)
            .get(&key)
            .and_then(|i| sequence_of(i.message.raw_amqp_message()));
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
        let fetched = {
            let mut link = slot.link.lock().await;
            match link.as_mut() {
                None => return Ok(0),
                Some(link) => on_link!(link, r => r
                    .receive_deferred_messages(sequence_numbers.iter().copied())
                    .await)
                .map_err(|e| sb_error(e, &format!("receive deferred messages of {}", self.path)))?,
            }
        };
        let found = fetched.len();
        let received = self.accept(fetched, slot).await;
        lock(&self.fetched).extend(received);
        Ok(found)
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
                    self.topic.clone(),
                    self.subscription.clone(),
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
    /// unsettled. A last read first takes what the service sent in answer to the
    /// previous read's drain: a session closed with deliveries on their way keeps
    /// them locked until the lock expires. Returns what that read found.
    async fn release_idle(&self, slot: &Arc<Slot>) -> Vec<ReceivedMessage> {
        if slot.session.is_none() {
            return Vec::new();
        }
        {
            let mut idle = lock(&slot.idle_since);
            let since = *idle.get_or_insert_with(Instant::now);
            if since.elapsed() < SESSION_IDLE || slot.unsettled.load(Ordering::Acquire) > 0 {
                return Vec::new();
            }
        }
        let last = {
            let mut guard = slot.link.lock().await;
            match guard.as_mut() {
                Some(link) => link.receive(16, Duration::from_millis(50)).await,
                None => return Vec::new(),
            }
        };
        match last {
            Ok(messages) if !messages.is_empty() => {
                *lock(&slot.idle_since) = None;
                self.accept(messages, slot).await
            }
            _ => {
                self.release(slot, true).await;
                Vec::new()
            }
        }
    }

    /// Renews a held session's lock when it is due, unless a message of it is past
    /// its lease (then the lock runs out, and the service gives the message to the
    /// next reader).
    async fn renew_session_if_due(
        &self,
        slot: &Arc<Slot>,
        link: &mut Link,
    ) -> std::result::Result<(), azure_core::Error> {
        let now = Instant::now();
        let due = lock(&slot.renew_at).is_some_and(|at| at <= now);
        let leases_hold = || {
            lock(&self.inflight)
                .values()
                .filter(|i| Arc::ptr_eq(&i.slot, slot))
                .all(|i| i.lease_until > now)
        };
        if let Link::Session(receiver) = link
            && due
            && leases_hold()
        {
            receiver.renew_session_lock().await?;
            *lock(&slot.renew_at) = link.session_renewal();
        }
        Ok(())
    }

    /// Lets a session go when it ran dry and nothing of it is unsettled, or when it
    /// failed (`ended`).
    async fn release(&self, slot: &Arc<Slot>, ended: bool) {
        if slot.session.is_none() || (!ended && slot.unsettled.load(Ordering::Acquire) > 0) {
            return;
        }
        let link = slot.link.lock().await.take();
        lock(&self.slots).retain(|s| !Arc::ptr_eq(s, slot));
        if let Some(link) = link
            && let Err(e) = link.dispose().await
        {
            tracing::debug!(error = %e, "closing a drained Service Bus session");
        }
    }

    /// The deliveries of received messages; those redriven to another subscription
    /// of the topic are completed here (they are not for this one).
    async fn accept(
        &self,
        messages: Vec<ServiceBusReceivedMessage>,
        slot: &Arc<Slot>,
    ) -> Vec<ReceivedMessage> {
        let mut out = Vec::with_capacity(messages.len());
        let mut foreign = Vec::new();
        for m in messages {
            let token = token_text(m.lock_token());
            match self.convert(m, slot) {
                Some(r) => out.push(r),
                None => foreign.push(token),
            }
        }
        for token in foreign {
            if let Err(e) = self
                .settle_one(&AckToken::Text(token), &Settlement::Ack)
                .await
            {
                tracing::warn!(error = %e, "completing a message redriven elsewhere");
            }
        }
        out
    }

    fn convert(
        &self,
        message: ServiceBusReceivedMessage,
        slot: &Arc<Slot>,
    ) -> Option<ReceivedMessage> {
        let raw_message = message.raw_amqp_message();
        let (mut raw, typed) = raw_of(raw_message);
        if let Some(target) = raw.attributes.remove(REDRIVE_PROPERTY)
            && self.shared.config.entities == EntityKind::Topics
            && target != self.subscription
        {
            return None;
        }
        let token = token_text(message.lock_token());
        let attempt = message.delivery_count().unwrap_or(1).max(1);
        let lease = annotation_time(raw_message, "x-opt-locked-until")
            .and_then(|until| (until - Utc::now()).to_std().ok());
        let published_at = annotation_time(raw_message, "x-opt-enqueued-time");
        let ordering_key = message.session_id().map(str::to_owned);
        let size = raw.size();
        let event = match self.shared.codec.decode(&raw) {
            Ok(mut event) => {
                restore(&mut event, typed);
                Ok(Arc::new(event))
            }
            Err(e) => Err((raw, e)),
        };
        slot.unsettled.fetch_add(1, Ordering::AcqRel);
        lock(&self.inflight).insert(
            token.clone(),
            Inflight {
                message,
                slot: slot.clone(),
                lease_until: Instant::now() + lease.unwrap_or(MIN_LOCK),
            },
        );
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

    async fn settle_one(&self, token: &AckToken, settlement: &Settlement) -> Result<()> {
        self.act(token, Action::Settle(settlement)).await
    }

    /// Does `action` with the unsettled message of `token` on the link it came from.
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
        let result = {
            let mut link = slot.link.lock().await;
            match link.as_mut() {
                None => Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!("the link of lock token {key} on {} is closed", self.path),
                )),
                Some(link) => {
                    let applied = link.apply(&mut inflight.message, action).await;
                    if applied.is_ok()
                        && let Action::Settle(Settlement::Extend { lease }) = action
                    {
                        inflight.lease_until = Instant::now() + *lease;
                        *lock(&slot.renew_at) = link.session_renewal();
                    }
                    applied.map_err(|e| {
                        sb_error(e, &format!("{} {key} on {}", action.label(), self.path))
                    })
                }
            }
        };
        if action.is_final() || result.is_err() {
            slot.unsettled.fetch_sub(1, Ordering::AcqRel);
        } else {
            lock(&self.inflight).insert(key, inflight);
        }
        result
    }
}

/// Accepts sessions of a session-enabled queue or subscription while fewer than
/// [`MAX_SESSIONS`] are held, on a connection of its own: accepting waits for the
/// service, and must not hold up the bus's other links (nor be cancelled halfway).
async fn accept_sessions(
    shared: Arc<Shared>,
    topic: String,
    subscription: String,
    slots: Arc<SyncMutex<Vec<Arc<Slot>>>>,
    closed: Arc<AtomicBool>,
    error: Arc<SyncMutex<Option<Error>>>,
) {
    let path = shared.path(&topic, &subscription);
    let mut client = match super::new_client(&shared.config, 0).await {
        Ok(c) => c,
        Err(e) => {
            *lock(&error) = Some(e);
            return;
        }
    };
    let queue = shared.config.entities == EntityKind::Queues;
    while !closed.load(Ordering::Acquire) {
        if lock(&slots).len() >= MAX_SESSIONS {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let options = ServiceBusSessionReceiverOptions::default();
        let accepted = if queue {
            client
                .accept_next_session_for_queue(topic.clone(), options)
                .await
        } else {
            client
                .accept_next_session_for_subscription(&topic, &subscription, options)
                .await
        };
        match accepted {
            Ok(receiver) => {
                let session = receiver.session_id().to_owned();
                let slot = Arc::new(Slot::new(Link::Session(receiver), Some(session)));
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
                        let _ = link.dispose().await;
                    }
                    break;
                }
            }
            Err(e) if connection_lost(&e) => {
                // The service closed the connection (maintenance, idle) or the network
                // dropped it: the held sessions fail on their next read; accepting
                // goes on over a new connection.
                tracing::debug!(error = %e, "the session acceptor's connection is gone");
                match super::new_client(&shared.config, 0).await {
                    Ok(fresh) => {
                        let old = std::mem::replace(&mut client, fresh);
                        let _ = old.dispose().await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reconnecting the session acceptor");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(e) => {
                let e = sb_error(e, &format!("accept a session of {path}"));
                let pause = match e.kind() {
                    ErrorKind::NotFound | ErrorKind::PermissionDenied => {
                        *lock(&error) = Some(e);
                        Duration::from_secs(1)
                    }
                    // No session has messages now (the service answers after its
                    // timeout, the emulators at once).
                    _ => Duration::from_millis(50),
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
    if let Err(e) = client.dispose().await {
        tracing::debug!(error = %e, "closing the session acceptor's connection");
    }
}

impl Drop for ServiceBusSubscription {
    /// A consumer dropped without `close` still detaches its links: an abandoned
    /// azservicebus link leaves the shared AMQP session unusable for the next one.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        let links: Vec<Link> = lock(&self.slots)
            .drain(..)
            .filter_map(|slot| slot.link.try_lock().ok().and_then(|mut l| l.take()))
            .collect();
        if links.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for link in links {
                    if let Err(e) = link.dispose().await {
                        tracing::debug!(error = %e, "closing a dropped Service Bus receiver");
                    }
                }
            });
        }
    }
}

#[async_trait]
impl SubscriptionDriver for ServiceBusSubscription {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        let until = Instant::now() + wait;
        let max = u32::try_from(max.max(1)).unwrap_or(u32::MAX);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::closed(format!(
                    "the consumer of {} is closed",
                    self.path
                )));
            }
            {
                let mut fetched = lock(&self.fetched);
                if !fetched.is_empty() {
                    let take = fetched.len().min(max as usize);
                    return Ok(fetched.drain(..take).collect());
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
            let reads = turn
                .take(max as usize)
                .enumerate()
                .map(|(i, slot)| async move {
                    let i = u32::try_from(i).unwrap_or(u32::MAX);
                    let share = max / count + u32::from(i < max % count);
                    let share = share.max(1);
                    let mut guard = if slot.session.is_some() {
                        // Another receive is reading this session.
                        slot.link.try_lock().ok()?
                    } else {
                        slot.link.lock().await
                    };
                    let link = guard.as_mut()?;
                    if let Err(e) = self.renew_session_if_due(slot, link).await {
                        return Some((slot, Err(e)));
                    }
                    Some((slot, link.receive(share, slice).await))
                });
            let mut out = Vec::new();
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
            for (slot, received) in done {
                match received {
                    Ok(messages) if !messages.is_empty() => {
                        *lock(&slot.idle_since) = None;
                        out.extend(self.accept(messages, slot).await);
                    }
                    Ok(_) => out.extend(self.release_idle(slot).await),
                    Err(e) => {
                        let e = sb_error(e, &format!("receive from {}", self.path));
                        if slot.session.is_none() {
                            return Err(e);
                        }
                        tracing::debug!(error = %e, "a Service Bus session ended");
                        self.release(slot, true).await;
                    }
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            if Instant::now() >= until {
                return Ok(Vec::new());
            }
        }
    }

    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let mut results = Vec::with_capacity(items.len());
        for (token, settlement) in items {
            results.push(self.settle_one(token, settlement).await);
        }
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    async fn close(&self) -> Result<()> {
        let slots: Vec<Arc<Slot>> = {
            let mut held = lock(&self.slots);
            self.closed.store(true, Ordering::Release);
            held.drain(..).collect()
        };
        let mut first_error = None;
        for slot in slots {
            let link = slot.link.lock().await.take();
            if let Some(link) = link
                && let Err(e) = link.dispose().await
                // Session links go down with the acceptor's connection anyway.
                && slot.session.is_none()
                && first_error.is_none()
            {
                first_error = Some(sb_error(e, &format!("close the receiver of {}", self.path)));
            }
        }
        lock(&self.inflight).clear();
        // The acceptor sees `closed` and closes its connection.
        lock(&self.acceptor).take();
        first_error.map_or(Ok(()), Err)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The dead-letter sub-queue of a queue or subscription.
pub struct ServiceBusDeadLetters {
    shared: Arc<Shared>,
    topic: String,
    subscription: String,
    path: String,
}

/// What a dead letter looks like, from a received or a peeked message.
fn dead_letter_of(
    message: &Message<Body<Value>>,
    source: &str,
    codec: &cloudbus_core::BinaryCodec,
) -> DeadLetter {
    let (mut raw, typed) = raw_of(message);
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
        attempts: message.header.as_ref().map_or(0, |h| h.delivery_count + 1),
        dead_lettered_at: None,
    }
}

/// Gives back integer and boolean extensions their types (binary mode carries them
/// as typed AMQP values; the codec reads text).
fn restore(event: &mut Event, typed: Vec<(String, ExtensionValue)>) {
    for (name, value) in typed {
        if event.extension(&name).is_some() {
            event.set_extension(&name, value);
        }
    }
}

impl ServiceBusDeadLetters {
    pub(crate) fn new(shared: Arc<Shared>, topic: &str, subscription: &str) -> Self {
        let path = shared.path(topic, subscription);
        ServiceBusDeadLetters {
            shared,
            topic: topic.to_owned(),
            subscription: subscription.to_owned(),
            path,
        }
    }

    async fn receiver(&self, mode: ServiceBusReceiveMode) -> Result<ServiceBusReceiver> {
        let options = ServiceBusReceiverOptions {
            receive_mode: mode,
            sub_queue: SubQueue::DeadLetter,
            ..Default::default()
        };
        let mut client = self.shared.client.lock().await;
        match self.shared.config.entities {
            EntityKind::Queues => {
                client
                    .create_receiver_for_queue(self.topic.clone(), options)
                    .await
            }
            EntityKind::Topics => {
                client
                    .create_receiver_for_subscription(&self.topic, &self.subscription, options)
                    .await
            }
        }
        .map_err(|e| sb_error(e, &format!("open the dead-letter queue of {}", self.path)))
    }

    /// Receives up to `max` dead letters from `receiver`, stopping at the first empty
    /// receive.
    async fn take(
        &self,
        receiver: &mut ServiceBusReceiver,
        max: usize,
    ) -> Result<Vec<ServiceBusReceivedMessage>> {
        let mut out = Vec::new();
        while out.len() < max {
            let want = u32::try_from((max - out.len()).min(100)).unwrap_or(100);
            let got = receiver
                .receive_messages_with_max_wait_time(want, Some(Duration::from_millis(500)))
                .await
                .map_err(|e| sb_error(e, &format!("receive dead letters of {}", self.path)))?;
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
    fn resend(
        &self,
        letter: &ServiceBusReceivedMessage,
    ) -> Result<azservicebus::ServiceBusMessage> {
        let raw = letter.raw_amqp_message();
        let mut message = azservicebus::ServiceBusMessage::new(body_bytes(raw));
        message.set_content_type(letter.content_type().map(str::to_owned));
        let mut props = ApplicationProperties::builder();
        if let Some(existing) = &raw.application_properties {
            for (k, v) in existing.0.iter() {
                if !DEAD_LETTER_PROPERTIES.contains(&k.as_str()) && k != REDRIVE_PROPERTY {
                    props = props.insert(k.clone(), v.clone());
                }
            }
        }
        if self.shared.config.entities == EntityKind::Topics {
            props = props.insert(REDRIVE_PROPERTY.to_owned(), self.subscription.clone());
        }
        *message.application_properties_mut() = Some(props.build());
        let original = letter
            .message_id()
            .map(|id| id.into_owned())
            .unwrap_or_default();
        let sequence = sequence_of(letter.raw_amqp_message()).unwrap_or_default();
        let id: String = format!("redrive-{sequence}-{original}")
            .chars()
            .take(128)
            .collect();
        message
            .set_message_id(id)
            .map_err(|e| Error::invalid(format!("redrive message id: {e}")))?;
        if let Some(session) = letter.session_id() {
            message
                .set_session_id(session.to_owned())
                .map_err(|e| Error::invalid(format!("redrive session id: {e}")))?;
        }
        Ok(message)
    }
}

#[async_trait]
impl DeadLetterDriver for ServiceBusDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let mut receiver = self.receiver(ServiceBusReceiveMode::PeekLock).await?;
        let mut out = Vec::new();
        let mut from = None;
        let result: Result<()> =
            async {
                while out.len() < max {
                    let want = u32::try_from((max - out.len()).min(100)).unwrap_or(100);
                    let peeked: Vec<ServiceBusPeekedMessage> = receiver
                        .peek_messages(want, from)
                        .await
                        .map_err(|e| sb_error(e, &format!("peek dead letters of {}", self.path)))?;
                    let Some(last) = peeked
                        .last()
                        .and_then(|p| sequence_of(p.raw_amqp_message()))
                    else {
                        break;
                    };
                    from = Some(last + 1);
                    out.extend(peeked.iter().map(|p| {
                        dead_letter_of(p.raw_amqp_message(), &self.path, &self.shared.codec)
                    }));
                }
                Ok(())
            }
            .await;
        if let Err(e) = receiver.dispose().await {
            tracing::debug!(error = %e, "closing a dead-letter receiver");
        }
        result.map(|()| out)
    }

    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let mut receiver = self.receiver(ServiceBusReceiveMode::PeekLock).await?;
        let mut sender = match self.shared.sender(&self.topic).await {
            Ok(s) => s,
            Err(e) => {
                let _ = receiver.dispose().await;
                return Err(e);
            }
        };
        let limit = max.unwrap_or(usize::MAX);
        let mut moved = 0;
        let result: Result<()> = async {
            while moved < limit {
                let letters = self.take(&mut receiver, (limit - moved).min(100)).await?;
                if letters.is_empty() {
                    break;
                }
                for letter in letters {
                    let message = self.resend(&letter)?;
                    sender
                        .send_message(message)
                        .await
                        .map_err(|e| sb_error(e, &format!("redrive to {}", self.topic)))?;
                    receiver.complete_message(&letter).await.map_err(|e| {
                        sb_error(e, &format!("complete a dead letter of {}", self.path))
                    })?;
                    moved += 1;
                }
            }
            Ok(())
        }
        .await;
        let _ = sender.dispose().await;
        let _ = receiver.dispose().await;
        result.map(|()| moved)
    }

    async fn purge(&self) -> Result<usize> {
        let mut receiver = self
            .receiver(ServiceBusReceiveMode::ReceiveAndDelete)
            .await?;
        let result = self
            .take(&mut receiver, usize::MAX)
            .await
            .map(|all| all.len());
        let _ = receiver.dispose().await;
        result
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
