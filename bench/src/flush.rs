//! Part 4, flush: how many shard rows per second a node's flush writes to
//! the shared store, on SQLite (a file in the work directory) and on a
//! private PostgreSQL server started here with its default durability
//! settings, at a few transaction sizes.
//!
//! Every figure comes from `tally::store::bench::measure_flush`, which
//! writes through the public `Store` API exactly as a node's flush does
//! (begin with the epoch check, upsert the rows, raise the flushed version,
//! commit). Each size is measured twice with one node id: first on new
//! counters (every row an insert), then, after the node registers again
//! and so takes a higher epoch, on the same counters (every row an update
//! that wins by version), which is what a running node's flushes mostly
//! are.

use std::path::Path;

use anyhow::Context as _;
use tally::store::bench::{FlushMeasurement, measure_flush};
use tally::store::{self, Store};

use crate::postgres;
use crate::table::{Table, thousands};
use crate::throughput::fsync_latency;

/// The database the PostgreSQL store lives in.
const DATABASE: &str = "tally_flush";

pub struct Settings {
    /// Rows written per measurement.
    pub rows: usize,
    /// Rows per transaction, one measurement each.
    pub batch_rows: Vec<usize>,
}

/// One backend at one transaction size.
struct Measured {
    backend: &'static str,
    /// Rows per transaction as run: the batch size, or all the rows when
    /// there are fewer.
    batch_rows: usize,
    insert: FlushMeasurement,
    update: FlushMeasurement,
}

pub fn run(work: &Path, s: &Settings) -> (String, bool) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let dir = work.join("flush");

    match std::fs::create_dir_all(&dir)
        .context("creating the SQLite store's directory")
        .and_then(|()| {
            let path = dir.join("store.db");
            store::open(&format!("sqlite://{}", path.display())).context("opening the SQLite store")
        }) {
        Ok(store) => {
            notes.push(
                "SQLite: journal_mode=WAL, synchronous=FULL (the log is synced at every commit), \
                 one file in the work directory"
                    .to_string(),
            );
            measure_all(store.as_ref(), s, &mut rows, &mut errors);
        }
        Err(e) => errors.push(format!("sqlite: {e:#}")),
    }

    let pg = postgres::start(work, &dir.join("postgres")).and_then(|pg| {
        pg.create_named_database(DATABASE)?;
        let store = store::open(&pg.url(DATABASE)).context("opening the PostgreSQL store")?;
        Ok((pg, store))
    });
    match pg {
        Ok((pg, store)) => {
            match pg.settings() {
                Ok(settings) => notes.push(format!(
                    "PostgreSQL: {}, defaults as initdb leaves them: {settings}",
                    pg.version()
                )),
                Err(e) => errors.push(format!("reading the PostgreSQL settings: {e:#}")),
            }
            measure_all(store.as_ref(), s, &mut rows, &mut errors);
            drop(store);
            if let Err(e) = pg.stop() {
                errors.push(format!("stopping postgres: {e:#}"));
            }
        }
        Err(e) => errors.push(format!("postgres: {e:#}")),
    }

    match fsync_latency(work) {
        Ok((p50, p99)) => notes.push(format!(
            "fdatasync of a 4 KiB append in the work directory: p50 {:.3} ms, p99 {:.3} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        )),
        Err(e) => notes.push(format!("fdatasync could not be timed: {e:#}")),
    }
    report(&rows, &notes, &errors, s)
}

/// Measures every transaction size on `store`, each with a node id of its
/// own so that the first pass writes new rows.
fn measure_all(
    store: &dyn Store,
    s: &Settings,
    rows: &mut Vec<Measured>,
    errors: &mut Vec<String>,
) {
    for &batch in &s.batch_rows {
        let batch_rows = batch.min(s.rows).max(1);
        eprintln!(
            "flush: {}, {} rows in transactions of {} ...",
            store.backend(),
            thousands(s.rows as u64),
            thousands(batch_rows as u64)
        );
        let node_id = format!("bench-flush-{batch_rows}");
        let measured = measure_flush(store, &node_id, s.rows, batch_rows).and_then(|insert| {
            let update = measure_flush(store, &node_id, s.rows, batch_rows)?;
            Ok((insert, update))
        });
        match measured {
            Ok((insert, update)) => rows.push(Measured {
                backend: store.backend(),
                batch_rows,
                insert,
                update,
            }),
            Err(e) => errors.push(format!(
                "{}, {} rows per transaction: {e}",
                store.backend(),
                batch_rows
            )),
        }
    }
}

fn per_transaction_ms(m: &FlushMeasurement) -> String {
    format!(
        "{:.2}",
        m.elapsed.as_secs_f64() * 1e3 / m.batches.max(1) as f64
    )
}

fn report(rows: &[Measured], notes: &[String], errors: &[String], s: &Settings) -> (String, bool) {
    let mut out = format!(
        "### Flush: {} shard rows through the Store API (tally::store::bench::measure_flush)\n\n",
        thousands(s.rows as u64)
    );
    let mut table = Table::new(&[
        "backend",
        "rows per transaction",
        "transactions",
        "new rows/s",
        "ms per transaction (new)",
        "updated rows/s",
        "ms per transaction (updated)",
    ]);
    for m in rows {
        table.row(vec![
            m.backend.into(),
            thousands(m.batch_rows as u64),
            thousands(m.insert.batches as u64),
            thousands(m.insert.rows_per_s().round() as u64),
            per_transaction_ms(&m.insert),
            thousands(m.update.rows_per_s().round() as u64),
            per_transaction_ms(&m.update),
        ]);
    }
    out.push_str(&table.render());
    out.push('\n');
    out.push_str(
        "new rows: the node's first flush of counters the store has never seen (inserts); \
         updated rows: the same counters flushed again at a higher version (updates), as a \
         running node's flushes mostly are. Each transaction also checks the node's epoch \
         and raises its flushed version.\n\n",
    );
    for n in notes {
        out.push_str(&format!("- {n}\n"));
    }
    for e in errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}
