//! Pub/Sub's replay: seeking a subscription to a time or to a snapshot, and the
//! snapshots themselves. `PubSubBus` offers these as methods, and the topology's
//! `replay` is a seek to a time.

use chrono::{DateTime, Utc};
use cloudbus_driver::Result;

use crate::context::PubSubContext;
use crate::error::map_error;

/// Seeks `subscription` to `time`: what was published after it becomes unacked,
/// what was published before it acked.
pub(crate) async fn seek_to_time(
    shared: &PubSubContext,
    subscription: &str,
    time: DateTime<Utc>,
) -> Result<()> {
    let c = shared.clients().await?;
    let ts =
        google_cloud_wkt::Timestamp::clamp(time.timestamp(), time.timestamp_subsec_nanos() as i32);
    c.subscriptions
        .seek()
        .set_subscription(shared.config.subscription_path(subscription))
        .set_time(ts)
        .send()
        .await
        .map_err(|e| map_error(e, &format!("seek {subscription} to {time}")))?;
    Ok(())
}

/// Records the acknowledgement state of `subscription` as `snapshot`.
pub(crate) async fn create_snapshot(
    shared: &PubSubContext,
    subscription: &str,
    snapshot: &str,
) -> Result<()> {
    let c = shared.clients().await?;
    c.subscriptions
        .create_snapshot()
        .set_name(shared.config.snapshot_path(snapshot))
        .set_subscription(shared.config.subscription_path(subscription))
        .send()
        .await
        .map_err(|e| map_error(e, &format!("create snapshot {snapshot}")))?;
    Ok(())
}

/// Seeks `subscription` to the acknowledgement state recorded in `snapshot`.
pub(crate) async fn seek_to_snapshot(
    shared: &PubSubContext,
    subscription: &str,
    snapshot: &str,
) -> Result<()> {
    let c = shared.clients().await?;
    c.subscriptions
        .seek()
        .set_subscription(shared.config.subscription_path(subscription))
        .set_snapshot(shared.config.snapshot_path(snapshot))
        .send()
        .await
        .map_err(|e| map_error(e, &format!("seek {subscription} to snapshot {snapshot}")))?;
    Ok(())
}

/// Deletes `snapshot`.
pub(crate) async fn delete_snapshot(shared: &PubSubContext, snapshot: &str) -> Result<()> {
    let c = shared.clients().await?;
    c.subscriptions
        .delete_snapshot()
        .set_snapshot(shared.config.snapshot_path(snapshot))
        .send()
        .await
        .map_err(|e| map_error(e, &format!("delete snapshot {snapshot}")))?;
    Ok(())
}
