//! The AMQP connection to a Service Bus namespace, on fe2o3-amqp: one connection and
//! one session, opened on first use and opened anew when the service (or the network)
//! ends them; CBS authorization of every entity a link is opened on (a SAS token
//! signed here, a SAS token given, or a Microsoft Entra ID bearer token from any
//! `azure_core` token credential), put again before it expires; the opening of
//! senders, receivers and `$management` clients with a time limit; and what closing a
//! link, or a send of a message a receiver makes itself, answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{CreditMode, Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{FilterSet, Source};
use fe2o3_amqp::types::primitives::{Timestamp, Value};
use fe2o3_amqp::{Connection, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::AttachError;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use tokio::sync::Mutex;

use cloudbus_driver::{Error, ErrorKind};

use super::config::{Access, LINK_TIMEOUT, ServiceBusConfig, TOKEN_SCOPE};
use super::error::{self, Failure, Scope};
use crate::auth::{Secret, service_bus_sas_token};

/// The filter that names the session a receiver is for (`null`: the next free one).
pub(crate) const SESSION_FILTER: &str = "com.microsoft:session-filter";
/// The descriptor code of the session filter.
const SESSION_FILTER_CODE: u64 = 0x0000_0013_7000_000c;
/// The link property that says until when a session is locked (.NET ticks).
pub(crate) const LOCKED_UNTIL_UTC: &str = "com.microsoft:locked-until-utc";
/// How long a SAS token signed here is valid.
const SAS_LIFETIME: Duration = Duration::from_secs(3600);
/// How often the renewer looks for tokens to put again.
const RENEW_TICK: Duration = Duration::from_secs(1);
/// How long the connection may be silent before it counts as lost (milliseconds).
const IDLE_TIMEOUT_MS: u32 = 30_000;
/// The AMQPS port of the service.
const AMQPS_PORT: u16 = 5671;

/// How a receiver takes messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReceiveMode {
    /// Locked until settled (complete, abandon, dead-letter, defer).
    PeekLock,
    /// Deleted as they are sent (purge).
    ReceiveAndDelete,
}

/// A CBS token and when to put it again.
struct Authorization {
    renew_at: SystemTime,
}

/// One open connection and its session.
pub(crate) struct Live {
    connection: Mutex<ConnectionHandle<()>>,
    session: Mutex<SessionHandle<()>>,
    cbs: Mutex<CbsClient>,
    authorized: SyncMutex<HashMap<String, Authorization>>,
    lost: AtomicBool,
}

/// The AMQP side of a namespace client.
pub(crate) struct Amqp {
    config: ServiceBusConfig,
    live: Mutex<Option<Arc<Live>>>,
    links: AtomicU64,
}

/// Locks a std mutex, taking it over from a holder that panicked (what it guards
/// stays consistent: maps of tokens and locks, updated in one step each).
pub(crate) fn lock<T>(m: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What closing a link answered. A close that fails leaves the link gone all the
/// same (its session or connection stopped, or the service detached it): nothing is
/// lost with it, since every send on it was answered before, and what it had
/// unsettled goes back when its locks lapse. So a failed close is logged, not
/// returned: a publisher whose events all went through must not fail its `close`
/// because the service closed the connection meanwhile.
pub(crate) fn link_closed(
    what: impl FnOnce() -> String,
    closed: std::result::Result<(), fe2o3_amqp::link::DetachError>,
) {
    if let Err(e) = closed {
        tracing::debug!(error = %e, "{}: the link was gone already", what());
    }
}

/// Whether the service took a message a receiver sent itself (a nacked deferred
/// message's copy, a redriven letter): anything but `Accepted` is `Unavailable`, and a
/// failed send marks its connection failed.
pub(crate) fn taken(
    amqp: &Amqp,
    live: &Live,
    sent: std::result::Result<fe2o3_amqp::types::messaging::Outcome, fe2o3_amqp::link::SendError>,
    what: &str,
) -> cloudbus_driver::Result<()> {
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

impl Amqp {
    pub(crate) fn new(config: ServiceBusConfig) -> Self {
        Amqp {
            config,
            live: Mutex::new(None),
            links: AtomicU64::new(0),
        }
    }

    /// The open connection, opened now when there is none or the last one was lost.
    pub(crate) async fn live(&self) -> Result<Arc<Live>, Failure> {
        let mut current = self.live.lock().await;
        if let Some(live) = current.as_ref()
            && !live.lost.load(Ordering::Acquire)
        {
            return Ok(live.clone());
        }
        if let Some(old) = current.take() {
            // Best effort: the peer or the network has ended it already.
            let mut connection = old.connection.lock().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), connection.close()).await;
        }
        let live = tokio::time::timeout(LINK_TIMEOUT, self.open())
            .await
            .map_err(|_| {
                let mut f = error::timed_out(
                    &format!("connecting to Service Bus at {}", self.config.namespace),
                    LINK_TIMEOUT,
                );
                f.scope = Scope::Connection;
                f
            })??;
        let live = Arc::new(live);
        tokio::spawn(renew_tokens(Arc::downgrade(&live), self.config.clone()));
        *current = Some(live.clone());
        Ok(live)
    }

    async fn open(&self) -> Result<Live, Failure> {
        let host = &self.config.namespace;
        let what = format!("connect to Service Bus at {host}");
        let url = if self.config.emulator {
            format!("amqp://{host}")
        } else {
            format!("amqps://{host}:{AMQPS_PORT}")
        };
        let url = url::Url::parse(&url).map_err(|e| Failure {
            error: Error::with_source(ErrorKind::InvalidArgument, format!("{what}: not a URL"), e),
            scope: Scope::Connection,
        })?;
        let hostname = url.host_str().unwrap_or_default().to_owned();
        let container = format!("cloudbus-{}", uuid::Uuid::new_v4().simple());
        let mut connection = Connection::builder()
            .container_id(container)
            .hostname(hostname.as_str())
            .sasl_profile(SaslProfile::Anonymous)
            // A connection that goes silent (a stalled network) is ended after this
            // instead of holding every send and receive on it; the peer keeps it alive
            // with empty frames at half this.
            .idle_time_out(IDLE_TIMEOUT_MS)
            .open(url)
            .await
            .map_err(|e| Failure {
                error: Error::with_source(ErrorKind::Unavailable, what.clone(), e),
                scope: Scope::Connection,
            })?;
        // A connection half set up is closed before the failure is returned.
        let unavailable = |step: &str, e: Box<dyn std::error::Error + Send + Sync>| Failure {
            error: Error::with_source(ErrorKind::Unavailable, format!("{what}: {step}"), e),
            scope: Scope::Connection,
        };
        let mut session = match Session::begin(&mut connection).await {
            Ok(s) => s,
            Err(e) => {
                let _ = connection.close().await;
                return Err(unavailable("begin a session", Box::new(e)));
            }
        };
        let cbs = match CbsClient::attach(&mut session).await {
            Ok(c) => c,
            Err(e) => {
                let _ = connection.close().await;
                return Err(unavailable("attach to $cbs", Box::new(e)));
            }
        };
        Ok(Live {
            connection: Mutex::new(connection),
            session: Mutex::new(session),
            cbs: Mutex::new(cbs),
            authorized: SyncMutex::new(HashMap::new()),
            lost: AtomicBool::new(false),
        })
    }

    /// Records that an operation failed: a lost connection is opened anew next time.
    pub(crate) fn failed(&self, live: &Live, f: &Failure) {
        if f.scope == Scope::Connection {
            live.lost.store(true, Ordering::Release);
        }
    }

    /// The audience of an entity: what a token is put for.
    fn audience(&self, path: &str) -> String {
        format!("sb://{}/{}", self.config.namespace, path)
    }

    /// Puts a token for `path` on the connection, unless one is there and valid.
    async fn authorize(&self, live: &Live, path: &str) -> Result<(), Failure> {
        let audience = self.audience(path);
        if lock(&live.authorized)
            .get(&audience)
            .is_some_and(|a| a.renew_at > SystemTime::now())
        {
            return Ok(());
        }
        put_token(live, &self.config, &audience).await
    }

    /// A unique link name on this client.
    fn link_name(&self, role: &str, path: &str) -> String {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        format!("cloudbus-{role}-{n}-{path}")
    }

    /// Runs `attach` on the session, authorized for `path`, within [`LINK_TIMEOUT`].
    /// When the connection turns out to be gone (the service closed it since its last
    /// use), it is opened anew and `attach` runs once more.
    async fn on_session<T, F>(
        &self,
        path: &str,
        what: &str,
        attach: impl Fn(Arc<Live>) -> F,
    ) -> Result<(Arc<Live>, T), Failure>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            let live = self.live().await?;
            let work = async {
                self.authorize(&live, path).await?;
                attach(live.clone()).await
            };
            let result = match tokio::time::timeout(LINK_TIMEOUT, work).await {
                Ok(result) => result,
                Err(_) => Err(error::timed_out(what, LINK_TIMEOUT)),
            };
            match result {
                Ok(t) => return Ok((live, t)),
                Err(f) => {
                    self.failed(&live, &f);
                    if f.scope != Scope::Connection || tries > 1 {
                        return Err(f);
                    }
                }
            }
        }
    }

    /// A sender to a queue or topic.
    pub(crate) async fn sender(&self, entity: &str) -> Result<(Arc<Live>, Sender), Failure> {
        let what = format!("open a sender for {entity}");
        let name = self.link_name("sender", entity);
        let target = self.audience(entity);
        self.on_session(entity, &what, |live| {
            let (name, target, what) = (name.clone(), target.clone(), what.clone());
            async move {
                let mut session = live.session.lock().await;
                Sender::builder()
                    .name(name)
                    .source(uuid::Uuid::new_v4().to_string())
                    .target(target)
                    .sender_settle_mode(SenderSettleMode::Unsettled)
                    .attach(&mut *session)
                    .await
                    .map_err(|e| error::from_sender_attach(e, &what))
            }
        })
        .await
    }

    /// A receiver of a queue, subscription or dead-letter queue, with manual credit.
    /// `session`: `None` for a plain entity, `Some(None)` for the next free session,
    /// `Some(Some(id))` for that session.
    pub(crate) async fn receiver(
        &self,
        path: &str,
        mode: ReceiveMode,
        session: Option<Option<String>>,
    ) -> Result<(Arc<Live>, Receiver), Failure> {
        let what = format!("open a receiver for {path}");
        let name = self.link_name("receiver", path);
        let address = self.audience(path);
        self.on_session(path, &what, |live| {
            let (name, address, what, session) =
                (name.clone(), address.clone(), what.clone(), session.clone());
            async move {
                let mut source = Source::builder().address(address);
                source = match session {
                    None => source.filter(FilterSet::new()),
                    Some(id) => source.add_to_filter(
                        SESSION_FILTER,
                        Some(Described {
                            descriptor: Descriptor::Code(SESSION_FILTER_CODE),
                            value: id.map_or(Value::Null, Value::String),
                        }),
                    ),
                };
                let mut builder = Receiver::builder()
                    .name(name)
                    .source(source.build())
                    .target(uuid::Uuid::new_v4().to_string())
                    .credit_mode(CreditMode::Manual);
                builder = match mode {
                    ReceiveMode::PeekLock => builder
                        .sender_settle_mode(SenderSettleMode::Unsettled)
                        .receiver_settle_mode(ReceiverSettleMode::Second),
                    ReceiveMode::ReceiveAndDelete => {
                        builder.sender_settle_mode(SenderSettleMode::Settled)
                    }
                };
                let mut session = live.session.lock().await;
                builder
                    .attach(&mut *session)
                    .await
                    .map_err(|e| error::from_receiver_attach(e, &what))
            }
        })
        .await
    }

    /// A request/response client of `<path>/$management`.
    pub(crate) async fn management(&self, path: &str) -> Result<(Arc<Live>, MgmtClient), Failure> {
        let what = format!("open the management link of {path}");
        let node = format!("{path}/$management");
        let client_node = self.link_name("management", path);
        self.on_session(path, &what, |live| {
            let (node, client_node, what) = (node.clone(), client_node.clone(), what.clone());
            async move {
                let mut session = live.session.lock().await;
                MgmtClient::builder()
                    .management_node_address(node)
                    .client_node_addr(client_node)
                    .attach(&mut *session)
                    .await
                    .map_err(|e| match e {
                        AttachError::Sender(e) => error::from_sender_attach(e, &what),
                        AttachError::Receiver(e) => error::from_receiver_attach(e, &what),
                    })
            }
        })
        .await
    }

    /// Closes the connection (links on it end with it).
    pub(crate) async fn close(&self) {
        if let Some(live) = self.live.lock().await.take() {
            live.lost.store(true, Ordering::Release);
            let mut connection = live.connection.lock().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.close()).await;
        }
    }
}

/// A token for `audience` and when it expires (`None`: unknown, a SAS token given).
async fn token_for(
    config: &ServiceBusConfig,
    audience: &str,
) -> Result<(Secret, &'static str, Option<SystemTime>), Failure> {
    const SAS: &str = "servicebus.windows.net:sastoken";
    match &config.access {
        Access::Key { name, key } => {
            let expires = SystemTime::now() + SAS_LIFETIME;
            let seconds = expires
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let token = service_bus_sas_token(
                audience,
                name,
                key,
                i64::try_from(seconds).unwrap_or(i64::MAX),
            )
            .map_err(|error| Failure {
                error,
                scope: Scope::Operation,
            })?;
            Ok((token, SAS, Some(expires)))
        }
        Access::SasToken(token) => Ok((token.clone(), SAS, None)),
        Access::Identity(credential) => {
            let token = credential
                .get_token(&[TOKEN_SCOPE], None)
                .await
                .map_err(|e| Failure {
                    error: Error::with_source(
                        ErrorKind::PermissionDenied,
                        format!("no token for {TOKEN_SCOPE} from the token credential"),
                        e,
                    ),
                    scope: Scope::Operation,
                })?;
            let expires = UNIX_EPOCH
                + Duration::from_secs(
                    u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0),
                );
            Ok((Secret::new(token.token.secret()), "jwt", Some(expires)))
        }
    }
}

/// Puts a token for `audience` on `live`'s `$cbs` node and records when to renew it
/// (at four fifths of its life).
async fn put_token(live: &Live, config: &ServiceBusConfig, audience: &str) -> Result<(), Failure> {
    let (token, kind, expires) = token_for(config, audience).await?;
    let now = SystemTime::now();
    let expires_at = expires.map(|at| {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Timestamp::from_milliseconds(ms)
    });
    let what = format!("authorize {audience}");
    let result = {
        let mut cbs = live.cbs.lock().await;
        cbs.put_token(
            audience.to_owned(),
            CbsToken::new(token.expose().to_owned(), kind, expires_at),
        )
        .await
    };
    result.map_err(|e| {
        let f = error::from_management(e, &what);
        if f.scope != Scope::Operation {
            live.lost.store(true, Ordering::Release);
        }
        f
    })?;
    let renew_at = match expires {
        Some(at) => now + at.duration_since(now).unwrap_or_default().mul_f64(0.8),
        // A SAS token given is used as it is until it expires.
        None => now + Duration::from_secs(365 * 24 * 3600),
    };
    lock(&live.authorized).insert(audience.to_owned(), Authorization { renew_at });
    Ok(())
}

/// Puts the tokens of `live` again before they expire, while it is open.
async fn renew_tokens(live: Weak<Live>, config: ServiceBusConfig) {
    loop {
        tokio::time::sleep(RENEW_TICK).await;
        let Some(live) = live.upgrade() else {
            return;
        };
        if live.lost.load(Ordering::Acquire) {
            return;
        }
        let now = SystemTime::now();
        let due: Vec<String> = lock(&live.authorized)
            .iter()
            .filter(|(_, a)| a.renew_at <= now)
            .map(|(audience, _)| audience.clone())
            .collect();
        for audience in due {
            if let Err(f) = put_token(&live, &config, &audience).await {
                tracing::warn!(error = %f.error, %audience, "renewing a Service Bus token");
            }
        }
    }
}

/// Until when a session receiver holds its session: the link property the service
/// sets on attach (.NET ticks, or a timestamp).
pub(crate) fn session_locked_until(receiver: &Receiver) -> Option<SystemTime> {
    /// .NET ticks (100 ns since 0001-01-01) at the Unix epoch.
    const EPOCH_TICKS: i64 = 621_355_968_000_000_000;
    receiver.properties(|properties| {
        let value = properties.as_ref()?.get(LOCKED_UNTIL_UTC)?;
        let ms = match value {
            Value::Timestamp(t) => t.milliseconds(),
            Value::Long(ticks) => (ticks - EPOCH_TICKS) / 10_000,
            Value::Ulong(ticks) => (i64::try_from(*ticks).ok()? - EPOCH_TICKS) / 10_000,
            _ => return None,
        };
        Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?))
    })
}

/// The session a session receiver holds: the session filter of the source the
/// service answered with.
pub(crate) fn session_of(receiver: &Receiver) -> Option<String> {
    let filter = receiver.source().as_ref()?.filter.as_ref()?;
    match filter.get(SESSION_FILTER)? {
        Value::Described(described) => match &described.value {
            Value::String(s) => Some(s.clone()),
            _ => None,
        },
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}
