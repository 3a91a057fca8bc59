//! The one batcher behind everything cloudbus sends in batches (published events,
//! settlements), as Go CDK's `batcher` package: items from many callers are gathered
//! into calls within a count and a byte limit, one call at a time per batcher (so a
//! batcher keeps its items' order), and each caller is answered with its own result.
//! [`BatchLimits::chunks`] cuts a list the caller already holds by the same limits.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Notify, oneshot};

use cloudbus_driver::capabilities::Capabilities;
use cloudbus_driver::error::{Error, ErrorKind, Result};

/// How many items, and how many bytes of them, one call may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    /// Most items per call (at least 1).
    pub max_count: usize,
    /// Most bytes per call; a single larger item still goes alone.
    pub max_bytes: usize,
}

impl BatchLimits {
    /// The limits of a provider's batch calls.
    pub(crate) fn of(caps: &Capabilities) -> Self {
        BatchLimits {
            max_count: caps.max_batch_count.max(1),
            max_bytes: caps.max_batch_bytes,
        }
    }

    /// A count limit only.
    pub(crate) fn count(max_count: usize) -> Self {
        BatchLimits {
            max_count: max_count.max(1),
            max_bytes: usize::MAX,
        }
    }

    /// Whether an item of `size` still fits in a batch of `count` items and `bytes`.
    fn fits(&self, count: usize, bytes: usize, size: usize) -> bool {
        count == 0 || (count < self.max_count && bytes.saturating_add(size) <= self.max_bytes)
    }

    /// Cuts `items` into chunks within the limits, in order (`size` weighs an item).
    pub(crate) fn chunks<T>(&self, items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
        let mut chunks = Vec::new();
        let mut current: Vec<T> = Vec::new();
        let mut bytes = 0usize;
        for item in items {
            let weight = size(&item);
            if !self.fits(current.len(), bytes, weight) {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes = bytes.saturating_add(weight);
            current.push(item);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        chunks
    }
}

/// What a batcher does with one batch: one result per item, in order.
pub(crate) type BatchHandler<T, R> =
    Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Vec<R>> + Send>> + Send + Sync>;

struct Queue<T, R> {
    items: VecDeque<(T, oneshot::Sender<R>)>,
    /// Whether a flush task is running.
    flushing: bool,
}

struct Shared<T, R> {
    queue: Mutex<Queue<T, R>>,
    limits: BatchLimits,
    /// How long a flush waits for a batch to fill before it sends what it has.
    linger: Duration,
    size: fn(&T) -> usize,
    handler: BatchHandler<T, R>,
    /// A submit (for a lingering flush) or an idle batcher (for `drained`).
    changed: Notify,
}

/// Gathers items submitted by many callers into batches. A flush task runs while
/// items wait and ends when none do, so an idle batcher holds no task; the task is
/// spawned, so a caller that stops waiting strands nobody else's items.
pub(crate) struct Batcher<T, R> {
    shared: Arc<Shared<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// A batcher calling `handler` with batches within `limits`, waiting up to
    /// `linger` for a batch to fill; `size` weighs an item against the byte limit.
    pub(crate) fn new(
        limits: BatchLimits,
        linger: Duration,
        size: fn(&T) -> usize,
        handler: BatchHandler<T, R>,
    ) -> Self {
        Batcher {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    items: VecDeque::new(),
                    flushing: false,
                }),
                limits,
                linger,
                size,
                handler,
                changed: Notify::new(),
            }),
        }
    }

    /// Queues `item`; the receiver gets its result once its batch was handled (an
    /// error when there is no Tokio runtime to run the flush on).
    pub(crate) fn submit(&self, item: T) -> Result<oneshot::Receiver<R>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::new(
                ErrorKind::Internal,
                "sending needs a Tokio runtime (call from async code)",
            )
        })?;
        let (reply, result) = oneshot::channel();
        let start_flush = {
            let mut queue = self.lock()?;
            queue.items.push_back((item, reply));
            !std::mem::replace(&mut queue.flushing, true)
        };
        if start_flush {
            runtime.spawn(Self::flush(self.shared.clone()));
        } else if !self.shared.linger.is_zero() {
            // A lingering flush waits for the batch to fill.
            self.shared.changed.notify_waiters();
        }
        Ok(result)
    }

    /// Resolves once nothing is queued or being handled.
    pub(crate) async fn drained(&self) {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.lock() {
                Ok(queue) if queue.flushing || !queue.items.is_empty() => {}
                _ => return,
            }
            changed.await;
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Queue<T, R>>> {
        self.shared
            .queue
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "batcher lock poisoned"))
    }

    /// The flush task: takes batches off the queue and handles them one at a time
    /// until the queue is empty.
    async fn flush(shared: Arc<Shared<T, R>>) {
        loop {
            if !shared.linger.is_zero() {
                linger(&shared).await;
            }
            let batch: Vec<(T, oneshot::Sender<R>)> = {
                let Ok(mut queue) = shared.queue.lock() else {
                    return;
                };
                if queue.items.is_empty() {
                    queue.flushing = false;
                    drop(queue);
                    shared.changed.notify_waiters();
                    return;
                }
                let mut taken = Vec::new();
                let mut bytes = 0usize;
                while let Some((item, _)) = queue.items.front() {
                    let size = (shared.size)(item);
                    if !shared.limits.fits(taken.len(), bytes, size) {
                        break;
                    }
                    bytes = bytes.saturating_add(size);
                    taken.extend(queue.items.pop_front());
                }
                taken
            };
            let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = batch.into_iter().unzip();
            // A handler that panics must not leave `flushing` set with no flush
            // running (every later item would wait forever): its callers get a
            // dropped sender, which they report as an error, and the flush goes on.
            let results = std::panic::AssertUnwindSafe((shared.handler)(items))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("a batch handler panicked; its items failed");
                    Vec::new()
                });
            // A handler that returned too few results leaves the rest of the callers
            // with a dropped sender, which they report as an error.
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
    }
}

/// Waits up to the linger for the queue to hold a full batch.
async fn linger<T, R>(shared: &Shared<T, R>) {
    let deadline = tokio::time::Instant::now() + shared.linger;
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match shared.queue.lock() {
            Ok(queue) if queue.items.len() < shared.limits.max_count => {}
            _ => return,
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn chunks_respect_count_and_bytes() {
        let limits = BatchLimits {
            max_count: 3,
            max_bytes: 10,
        };
        let sizes = vec![4, 4, 4, 1, 1, 1, 1, 20, 2];
        let chunks = limits.chunks(sizes, |s| *s);
        assert_eq!(
            chunks,
            vec![vec![4, 4], vec![4, 1, 1], vec![1, 1], vec![20], vec![2]]
        );
    }

    /// Many callers at once: every one gets its own result, batches stay within the
    /// limits, one batch at a time, in the order submitted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_get_their_own_results_in_order() {
        let calls = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let handler: BatchHandler<u32, u32> = {
            let calls = calls.clone();
            let running = running.clone();
            Arc::new(move |items: Vec<u32>| {
                let calls = calls.clone();
                let running = running.clone();
                Box::pin(async move {
                    assert_eq!(
                        running.fetch_add(1, Ordering::SeqCst),
                        0,
                        "one call at a time"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    calls.lock().expect("lock").push(items.clone());
                    running.fetch_sub(1, Ordering::SeqCst);
                    items.into_iter().map(|i| i * 10).collect()
                })
            })
        };
        let batcher = Batcher::new(BatchLimits::count(7), Duration::ZERO, |_| 1, handler);
        let receivers: Vec<_> = (0..100u32)
            .map(|i| batcher.submit(i).expect("runtime"))
            .collect();
        for (i, r) in receivers.into_iter().enumerate() {
            assert_eq!(r.await.expect("answered"), i as u32 * 10);
        }
        batcher.drained().await;
        let calls = calls.lock().expect("lock").clone();
        assert!(
            calls.iter().all(|c| !c.is_empty() && c.len() <= 7),
            "{calls:?}"
        );
        let flat: Vec<u32> = calls.into_iter().flatten().collect();
        assert_eq!(flat, (0..100).collect::<Vec<_>>());
    }

    /// With a linger, items submitted one by one still travel together.
    #[tokio::test]
    async fn linger_gathers_a_batch() {
        let calls = Arc::new(AtomicUsize::new(0));
        let handler: BatchHandler<u32, ()> = {
            let calls = calls.clone();
            Arc::new(move |items: Vec<u32>| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { items.iter().map(|_| ()).collect() })
            })
        };
        let batcher = Batcher::new(
            BatchLimits::count(4),
            Duration::from_millis(200),
            |_| 1,
            handler,
        );
        let mut receivers = Vec::new();
        for i in 0..4 {
            receivers.push(batcher.submit(i).expect("runtime"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for r in receivers {
            r.await.expect("answered");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A handler that panics fails its own items; the batcher keeps serving the
    /// next ones instead of leaving them waiting for a flush that never comes.
    #[tokio::test]
    async fn a_panicking_handler_fails_its_batch_only() {
        let handler: BatchHandler<u32, u32> = Arc::new(|items: Vec<u32>| {
            Box::pin(async move {
                if items.contains(&1) {
                    panic!("handler bug");
                }
                items
            })
        });
        let batcher = Batcher::new(BatchLimits::count(1), Duration::ZERO, |_| 1, handler);
        let first = batcher.submit(1).expect("runtime");
        assert!(
            first.await.is_err(),
            "the panicking batch's caller gets an error"
        );
        let second = batcher.submit(2).expect("runtime");
        let answered = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert_eq!(answered.expect("answered in time").expect("a result"), 2);
    }

    #[test]
    fn submitting_outside_a_runtime_is_an_error() {
        let handler: BatchHandler<u32, ()> =
            Arc::new(|items: Vec<u32>| Box::pin(async move { items.iter().map(|_| ()).collect() }));
        let batcher = Batcher::new(BatchLimits::count(1), Duration::ZERO, |_| 1, handler);
        assert!(batcher.submit(1).is_err());
    }
}
