//! The `cloudbus` binary, run as a user runs it (assert_cmd): bad input gets one line
//! and a non-zero exit; `schema check`; and send, tail and the dead-letter commands
//! against the Pub/Sub emulator (PUBSUB_EMULATOR_HOST), LocalStack (AWS_ENDPOINT_URL)
//! and a Kafka broker (KAFKA_BOOTSTRAP_SERVERS: tansu), which scripts/test.sh starts. Without an emulator its tests
//! skip loudly; under CI=true they fail.

use std::process::Output;

use assert_cmd::Command;

fn cloudbus() -> Command {
    let mut command = Command::cargo_bin("cloudbus").expect("the cloudbus binary");
    command.env("CLOUDBUS_TIMEOUT", "30");
    command
}

fn text(output: &[u8]) -> String {
    String::from_utf8_lossy(output).into_owned()
}

/// Asserts the run failed with `code` and one `error:` line saying `says`, and no
/// panic or debug output.
fn assert_one_line_error(output: &Output, code: i32, says: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(says), "expected {says:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let unknown = cloudbus()
        .args(["send", "smoke://hill", "t", "--type", "x", "--source", "/s"])
        .output()
        .unwrap();
    assert_one_line_error(&unknown, 2, "smoke");
    let malformed = cloudbus()
        .args(["send", "mem://", "t", "--type", "x", "--source", "/s"])
        .args(["--data", "{not json"])
        .output()
        .unwrap();
    assert_one_line_error(&malformed, 2, "--data is not JSON");
    let unreadable = cloudbus()
        .args(["send", "mem://", "t", "--type", "x", "--source", "/s"])
        .args(["--data", "@/no/such/file.json"])
        .output()
        .unwrap();
    assert_one_line_error(&unreadable, 2, "cannot read --data file");
    // Nothing listens there: the tool gives up after --timeout with one line.
    let unreachable = cloudbus()
        .args(["--timeout", "3", "send", "sqs://", "orders", "--type", "x"])
        .args(["--source", "/s"])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1), "{unreachable:?}");
    let stderr = text(&unreachable.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    // Purge asks; with no terminal to ask on and no --yes it refuses.
    let unconfirmed = cloudbus()
        .args(["dlq", "purge", "mem://", "t", "s"])
        .output()
        .unwrap();
    assert_one_line_error(&unconfirmed, 2, "--yes");
    // clap's own usage errors exit 2 too.
    let usage = cloudbus().args(["send"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn schema_check_exits_by_compatibility() {
    let dir = std::env::temp_dir().join(unique("cloudbus-cli-schema"));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, v: serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, v.to_string()).unwrap();
        path
    };
    let old = write(
        "old.json",
        serde_json::json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}),
    );
    let added = write(
        "added.json",
        serde_json::json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}, "x": {"type": "string"}}}),
    );
    let retyped = write(
        "retyped.json",
        serde_json::json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}),
    );
    let run = |new: &std::path::Path| {
        cloudbus()
            .args(["schema", "check"])
            .arg(&old)
            .arg(new)
            .output()
            .unwrap()
    };
    let ok = run(&added);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let bad = run(&retyped);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(text(&bad.stdout).contains("/id: type changed"), "{bad:?}");
    let missing = run(&dir.join("missing.json"));
    assert_one_line_error(&missing, 2, "cannot read");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The emulator's address in `var`, or None (after saying so) when it is not set
/// outside CI.
fn emulator(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and {var} is not set: scripts/test.sh starts the emulator"
            );
            eprintln!("SKIPPED: {var} is not set (scripts/test.sh starts the emulator)");
            None
        }
    }
}

/// Makes `topic` and its `subscriptions` through the SDK, in this process.
///
/// Not with `cloudbus tail --create`: the Pub/Sub emulator never ends a streaming pull
/// whose client went away (see cloudbus-gcp's tests), and that stream goes on taking
/// messages, so on the emulator each subscription is read by one CLI run only.
fn declare(url: &str, topic: &str, subscriptions: &[&str]) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let bus = cloudbus::connect(url).await.unwrap();
        bus.ensure_topic(topic).await.unwrap();
        for sub in subscriptions {
            bus.ensure_subscription(&cloudbus::SubscriptionSpec::new(topic, *sub))
                .await
                .unwrap();
        }
    });
}

/// `cloudbus send` of `count` order events to `topic`; their ids.
fn send_orders(url: &str, topic: &str, count: usize) -> Vec<String> {
    let sent = cloudbus()
        .args(["send", url, topic, "--type", "com.example.order.created"])
        .args([
            "--source",
            "/cli/test",
            "--subject",
            "orders/7",
            "--key",
            "k1",
        ])
        .args(["--data", r#"{"order": 7, "total_cents": 1250}"#])
        .args(["--count", &count.to_string()])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let out = text(&sent.stdout);
    assert!(out.starts_with(&format!("sent {count} event(s)")), "{out}");
    let ids: Vec<String> = out.lines().skip(1).map(str::to_owned).collect();
    assert_eq!(ids.len(), count, "{out}");
    ids
}

/// send, then tail as readable blocks and as JSON lines, on one URL. With fan-out
/// (Pub/Sub) the JSON tail reads a second subscription of its own; on a queue (SQS)
/// both read the one queue, one after the other.
fn send_and_tail(url: &str, fan_out: bool) {
    let topic = unique("cli-orders");
    let blocks_sub = if fan_out {
        unique("cli-tap")
    } else {
        topic.clone()
    };
    let json_sub = if fan_out {
        unique("cli-json")
    } else {
        topic.clone()
    };
    declare(url, &topic, &[&blocks_sub, &json_sub]);
    let ids = send_orders(url, &topic, 3);

    let tailed = cloudbus()
        .args([
            "tail",
            url,
            &topic,
            &blocks_sub,
            "--max",
            "3",
            "--idle",
            "60",
            "--ack",
        ])
        .output()
        .unwrap();
    assert!(tailed.status.success(), "{tailed:?}");
    let blocks = text(&tailed.stdout);
    assert_eq!(
        blocks.matches("── com.example.order.created").count(),
        3,
        "{blocks}"
    );
    assert!(blocks.contains("\"total_cents\": 1250"), "{blocks}");
    assert!(blocks.contains("orders/7"), "{blocks}");
    for id in &ids {
        assert!(blocks.contains(id.as_str()), "{id} not tailed: {blocks}");
    }

    let more = send_orders(url, &topic, 1);
    let want = if fan_out { 4 } else { 1 };
    let json = cloudbus()
        .args([
            "tail", url, &topic, &json_sub, "--json", "--idle", "60", "--ack",
        ])
        .args(["--max", &want.to_string()])
        .output()
        .unwrap();
    assert!(json.status.success(), "{json:?}");
    let lines = text(&json.stdout);
    let events: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(events.len(), want, "{lines}");
    for event in &events {
        assert_eq!(event["type"], "com.example.order.created");
        assert_eq!(event["source"], "/cli/test");
        assert_eq!(event["data"]["order"], 7);
        assert!(event["delivery"]["attempt"].as_u64().is_some(), "{event}");
    }
    assert!(
        events.iter().any(|e| e["id"] == more[0].as_str()),
        "{} not in {lines}",
        more[0]
    );
}

#[test]
fn send_and_tail_on_the_pubsub_emulator() {
    if emulator("PUBSUB_EMULATOR_HOST").is_none() {
        return;
    }
    send_and_tail(&format!("pubsub://{}", unique("cli-project")), true);
}

#[test]
fn send_and_tail_on_localstack_sqs() {
    if emulator("AWS_ENDPOINT_URL").is_none() {
        return;
    }
    send_and_tail("sqs://", false);
    // `tail --create` makes the queue when it does not exist, then tails it.
    let queue = unique("cli-created");
    let made = cloudbus()
        .args(["tail", "sqs://", &queue, &queue, "--create", "--idle", "1"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let ids = send_orders("sqs://", &queue, 1);
    let got = cloudbus()
        .args([
            "tail", "sqs://", &queue, &queue, "--max", "1", "--idle", "60",
        ])
        .output()
        .unwrap();
    assert!(text(&got.stdout).contains(ids[0].as_str()), "{got:?}");
    // Issue 28 item 18: without --ack, tail gives back what it printed, so the
    // queue's real consumer still gets it (it used to acknowledge it away).
    let again = cloudbus()
        .args([
            "tail", "sqs://", &queue, &queue, "--max", "1", "--idle", "60", "--ack",
        ])
        .output()
        .unwrap();
    assert!(
        text(&again.stdout).contains(ids[0].as_str()),
        "the event tail printed without --ack was taken away: {again:?}"
    );
}

/// peek shows a dead letter's reason and attempts, redrive puts it back, purge (with
/// --yes) empties the place.
#[test]
fn dead_letters_peek_redrive_purge_on_localstack() {
    if emulator("AWS_ENDPOINT_URL").is_none() {
        return;
    }
    dead_letters_peek_redrive_purge("sqs://");
}

/// The URL of the Kafka broker scripts/test.sh starts (tansu), with the short session
/// timeout its group joins need (it holds a new group's first join for half of it).
fn kafka_url() -> Option<String> {
    emulator("KAFKA_BOOTSTRAP_SERVERS").map(|b| format!("kafka://{b}?session_timeout_ms=6000"))
}

#[test]
fn send_and_tail_on_kafka() {
    let Some(url) = kafka_url() else {
        return;
    };
    // Two subscriptions are two consumer groups: each reads every event.
    send_and_tail(&url, true);
}

#[test]
fn dead_letters_peek_redrive_purge_on_kafka() {
    let Some(url) = kafka_url() else {
        return;
    };
    dead_letters_peek_redrive_purge(&url);
}

fn dead_letters_peek_redrive_purge(url: &str) {
    let topic = unique("cli-dlq");
    let sub = topic.clone();
    declare(url, &topic, &[&sub]);
    for n in 0..2 {
        let sent = cloudbus()
            .args(["send", url, &topic, "--type", "com.example.poison"])
            .args([
                "--source",
                "/cli/test",
                "--data",
                &format!(r#"{{"n": {n}}}"#),
            ])
            .output()
            .unwrap();
        assert!(sent.status.success(), "{sent:?}");
    }
    let empty = cloudbus()
        .args(["dlq", "peek", url, &topic, &sub])
        .output()
        .unwrap();
    assert!(empty.status.success(), "{empty:?}");
    // Dead-lettered through the SDK with a reason, as a handler's rejection does.
    dead_letter_all(url, &topic, &sub, 2);
    let peek = cloudbus()
        .args(["dlq", "peek", url, &topic, &sub, "--max", "5"])
        .output()
        .unwrap();
    assert!(peek.status.success(), "{peek:?}");
    let shown = text(&peek.stdout);
    assert_eq!(shown.matches("── com.example.poison").count(), 2, "{shown}");
    assert!(shown.contains("reason"), "{shown}");
    assert!(shown.contains("poisoned by the CLI test"), "{shown}");
    assert!(shown.contains("attempts"), "{shown}");
    let peek_json = cloudbus()
        .args(["dlq", "peek", url, &topic, &sub, "--json", "--max", "1"])
        .output()
        .unwrap();
    let letter: serde_json::Value =
        serde_json::from_str(text(&peek_json.stdout).trim()).expect("a JSON line");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("poisoned")),
        "{letter}"
    );
    assert_eq!(letter["event"]["type"], "com.example.poison");

    let redrive = cloudbus()
        .args(["dlq", "redrive", url, &topic, &sub, "--max", "1"])
        .output()
        .unwrap();
    assert!(redrive.status.success(), "{redrive:?}");
    assert!(text(&redrive.stdout).contains("redriven 1"), "{redrive:?}");
    let back = cloudbus()
        .args([
            "tail", url, &topic, &sub, "--max", "1", "--idle", "30", "--ack",
        ])
        .output()
        .unwrap();
    assert!(
        text(&back.stdout).contains("── com.example.poison"),
        "{back:?}"
    );

    let purge = cloudbus()
        .args(["dlq", "purge", url, &topic, &sub, "--yes"])
        .output()
        .unwrap();
    assert!(purge.status.success(), "{purge:?}");
    assert!(text(&purge.stdout).contains("purged 1"), "{purge:?}");
    let after = cloudbus()
        .args(["dlq", "peek", url, &topic, &sub])
        .output()
        .unwrap();
    assert!(text(&after.stdout).contains("no dead letters"), "{after:?}");
}

/// Dead-letters `n` events of `sub` through the SDK, with a reason.
fn dead_letter_all(url: &str, topic: &str, sub: &str, n: usize) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let bus = cloudbus::connect(url).await.unwrap();
        let consumer = bus.consumer(topic, sub).await.unwrap();
        let mut done = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while done < n && std::time::Instant::now() < deadline {
            for d in consumer
                .receive_batch(n - done, std::time::Duration::from_secs(2))
                .await
                .unwrap()
            {
                d.dead_letter("poisoned by the CLI test").await.unwrap();
                done += 1;
            }
        }
        assert_eq!(done, n, "dead-lettered {done} of {n}");
    });
}

/// Writes a topology file of `topic` with subscriptions `billing` (filtered on the
/// order type, 5 deliveries, `lease`) and `audit`; its path.
fn topology_file(topic: &str, billing: &str, audit: &str, lease: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.yaml", unique("cloudbus-topology")));
    let yaml = format!(
        "topics:\n  - name: {topic}\n    subscriptions:\n      - name: {billing}\n        filter:\n          prefix: {{attribute: type, prefix: com.example.order.}}\n        max_delivery_attempts: 5\n        lease: {lease}\n      - name: {audit}\n"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `topology plan` shows what is missing, `apply` makes it and a second `apply`
/// changes nothing; a longer lease is planned as that one change and applied in
/// place; a malformed file is one line and exit 2.
fn topology_plan_and_apply(url: &str) {
    let topic = unique("cli-topology");
    let (billing, audit) = (unique("billing"), unique("audit"));
    let file = topology_file(&topic, &billing, &audit, "30s");
    let run = |action: &str, file: &std::path::Path| {
        let out = cloudbus()
            .args(["topology", action, "-f"])
            .arg(file)
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{action}: {out:?}");
        text(&out.stdout)
    };
    let plan = run("plan", &file);
    assert!(plan.contains(&format!("+ topic {topic}")), "{plan}");
    assert!(
        plan.contains(&format!("+ subscription {topic}/{billing} (lease 30s")),
        "{plan}"
    );
    assert!(plan.ends_with("3 to apply\n"), "{plan}");
    let applied = run("apply", &file);
    assert!(applied.contains("applied 3 change(s)"), "{applied}");
    let again = run("apply", &file);
    assert!(
        again.contains("no changes: the provider holds this topology"),
        "{again}"
    );
    assert!(
        again.contains(&format!("= subscription {topic}/{audit}")),
        "{again}"
    );

    let longer = topology_file(&topic, &billing, &audit, "60s");
    let plan = run("plan", &longer);
    assert!(
        plan.contains(&format!(
            "~ subscription {topic}/{billing}\n    lease: 30s -> 60s"
        )),
        "{plan}"
    );
    assert!(plan.ends_with("1 to apply\n"), "{plan}");
    let applied = run("apply", &longer);
    assert!(applied.contains("applied 1 change(s)"), "{applied}");
    assert!(run("plan", &longer).contains("no changes"));

    let broken = std::env::temp_dir().join(format!("{}.yaml", unique("cloudbus-broken")));
    std::fs::write(&broken, "topics:\n  - name: t\n    subscription: []\n").unwrap();
    let refused = cloudbus()
        .args(["topology", "plan", "-f"])
        .arg(&broken)
        .arg(url)
        .output()
        .unwrap();
    assert_one_line_error(&refused, 2, "is not a topology");
    for f in [file, longer, broken] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn topology_plan_and_apply_on_localstack_sns() {
    if emulator("AWS_ENDPOINT_URL").is_none() {
        return;
    }
    topology_plan_and_apply("sns://");
}

#[test]
fn topology_plan_and_apply_on_the_pubsub_emulator() {
    if emulator("PUBSUB_EMULATOR_HOST").is_none() {
        return;
    }
    topology_plan_and_apply("pubsub://cloudbus-test");
}
