//! A flush measurement: how fast a store takes a node's shard rows.
//!
//! The benchmark program and the store tests call [`measure_flush`] so that
//! both report the same figure. It writes through the public [`Store`] API
//! only, exactly as a node's flush does (begin, upsert, set flushed,
//! commit), and must never be used on a store holding real data for the
//! node id it is given.

use std::time::{Duration, Instant};

use super::{Store, StoreError, Version};

/// What [`measure_flush`] saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlushMeasurement {
    pub rows: usize,
    /// Transactions used (one per batch).
    pub batches: usize,
    /// Time from the first `begin` to the last commit.
    pub elapsed: Duration,
}

impl FlushMeasurement {
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Registers `node_id`, then flushes `rows` distinct counters in
/// transactions of `batch_rows` rows each (one upsert call per
/// transaction), versioned by the new epoch, and times it.
pub fn measure_flush(
    store: &dyn Store,
    node_id: &str,
    rows: usize,
    batch_rows: usize,
) -> Result<FlushMeasurement, StoreError> {
    let batch_rows = batch_rows.max(1);
    let epoch = store
        .register(node_id, "bench", crate::engine::idempotency::now_ms())?
        .epoch;
    let names: Vec<String> = (0..rows).map(|i| format!("bench-{i:09}")).collect();
    let start = Instant::now();
    let mut batches = 0;
    for (b, chunk) in names.chunks(batch_rows).enumerate() {
        let first_lsn = (b * batch_rows) as u64 + 1;
        let batch: Vec<(&str, i64, Version)> = chunk
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let lsn = first_lsn + i as u64;
                (name.as_str(), lsn as i64, Version::new(epoch, lsn))
            })
            .collect();
        let last = batch.last().map_or(Version::default(), |r| r.2);
        let mut tx = store.begin(node_id, epoch)?;
        tx.upsert_shards(&batch)?;
        tx.set_flushed(last, crate::engine::idempotency::now_ms())?;
        tx.commit()?;
        batches += 1;
    }
    Ok(FlushMeasurement {
        rows,
        batches,
        elapsed: start.elapsed(),
    })
}
