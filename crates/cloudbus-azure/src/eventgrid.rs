//! Azure Event Grid: CloudEvents published to a topic endpoint, and pushed to an HTTP
//! endpoint of the service ([`push::PushEndpoint`]).
//!
//! Publishing is one HTTPS POST per batch to `{endpoint}?api-version=2018-01-01` with
//! `content-type: application/cloudevents-batch+json; charset=utf-8`, the events in
//! structured JSON, batches cut by core at 1 MB, and either the topic key
//! (`aeg-sas-key`) or a SAS token (`aeg-sas-token`, made from the key by
//! [`sas_token`] or given ready-made), to an `https://` endpoint or a loopback
//! `http://` one (an emulator) only. Event Grid accepts or refuses a batch as a whole:
//! 401 and 403 are `PermissionDenied`, 404 `NotFound`, 413 `TooLarge`, 400
//! `InvalidArgument`, 429 `Throttled`, 5xx and network failures `Unavailable`, with the
//! service's message (never the key). Event Grid has no pull: subscriptions are made in
//! Azure (ARM) and push to a webhook; `Bus::consumer` is `Unsupported` and points at
//! [`push::PushEndpoint`].

mod bus;
mod config;
pub mod push;
mod topic;
mod topology;

pub use bus::EventGridBus;
pub use config::{
    API_VERSION, Credential, ENDPOINT_ENV, EventGridConfig, KEY_ENV, SAS_TOKEN_ENV, sas_token,
};
pub use topic::{EventGridTopic, MAX_BATCH_COUNT, MAX_REQUEST_BYTES, capabilities};
