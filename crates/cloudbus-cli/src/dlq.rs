//! `cloudbus dlq peek|redrive|purge URL TOPIC SUBSCRIPTION [--max N]`: the dead-letter
//! place of a subscription. Peek shows each dead letter with its reason and attempts;
//! redrive moves them back to the subscription and purge deletes them, both with a
//! progress bar; purge asks first unless `--yes`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::failure::{Failure, bounded, open};
use crate::render;

/// What to do with the dead letters.
#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// Shows dead letters without removing them.
    Peek {
        #[command(flatten)]
        place: Place,
        /// How many to show.
        #[arg(long, default_value_t = 10)]
        max: usize,
        /// One JSON line each.
        #[arg(long)]
        json: bool,
    },
    /// Moves dead letters back to the subscription.
    Redrive {
        #[command(flatten)]
        place: Place,
        /// How many to move (default: all).
        #[arg(long)]
        max: Option<usize>,
    },
    /// Deletes every dead letter.
    Purge {
        #[command(flatten)]
        place: Place,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// A subscription's dead-letter place.
#[derive(Args, Debug)]
pub struct Place {
    /// The provider URL.
    pub url: String,
    /// The topic.
    pub topic: String,
    /// The subscription whose dead letters these are.
    pub subscription: String,
}

/// How many dead letters one redrive call moves, between updates of the bar.
const REDRIVE_STEP: usize = 100;

/// Runs the action.
pub async fn run(action: DlqAction, timeout: Duration) -> Result<(), Failure> {
    match action {
        DlqAction::Peek { place, max, json } => {
            let dlq = dead_letters(&place, timeout).await?;
            let letters = bounded("cannot peek the dead letters", timeout, dlq.peek(max)).await?;
            if letters.is_empty() && !json {
                println!("no dead letters in {}/{}", place.topic, place.subscription);
            }
            for letter in &letters {
                println!("{}", render::dead_letter(letter, json).trim_end());
            }
            Ok(())
        }
        DlqAction::Redrive { place, max } => {
            let dlq = dead_letters(&place, timeout).await?;
            let bar = progress(max, "redriven");
            let mut moved = 0;
            loop {
                let step = max.map_or(REDRIVE_STEP, |m| (m - moved).min(REDRIVE_STEP));
                if step == 0 {
                    break;
                }
                let n = match bounded("redrive failed", timeout, dlq.redrive(step)).await {
                    Ok(n) => n,
                    Err(e) => {
                        bar.abandon();
                        eprintln!("{moved} redriven before the failure");
                        return Err(e);
                    }
                };
                moved += n;
                bar.set_position(moved as u64);
                if n < step {
                    break;
                }
            }
            bar.finish_and_clear();
            println!(
                "redriven {moved} dead letter(s) to {}/{}",
                place.topic, place.subscription
            );
            Ok(())
        }
        DlqAction::Purge { place, yes } => {
            if !yes && !confirm(&place)? {
                return Err(Failure::failed("purge not confirmed; nothing deleted"));
            }
            let dlq = dead_letters(&place, timeout).await?;
            let bar = progress(None, "purging");
            // A purge is one call; the bar shows that it runs.
            bar.enable_steady_tick(Duration::from_millis(100));
            let purged = bounded("purge failed", timeout * 10, dlq.purge()).await;
            bar.finish_and_clear();
            let purged = purged?;
            println!(
                "purged {purged} dead letter(s) of {}/{}",
                place.topic, place.subscription
            );
            Ok(())
        }
    }
}

async fn dead_letters(place: &Place, timeout: Duration) -> Result<cloudbus::DeadLetters, Failure> {
    let bus = open(&place.url, timeout).await?;
    bounded(
        &format!(
            "cannot open the dead letters of {}/{}",
            place.topic, place.subscription
        ),
        timeout,
        bus.dead_letters(&place.topic, &place.subscription),
    )
    .await
}

/// A bar on stderr (hidden when it is not a terminal), of `total` when known.
fn progress(total: Option<usize>, what: &str) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total as u64),
        None => ProgressBar::no_length(),
    };
    let template = match total {
        Some(_) => format!("{{spinner}} {what} {{pos}}/{{len}} [{{bar:30}}] {{per_sec}}"),
        None => format!("{{spinner}} {what} {{pos}} {{per_sec}} ({{elapsed}})"),
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Asks on the terminal; refuses when there is none to ask on.
fn confirm(place: &Place) -> Result<bool, Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::input(
            "purge deletes every dead letter: pass --yes to confirm (no terminal to ask on)",
        ));
    }
    eprint!(
        "delete every dead letter of {}/{} on {}? [y/N] ",
        place.topic, place.subscription, place.url
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::input(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
