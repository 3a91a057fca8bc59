//! The operations files under `deploy/`: the Prometheus alerts pass `promtool check
//! rules` and their unit tests (`promtool test rules`), and the Grafana dashboard is a
//! dashboard whose queries parse as PromQL and name only metrics cloudbus records.
//!
//! promtool comes from $PROMTOOL (scripts/test.sh sets it with scripts/promtool.sh) or
//! PATH. Without one these tests skip loudly; under CI=true they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use cloudbus::telemetry::names;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// promtool, or None (after saying so) when there is none outside CI.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PROMTOOL").map(PathBuf::from).or_else(|| {
        Command::new("promtool")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| PathBuf::from("promtool"))
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and no promtool: set PROMTOOL (scripts/promtool.sh)"
        );
        eprintln!("SKIPPED: no promtool (set PROMTOOL, see scripts/promtool.sh)");
    }
    found
}

fn run(promtool: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The metric names a PromQL expression reads: identifiers that are not functions
/// (followed by `(`), keywords, label names (inside `{}` or after `by`/`on`/...), or
/// inside strings and range selectors.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregations, which may stand before `by (...)` rather than `(`.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    // Depth of `{}` and `[]`, and whether the parenthesis just opened lists labels.
    let (mut braces, mut brackets) = (0, 0);
    let mut label_list = false;
    let mut last_word = String::new();
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            '(' => {
                label_list = matches!(
                    last_word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
            }
            ')' => label_list = false,
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric()
                        || chars[i + 1] == '_'
                        || chars[i + 1] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..=i].iter().collect();
                let mut next = i + 1;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let is_function = chars.get(next) == Some(&'(');
                let in_number = start > 0 && chars[start - 1].is_ascii_digit();
                if braces == 0
                    && brackets == 0
                    && !label_list
                    && !is_function
                    && !in_number
                    && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                {
                    names.push(word.clone());
                }
                last_word = word;
                i += 1;
                continue;
            }
            _ => {}
        }
        if !c.is_whitespace() {
            last_word.clear();
        }
        i += 1;
    }
    names
}

/// Whether cloudbus records `name` (a histogram's series included).
fn emitted(name: &str) -> bool {
    names::ALL.contains(&name)
        || names::HISTOGRAMS.iter().any(|h| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name == format!("{h}{suffix}"))
        })
}

#[test]
fn promql_metric_names_are_found() {
    assert_eq!(
        metric_names(
            r#"sum by (consumer, le) (rate(event_lag_seconds_bucket{consumer=~"$c"}[$__rate_interval])) / clamp_min(x_total, 1e-9) > 0.5 and on (consumer) y"#
        ),
        ["event_lag_seconds_bucket", "x_total", "y"]
    );
}

/// The alerts parse, their unit tests pass (each alert fires on its series and stays
/// quiet on a healthy consumer), and they read only metrics cloudbus records.
#[test]
fn prometheus_alerts_pass_promtool_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    // The expressions: `expr:` lines and the indented block after `expr: |`.
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            exprs.push(rest.to_owned());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() > indent.len() {
                block.push_str(next);
                block.push('\n');
                lines.next();
            } else {
                break;
            }
        }
        exprs.push(block);
    }
    assert_eq!(exprs.len(), 8, "alerts.yml: {exprs:?}");
    let read: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for name in &read {
        assert!(
            emitted(name),
            "alerts.yml reads {name}, which cloudbus does not record"
        );
    }
    for name in [
        names::DLQ_MESSAGES_TOTAL,
        names::EVENT_PROCESSING_ERRORS_TOTAL,
        "event_lag_seconds_bucket",
        names::EVENT_QUEUE_DEPTH,
    ] {
        assert!(read.iter().any(|r| r == name), "no alert reads {name}");
    }
    let Some(promtool) = promtool() else { return };
    let checked = run(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = run(&promtool, &["test", "rules", "alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The dashboard is a Grafana dashboard whose every query parses as PromQL (checked
/// by promtool as recording rules) and reads only metrics cloudbus records, and it
/// shows throughput, errors, lag, queue depth and dead letters.
#[test]
fn grafana_dashboard_queries_parse_and_read_recorded_metrics() {
    let text = std::fs::read_to_string(deploy().join("grafana/cloudbus.json"))
        .expect("deploy/grafana/cloudbus.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("a JSON dashboard");
    assert_eq!(dashboard["uid"], "cloudbus");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        let grid = &panel["gridPos"];
        assert!(
            ["h", "w", "x", "y"].iter().all(|k| grid[k].is_u64()),
            "{grid}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            exprs.push(target["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    let read: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for name in &read {
        assert!(
            emitted(name),
            "the dashboard reads {name}, which cloudbus does not record"
        );
    }
    for name in [
        names::EVENTS_PUBLISHED_TOTAL,
        names::EVENTS_CONSUMED_TOTAL,
        names::EVENT_PROCESSING_ERRORS_TOTAL,
        "event_lag_seconds_bucket",
        names::EVENT_QUEUE_DEPTH,
        names::EVENT_STREAM_LAG_SECONDS,
        names::DLQ_MESSAGES_TOTAL,
    ] {
        assert!(read.iter().any(|r| r == name), "no panel shows {name}");
    }
    // The template variables, as Grafana would substitute them.
    let Some(promtool) = promtool() else { return };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$consumer", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("quoted")
        ));
    }
    let dir = std::env::temp_dir().join(format!("cloudbus-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("dashboard.yml"), rules).expect("write rules");
    let checked = run(&promtool, &["check", "rules", "dashboard.yml"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{checked}"
    );
}
