//! `cloudbus`: the command-line tool of the SDK. It opens any provider URL cloudbus
//! opens (`pubsub://project`, `sqs://`, `servicebus://namespace`, `mem://`, ...) and
//! sends events, tails a subscription, looks into and redrives or purges a
//! dead-letter place, plans and applies a topology file, and checks schema
//! compatibility for CI.
//!
//! Every failure is one line on stderr (`error: ...`) and a non-zero exit: 1 when the
//! operation failed (the broker refused or did not answer, a schema is not
//! compatible), 2 for bad input (usage, an unknown scheme, a provider left out of the
//! build, malformed data, an unreadable file).

mod dlq;
mod failure;
mod render;
mod schema;
mod send;
mod tail;
mod topology;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The cloudbus command-line tool: events in and out of any broker cloudbus opens.
#[derive(Parser, Debug)]
#[command(name = "cloudbus", version, about, long_about = None)]
struct Cli {
    /// How long one call to the broker may take before the tool gives up, in seconds.
    #[arg(long, global = true, default_value_t = 30, env = "CLOUDBUS_TIMEOUT")]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publishes events built from the flags.
    Send(send::SendArgs),
    /// Prints the events of a subscription as they arrive (and acknowledges them).
    Tail(tail::TailArgs),
    /// Looks into a subscription's dead-letter place, redrives or purges it.
    Dlq {
        #[command(subcommand)]
        action: dlq::DlqAction,
    },
    /// JSON Schema checks for CI.
    Schema {
        #[command(subcommand)]
        action: schema::SchemaAction,
    },
    /// Topics and subscriptions declared in a file: plan the difference, apply it.
    Topology {
        #[command(subcommand)]
        action: topology::TopologyAction,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Send(args) => send::run(args, timeout).await,
            Command::Tail(args) => tail::run(args, timeout).await,
            Command::Dlq { action } => dlq::run(action, timeout).await,
            Command::Schema { action } => schema::run(action),
            Command::Topology { action } => topology::run(action, timeout).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.one_line());
            ExitCode::from(failure.code())
        }
    }
}
