//! `cloudbus topology plan|apply -f topology.yaml [URL]`: topics, subscriptions,
//! filters and dead-letter policies declared once for any cloud. `plan` prints what
//! differs from what the provider holds (`+` create, `~` change, `=` as declared,
//! `?` cannot be read); `apply` makes it so, then plans again to check that nothing
//! is left, so running it twice changes nothing the second time.
//!
//! ```yaml
//! url: pubsub://my-project        # optional; the command line's URL wins
//! topics:
//!   - name: orders
//!     subscriptions:
//!       - name: billing
//!         filter:
//!           prefix: {attribute: type, prefix: com.example.order.}
//!         max_delivery_attempts: 5
//!         lease: 30s
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use cloudbus::topology::{self, Change, Topology};

use crate::failure::{Failure, bounded, open};

/// Plan or apply a topology file.
#[derive(Subcommand, Debug)]
pub enum TopologyAction {
    /// Prints what differs between the file and what the provider holds.
    Plan(TopologyArgs),
    /// Makes the provider hold what the file declares (idempotent).
    Apply(TopologyArgs),
}

/// The topology file and the provider.
#[derive(Args, Debug)]
pub struct TopologyArgs {
    /// The topology file (YAML or JSON).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// The provider URL (default: the file's `url`).
    pub url: Option<String>,
}

/// A topology from YAML (or JSON, which is YAML). Read as a JSON value first: the
/// portable filter is written as `prefix: {...}`, the map form of an enum, which
/// serde_yaml reads only as a `!prefix` tag.
fn parse(text: &str) -> Result<Topology, String> {
    let value: serde_json::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Reads and checks the topology file.
fn read(path: &PathBuf) -> Result<Topology, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read {}: {e}", path.display())))?;
    let topology = parse(&text)
        .map_err(|e| Failure::input(format!("{} is not a topology: {e}", path.display())))?;
    topology
        .subscriptions()
        .map_err(|e| Failure::of(&format!("{}", path.display()), &e))?;
    Ok(topology)
}

/// Runs the action.
pub async fn run(action: TopologyAction, timeout: Duration) -> Result<(), Failure> {
    let (args, applying) = match action {
        TopologyAction::Plan(args) => (args, false),
        TopologyAction::Apply(args) => (args, true),
    };
    let topology = read(&args.file)?;
    let url = args
        .url
        .clone()
        .or_else(|| topology.url.clone())
        .ok_or_else(|| {
            Failure::input(format!(
                "no provider URL: give one after the file or as `url:` in {}",
                args.file.display()
            ))
        })?;
    let bus = open(&url, timeout).await?;
    // A plan makes a few calls per subscription; the limit is for the whole of it.
    let calls = timeout * (2 + topology.topics.len() as u32 * 4);
    let plan = bounded("cannot plan", calls, topology::plan(&bus, &topology)).await?;
    println!("{plan}");
    if !applying || plan.is_empty() {
        return Ok(());
    }
    let applied = bounded("apply failed", calls, topology::apply(&bus, &plan)).await?;
    let after = bounded("cannot plan again", calls, topology::plan(&bus, &topology)).await?;
    let left: Vec<&Change> = after
        .changes
        .iter()
        .filter(|c| {
            c.is_change()
                && !matches!(
                    c,
                    Change::EnsureTopic(_) | Change::EnsureSubscription { .. }
                )
        })
        .collect();
    if !left.is_empty() {
        return Err(Failure::failed(format!(
            "applied {applied}, but the provider still differs:\n{after}"
        )));
    }
    println!("applied {applied} change(s) to {url}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_example_parses() {
        let yaml = "url: pubsub://my-project\ntopics:\n  - name: orders\n    subscriptions:\n      - name: billing\n        filter:\n          prefix: {attribute: type, prefix: com.example.order.}\n        max_delivery_attempts: 5\n        lease: 30s\n";
        let t = parse(yaml).unwrap();
        let specs = t.subscriptions().unwrap();
        assert_eq!(specs[0].lease, Duration::from_secs(30));
        assert_eq!(
            specs[0].filter,
            Some(cloudbus::Filter::prefix("type", "com.example.order."))
        );
        let example = parse(include_str!("../../../examples/topology.yaml")).unwrap();
        assert_eq!(example.subscriptions().unwrap().len(), 3);
        assert_eq!(example.url.as_deref(), Some("sns://"));
        let typo = parse("topics:\n  - name: orders\n    subscription: []\n").unwrap_err();
        assert!(typo.contains("subscription"), "{typo}");
    }
}
