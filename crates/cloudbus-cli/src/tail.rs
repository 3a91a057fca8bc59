//! `cloudbus tail URL TOPIC SUBSCRIPTION [--json] [--max N] [--ack]`: prints the
//! events of a subscription as they arrive, one readable block each or one JSON line
//! each. It runs until `--max` events, `--idle` seconds without one, or Ctrl-C.
//!
//! By default it takes nothing away from the subscription's real consumer: what it
//! printed it holds until it ends, then gives back (each event's delivery count grows
//! by one). It ends when a held event comes back (its lease ran out: receiving it
//! again would spend another of its delivery attempts) or when it holds
//! [`MOST_HELD`] events. `--ack` acknowledges each event once printed: for a
//! subscription of tail's own (`--create` makes one).

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use cloudbus::{AttributesReader, Delivery, Settlement, SubscriptionSpec};

use crate::failure::{Failure, bounded, open};
use crate::render;

/// Without `--ack`, tail holds at most this many printed events, then ends.
pub const MOST_HELD: usize = 10_000;

/// `cloudbus tail`.
#[derive(Args, Debug)]
pub struct TailArgs {
    /// The provider URL.
    pub url: String,
    /// The topic.
    pub topic: String,
    /// The subscription to read. Events printed are given back when tail ends,
    /// unless `--ack` is given.
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
    /// Acknowledge each event once printed: it is consumed, and the subscription's
    /// other consumers never see it. Only for a subscription of tail's own
    /// (`--create` makes one).
    #[arg(long)]
    pub ack: bool,
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
    let acknowledge = args.ack;
    // Without --ack: what was printed, held until the end and then given back.
    let mut held: Vec<Delivery> = Vec::new();
    let mut printed_ids: HashSet<(String, String)> = HashSet::new();
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
            ) => r,
            _ = &mut interrupted => break,
        };
        let received = match received {
            Ok(received) => received,
            Err(failure) => {
                give_back(&consumer, &held).await;
                return Err(failure);
            }
        };
        let mut pipe_closed = false;
        let mut came_back = false;
        for delivery in &received {
            // A held event whose lease ran out came back: printed already.
            let id = (
                delivery.event().source().to_string(),
                delivery.event().id().to_owned(),
            );
            if !acknowledge && !printed_ids.insert(id) {
                came_back = true;
                continue;
            }
            last_event = tokio::time::Instant::now();
            let text = render::delivery(delivery, args.json);
            {
                let mut out = stdout.lock();
                // A closed pipe (`| head`) ends the tail; the batch is given back.
                if writeln!(out, "{}", text.trim_end()).is_err() || out.flush().is_err() {
                    pipe_closed = true;
                    break;
                }
            }
            printed += 1;
        }
        if pipe_closed {
            held.extend(received);
            break;
        }
        if !acknowledge {
            held.extend(received);
            if came_back {
                eprintln!(
                    "tail: an event it holds came back (its lease ran out); stopping, so as not to spend its delivery attempts (--ack consumes instead)"
                );
                break;
            }
            if held.len() >= MOST_HELD {
                eprintln!(
                    "tail: holding {MOST_HELD} events; stopping (--max bounds a tail, --ack consumes instead)"
                );
                break;
            }
            continue;
        }
        for result in consumer.ack_all(&received).await {
            if let Err(e) = result {
                eprintln!("warning: an acknowledgement failed ({e}); the event will come back");
            }
        }
    }
    give_back(&consumer, &held).await;
    let _ = tokio::time::timeout(timeout, consumer.close()).await;
    Ok(())
}

/// Gives the events tail held back to the subscription, for its real consumer.
async fn give_back(consumer: &cloudbus::Consumer, held: &[Delivery]) {
    let back = Settlement::Nack {
        delay: Duration::ZERO,
    };
    for chunk in held.chunks(100) {
        for result in consumer.settle_all(chunk, back.clone()).await {
            match result {
                Ok(()) => {}
                // Its lease ran out while held: it is back already.
                Err(e)
                    if matches!(
                        e.kind(),
                        cloudbus::ErrorKind::AlreadySettled | cloudbus::ErrorKind::LeaseExpired
                    ) => {}
                Err(e) => eprintln!(
                    "warning: an event could not be given back ({e}); it comes back when its lease runs out"
                ),
            }
        }
    }
}
