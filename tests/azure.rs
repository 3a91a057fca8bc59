//! Azure against the project's own emulators (tests/emulators/, proven against
//! Microsoft's Python clients first).
//!
//! Service Bus: the conformance suite on a queue, on a topic subscription and on a
//! session-enabled queue; dead-lettering after MaxDeliveryCount, rules routing,
//! scheduled delivery, duplicate detection, a wrong key.
//!
//! Event Grid: publishing with a key and with a SAS token, a wrong key, an oversize
//! event, push delivery to the `PushEndpoint` and its handler, both validation
//! handshakes, the caller's secret, the status codes that make Event Grid retry or
//! dead-letter, malformed pushes and the filter.
//!
//! scripts/test.sh starts both emulators unless SERVICEBUS_CONNECTION_STRING /
//! EVENTGRID_ENDPOINT are set. Without them the tests say so loudly and pass, except
//! under CI=true.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus::azure::Secret;
use cloudbus::azure::servicebus::{EntityKind, ServiceBusBus, ServiceBusConfig};
use cloudbus::conformance::Harness;
use cloudbus::{Capabilities, PublishOptions, SubscriptionSpec};
use cloudbus::azure::eventgrid::push::PushEndpoint;
use cloudbus::azure::eventgrid::{Credential, EventGridBus, EventGridConfig};
use cloudbus::{
    AttributesReader, Bus, ErrorKind, Event, EventBuilder, Filter, HandlerContext, HandlerError,
};

/// The Service Bus connection string, or `None` after a loud message.
fn servicebus() -> Option<String> {
    match std::env::var("SERVICEBUS_CONNECTION_STRING") {
        Ok(c) if !c.is_empty() => Some(c),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "CI=true but SERVICEBUS_CONNECTION_STRING is not set (scripts/test.sh starts the Service Bus emulator)"
            )
        }
        _ => {
            eprintln!(
                "SKIPPED: SERVICEBUS_CONNECTION_STRING is not set, so the Service Bus tests did not run (bash scripts/test.sh starts the emulator)"
            );
            None
        }
    }
}

/// One way of mapping cloudbus onto Service Bus.
#[derive(Clone, Copy)]
struct ServiceBusHarness {
    entities: EntityKind,
    sessions: bool,
}

impl ServiceBusHarness {
    fn config(&self) -> ServiceBusConfig {
        let text = std::env::var("SERVICEBUS_CONNECTION_STRING").unwrap_or_default();
        ServiceBusConfig::from_connection_string(&text)
            .expect("connection string")
            .entities(self.entities)
            .sessions(self.sessions)
    }
    async fn connect(&self) -> Bus {
        ServiceBusBus::connect(self.config())
            .await
            .expect("connect to Service Bus")
            .into_bus()
    }
}

#[async_trait]
impl Harness for ServiceBusHarness {
    async fn bus(&self) -> cloudbus::Result<Bus> {
        Ok(ServiceBusBus::connect(self.config()).await?.into_bus())
    }
    fn capabilities(&self) -> Capabilities {
        self.config().capabilities()
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }
    /// Service Bus locks last at least 5 s.
    fn short_lease(&self) -> Duration {
        Duration::from_secs(5)
    }
}

mod servicebus_queue {
    use super::*;
    cloudbus::conformance_suite!(match servicebus() {
        Some(_) => ServiceBusHarness {
            entities: EntityKind::Queues,
            sessions: false,
        },
        None => return,
    });
}

mod servicebus_topic_subscription {
    use super::*;
    cloudbus::conformance_suite!(match servicebus() {
        Some(_) => ServiceBusHarness {
            entities: EntityKind::Topics,
            sessions: false,
        },
        None => return,
    });
}

mod servicebus_session_queue {
    use super::*;
    cloudbus::conformance_suite!(match servicebus() {
        Some(_) => ServiceBusHarness {
            entities: EntityKind::Queues,
            sessions: true,
        },
        None => return,
    });
}

/// The emulator's preset topic: (endpoint, key), or `None` after a loud message.
fn eventgrid() -> Option<(String, String)> {
    match (
        std::env::var("EVENTGRID_ENDPOINT"),
        std::env::var("EVENTGRID_KEY"),
    ) {
        (Ok(e), Ok(k)) if !e.is_empty() && !k.is_empty() => Some((e, k)),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "CI=true but EVENTGRID_ENDPOINT / EVENTGRID_KEY are not set (scripts/test.sh starts the Event Grid emulator)"
            )
        }
        _ => {
            eprintln!(
                "SKIPPED: EVENTGRID_ENDPOINT is not set, so the Event Grid tests did not run (bash scripts/test.sh starts the emulator)"
            );
            None
        }
    }
}

fn bus(endpoint: &str, credential: Credential) -> Bus {
    EventGridBus::new(EventGridConfig::new(endpoint, credential))
        .expect("bus")
        .into_bus()
}

/// The emulator's admin API (what ARM is in Azure), at the endpoint's origin.
struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    fn new(endpoint: &str) -> Self {
        let (origin, rest) = endpoint.split_once("/topics/").expect("emulator endpoint");
        let topic = rest.split('/').next().unwrap_or_default();
        Admin {
            base: format!("{origin}/admin/topics/{topic}"),
            http: reqwest::Client::new(),
        }
    }

    /// Creates a subscription pushing to `url`; returns the emulator's status and body.
    async fn subscribe(&self, name: &str, spec: serde_json::Value) -> (u16, String) {
        let r = self
            .http
            .put(format!("{}/subscriptions/{name}", self.base))
            .body(spec.to_string())
            .send()
            .await
            .expect("admin call");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    async fn list(&self, name: &str, what: &str) -> Vec<serde_json::Value> {
        let r = self
            .http
            .get(format!("{}/subscriptions/{name}/{what}", self.base))
            .send()
            .await
            .expect("admin call");
        serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default()
    }
}

type Seen = Arc<Mutex<Vec<(Event, u32)>>>;

/// Serves `endpoint` on a free port; returns its URL (with `?code=` when a secret is
/// given) and a guard that stops it.
async fn serve(
    endpoint: PushEndpoint,
    secret: Option<&str>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(endpoint.serve(listener, async move {
        let _ = stopped.await;
    }));
    let url = match secret {
        Some(s) => format!("http://127.0.0.1:{port}/events?code={s}"),
        None => format!("http://127.0.0.1:{port}/events"),
    };
    (url, stop)
}

/// A push endpoint whose handler records events, retries the types in `retry_first`
/// until attempt 3 and rejects `com.example.poison`.
fn recording_endpoint(name: &str, seen: Seen) -> PushEndpoint {
    PushEndpoint::new(
        name.to_owned(),
        move |e: Arc<Event>, ctx: HandlerContext| {
            let seen = seen.clone();
            async move {
                if e.ty() == "com.example.poison" {
                    return Err(HandlerError::reject("poison"));
                }
                if e.ty() == "com.example.flaky" && ctx.attempt < 3 {
                    return Err(HandlerError::retry("not yet"));
                }
                seen.lock().unwrap().push(((*e).clone(), ctx.attempt));
                Ok(())
            }
        },
    )
}

async fn wait_for(seen: &Seen, count: usize) -> Vec<(Event, u32)> {
    let until = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().len() < count && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.lock().unwrap().clone()
}

fn event(ty: &str, n: u32) -> Event {
    EventBuilder::new(ty, "/tests/azure")
        .subject(format!("orders/{n}"))
        .extension("tenant", "acme")
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Events published with the key reach the push endpoint's handler as the same
/// CloudEvents, after the CloudEvents webhook handshake, with the caller's secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventgrid_publish_is_pushed_to_the_handler() {
    let Some((endpoint, key)) = eventgrid() else {
        return;
    };
    let seen: Seen = Arc::default();
    let push = recording_endpoint("push", seen.clone()).secret(Secret::new("s3cret"));
    let (url, _stop) = serve(push, Some("s3cret")).await;
    let admin = Admin::new(&endpoint);
    let sub = format!("push-{:08x}", fastrand::u32(..));
    let (status, body) = admin
        .subscribe(
            &sub,
            serde_json::json!({"endpoint": url, "handshake": "cloudevents",
                "includedEventTypes": ["com.example.created"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let sent: Vec<Event> = (0..3).map(|n| event("com.example.created", n)).collect();
    let publisher = bus(&endpoint, Credential::Key(Secret::new(key)))
        .publisher("orders")
        .await
        .unwrap();
    for r in publisher.publish_batch(sent.clone()).await {
        r.unwrap();
    }
    let got = wait_for(&seen, 3).await;
    assert_eq!(got.len(), 3);
    for e in &sent {
        let (g, attempt) = got
            .iter()
            .find(|(g, _)| g.id() == e.id())
            .expect("delivered");
        assert_eq!(g, e, "the CloudEvent changed on the way");
        assert_eq!(*attempt, 1);
    }
}

/// A SAS token made from the key (HMAC-SHA256, as azure-eventgrid's generate_sas
/// makes it) is accepted; a wrong key is PermissionDenied and the key stays out of
/// the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventgrid_sas_token_and_wrong_key() {
    let Some((endpoint, key)) = eventgrid() else {
        return;
    };
    let sas = bus(
        &endpoint,
        Credential::SasFromKey {
            key: Secret::new(key),
            ttl: Duration::from_secs(600),
        },
    );
    sas.publisher("orders")
        .await
        .unwrap()
        .publish(event("com.example.sas", 0))
        .await
        .unwrap();
    let wrong_key = "d3Jvbmcta2V5LXZhbHVl";
    let err = bus(&endpoint, Credential::Key(Secret::new(wrong_key)))
        .publisher("orders")
        .await
        .unwrap()
        .publish(event("com.example.denied", 0))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(
        !format!("{err} {err:?}").contains(wrong_key),
        "the key leaked"
    );
}

/// An event over 1 MB is refused as TooLarge before any call (the endpoint is a
/// closed port), and a missing topic is NotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventgrid_oversize_and_missing_topic() {
    let dead = bus(
        "http://127.0.0.1:9/topics/none/api/events",
        Credential::Key(Secret::new("a2V5")),
    );
    let big = EventBuilder::new("com.example.big", "/tests/azure")
        .data("text/plain", "x".repeat(1100 * 1024))
        .max_bytes(4 * 1024 * 1024)
        .build()
        .unwrap();
    let err = dead
        .publisher("orders")
        .await
        .unwrap()
        .publish(big)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    let Some((endpoint, key)) = eventgrid() else {
        return;
    };
    let missing = endpoint.replace("/topics/", "/topics/missing-");
    let err = bus(&missing, Credential::Key(Secret::new(key)))
        .publisher("orders")
        .await
        .unwrap()
        .publish(event("com.example.lost", 0))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// Both handshakes: Event Grid's SubscriptionValidationEvent and the CloudEvents
/// OPTIONS handshake; a caller without the secret is refused (so is its handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventgrid_both_handshakes_and_the_secret() {
    let Some((endpoint, _)) = eventgrid() else {
        return;
    };
    let seen: Seen = Arc::default();
    let push = recording_endpoint("handshakes", seen).secret(Secret::new("s3cret"));
    let (url, _stop) = serve(push, Some("s3cret")).await;
    let admin = Admin::new(&endpoint);
    for handshake in ["eventgrid", "cloudevents"] {
        let (status, body) = admin
            .subscribe(
                &format!("hs-{handshake}-{:08x}", fastrand::u32(..)),
                serde_json::json!({"endpoint": url, "handshake": handshake}),
            )
            .await;
        assert_eq!(status, 200, "{handshake}: {body}");
    }
    let http = reqwest::Client::new();
    let options = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("WebHook-Request-Origin", "eventgrid.azure.net")
        .send()
        .await
        .unwrap();
    assert_eq!(options.status().as_u16(), 200);
    assert_eq!(
        options.headers()["webhook-allowed-origin"],
        "eventgrid.azure.net"
    );
    let no_secret = url.replace("?code=s3cret", "");
    let (status, body) = admin
        .subscribe(
            &format!("hs-nosecret-{:08x}", fastrand::u32(..)),
            serde_json::json!({"endpoint": no_secret, "handshake": "cloudevents"}),
        )
        .await;
    assert_eq!(status, 400, "a handshake without the secret passed: {body}");
    let post = http
        .post(url.replace("s3cret", "wrong"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 401);
}

/// The handler's outcome steers Event Grid: a retry is answered 503 and the event
/// comes back with the next attempt; a rejection is answered 400 and Event Grid
/// dead-letters it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventgrid_retry_and_reject_steer_the_service() {
    let Some((endpoint, key)) = eventgrid() else {
        return;
    };
    let seen: Seen = Arc::default();
    let (url, _stop) = serve(recording_endpoint("steer", seen.clone()), None).await;
    let admin = Admin::new(&endpoint);
    let sub = format!("steer-{:08x}", fastrand::u32(..));
    let (status, body) = admin
        .subscribe(
            &sub,
            serde_json::json!({"endpoint": url, "maxDeliveryAttempts": 5,
                "retryIntervalSeconds": 0.1,
                "includedEventTypes": ["com.example.flaky", "com.example.poison"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let flaky = event("com.example.flaky", 1);
    let poison = event("com.example.poison", 2);
    let publisher = bus(&endpoint, Credential::Key(Secret::new(key)))
        .publisher("orders")
        .await
        .unwrap();
    for r in publisher
        .publish_batch(vec![flaky.clone(), poison.clone()])
        .await
    {
        r.unwrap();
    }
    let got = wait_for(&seen, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.id(), flaky.id());
    assert_eq!(got[0].1, 3, "handled at the third attempt");
    let until = Instant::now() + Duration::from_secs(10);
    let letters = loop {
        let l = admin.list(&sub, "deadletters").await;
        if !l.is_empty() || Instant::now() > until {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["event"]["id"], poison.id());
    assert_eq!(letters[0]["lastHttpStatusCode"], 400);
    assert_eq!(letters[0]["deliveryAttempts"], 1);
    let deliveries = admin.list(&sub, "deliveries").await;
    let statuses: Vec<i64> = deliveries
        .iter()
        .filter(|d| d["id"] == flaky.id())
        .map(|d| d["status"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(statuses, [503, 503, 200]);
}

/// A pushed message that is not a CloudEvent never reaches the handler: it is
/// answered 400 with the reason (Event Grid dead-letters it with that response). An
/// event the endpoint's filter does not match is answered 200 and not handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventgrid_malformed_and_filtered_pushes() {
    let seen: Seen = Arc::default();
    let push = recording_endpoint("guarded", seen.clone())
        .filter(Filter::prefix("type", "com.example.wanted"));
    let (url, _stop) = serve(push, None).await;
    let http = reqwest::Client::new();
    for (body, want) in [
        (r#"{"hello": "world"}"#, "malformed"),
        (
            r#"{"specversion": "1.0", "id": "x", "type": "t"}"#,
            "source",
        ),
        ("not json", "malformed: invalid JSON"),
    ] {
        let r = http
            .post(&url)
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .header("aeg-event-type", "Notification")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let reason = r.text().await.unwrap();
        assert!(reason.contains(want), "{body}: {reason}");
    }
    let unwanted = event("com.example.other", 1);
    let wanted = event("com.example.wanted", 2);
    for e in [&unwanted, &wanted] {
        let r = http
            .post(&url)
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .body(cloudbus::codec::to_structured_json(e).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let got = wait_for(&seen, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.id(), wanted.id());
}
