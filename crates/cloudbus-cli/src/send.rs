//! `cloudbus send URL TOPIC --type T --source S [--data @file.json | --data '...']
//! [--key K] [--count N]`: builds CloudEvents from the flags and publishes them in one
//! batch, each with its own id.

use std::time::Duration;

use clap::Args;
use cloudbus::{AttributesReader, Event, EventBuilder};

use crate::failure::{Failure, bounded, open};

/// `cloudbus send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The provider URL (`pubsub://project`, `sqs://`, `servicebus://namespace`, ...).
    pub url: String,
    /// The topic (queue, stream) to publish to.
    pub topic: String,
    /// The CloudEvents `type`.
    #[arg(long = "type", value_name = "TYPE")]
    pub ty: String,
    /// The CloudEvents `source`.
    #[arg(long)]
    pub source: String,
    /// The data: JSON text, or `@FILE` to read it from a file (`@-`: standard input).
    #[arg(long)]
    pub data: Option<String>,
    /// The data's content type; anything but JSON is sent as the bytes given.
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
    /// The ordering key (`partitionkey`).
    #[arg(long)]
    pub key: Option<String>,
    /// The `subject`.
    #[arg(long)]
    pub subject: Option<String>,
    /// The `id` (one event only; by default each event gets a new UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// How many events to send (the same data, each with its own id).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

/// Sends the events and prints their ids.
pub async fn run(args: SendArgs, timeout: Duration) -> Result<(), Failure> {
    let events = events(&args)?;
    let bus = open(&args.url, timeout).await?;
    let publisher = bounded(
        &format!("cannot publish to {}", args.topic),
        timeout,
        bus.publisher(&args.topic),
    )
    .await?;
    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let results = tokio::time::timeout(timeout, publisher.publish_batch(events))
        .await
        .map_err(|_| {
            Failure::failed(format!(
                "publish to {}: no answer within {} s",
                args.topic,
                timeout.as_secs()
            ))
        })?;
    let failed: Vec<String> = results
        .iter()
        .zip(&ids)
        .filter_map(|(r, id)| r.as_ref().err().map(|e| format!("{id}: {e}")))
        .collect();
    let sent = ids.len() - failed.len();
    let _ = tokio::time::timeout(timeout, publisher.close()).await;
    if !failed.is_empty() {
        return Err(Failure::failed(format!(
            "{} of {} events not sent to {}; first: {}",
            failed.len(),
            ids.len(),
            args.topic,
            failed[0]
        )));
    }
    println!("sent {sent} event(s) to {}", args.topic);
    for id in ids.iter().take(20) {
        println!("{id}");
    }
    if ids.len() > 20 {
        println!("... and {} more", ids.len() - 20);
    }
    Ok(())
}

/// The events the flags describe.
fn events(args: &SendArgs) -> Result<Vec<Event>, Failure> {
    if args.count == 0 {
        return Err(Failure::input("--count must be at least 1"));
    }
    if args.id.is_some() && args.count > 1 {
        return Err(Failure::input(
            "--id names one event; it cannot go with --count above 1",
        ));
    }
    let data = match &args.data {
        None => None,
        Some(d) => Some(read_data(d)?),
    };
    let is_json = args.content_type == "application/json"
        || args.content_type.ends_with("+json")
        || args.content_type.starts_with("application/json;");
    let json = match (&data, is_json) {
        (Some(bytes), true) => Some(serde_json::from_slice::<serde_json::Value>(bytes).map_err(
            |e| {
                Failure::input(format!(
                    "--data is not JSON ({e}); pass --content-type for other data"
                ))
            },
        )?),
        _ => None,
    };
    (0..args.count)
        .map(|_| {
            let mut builder = EventBuilder::new(&args.ty, &args.source);
            if let Some(id) = &args.id {
                builder = builder.id(id);
            }
            if let Some(subject) = &args.subject {
                builder = builder.subject(subject);
            }
            if let Some(key) = &args.key {
                builder = builder.partition_key(key);
            }
            builder = match (&json, &data) {
                (Some(value), _) => builder
                    .json(value)
                    .map_err(|e| Failure::of("invalid --data", &e))?,
                (None, Some(bytes)) => builder.data(&args.content_type, bytes.clone()),
                (None, None) => builder,
            };
            builder
                .build()
                .map_err(|e| Failure::of("invalid event", &e))
        })
        .collect()
}

/// `--data`: the text itself, or the content of `@FILE` (`@-`: standard input).
fn read_data(data: &str) -> Result<Vec<u8>, Failure> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                .map_err(|e| Failure::input(format!("cannot read --data from stdin: {e}")))?;
            Ok(bytes)
        }
        Some(path) => std::fs::read(path)
            .map_err(|e| Failure::input(format!("cannot read --data file {path}: {e}"))),
        None => Ok(data.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(data: Option<&str>, count: usize) -> SendArgs {
        SendArgs {
            url: "mem://".into(),
            topic: "t".into(),
            ty: "com.example.t".into(),
            source: "/cli".into(),
            data: data.map(str::to_owned),
            content_type: "application/json".into(),
            key: Some("k".into()),
            subject: None,
            id: None,
            count,
        }
    }

    #[test]
    fn builds_distinct_events_with_json_data() {
        let built = events(&args(Some(r#"{"n": 1}"#), 3)).unwrap();
        assert_eq!(built.len(), 3);
        assert_ne!(built[0].id(), built[1].id());
        assert_eq!(
            cloudbus::EventExt::data_json::<serde_json::Value>(&built[0]).unwrap(),
            serde_json::json!({"n": 1})
        );
    }

    #[test]
    fn refuses_malformed_input() {
        let e = events(&args(Some("{not json"), 1)).unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.one_line().contains("not JSON"), "{}", e.one_line());
        assert_eq!(events(&args(None, 0)).unwrap_err().code(), 2);
        assert_eq!(
            events(&args(Some("@/no/such/file"), 1)).unwrap_err().code(),
            2
        );
    }
}
