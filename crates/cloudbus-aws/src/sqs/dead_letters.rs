//! The dead-letter queue of a queue: peek (reasons and attempts), redrive (SQS's
//! message move task, or moving message by message where it is unavailable) and purge.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use chrono::{DateTime, Utc};
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::{DeadLetter, DeadLetterDriver, Error, ErrorKind, Payload, Result};

use super::context::SqsContext;
use super::error::kind_of_code;
use super::limits::MAX_BATCH_COUNT;
use super::wire::{DL_DESCRIPTION, DL_REASON, Stored, codec, sent_at, stored, unwrap_envelope};

/// The dead-letter queue of a queue.
///
/// Redriving everything starts an SQS message move task (StartMessageMoveTask from
/// the dead-letter queue to its source, followed with ListMessageMoveTasks until it
/// ends). Where the endpoint has no move tasks, or the task fails, and for a partial
/// redrive (`redrive(Some(n))`), each letter is sent back to the source queue and then
/// deleted: a crash in between gives a duplicate, never a loss.
pub struct SqsDeadLetters {
    pub(crate) shared: Arc<SqsContext>,
    pub(crate) source: String,
    pub(crate) queue: String,
}

/// How a message move task ended.
pub(crate) enum MoveTask {
    /// The endpoint could not start one (no such operation, not a dead-letter queue).
    NotStarted(Error),
    Completed(usize),
    Failed {
        moved: usize,
        reason: String,
    },
}

/// How long a redrive follows a running move task before giving up on it.
pub(crate) const MOVE_TASK_PATIENCE: Duration = Duration::from_secs(15 * 60);

impl SqsDeadLetters {
    /// Moves every letter back to the source with an SQS message move task and
    /// waits for it to end.
    async fn move_task(&self, dlq_url: &str) -> Result<MoveTask> {
        let source_url = self.shared.url(&self.source).await?;
        let dlq_arn = self.shared.queue_arn(dlq_url, &self.queue).await?;
        let source_arn = self.shared.queue_arn(&source_url, &self.source).await?;
        let started = match self
            .shared
            .client
            .start_message_move_task()
            .source_arn(&dlq_arn)
            .destination_arn(&source_arn)
            .send()
            .await
        {
            Ok(s) => s,
            Err(e) => {
                return Ok(MoveTask::NotStarted(crate::error::sdk_error(
                    e,
                    kind_of_code,
                    &format!("move task on {}", self.queue),
                )));
            }
        };
        let handle = started.task_handle().unwrap_or_default().to_owned();
        let until = tokio::time::Instant::now() + MOVE_TASK_PATIENCE;
        let mut pause = Duration::from_millis(100);
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            let out = self
                .shared
                .client
                .list_message_move_tasks()
                .source_arn(&dlq_arn)
                .max_results(1)
                .send()
                .await
                .map_err(|e| {
                    crate::error::sdk_error(
                        e,
                        kind_of_code,
                        &format!("move tasks of {}", self.queue),
                    )
                })?;
            // The newest task comes first; a running one names its handle. An empty
            // list (the service has not listed the new task yet) is waited out within
            // the same deadline as a running task: it must not loop for ever.
            let Some(task) = out.results().first() else {
                if tokio::time::Instant::now() > until {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the move task {handle} from {} was never listed within {:?}",
                            self.queue, MOVE_TASK_PATIENCE
                        ),
                    ));
                }
                continue;
            };
            let moved = task.approximate_number_of_messages_moved().max(0) as usize;
            match task.status() {
                Some("COMPLETED") => return Ok(MoveTask::Completed(moved)),
                Some("FAILED") | Some("CANCELLED") => {
                    return Ok(MoveTask::Failed {
                        moved,
                        reason: task.failure_reason().unwrap_or("cancelled").to_owned(),
                    });
                }
                _ if tokio::time::Instant::now() > until => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the move task {handle} from {} was still running after {:?}",
                            self.queue, MOVE_TASK_PATIENCE
                        ),
                    ));
                }
                _ => {}
            }
        }
    }

    /// One receive of up to `want` (at most 10) letters, hidden for `hide`.
    async fn receive_page(
        &self,
        url: &str,
        want: usize,
        hide: Duration,
        wait_seconds: i32,
    ) -> Result<Vec<Letter>> {
        let r = self
            .shared
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(want.clamp(1, MAX_BATCH_COUNT) as i32)
            .wait_time_seconds(wait_seconds)
            .visibility_timeout(hide.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("receive from {}", self.queue))
            })?;
        Ok(r.messages()
            .iter()
            .filter_map(|m| {
                Some(Letter {
                    receipt: m.receipt_handle()?.to_owned(),
                    stored: stored(m),
                    at: sent_at(m),
                })
            })
            .collect())
    }

    /// Receives letters without hiding them until `max` or until a receive brings
    /// nothing new (peek: the caller's `max` bounds what is held).
    async fn collect(&self, max: usize) -> Result<Vec<Letter>> {
        let url = self.shared.url(&self.queue).await?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut idle_rounds = 0;
        while out.len() < max && idle_rounds < 2 {
            let wait = if out.is_empty() { 1 } else { 0 };
            let page = self
                .receive_page(&url, max - out.len(), Duration::ZERO, wait)
                .await?;
            let before = out.len();
            out.extend(
                page.into_iter()
                    .filter(|l| seen.insert(l.stored.message_id.clone())),
            );
            idle_rounds = if out.len() == before {
                idle_rounds + 1
            } else {
                0
            };
        }
        Ok(out)
    }

    /// Takes letters one page (at most 10) at a time, hidden for a minute, and hands
    /// each to `take`, which removes it from the queue, until `max` or until two
    /// receives in a row bring nothing: purge and redrive hold one page, never the
    /// whole dead-letter queue.
    async fn drain<F, Fut>(&self, max: usize, mut take: F) -> Result<usize>
    where
        F: FnMut(Letter) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let url = self.shared.url(&self.queue).await?;
        let mut taken = 0;
        let mut idle_rounds = 0;
        while taken < max && idle_rounds < 2 {
            let wait = if taken == 0 { 1 } else { 0 };
            let page = self
                .receive_page(&url, max - taken, DRAIN_HIDE, wait)
                .await?;
            idle_rounds = if page.is_empty() { idle_rounds + 1 } else { 0 };
            for letter in page {
                take(letter).await?;
                taken += 1;
            }
        }
        Ok(taken)
    }
}

/// A received dead letter: its receipt, the message, and when it was sent.
pub(crate) struct Letter {
    receipt: String,
    stored: Stored,
    at: Option<DateTime<Utc>>,
}

/// How long purge and redrive hide a page of letters while they remove it.
pub(crate) const DRAIN_HIDE: Duration = Duration::from_secs(60);

#[async_trait]
impl DeadLetterDriver for SqsDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let codec = codec();
        let source_max = match self.shared.url(&self.source).await {
            Ok(u) => self
                .shared
                .attribute(&u, QueueAttributeName::RedrivePolicy)
                .await
                .ok()
                .flatten()
                .and_then(|p| serde_json_max(&p)),
            Err(_) => None,
        };
        Ok(self
            .collect(max)
            .await?
            .into_iter()
            .map(|Letter { stored: s, at, .. }| {
                let raw = unwrap_envelope(RawMessage {
                    body: s.body.clone().into_bytes(),
                    attributes: s
                        .attributes
                        .iter()
                        .filter(|(k, _)| !k.starts_with("cloudbus-dl-"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                });
                let reason = s.attributes.get(DL_REASON).cloned().or_else(|| {
                    source_max.map(|n| format!("max delivery attempts ({n}) exceeded"))
                });
                DeadLetter {
                    payload: match codec.decode(&raw) {
                        Ok(e) => Payload::Event(Arc::new(e)),
                        Err(_) => Payload::Raw(raw),
                    },
                    reason,
                    description: s.attributes.get(DL_DESCRIPTION).cloned(),
                    source_entity: Some(self.source.clone()),
                    attempts: s.attempts,
                    dead_lettered_at: at,
                }
            })
            .collect())
    }

    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let url = self.shared.url(&self.queue).await?;
        let mut moved_by_task = 0;
        if max.is_none() {
            match self.move_task(&url).await {
                Ok(MoveTask::Completed(n)) => return Ok(n),
                Ok(MoveTask::Failed { moved, reason }) => {
                    tracing::warn!(queue = %self.queue, moved, %reason,
                        "SQS message move task failed; moving the rest one by one");
                    moved_by_task = moved;
                }
                Ok(MoveTask::NotStarted(e)) => {
                    tracing::debug!(queue = %self.queue, error = %e,
                        "no SQS message move task; moving letters one by one");
                }
                Err(e) => return Err(e),
            }
        }
        let moved = self
            .drain(max.unwrap_or(usize::MAX), |mut letter| {
                let url = &url;
                async move {
                    letter
                        .stored
                        .attributes
                        .retain(|k, _| !k.starts_with("cloudbus-dl-"));
                    self.shared
                        .send_one(&self.source, &letter.stored, &[])
                        .await?;
                    self.shared.delete(url, &letter.receipt).await
                }
            })
            .await?;
        Ok(moved_by_task + moved)
    }

    async fn purge(&self, max: Option<usize>) -> Result<usize> {
        let url = self.shared.url(&self.queue).await?;
        self.drain(max.unwrap_or(usize::MAX), |letter| {
            let url = &url;
            async move { self.shared.delete(url, &letter.receipt).await }
        })
        .await
    }
}

/// `maxReceiveCount` of a RedrivePolicy document.
pub(crate) fn serde_json_max(policy: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(policy).ok()?;
    match &v["maxReceiveCount"] {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_receive_count_of_a_redrive_policy() {
        assert_eq!(serde_json_max(r#"{"maxReceiveCount":"3"}"#), Some(3));
        assert_eq!(serde_json_max(r#"{"maxReceiveCount":7}"#), Some(7));
        assert_eq!(serde_json_max("not json"), None);
    }
}
