//! Tests of the real `lienthong` binary as a process: custody across SIGKILL, graceful SIGTERM,
//! configuration errors, the systemd unit that supervises it, its allocator, and the client
//! subcommands a person uses.

mod support;

use std::collections::HashSet;
use std::time::Duration;
use support::*;

/// Documents accepted while RabbitMQ is unreachable sit in the outbox; the hub is killed with
/// SIGKILL; restarted on the same data directory with RabbitMQ reachable, it delivers every one.
#[tokio::test]
async fn a_killed_hub_delivers_its_outbox_after_restart() {
    const DOCUMENTS: usize = 20;
    let unreachable = HubOptions {
        amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port())),
        ..HubOptions::new(TransportKind::Amqp)
    };
    let files = HubFiles::create("kill_restart", &unreachable);
    let hub = HubProcess::start(&files, &unreachable).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut sent = HashSet::new();
    for n in 0..DOCUMENTS {
        let mut doc = document(COMMUNE, &[DISTRICT], &format!("outbox {n}"));
        doc.priority = (n % 5) as u32;
        sent.insert(send(&mut commune, doc).await);
    }
    hub.kill().await;

    let reachable = HubOptions::new(TransportKind::Amqp);
    let hub = HubProcess::start(&files, &reachable).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let mut received = HashSet::new();
    for _ in 0..DOCUMENTS {
        let delivery = next_delivery(&mut stream).await;
        let id = delivered_document(&delivery).document_id.clone();
        assert!(received.insert(id.clone()), "{id} delivered twice");
        ack(&mut district, &delivery).await;
    }
    assert_eq!(received, sent, "every accepted document is delivered");
    assert_no_delivery(&mut stream, Duration::from_millis(500)).await;

    let mut commune = hub.client(COMMUNE).await;
    let any = sent.iter().next().expect("a document");
    let trace = track(&mut commune, any).await;
    use lienthong_proto::v1::ReceiptKind::*;
    assert_eq!(
        receipt_kinds(&trace, DISTRICT),
        vec![Accepted, Enqueued, Delivered, Acknowledged]
    );
    hub.kill().await;
    files.delete_topology().await;
}

/// SIGTERM ends open streams and stops the process promptly with status 0.
#[tokio::test]
async fn sigterm_stops_the_hub_gracefully() {
    let options = HubOptions::new(TransportKind::Embedded);
    let files = HubFiles::create("sigterm", &options);
    let mut hub = HubProcess::start(&files, &options).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let pid = hub.child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), hub.child.wait())
        .await
        .expect("the hub exits within 10 s of SIGTERM")
        .expect("wait for the hub");
    assert!(status.success(), "exit status {status}");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no delivery after shutdown: {end:?}"
    );
}

#[tokio::test]
async fn configuration_errors_exit_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cases = [
        (
            "[hub]\ncode = \"000.00.00.H53\"\n[server]\ngrpc_port = 1\n",
            "grpc_port",
        ),
        ("[server]\ngrpc_listen = \"127.0.0.1:0\"\n", "hub"),
        (
            "[hub]\ncode = \"000.00.00.H53\"\n[transport]\nkind = \"amqp\"\namqp_url = \"http://x\"\n",
            "amqp_url",
        ),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write config");
        let output = lienthong(&["serve", "--config", path.to_str().expect("utf-8 path")]).await;
        assert_eq!(output.status.code(), Some(64), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "`{stderr}` names {key}");
    }
    let missing = lienthong(&["serve", "--config", "/nonexistent/lienthong.toml"]).await;
    assert_eq!(missing.status.code(), Some(64));
}

/// `config/lienthong.service` starts the hub again after it stopped for its disk (status 74)
/// but not after a configuration error (64), with a pause that keeps it under systemd's start
/// limit, runs `serve` with arguments the CLI takes, waits longer than the shutdown grace before
/// SIGKILL, and `systemd-analyze verify` finds nothing to say about it.
#[tokio::test]
async fn the_systemd_unit_restarts_the_hub_after_a_disk_failure_not_after_a_configuration_error() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit_path = root.join("config/lienthong.service");
    let unit = std::fs::read_to_string(&unit_path).expect("read config/lienthong.service");
    let service = unit_section(&unit, "Service");
    let setting = |key: &str| -> &str {
        service
            .iter()
            .find_map(|(k, v)| (*k == key).then_some(*v))
            .unwrap_or_else(|| panic!("[Service] {key} is set"))
    };

    assert_eq!(setting("Restart"), "on-failure");
    let prevented: Vec<u8> = setting("RestartPreventExitStatus")
        .split_whitespace()
        .map(|status| status.parse().expect("an exit status"))
        .collect();
    assert!(
        prevented.contains(&lienthong::cli::EXIT_CONFIG),
        "{prevented:?}"
    );
    assert!(
        !prevented.contains(&lienthong::cli::EXIT_STORAGE),
        "{prevented:?}"
    );
    // systemd's defaults: at most 5 starts in 10 s, then it gives up on the unit.
    let restart_sec: u64 = setting("RestartSec")
        .parse()
        .expect("RestartSec in seconds");
    assert!(
        4 * restart_sec >= 10,
        "a hub that stops at once on a full disk must not reach the start limit: RestartSec={restart_sec}"
    );

    let exec_start: Vec<&str> = setting("ExecStart").split_whitespace().collect();
    assert!(exec_start[0].ends_with("/lienthong"), "{exec_start:?}");
    let cli = <lienthong::cli::Cli as clap::Parser>::try_parse_from(&exec_start)
        .unwrap_or_else(|e| panic!("ExecStart's arguments: {e}"));
    assert!(
        matches!(cli.command, lienthong::cli::Command::Serve { .. }),
        "{cli:?}"
    );

    let example = std::fs::read_to_string(root.join("config/lienthong-amqp.toml"))
        .expect("read config/lienthong-amqp.toml");
    let grace = lienthong::config::Config::parse_and_validate(&example)
        .expect("the example configuration")
        .delivery
        .shutdown_grace;
    let timeout_stop: u64 = setting("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        Duration::from_secs(timeout_stop) > grace,
        "TimeoutStopSec={timeout_stop} against a grace of {grace:?}"
    );

    // systemd's own reading, with ExecStart pointing at the binary under test (it checks that
    // the program exists). Unknown keys and bad values are reported on standard error.
    let dir = tempfile::tempdir().expect("temporary directory");
    let checked = dir.path().join("lienthong.service");
    std::fs::write(
        &checked,
        unit.replace(exec_start[0], env!("CARGO_BIN_EXE_lienthong")),
    )
    .expect("write the unit");
    let verify = tokio::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .await
        .expect("systemd-analyze runs (`make systemd` installs it; make test does)");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{complaints}",
        verify.status
    );
}

/// The binary allocates its small blocks with jemalloc (change 14 of docs/performance.md):
/// jemalloc reads its settings at its first allocation and names a bad one on standard error.
#[tokio::test]
async fn the_binary_allocates_small_blocks_with_jemalloc() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lienthong"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "no_such_setting:1")
        .output()
        .await
        .expect("run the lienthong binary");
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("<jemalloc>: Invalid conf pair: no_such_setting:1"),
        "jemalloc did not start: {stderr}"
    );
}

/// The `key=value` lines of one `[section]` of a systemd unit, comments left out.
fn unit_section<'a>(unit: &'a str, section: &str) -> Vec<(&'a str, &'a str)> {
    let header = format!("[{section}]");
    unit.lines()
        .map(str::trim)
        .skip_while(|line| *line != header)
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect()
}

/// The README's walk-through: send from a commune to its district, receive, report, track.
#[tokio::test]
async fn the_client_subcommands_send_receive_report_and_track() {
    let options = HubOptions::new(TransportKind::Embedded);
    let files = HubFiles::create("cli", &options);
    let hub = HubProcess::start(&files, &options).await;
    let endpoint = hub.endpoint.clone();
    let save_dir = tempfile::tempdir().expect("temporary directory");
    let attachment = save_dir.path().join("to-trinh.txt");
    std::fs::write(&attachment, "phụ lục").expect("write attachment");

    let sent = stdout_of(
        &lienthong(&[
            "send",
            "--endpoint",
            &endpoint,
            "--as",
            COMMUNE,
            "--to",
            DISTRICT,
            "--subject",
            "Tờ trình số 12",
            "--body",
            "Kính gửi UBND huyện",
            "--code-number",
            "12",
            "--code-notation",
            "TTr-UBND",
            "--attach",
            attachment.to_str().expect("utf-8 path"),
        ])
        .await,
    );
    let document_id = sent
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("accepted "))
        .expect("`accepted <id>`")
        .to_owned();
    assert!(
        document_id.starts_with(&format!("{COMMUNE},")) && document_id.ends_with(",12/TTr-UBND"),
        "{document_id}"
    );
    assert!(sent.contains(&format!("ACCEPTED {DISTRICT}")), "{sent}");

    let received = stdout_of(
        &lienthong(&[
            "receive",
            "--endpoint",
            &endpoint,
            "--as",
            DISTRICT,
            "--count",
            "1",
            "--save-dir",
            save_dir.path().join("inbox").to_str().expect("utf-8 path"),
        ])
        .await,
    );
    assert!(
        received.contains(&format!("document {document_id} from {COMMUNE}")),
        "{received}"
    );
    assert!(received.contains("acknowledged"), "{received}");
    // The spool keeps its staging folder `.incoming` beside the documents; the order in which
    // a directory lists its entries is the file system's.
    let saved = std::fs::read_dir(save_dir.path().join("inbox"))
        .expect("saved documents")
        .map(|entry| entry.expect("entry").path())
        .find(|path| {
            !path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with('.'))
        })
        .expect("one saved document");
    assert_eq!(
        std::fs::read_to_string(saved.join("body")).expect("body"),
        "Kính gửi UBND huyện"
    );
    assert_eq!(
        std::fs::read_to_string(saved.join("to-trinh.txt")).expect("attachment"),
        "phụ lục"
    );

    let reported = stdout_of(
        &lienthong(&[
            "status",
            "--endpoint",
            &endpoint,
            "--as",
            DISTRICT,
            "--document",
            &document_id,
            "--code",
            "03",
            "--description",
            "Đã vào sổ",
        ])
        .await,
    );
    assert!(reported.contains("STATUS_REPORTED"), "{reported}");

    let status = stdout_of(
        &lienthong(&[
            "receive",
            "--endpoint",
            &endpoint,
            "--as",
            COMMUNE,
            "--count",
            "1",
        ])
        .await,
    );
    assert!(
        status.contains(&format!("status 03 on {document_id} from {DISTRICT}")),
        "{status}"
    );

    let tracked = stdout_of(
        &lienthong(&[
            "track",
            "--endpoint",
            &endpoint,
            "--as",
            COMMUNE,
            "--document",
            &document_id,
        ])
        .await,
    );
    for expected in [
        "DELIVERY_STATE_ACKNOWLEDGED",
        "ACCEPTED",
        "ENQUEUED",
        "DELIVERED",
        "ACKNOWLEDGED",
        "status 03",
    ] {
        assert!(tracked.contains(expected), "`{tracked}` shows {expected}");
    }

    let queues =
        stdout_of(&lienthong(&["queues", "--endpoint", &endpoint, "--as", PROVINCE]).await);
    assert!(
        queues.contains("AGENCY") && queues.contains(DISTRICT),
        "{queues}"
    );
    let dead = stdout_of(
        &lienthong(&[
            "dead-letters",
            "list",
            "--endpoint",
            &endpoint,
            "--as",
            PROVINCE,
            "--agency",
            DISTRICT,
        ])
        .await,
    );
    assert!(dead.contains("0 dead letters"), "{dead}");

    let refused = lienthong(&[
        "send",
        "--endpoint",
        &endpoint,
        "--as",
        COMMUNE,
        "--to",
        STRANGER_CODE,
        "--subject",
        "x",
    ])
    .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("document.to[0]"),
        "{stderr}"
    );
    hub.kill().await;
}

/// A database that lost records (here: its files replaced by an empty one, or damaged in the
/// middle) is refused at start with a message naming the data directory; the hub never starts
/// empty in its place.
#[tokio::test]
async fn a_damaged_database_is_refused_at_start() {
    let options = HubOptions::new(TransportKind::Embedded);
    for damage in ["emptied", "overwritten"] {
        let files = HubFiles::create("damaged", &options);
        let hub = HubProcess::start(&files, &options).await;
        let mut commune = hub.client(COMMUNE).await;
        for n in 0..5 {
            send(
                &mut commune,
                document(COMMUNE, &[DISTRICT], &format!("{damage} {n}")),
            )
            .await;
        }
        hub.kill().await;

        let data = files.data_dir();
        let database = data.join("db");
        match damage {
            "emptied" => {
                std::fs::remove_file(&database).expect("remove db");
                std::fs::remove_file(data.join("conf")).expect("remove conf");
            }
            _ => {
                let mut bytes = std::fs::read(&database).expect("read db");
                let middle = bytes.len() / 2;
                let end = (middle + 4096).min(bytes.len());
                bytes[middle..end].fill(0xff);
                std::fs::write(&database, bytes).expect("write db");
            }
        }
        let output = lienthong(&[
            "serve",
            "--config",
            files.config_path.to_str().expect("utf-8 path"),
        ])
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{damage}: the hub must not start: {stderr}"
        );
        assert!(
            stderr.contains(&data.display().to_string()),
            "{damage}: names the data directory: {stderr}"
        );
        assert!(stderr.contains("refuses to start"), "{damage}: {stderr}");
    }
}
