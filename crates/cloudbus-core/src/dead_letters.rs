//! The portable view of a dead-letter place: peek, redrive to the source, purge; and
//! [`TopicDeadLetters`], the dead-letter place cloudbus keeps on an ordinary topic and
//! subscription for providers that have none.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::publisher::Publisher;
use cloudbus_driver::driver::{
    DeadLetter, DeadLetterDriver, Payload, ReceivedMessage, Settlement, SubscriptionDriver,
};
use cloudbus_driver::error::Result;
use cloudbus_driver::event::{AttributesReader, EXT_DEAD_LETTER_REASON, EventExt};

/// A dead-letter place (a DLQ, a `$DeadLetterQueue`, a dead-letter topic, or the one
/// cloudbus keeps where the cloud has none).
///
/// ```
/// # async fn demo(dlq: cloudbus_core::DeadLetters) -> cloudbus_core::Result<()> {
/// for letter in dlq.peek(10).await? {
///     println!("{:?}: {}", letter.reason, cloudbus_core::describe_payload(&letter.payload));
/// }
/// let moved = dlq.redrive_all().await?;
/// # let _ = moved; Ok(()) }
/// ```
#[derive(Clone)]
pub struct DeadLetters {
    driver: Arc<dyn DeadLetterDriver>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// Wraps a driver.
    pub fn new(driver: Arc<dyn DeadLetterDriver>) -> Self {
        DeadLetters { driver }
    }
    /// Up to `max` dead letters, oldest first, without removing them.
    pub async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        self.driver.peek(max).await
    }
    /// Moves up to `max` dead letters back to their source.
    pub async fn redrive(&self, max: usize) -> Result<usize> {
        let n = self.driver.redrive(Some(max)).await?;
        tracing::info!(redriven = n, "dead letters redriven");
        Ok(n)
    }
    /// Moves all dead letters back to their source.
    pub async fn redrive_all(&self) -> Result<usize> {
        let n = self.driver.redrive(None).await?;
        tracing::info!(redriven = n, "dead letters redriven");
        Ok(n)
    }
    /// Deletes all dead letters; returns how many.
    pub async fn purge(&self) -> Result<usize> {
        let n = self.driver.purge(None).await?;
        tracing::info!(purged = n, "dead letters purged");
        Ok(n)
    }
    /// Deletes up to `max` dead letters, oldest first; returns how many (fewer than
    /// `max` when the place ran empty). A caller purging a large place step by step
    /// (to show progress, or to stay within a time limit) calls it until it returns
    /// less than it asked for.
    ///
    /// ```
    /// # async fn demo(dlq: cloudbus_core::DeadLetters) -> cloudbus_core::Result<()> {
    /// let mut purged = 0;
    /// loop {
    ///     let n = dlq.purge_up_to(100).await?;
    ///     purged += n;
    ///     println!("{purged} purged");
    ///     if n < 100 {
    ///         break;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn purge_up_to(&self, max: usize) -> Result<usize> {
        let n = self.driver.purge(Some(max)).await?;
        tracing::info!(purged = n, "dead letters purged");
        Ok(n)
    }
    /// The driver, for escape hatches.
    pub fn driver(&self) -> &Arc<dyn DeadLetterDriver> {
        &self.driver
    }
}

/// The dead-letter place cloudbus keeps where a provider has none: events dead-lettered
/// through [`Consumer::dead_letter_to`](crate::Consumer::dead_letter_to) are published
/// to a topic with a `deadletterreason` extension (raw messages with that attribute);
/// this reads them back through a subscription of that topic and redrives them to the
/// source topic.
///
/// `peek` receives and releases (nack) what it shows, so it counts as a delivery
/// attempt on the dead-letter subscription.
///
/// ```
/// # async fn demo(bus: cloudbus_core::Bus) -> cloudbus_core::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::{DeadLetters, TopicDeadLetters};
/// let dlq = DeadLetters::new(Arc::new(TopicDeadLetters::new(
///     bus.driver().subscription("orders-dlq", "inspect").await?,
///     bus.publisher("orders").await?,
/// )));
/// dlq.redrive_all().await?;
/// # Ok(()) }
/// ```
pub struct TopicDeadLetters {
    dead_letters: Arc<dyn SubscriptionDriver>,
    source: Publisher,
    wait: Duration,
}

impl TopicDeadLetters {
    /// Reads dead letters through `dead_letters` and redrives them to `source`.
    pub fn new(dead_letters: Arc<dyn SubscriptionDriver>, source: Publisher) -> Self {
        TopicDeadLetters {
            dead_letters,
            source,
            wait: Duration::from_millis(500),
        }
    }

    /// How long one read waits for dead letters (default 500 ms).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    async fn take(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let mut out = Vec::new();
        while out.len() < max {
            let batch = self
                .dead_letters
                .receive_batch((max - out.len()).min(100), self.wait)
                .await?;
            if batch.is_empty() {
                break;
            }
            out.extend(batch);
        }
        Ok(out)
    }

    async fn settle_all(&self, msgs: &[ReceivedMessage], settlement: Settlement) -> Result<()> {
        let items: Vec<_> = msgs
            .iter()
            .map(|m| (m.token.clone(), settlement.clone()))
            .collect();
        for chunk in items.chunks(100) {
            for r in self.dead_letters.settle_batch(chunk).await? {
                r?;
            }
        }
        Ok(())
    }
}

/// What a redrive knows a letter by: its event's source and id (the CloudEvents
/// identity), or the digest of the bytes of a message that is not an event.
fn identity(m: &ReceivedMessage) -> String {
    match &m.event {
        Ok(e) => format!("{}\u{0}{}", e.source(), e.id()),
        Err((raw, _)) => cloudbus_driver::hashing::hex_sha256(&[&raw.body]),
    }
}

fn to_dead_letter(m: &ReceivedMessage) -> DeadLetter {
    let (payload, reason) = match &m.event {
        Ok(e) => (
            Payload::Event(e.clone()),
            e.extension_str(EXT_DEAD_LETTER_REASON).map(str::to_owned),
        ),
        Err((raw, _)) => (
            Payload::Raw(raw.clone()),
            raw.attributes.get(EXT_DEAD_LETTER_REASON).cloned(),
        ),
    };
    DeadLetter {
        payload,
        reason,
        description: None,
        source_entity: None,
        attempts: m.attempt,
        dead_lettered_at: m.published_at,
    }
}

#[async_trait]
impl DeadLetterDriver for TopicDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let msgs = self.take(max).await?;
        let letters = msgs.iter().map(to_dead_letter).collect();
        self.settle_all(
            &msgs,
            Settlement::Nack {
                delay: Duration::ZERO,
            },
        )
        .await?;
        Ok(letters)
    }

    /// Reads the dead-letter topic and publishes each letter back to its source. A
    /// letter this redrive has already sent back (the same event, or the same bytes)
    /// was dead-lettered again: it is released, stays a dead letter, and the redrive
    /// ends, where reading until the topic is empty would go round for ever.
    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let mut moved = 0;
        let limit = max.unwrap_or(usize::MAX);
        let mut sent = std::collections::HashSet::new();
        while moved < limit {
            let msgs = self.take((limit - moved).min(100)).await?;
            if msgs.is_empty() {
                break;
            }
            let (back, msgs): (Vec<_>, Vec<_>) = msgs
                .into_iter()
                .map(|m| (identity(&m), m))
                .partition(|(id, _)| sent.contains(id));
            let back: Vec<ReceivedMessage> = back.into_iter().map(|(_, m)| m).collect();
            for (id, m) in msgs {
                // Publish first, then ack: a crash in between duplicates, never loses.
                match &m.event {
                    Ok(e) => {
                        let mut event = (**e).clone();
                        event.remove_extension(EXT_DEAD_LETTER_REASON);
                        self.source.publish(event).await?;
                    }
                    Err((raw, _)) => {
                        let mut raw = raw.clone();
                        raw.attributes.remove(EXT_DEAD_LETTER_REASON);
                        self.source.publish_raw(raw).await?;
                    }
                }
                self.settle_all(std::slice::from_ref(&m), Settlement::Ack)
                    .await?;
                sent.insert(id);
                moved += 1;
            }
            if !back.is_empty() {
                tracing::warn!(
                    letters = back.len(),
                    "dead letters redriven in this run came back dead-lettered; they stay"
                );
                self.settle_all(
                    &back,
                    Settlement::Nack {
                        delay: Duration::ZERO,
                    },
                )
                .await?;
                break;
            }
        }
        Ok(moved)
    }

    async fn purge(&self, max: Option<usize>) -> Result<usize> {
        let max = max.unwrap_or(usize::MAX);
        let mut purged = 0;
        loop {
            let msgs = self.take((max - purged).min(100)).await?;
            if msgs.is_empty() {
                return Ok(purged);
            }
            self.settle_all(&msgs, Settlement::Ack).await?;
            purged += msgs.len();
        }
    }
}
