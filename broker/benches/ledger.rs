//! `make bench` (second part): the receipt ledger at scale. Writes 1,000,000 receipts (500,000
//! documents to 500 agencies over 30 days, DELIVERED and ACKNOWLEDGED each) through the store,
//! lets the appender chain, index and checkpoint them, then measures the auditors' queries:
//! by document id, and one agency's day (first page of 100). Prints medians and p99, and the
//! database's bytes per receipt; writes `target/bench/ledger.json`.
//!
//! Under `cargo test` (without `--bench`) it runs 20,000 receipts, so the suite keeps it working.

use lienthong::agency::AgencyCode;
use lienthong::store::{MessageRef, ReceiptFilter, Store};
use std::time::{Duration, Instant};

const AGENCIES: usize = 500;
const DAY_MS: i64 = 86_400_000;
const START_MS: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z
const QUERIES: usize = 1000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let receipts: usize = if full { 1_000_000 } else { 20_000 };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(receipts));
}

async fn run(receipts: usize) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let hub: AgencyCode = "000.00.00.H53".parse().expect("code");
    let store = Store::open(dir.path(), &hub).expect("open the store");
    let agencies: Vec<AgencyCode> = (0..AGENCIES)
        .map(|n| format!("{:03}.{:02}.{:02}.H53", n % 1000, n % 90 + 10, n % 70 + 10).parse())
        .collect::<Result<_, _>>()
        .expect("agency codes");
    let documents = receipts / 2;
    let spacing_ms = 30 * DAY_MS / documents as i64;
    let document_id = |n: usize| format!("000.00.00.H53,2026/11/01,{n:08}/BENCH");

    let started = Instant::now();
    for n in 0..documents {
        let message = MessageRef {
            message_id: document_id(n),
            recipient: agencies[n % AGENCIES].clone(),
            document_id: Some(document_id(n)),
            waiting_key: Vec::new(),
        };
        let at = START_MS + n as i64 * spacing_ms;
        store
            .mark_delivered(&message.recipient, &[&message], at)
            .expect("delivered");
        store
            .mark_settled(
                &[(&message, lienthong::store::Settlement::Acknowledged)],
                at + 1000,
            )
            .expect("acknowledged");
    }
    store.durable().await.expect("flush");
    let written = started.elapsed();
    while store.ledger_has_pending().expect("read the receipts") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.checkpoint().await.expect("checkpoint");
    let appended = started.elapsed();
    assert_eq!(store.ledger_size(), receipts as u64);

    let mut by_document = Vec::with_capacity(QUERIES);
    for q in 0..QUERIES {
        let n = (q * 7919) % documents;
        let filter = ReceiptFilter {
            document_id: Some(document_id(n)),
            ..ReceiptFilter::default()
        };
        let started = Instant::now();
        let (records, _) = store.ledger_records(&filter, None, 100).expect("query");
        by_document.push(started.elapsed());
        assert_eq!(records.len(), 2, "document {n}");
    }
    let mut by_agency_day = Vec::with_capacity(QUERIES);
    for q in 0..QUERIES {
        // The day of some document of the agency, so that every query finds receipts.
        let n = (q * 7919) % documents;
        let day = (n as i64 * spacing_ms) / DAY_MS;
        let filter = ReceiptFilter {
            agency: Some(agencies[n % AGENCIES].to_string()),
            from_unix_ms: Some(START_MS + day * DAY_MS),
            to_unix_ms: Some(START_MS + (day + 1) * DAY_MS),
            ..ReceiptFilter::default()
        };
        let started = Instant::now();
        let (records, _) = store.ledger_records(&filter, None, 100).expect("query");
        by_agency_day.push(started.elapsed());
        assert!(!records.is_empty(), "agency day {q}");
    }
    by_document.sort();
    by_agency_day.sort();
    let ledger_bytes: u64 = [
        "ledger",
        "ledger_nodes",
        "ledger_checkpoints",
        "ledger_by_seq",
        "ledger_by_agency",
    ]
    .iter()
    .map(|name| {
        let tree = store.db().open_tree(name).expect("tree");
        tree.iter()
            .map(|item| item.map_or(0, |(k, v)| (k.len() + v.len()) as u64))
            .sum::<u64>()
    })
    .sum();
    let disk = store.size_on_disk();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let line = format!(
        "bench ledger receipts={receipts}: write {:.0}/s, chained and checkpointed after {:.1}s; by-document p50 {:.3}ms p99 {:.3}ms; agency-day first page p50 {:.3}ms p99 {:.3}ms; ledger {:.0} B/receipt (keys+values), whole database {:.0} B/receipt on disk",
        receipts as f64 / written.as_secs_f64(),
        appended.as_secs_f64(),
        ms(percentile(&by_document, 0.5)),
        ms(percentile(&by_document, 0.99)),
        ms(percentile(&by_agency_day, 0.5)),
        ms(percentile(&by_agency_day, 0.99)),
        ledger_bytes as f64 / receipts as f64,
        disk as f64 / receipts as f64,
    );
    println!("{line}");
    let json = serde_json::json!({
        "receipts": receipts,
        "write_per_second": receipts as f64 / written.as_secs_f64(),
        "appended_after_seconds": appended.as_secs_f64(),
        "by_document_ms": {"p50": ms(percentile(&by_document, 0.5)), "p99": ms(percentile(&by_document, 0.99))},
        "agency_day_first_page_ms": {"p50": ms(percentile(&by_agency_day, 0.5)), "p99": ms(percentile(&by_agency_day, 0.99))},
        "ledger_bytes_per_receipt": ledger_bytes as f64 / receipts as f64,
        "database_bytes_per_receipt_on_disk": disk as f64 / receipts as f64,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("create target/bench");
    std::fs::write(out.join("ledger.json"), format!("{json:#}\n")).expect("write ledger.json");
}
