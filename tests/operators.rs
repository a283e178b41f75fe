//! The operators' view, end to end: queue ages and rates, dead-letter replay in steps, directory
//! reload under open streams, the queue gauges and the alert rules and dashboard that use them,
//! JSON logs, and the status page loaded in headless Chromium.

mod support;

use lienthong_proto::v1 as wire;
use std::collections::BTreeSet;
use std::time::Duration;
use support::*;
use tonic::Code;

/// An agency added to the directory by the reload test.
const NEWCOMER: &str = "000.23.31.H53";

fn queue<'a>(listed: &'a wire::ListQueuesResponse, agency: &str) -> &'a wire::QueueStats {
    listed
        .queues
        .iter()
        .find(|q| q.agency == agency)
        .expect("the agency's queue is listed")
}

async fn queues_show_the_oldest_waiting_message_and_rates(kind: TransportKind) {
    let hub = TestHub::start("ages", HubOptions::new(kind)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut neighbour = hub.client(COMMUNE_2).await;
    for n in 0..3 {
        send(
            &mut commune,
            document(COMMUNE, &[COMMUNE_2], &format!("waiting {n}")),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = list_queues(&hub.endpoint).await;
    let waiting = queue(&listed, COMMUNE_2);
    assert!(
        waiting.oldest_message_age_ms >= 300,
        "the first document has waited at least 300 ms: {waiting:?}"
    );
    assert_eq!(queue(&listed, DISTRICT).oldest_message_age_ms, 0);

    let mut stream = open_stream(&mut neighbour).await;
    for _ in 0..3 {
        let delivery = next_delivery(&mut stream).await;
        ack(&mut neighbour, &delivery).await;
    }
    // Rates are measured against the samples of the last minute (taken every 200 ms here).
    eventually(
        "rates count the 3 messages in and out",
        Duration::from_secs(10),
        || async {
            let listed = list_queues(&hub.endpoint).await;
            let q = queue(&listed, COMMUNE_2);
            q.in_per_second > 0.0 && q.out_per_second > 0.0 && q.oldest_message_age_ms == 0
        },
    )
    .await;
    let table = lienthong::cli::queues_table(&list_queues(&hub.endpoint).await);
    assert!(
        table.contains("OLDEST") && table.contains("OUT/s"),
        "{table}"
    );
    hub.finish().await;
}

async fn dead_letters_replay_in_steps_with_progress(kind: TransportKind) {
    let options = HubOptions {
        delivery_limit: 1,
        ..HubOptions::new(kind)
    };
    let hub = TestHub::start("replay-steps", options).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let mut poisoned = BTreeSet::new();
    for n in 0..3 {
        poisoned.insert(
            send(
                &mut commune,
                document(COMMUNE, &[DISTRICT], &format!("poison {n}")),
            )
            .await,
        );
    }
    // Each is rejected twice: past delivery_limit 1, so it is dead-lettered.
    for _ in 0..6 {
        let delivery = next_delivery(&mut stream).await;
        district
            .ack(wire::AckRequest {
                ack_token: delivery.ack_token.clone(),
                reject: true,
                reason: "unreadable".into(),
                ..Default::default()
            })
            .await
            .expect("reject");
    }
    eventually(
        "3 dead letters are kept",
        Duration::from_secs(10),
        || async { dead_letters(&hub.endpoint, DISTRICT).await.len() == 3 },
    )
    .await;

    let output = lienthong(&[
        "dead-letters",
        "replay",
        "--step",
        "1",
        "--agency",
        DISTRICT,
        "--endpoint",
        &hub.endpoint,
        "--as",
        PROVINCE,
    ])
    .await;
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{progress}");
    let steps: Vec<&str> = progress
        .lines()
        .filter(|line| line.starts_with("replayed"))
        .collect();
    assert_eq!(
        steps,
        ["replayed 1 of 3", "replayed 2 of 3", "replayed 3 of 3"],
        "{progress}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("replayed 3"));

    let mut replayed = BTreeSet::new();
    for _ in 0..3 {
        let delivery = next_delivery(&mut stream).await;
        replayed.insert(delivered_document(&delivery).document_id.clone());
        ack(&mut district, &delivery).await;
    }
    assert_eq!(replayed, poisoned);
    assert!(dead_letters(&hub.endpoint, DISTRICT).await.is_empty());
    hub.finish().await;
}

async fn the_directory_reloads_without_dropping_streams(kind: TransportKind) {
    let hub = TestHub::start("reload", HubOptions::new(kind)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut district_stream = open_stream(&mut district).await;
    let refused = commune
        .send(wire::SendRequest {
            document: Some(document(COMMUNE, &[NEWCOMER], "too early")),
        })
        .await
        .expect_err("not in the directory yet");
    assert_eq!(refused.code(), Code::NotFound);

    let directory_file = hub.files.dir.path().join("agencies.toml");
    let admin = operator(&hub.endpoint).await;
    std::fs::write(
        &directory_file,
        "[[agency]]\ncode = \"oops\"\nname = \"x\"\n",
    )
    .expect("write a broken directory");
    let broken = admin
        .clone()
        .reload_directory(wire::ReloadDirectoryRequest {})
        .await
        .expect_err("a broken directory is refused");
    assert_eq!(broken.code(), Code::FailedPrecondition);
    assert!(
        broken.message().contains("unchanged"),
        "{}",
        broken.message()
    );

    std::fs::write(
        &directory_file,
        format!(
            "{}[[agency]]\ncode = \"{NEWCOMER}\"\nname = \"UBND xã mới\"\n",
            test_directory_toml()
        ),
    )
    .expect("write the new directory");
    let outsider = lienthong::client::connect_admin(&hub.endpoint, COMMUNE)
        .await
        .expect("connect");
    let denied = outsider
        .clone()
        .reload_directory(wire::ReloadDirectoryRequest {})
        .await
        .expect_err("only operators reload");
    assert_eq!(denied.code(), Code::PermissionDenied);

    let printed = stdout_of(
        &lienthong(&[
            "directory",
            "reload",
            "--endpoint",
            &hub.endpoint,
            "--as",
            PROVINCE,
        ])
        .await,
    );
    assert!(
        printed.contains(&format!("added {NEWCOMER}"))
            && printed.contains(&format!("{} agencies", test_agencies().len() + 1)),
        "{printed}"
    );

    // The stream opened before the reload still delivers; the newcomer sends and receives.
    let id = send(
        &mut commune,
        document(COMMUNE, &[DISTRICT, NEWCOMER], "welcome"),
    )
    .await;
    let delivery = next_delivery(&mut district_stream).await;
    assert_eq!(delivered_document(&delivery).document_id, id);
    ack(&mut district, &delivery).await;
    let mut newcomer = hub.client(NEWCOMER).await;
    let mut newcomer_stream = open_stream(&mut newcomer).await;
    let delivery = next_delivery(&mut newcomer_stream).await;
    assert_eq!(delivered_document(&delivery).document_id, id);
    ack(&mut newcomer, &delivery).await;
    send(&mut newcomer, document(NEWCOMER, &[DISTRICT], "thank you")).await;
    let delivery = next_delivery(&mut district_stream).await;
    ack(&mut district, &delivery).await;

    drop(newcomer_stream);
    if kind == TransportKind::Amqp {
        let newcomer_code = NEWCOMER.parse().expect("code");
        lienthong::transport::amqp::delete_topology(
            &amqp_url(),
            &lienthong::transport::TopologyNames::new(&hub.files.prefix),
            &[newcomer_code],
        )
        .await
        .expect("delete the newcomer's queue");
    }
    hub.finish().await;
}

/// Metric names (without the suffixes Prometheus adds) used in a dashboard or rules file.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("lienthong_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn queue_gauges_move_and_the_alerts_and_dashboard_use_real_metrics() {
    let options = HubOptions {
        delivery_limit: 1,
        ..HubOptions::new(TransportKind::Embedded)
    };
    let hub = TestHub::start("gauges", options).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut express = document(COMMUNE, &[COMMUNE_2], "hỏa tốc");
    express.priority = 3;
    send(&mut commune, express).await;
    let metrics = || http_get(&hub.options.http_listen, "/metrics");
    eventually(
        "the express document shows in the queue and age gauges",
        Duration::from_secs(10),
        || async {
            let (_, text) = metrics().await;
            text.contains(&format!(
                r#"lienthong_queue_messages{{agency="{COMMUNE_2}",state="ready"}} 1"#
            )) && text.lines().any(|l| {
                l.starts_with(r#"lienthong_oldest_waiting_age_seconds{urgency="3"}"#)
                    && !l.ends_with(" 0")
            })
        },
    )
    .await;
    let (_, exposition) = metrics().await;
    assert!(
        exposition.contains("lienthong_dead_letters 0"),
        "{exposition}"
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "config/prometheus-alerts.yml",
        "config/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect("read the file");
        let names = metric_names_in(&text);
        assert!(names.len() >= 5, "{file} uses {names:?}");
        for name in &names {
            let exported = exposition.contains(&format!("# TYPE {name} "))
                || exposition.contains(&format!("# TYPE {} ", name.trim_end_matches("_total")));
            assert!(
                exported,
                "{file} uses {name}, which the hub does not export"
            );
        }
    }
    serde_json_check(&root.join("config/grafana-dashboard.json"));
    hub.finish().await;
}

fn serde_json_check(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(
        panels
            .iter()
            .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty()))
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let options = HubOptions {
        log_format: "json",
        ..HubOptions::new(TransportKind::Embedded)
    };
    let files = HubFiles::create("json-logs", &options);
    let log_path = files.dir.path().join("hub.log");
    files.write_config(&HubOptions {
        grpc_listen: format!("127.0.0.1:{}", free_port()),
        ..options.clone()
    });
    let log = std::fs::File::create(&log_path).expect("create the log file");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lienthong"))
        .args(["serve", "--config"])
        .arg(&files.config_path)
        .env("RUST_LOG", "info")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the hub");
    // The port answers as soon as it is bound, before the first log line: wait for the line.
    eventually(
        "the hub logs that it serves",
        Duration::from_secs(20),
        || async { std::fs::read_to_string(&log_path).is_ok_and(|text| text.contains("serving")) },
    )
    .await;
    child.kill().await.expect("stop the hub");
    let text = std::fs::read_to_string(&log_path).expect("read the log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "serving" && l["level"] == "INFO"),
        "{text}"
    );
}

/// Headless Chromium, as the machine's Debian package installs it (`.ci/ensure-package chromium …`).
/// Run with tokio's `Command`: the hub under test serves from this test's runtime.
fn chromium() -> tokio::process::Command {
    let found = std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs Chromium: run `make browser` (make test does)"
    );
    let mut command = tokio::process::Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]);
    command
}

/// The series a chart drew, from the data- attributes the page sets after drawing.
#[derive(Debug, serde::Deserialize)]
struct DrawnSeries {
    name: String,
    last: Option<f64>,
    max: f64,
}

fn chart(dom: &str, id: &str) -> (usize, usize, Vec<DrawnSeries>) {
    let start = dom
        .find(&format!(r#"<canvas id="{id}""#))
        .unwrap_or_else(|| panic!("no canvas {id} in {dom}"));
    let tag = &dom[start..start + dom[start..].find('>').expect("tag end")];
    let attribute = |name: &str| {
        let from = tag
            .find(&format!(r#"{name}=""#))
            .unwrap_or_else(|| panic!("{id} was not drawn (no {name}): {tag}"))
            + name.len()
            + 2;
        tag[from..from + tag[from..].find('"').expect("quote")].replace("&quot;", "\"")
    };
    (
        attribute("data-points").parse().expect("points"),
        attribute("data-inked").parse().expect("inked"),
        serde_json::from_str(&attribute("data-series")).expect("series"),
    )
}

#[tokio::test]
async fn the_status_page_draws_real_numbers_in_a_browser() {
    let hub = TestHub::start("status-page", HubOptions::new(TransportKind::Embedded)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    for n in 0..4 {
        send(
            &mut commune,
            document(COMMUNE, &[DISTRICT, COMMUNE_2], &format!("n {n}")),
        )
        .await;
    }
    let mut stream = open_stream(&mut district).await;
    for _ in 0..4 {
        let delivery = next_delivery(&mut stream).await;
        ack(&mut district, &delivery).await;
    }
    drop(stream);
    // Let the sampler record the flow and a few steady samples after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let profile = tempfile::tempdir().expect("browser profile");
    let url = format!("http://{}/", hub.options.http_listen);
    let output = chromium()
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args([
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
            "--dump-dom",
        ])
        .arg(&url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("data-rendered="),
        "the page never rendered: {dom}"
    );

    let (points, inked, depth) = chart(&dom, "depth-chart");
    assert!(points >= 3, "{points} samples drawn");
    assert!(inked > 100, "the depth chart has {inked} inked pixels");
    let ready = depth
        .iter()
        .find(|s| s.name == "ready")
        .expect("ready series");
    assert_eq!(
        ready.last,
        Some(4.0),
        "4 documents wait for the neighbour: {depth:?}"
    );

    let (_, inked, throughput) = chart(&dom, "throughput-chart");
    assert!(inked > 100, "the throughput chart has {inked} inked pixels");
    for name in ["in", "out (acknowledged)"] {
        let series = throughput.iter().find(|s| s.name == name).expect("series");
        assert!(series.max > 0.0, "{name} never moved: {throughput:?}");
    }
    assert!(
        dom.contains("ACKNOWLEDGED") && dom.contains(DISTRICT),
        "receipts table: {dom}"
    );
    hub.finish().await;
}

on_both_transports!(queues_show_the_oldest_waiting_message_and_rates);
on_both_transports!(dead_letters_replay_in_steps_with_progress);
on_both_transports!(the_directory_reloads_without_dropping_streams);
