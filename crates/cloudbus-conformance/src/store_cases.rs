//! The store conformance cases: what every [`DedupStore`] and [`CheckpointStore`]
//! must do, the in-memory ones and the durable ones of `cloudbus-store` alike. Each
//! takes a [`StoreHarness`]; keys and groups are made unique per case, so cases may
//! run at once against one database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::harness::{Outcome, StoreHarness};
use cloudbus_core::checkpoint::CheckpointStore;
use cloudbus_core::error::{Error, ErrorKind, Result};
use cloudbus_core::event::EventBuilder;
use cloudbus_core::idempotency::{Claim, DedupStore, Idempotent};
use cloudbus_core::worker::{Handler, HandlerContext, HandlerError};

const LONG: Duration = Duration::from_secs(60);
/// Short enough to wait out in a test, long enough for a slow store's round trip.
const SHORT: Duration = Duration::from_millis(400);
/// How long a case waits for a `SHORT` lease or TTL to be over.
const PAST_SHORT: Duration = Duration::from_millis(1_200);

fn unique(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Two handles on the store (two connections, one database), or the skip reason.
async fn two_dedup(h: &dyn StoreHarness) -> Result<Option<[Arc<dyn DedupStore>; 2]>> {
    match (h.dedup_store().await?, h.dedup_store().await?) {
        (Some(a), Some(b)) => Ok(Some([a, b])),
        _ => Ok(None),
    }
}

async fn two_checkpoints(h: &dyn StoreHarness) -> Result<Option<[Arc<dyn CheckpointStore>; 2]>> {
    match (h.checkpoint_store().await?, h.checkpoint_store().await?) {
        (Some(a), Some(b)) => Ok(Some([a, b])),
        _ => Ok(None),
    }
}

/// The first claim of a key wins; a second one, from another handle, sees it in
/// progress.
async fn dedup_first_claim_wins(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let key = unique("first");
    check!(
        a.claim(&key, "a", LONG).await? == Claim::Claimed,
        "first claim"
    );
    let second = b.claim(&key, "b", LONG).await?;
    check!(
        second == Claim::InProgress,
        "second claim answered {second:?}"
    );
    let other = b.claim(&unique("other"), "b", LONG).await?;
    check!(other == Claim::Claimed, "another key answered {other:?}");
    Ok(Outcome::Passed)
}

/// A completed key answers `Done` to every later claim, on any handle.
async fn dedup_completed_key_is_done(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let key = unique("done");
    check!(a.claim(&key, "a", LONG).await? == Claim::Claimed, "claim");
    a.complete(&key, LONG).await?;
    for store in [&a, &b] {
        let again = store.claim(&key, "later", LONG).await?;
        check!(
            again == Claim::Done,
            "claim after complete answered {again:?}"
        );
    }
    Ok(Outcome::Passed)
}

/// A released claim lets a redelivery claim the key again; a release does not forget
/// a completed key.
async fn dedup_release_frees_only_a_claim(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let key = unique("release");
    check!(a.claim(&key, "a", LONG).await? == Claim::Claimed, "claim");
    a.release(&key, "a").await?;
    let again = b.claim(&key, "b", LONG).await?;
    check!(
        again == Claim::Claimed,
        "claim after release answered {again:?}"
    );
    b.complete(&key, LONG).await?;
    b.release(&key, "b").await?;
    let after = a.claim(&key, "a", LONG).await?;
    check!(
        after == Claim::Done,
        "a release forgot a completed key: {after:?}"
    );
    Ok(Outcome::Passed)
}

/// Only a claim's owner releases it, and its owner renews it: a stale owner whose
/// lease passed and whose claim another delivery took over cannot free the new
/// claim with a late release (issue 28 item 20: the event ran twice at once).
async fn dedup_release_and_renewal_are_by_owner(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let (renewed, key) = (unique("renewed"), unique("owner"));
    check!(
        a.claim(&renewed, "stale", SHORT).await? == Claim::Claimed,
        "claim"
    );
    let renewal = a.claim(&renewed, "stale", LONG).await?;
    check!(
        renewal == Claim::Claimed,
        "the owner's renewal answered {renewal:?}"
    );
    check!(
        a.claim(&key, "stale", SHORT).await? == Claim::Claimed,
        "claim"
    );
    tokio::time::sleep(PAST_SHORT).await;
    let held = b.claim(&renewed, "new", LONG).await?;
    check!(
        held == Claim::InProgress,
        "a renewed claim lapsed with its first lease: {held:?}"
    );
    let taken = b.claim(&key, "new", LONG).await?;
    check!(
        taken == Claim::Claimed,
        "the lapsed claim was not taken over: {taken:?}"
    );
    a.release(&key, "stale").await?;
    let third = a.claim(&key, "third", LONG).await?;
    check!(
        third == Claim::InProgress,
        "a stale owner's release freed another's claim: {third:?}"
    );
    let stale = a.claim(&key, "stale", LONG).await?;
    check!(
        stale == Claim::InProgress,
        "a stale owner renewed a claim it lost: {stale:?}"
    );
    let renewed_by_new = a.claim(&key, "new", LONG).await?;
    check!(
        renewed_by_new == Claim::Claimed,
        "the owner's renewal answered {renewed_by_new:?}"
    );
    b.release(&key, "new").await?;
    let after = a.claim(&key, "third", LONG).await?;
    check!(
        after == Claim::Claimed,
        "released by its owner, the key answered {after:?}"
    );
    Ok(Outcome::Passed)
}

/// A claim whose holder never completes lapses with its lease; a completed key is
/// forgotten after its TTL (the store stays bounded by expiry).
async fn dedup_claims_and_keys_expire(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let claimed = unique("lapse");
    let done = unique("ttl");
    check!(
        a.claim(&claimed, "a", SHORT).await? == Claim::Claimed,
        "claim"
    );
    check!(a.claim(&done, "a", LONG).await? == Claim::Claimed, "claim");
    a.complete(&done, SHORT).await?;
    check!(
        b.claim(&claimed, "b", LONG).await? == Claim::InProgress,
        "before the lease ran out"
    );
    tokio::time::sleep(PAST_SHORT).await;
    let lapsed = b.claim(&claimed, "b", LONG).await?;
    check!(
        lapsed == Claim::Claimed,
        "after its lease the claim answered {lapsed:?}"
    );
    let expired = b.claim(&done, "b", LONG).await?;
    check!(
        expired == Claim::Claimed,
        "after its TTL the key answered {expired:?}"
    );
    Ok(Outcome::Passed)
}

/// Of 16 claims of one key at once, from two handles, exactly one wins.
async fn dedup_concurrent_claims_one_wins(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let key = unique("race");
    let claims = (0..16).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = key.clone();
        tokio::spawn(async move { store.claim(&key, &format!("racer-{i}"), LONG).await })
    });
    let mut won = 0;
    for claim in futures::future::join_all(claims).await {
        let claim = claim.map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
        if claim == Claim::Claimed {
            won += 1;
        }
    }
    check!(won == 1, "{won} of 16 concurrent claims won");
    Ok(Outcome::Passed)
}

/// [`Idempotent`] on the store handles a redelivered event once, across two
/// handlers (two service instances) that share the store.
async fn dedup_idempotent_handler_handles_once(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_dedup(h).await? else {
        return Ok(Outcome::Skipped("a dedup store".into()));
    };
    let calls = Arc::new(AtomicU32::new(0));
    let counting = |calls: Arc<AtomicU32>| {
        move |_e: Arc<cloudbus_core::event::Event>, _c: HandlerContext| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }
    };
    let first = Idempotent::new(counting(calls.clone()), a);
    let second = Idempotent::new(counting(calls.clone()), b);
    let event = Arc::new(
        EventBuilder::new("conformance.store.once", "/conformance/store")
            .id(unique("event"))
            .build()?,
    );
    for handler in [&first, &second, &first] {
        handler
            .handle(event.clone(), HandlerContext::new(1, "conformance"))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("{e:?}")))?;
    }
    let n = calls.load(Ordering::SeqCst);
    check!(n == 1, "the event was handled {n} times");
    Ok(Outcome::Passed)
}

/// A saved checkpoint is what a restarted reader (another handle) loads; groups and
/// partitions are independent; nothing saved loads as `None`.
async fn checkpoint_resumes_where_saved(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_checkpoints(h).await? else {
        return Ok(Outcome::Skipped("a checkpoint store".into()));
    };
    let group = unique("group");
    check!(
        a.load(&group, "shard-0").await?.is_none(),
        "a new group has a checkpoint"
    );
    check!(
        a.acquire(&group, "shard-0", "reader-a", LONG).await?,
        "acquire"
    );
    check!(a.save(&group, "shard-0", "reader-a", "100").await?, "save");
    check!(
        a.save(&group, "shard-0", "reader-a", "200").await?,
        "save again"
    );
    let loaded = b.load(&group, "shard-0").await?;
    check!(loaded.as_deref() == Some("200"), "loaded {loaded:?}");
    check!(
        b.load(&group, "shard-1").await?.is_none(),
        "another partition has a checkpoint"
    );
    let other_group = unique("group");
    check!(
        b.load(&other_group, "shard-0").await?.is_none(),
        "another group has a checkpoint"
    );
    Ok(Outcome::Passed)
}

/// While one reader holds a partition, another can neither take it nor move its
/// checkpoint; its owner renews; after a release the other takes it at once.
async fn checkpoint_one_owner_at_a_time(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_checkpoints(h).await? else {
        return Ok(Outcome::Skipped("a checkpoint store".into()));
    };
    let group = unique("group");
    check!(
        a.acquire(&group, "p", "reader-a", LONG).await?,
        "first acquire"
    );
    check!(
        !b.acquire(&group, "p", "reader-b", LONG).await?,
        "a second owner got the partition"
    );
    check!(
        b.acquire(&group, "q", "reader-b", LONG).await?,
        "another partition is free"
    );
    check!(
        a.acquire(&group, "p", "reader-a", LONG).await?,
        "the owner could not renew"
    );
    check!(
        a.save(&group, "p", "reader-a", "7").await?,
        "the owner could not save"
    );
    check!(
        !b.save(&group, "p", "reader-b", "9").await?,
        "a non-owner saved"
    );
    let loaded = a.load(&group, "p").await?;
    check!(
        loaded.as_deref() == Some("7"),
        "a non-owner moved the checkpoint to {loaded:?}"
    );
    b.release(&group, "p", "reader-b").await?;
    check!(
        !b.acquire(&group, "p", "reader-b", LONG).await?,
        "a non-owner's release freed the partition"
    );
    a.release(&group, "p", "reader-a").await?;
    check!(
        b.acquire(&group, "p", "reader-b", LONG).await?,
        "released, the partition stayed taken"
    );
    check!(
        !a.acquire(&group, "p", "reader-a", LONG).await?,
        "the old owner took it back"
    );
    let kept = b.load(&group, "p").await?;
    check!(
        kept.as_deref() == Some("7"),
        "a release lost the checkpoint: {kept:?}"
    );
    Ok(Outcome::Passed)
}

/// The partitions of a reader that stops renewing (it died) pass to another reader
/// when the lease runs out; the dead reader cannot save over the new owner.
async fn checkpoint_lapsed_lease_passes_on(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_checkpoints(h).await? else {
        return Ok(Outcome::Skipped("a checkpoint store".into()));
    };
    let group = unique("group");
    check!(a.acquire(&group, "p", "reader-a", SHORT).await?, "acquire");
    check!(
        !b.acquire(&group, "p", "reader-b", LONG).await?,
        "taken before the lease ran out"
    );
    tokio::time::sleep(PAST_SHORT).await;
    check!(
        b.acquire(&group, "p", "reader-b", LONG).await?,
        "the lapsed lease was not passed on"
    );
    check!(
        !a.save(&group, "p", "reader-a", "5").await?,
        "the old owner saved over the new one"
    );
    check!(
        !a.acquire(&group, "p", "reader-a", LONG).await?,
        "the old owner took it back"
    );
    Ok(Outcome::Passed)
}

/// Of 16 readers acquiring one partition at once, exactly one owns it.
async fn checkpoint_concurrent_acquire_one_wins(h: &dyn StoreHarness) -> Result<Outcome> {
    let Some([a, b]) = two_checkpoints(h).await? else {
        return Ok(Outcome::Skipped("a checkpoint store".into()));
    };
    let group = unique("group");
    let attempts = (0..16).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let group = group.clone();
        tokio::spawn(async move {
            store
                .acquire(&group, "p", &format!("reader-{i}"), LONG)
                .await
        })
    });
    let mut owners = 0;
    for attempt in futures::future::join_all(attempts).await {
        if attempt.map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?? {
            owners += 1;
        }
    }
    check!(owners == 1, "{owners} of 16 readers own the partition");
    Ok(Outcome::Passed)
}

/// The cases of this module, in order: the only list (a case function missing here
/// is dead code, an error).
pub const CASES: &[crate::harness::Case<dyn StoreHarness>] = registry![
    dedup_first_claim_wins,
    dedup_completed_key_is_done,
    dedup_release_frees_only_a_claim,
    dedup_release_and_renewal_are_by_owner,
    dedup_claims_and_keys_expire,
    dedup_concurrent_claims_one_wins,
    dedup_idempotent_handler_handles_once,
    checkpoint_resumes_where_saved,
    checkpoint_one_owner_at_a_time,
    checkpoint_lapsed_lease_passes_on,
    checkpoint_concurrent_acquire_one_wins,
];
