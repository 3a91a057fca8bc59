//! Where the services read and where their events go: one topic with a filtered
//! subscription per service when the bus fans out, else one queue per service with the
//! publishing side routing each event to the queues whose filter it matches.

use std::sync::Arc;

use cloudbus::{Bus, CloudEvent, Context, Event, Filter, Publisher, SubscriptionSpec};
use futures::future::try_join_all;

use crate::events::{
    OrderCancelled, OrderConfirmed, OrderCreated, PaymentFailed, PaymentSucceeded, StockReserved,
};

pub const TOPIC: &str = "saga";

/// The subscriptions of the saga's services: each reads the events its filter matches.
pub fn subscriptions() -> [(&'static str, Filter); 5] {
    [
        ("payment", Filter::eq("type", OrderCreated::TYPE)),
        ("inventory", Filter::eq("type", PaymentSucceeded::TYPE)),
        (
            "order",
            Filter::one_of("type", [StockReserved::TYPE, PaymentFailed::TYPE]),
        ),
        (
            "email",
            Filter::one_of("type", [OrderConfirmed::TYPE, OrderCancelled::TYPE]),
        ),
        ("analytics", Filter::prefix("type", "com.example.saga.")),
    ]
}

/// Where each service reads: one topic with filtered subscriptions when the bus fans
/// out, else one queue per service.
pub struct Routes {
    pub fan_out: bool,
}

impl Routes {
    /// Asks the bus whether it fans out, then declares the topics and subscriptions.
    pub async fn declare(bus: &Bus) -> cloudbus::Result<Routes> {
        let fan_out = bus.publisher(TOPIC).await?.capabilities().fan_out;
        let routes = Routes { fan_out };
        if fan_out {
            bus.ensure_topic(TOPIC).await?;
        }
        for (name, filter) in subscriptions() {
            let topic = routes.topic_of(name);
            let mut spec = SubscriptionSpec::new(&topic, routes.subscription_of(name))
                .max_delivery_attempts(5);
            if fan_out {
                spec = spec.filter(filter);
            } else {
                bus.ensure_topic(&topic).await?;
            }
            bus.ensure_subscription(&spec).await?;
        }
        Ok(routes)
    }

    pub fn topic_of(&self, service: &str) -> String {
        if self.fan_out {
            TOPIC.to_owned()
        } else {
            format!("{TOPIC}-{service}")
        }
    }

    pub fn subscription_of(&self, service: &str) -> String {
        if self.fan_out {
            service.to_owned()
        } else {
            self.topic_of(service)
        }
    }

    pub async fn consumer(&self, bus: &Bus, service: &str) -> cloudbus::Result<cloudbus::Consumer> {
        bus.consumer(&self.topic_of(service), &self.subscription_of(service))
            .await
    }

    pub async fn dead_letters(
        &self,
        bus: &Bus,
        service: &str,
    ) -> cloudbus::Result<cloudbus::DeadLetters> {
        bus.dead_letters(&self.topic_of(service), &self.subscription_of(service))
            .await
    }

    /// Where the services' events go: the topic, or every queue whose filter an event
    /// matches.
    pub async fn destinations(&self, bus: &Bus) -> cloudbus::Result<Destinations> {
        if self.fan_out {
            return Ok(Destinations::Topic(bus.publisher(TOPIC).await?));
        }
        let mut queues = Vec::new();
        for (name, filter) in subscriptions() {
            let topic = self.topic_of(name);
            let publisher = bus.publisher(&topic).await?;
            queues.push((topic, filter, publisher));
        }
        Ok(Destinations::Queues(Arc::new(queues)))
    }
}

/// Sends the saga's events where the services read them: client-side routing for
/// buses without fan-out (not an outbox: that is [`OrderDb`]).
#[derive(Clone)]
pub enum Destinations {
    Topic(Publisher),
    /// Each queue's name, its service's filter and a publisher to it.
    Queues(Arc<Vec<(String, Filter, Publisher)>>),
}

impl Destinations {
    /// The topics (and their publishers) `e` goes to.
    pub fn targets(&self, e: &Event) -> Vec<(String, Publisher)> {
        match self {
            Destinations::Topic(p) => vec![(TOPIC.to_owned(), p.clone())],
            Destinations::Queues(queues) => queues
                .iter()
                .filter(|(_, filter, _)| filter.matches(e))
                .map(|(topic, _, p)| (topic.clone(), p.clone()))
                .collect(),
        }
    }

    /// Sends `value` as a follow-up of the event `ctx` handles (causation and
    /// correlation set) to every destination it goes to.
    pub async fn send<T: CloudEvent>(&self, ctx: &Context, value: &T) -> cloudbus::Result<()> {
        self.publish(ctx.follow_up(value.builder()?).build()?).await
    }

    pub async fn publish(&self, e: Event) -> cloudbus::Result<()> {
        try_join_all(self.targets(&e).into_iter().map(|(_, p)| {
            let e = e.clone();
            async move { p.publish(e).await }
        }))
        .await?;
        Ok(())
    }

    pub async fn close(&self) -> cloudbus::Result<()> {
        match self {
            Destinations::Topic(p) => p.close().await,
            Destinations::Queues(queues) => {
                try_join_all(queues.iter().map(|(_, _, p)| p.close())).await?;
                Ok(())
            }
        }
    }
}
