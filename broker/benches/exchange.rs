//! `make bench`: the hub end to end, measured against RabbitMQ itself in the same run.
//!
//! For each document size and number of concurrent senders it runs:
//! - **raw**: lapin publishing persistent messages with confirms to a quorum queue, and a
//!   consumer acking them — the transport's own limit on this machine (three runs in a row,
//!   the median printed);
//! - **hub**: a release `lienthong` process on the same RabbitMQ, senders calling `Send` over
//!   gRPC (durable custody before the answer), one recipient streaming and acknowledging.
//!
//! Then two cases of their own:
//! - **open loop**: documents offered at a fixed rate (500 a second), whatever the answers, to
//!   read the end-to-end latency of a hub that is not saturated, then the same load on lapin
//!   alone (`open-loop raw`), to read the transport's own share of that latency;
//! - **restart**: a hub with 100,000 documents in its outbox (RabbitMQ unreachable) is killed
//!   (SIGKILL) and started again; the time until it answers `Send` again.
//!
//! It prints one line per case, writes `target/bench/exchange.json` and the chart
//! `target/bench/exchange.svg` (which `make bench` renders to `docs/bench-chart.png`).
//! `LIENTHONG_BENCH_ONLY=16:64` runs one case (16 KiB, 64 senders); `=open-loop` and
//! `=restart` run those, and write no files; `LIENTHONG_BENCH_ACK_BATCH=N` has the recipient
//! settle up to N deliveries in one `Ack` instead of one each; `LIENTHONG_BENCH_HUB=<path>`
//! starts that hub binary instead of this build's (`make bench-compare`, `benches/compare`).
//! Run by `cargo test` (without `--bench`) it does small versions of each, so the suite keeps
//! this code working.

#[path = "../../tests/support/mod.rs"]
mod support;

#[path = "support/chart.rs"]
mod chart;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lienthong::client::ExchangeClient;
use lienthong_proto::v1 as wire;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::task::JoinSet;

/// Unacknowledged deliveries per consumer, the same for the hub's stream and raw lapin.
const PREFETCH: u16 = 256;
/// Deliveries the recipient is acknowledging at once (it processes documents in parallel).
const ACKS_IN_FLIGHT: usize = 128;
/// The most deliveries the recipient settles in one `Ack`: one, as a document system that
/// files each document on its own does. `LIENTHONG_BENCH_ACK_BATCH=N` makes it settle up to N
/// of those that have arrived in one `Ack` (`AckRequest.ack_tokens`).
const ACK_BATCH: usize = 1;
/// How many times each case runs on raw lapin; the line gives the median. One run of 4,000
/// messages lasts about half a second, and single runs of the same case moved by up to ×2.
const RAW_REPEATS: usize = 3;

#[derive(Debug, Clone, Copy)]
struct Case {
    size: usize,
    senders: usize,
    documents: usize,
}

#[derive(Debug, Default)]
struct Outcome {
    hub_docs_per_s: f64,
    /// Each repetition of the raw case, slowest first.
    raw_runs_msgs_per_s: Vec<f64>,
    send_ms: Percentiles,
    e2e_ms: Percentiles,
    hub_cpu_cores: f64,
    hub_peak_rss_mib: u64,
}

impl Outcome {
    /// The raw case's figure: the median of its repetitions.
    fn raw_msgs_per_s(&self) -> f64 {
        self.raw_runs_msgs_per_s[self.raw_runs_msgs_per_s.len() / 2]
    }
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
    // `LIENTHONG_BENCH_ONLY=16:64` runs only the 16 KiB, 64-sender case (sizes in KiB);
    // `open-loop` and `restart` only those.
    let only_name = std::env::var("LIENTHONG_BENCH_ONLY").ok();
    let only: Option<(usize, usize)> = only_name.as_deref().and_then(|only| {
        let (size, senders) = only.split_once(':')?;
        Some((size.parse::<usize>().ok()? * 1024, senders.parse().ok()?))
    });
    let run_named = |name: &str| only_name.is_none() || only_name.as_deref() == Some(name);
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
            only_name.is_none()
                || only.is_some_and(|(size, senders)| case.size == size && case.senders == senders)
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
    let mut points = Vec::new();
    // The open-loop and restart cases come first, on a broker that is not still writing out the
    // large messages of the cases after them (measured after the 256 KiB cases, the open-loop
    // p99 was 25 and 59 ms in two runs; alone, 6.6 and 8.3 ms).
    if run_named("open-loop") {
        let (rate, seconds) = if full { (500, 20) } else { (50, 1) };
        let open = runtime.block_on(open_loop(rate, seconds, 16 * 1024));
        let line = format!(
            "bench open-loop size=16KiB offered={rate}/s: delivered {:.0} docs/s send-p50 {:.1}ms send-p99 {:.1}ms e2e-p50 {:.1}ms e2e-p99 {:.1}ms e2e-p99.9 {:.1}ms cpu {:.2} cores rss {}MiB",
            open.delivered_per_s,
            open.send_ms.p50,
            open.send_ms.p99,
            open.e2e_ms.p50,
            open.e2e_ms.p99,
            open.e2e_ms.p999,
            open.hub_cpu_cores,
            open.hub_peak_rss_mib
        );
        println!("{line}");
        let slowest = open.slowest_send;
        let line = format!(
            "bench open-loop over {}ms: sends {} (hub's own count {}) e2e {} (hub {}) confirms in the hub {}; slowest send {:.0}ms at {:.1}s; sends started up to {:.1}ms late",
            STALL.as_millis(),
            slowest.over_stall,
            open.hub_sends_over_stall,
            open.e2e_over_stall,
            open.hub_e2e_over_stall,
            open.hub_confirms_over_stall,
            slowest.latency_ms,
            slowest.at_s,
            slowest.ticker_late_max_ms
        );
        println!("{line}");
        json.push(format!(
            "{{\"case\":\"open-loop\",\"size_bytes\":{},\"offered_per_s\":{rate},\"delivered_per_s\":{:.1},\"send_ms\":{{\"p50\":{:.3},\"p99\":{:.3}}},\"e2e_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3}}},\"hub_cpu_cores\":{:.3},\"hub_peak_rss_mib\":{},\"over_128ms\":{{\"sends\":{},\"hub_sends\":{},\"e2e\":{},\"hub_e2e\":{},\"hub_confirms\":{}}}}}",
            16 * 1024,
            open.delivered_per_s,
            open.send_ms.p50,
            open.send_ms.p99,
            open.e2e_ms.p50,
            open.e2e_ms.p99,
            open.e2e_ms.p999,
            open.hub_cpu_cores,
            open.hub_peak_rss_mib,
            open.slowest_send.over_stall,
            open.hub_sends_over_stall,
            open.e2e_over_stall,
            open.hub_e2e_over_stall,
            open.hub_confirms_over_stall
        ));
        assert!(open.delivered_per_s > 0.0);
        let raw = runtime.block_on(raw_open_loop(rate, seconds, 16 * 1024));
        println!(
            "bench open-loop raw size=16KiB offered={rate}/s: confirm-p50 {:.1}ms confirm-p99 {:.1}ms e2e-p50 {:.1}ms e2e-p99 {:.1}ms e2e-p99.9 {:.1}ms",
            raw.confirm_ms.p50, raw.confirm_ms.p99, raw.e2e_ms.p50, raw.e2e_ms.p99, raw.e2e_ms.p999
        );
        let slowest = raw.slowest_confirm;
        println!(
            "bench open-loop raw over {}ms: confirms {}; slowest confirm {:.0}ms at {:.1}s; publishes started up to {:.1}ms late",
            STALL.as_millis(),
            slowest.over_stall,
            slowest.latency_ms,
            slowest.at_s,
            slowest.ticker_late_max_ms
        );
        json.push(format!(
            "{{\"case\":\"open-loop-raw\",\"size_bytes\":{},\"offered_per_s\":{rate},\"confirm_ms\":{{\"p50\":{:.3},\"p99\":{:.3}}},\"e2e_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3}}}}}",
            16 * 1024,
            raw.confirm_ms.p50,
            raw.confirm_ms.p99,
            raw.e2e_ms.p50,
            raw.e2e_ms.p99,
            raw.e2e_ms.p999
        ));
        assert!(raw.e2e_ms.p50 > 0.0);
    }
    if run_named("restart") {
        let waiting = if full { 100_000 } else { 200 };
        let restart = runtime.block_on(restart_with_outbox(waiting));
        let line = format!(
            "bench restart outbox={waiting}: serving again {:.2}s after SIGKILL (first Send answered), outbox {} after restart, filled at {:.0} docs/s",
            restart.serving_after.as_secs_f64(),
            restart.outbox_after_restart,
            restart.filled_per_s
        );
        println!("{line}");
        json.push(format!(
            "{{\"case\":\"restart\",\"outbox\":{waiting},\"serving_after_s\":{:.3},\"outbox_after_restart\":{}}}",
            restart.serving_after.as_secs_f64(),
            restart.outbox_after_restart
        ));
        assert_eq!(restart.outbox_after_restart, waiting as u64 + 1);
    }
    for case in cases {
        let outcome = runtime.block_on(run_case(case));
        points.push(chart::Point {
            size_kib: case.size / 1024,
            senders: case.senders,
            hub_docs_per_s: outcome.hub_docs_per_s,
            raw_msgs_per_s: outcome.raw_msgs_per_s(),
            e2e_p99_ms: outcome.e2e_ms.p99,
            send_p99_ms: outcome.send_ms.p99,
        });
        let line = format!(
            "bench size={}KiB senders={}: hub {:.0} docs/s raw {:.0} msg/s ratio {:.2} send-p50 {:.1}ms send-p99 {:.1}ms send-p99.9 {:.1}ms e2e-p50 {:.1}ms e2e-p99 {:.1}ms e2e-p99.9 {:.1}ms cpu {:.2} cores rss {}MiB",
            case.size / 1024,
            case.senders,
            outcome.hub_docs_per_s,
            outcome.raw_msgs_per_s(),
            outcome.hub_docs_per_s / outcome.raw_msgs_per_s(),
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
                "{{\"size_bytes\":{},\"senders\":{},\"documents\":{},\"hub_docs_per_s\":{:.1},\"raw_msgs_per_s\":{:.1},\"raw_runs_msgs_per_s\":[{}],",
                "\"send_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3}}},\"e2e_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"p999\":{:.3}}},",
                "\"hub_cpu_cores\":{:.3},\"hub_peak_rss_mib\":{}}}"
            ),
            case.size,
            case.senders,
            case.documents,
            outcome.hub_docs_per_s,
            outcome.raw_msgs_per_s(),
            outcome
                .raw_runs_msgs_per_s
                .iter()
                .map(|rate| format!("{rate:.1}"))
                .collect::<Vec<_>>()
                .join(","),
            outcome.send_ms.p50,
            outcome.send_ms.p99,
            outcome.send_ms.p999,
            outcome.e2e_ms.p50,
            outcome.e2e_ms.p99,
            outcome.e2e_ms.p999,
            outcome.hub_cpu_cores,
            outcome.hub_peak_rss_mib
        ));
        assert!(outcome.hub_docs_per_s > 0.0 && outcome.raw_msgs_per_s() > 0.0);
    }
    // A partial run (`LIENTHONG_BENCH_ONLY`) leaves the last full run's results in place.
    if full && only_name.is_none() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&dir).expect("create target/bench");
        if !points.is_empty() {
            let title = format!(
                "lienthong hub vs RabbitMQ (lapin), {} cores, one run",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
            std::fs::write(dir.join("exchange.svg"), chart::svg(&points, &title))
                .expect("write the chart");
        }
        let path = dir.join("exchange.json");
        std::fs::write(&path, format!("[\n  {}\n]\n", json.join(",\n  "))).expect("write results");
        println!("results written to {}", path.display());
    }
}

async fn run_case(case: Case) -> Outcome {
    let mut raw_runs = raw_transport(case).await;
    let mut outcome = hub(case).await;
    raw_runs.sort_by(f64::total_cmp);
    outcome.raw_runs_msgs_per_s = raw_runs;
    outcome
}

/// A quorum queue of the raw cases, with one consumer on a channel of its own.
struct RawQueue {
    connection: lapin::Connection,
    consumer_channel: lapin::Channel,
    name: String,
}

impl RawQueue {
    /// Declares a durable quorum queue of its own and starts consuming it with `PREFETCH`.
    async fn declare() -> (RawQueue, lapin::Consumer) {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("RabbitMQ");
        let name = format!("lt-bench-raw-{:08x}", rand::random::<u32>());
        let setup = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        setup
            .queue_declare(
                name.as_str().into(),
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
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = consumer_channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let queue = RawQueue {
            connection,
            consumer_channel,
            name,
        };
        (queue, consumer)
    }

    /// A channel in confirm mode, to publish on.
    async fn publisher(&self) -> lapin::Channel {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        channel
    }

    /// Publishes one persistent message to the queue and waits for its confirm.
    async fn publish(channel: &lapin::Channel, queue: &str, payload: &[u8]) {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                payload,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }

    /// Closes the connection (its channels with it, the consumer's first), then deletes the
    /// queue from a connection of its own: a channel closed under a consumer can take the
    /// whole connection down, and with it a delete sent on that connection.
    async fn delete(self) {
        let _ = self.consumer_channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("RabbitMQ");
        connection
            .create_channel()
            .await
            .expect("channel")
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        let _ = connection.close(200, "done".into()).await;
    }
}

/// lapin alone: `senders` tasks publish persistent messages with confirms to a quorum queue
/// while one consumer acks them, [`RAW_REPEATS`] times back to back on the same queue and
/// channels. Returns each repetition's messages per second, its first publish to its last ack;
/// the channels are opened before the first.
async fn raw_transport(case: Case) -> Vec<f64> {
    let (queue, mut consumer) = RawQueue::declare().await;
    let total = case.documents;
    let (consumed_tx, mut consumed) = tokio::sync::mpsc::unbounded_channel();
    let consuming = tokio::spawn(async move {
        use futures_util::StreamExt;
        for _ in 0..RAW_REPEATS {
            for _ in 0..total {
                let delivery = consumer.next().await.expect("open").expect("delivery");
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
            let _ = consumed_tx.send(());
        }
    });
    let payload = Arc::new(vec![b'x'; case.size]);
    let mut channels = Vec::with_capacity(case.senders);
    for _ in 0..case.senders {
        channels.push(queue.publisher().await);
    }
    let mut rates = Vec::with_capacity(RAW_REPEATS);
    for _ in 0..RAW_REPEATS {
        let start = Instant::now();
        let mut publishers = JoinSet::new();
        for (sender, channel) in channels.iter().enumerate() {
            let channel = channel.clone();
            let name = queue.name.clone();
            let payload = payload.clone();
            let count = share(case.documents, case.senders, sender);
            publishers.spawn(async move {
                for _ in 0..count {
                    RawQueue::publish(&channel, &name, &payload).await;
                }
            });
        }
        while publishers.join_next().await.is_some() {}
        consumed
            .recv()
            .await
            .expect("the consumer took every message");
        rates.push(total as f64 / start.elapsed().as_secs_f64());
    }
    consuming.await.expect("consumer");
    queue.delete().await;
    rates
}

/// What the raw open-loop case measured: publish-to-confirm and publish-to-consume latencies.
#[derive(Debug, Default)]
struct RawOpenLoop {
    confirm_ms: Percentiles,
    e2e_ms: Percentiles,
    slowest_confirm: Slowest,
}

/// lapin alone at a fixed rate: `rate` persistent messages of `size` bytes a second for
/// `seconds`, each published on schedule over 16 confirm channels, to a quorum queue whose
/// consumer acks them. The transport's own latency under the open-loop case's load.
async fn raw_open_loop(rate: u32, seconds: u32, size: usize) -> RawOpenLoop {
    let (queue, mut consumer) = RawQueue::declare().await;
    let total = (rate * seconds) as usize;
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let consuming = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut e2e = Vec::with_capacity(total);
            while e2e.len() < total {
                let delivery = consumer.next().await.expect("open").expect("delivery");
                let index = u64::from_be_bytes(delivery.data[..8].try_into().expect("index"));
                if let Some(sent) = sent_at.lock().expect("lock")[index as usize] {
                    e2e.push(sent.elapsed());
                }
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
            e2e
        })
    };
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(Arc::new(queue.publisher().await));
    }
    let confirms = offer_at_rate(rate, total, |n, began| {
        let channel = channels[n % channels.len()].clone();
        let name = queue.name.clone();
        let mut payload = vec![b'x'; size];
        payload[..8].copy_from_slice(&(n as u64).to_be_bytes());
        sent_at.lock().expect("lock")[n] = Some(began);
        async move { RawQueue::publish(&channel, &name, &payload).await }
    })
    .await;
    let e2e = consuming.await.expect("consumer");
    queue.delete().await;
    RawOpenLoop {
        confirm_ms: percentiles(confirms.iter().map(|one| one.latency).collect()),
        e2e_ms: percentiles(e2e),
        slowest_confirm: Slowest::of(&confirms),
    }
}

/// One operation of an open loop: when its tick came (from the loop's start), how late the
/// loop started it against its schedule, and how long it took.
#[derive(Debug, Clone, Copy)]
struct Offered {
    at: Duration,
    late: Duration,
    latency: Duration,
}

/// Starts `total` operations at `rate` a second, the n-th made by `start(n, began)` and run
/// on a task of its own on schedule, whether or not the earlier ones have finished; resolves
/// to each one's timing, its latency measured from `began` to its end.
async fn offer_at_rate<F, Operation>(rate: u32, total: usize, mut start: F) -> Vec<Offered>
where
    F: FnMut(usize, Instant) -> Operation,
    Operation: std::future::Future<Output = ()> + Send + 'static,
{
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let first_tick = Instant::now();
    let mut running = JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let began = Instant::now();
        let at = began - first_tick;
        let late = at.saturating_sub(period * n as u32);
        let operation = start(n, began);
        running.spawn(async move {
            operation.await;
            Offered {
                at,
                late,
                latency: began.elapsed(),
            }
        });
    }
    let mut offered = Vec::with_capacity(total);
    while let Some(one) = running.join_next().await {
        offered.push(one.expect("an operation of the open loop"));
    }
    offered
}

/// Latencies over this are counted as stalls, on both sides: it is a bucket boundary of the
/// hub's latency histograms (0.25 ms × 2⁹).
const STALL: Duration = Duration::from_millis(128);

/// Where an open loop's slowest moment was. A stall of the benchmark's own process (which
/// shares the cores) shows in `ticker_late_max_ms`; one of the hub in its own histograms.
#[derive(Debug, Default, Clone, Copy)]
struct Slowest {
    latency_ms: f64,
    /// When the slowest operation started, in seconds from the loop's start.
    at_s: f64,
    /// Operations that took longer than `STALL`.
    over_stall: usize,
    /// How late the loop started an operation at worst, against its schedule.
    ticker_late_max_ms: f64,
}

impl Slowest {
    fn of(offered: &[Offered]) -> Slowest {
        let slowest = offered.iter().max_by_key(|one| one.latency);
        Slowest {
            latency_ms: slowest.map_or(0.0, |one| one.latency.as_secs_f64() * 1000.0),
            at_s: slowest.map_or(0.0, |one| one.at.as_secs_f64()),
            over_stall: offered.iter().filter(|one| one.latency > STALL).count(),
            ticker_late_max_ms: offered
                .iter()
                .map(|one| one.late)
                .max()
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0,
        }
    }
}

/// How many observations of a histogram of the hub's `/metrics` were over `STALL`.
fn hub_over_stall(metrics: &str, histogram: &str) -> u64 {
    let count_prefix = format!("lienthong_{histogram}_count ");
    let bucket_prefix = format!("lienthong_{histogram}_bucket{{le=\"");
    let mut count = None;
    let mut within = None;
    for line in metrics.lines() {
        if let Some(value) = line.strip_prefix(&count_prefix) {
            count = value.trim().parse::<f64>().ok();
        } else if let Some((bound, value)) = line
            .strip_prefix(&bucket_prefix)
            .and_then(|rest| rest.split_once("\"} "))
            && bound.parse::<f64>().ok() == Some(STALL.as_secs_f64())
        {
            within = value.trim().parse::<f64>().ok();
        }
    }
    match (count, within) {
        (Some(count), Some(within)) => (count - within) as u64,
        _ => panic!("no histogram {histogram} with a bucket at {STALL:?} in the hub's metrics"),
    }
}

/// The n-th sender's share of `total`.
fn share(total: usize, senders: usize, n: usize) -> usize {
    total / senders + usize::from(n < total % senders)
}

/// A benchmarked hub's options for documents of `size`: the disk floor is the default
/// configuration's, so that its check costs what it costs in production.
fn bench_options(size: usize) -> HubOptions {
    HubOptions {
        max_document_bytes: size + 64 * 1024,
        prefetch: PREFETCH,
        min_free_mib: lienthong::config::DEFAULT_MIN_FREE_MIB,
        ..hub_on_rabbitmq()
    }
}

/// A hub on RabbitMQ, started from this build's binary or from the one `LIENTHONG_BENCH_HUB`
/// names (`make bench-compare` alternates two builds under one benchmark executable).
fn hub_on_rabbitmq() -> HubOptions {
    let options = HubOptions::new(TransportKind::Amqp);
    match std::env::var_os("LIENTHONG_BENCH_HUB") {
        Some(binary) => HubOptions {
            binary: binary.into(),
            ..options
        },
        None => options,
    }
}

/// The hub end to end: a release `lienthong` process, `senders` clients sending from one
/// commune (connected before the clock starts), one district receiving and acknowledging.
async fn hub(case: Case) -> Outcome {
    let options = bench_options(case.size);
    let files = HubFiles::create("bench", &options);
    let hub = HubProcess::start(&files, &options).await;
    let pid = hub.child.id().expect("running");
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    let receiving = receive_and_ack(&hub, case.documents, sent_at.clone()).await;
    let mut clients = Vec::with_capacity(case.senders);
    for _ in 0..case.senders {
        clients.push(hub.client(COMMUNE).await);
    }

    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let mut senders = JoinSet::new();
    for (sender, mut client) in clients.into_iter().enumerate() {
        let sent_at = sent_at.clone();
        let count = share(case.documents, case.senders, sender);
        let size = case.size;
        senders.spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for n in 0..count {
                let mut doc = document(COMMUNE, &[DISTRICT], &format!("bench {sender}/{n}"));
                doc.document_id = unique_id("bench", sender, n);
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
        send_ms: percentiles(send_latencies),
        e2e_ms: percentiles(e2e),
        hub_cpu_cores: cpu / elapsed.as_secs_f64(),
        hub_peak_rss_mib: hub.peak_rss_bytes() / (1024 * 1024),
        ..Outcome::default()
    };
    hub.kill().await;
    files.delete_topology().await;
    outcome
}

/// The district streams `total` documents and acknowledges them, `ACK_BATCH` at most in one
/// `Ack`, up to `ACKS_IN_FLIGHT` at once; resolves to each document's end-to-end latency, from
/// its entry in `sent_at`.
async fn receive_and_ack(
    hub: &HubProcess,
    total: usize,
    sent_at: Arc<Mutex<HashMap<String, Instant>>>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    let district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district.clone()).await;
    let ack_batch = std::env::var("LIENTHONG_BENCH_ACK_BATCH")
        .ok()
        .and_then(|batch| batch.parse::<usize>().ok())
        .unwrap_or(ACK_BATCH)
        .clamp(1, ACKS_IN_FLIGHT);
    tokio::spawn(async move {
        let mut e2e = Vec::with_capacity(total);
        let mut acks = JoinSet::new();
        let mut acks_in_flight = 0;
        let mut received = 0;
        while received < total {
            let mut batch = Vec::new();
            let mut next = Some(next_delivery(&mut stream).await);
            while let Some(delivery) = next {
                received += 1;
                let id = &delivered_document(&delivery).document_id;
                if let Some(sent) = sent_at.lock().expect("lock").remove(id) {
                    e2e.push(sent.elapsed());
                }
                batch.push(delivery.ack_token);
                next = if batch.len() < ack_batch && received < total {
                    futures_util::FutureExt::now_or_never(stream.message())
                        .map(|message| message.expect("the stream is healthy").expect("open"))
                } else {
                    None
                };
            }
            while acks_in_flight + batch.len() > ACKS_IN_FLIGHT {
                acks_in_flight -= acks.join_next().await.expect("in flight").expect("acked");
            }
            acks_in_flight += batch.len();
            let mut acker = district.clone();
            acks.spawn(async move { ack_all(&mut acker, batch).await });
        }
        while acks.join_next().await.is_some() {}
        e2e
    })
}

/// Acknowledges the deliveries of `ack_tokens`, in one `Ack`; resolves to how many.
async fn ack_all(client: &mut ExchangeClient, ack_tokens: Vec<String>) -> usize {
    let count = ack_tokens.len();
    let request = match <[String; 1]>::try_from(ack_tokens) {
        Ok([ack_token]) => wire::AckRequest {
            ack_token,
            ..Default::default()
        },
        Err(ack_tokens) => wire::AckRequest {
            ack_tokens,
            ..Default::default()
        },
    };
    let answer = client
        .ack(request)
        .await
        .expect("ack accepted")
        .into_inner();
    assert!(answer.failures.is_empty(), "{:?}", answer.failures);
    count
}

/// What the open-loop case measured.
#[derive(Debug, Default)]
struct OpenLoop {
    delivered_per_s: f64,
    send_ms: Percentiles,
    e2e_ms: Percentiles,
    hub_cpu_cores: f64,
    hub_peak_rss_mib: u64,
    slowest_send: Slowest,
    /// Documents whose end-to-end latency was over `STALL`, seen by the benchmark.
    e2e_over_stall: usize,
    /// The same counts in the hub's own histograms (`/metrics`): `Send` from request to
    /// answer, publish to confirm, acceptance to delivery.
    hub_sends_over_stall: u64,
    hub_confirms_over_stall: u64,
    hub_e2e_over_stall: u64,
}

/// Offers `rate` 16 KiB documents a second for `seconds`, each `Send` started on schedule
/// whether or not the earlier ones were answered, to a hub whose district streams and acks.
async fn open_loop(rate: u32, seconds: u32, size: usize) -> OpenLoop {
    let options = bench_options(size);
    let files = HubFiles::create("bench-open", &options);
    let hub = HubProcess::start(&files, &options).await;
    let pid = hub.child.id().expect("running");
    let total = (rate * seconds) as usize;
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let receiving = receive_and_ack(&hub, total, sent_at.clone()).await;
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(hub.client(COMMUNE).await);
    }
    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let sends = offer_at_rate(rate, total, |n, began| {
        let mut client = clients[n % clients.len()].clone();
        let mut doc = document(COMMUNE, &[DISTRICT], &format!("open loop {n}"));
        doc.document_id = unique_id("open", 0, n);
        doc.body = vec![b'x'; size];
        sent_at
            .lock()
            .expect("lock")
            .insert(doc.document_id.clone(), began);
        async move {
            client
                .send(wire::SendRequest {
                    document: Some(doc),
                })
                .await
                .expect("send");
        }
    })
    .await;
    let e2e = receiving.await.expect("receiver");
    let elapsed = start.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    let (status, metrics) = http_get(&options.http_listen, "/metrics").await;
    assert_eq!(status, 200, "the hub's /metrics");
    let outcome = OpenLoop {
        delivered_per_s: total as f64 / elapsed.as_secs_f64(),
        send_ms: percentiles(sends.iter().map(|one| one.latency).collect()),
        e2e_over_stall: e2e.iter().filter(|latency| **latency > STALL).count(),
        e2e_ms: percentiles(e2e),
        hub_cpu_cores: cpu / elapsed.as_secs_f64(),
        hub_peak_rss_mib: hub.peak_rss_bytes() / (1024 * 1024),
        slowest_send: Slowest::of(&sends),
        hub_sends_over_stall: hub_over_stall(&metrics, "send_latency_seconds"),
        hub_confirms_over_stall: hub_over_stall(&metrics, "publish_confirm_latency_seconds"),
        hub_e2e_over_stall: hub_over_stall(&metrics, "end_to_end_latency_seconds"),
    };
    hub.kill().await;
    files.delete_topology().await;
    outcome
}

/// What the restart case measured.
#[derive(Debug)]
struct Restart {
    serving_after: Duration,
    outbox_after_restart: u64,
    filled_per_s: f64,
}

/// Fills the outbox of a hub whose RabbitMQ is unreachable with `waiting` 2 KiB documents,
/// kills it, starts it again, and times the first answered `Send`.
async fn restart_with_outbox(waiting: usize) -> Restart {
    let options = HubOptions {
        amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port())),
        max_outbox_messages: waiting as u64 + 10_000,
        grpc_listen: format!("127.0.0.1:{}", free_port()),
        min_free_mib: lienthong::config::DEFAULT_MIN_FREE_MIB,
        ..hub_on_rabbitmq()
    };
    let files = HubFiles::create("bench-restart", &options);
    let mut hub = HubProcess::start(&files, &options).await;
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for sender in 0..64 {
        let mut client = hub.client(COMMUNE).await;
        let count = share(waiting, 64, sender);
        senders.spawn(async move {
            for n in 0..count {
                let mut doc = document(COMMUNE, &[DISTRICT], &format!("outbox {sender}/{n}"));
                doc.document_id = unique_id("outbox", sender, n);
                doc.body = vec![b'x'; 2 * 1024];
                client
                    .send(wire::SendRequest {
                        document: Some(doc),
                    })
                    .await
                    .expect("send");
            }
        });
    }
    while let Some(result) = senders.join_next().await {
        result.expect("sender");
    }
    let filled_per_s = waiting as f64 / started.elapsed().as_secs_f64();
    hub.child.kill().await.expect("SIGKILL");
    let endpoint = hub.endpoint.clone();
    let killed_at = Instant::now();
    let mut child = tokio::process::Command::new(&options.binary)
        .args(["serve", "--config"])
        .arg(&files.config_path)
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .expect("start the hub again");
    let serving_after = loop {
        if let Ok(mut client) = lienthong::client::connect(&endpoint, COMMUNE).await
            && client
                .send(wire::SendRequest {
                    document: Some(document(COMMUNE, &[DISTRICT], "after restart")),
                })
                .await
                .is_ok()
        {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(120),
            "the hub does not answer Send 120 s after its restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let outbox_after_restart = list_queues(&endpoint).await.outbox_depth;
    let _ = child.kill().await;
    Restart {
        serving_after,
        outbox_after_restart,
        filled_per_s,
    }
}

/// A document id no other document of the run has (random ids collide at 100,000 documents).
fn unique_id(case: &str, sender: usize, n: usize) -> String {
    format!("{COMMUNE},2026/11/28,{sender}.{n}/{case}")
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
