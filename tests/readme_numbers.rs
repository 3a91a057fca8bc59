//! The numbers the README states, checked against the code that makes them true.
//!
//! A README number that says something about the code (a count of conformance cases
//! or fault kinds, the workspace's members, a provider's limit, a default, the size
//! of a chaos run, a bench's setting, a version, a port) is either computed here from
//! the code (the case registries, `FaultKind::ALL`, the workspace's `members`, the
//! memory broker's `BrokerConfig`) or listed in [`facts`] with the README words that
//! state it and the code that makes it so. A failure names the README sentence that
//! went stale. Measurements (the chaos and network-fault runs, fuzzing, benchmark
//! results, the first command's crate count) carry their date in the README and are
//! not checked here; neither are HTTP status codes, sample output and issue numbers.

use std::fmt::Write as _;

const README: &str = include_str!("../README.md");

/// `text` with every run of whitespace as one space: the README wraps its lines
/// anywhere, and rustfmt the code.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The squashed README.
fn readme() -> String {
    squash(README)
}

/// The README sentence (or table cell) around byte `at` of the squashed `text`, for
/// failure messages.
fn sentence_around(text: &str, at: usize) -> String {
    let bounds = [". ", " | "];
    let start = bounds
        .iter()
        .filter_map(|b| text[..at].rfind(b).map(|i| i + b.len()))
        .max()
        .unwrap_or(0);
    let end = bounds
        .iter()
        .filter_map(|b| text[at..].find(b).map(|i| at + i + 1))
        .min()
        .unwrap_or(text.len());
    text[start..end].trim().to_owned()
}

/// The words of the squashed `text` with their byte offsets.
fn words(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                out.push((s, &text[s..i]));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push((s, &text[s..]));
    }
    out
}

/// The number a README word states (`(38`, `2,000`, `11`), if it is one.
fn number(word: &str) -> Option<u64> {
    let digits = word.trim_matches(|c: char| !c.is_ascii_digit());
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == ',') {
        return None;
    }
    digits.replace(',', "").parse().ok()
}

/// `n` as the README writes counts in prose: `300`, `2,000`, `10,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.bytes().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(char::from(digit));
    }
    out
}

/// The word the README uses for a small count.
fn in_words(n: usize) -> &'static str {
    const WORDS: [&str; 11] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    WORDS.get(n).copied().unwrap_or("many")
}

/// Checks that the README says `expected` (squashed), the words that state a number
/// computed from the code; `why` says where the number comes from.
fn expect_words(readme: &str, expected: &str, why: &str, stale: &mut Vec<String>) {
    let expected = squash(expected);
    if readme.contains(&expected) {
        return;
    }
    // Where the stale number is: the words before it, or else the words after it.
    let head = &expected[..expected
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(expected.len())];
    let tail = expected
        .rfind(|c: char| c.is_ascii_digit())
        .map_or("", |i| &expected[i + 1..]);
    let found = [head, tail]
        .into_iter()
        .filter(|part| part.trim().len() >= 12)
        .find_map(|part| readme.find(part));
    match found {
        Some(at) => stale.push(format!(
            "README sentence {:?} is stale: it should say {expected:?} ({why})",
            sentence_around(readme, at)
        )),
        None => stale.push(format!(
            "the README should say {expected:?} ({why}): the sentence that states this number is stale"
        )),
    }
}

fn report(stale: &[String]) {
    assert!(
        stale.is_empty(),
        "stale README numbers:\n- {}",
        stale.join("\n- ")
    );
}

/// The identifiers listed in the `registry![ ... ]` of a case module.
fn registry(source: &str) -> Vec<String> {
    let start = source
        .find("registry![")
        .expect("a case module ends with its registry![ ... ]")
        + "registry![".len();
    let len = source[start..]
        .find(']')
        .expect("the registry![ ... ] is closed");
    let list: String = source[start..start + len]
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let cases: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    for name in &cases {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "not a case function in a registry: {name:?}"
        );
    }
    cases
}

#[test]
fn case_counts_are_the_registries() {
    let readme = readme();
    let bus = registry(include_str!("../crates/cloudbus-conformance/src/cases.rs")).len() as u64;
    let stream = registry(include_str!(
        "../crates/cloudbus-conformance/src/stream_cases.rs"
    ))
    .len() as u64;
    let store = registry(include_str!(
        "../crates/cloudbus-conformance/src/store_cases.rs"
    ))
    .len() as u64;
    let mut stale = Vec::new();
    expect_words(
        &readme,
        &format!("the conformance suite ({bus} conformance cases"),
        "the registry of crates/cloudbus-conformance/src/cases.rs",
        &mut stale,
    );
    expect_words(
        &readme,
        &format!("the stream conformance suite ({stream} stream conformance cases"),
        "the registry of crates/cloudbus-conformance/src/stream_cases.rs",
        &mut stale,
    );
    expect_words(
        &readme,
        &format!("the store conformance suite ({store} store conformance cases"),
        "the registry of crates/cloudbus-conformance/src/store_cases.rs",
        &mut stale,
    );
    // Every count of cases the README states, wherever it is, in one of the three
    // forms above.
    let all = words(&readme);
    for (i, &(at, word)) in all.iter().enumerate() {
        if word.trim_matches(|c: char| !c.is_alphanumeric()) != "cases" {
            continue;
        }
        let before = |back: usize| if i >= back { all[i - back].1 } else { "" };
        let (count, kind, registry_size) = if before(1) == "conformance" {
            match before(2) {
                "stream" => (number(before(3)), "stream conformance cases", stream),
                "store" => (number(before(3)), "store conformance cases", store),
                other => (number(other), "conformance cases", bus),
            }
        } else if let Some(n) = number(before(1)) {
            stale.push(format!(
                "README sentence {:?} states {n} cases without saying which: write \"N conformance cases\", \"N stream conformance cases\" or \"N store conformance cases\"",
                sentence_around(&readme, at)
            ));
            continue;
        } else {
            continue;
        };
        if let Some(count) = count
            && count != registry_size
        {
            stale.push(format!(
                "README sentence {:?} is stale: it says {count} {kind}, the registry has {registry_size}",
                sentence_around(&readme, at)
            ));
        }
    }
    report(&stale);
}

/// The variants of `FaultKind::ALL` in the chaos driver, and the length its type
/// states.
fn fault_kinds(chaos: &str) -> (usize, Vec<String>) {
    let head = "pub const ALL: [FaultKind; ";
    let start = chaos.find(head).expect("FaultKind::ALL in chaos.rs") + head.len();
    let stated: usize = chaos[start..]
        .split(']')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("FaultKind::ALL's length");
    let list_start = start + chaos[start..].find('[').expect("FaultKind::ALL's list") + 1;
    let list_len = chaos[list_start..]
        .find("];")
        .expect("FaultKind::ALL's end");
    let variants = chaos[list_start..list_start + list_len]
        .split(',')
        .map(str::trim)
        .filter_map(|v| v.strip_prefix("FaultKind::"))
        .map(str::to_owned)
        .collect();
    (stated, variants)
}

#[test]
fn fault_kinds_are_the_chaos_drivers() {
    let readme = readme();
    let chaos = include_str!("../crates/cloudbus-conformance/src/chaos.rs");
    let runner = include_str!("../crates/cloudbus-conformance/src/runner.rs");
    let (stated, variants) = fault_kinds(chaos);
    assert_eq!(stated, variants.len(), "FaultKind::ALL's length and list");
    let mut stale = Vec::new();
    let kinds = variants.len() as u64;
    expect_words(
        &readme,
        &format!("runs one test per fault kind ({kinds} fault kinds, `FaultKind::ALL`)"),
        "FaultKind::ALL in crates/cloudbus-conformance/src/chaos.rs",
        &mut stale,
    );
    // Streams run all but over-fetching (Suite::stream_chaos skips it).
    assert!(
        runner.contains("if kind == FaultKind::OverFetch {"),
        "Suite::stream_chaos no longer skips OverFetch: the README's count of stream fault kinds is stale"
    );
    expect_words(
        &readme,
        &format!(
            "over-fetching does not apply to a stream read, so {} fault kinds",
            kinds - 1
        ),
        "FaultKind::ALL less OverFetch, as Suite::stream_chaos runs them",
        &mut stale,
    );
    let all = words(&readme);
    for (i, &(at, word)) in all.iter().enumerate() {
        if i < 2 || word.trim_matches(|c: char| !c.is_alphanumeric()) != "kinds" {
            continue;
        }
        if all[i - 1].1 != "fault" {
            continue;
        }
        if let Some(n) = number(all[i - 2].1)
            && n != kinds
            && n != kinds - 1
        {
            stale.push(format!(
                "README sentence {:?} is stale: it says {n} fault kinds, FaultKind::ALL has {kinds}",
                sentence_around(&readme, at)
            ));
        }
    }
    // Each kind by the name its tests and the chaos table use.
    for variant in &variants {
        let arm = format!("FaultKind::{variant} => \"");
        let name_at = chaos.find(&arm).map(|i| i + arm.len());
        let Some(name) = name_at.and_then(|i| chaos[i..].split('"').next()) else {
            stale.push(format!("FaultKind::{variant} has no name in chaos.rs"));
            continue;
        };
        if !readme.contains(&format!("| {name} |")) {
            stale.push(format!(
                "the chaos table of the README has no row for the fault kind {name:?}"
            ));
        }
    }
    report(&stale);
}

/// The calls `.chaos(prefix, maker, count)` and `.stream_chaos(prefix, maker, count)`
/// of a provider's tests/conformance.rs: (method, prefix, count).
fn chaos_runs(source: &str) -> Vec<(&'static str, String, u64)> {
    let mut runs = Vec::new();
    for method in ["chaos", "stream_chaos"] {
        let call = format!(".{method}(");
        let mut from = 0;
        while let Some(found) = source[from..].find(&call) {
            let open = from + found + call.len();
            // The arguments, up to the parenthesis that closes the call.
            let mut depth = 0usize;
            let mut close = None;
            for (i, c) in source[open..].char_indices() {
                match c {
                    '(' | '{' | '[' => depth += 1,
                    ')' | '}' | ']' if depth > 0 => depth -= 1,
                    ')' => {
                        close = Some(open + i);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.expect("a closed .chaos( call");
            let arguments = &source[open..close];
            // The top-level arguments.
            let mut parts = Vec::new();
            let mut depth = 0usize;
            let mut part_start = 0;
            for (i, c) in arguments.char_indices() {
                match c {
                    '(' | '{' | '[' => depth += 1,
                    ')' | '}' | ']' => depth = depth.saturating_sub(1),
                    ',' if depth == 0 => {
                        parts.push(arguments[part_start..i].trim());
                        part_start = i + 1;
                    }
                    _ => {}
                }
            }
            parts.push(arguments[part_start..].trim());
            parts.retain(|p| !p.is_empty());
            let prefix = parts
                .first()
                .map(|p| p.trim_matches('"').to_owned())
                .expect("a prefix");
            let count = parts
                .last()
                .and_then(|p| p.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("the event count of .{method}({prefix:?}, ...)"));
            runs.push((method, prefix, count));
            from = close;
        }
    }
    runs
}

/// The event count of the run `method` named `prefix` in `source`.
fn chaos_run(source: &str, file: &str, method: &str, prefix: &str) -> u64 {
    chaos_runs(source)
        .into_iter()
        .find(|(m, p, _)| *m == method && p == prefix)
        .map(|(_, _, count)| count)
        .unwrap_or_else(|| panic!("{file} has no .{method}({prefix:?}, ...)"))
}

#[test]
fn chaos_runs_are_the_sizes_the_provider_tests_give() {
    let readme = readme();
    let memory = include_str!("../crates/cloudbus-memory/tests/conformance.rs");
    let gcp = include_str!("../crates/cloudbus-gcp/tests/conformance.rs");
    let aws = include_str!("../crates/cloudbus-aws/tests/conformance.rs");
    let azure = include_str!("../crates/cloudbus-azure/tests/conformance.rs");
    let memory_file = "crates/cloudbus-memory/tests/conformance.rs";
    let aws_file = "crates/cloudbus-aws/tests/conformance.rs";
    let mut stale = Vec::new();

    let n = chaos_run(memory, memory_file, "chaos", "chaos");
    expect_words(
        &readme,
        &format!(
            "It runs in `scripts/test.sh` on the memory broker ({} events)",
            thousands(n)
        ),
        "the .chaos count of crates/cloudbus-memory/tests/conformance.rs",
        &mut stale,
    );
    let n = chaos_run(
        gcp,
        "crates/cloudbus-gcp/tests/conformance.rs",
        "chaos",
        "chaos",
    );
    expect_words(
        &readme,
        &format!("the Pub/Sub emulator ({})", thousands(n)),
        "the .chaos count of crates/cloudbus-gcp/tests/conformance.rs",
        &mut stale,
    );
    let sqs = [
        "sqs_chaos",
        "sqs_fifo_chaos",
        "sns_chaos",
        "eventbridge_chaos",
    ]
    .map(|prefix| chaos_run(aws, aws_file, "chaos", prefix));
    if sqs.iter().any(|n| *n != sqs[0]) {
        stale.push(format!(
            "README sentence \"... SNS into SQS and EventBridge into SQS on LocalStack (N each)\" is stale: {aws_file} runs {sqs:?}"
        ));
    }
    expect_words(
        &readme,
        &format!(
            "SNS into SQS and EventBridge into SQS on LocalStack ({} each)",
            thousands(sqs[0])
        ),
        "the .chaos counts of crates/cloudbus-aws/tests/conformance.rs",
        &mut stale,
    );
    let n = chaos_run(
        azure,
        "crates/cloudbus-azure/tests/conformance.rs",
        "chaos",
        "servicebus_chaos",
    );
    expect_words(
        &readme,
        &format!(
            "a Service Bus queue on the project's emulator ({})",
            thousands(n)
        ),
        "the .chaos count of crates/cloudbus-azure/tests/conformance.rs",
        &mut stale,
    );
    let log = chaos_run(memory, memory_file, "stream_chaos", "chaos");
    let kinesis = chaos_run(aws, aws_file, "stream_chaos", "kinesis_chaos");
    expect_words(
        &readme,
        &format!(
            "it runs on the memory log, {} events, and on Kinesis on LocalStack, {};",
            thousands(log),
            thousands(kinesis)
        ),
        "the .stream_chaos counts of the memory broker's and AWS's tests/conformance.rs",
        &mut stale,
    );
    // The Tests section shows the memory broker's file as it is.
    let main = &memory[memory.find("fn main()").expect("its main")..];
    if !readme.contains(&squash(main)) {
        stale.push(format!(
            "the README's copy of the main of {memory_file} (in its Tests section) is stale"
        ));
    }
    report(&stale);
}

#[test]
fn memory_broker_limits_and_label_cap_are_the_defaults() {
    let readme = readme();
    let config = cloudbus::memory::BrokerConfig::default();
    let mib = 1024 * 1024;
    let mut stale = Vec::new();
    assert!(config.max_message_bytes.is_multiple_of(mib), "whole MiB");
    assert!(config.max_batch_bytes.is_multiple_of(mib), "whole MiB");
    expect_words(
        &readme,
        &format!(
            "| {} MiB / {} events, {} MiB (configurable) |",
            config.max_message_bytes / mib,
            config.max_batch_count,
            config.max_batch_bytes / mib
        ),
        "cloudbus::memory::BrokerConfig::default()",
        &mut stale,
    );
    expect_words(
        &readme,
        &format!(
            "(`BrokerConfig::retained_per_topic`, {} by default)",
            thousands(config.retained_per_topic as u64)
        ),
        "cloudbus::memory::BrokerConfig::default().retained_per_topic",
        &mut stale,
    );
    expect_words(
        &readme,
        &format!(
            "keep their first {} values",
            cloudbus::telemetry::MAX_LABEL_VALUES
        ),
        "cloudbus::telemetry::MAX_LABEL_VALUES",
        &mut stale,
    );
    report(&stale);
}

/// The `members` of the workspace's Cargo.toml.
fn workspace_members(manifest: &str) -> Vec<String> {
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members = ["))
        .expect("the workspace's members on one line");
    let list = line
        .split('[')
        .nth(1)
        .and_then(|l| l.split(']').next())
        .expect("members = [ ... ]");
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// The first path of each row of the README's layout table, and whether any table
/// follows it.
fn layout_rows(readme: &str) -> (Vec<String>, bool) {
    let lines: Vec<&str> = readme.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.trim() == "| path | what |")
        .expect("the README's layout table (| path | what |)");
    let mut rows = Vec::new();
    let mut rest = lines[header + 1..].iter();
    for line in rest.by_ref() {
        if !line.starts_with('|') {
            break;
        }
        if line.starts_with("|---") {
            continue;
        }
        if let Some(path) = line.strip_prefix("| `").and_then(|l| l.split('`').next()) {
            rows.push(path.to_owned());
        }
    }
    let another_table = rest.any(|l| l.starts_with('|'));
    (rows, another_table)
}

#[test]
fn the_workspace_is_what_the_layout_lists_last_and_sorted() {
    let readme = readme();
    let members = workspace_members(include_str!("../Cargo.toml"));
    let mut stale = Vec::new();
    expect_words(
        &readme,
        &format!(
            "the `cloudbus` facade (the root package) and {} workspace members",
            members.len()
        ),
        "the members of the workspace's Cargo.toml",
        &mut stale,
    );
    let (rows, another_table) = layout_rows(README);
    if another_table {
        stale.push("the layout table is no longer the README's last table".to_owned());
    }
    for pair in rows.windows(2) {
        if pair[0] > pair[1] {
            stale.push(format!(
                "the layout table is not sorted by path: {:?} comes before {:?}",
                pair[0], pair[1]
            ));
        }
    }
    for member in &members {
        if !rows.iter().any(|r| r.trim_end_matches('/') == member) {
            stale.push(format!(
                "the layout table has no row for the workspace member {member}"
            ));
        }
    }
    report(&stale);
}

#[test]
fn counts_of_the_examples_schemes_and_module_loops() {
    let readme = readme();
    let mut stale = Vec::new();

    let saga = include_str!("../examples/order_saga/main.rs");
    let routers = saga.matches("Router::new()").count();
    expect_words(
        &readme,
        &format!("{} routers of plain async functions", in_words(routers)),
        "the Router::new() calls of examples/order_saga/main.rs",
        &mut stale,
    );

    // The schemes `connect` names in its error, in its order.
    let facade = include_str!("../src/lib.rs");
    let table_start = facade
        .find("const FEATURE_OF_SCHEME")
        .expect("FEATURE_OF_SCHEME in src/lib.rs");
    let table_end = table_start + facade[table_start..].find("];").expect("its end");
    let schemes: Vec<&str> = facade[table_start..table_end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("(\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    expect_words(
        &readme,
        &format!("cloudbus knows {}", schemes.join(", ")),
        "FEATURE_OF_SCHEME in src/lib.rs",
        &mut stale,
    );
    for scheme in &schemes {
        if !readme.contains(&format!("| `{scheme}://")) {
            stale.push(format!(
                "the provider table has no row for the {scheme}:// URL"
            ));
        }
    }

    let allowed = include_str!("../scripts/module-cycles.allowed");
    let loops = allowed
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .count();
    let mut phrase = format!("imports it back: {loops} loops");
    if loops == 0 {
        phrase.push_str(", and `scripts/module-cycles.allowed` lists none");
    }
    expect_words(
        &readme,
        &phrase,
        "the loops listed in scripts/module-cycles.allowed",
        &mut stale,
    );
    report(&stale);
}

/// A number the README states and the code that makes it so.
struct Fact {
    /// The README's words that state it (found after squashing whitespace).
    readme: &'static str,
    /// The file that makes it so, from the repository root.
    file: &'static str,
    /// That file's text.
    text: &'static str,
    /// What the file says (each found after squashing whitespace).
    code: &'static [&'static str],
}

macro_rules! fact {
    ($readme:expr, $file:literal, [$($code:expr),+ $(,)?]) => {
        Fact {
            readme: $readme,
            file: $file,
            text: include_str!(concat!("../", $file)),
            code: &[$($code),+],
        }
    };
}

/// The README's limits, defaults, sizes, versions and ports, with their code.
fn facts() -> Vec<Fact> {
    vec![
        // What it is.
        fact!(
            "CloudEvents 1.0 as the envelope everywhere",
            "crates/cloudbus-driver/src/codec.rs",
            ["if spec != \"1.0\" {"]
        ),
        fact!(
            "MSRV: Rust 1.94.1",
            "Cargo.toml",
            ["rust-version = \"1.94.1\""]
        ),
        fact!("Edition 2024.", "Cargo.toml", ["edition = \"2024\""]),
        // Providers.
        fact!(
            "(`ensure_topic` makes 2 shards;",
            "crates/cloudbus-aws/src/kinesis.rs",
            ["Self::with_shards(config, 2)"]
        ),
        fact!(
            "any `azure_core` 0.25 `TokenCredential`",
            "crates/cloudbus-azure/Cargo.toml",
            ["azure_core = { version = \"0.25\""]
        ),
        fact!(
            "directly on fe2o3-amqp 0.18 (with its CBS and management crates)",
            "crates/cloudbus-azure/Cargo.toml",
            [
                "fe2o3-amqp = { version = \"0.18.",
                "fe2o3-amqp-cbs = { version = \"0.18\"",
                "fe2o3-amqp-management = { version = \"0.18\"",
            ]
        ),
        fact!(
            "`cloudbus = { version = \"0.1\", features = [\"azure\"] }`",
            "Cargo.toml",
            ["version = \"0.1.0\""]
        ),
        fact!(
            "serves the same emulator on 8085",
            "docker-compose.yml",
            ["\"127.0.0.1:8085:8085\""]
        ),
        fact!(
            "PUBSUB_EMULATOR_HOST=127.0.0.1:8085",
            "scripts/pubsub-emulator.sh",
            ["Port: $PUBSUB_EMULATOR_PORT, else 8085"]
        ),
        fact!(
            "AWS_ENDPOINT_URL=http://127.0.0.1:4566",
            "scripts/localstack.sh",
            ["port=\"${LOCALSTACK_PORT:-4566}\""]
        ),
        fact!(
            "starts it in host mode on 127.0.0.1:4566",
            "scripts/localstack.sh",
            ["port=\"${LOCALSTACK_PORT:-4566}\""]
        ),
        fact!(
            "starts it on 127.0.0.1:4567",
            "scripts/moto.sh",
            ["port=\"${MOTO_PORT:-4567}\""]
        ),
        fact!(
            "starts it on 127.0.0.1:10080",
            "scripts/eventgrid-emulator.sh",
            ["port=\"${EVENTGRID_PORT:-10080}\""]
        ),
        fact!(
            "starts it on 127.0.0.1:5672 (its management API over HTTPS on the next port)",
            "scripts/servicebus-emulator.sh",
            ["port=\"${SERVICEBUS_PORT:-5672}\"", "port + 1"]
        ),
        fact!(
            "throwaway PostgreSQL 15 and Redis servers",
            "scripts/postgres.sh",
            ["/usr/lib/postgresql/15/bin"]
        ),
        fact!(
            "LocalStack 2026.3 answers StartReplay",
            "scripts/localstack.sh",
            ["localstack-core[runtime]==2026.3."]
        ),
        // Capabilities.
        fact!(
            "events without a key are spread over 16 sessions",
            "crates/cloudbus-azure/src/servicebus/config.rs",
            ["UNKEYED_SESSIONS: usize = 16;"]
        ),
        fact!(
            "entities are made with duplicate detection (10 minutes)",
            "crates/cloudbus-azure/src/servicebus/admin.rs",
            ["<DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow>"]
        ),
        fact!(
            "DelaySeconds up to 900 s",
            "crates/cloudbus-aws/src/sqs/limits.rs",
            ["MAX_DELAY: Duration = Duration::from_secs(900);"]
        ),
        fact!(
            "maxReceiveCount (1000 when unset)",
            "crates/cloudbus-aws/src/sqs/topology.rs",
            ["DEFAULT_MAX_RECEIVES: u32 = 1000;"]
        ),
        fact!(
            "MaxDeliveryCount (10 when unset)",
            "crates/cloudbus-azure/src/servicebus/config.rs",
            ["DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;"]
        ),
        fact!(
            "the event subscription's retry policy (30 attempts, 24 h by default)",
            "crates/cloudbus-azure/src/eventgrid/push.rs",
            ["DEFAULT_MAX_ATTEMPTS: u32 = 30;", "within the default 24 h"]
        ),
        fact!(
            "the service's dead-letter policy (5..100); below 5 cloudbus enforces it",
            "crates/cloudbus-gcp/src/topology.rs",
            [
                "MIN_POLICY_ATTEMPTS: u32 = 5;",
                "MAX_POLICY_ATTEMPTS: u32 = 100;"
            ]
        ),
        fact!(
            "to the entity's LockDuration, 5 s to 5 min;",
            "crates/cloudbus-azure/src/servicebus/config.rs",
            [
                "MIN_LOCK: Duration = Duration::from_secs(5);",
                "MAX_LOCK: Duration = Duration::from_secs(300);",
            ]
        ),
        fact!(
            "is also renewed at half its life",
            "crates/cloudbus-azure/src/servicebus/link.rs",
            ["at half its life"]
        ),
        fact!(
            "| 256 KiB / 10 events, 256 KiB |",
            "crates/cloudbus-aws/src/sqs/limits.rs",
            [
                "MAX_MESSAGE_BYTES: usize = 256 * 1024;",
                "MAX_BATCH_COUNT: usize = 10;",
                "Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_MESSAGE_BYTES)",
            ]
        ),
        fact!(
            "| 256 KiB / 10 events (PublishBatch), 256 KiB |",
            "crates/cloudbus-aws/src/sns.rs",
            ["let mut c = sqs::capabilities(topic);"]
        ),
        fact!(
            "| 256 KiB / 10 entries (PutEvents), 256 KiB |",
            "crates/cloudbus-aws/src/eventbridge.rs",
            [
                "MAX_BATCH_COUNT: usize = 10;",
                "MAX_BATCH_BYTES: usize = 256 * 1024;",
                "c.max_message_bytes = MAX_BATCH_BYTES;",
            ]
        ),
        fact!(
            "| 1 MiB / 500 records (PutRecords), 5 MiB |",
            "crates/cloudbus-aws/src/kinesis.rs",
            [
                "MAX_BATCH_COUNT: usize = 500;",
                "MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;",
                "MAX_RECORD_BYTES: usize = 1024 * 1024;",
            ]
        ),
        fact!(
            "| 256 KiB (Standard tier) / 4500 events, 16 MiB per send, in transfers of the link's max-message-size (256 KiB when it sets none) |",
            "crates/cloudbus-azure/src/servicebus/config.rs",
            [
                "MAX_MESSAGE_BYTES: usize = 256 * 1024;",
                "MAX_TRANSFER_BYTES: usize = 256 * 1024;",
                "MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;",
                "MAX_BATCH_COUNT: usize = 4500;",
            ]
        ),
        fact!(
            "| 1 MiB per request (events and batch) / 1000 events |",
            "crates/cloudbus-azure/src/eventgrid/topic.rs",
            [
                "MAX_REQUEST_BYTES: usize = 1024 * 1024;",
                "MAX_BATCH_COUNT: usize = 1000;"
            ]
        ),
        fact!(
            "one POST per batch of up to 1 MiB",
            "crates/cloudbus-azure/src/eventgrid/topic.rs",
            ["MAX_REQUEST_BYTES: usize = 1024 * 1024;"]
        ),
        fact!(
            "| 9.9 MB / 1000 events, 9.9 MB |",
            "crates/cloudbus-gcp/src/capabilities.rs",
            [
                "MAX_MESSAGE_BYTES: usize = 9_900_000;",
                "MAX_BATCH_COUNT: usize = 1000;",
                "Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_MESSAGE_BYTES)",
            ]
        ),
        // CloudEvents mapping.
        fact!(
            "Past 92 attributes (Pub/Sub allows 100; cloudbus keeps 8)",
            "crates/cloudbus-gcp/src/config.rs",
            [
                "MAX_ATTRIBUTES: usize = 100;",
                "RESERVED_ATTRIBUTES: usize = 8;"
            ]
        ),
        fact!(
            "at most 8 of SQS's 10 attributes (2 kept for",
            "crates/cloudbus-aws/src/sqs/wire.rs",
            [
                "MAX_ATTRIBUTES: usize = 10;",
                "RESERVED_ATTRIBUTES: usize = 2;"
            ]
        ),
        fact!(
            "the same codec and 10-attribute budget",
            "crates/cloudbus-aws/src/sqs/wire.rs",
            ["MAX_ATTRIBUTES: usize = 10;"]
        ),
        // The router and typed events.
        fact!(
            "`version` (default 1)",
            "crates/cloudbus-core/src/typed.rs",
            ["const VERSION: u32 = 1;"]
        ),
        // Operations.
        fact!(
            "dead letters appearing and above 1%, handler failures above 5%",
            "deploy/prometheus/alerts.yml",
            ["> 0.01", "> 0.05"]
        ),
        fact!(
            "$ curl -s 127.0.0.1:9898/health/ready",
            "examples/telemetry/metrics_server.rs",
            ["\"127.0.0.1:9898\""]
        ),
        fact!(
            "or when it holds 10,000.",
            "crates/cloudbus-cli/src/tail.rs",
            ["MOST_HELD: usize = 10_000;"]
        ),
        fact!(
            "is one `error:` line and exit 2 (input) or 1 (the operation failed)",
            "crates/cloudbus-cli/src/failure.rs",
            ["(1: the operation failed, 2: bad"]
        ),
        fact!(
            "exits 1 when NEW is not backward compatible with OLD",
            "crates/cloudbus-cli/src/schema.rs",
            ["1 with each problem and its path when it is not"]
        ),
        // Tests.
        fact!(
            "it checks that 169.254.169.254 is unreachable there",
            "scripts/test.sh",
            ["/dev/tcp/169.254.169.254/80"]
        ),
        fact!(
            "come back only after the 10 s stream deadline",
            "crates/cloudbus-gcp/src/subscription.rs",
            [
                "STREAM_ACK_DEADLINE: Duration = Duration::from_secs(10);",
                "(10 s is the floor)",
            ]
        ),
        // Reliability.
        fact!(
            "sends 200 events per fault kind through the chaos driver",
            "crates/cloudbus-azure/tests/azure.rs",
            ["let count = 200;"]
        ),
        fact!(
            "at random every 300-700 ms; 10,000 events",
            "crates/cloudbus-conformance/src/network.rs",
            ["proxy.start_chaos(seed, 300..700);"]
        ),
        fact!(
            "at random every 300-700 ms; 10,000 events",
            "crates/cloudbus-aws/tests/aws.rs",
            [
                "async fn sqs_network_faults_lose_nothing_of_10000() {",
                "&sub, 10_000, Duration::from_secs(15 * 60),",
            ]
        ),
        fact!(
            "(in CI with 2,000; `CLOUDBUS_NETFAULT_EVENTS=10000` for this row)",
            "crates/cloudbus-azure/tests/azure.rs",
            [
                "std::env::var(\"CLOUDBUS_NETFAULT_EVENTS\")",
                ".unwrap_or(2_000),"
            ]
        ),
        fact!(
            "The worker tries an ack that failed transiently twice more",
            "crates/cloudbus-core/src/worker.rs",
            ["ACK_ATTEMPTS: u32 = 3;"]
        ),
        fact!(
            "replays the corpus and 20,000 seeded mutations",
            "tests/fuzz_corpus.rs",
            ["run_corpus(&corpus, 20_000, 12)"]
        ),
        // Failure modes.
        fact!(
            "a handler longer than the claim lease renews its claim every third of it",
            "crates/cloudbus-core/src/idempotency.rs",
            ["(self.lease / 3)"]
        ),
        fact!(
            "up to one claim lease, default 30 s",
            "crates/cloudbus-core/src/idempotency.rs",
            ["DEFAULT_CLAIM_LEASE: Duration = Duration::from_secs(30);"]
        ),
        fact!(
            "\"no schema\" believed for 60 s; at most 1,024 types and versions cached",
            "crates/cloudbus-core/src/schema/validator.rs",
            [
                "recheck_missing: Duration::from_secs(60),",
                "DEFAULT_MAX_CACHED: usize = 1024;"
            ]
        ),
        fact!(
            "each read bounded by 2 s, failures back off to one read a minute",
            "crates/cloudbus-core/src/worker.rs",
            [
                "DEPTH_TIMEOUT: Duration = Duration::from_secs(2);",
                "DEPTH_MOST_PAUSE: Duration = Duration::from_secs(60);",
            ]
        ),
        fact!(
            "a publish is bounded (`publish_timeout`, 2 min) and its rows given back; a round renews its claim every third of the lease",
            "crates/cloudbus-store/src/outbox.rs",
            ["publish_timeout: Duration::from_secs(120),", "(lease / 3)"]
        ),
        fact!(
            "a handler past the deadline (25 s) is cancelled",
            "crates/cloudbus-azure/src/eventgrid/push.rs",
            ["DEFAULT_DEADLINE: Duration = Duration::from_secs(25);"]
        ),
        fact!(
            "against `max_attempts` (default 30)",
            "crates/cloudbus-azure/src/eventgrid/push.rs",
            ["DEFAULT_MAX_ATTEMPTS: u32 = 30;"]
        ),
        fact!(
            "renewals go 100 lock tokens per RenewLock",
            "crates/cloudbus-azure/src/servicebus/receiver.rs",
            ["RENEW_BATCH: usize = 100;"]
        ),
        // Benchmark.
        fact!(
            "with 1 and 4 consumers",
            "benches/throughput.rs",
            ["\"memory_e2e_1_consumer\"", "\"memory_e2e_4_consumers\"",]
        ),
        fact!(
            "Events carry about 1 KiB of JSON.",
            "benches/throughput.rs",
            ["about 1 KiB of JSON"]
        ),
        fact!(
            "--bench gcp` publishes then consumes 10,000 events",
            "crates/cloudbus-gcp/benches/gcp.rs",
            [".unwrap_or(10_000);"]
        ),
        fact!(
            "(batches of 1,000, flow control of 1,000), an untimed warm-up round of each side",
            "crates/cloudbus-gcp/benches/gcp.rs",
            [
                ".set_message_count_threshold(1000)",
                ".set_max_outstanding_messages(1000)",
                "cloudbus_round(&driver, events(WARM_UP)).await;",
                "raw_round(&driver, &emulator.address, encoded(&events(WARM_UP))).await;",
            ]
        ),
        fact!(
            "then six rounds alternating who goes first",
            "crates/cloudbus-gcp/benches/gcp.rs",
            [".unwrap_or(6)"]
        ),
        fact!(
            "(goals: cloudbus end to end within 5% of raw, publish >= 0.9x). It starts the emulator if",
            "crates/cloudbus-gcp/benches/gcp.rs",
            ["(goals: end-to-end >= 0.95, publish >= 0.9)"]
        ),
        fact!(
            "ordering key go in full batches, up to 16 in flight at once",
            "crates/cloudbus-core/src/publisher.rs",
            ["const MAX_UNKEYED_BATCHES_AT_ONCE: usize = 16;"]
        ),
        fact!(
            "--bench aws` publishes then consumes 5,000 events",
            "crates/cloudbus-aws/benches/aws.rs",
            [".unwrap_or(5_000);"]
        ),
        fact!(
            "with the same batching (10 per call, 4 in flight)",
            "crates/cloudbus-aws/benches/aws.rs",
            ["encoded.chunks(10)", ".buffer_unordered(4)"]
        ),
        fact!(
            "(goals: within 5% of raw batched, 5x one-by-one, 1.5x omniqueue)",
            "crates/cloudbus-aws/benches/aws.rs",
            ["(goal >= 0.95)", "(goal >= 5)", "(goal >= 1.5)"]
        ),
        fact!(
            "--bench azure` publishes 5,000 events of about 1 KiB",
            "crates/cloudbus-azure/benches/azure.rs",
            [".unwrap_or(5_000);", "~1 KiB JSON body"]
        ),
        fact!(
            "(up to 1,000 per receive, completed together)",
            "crates/cloudbus-azure/benches/azure.rs",
            [".receive_batch(1000, Duration::from_secs(5))"]
        ),
        fact!(
            "(`BENCH_ROUNDS`, default 9)",
            "crates/cloudbus-azure/benches/azure.rs",
            [".unwrap_or(9)"]
        ),
        fact!(
            "the ratios (goal: cloudbus end to end within 5% of raw) and the CPU each side cost per 1,000 events",
            "crates/cloudbus-azure/benches/azure.rs",
            [
                "(goal: end-to-end >= 0.95)",
                "CPU milliseconds per 1,000 events"
            ]
        ),
    ]
}

#[test]
fn every_stated_limit_default_and_version_is_the_codes() {
    let readme = readme();
    let mut stale = Vec::new();
    for fact in facts() {
        let words = squash(fact.readme);
        let Some(at) = readme.find(&words) else {
            stale.push(format!(
                "the README no longer says {words:?}: update its check in tests/readme_numbers.rs (against {}) with the README",
                fact.file
            ));
            continue;
        };
        let code = squash(fact.text);
        let mut missing = String::new();
        for want in fact.code {
            if !code.contains(&squash(want)) {
                let _ = write!(missing, " `{want}`");
            }
        }
        if !missing.is_empty() {
            stale.push(format!(
                "README sentence {:?} is stale: {} no longer has{missing}",
                sentence_around(&readme, at),
                fact.file
            ));
        }
    }
    report(&stale);
}

#[test]
fn the_checks_helpers_read_what_they_should() {
    assert_eq!(thousands(300), "300");
    assert_eq!(thousands(2_000), "2,000");
    assert_eq!(thousands(1_057_851), "1,057,851");
    assert_eq!(number("(38"), Some(38));
    assert_eq!(number("2,000"), Some(2_000));
    assert_eq!(number("1.0"), None);
    assert_eq!(number("cases"), None);
    assert_eq!(
        registry("x = registry![\n    a_case, // why\n    b_case,\n];"),
        ["a_case", "b_case"]
    );
    let runs = chaos_runs(
        ".chaos(\"p\", || async { h(|x| X { a: 1, b: 2 }) }, 2_000)\n.stream_chaos(\"s\", || async { None }, 300,\n)",
    );
    assert_eq!(
        runs,
        [
            ("chaos", "p".to_owned(), 2_000),
            ("stream_chaos", "s".to_owned(), 300)
        ]
    );
    let text = squash("One. The sentence with 36 cases in it. Another.");
    let at = text.find("36").unwrap();
    assert_eq!(
        sentence_around(&text, at),
        "The sentence with 36 cases in it."
    );
}
