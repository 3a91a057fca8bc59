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

/// How many dead letters one redrive or purge call takes, between updates of the bar.
const STEP: usize = 100;

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
            let moved = in_steps(max, "redriven", |step| {
                bounded("redrive failed", timeout, dlq.redrive(step))
            })
            .await?;
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
            let purged = in_steps(None, "purged", |step| {
                bounded("purge failed", timeout, dlq.purge_up_to(step))
            })
            .await?;
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

/// Runs `call` for [`STEP`] letters at a time (fewer for the last step of `max`) until
/// it takes less than it was asked or `max` is reached, counting up on a bar; returns
/// how many it took. A failure names how many were taken before it.
async fn in_steps<F, Fut>(max: Option<usize>, what: &str, mut call: F) -> Result<usize, Failure>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<usize, Failure>>,
{
    let bar = progress(max, what);
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut taken = 0;
    loop {
        let step = max.map_or(STEP, |m| (m - taken).min(STEP));
        if step == 0 {
            break;
        }
        let n = match call(step).await {
            Ok(n) => n,
            Err(e) => {
                bar.abandon();
                eprintln!("{taken} {what} before the failure");
                return Err(e);
            }
        };
        taken += n;
        bar.set_position(taken as u64);
        if n < step {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(taken)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A place holding `held` letters; records the steps it was asked for.
    async fn run_on(held: usize, max: Option<usize>) -> (usize, Vec<usize>) {
        let left = std::cell::Cell::new(held);
        let asked = std::cell::RefCell::new(Vec::new());
        let taken = in_steps(max, "purged", |step| {
            asked.borrow_mut().push(step);
            let n = step.min(left.get());
            left.set(left.get() - n);
            async move { Ok(n) }
        })
        .await
        .unwrap_or(usize::MAX);
        (taken, asked.into_inner())
    }

    #[tokio::test]
    async fn steps_until_the_place_runs_empty() {
        assert_eq!(run_on(250, None).await, (250, vec![100, 100, 100]));
        assert_eq!(run_on(200, None).await, (200, vec![100, 100, 100]));
        assert_eq!(run_on(0, None).await, (0, vec![100]));
    }

    #[tokio::test]
    async fn takes_no_more_than_max() {
        assert_eq!(run_on(500, Some(150)).await, (150, vec![100, 50]));
        assert_eq!(run_on(20, Some(150)).await, (20, vec![100]));
    }

    #[tokio::test]
    async fn a_failure_ends_the_steps() {
        let mut calls = 0;
        let result = in_steps(None, "purged", |_| {
            calls += 1;
            async move {
                if calls == 1 {
                    Ok(100)
                } else {
                    Err(Failure::failed("purge failed: gone"))
                }
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 2);
    }
}
