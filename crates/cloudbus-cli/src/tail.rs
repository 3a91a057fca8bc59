//! `cloudbus tail URL TOPIC SUBSCRIPTION [--json] [--max N]`: prints the events of a
//! subscription as they arrive, one readable block each or one JSON line each, and
//! acknowledges each once printed (tail a subscription of its own: `--create` makes
//! it). It runs until `--max` events, `--idle` seconds without one, or Ctrl-C.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use cloudbus::SubscriptionSpec;

use crate::failure::{Failure, bounded, open};
use crate::render;

/// `cloudbus tail`.
#[derive(Args, Debug)]
pub struct TailArgs {
    /// The provider URL.
    pub url: String,
    /// The topic.
    pub topic: String,
    /// The subscription to read (it is consumed: each event printed is acknowledged).
    pub subscription: String,
    /// One JSON line per event (the CloudEvents JSON format, plus `delivery`).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub max: Option<usize>,
    /// Stop after this many seconds without an event.
    #[arg(long)]
    pub idle: Option<u64>,
    /// Create the topic and the subscription first when they do not exist.
    #[arg(long)]
    pub create: bool,
}

/// Prints what arrives until told to stop.
pub async fn run(args: TailArgs, timeout: Duration) -> Result<(), Failure> {
    let bus = open(&args.url, timeout).await?;
    if args.create {
        bounded(
            "cannot create the topic",
            timeout,
            bus.ensure_topic(&args.topic),
        )
        .await?;
        bounded(
            "cannot create the subscription",
            timeout,
            bus.ensure_subscription(&SubscriptionSpec::new(&args.topic, &args.subscription)),
        )
        .await?;
    }
    let consumer = bounded(
        &format!("cannot read {}/{}", args.topic, args.subscription),
        timeout,
        bus.consumer(&args.topic, &args.subscription),
    )
    .await?;
    let receive_what = format!("cannot receive from {}/{}", args.topic, args.subscription);
    let mut printed = 0usize;
    let mut last_event = tokio::time::Instant::now();
    let stdout = std::io::stdout();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        if args.max.is_some_and(|max| printed >= max) {
            break;
        }
        if args
            .idle
            .is_some_and(|idle| last_event.elapsed() >= Duration::from_secs(idle))
        {
            break;
        }
        let want = args.max.map_or(32, |max| (max - printed).min(32));
        let received = tokio::select! {
            r = bounded(
                &receive_what,
                timeout + Duration::from_secs(1),
                consumer.receive_batch(want, Duration::from_secs(1)),
            ) => r?,
            _ = &mut interrupted => break,
        };
        if !received.is_empty() {
            last_event = tokio::time::Instant::now();
        }
        for delivery in &received {
            let text = render::delivery(delivery, args.json);
            {
                let mut out = stdout.lock();
                // A closed pipe (`| head`) ends the tail; what was not printed is
                // not acknowledged, so it comes back.
                if writeln!(out, "{}", text.trim_end()).is_err() || out.flush().is_err() {
                    return Ok(());
                }
            }
            printed += 1;
        }
        for result in consumer.ack_all(&received).await {
            if let Err(e) = result {
                eprintln!("warning: an acknowledgement failed ({e}); the event will come back");
            }
        }
    }
    let _ = tokio::time::timeout(timeout, consumer.close()).await;
    Ok(())
}
