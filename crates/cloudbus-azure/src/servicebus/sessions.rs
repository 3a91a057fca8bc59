//! Session-enabled queues and subscriptions (`?sessions=true`): a session's messages
//! are read only through a receiver link that holds the session, and are locked by the
//! session lock. A task per consumer accepts sessions while it holds fewer than
//! [`MAX_SESSIONS`], on a connection of its own; a held session's lock is renewed at
//! half its life while every unsettled message of it is within its lease (extending a
//! message renews it too). A message left past its lease lets the session lock run
//! out, and the service gives the session (and the message) to the next reader, as a
//! lapsed message lock would. A session idle for [`SESSION_IDLE`] with nothing
//! unsettled is let go; after `close`, a session with unsettled messages stays open
//! (without credit) until they are settled or its lock is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant, SystemTime};

use cloudbus_driver::{Error, ErrorKind, Result};
use fe2o3_amqp::types::primitives::Value;

use super::connection::{Amqp, ReceiveMode, link_closed, lock, session_locked_until, session_of};
use super::context::ServiceBusContext;
use super::link::{Link, Slot};
use super::management::{self, Management, RenewSessionLock};

/// How long a session must find nothing before it is let go.
pub const SESSION_IDLE: Duration = Duration::from_millis(500);
/// How long a receive waits for the session acceptor when it holds none.
pub const SESSION_SLICE: Duration = Duration::from_millis(30);
/// Most sessions one subscription driver holds at once.
pub const MAX_SESSIONS: usize = 32;
/// How often the session acceptor looks at the sessions kept open after `close`.
const LINGER_TICK: Duration = Duration::from_millis(50);

/// Lets a session go once it has been idle for [`SESSION_IDLE`] with nothing of it
/// unsettled; `slots` are the links its consumer holds.
pub(crate) async fn release_idle(slots: &SyncMutex<Vec<Arc<Slot>>>, slot: &Arc<Slot>) {
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
    release(slots, slot).await;
}

/// Renews a held session's lock (through `management`, the entity's `$management`
/// client) when it is due, unless a message of it is past its lease: `leases_hold(now)`
/// answers whether every unsettled message of the session is within its lease (if not,
/// the lock runs out, and the service gives the message to the next reader).
/// `duration`: the entity's lock duration, when known.
pub(crate) async fn renew_if_due(
    management: &Management,
    slot: &Slot,
    duration: Option<Duration>,
    leases_hold: impl FnOnce(Instant) -> bool,
) -> Result<()> {
    let Some(session) = &slot.session else {
        return Ok(());
    };
    let now = Instant::now();
    let due = lock(&slot.renew_at).is_some_and(|at| at <= now);
    if due && leases_hold(now) {
        let until = renew_session_lock(management, session).await?;
        slot.renewed(until, duration);
    }
    Ok(())
}

/// Renews the lock of a session; returns until when it holds.
pub(crate) async fn renew_session_lock(
    management: &Management,
    session: &str,
) -> Result<SystemTime> {
    let response = management
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
/// it still locked) and it leaves `slots`.
pub(crate) async fn release(slots: &SyncMutex<Vec<Arc<Slot>>>, slot: &Arc<Slot>) {
    if slot.session.is_none() {
        return;
    }
    let link = slot.link.lock().await.take();
    lock(slots).retain(|s| !Arc::ptr_eq(s, slot));
    if let Some(link) = link
        && let Err(e) = link.receiver.close().await
    {
        tracing::debug!(error = %e, "closing a drained Service Bus session");
    }
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
pub(crate) async fn accept_sessions(
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
