//! Service Bus against its emulator (SERVICEBUS_CONNECTION_STRING): the conformance
//! suite on queues, topic subscriptions and session queues, and the "nothing lost"
//! promise under injected faults on a queue (issue 12). A test target with
//! `harness = false`: the cases come from the suite's registries
//! (`cloudbus_conformance::Suite`). Without the emulator the tests say so loudly and
//! pass, except under CI=true.

mod common;

use cloudbus_azure::servicebus::EntityKind;
use common::{ServiceBusHarness, servicebus};

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .bus("servicebus_queue", || async {
            servicebus().map(|_| ServiceBusHarness {
                entities: EntityKind::Queues,
                sessions: false,
            })
        })
        .chaos(
            "servicebus_chaos",
            || async {
                servicebus().map(|_| ServiceBusHarness {
                    entities: EntityKind::Queues,
                    sessions: false,
                })
            },
            200,
        )
        .bus("servicebus_topic_subscription", || async {
            servicebus().map(|_| ServiceBusHarness {
                entities: EntityKind::Topics,
                sessions: false,
            })
        })
        .bus("servicebus_session_queue", || async {
            servicebus().map(|_| ServiceBusHarness {
                entities: EntityKind::Queues,
                sessions: true,
            })
        })
        .run()
}
