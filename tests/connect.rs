//! Opening a bus from a URL through the facade: named in-process brokers, the
//! cargo feature a left-out provider needs, unknown schemes and texts that are not
//! URLs.

use cloudbus::{ErrorKind, Event, EventBuilder, SubscriptionSpec};

fn ping() -> Event {
    EventBuilder::new("com.example.ping", "/tests")
        .build()
        .expect("a valid event")
}

#[tokio::test]
async fn urls_open_named_brokers_and_name_missing_features() {
    let a = cloudbus::connect("mem://url-test").await.unwrap();
    a.ensure_topic("t").await.unwrap();
    a.ensure_subscription(&SubscriptionSpec::new("t", "s"))
        .await
        .unwrap();
    // The same name is the same broker.
    let b = cloudbus::connect("mem://url-test").await.unwrap();
    b.publisher("t")
        .await
        .unwrap()
        .publish(ping())
        .await
        .unwrap();
    assert!(a.consumer("t", "s").await.unwrap().receive().await.is_ok());
    // Another name is another broker.
    let c = cloudbus::connect("mem://other").await.unwrap();
    let err = c
        .publisher("t")
        .await
        .unwrap()
        .publish(ping())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // A provider this build left out is named by its feature. (A workspace-wide build
    // compiles every provider in, through the provider crates' tests; then there is
    // none to check here, and `cargo test -p cloudbus --test connect` checks it.)
    if !cfg!(feature = "sqs") {
        let err = cloudbus::connect("sqs://queue").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("`sqs`"), "{err}");
    }
    if !cfg!(feature = "kafka") {
        let err = cloudbus::connect("kafka://broker:9092").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("`kafka`"), "{err}");
    }
    let err = cloudbus::connect("nats://x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(cloudbus::connect("not a url").await.is_err());
}
