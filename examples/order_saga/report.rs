//! What the saga prints: the timeline, the outcomes it counts, dead letters and the
//! summary.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Prints one line of the timeline.
#[derive(Clone)]
pub struct Timeline {
    pub start: Instant,
}

impl Timeline {
    pub fn log(&self, service: &str, line: impl std::fmt::Display) {
        println!(
            "[{:>6.1} ms] {service:<9} {line}",
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
}

#[derive(Default)]
pub struct Outcomes {
    pub confirmed: AtomicU64,
    pub cancelled: AtomicU64,
    pub per_type: Mutex<BTreeMap<String, u64>>,
    pub emails: AtomicU64,
}

impl Outcomes {
    pub fn finished(&self) -> u64 {
        self.confirmed.load(Ordering::SeqCst) + self.cancelled.load(Ordering::SeqCst)
    }
}

impl Outcomes {
    /// One line per event type: its count.
    pub fn per_type_lines(&self) -> String {
        let Ok(m) = self.per_type.lock() else {
            return String::new();
        };
        m.iter().map(|(t, n)| format!("\n  {t:<18} {n}")).collect()
    }
}

/// Prints the summary, one `label: value` line each.
pub fn summary(lines: &[(&str, String)]) {
    println!("\n=== summary");
    for (label, value) in lines {
        let label = format!("{label}:");
        println!("{label:<16} {value}");
    }
}

/// Peeks at the dead-letter queue until it holds `n` letters or more (at most 60 s).
pub async fn wait_for_letters(
    dlq: &cloudbus::DeadLetters,
    n: usize,
) -> cloudbus::Result<Vec<cloudbus::DeadLetter>> {
    let until = Instant::now() + Duration::from_secs(60);
    let mut letters = dlq.peek(10).await?;
    while letters.len() < n && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        letters = dlq.peek(10).await?;
    }
    Ok(letters)
}

pub fn show_letters(letters: &[cloudbus::DeadLetter]) {
    for l in letters {
        println!(
            "    {} | reason: {} | attempts: {}",
            cloudbus::describe_payload(&l.payload),
            l.reason.as_deref().unwrap_or("-"),
            l.attempts
        );
    }
}

pub async fn wait_for(outcomes: &Outcomes, finished: u64, patience: Duration) {
    let until = Instant::now() + patience;
    while outcomes.finished() < finished && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
