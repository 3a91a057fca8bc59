//! Partitioned log, checkpoints and replay on the embedded broker.
//!
//! A click stream is written to a log with 4 partitions (keyed by user, so each
//! user's clicks stay in order). An analytics consumer group reads it with
//! checkpoints; a second reader of the same group resumes where the first stopped;
//! then a bug is "fixed" and the group replays the stream from a point in time.
//!
//! Run: `cargo run --example stream_replay`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudbus::memory::MemoryBroker;
use cloudbus::{
    AttributesReader, Event, EventBuilder, HandlerContext, HandlerError, MemoryCheckpointStore,
    StartPosition, StreamConsumer,
};

/// How long a reader owns its partitions without renewing them.
const LEASE: Duration = Duration::from_millis(300);

#[tokio::main]
async fn main() -> cloudbus::Result<()> {
    let broker = MemoryBroker::new();
    broker.ensure_log("clicks", 4)?;
    let bus = broker.bus();
    let publisher = bus.publisher("clicks").await?;

    let click = |user: u32, page: &str| {
        EventBuilder::new("com.example.click", "/web")
            .subject(page.to_owned())
            .partition_key(format!("user-{user}"))
            .build()
    };
    for i in 0..60u32 {
        publisher
            .publish(click(i % 6, &format!("/page/{}", i % 5))?)
            .await?;
    }
    println!("wrote 60 clicks for 6 users to a log of 4 partitions");

    let pages: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let p2 = pages.clone();
    let count_pages = move |e: Arc<Event>, _c: HandlerContext| {
        let pages = p2.clone();
        async move {
            let page = e.subject().unwrap_or("?").to_owned();
            if let Ok(mut m) = pages.lock() {
                *m.entry(page).or_default() += 1;
            }
            Ok::<(), HandlerError>(())
        }
    };

    let checkpoints = Arc::new(MemoryCheckpointStore::new());
    let reader = |store: Arc<MemoryCheckpointStore>| {
        let bus = bus.clone();
        async move {
            Ok::<StreamConsumer, cloudbus::Error>(
                bus.stream_consumer("clicks", "analytics")
                    .await?
                    .checkpoints(store)
                    .start_at(StartPosition::Earliest)
                    .batch_size(5)
                    // A reader owns its partitions for this long without renewing
                    // them (every poll renews); a crashed reader's pass on after it.
                    .lease(LEASE),
            )
        }
    };

    // First reader: two passes (up to 5 records per partition each), then it "crashes".
    let mut first = reader(checkpoints.clone()).await?;
    let mut handled = 0;
    for _ in 0..2 {
        handled += first.poll(&count_pages).await?.handled;
    }
    println!("reader 1 handled {handled} clicks, then stopped");

    // Second reader of the same group: it gets the partitions once the crashed
    // reader's leases lapse, and resumes after the checkpoints.
    drop(first);
    let mut second = reader(checkpoints.clone()).await?;
    tokio::time::sleep(LEASE).await;
    let rest = second.catch_up(&count_pages).await?.handled;
    println!("reader 2 resumed and handled the remaining {rest}");

    // New clicks arrive later.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let since = chrono::Utc::now();
    for i in 0..12u32 {
        publisher.publish(click(i % 6, "/checkout")?).await?;
    }

    // A bug in the page counter is fixed: replay everything since `since`.
    if let Ok(mut m) = pages.lock() {
        m.clear();
    }
    second.replay(StartPosition::AtTime(since));
    let replayed = second.catch_up(&count_pages).await?.handled;
    println!("replayed {replayed} clicks written since {since}");
    if let Ok(m) = pages.lock() {
        for (page, n) in m.iter() {
            println!("  {page:<12} {n}");
        }
    }
    if handled >= 60 || handled + rest != 60 || replayed != 12 {
        return Err(cloudbus::Error::new(
            cloudbus::ErrorKind::Internal,
            format!(
                "expected 60 then 12, got {} then {replayed}",
                handled + rest
            ),
        ));
    }
    Ok(())
}
