//! What the provider benches share: an emulator found through its environment
//! variable, or started with the project's script (`scripts/*.sh` of the cloudbus
//! repository, given as a path) and stopped at the end.

/// A running emulator.
pub struct Emulator {
    /// Its address, as the environment variable gives it.
    pub address: String,
    /// The process group to stop, when this bench started it.
    pid: Option<String>,
}

impl Emulator {
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
