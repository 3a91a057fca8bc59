//! The dead-letter sub-queue (`<entity>/$DeadLetterQueue`) of a queue or
//! subscription as a `DeadLetterDriver`: peek through the `$management` node, page by
//! page, without taking anything; redrive by receiving each letter in peek-lock mode,
//! sending it back to its topic or queue as a new message (on a topic, for its one
//! subscription only) and completing it once the service took the copy; purge by
//! receiving and deleting, one page in memory at a time. A letter carries its
//! `DeadLetterReason` and `DeadLetterErrorDescription`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_driver::codec::BinaryCodec;
use cloudbus_driver::driver::{DeadLetter, DeadLetterDriver, Payload};
use cloudbus_driver::{Error, ErrorKind, Result};
use fe2o3_amqp::types::messaging::{Body, Data, Message};
use fe2o3_amqp::types::primitives::Value;

use super::config::{EntityKind, REDRIVE_PROPERTY};
use super::connection::{ReceiveMode, taken};
use super::context::ServiceBusContext;
use super::link::Link;
use super::management::{self, PeekMessage};
use super::message::{
    AmqpMessage, DEAD_LETTER_PROPERTIES, message_id_of, raw_of, resend_copy, restore, sequence_of,
};

/// How many dead letters one page holds.
const DEAD_LETTER_PAGE: usize = 100;

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
    codec: &BinaryCodec,
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
}
