//! The dashboard at `/`, in a real browser: headless Chromium (the Debian
//! package `chromium`, which `scripts/test.sh` installs; the test fails
//! without it) loads the page from a node of a two-node cluster, runs its
//! script against `GET /v1/cluster`, and the DOM it leaves shows every
//! node, its state and the hottest counter; a screenshot is taken too.

use std::path::Path;
use std::process::Command;

use tally::Config;
use tally_lab::testing::FAST;
use tally_lab::testing::served::{ServedNode, shutdown_node};

/// How long, in the browser's virtual time, the page runs before its DOM
/// is taken: several of its one-second polls.
const VIRTUAL_TIME_MS: u32 = 5000;

fn chromium(args: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .args(args)
        .output()
        .expect("running chromium (apt-get install chromium; scripts/test.sh installs it)")
}

async fn node(store: &Path, dir: &Path, id: &str) -> ServedNode {
    let mut config = Config::new(dir);
    config.node_id = Some(id.into());
    config.cluster =
        Some(FAST.cluster_config(format!("sqlite://{}", store.join("store.db").display())));
    ServedNode::open_config(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_node_and_the_hottest_counter_in_chromium() {
    let store = tempfile::tempdir().unwrap();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n1 = node(store.path(), d1.path(), "dash-1").await;
    let n2 = node(store.path(), d2.path(), "dash-2").await;
    for i in 0..5000 {
        let name = if i % 5 == 0 {
            "page_views"
        } else {
            "api_calls"
        };
        n1.node
            .increment(name, 1, tally::IncrementOptions::default())
            .await
            .unwrap();
    }
    // Increments go on while the browser polls, so that the page has a
    // rate to show.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (node, stop) = (n1.node.clone(), stop.clone());
        tokio::spawn(async move {
            let options = tally::IncrementOptions {
                durability: Some(tally::Durability::Memory),
                ..Default::default()
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                node.increment("api_calls", 1, options).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let url = n1.http_url("/");
    let shot = store.path().join("dashboard.png");
    let (dom, png) = tokio::task::spawn_blocking(move || {
        let dom = chromium(&["--dump-dom", &url]);
        let png = chromium(&[
            "--window-size=1100,900",
            &format!("--screenshot={}", shot.display()),
            &url,
        ]);
        (dom, (png, shot))
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    // Filled in by the page's script from /v1/cluster: one row per node
    // with its state, the store, and the hot counter.
    for expected in [
        r#"<tr data-node="dash-1">"#,
        r#"<tr data-node="dash-2">"#,
        r#"<td class="alive">alive</td>"#,
        "store: sqlite",
        "<td>api_calls</td>",
    ] {
        assert!(
            html.contains(expected),
            "no {expected:?} in the page's DOM:\n{html}"
        );
    }
    assert!(
        html.contains(r#"<div id="error"></div>"#),
        "the page shows an error:\n{html}"
    );
    // The row's last cell is the node's changes per second, from the growth
    // of its applied lsn between polls.
    let row = &html[html.find(r#"<tr data-node="dash-1">"#).unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    let rate: f64 = row
        .rsplit("<td class=\"num\">")
        .next()
        .and_then(|c| c.strip_suffix("</td>"))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {row}"));
    assert!(
        rate > 0.0,
        "dash-1 took increments throughout, yet shows {rate}/s: {row}"
    );
    let (out, path) = png;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).expect("the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 10_000,
        "a blank screenshot? {} bytes",
        bytes.len()
    );
    if let Ok(keep) = std::env::var("TALLY_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&path, keep).unwrap();
    }
    shutdown_node(n1.stop_serving().await).await;
    shutdown_node(n2.stop_serving().await).await;
}
