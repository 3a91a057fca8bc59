//! What the provider tests and benches share: a required environment variable (an
//! emulator's address, a server's URL) that the tests skip loudly without, except
//! under `CI=true`; and, for benches, an emulator found through its variable or
//! started with the project's script (`scripts/*.sh` of the cloudbus repository,
//! given as a path) and stopped at the end.

/// The value of `var`, which `tests` need (an emulator's address, a server's URL, a
/// python with the clients they run), or `None` after a loud `SKIPPED:` line when it
/// is unset or blank. Under `CI=true` a missing one panics instead: CI never passes
/// by skipping. `starter` says what provides it (`"scripts/test.sh starts it"`).
///
/// ```
/// use cloudbus_conformance::emulator::required_env;
/// let path = required_env("PATH", "this example", "the shell sets it");
/// assert!(path.is_some());
/// ```
pub fn required_env(var: &str, tests: &str, starter: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but {var} is not set: {tests} need it ({starter})")
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set, so {tests} did not run ({starter})");
            None
        }
    }
}

/// A running emulator.
pub struct Emulator {
    /// Its address, as the environment variable gives it.
    pub address: String,
    /// The process group to stop, when this bench started it.
    pid: Option<String>,
}

impl Emulator {
    /// The process (group) this bench started, if it started one.
    pub fn pid(&self) -> Option<&str> {
        self.pid.as_deref()
    }

    /// Uses `env` when set; otherwise runs `script`, which prints `env=...` and
    /// `pid_key=...` lines (scripts/pubsub-emulator.sh, scripts/localstack.sh).
    pub fn find_or_start(env: &str, script: &str, pid_key: &str) -> Emulator {
        if let Ok(address) = std::env::var(env) {
            return Emulator { address, pid: None };
        }
        let out = std::process::Command::new("bash")
            .arg(script)
            .output()
            .unwrap_or_else(|e| panic!("could not run {script}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_owned))
        };
        match (get(env), get(pid_key)) {
            (Some(address), Some(pid)) => Emulator {
                address,
                pid: Some(pid),
            },
            _ => panic!(
                "{script} did not start the emulator: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(pid) = &self.pid {
            let _ = std::process::Command::new("kill")
                .arg("--")
                .arg(format!("-{pid}"))
                .status();
        }
    }
}

/// CPU seconds the process `pid` (`"self"` for this one) has used so far, user plus
/// system, all its threads, from /proc: what a bench reports per event beside its
/// rates, as it varies less from run to run than they do on a shared machine.
/// `None` where /proc does not have it.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
