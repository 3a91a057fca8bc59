//! Publishing to a Service Bus topic or queue: events encoded as AMQP messages,
//! filled into batched-format transfers up to the link's max-message-size, one
//! transfer in flight while the next is encoded, each outcome classified.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_driver::driver::{BatchResults, OutgoingMessage, Payload, TopicDriver};
use cloudbus_driver::{Capabilities, Error, ErrorKind, Result};
use fe2o3_amqp::Sender;
use fe2o3_amqp::types::messaging::{Data, Message, Outcome};
use fe2o3_amqp::types::primitives::SimpleValue;
use tokio::sync::Mutex;

use super::config::MAX_TRANSFER_BYTES;
use super::connection::{Live, link_closed};
use super::context::ServiceBusContext;
use super::error;
use super::message::{self, TransferMessage};

/// Sends to one queue or topic.
pub struct ServiceBusTopic {
    shared: Arc<ServiceBusContext>,
    entity: String,
    sender: Mutex<Option<(Arc<Live>, Sender)>>,
    closed: AtomicBool,
}

impl ServiceBusTopic {
    /// A publisher of `entity`; its link opens on the first send.
    pub(crate) fn new(shared: Arc<ServiceBusContext>, entity: &str) -> Self {
        ServiceBusTopic {
            shared,
            entity: entity.to_owned(),
            sender: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }
}

/// The longest one transfer may wait for the service's outcome.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl ServiceBusTopic {
    /// The AMQP message of one outgoing event.
    fn message(&self, m: &OutgoingMessage) -> Result<Message<Data>> {
        let shared = &self.shared;
        let (raw, typed) = match &m.payload {
            Payload::Event(event) => {
                let (raw, mode) = shared.codec.encode(event)?;
                let typed: Vec<(String, SimpleValue)> =
                    if mode == cloudbus_driver::codec::Mode::Binary {
                        message::typed_extensions(event, shared.config.prefix)
                    } else {
                        Vec::new()
                    };
                (raw, typed)
            }
            Payload::Raw(raw) => (raw.clone(), Vec::new()),
        };
        message::outgoing(raw, &typed, m, shared.config.sessions)
    }

    /// Sends one filled transfer (nothing when it is empty) and records its messages'
    /// results; after a lost link, fails them without trying.
    async fn send_transfer(
        &self,
        live: &Live,
        sender: &mut Sender,
        messages: Vec<(usize, Message<Data>, Vec<u8>)>,
        results: &mut BatchResults,
        outcome: &mut SendOutcome,
    ) {
        if messages.is_empty() {
            return;
        }
        let members: Vec<usize> = messages.iter().map(|(i, _, _)| *i).collect();
        let failure = match &outcome.link_lost {
            Some(e) => e.clone(),
            None => {
                let transfer =
                    message::transfer(messages.into_iter().map(|(_, m, b)| (m, b)).collect());
                let Some(transfer) = transfer else {
                    return;
                };
                match self.transfer(live, sender, transfer).await {
                    Ok(()) => {
                        outcome.sent_any = true;
                        return;
                    }
                    Err(f) => {
                        if f.scope != error::Scope::Operation {
                            outcome.link_lost = Some(f.error.clone());
                        }
                        f.error
                    }
                }
            }
        };
        outcome.failed += members.len();
        for i in members {
            results[i] = Err(failure.clone());
        }
    }

    /// Sends one transfer and waits for the service's outcome.
    async fn transfer(
        &self,
        live: &Live,
        sender: &mut Sender,
        transfer: TransferMessage,
    ) -> std::result::Result<(), error::Failure> {
        let what = format!("send to {}", self.entity);
        let sent = match transfer {
            TransferMessage::Single(m) => tokio::time::timeout(SEND_TIMEOUT, sender.send(m)).await,
            TransferMessage::Batch(b) => tokio::time::timeout(SEND_TIMEOUT, sender.send(b)).await,
        };
        let failure = match sent {
            Ok(Ok(Outcome::Accepted(_))) => return Ok(()),
            Ok(Ok(Outcome::Rejected(rejected))) => match rejected.error {
                Some(e) => {
                    let symbol = error::condition_symbol(&e.condition);
                    error::Failure {
                        error: Error::new(
                            error::kind_of_condition(&symbol),
                            format!(
                                "{what}: rejected: {symbol}: {}",
                                e.description.unwrap_or_default()
                            ),
                        ),
                        scope: error::Scope::Operation,
                    }
                }
                None => error::Failure {
                    error: Error::new(ErrorKind::Internal, format!("{what}: rejected")),
                    scope: error::Scope::Operation,
                },
            },
            Ok(Ok(other)) => error::Failure {
                error: Error::new(
                    ErrorKind::Unavailable,
                    format!("{what}: the service did not take it ({other:?})"),
                ),
                scope: error::Scope::Operation,
            },
            Ok(Err(e)) => error::from_send(e, &what),
            Err(_) => error::timed_out(&what, SEND_TIMEOUT),
        };
        self.shared.amqp.failed(live, &failure);
        Err(failure)
    }
}

/// How many messages are encoded between yields to the runtime (about a millisecond).
const ENCODE_SLICE: usize = 16;

/// Encodes the messages of one `send_batch` into transfers, one transfer at a time.
struct TransferEncoder {
    fill: message::TransferFill,
    /// The index of the next message to encode.
    next: usize,
    /// An encoded message that starts the next transfer.
    carried: Option<(usize, Message<Data>, Vec<u8>)>,
    /// Messages that could not be encoded, or are too large, with why.
    failed: Vec<(usize, Error)>,
}

impl TransferEncoder {
    fn new(max_bytes: usize) -> Self {
        TransferEncoder {
            fill: message::TransferFill::new(max_bytes),
            next: 0,
            carried: None,
            failed: Vec::new(),
        }
    }

    /// The messages of the next transfer (none when the batch is done).
    ///
    /// It yields every [`ENCODE_SLICE`] messages: the transfer in flight was handed to
    /// fe2o3's session task, which tokio may have queued in this thread's LIFO slot
    /// (no other worker steals from it); yielding lets that task put the transfer on
    /// the wire while this one encodes. (Not measured apart: the bench showed no
    /// difference either way within its noise.)
    async fn next_transfer(
        &mut self,
        topic: &ServiceBusTopic,
        batch: &[OutgoingMessage],
    ) -> Vec<(usize, Message<Data>, Vec<u8>)> {
        let mut transfer: Vec<_> = self.carried.take().into_iter().collect();
        while let Some(m) = batch.get(self.next) {
            let i = self.next;
            self.next += 1;
            if i % ENCODE_SLICE == ENCODE_SLICE - 1 {
                tokio::task::yield_now().await;
            }
            let encoded = topic.message(m).and_then(|msg| {
                let bytes = message::encoded(&msg)?;
                Ok((msg, bytes))
            });
            let (msg, bytes) = match encoded {
                Ok(encoded) => encoded,
                Err(e) => {
                    self.failed.push((i, e));
                    continue;
                }
            };
            match self.fill.place(bytes.len()) {
                message::Placement::TooLarge => {
                    let error = Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "event {} is {} bytes as AMQP, more than the {} a Service Bus \
                             message may have",
                            m.id(),
                            bytes.len(),
                            self.fill.max_bytes()
                        ),
                    );
                    self.failed.push((i, error));
                }
                message::Placement::StartNew if !transfer.is_empty() => {
                    self.carried = Some((i, msg, bytes));
                    return transfer;
                }
                message::Placement::StartNew | message::Placement::Append => {
                    transfer.push((i, msg, bytes));
                }
            }
        }
        transfer
    }
}

/// How the transfers of one `send_batch` went.
#[derive(Default)]
struct SendOutcome {
    /// The link was lost: later transfers of the batch are not tried.
    link_lost: Option<Error>,
    sent_any: bool,
    /// Messages whose transfer failed (or was not tried after a lost link).
    failed: usize,
}

impl Drop for ServiceBusTopic {
    /// A publisher dropped without `close` still closes its link.
    fn drop(&mut self) {
        let Some((_, sender)) = self.sender.get_mut().take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = sender.close().await {
                    tracing::debug!(error = %e, "closing a dropped Service Bus sender");
                }
            });
        }
    }
}

#[async_trait]
impl TopicDriver for ServiceBusTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "the publisher of {} is closed",
                self.entity
            )));
        }
        let mut results: BatchResults = (0..batch.len()).map(|_| Ok(())).collect();
        let mut guard = self.sender.lock().await;
        let (live, sender) = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(self.shared.sender(&self.entity).await?),
        };
        let max_bytes = sender
            .max_message_size()
            .filter(|m| *m > 0)
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(MAX_TRANSFER_BYTES);
        // Each message is encoded as its transfer fills (a malformed event fails
        // alone); the next transfer is filled while the one before is in flight, so
        // that the encoding overlaps the service's work rather than adding to it. One
        // transfer at a time is in flight, so the order of the batch is kept.
        let mut encoder = TransferEncoder::new(max_bytes);
        let mut outcome = SendOutcome::default();
        let mut current = encoder.next_transfer(self, batch).await;
        while !current.is_empty() {
            let send = self.send_transfer(live, sender, current, &mut results, &mut outcome);
            let fill = encoder.next_transfer(self, batch);
            let ((), following) = futures::join!(send, fill);
            current = following;
        }
        for (i, e) in encoder.failed {
            results[i] = Err(e);
        }
        let SendOutcome {
            link_lost,
            sent_any,
            failed,
        } = outcome;
        if link_lost.is_some() {
            // The next batch opens a new link (and a new connection when it was lost).
            if let Some((_, sender)) = guard.take() {
                tokio::spawn(async move {
                    let _ = sender.close().await;
                });
            }
        }
        if !sent_any
            && failed == batch.len()
            && let Some(Err(e)) = results.iter().find(|r| r.is_err())
        {
            return Err(e.clone());
        }
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some((_, sender)) = self.sender.lock().await.take() {
            link_closed(
                || format!("close the sender of {}", self.entity),
                sender.close().await,
            );
        }
        Ok(())
    }
}
