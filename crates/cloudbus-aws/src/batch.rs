//! The per-entry results of AWS batch calls (SendMessageBatch, PublishBatch,
//! PutEvents, PutRecords, DeleteMessageBatch, ...): one slot per entry, filled in by
//! the entry ids the service reports, an unreported entry being an error.

use cloudbus_driver::{BatchResults, Error, ErrorKind, Result};

/// The per-entry results of one batch call, filled in as the service reports them.
pub(crate) type Slots = Vec<Option<Result<()>>>;

/// Empty slots for a batch of `n`.
#[allow(dead_code)]
pub(crate) fn slots(n: usize) -> Slots {
    (0..n).map(|_| None).collect()
}

/// Records the outcome of the entry with batch id `id` (its index in the batch).
#[allow(dead_code)]
pub(crate) fn report(slots: &mut Slots, id: &str, outcome: Result<()>) {
    if let Some(slot) = id.parse::<usize>().ok().and_then(|i| slots.get_mut(i)) {
        *slot = Some(outcome);
    }
}

/// The batch results, an entry the service did not report being an error.
#[allow(dead_code)]
pub(crate) fn finish(slots: Slots, service: &str) -> BatchResults {
    slots
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Internal,
                    format!("{service} did not report this entry"),
                ))
            })
        })
        .collect()
}

/// Builds the request entries of a batch: `entry` makes one from each message and its
/// index (the batch id the services report back). A message that cannot become an
/// entry has its error in its slot at once and the others go ahead. Returns the slots,
/// the index of each entry's message, and the entries.
pub(crate) fn build_entries<M, T>(
    batch: &[M],
    mut entry: impl FnMut(usize, &M) -> Result<T>,
) -> (Slots, Vec<usize>, Vec<T>) {
    let mut results = slots(batch.len());
    let mut index = Vec::with_capacity(batch.len());
    let mut entries = Vec::with_capacity(batch.len());
    for (i, m) in batch.iter().enumerate() {
        match entry(i, m) {
            Ok(e) => {
                index.push(i);
                entries.push(e);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    (results, index, entries)
}
