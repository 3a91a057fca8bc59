//! `cloudbus schema check OLD NEW`: whether the JSON Schema in NEW is backward
//! compatible with the one in OLD (see `cloudbus::schema::check_compatibility`): exit
//! 0 when it is, 1 with each problem and its path when it is not, 2 when a file cannot
//! be read or is not JSON.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::failure::Failure;

/// Schema commands.
#[derive(Subcommand, Debug)]
pub enum SchemaAction {
    /// Says whether NEW is backward compatible with OLD (consumers upgrade first).
    Check {
        /// The schema in use.
        old: PathBuf,
        /// The schema proposed.
        new: PathBuf,
    },
}

/// Runs the check.
pub fn run(action: SchemaAction) -> Result<(), Failure> {
    let SchemaAction::Check { old, new } = action;
    let (old_schema, new_schema) = (read(&old)?, read(&new)?);
    let verdict = cloudbus::schema::check_compatibility(&old_schema, &new_schema);
    if verdict.is_compatible() {
        println!(
            "{} is backward compatible with {}",
            new.display(),
            old.display()
        );
        Ok(())
    } else {
        print!(
            "{} is not backward compatible with {}: {verdict}",
            new.display(),
            old.display()
        );
        Err(Failure::failed(format!(
            "{} is not backward compatible with {}",
            new.display(),
            old.display()
        )))
    }
}

fn read(path: &Path) -> Result<serde_json::Value, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Failure::input(format!("{} is not JSON: {e}", path.display())))
}
