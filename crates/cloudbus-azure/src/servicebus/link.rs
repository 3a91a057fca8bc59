//! Receiver links, what every receiver of a Service Bus entity is built on: an
//! fe2o3-amqp receiver with manual credit that grants credit for what a receive asks,
//! takes what arrives and drains the link when nothing came within its slice (so that
//! an idle consumer holds no locks), and dead-letters at once a delivery it cannot
//! decode; the [`Slot`] that holds a link with the count of its unsettled messages
//! (and, for a session, when its session lock is to be renewed and ends); the lease
//! of a message or session lock; and the rejection that dead-letters.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant, SystemTime};

use cloudbus_driver::{Error, ErrorKind};
use fe2o3_amqp::Receiver;
use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use tokio::sync::Mutex;

use super::config::{MAX_LOCK, MIN_LOCK};
use super::connection::{Live, lock};
use super::error::{self, Scope};

/// How long a receive waits for deliveries the service sent in answer to a drain.
const DRAIN_WAIT: Duration = Duration::from_millis(20);
/// The condition of a rejection that dead-letters.
const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";
/// The dead-letter reason of a delivery that cannot be decoded as an AMQP message (the
/// consumer's reason for an event that cannot be decoded starts the same way).
const UNDECODABLE_REASON: &str = "malformed: the AMQP message cannot be decoded";

/// A receiver link and what the service said on attach.
pub(crate) struct Link {
    pub(crate) receiver: Receiver,
    /// The connection it is on.
    pub(crate) live: Arc<Live>,
    /// Sessions: until when the session is locked.
    pub(crate) locked_until: Option<SystemTime>,
}

impl Link {
    /// Receives up to `max`, waiting up to `wait` for the first; drains the link when
    /// none came (what the drain brings is returned too).
    pub(crate) async fn receive(
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
pub(crate) struct Slot {
    pub(crate) link: Mutex<Option<Link>>,
    pub(crate) unsettled: AtomicUsize,
    pub(crate) session: Option<String>,
    /// Since when reads of this session found nothing.
    pub(crate) idle_since: SyncMutex<Option<Instant>>,
    /// Sessions: when the session lock is to be renewed.
    pub(crate) renew_at: SyncMutex<Option<Instant>>,
    /// Sessions: when the session lock ends, unless renewed.
    pub(crate) lock_ends: SyncMutex<Option<Instant>>,
}

impl Slot {
    /// A slot for `link`; `lock` is the entity's lock duration, when known.
    pub(crate) fn new(link: Link, session: Option<String>, lock: Option<Duration>) -> Self {
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
    pub(crate) fn renewed(&self, until: SystemTime, duration: Option<Duration>) {
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
pub(crate) fn lease_of(by_clock: Option<Duration>, lock: Option<Duration>) -> Duration {
    match lock {
        Some(lock) => by_clock
            .filter(|d| *d >= lock / 2)
            .map_or(lock, |d| d.min(lock)),
        None => by_clock
            .filter(|d| *d >= MIN_LOCK / 2)
            .map_or(MIN_LOCK, |d| d.min(MAX_LOCK)),
    }
}

/// The rejection that dead-letters, with the reason and description as the service
/// reads them.
pub(crate) fn dead_letter_error(reason: &str, description: &str) -> definitions::Error {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn dead_letters_are_rejections_with_the_service_condition() {
        let e = dead_letter_error("r", "d");
        assert_eq!(
            super::super::error::condition_symbol(&e.condition),
            DEAD_LETTER_CONDITION
        );
    }
}
