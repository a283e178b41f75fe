//! `make bench`: the hub end to end, measured against RabbitMQ itself in the same run.
//!
//! For each document size and number of concurrent senders it runs:
//! - **raw**: lapin publishing persistent messages with confirms to a quorum queue, and a
//!   consumer acking them — the transport's own limit on this machine;
//! - **hub**: a release `lienthong` process on the same RabbitMQ, senders calling `Send` over
//!   gRPC (durable custody before the answer), one recipient streaming and acknowledging.
//!
//! It prints one line per case and writes `target/bench/exchange.json`;
//! `LIENTHONG_BENCH_ONLY=16:64` runs one case (16 KiB, 64 senders). Run by `cargo test`
//! (without `--bench`) it does one small case, so the suite keeps this code working.

#[path = "../../tests/support/mod.rs"]
mod support;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lienthong_proto::v1 as wire;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy)]
struct Case {
    size: usize,
    senders: usize,
    documents: usize,
}

#[derive(Debug, Default)]
struct Outcome {
    hub_docs_per_s: f64,
    raw_msgs_per_s: f64,
    send_ms: Percentiles,
    e2e_ms: Percentiles,
    hub_cpu_cores: f64,
    hub_peak_rss_mib: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // `LIENTHONG_BENCH_ONLY=16:64` runs only the 16 KiB, 64-sender case (sizes in KiB).
    let only: Option<(usize, usize)> =
        std::env::var("LIENTHONG_BENCH_ONLY").ok().and_then(|only| {
            let (size, senders) = only.split_once(':')?;
            Some((size.parse::<usize>().ok()? * 1024, senders.parse().ok()?))
        });
    let cases: Vec<Case> = if full {
        let mut cases = Vec::new();
        for (size, documents) in [(2 * 1024, 4000), (16 * 1024, 4000), (256 * 1024, 600)] {
            for senders in [1, 8, 64, 256] {
                let documents = if senders == 1 {
                    documents / 4
                } else {
                    documents
                };
                cases.push(Case {
                    size,
                    senders,
                    documents,
                });
            }
        }
        cases.retain(|case| {
            only.is_none_or(|(size, senders)| case.size == size && case.senders == senders)
        });
        cases
    } else {
        vec![Case {
            size: 2 * 1024,
            senders: 4,
            documents: 40,
        }]
    };
    let mut json = Vec::new();
    for case in cases {
        let outcome = runtime.block_on(run_case(case));
        let line = format!(
            "bench size={}KiB senders={}: hub {:.0} docs/s raw {:.0} msg/s ratio {:.2} send-p50 {:.1}ms send-p99 {:.1}ms send-p99.9 {:.1}ms e2e-p50 {:.1}ms e2e-p99 {:.1}ms e2e-p99.9 {:.1}ms cpu {:.2} cores rss {}MiB",
            case.size / 1024,
            case.senders,
            outcome.hub_docs_per_s,
            outcome.raw_msgs_per_s,
            outcome.hub_docs_per_s / outcome.raw_msgs_per_s,
            outcome.send_ms.p50,
            outcome.send_ms.p99,
            outcome.send_ms.p999,
            outcome.e2e_ms.p50,
            outcome.e2e_ms.p99,
            outcome.e2e_ms.p999,
            outcome.hub_cpu_cores,
            outcome.hub_peak_rss_mib,
        );
        println!("{line}");
        json.push(format!(
            concat!(
                "{{\"size_bytes\":{},\"senders\":{},\"documents\":{},\"hub_docs_per_s\":{:.1},\"raw_msgs_per_s\":{:.1},",
                "\"send_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3}}},\"e2e_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3}}},",
                "\"hub_cpu_cores\":{:.3},\"hub_peak_rss_mib\":{}}}"
            ),
            case.size,
            case.senders,
            case.documents,
            outcome.hub_docs_per_s,
            outcome.raw_msgs_per_s,
            outcome.send_ms.p50,
            outcome.send_ms.p99,
            outcome.send_ms.p999,
            outcome.e2e_ms.p50,
            outcome.e2e_ms.p99,
            outcome.e2e_ms.p999,
            outcome.hub_cpu_cores,
            outcome.hub_peak_rss_mib
        ));
        assert!(outcome.hub_docs_per_s > 0.0 && outcome.raw_msgs_per_s > 0.0);
    }
    if full {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&dir).expect("create target/bench");
        let path = dir.join("exchange.json");
        std::fs::write(&path, format!("[\n  {}\n]\n", json.join(",\n  "))).expect("write results");
        println!("results written to {}", path.display());
    }
}

async fn run_case(case: Case) -> Outcome {
    let raw_msgs_per_s = raw_transport(case).await;
    let mut outcome = hub(case).await;
    outcome.raw_msgs_per_s = raw_msgs_per_s;
    outcome
}

/// lapin alone: `senders` tasks publish persistent messages with confirms to a quorum queue
/// while one consumer acks them. Returns messages per second, first publish to last ack.
async fn raw_transport(case: Case) -> f64 {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
    let queue = format!("lt-bench-raw-{:08x}", rand::random::<u32>());
    let setup = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    setup
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("declare");
    let consumer_channel = connection.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let total = case.documents;
    let consuming = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut received = 0;
        while received < total {
            let delivery = consumer.next().await.expect("open").expect("delivery");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            received += 1;
        }
    });
    let payload = Arc::new(vec![b'x'; case.size]);
    let start = Instant::now();
    let mut publishers = JoinSet::new();
    for sender in 0..case.senders {
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let queue = queue.clone();
        let payload = payload.clone();
        let count = share(case.documents, case.senders, sender);
        publishers.spawn(async move {
            for _ in 0..count {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                assert!(confirm.is_ack());
            }
        });
    }
    while publishers.join_next().await.is_some() {}
    consuming.await.expect("consumer");
    let elapsed = start.elapsed();
    // The consumer's channel goes first: deleting a queue under a live consumer makes the
    // broker cancel it unasked.
    let _ = consumer_channel.close(200, "done".into()).await;
    setup
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let _ = connection.close(200, "done".into()).await;
    case.documents as f64 / elapsed.as_secs_f64()
}

/// The n-th sender's share of `total`.
fn share(total: usize, senders: usize, n: usize) -> usize {
    total / senders + usize::from(n < total % senders)
}

/// The hub end to end: a release `lienthong` process, `senders` clients sending from one
/// commune, one district receiving and acknowledging.
async fn hub(case: Case) -> Outcome {
    let options = HubOptions {
        max_document_bytes: case.size + 64 * 1024,
        prefetch: 64,
        ..HubOptions::new(TransportKind::Amqp)
    };
    let files = HubFiles::create("bench", &options);
    let hub = HubProcess::start(&files, &options).await;
    let pid = hub.child.id().expect("running");
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let total = case.documents;
    let receipts = sent_at.clone();
    let receiving = tokio::spawn(async move {
        let mut e2e = Vec::with_capacity(total);
        let mut acks = JoinSet::new();
        while e2e.len() < total {
            let delivery = next_delivery(&mut stream).await;
            let id = delivered_document(&delivery).document_id.clone();
            if let Some(sent) = receipts.lock().expect("lock").remove(&id) {
                e2e.push(sent.elapsed());
            }
            let mut acker = district.clone();
            acks.spawn(async move { ack(&mut acker, &delivery).await });
            while acks.len() > 32 {
                acks.join_next().await;
            }
        }
        while acks.join_next().await.is_some() {}
        e2e
    });

    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let mut senders = JoinSet::new();
    for sender in 0..case.senders {
        let mut client = hub.client(COMMUNE).await;
        let sent_at = sent_at.clone();
        let count = share(case.documents, case.senders, sender);
        let size = case.size;
        senders.spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for n in 0..count {
                let mut doc = document(COMMUNE, &[DISTRICT], &format!("bench {sender}/{n}"));
                doc.body = vec![b'x'; size];
                let began = Instant::now();
                sent_at
                    .lock()
                    .expect("lock")
                    .insert(doc.document_id.clone(), began);
                client
                    .send(wire::SendRequest {
                        document: Some(doc),
                    })
                    .await
                    .expect("send");
                latencies.push(began.elapsed());
            }
            latencies
        });
    }
    let mut send_latencies = Vec::with_capacity(case.documents);
    while let Some(latencies) = senders.join_next().await {
        send_latencies.extend(latencies.expect("sender"));
    }
    let e2e = receiving.await.expect("receiver");
    let elapsed = start.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    let outcome = Outcome {
        hub_docs_per_s: case.documents as f64 / elapsed.as_secs_f64(),
        raw_msgs_per_s: 0.0,
        send_ms: percentiles(send_latencies),
        e2e_ms: percentiles(e2e),
        hub_cpu_cores: cpu / elapsed.as_secs_f64(),
        hub_peak_rss_mib: hub.peak_rss_bytes() / (1024 * 1024),
    };
    hub.kill().await;
    files.delete_topology().await;
    outcome
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}
