//! The committer: the one thread that writes this node's rows to the store.
//!
//! Each round it takes the waiting `replicated` increments (a group commit:
//! one transaction carries every increment that arrived while the previous
//! one ran) and the counters changed since the last flush, and writes them
//! in one fenced transaction:
//!
//! 1. `begin` checks the epoch and keeps it valid until commit;
//! 2. the increments' idempotency keys are inserted; a key the store
//!    already holds (this node's or another's) makes its increment a
//!    duplicate, not applied;
//! 3. the other increments are applied locally and journaled as
//!    `replicated` records;
//! 4. the shard rows of every changed counter, including those just
//!    applied, are upserted with version `(epoch, lsn)`, and the node's
//!    flushed version is raised past every lsn written;
//! 5. commit. Success: every applied increment is acknowledged.
//!    `Unavailable` (nothing was written): the applied increments are
//!    reverted (journaled) and answered "not applied". `Indeterminate`:
//!    they are answered "outcome unknown", their keys are held as
//!    unresolved, and before anything else the next round asks the store
//!    whether the transaction committed (does the row of a counter it
//!    changed carry the version it wrote?) and reverts them if not.
//!    `Fenced`: reverted, and the node stops for good.
//!
//! A replicated increment's effect therefore reaches the store only in the
//! transaction that also records its key, which is what lets a retry on any
//! other node be recognised.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use compact_str::CompactString;

use super::{Cluster, DeleteRequest, ReplicatedRequest, store_err};
use crate::engine::idempotency::now_ms;
use crate::engine::{Applied as EngineApplied, Change, Engine};
use crate::error::Error;
use crate::store::{DeletedCounter, KeyRow, StoreError, StoreTx, Version};

/// First wait after a failed store call; doubles up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A replicated increment applied inside a transaction.
struct Applied {
    name: String,
    delta: i64,
    lsn: u64,
    key: Option<(String, u64)>,
}

/// Most idempotency keys written again per round after a store regression
/// (see [`repair`]); the rest go in the following rounds.
const REINSERT_KEYS_PER_ROUND: usize = 10_000;

/// A transaction whose commit outcome is unknown.
struct Unresolved {
    epoch: u64,
    flushed: Version,
    written: Version,
    applied: Vec<Applied>,
    rows: Vec<CompactString>,
}

/// What one round decided for each request of its batch.
enum Answer {
    /// Not decided when the round failed: not applied.
    Undecided,
    Applied,
    Duplicate,
    Failed(Error),
}

/// The `replicated` idempotency keys this process has committed, with
/// their counter and expiry: what a store regression may have lost and
/// [`repair`] writes again. A key commits once (a retry is a duplicate), so
/// each appears once; kept in commit order, which is expiry order (expiry
/// is the apply time plus a fixed retention), so dropping the expired ones
/// at each heartbeat costs only what it drops.
#[derive(Default)]
struct CommittedKeys {
    /// (key, counter, expiry), oldest first.
    queue: VecDeque<(String, String, u64)>,
}

impl CommittedKeys {
    fn push(&mut self, key: String, counter: String, expires_at_ms: u64) {
        self.queue.push_back((key, counter, expires_at_ms));
    }

    /// Drops the keys expired at `now` from the front.
    fn purge(&mut self, now: u64) {
        while self.queue.front().is_some_and(|(_, _, e)| *e <= now) {
            self.queue.pop_front();
        }
    }
}

pub(crate) fn run(cluster: Arc<Cluster>, engine: Weak<Engine>) {
    let mut backlog: HashMap<CompactString, (i64, u64)> = HashMap::new();
    let mut unresolved: Option<Box<Unresolved>> = None;
    let mut committed_keys = CommittedKeys::default();
    // Set when the store was found behind this node; the next iteration
    // repairs before anything else.
    let mut regressed = false;
    // Keys to write again after a repair, a bounded number per round.
    let mut reinsert: Vec<KeyRow> = Vec::new();
    if let Some((keys, behind)) = cluster.recovered_keys.lock().take() {
        for k in &keys {
            committed_keys.push(k.key.clone(), k.counter.clone(), k.expires_at_ms);
        }
        if behind {
            reinsert = keys;
        }
    }
    // Heartbeats carry the applied lsn, which the cluster view's flush lag
    // needs; they are sent every interval, busy or not.
    let mut last_heartbeat = Instant::now();
    let mut backoff = Duration::ZERO;
    let mut taken: Vec<(CompactString, i64, u64)> = Vec::new();
    loop {
        // Wait without holding the engine, so that dropping the node (a
        // crash in tests, or an embedder that never calls shutdown) frees
        // it at once.
        if !cluster.stop.load(Ordering::SeqCst) {
            let mut queue = cluster.queue.lock();
            if queue.is_empty() && cluster.deletes.lock().is_empty() {
                let wait = if backoff.is_zero() {
                    cluster.config.flush_interval
                } else {
                    backoff
                };
                cluster.wake.wait_for(&mut queue, wait);
            }
        }
        let stopping = cluster.stop.load(Ordering::SeqCst);
        let Some(engine) = engine.upgrade() else {
            answer_all(cluster.queue.lock().drain(..), || Error::ShuttingDown);
            answer_deletes(cluster.deletes.lock().drain(..), || Error::ShuttingDown);
            return;
        };
        let cluster = &*cluster;
        if let Some(reason) = cluster.fenced_reason() {
            let mut queue = cluster.queue.lock();
            answer_deletes(cluster.deletes.lock().drain(..), || {
                Error::Fenced(reason.clone())
            });
            answer_all(queue.drain(..), || Error::Fenced(reason.clone()));
            return;
        }

        if regressed && stopping {
            // A process on its way out does not take a new epoch: the next
            // one finds the store behind it at start (see `Cluster::start`)
            // and the journal keeps everything until then.
            answer_all(cluster.queue.lock().drain(..), || Error::ShuttingDown);
            answer_deletes(cluster.deletes.lock().drain(..), || Error::ShuttingDown);
            return;
        }
        if regressed {
            match repair(cluster, &engine, &committed_keys, &mut backlog) {
                Ok(keys) => {
                    regressed = false;
                    reinsert = keys;
                    backoff = Duration::ZERO;
                }
                Err(e) => {
                    if let StoreError::Fenced { .. } = e {
                        fence(cluster, &e);
                        continue;
                    }
                    store_failed(cluster, &e, &mut backoff);
                    fail_queued(cluster, &e);
                    if stopping {
                        return;
                    }
                    continue;
                }
            }
        }

        // An unknown outcome is settled before anything else is written.
        if let Some(u) = unresolved.take() {
            match resolve(cluster, &engine, u, &mut backlog, &mut committed_keys) {
                Ok(()) => backoff = Duration::ZERO,
                Err((u, e)) => {
                    unresolved = Some(u);
                    store_failed(cluster, &e, &mut backoff);
                    fail_queued(cluster, &e);
                    if stopping {
                        return;
                    }
                    continue;
                }
            }
        }

        let batch: Vec<ReplicatedRequest> = {
            let mut queue = cluster.queue.lock();
            let n = queue.len().min(cluster.config.replicated_batch_max);
            queue.drain(..n).collect()
        };
        let deletes: Vec<DeleteRequest> = std::mem::take(&mut *cluster.deletes.lock());
        if stopping && !(batch.is_empty() && deletes.is_empty()) {
            answer_all(batch.into_iter(), || Error::ShuttingDown);
            answer_deletes(deletes.into_iter(), || Error::ShuttingDown);
            continue;
        }
        // Every change with an lsn below `mark` is applied before the
        // sweep reaches its shard: lsns are assigned under the shard lock
        // the sweep takes. So once a complete sweep commits, the store
        // holds every change below the mark (see `round`).
        let mark = engine.next_lsn();
        taken.clear();
        engine
            .table()
            .take_dirty(cluster.config.flush_rows_max, &mut taken);
        let complete = Some(Version::new(cluster.epoch(), mark.saturating_sub(1)))
            .filter(|_| taken.len() < cluster.config.flush_rows_max);
        for (name, value, lsn) in taken.drain(..) {
            merge(&mut backlog, name, value, lsn);
        }
        // A replicated round writes changes with lsns above the mark it
        // carries (they are applied after the sweep), so after one the mark
        // trails the node's own lsn; the first complete sweep that finds
        // nothing to write raises it in a transaction of its own, so that an
        // idle node's flush lag reaches zero.
        let mark_behind = complete.is_some_and(|m| m > cluster.flushed());
        if batch.is_empty()
            && deletes.is_empty()
            && backlog.is_empty()
            && !mark_behind
            && reinsert.is_empty()
        {
            if stopping {
                // A complete sweep found nothing left to write: the whole
                // shard is in the store. Say so, so that the cluster view
                // shows the node stopped rather than down, and it may be
                // retired.
                match cluster.store.set_node_state(
                    &cluster.node_id,
                    cluster.epoch(),
                    crate::store::NodeState::Stopped,
                ) {
                    Ok(true) => tracing::info!("shard flushed; recorded as stopped in the store"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record the node as stopped in the store")
                    }
                }
                return;
            }
            if last_heartbeat.elapsed() >= cluster.config.heartbeat_interval {
                regressed = heartbeat(cluster, &engine, &mut backoff, &mut committed_keys);
                last_heartbeat = Instant::now();
            }
            continue;
        }
        if !batch.is_empty() {
            *cluster.replication_open.lock() = true;
        }
        let started = Instant::now();
        let reinsert_now = reinsert.len().min(REINSERT_KEYS_PER_ROUND);
        let mut deleted: Vec<Option<DeletedCounter>> = Vec::with_capacity(deletes.len());
        match round(
            cluster,
            &engine,
            &batch,
            &mut backlog,
            complete,
            &reinsert[..reinsert_now],
            (&deletes, &mut deleted),
        ) {
            Ok((answers, applied)) => {
                // Committed: this node's reads take the new bases at once.
                for (request, outcome) in deletes.into_iter().zip(deleted) {
                    if let Some(d) = &outcome {
                        cluster.cache.apply_rows(&d.rows);
                        let m = &cluster.metrics;
                        m.counters_deleted.fetch_add(1, Ordering::Relaxed);
                        if request.expiring.is_some() {
                            m.counters_expired.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let _ = request.reply.send(Ok(outcome.map(|d| d.erased)));
                }
                reinsert.drain(..reinsert_now);
                settle_in_journal(cluster, &engine, &applied);
                for a in applied {
                    if let Some((k, expiry)) = a.key {
                        committed_keys.push(k, a.name, expiry);
                    }
                }
                let m = &cluster.metrics;
                m.store_round_seconds
                    .observe(started.elapsed().as_secs_f64());
                if !batch.is_empty() {
                    m.replicated_batch_requests.observe(batch.len() as f64);
                }
                backoff = Duration::ZERO;
                cluster.state.lock().store_error = None;
                if last_heartbeat.elapsed() >= cluster.config.heartbeat_interval {
                    regressed = heartbeat(cluster, &engine, &mut backoff, &mut committed_keys);
                    last_heartbeat = Instant::now();
                }
                reply(batch, answers);
            }
            Err((e, applied, flushed, written, answers)) => {
                if let StoreError::Indeterminate(_) = e {
                    cluster
                        .metrics
                        .store_indeterminate_commits
                        .fetch_add(1, Ordering::Relaxed);
                }
                match &e {
                    // The keys stay unresolved until `resolve` knows.
                    StoreError::Indeterminate(_) if !applied.is_empty() => {
                        unresolved = Some(Box::new(Unresolved {
                            epoch: cluster.epoch(),
                            flushed,
                            written,
                            rows: backlog.keys().cloned().collect(),
                            applied,
                        }));
                    }
                    _ => {
                        revert_all(&engine, &applied);
                        settle_keys(cluster, &applied);
                    }
                }
                match &e {
                    StoreError::Fenced { .. } => fence(cluster, &e),
                    StoreError::Regressed(_) => {
                        regressed = true;
                        store_failed(cluster, &e, &mut backoff);
                    }
                    _ => store_failed(cluster, &e, &mut backoff),
                }
                let outcome_err = store_err(e);
                let delete_err = match &outcome_err {
                    Error::StoreUnavailable(reason) => {
                        Error::StoreUnavailable(format!("{reason}; nothing was deleted"))
                    }
                    other => other.clone(),
                };
                answer_deletes(deletes.into_iter(), || delete_err.clone());
                let answers = answers
                    .into_iter()
                    .map(|a| match a {
                        Answer::Applied => Answer::Failed(outcome_err.clone()),
                        other => other,
                    })
                    .collect();
                reply(batch, answers);
            }
        }
        if unresolved.is_none() {
            *cluster.replication_open.lock() = false;
        }
        debug_assert!(
            unresolved.is_none() || *cluster.replication_open.lock(),
            "the replication gate is held while a transaction's outcome is unresolved"
        );
        // A stopping committer goes round again until a complete sweep
        // finds nothing to write (above), unless the store is failing.
        if stopping && backoff > Duration::ZERO {
            // The store is down: the journal keeps everything; stop.
            return;
        }
    }
}

/// Keeps the newer of two rows for one counter.
fn merge(
    backlog: &mut HashMap<CompactString, (i64, u64)>,
    name: CompactString,
    value: i64,
    lsn: u64,
) {
    let slot = backlog.entry(name).or_insert((value, lsn));
    if lsn >= slot.1 {
        *slot = (value, lsn);
    }
}

type RoundError = (StoreError, Vec<Applied>, Version, Version, Vec<Answer>);

/// One transaction: keys, local applies, rows, flushed version, commit.
///
/// `complete` is the version below which every change is in `backlog` or
/// already stored, when this round's sweep of changed counters was
/// complete; the round raises the node's flushed version to it, which is
/// what the other nodes' caches page from (see `cache`).
#[allow(clippy::type_complexity)]
fn round(
    cluster: &Cluster,
    engine: &Engine,
    batch: &[ReplicatedRequest],
    backlog: &mut HashMap<CompactString, (i64, u64)>,
    complete: Option<Version>,
    reinsert: &[KeyRow],
    (deletes, deleted): (&[DeleteRequest], &mut Vec<Option<DeletedCounter>>),
) -> Result<(Vec<Answer>, Vec<Applied>), RoundError> {
    let mut answers: Vec<Answer> = batch.iter().map(|_| Answer::Undecided).collect();
    let mut applied: Vec<Applied> = Vec::new();
    let (mut flushed, mut written) = {
        let state = cluster.state.lock();
        (state.flushed, state.written)
    };
    let fail = |e: StoreError, applied: Vec<Applied>, flushed, written, answers| {
        Err((e, applied, flushed, written, answers))
    };
    let epoch = cluster.epoch();

    let mut tx: Box<dyn StoreTx + '_> =
        match cluster.store.begin_at(&cluster.node_id, epoch, written) {
            Ok(tx) => tx,
            Err(e) => return fail(e, applied, flushed, written, answers),
        };
    // Keys a store regression lost, written again under this epoch.
    if !reinsert.is_empty() {
        let rows: Vec<KeyRow> = reinsert
            .iter()
            .map(|k| KeyRow { epoch, ..k.clone() })
            .collect();
        if let Err(e) = tx.insert_keys(&rows) {
            return fail(e, applied, flushed, written, answers);
        }
    }
    let now = now_ms();
    let expiry = engine.key_expiry(now);
    let keyed: Vec<(usize, KeyRow)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.key.as_ref().map(|k| {
                (
                    i,
                    KeyRow {
                        key: k.clone(),
                        node_id: cluster.node_id.clone(),
                        epoch,
                        counter: r.name.clone(),
                        expires_at_ms: expiry,
                    },
                )
            })
        })
        .collect();
    let mut fresh = vec![true; batch.len()];
    if !keyed.is_empty() {
        let rows: Vec<KeyRow> = keyed.iter().map(|(_, k)| k.clone()).collect();
        match tx.insert_keys(&rows) {
            Ok(inserted) => {
                for ((i, _), ok) in keyed.iter().zip(inserted) {
                    fresh[*i] = ok;
                }
            }
            Err(e) => return fail(e, applied, flushed, written, answers),
        }
    }
    let mut undo_keys: Vec<&str> = Vec::new();
    for (i, r) in batch.iter().enumerate() {
        if !fresh[i] {
            answers[i] = Answer::Duplicate;
            continue;
        }
        let key = r.key.as_deref().map(|k| (k, expiry));
        // From the moment the increment is applied here (its key recorded
        // in the engine) until this transaction's outcome is known, a retry
        // with the key must hear "unknown", not "duplicate": the increment
        // may yet be reverted. Marked before applying, so no retry can slip
        // in between.
        if let Some(k) = &r.key {
            cluster.state.lock().unresolved_keys.insert(k.clone());
        }
        let change = Change::Replicated {
            name: &r.name,
            delta: r.delta,
            key,
            epoch,
        };
        match engine.apply(change) {
            Ok(EngineApplied::New { lsn, .. }) => {
                answers[i] = Answer::Applied;
                applied.push(Applied {
                    name: r.name.clone(),
                    delta: r.delta,
                    lsn,
                    key: r.key.clone().map(|k| (k, expiry)),
                });
            }
            // Seen on this node at another level: already counted here.
            Ok(EngineApplied::Duplicate { .. }) => {
                if let Some(k) = &r.key {
                    cluster.state.lock().unresolved_keys.remove(k);
                }
                answers[i] = Answer::Duplicate;
            }
            Err(e) => {
                if let Some(k) = r.key.as_deref() {
                    undo_keys.push(k);
                    cluster.state.lock().unresolved_keys.remove(k);
                }
                answers[i] = Answer::Failed(e);
            }
        }
    }
    if !undo_keys.is_empty()
        && let Err(e) = tx.delete_keys(&undo_keys)
    {
        return fail(e, applied, flushed, written, answers);
    }
    // The applied increments' rows go in this transaction whatever the
    // dirty list holds, so that their keys never commit without them; so
    // do the rows of counters to delete, so that the delete erases what
    // this node acknowledged of them before it.
    for name in deletes.iter().map(|d| d.name.as_str()) {
        if let Some(e) = engine.table().get(name) {
            merge(backlog, CompactString::from(name), e.value, e.lsn);
        }
    }
    for a in &applied {
        if let Some(e) = engine.table().get(&a.name) {
            merge(
                backlog,
                CompactString::from(a.name.as_str()),
                e.value,
                e.lsn,
            );
        }
    }
    let rows: Vec<(&str, i64, Version)> = backlog
        .iter()
        .map(|(n, (v, lsn))| (n.as_str(), *v, Version::new(epoch, *lsn)))
        .collect();
    if let Some(mark) = complete {
        flushed = flushed.max(mark);
    }
    if let Some(top) = rows.iter().map(|r| r.2).max() {
        written = written.max(top);
    }
    if !rows.is_empty()
        && let Err(e) = tx.upsert_shards(&rows)
    {
        return fail(e, applied, flushed, written, answers);
    }
    for d in deletes {
        match tx.delete_counter(&d.name, now, d.expiring) {
            Ok(outcome) => deleted.push(outcome),
            Err(e) => return fail(e, applied, flushed, written, answers),
        }
    }
    if let Err(e) = tx.set_marks(flushed, written, now) {
        return fail(e, applied, flushed, written, answers);
    }
    if let Err(e) = tx.commit() {
        return fail(e, applied, flushed, written, answers);
    }
    cluster
        .metrics
        .store_rows_flushed
        .fetch_add(rows.len() as u64, Ordering::Relaxed);
    // The counters just applied were written above; unless they changed
    // since, the next round need not write them again.
    for a in &applied {
        if let Some((_, lsn)) = backlog.get(a.name.as_str()) {
            engine.table().unlist_if_unchanged(&a.name, *lsn);
        }
    }
    backlog.clear();
    settle_keys(cluster, &applied);
    let mut state = cluster.state.lock();
    debug_assert!(flushed >= state.flushed, "the flushed mark never lowers");
    state.flushed = flushed;
    state.written = written;
    drop(state);
    Ok((answers, applied))
}

/// Asks the store whether an unresolved transaction committed: it did if
/// the row of a counter it changed carries a version at least that of the
/// increment applied in it (no other transaction writes this node's rows
/// until the outcome is settled, so nothing else can have raised it).
fn resolve(
    cluster: &Cluster,
    engine: &Engine,
    u: Box<Unresolved>,
    backlog: &mut HashMap<CompactString, (i64, u64)>,
    committed_keys: &mut CommittedKeys,
) -> Result<(), (Box<Unresolved>, StoreError)> {
    // The transaction may still be waiting on the server (for a
    // synchronous standby, say), invisible to readers until it ends: its
    // rows tell nothing until the server says it is over.
    match cluster.store.commit_settled() {
        Ok(true) => {}
        Ok(false) => {
            return Err((
                u,
                StoreError::Unavailable(
                    "an earlier commit is still in progress on the store \
                     (a primary waiting for a synchronous standby?)"
                        .into(),
                ),
            ));
        }
        Err(e) => return Err((u, e)),
    }
    let probe = u
        .applied
        .first()
        .expect("only transactions that applied are unresolved");
    let rows = match cluster.store.read_counter(&probe.name) {
        Ok(r) => r,
        Err(e) => return Err((u, e)),
    };
    let committed = rows
        .iter()
        .any(|r| r.node_id == cluster.node_id && r.version >= Version::new(u.epoch, probe.lsn));
    if committed {
        for name in &u.rows {
            backlog.remove(name);
        }
        let mut state = cluster.state.lock();
        state.flushed = state.flushed.max(u.flushed);
        // A repair in between (a new epoch) starts `written` afresh.
        if u.epoch == cluster.epoch() {
            state.written = state.written.max(u.written);
        }
        drop(state);
        for a in &u.applied {
            if let Some((k, expiry)) = &a.key {
                committed_keys.push(k.clone(), a.name.clone(), *expiry);
            }
        }
        settle_in_journal(cluster, engine, &u.applied);
        tracing::info!(
            applied = u.applied.len(),
            "unknown commit outcome resolved: committed"
        );
    } else {
        revert_all(engine, &u.applied);
        tracing::info!(
            applied = u.applied.len(),
            "unknown commit outcome resolved: not committed, reverted"
        );
    }
    settle_keys(cluster, &u.applied);
    Ok(())
}

/// Proves the node alive and records its applied lsn; a superseded epoch
/// fences the node. Also drops expired keys from `committed_keys`. Returns
/// whether the store was found behind this node (see [`repair`]).
fn heartbeat(
    cluster: &Cluster,
    engine: &Engine,
    backoff: &mut Duration,
    committed_keys: &mut CommittedKeys,
) -> bool {
    let now = now_ms();
    committed_keys.purge(now);
    let applied = engine.applied_lsn();
    let written = cluster.state.lock().written;
    match cluster
        .store
        .heartbeat_at(&cluster.node_id, cluster.epoch(), written, now, applied)
    {
        Ok(()) => {
            cluster.state.lock().store_error = None;
            *backoff = Duration::ZERO;
            false
        }
        Err(e @ StoreError::Fenced { .. }) => {
            fence(cluster, &e);
            false
        }
        Err(e @ StoreError::Regressed(_)) => {
            store_failed(cluster, &e, backoff);
            true
        }
        Err(e) => {
            store_failed(cluster, &e, backoff);
            false
        }
    }
}

/// The store came back older than what this process committed to it (see
/// `docs/design.md`, "Store regression"). Registers again above the epoch
/// it held, so that no epoch is handed out twice and every row written
/// from now on outranks whatever the store kept; lists every counter as
/// changed, so that the next complete sweep writes the whole shard; and
/// returns the live `replicated` keys to write again. Nothing of the
/// node's own state is lost: the store is rebuilt from it.
fn repair(
    cluster: &Cluster,
    engine: &Engine,
    committed_keys: &CommittedKeys,
    backlog: &mut HashMap<CompactString, (i64, u64)>,
) -> Result<Vec<KeyRow>, StoreError> {
    let old = cluster.epoch();
    let registration =
        cluster
            .store
            .register_above(&cluster.node_id, &cluster.config.address, now_ms(), old)?;
    let epoch = registration.epoch;
    cluster.epoch.store(epoch, Ordering::SeqCst);
    {
        let mut state = cluster.state.lock();
        state.flushed = registration
            .previous
            .as_ref()
            .map_or_else(Version::default, |p| p.flushed);
        state.written = Version::default();
    }
    // The backlog's rows are in the table too, and every counter is
    // listed again below.
    backlog.clear();
    engine.table().track_dirty_from(|_, _| true);
    let now = now_ms();
    let keys: Vec<KeyRow> = committed_keys
        .queue
        .iter()
        .filter(|(_, _, expiry)| *expiry > now)
        .map(|(key, counter, expiry)| KeyRow {
            key: key.clone(),
            node_id: cluster.node_id.clone(),
            epoch,
            counter: counter.clone(),
            expires_at_ms: *expiry,
        })
        .collect();
    cluster
        .metrics
        .store_regressions_repaired
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        node_id = %cluster.node_id,
        old_epoch = old,
        epoch,
        counters = engine.table().len(),
        keys = keys.len(),
        "the store is behind what this node committed (restored from an older copy, or an \
         asynchronous failover); registered again and writing the whole shard and the live \
         replicated keys anew"
    );
    Ok(keys)
}

/// Journals that the store committed this node's rows up to its written
/// version, after a transaction that carried `replicated` increments, so
/// that a restart knows they committed even if the store comes back older
/// than them (see `Cluster::start`). Not waited for: it reaches the disk
/// with the journal's next sync; a crash before that leaves the store's
/// own rows as the only witness, as before.
fn settle_in_journal(cluster: &Cluster, engine: &Engine, applied: &[Applied]) {
    let Some(first) = applied.first() else {
        return;
    };
    let written = cluster.state.lock().written;
    if written.epoch != cluster.epoch() {
        return;
    }
    if let Err(e) = engine.journal_settled(&first.name, written.epoch, written.lsn) {
        tracing::warn!(error = %e, "could not journal the store's settled version");
    }
}

/// Stops every write for good: another process holds this node id.
fn fence(cluster: &Cluster, e: &StoreError) {
    let reason = e.to_string();
    tracing::error!(%reason, "fenced: another process holds this node id; no more writes");
    let _ = cluster.fenced.send(Some(reason));
}

/// The outcome of these increments' transaction is known: retries with
/// their keys may be answered from the keys again.
fn settle_keys(cluster: &Cluster, applied: &[Applied]) {
    let mut state = cluster.state.lock();
    for a in applied {
        if let Some((k, _)) = &a.key {
            state.unresolved_keys.remove(k);
        }
    }
}

fn revert_all(engine: &Engine, applied: &[Applied]) {
    for a in applied.iter().rev() {
        let change = Change::Revert {
            name: &a.name,
            delta: a.delta,
            of_lsn: a.lsn,
            key: a.key.as_ref().map(|(k, e)| (k.as_str(), *e)),
        };
        if let Err(e) = engine.apply(change) {
            tracing::error!(error = %e, counter = %a.name, "could not revert a replicated increment");
        }
    }
}

fn store_failed(cluster: &Cluster, e: &StoreError, backoff: &mut Duration) {
    cluster.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
    let mut state = cluster.state.lock();
    if state.store_error.is_none() {
        tracing::warn!(error = %e, "shared store unreachable; local writes go on, replicated ones are refused");
    }
    state.store_error = Some((e.to_string(), Instant::now()));
    *backoff = (*backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
}

/// Refuses every queued replicated increment (nothing applied) and
/// delete (nothing deleted).
fn fail_queued(cluster: &Cluster, e: &StoreError) {
    let reason = e.to_string();
    answer_all(cluster.queue.lock().drain(..), || {
        Error::StoreUnavailable(format!("{reason}; nothing was applied"))
    });
    answer_deletes(cluster.deletes.lock().drain(..), || {
        Error::StoreUnavailable(format!("{reason}; nothing was deleted"))
    });
}

fn answer_deletes(requests: impl Iterator<Item = DeleteRequest>, err: impl Fn() -> Error) {
    for r in requests {
        let _ = r.reply.send(Err(err()));
    }
}

fn answer_all(requests: impl Iterator<Item = ReplicatedRequest>, err: impl Fn() -> Error) {
    for r in requests {
        let _ = r.reply.send(Err(err()));
    }
}

fn reply(batch: Vec<ReplicatedRequest>, answers: Vec<Answer>) {
    for (r, a) in batch.into_iter().zip(answers) {
        // Whether it was a duplicate; the caller reads the value it
        // returns (the global one) itself.
        let result = match a {
            Answer::Applied => Ok(false),
            Answer::Duplicate => Ok(true),
            Answer::Failed(e) => Err(e),
            Answer::Undecided => Err(Error::StoreUnavailable(
                "the store transaction did not run; nothing was applied".into(),
            )),
        };
        let _ = r.reply.send(result);
    }
}
