//! What the benches share: recording each measured run and printing the median run of
//! each scenario, with the peak RSS of the process during it.

/// Resets the peak RSS (`VmHWM`), so that the next run reports its own.
#[allow(dead_code)] // not every bench resets it
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak RSS of the process since the last reset, in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One measured run: scenario, events, seconds, peak RSS in MB.
pub type Run = (String, usize, f64, f64);

static RUNS: std::sync::Mutex<Vec<Run>> = std::sync::Mutex::new(Vec::new());

/// Records one run; the lines are printed at the end, the median run per scenario.
pub fn report(name: &str, events: usize, secs: f64) -> f64 {
    if let Ok(mut runs) = RUNS.lock() {
        runs.push((name.to_owned(), events, secs, peak_rss_mb()));
    }
    events as f64 / secs
}

/// Prints the median run of each scenario (by rate) and returns the rates by name.
pub fn print_medians() -> std::collections::BTreeMap<String, f64> {
    let runs = RUNS.lock().map(|r| r.clone()).unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for r in &runs {
        if !names.contains(&r.0) {
            names.push(r.0.clone());
        }
    }
    let mut rates = std::collections::BTreeMap::new();
    for name in names {
        let mut of: Vec<&Run> = runs.iter().filter(|r| r.0 == name).collect();
        of.sort_by(|a, b| (a.1 as f64 / a.2).total_cmp(&(b.1 as f64 / b.2)));
        let (_, events, secs, rss) = of[of.len() / 2];
        let rate = *events as f64 / secs;
        println!(
            "scenario={name} events={events} secs={secs:.3} events_per_sec={rate:.0} peak_rss_mb={rss:.1}"
        );
        rates.insert(name, rate);
    }
    rates
}
