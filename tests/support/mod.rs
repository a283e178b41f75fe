//! Shared helpers of the integration tests: unique RabbitMQ namespaces, hubs started in-process
//! or as real processes on loopback, clients speaking as an agency, and waiting with deadlines.
//!
//! Every test gets its own `[transport] prefix` (and so its own exchanges and queues), so tests
//! run in parallel on one RabbitMQ without seeing each other; each deletes its topology at the end.

#![allow(dead_code, unreachable_pub)]

/// Defines a test module `$name` with two tests, `amqp` and `embedded`, each calling the
/// scenario `$name(TransportKind)` of the test file on that transport.
#[macro_export]
macro_rules! on_both_transports {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn amqp() {
                super::$name(super::TransportKind::Amqp).await;
            }

            #[tokio::test]
            async fn embedded() {
                super::$name(super::TransportKind::Embedded).await;
            }
        }
    };
}

use lienthong::agency::AgencyCode;
use lienthong::client::{ExchangeClient, connect};
use lienthong::config::Config;
use lienthong::directory::AgencyDirectory;
use lienthong::transport::TopologyNames;
use lienthong_proto::v1 as wire;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod federation;
pub mod power_cut;

pub const PROVINCE: &str = "000.00.00.H53";
pub const DISTRICT: &str = "000.00.31.H53";
pub const COMMUNE: &str = "000.21.31.H53";
pub const COMMUNE_2: &str = "000.22.31.H53";
pub const MINISTRY: &str = "000.00.00.G22";
/// The identity listed in `[access] auditors` of test hubs (a state inspectorate's code; not an
/// agency of the directory, not an operator).
pub const AUDITOR: &str = "000.00.00.G10";
/// A well-formed code that is not in the test directory.
pub const STRANGER_CODE: &str = "000.99.31.H53";

/// The RabbitMQ the tests use (`LIENTHONG_TEST_AMQP_URL`, default the local guest account).
pub fn amqp_url() -> String {
    std::env::var("LIENTHONG_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The agencies of the test directory.
pub fn test_agencies() -> Vec<AgencyCode> {
    [PROVINCE, DISTRICT, COMMUNE, COMMUNE_2, MINISTRY]
        .iter()
        .map(|code| code.parse().expect("valid test code"))
        .collect()
}

pub fn test_directory_toml() -> String {
    test_agencies()
        .iter()
        .map(|code| format!("[[agency]]\ncode = \"{code}\"\nname = \"Test agency {code}\"\n"))
        .collect()
}

pub fn test_directory() -> AgencyDirectory {
    AgencyDirectory::parse(&test_directory_toml()).expect("valid test directory")
}

/// A namespace no other test uses: `lt-test-<name>-<random>`.
pub fn unique_prefix(name: &str) -> String {
    format!("lt-test-{name}-{:08x}", rand::random::<u32>())
}

/// Which transport a test hub runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Amqp,
    Embedded,
}

/// Settings of a test hub; the defaults suit most tests.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub kind: TransportKind,
    /// Overrides the AMQP URL (to point at a port where nothing listens).
    pub amqp_url: Option<String>,
    pub max_document_bytes: usize,
    pub max_outbox_messages: u64,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub queue_delivery_limit: u32,
    pub retry_backoff_base_ms: u64,
    /// `127.0.0.1:0` picks a free port; a process keeps a fixed one across restarts.
    pub grpc_listen: String,
    /// The operators' HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
    pub http_listen: String,
    /// `[telemetry] log_format`: "text" or "json".
    pub log_format: &'static str,
    /// `[telemetry] sample_interval_ms`: short, so that rates and charts fill quickly.
    pub sample_interval_ms: u64,
    /// `[ledger] checkpoint_every`.
    pub checkpoint_every: u64,
    /// `[tls]`: mutual TLS when set.
    pub tls: Option<lienthong::tls::TlsFiles>,
    pub max_streams_per_agency: u32,
    pub max_sends_per_second: u32,
    /// `[transport] amqp_ca_file`, for an `amqps://` URL.
    pub amqp_ca_file: Option<PathBuf>,
    /// `[hub] code` and `role`; the directory's agencies (the test directory when `None`).
    pub hub_code: String,
    pub role: &'static str,
    pub agencies: Option<Vec<String>>,
    /// Sections appended to the file as they are (`[uplink]`, `[[peer]]`).
    pub extra_toml: String,
    /// `[storage] data_dir`, relative to the hub's temporary directory: `data` unless set.
    pub data_dir: &'static str,
    /// `[storage] cache_mib`.
    pub cache_mib: u64,
    /// `[storage] min_free_mib`: 0 (off) unless a test sets it, so that the suite does not
    /// depend on the free space of the machine it runs on.
    pub min_free_mib: u64,
    /// The `lienthong` executable to start: this build's unless set (the benchmark runs another
    /// build's to compare two, `LIENTHONG_BENCH_HUB`).
    pub binary: PathBuf,
}

impl HubOptions {
    pub fn new(kind: TransportKind) -> Self {
        HubOptions {
            kind,
            amqp_url: None,
            max_document_bytes: 64 * 1024,
            max_outbox_messages: 10_000,
            prefetch: 16,
            delivery_limit: 5,
            queue_delivery_limit: 1000,
            retry_backoff_base_ms: 20,
            grpc_listen: "127.0.0.1:0".into(),
            http_listen: format!("127.0.0.1:{}", free_port()),
            log_format: "text",
            sample_interval_ms: 200,
            checkpoint_every: 1000,
            tls: None,
            max_streams_per_agency: 8,
            max_sends_per_second: 10_000,
            amqp_ca_file: None,
            hub_code: PROVINCE.into(),
            role: "province",
            agencies: None,
            extra_toml: String::new(),
            data_dir: "data",
            cache_mib: lienthong::store::DEFAULT_CACHE_BYTES / (1024 * 1024),
            min_free_mib: 0,
            binary: env!("CARGO_BIN_EXE_lienthong").into(),
        }
    }
}

/// The files a hub needs: a data directory, a directory file and a configuration file.
#[derive(Debug)]
pub struct HubFiles {
    pub dir: TempDir,
    pub prefix: String,
    pub config_path: PathBuf,
    data_dir: PathBuf,
}

impl HubFiles {
    pub fn create(name: &str, options: &HubOptions) -> HubFiles {
        let dir = tempfile::tempdir().expect("temporary directory");
        let prefix = unique_prefix(name);
        let files = HubFiles {
            config_path: dir.path().join("lienthong.toml"),
            data_dir: dir.path().join(options.data_dir),
            dir,
            prefix,
        };
        files.write_config(options);
        files
    }

    /// Rewrites the configuration (same data directory, agency directory and prefix) with other
    /// options.
    pub fn write_config(&self, options: &HubOptions) {
        let directory_path = self.dir.path().join("agencies.toml");
        let directory = match &options.agencies {
            None => test_directory_toml(),
            Some(codes) => codes
                .iter()
                .map(|code| format!("[[agency]]\ncode = \"{code}\"\nname = \"Agency {code}\"\n"))
                .collect(),
        };
        std::fs::write(&directory_path, directory).expect("write directory");
        let kind = match options.kind {
            TransportKind::Amqp => "amqp",
            TransportKind::Embedded => "embedded",
        };
        let amqp_url = options.amqp_url.clone().unwrap_or_else(amqp_url);
        let config = format!(
            r#"
[hub]
code = "{hub_code}"
role = "{role}"
[server]
grpc_listen = "{grpc_listen}"
http_listen = "{http_listen}"
[storage]
data_dir = "{data_dir}"
cache_mib = {cache_mib}
min_free_mib = {min_free_mib}
[transport]
kind = "{kind}"
amqp_url = "{amqp_url}"
amqp_ca_file = "{amqp_ca_file}"
prefix = "{prefix}"
[directory]
file = "{directory}"
[limits]
max_document_bytes = {max_document_bytes}
max_outbox_messages = {max_outbox_messages}
max_streams_per_agency = {max_streams_per_agency}
max_sends_per_second = {max_sends_per_second}
[delivery]
prefetch = {prefetch}
delivery_limit = {delivery_limit}
queue_delivery_limit = {queue_delivery_limit}
shutdown_grace_ms = 3000
retry_backoff_base_ms = {retry_backoff_base_ms}
retry_backoff_max_ms = 500
[access]
operators = ["{PROVINCE}"]
auditors = ["{AUDITOR}"]
[ledger]
checkpoint_every = {checkpoint_every}
checkpoint_interval_ms = 200
[telemetry]
log_format = "{log_format}"
sample_interval_ms = {sample_interval_ms}
"#,
            hub_code = options.hub_code,
            cache_mib = options.cache_mib,
            min_free_mib = options.min_free_mib,
            role = options.role,
            log_format = options.log_format,
            sample_interval_ms = options.sample_interval_ms,
            checkpoint_every = options.checkpoint_every,
            grpc_listen = options.grpc_listen,
            http_listen = options.http_listen,
            data_dir = self.data_dir.display(),
            prefix = self.prefix,
            directory = directory_path.display(),
            max_document_bytes = options.max_document_bytes,
            max_outbox_messages = options.max_outbox_messages,
            max_streams_per_agency = options.max_streams_per_agency,
            amqp_ca_file = options
                .amqp_ca_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            max_sends_per_second = options.max_sends_per_second,
            prefetch = options.prefetch,
            delivery_limit = options.delivery_limit,
            retry_backoff_base_ms = options.retry_backoff_base_ms,
            queue_delivery_limit = options.queue_delivery_limit,
        );
        let tls = match &options.tls {
            Some(files) => format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
                files.cert_file.display(),
                files.key_file.display(),
                files.client_ca_file.display()
            ),
            None => String::new(),
        };
        std::fs::write(&self.config_path, config + &tls + &options.extra_toml)
            .expect("write config");
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("valid test config")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// Deletes this hub's RabbitMQ exchanges and queues.
    pub async fn delete_topology(&self) {
        lienthong::transport::amqp::delete_topology(
            &amqp_url(),
            &TopologyNames::new(&self.prefix),
            &test_agencies(),
        )
        .await
        .expect("delete the test topology");
    }
}

/// A hub running inside the test process.
#[derive(Debug)]
pub struct TestHub {
    pub endpoint: String,
    pub files: HubFiles,
    pub options: HubOptions,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestHub {
    pub async fn start(name: &str, options: HubOptions) -> TestHub {
        let files = HubFiles::create(name, &options);
        TestHub::start_with(files, options).await
    }

    /// Starts a hub on existing files (a restart keeps the data directory and prefix).
    pub async fn start_with(files: HubFiles, mut options: HubOptions) -> TestHub {
        let bind = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a loopback port")
        };
        let listeners = lienthong::server::Listeners {
            grpc: bind().await,
            http: bind().await,
        };
        let endpoint = format!("http://{}", listeners.grpc.local_addr().expect("address"));
        options.http_listen = listeners.http.local_addr().expect("address").to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(lienthong::server::run(
            files.config(),
            listeners,
            async move {
                let _ = stopped.await;
            },
        ));
        TestHub {
            endpoint,
            files,
            options,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self, agency: &str) -> ExchangeClient {
        connect(&self.endpoint, agency)
            .await
            .expect("connect to the test hub")
    }

    /// Stops the hub gracefully and returns its files (for a restart).
    pub async fn stop(mut self) -> HubFiles {
        self.shutdown().await;
        let TestHub { files, .. } = self;
        files
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the hub stops within 15 s")
                .expect("the hub task does not panic");
            result.expect("the hub stops cleanly");
        }
    }

    /// Stops the hub and deletes its RabbitMQ topology.
    pub async fn finish(mut self) {
        self.shutdown().await;
        if self.options.kind == TransportKind::Amqp {
            self.files.delete_topology().await;
        }
    }
}

/// A hub running as a real `lienthong serve` process.
#[derive(Debug)]
pub struct HubProcess {
    pub child: tokio::process::Child,
    pub endpoint: String,
}

impl HubProcess {
    /// Starts the binary on `files` and waits until it serves. With `grpc_listen` on port 0 it
    /// takes a free loopback port.
    pub async fn start(files: &HubFiles, options: &HubOptions) -> HubProcess {
        let grpc_listen = if options.grpc_listen.ends_with(":0") {
            format!("127.0.0.1:{}", free_port())
        } else {
            options.grpc_listen.clone()
        };
        let port = grpc_listen.rsplit(':').next().expect("a port").to_owned();
        let options = HubOptions {
            grpc_listen,
            ..options.clone()
        };
        files.write_config(&options);
        let child = tokio::process::Command::new(&options.binary)
            .args(["serve", "--config"])
            .arg(&files.config_path)
            .env(
                "RUST_LOG",
                std::env::var("LIENTHONG_TEST_HUB_LOG").unwrap_or_else(|_| "error".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("start the lienthong binary");
        let endpoint = format!("http://127.0.0.1:{port}");
        let process = HubProcess { child, endpoint };
        process.wait_serving().await;
        process
    }

    async fn wait_serving(&self) {
        eventually(
            "the hub process serves gRPC",
            Duration::from_secs(20),
            || async { connect(&self.endpoint, PROVINCE).await.is_ok() },
        )
        .await;
    }

    pub async fn client(&self, agency: &str) -> ExchangeClient {
        connect(&self.endpoint, agency)
            .await
            .expect("connect to the hub process")
    }

    /// SIGKILL, then a new process on the same files and port.
    pub async fn restart(&mut self, files: &HubFiles, options: &HubOptions) {
        self.child.kill().await.expect("kill the hub");
        *self = HubProcess::start(files, options).await;
    }

    /// SIGKILL: no chance to flush or close anything.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the hub");
    }

    /// The process's peak resident memory (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .expect("VmHWM in /proc status")
            * 1024
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below Linux's ephemeral range (32768 and up), so that no outgoing connection and no
    // `bind(0)` takes a port between this call and the hub's bind, and above RabbitMQ's
    // inter-node port (25672), which a restarted RabbitMQ must find free; a counter of this
    // test process, so that two tests never get the same port. Each process starts at its own
    // offset, and a port found in use is skipped.
    const FIRST: u16 = 26_000;
    const LAST: u16 = 32_767;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id() % 100 * 60;
    let span = u32::from(LAST - FIRST) + 1;
    for _ in 0..span {
        let step = (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = FIRST + u16::try_from(step).expect("below the span");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {LAST}")
}

/// Waits until every receipt written so far is in the ledger of the hub at `endpoint` and
/// covered by a checkpoint, and nothing more arrives for a moment; returns the ledger's info.
pub async fn settled_ledger(endpoint: &str) -> wire::GetLedgerInfoResponse {
    let audit = audit_client(endpoint, AUDITOR).await;
    let info = || {
        let mut audit = audit.clone();
        async move {
            audit
                .get_ledger_info(wire::GetLedgerInfoRequest {})
                .await
                .expect("ledger info")
                .into_inner()
        }
    };
    let covered = |info: &wire::GetLedgerInfoResponse| {
        info.checkpoint
            .as_ref()
            .is_some_and(|c| c.tree_size == info.size)
    };
    eventually(
        "the ledger is checkpointed and quiet",
        Duration::from_secs(30),
        || async {
            let first = info().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let second = info().await;
            covered(&first) && covered(&second) && first.size == second.size
        },
    )
    .await;
    info().await
}

/// Polls `condition` until it holds, failing the test after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !condition().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A document from `from` to `to` with a unique id.
pub fn document(from: &str, to: &[&str], subject: &str) -> wire::Document {
    wire::Document {
        document_id: format!("{from},2026/11/27,{:08x}/TEST", rand::random::<u32>()),
        from: from.into(),
        to: to.iter().map(|s| (*s).to_owned()).collect(),
        subject: subject.into(),
        code_number: "1".into(),
        code_notation: "TEST".into(),
        body: format!("body of {subject}").into_bytes(),
        ..Default::default()
    }
}

/// Sends a document and returns its id.
pub async fn send(client: &mut ExchangeClient, document: wire::Document) -> String {
    client
        .send(wire::SendRequest {
            document: Some(document),
        })
        .await
        .expect("send accepted")
        .into_inner()
        .document_id
}

/// Opens a `Receive` stream.
pub async fn open_stream(client: &mut ExchangeClient) -> tonic::Streaming<wire::Delivery> {
    client
        .receive(wire::ReceiveRequest {})
        .await
        .expect("receive stream opens")
        .into_inner()
}

/// The next delivery, failing the test if none comes within 10 s.
pub async fn next_delivery(stream: &mut tonic::Streaming<wire::Delivery>) -> wire::Delivery {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a delivery within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// Asserts that no delivery arrives within `quiet`.
pub async fn assert_no_delivery(stream: &mut tonic::Streaming<wire::Delivery>, quiet: Duration) {
    if let Ok(result) = tokio::time::timeout(quiet, stream.message()).await {
        let delivery = result.expect("the stream is healthy");
        panic!("expected no delivery, got {delivery:?}");
    }
}

pub fn delivered_document(delivery: &wire::Delivery) -> &wire::Document {
    match &delivery.payload {
        Some(wire::delivery::Payload::Document(document)) => document,
        other => panic!("expected a document, got {other:?}"),
    }
}

pub async fn ack(client: &mut ExchangeClient, delivery: &wire::Delivery) {
    client
        .ack(wire::AckRequest {
            ack_token: delivery.ack_token.clone(),
            reject: false,
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect("ack accepted");
}

pub async fn track(client: &mut ExchangeClient, document_id: &str) -> wire::TrackResponse {
    client
        .track(wire::TrackRequest {
            document_id: document_id.into(),
        })
        .await
        .expect("track answers")
        .into_inner()
}

/// One recipient's part of a `Track` answer.
pub fn recipient_trace<'a>(
    trace: &'a wire::TrackResponse,
    agency: &str,
) -> &'a wire::RecipientTrace {
    trace
        .recipients
        .iter()
        .find(|r| r.agency == agency)
        .unwrap_or_else(|| panic!("{agency} is a recipient"))
}

/// The kinds of a recipient's receipts, in order.
pub fn receipt_kinds(trace: &wire::TrackResponse, agency: &str) -> Vec<wire::ReceiptKind> {
    recipient_trace(trace, agency)
        .receipts
        .iter()
        .map(|r| r.kind())
        .collect()
}

pub fn data_dir_exists(path: &Path) -> bool {
    path.join("db").exists() || path.join("conf").exists()
}

/// Runs the `lienthong` binary to completion, logging warnings only.
pub async fn lienthong(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lienthong"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run the lienthong binary")
}

/// Sends `documents` documents from the commune to the district of the hub at `endpoint`, and
/// has the district receive and acknowledge them, so that the ledger holds receipts of every
/// common kind; returns their ids.
pub async fn exchange_some_documents(endpoint: &str, documents: usize) -> Vec<String> {
    let mut commune = connect(endpoint, COMMUNE)
        .await
        .expect("connect as the commune");
    let mut district = connect(endpoint, DISTRICT)
        .await
        .expect("connect as the district");
    let mut ids = Vec::new();
    for n in 0..documents {
        ids.push(
            send(
                &mut commune,
                document(COMMUNE, &[DISTRICT], &format!("công văn {n}")),
            )
            .await,
        );
    }
    let mut stream = open_stream(&mut district).await;
    for _ in 0..documents {
        let delivery = next_delivery(&mut stream).await;
        ack(&mut district, &delivery).await;
    }
    ids
}

/// What `lienthong audit verify` says of the exported ledger `file` (it must verify) against
/// the hub's public key in hex.
pub async fn verify_exported_ledger(file: &Path, public_key_hex: &str) -> String {
    let path = file.to_str().expect("a UTF-8 path");
    stdout_of(&lienthong(&["audit", "verify", path, "--public-key", public_key_hex]).await)
}

/// `lienthong audit archive` of the ledger up to the checkpoint at or below `up_to`, asked
/// as `identity`.
pub async fn archive_ledger(endpoint: &str, identity: &str, up_to: u64) -> std::process::Output {
    let up_to = up_to.to_string();
    let args = [
        "audit",
        "archive",
        "--endpoint",
        endpoint,
        "--as",
        identity,
        "--up-to",
        &up_to,
    ];
    lienthong(&args).await
}

/// A client of the `Audit` service of the hub at `endpoint`, as `identity`.
pub async fn audit_client(endpoint: &str, identity: &str) -> lienthong::client::AuditClient {
    lienthong::client::connect_audit(endpoint, identity)
        .await
        .expect("connect to Audit")
}

/// The hub's own check of its ledger (`Audit.VerifyLedger`), asked as the auditor.
pub async fn verify_ledger(endpoint: &str) -> wire::VerifyLedgerResponse {
    audit_client(endpoint, AUDITOR)
        .await
        .verify_ledger(wire::VerifyLedgerRequest::default())
        .await
        .expect("verify the ledger")
        .into_inner()
}

/// A request refused because the hub's disk is below its floor of `floor_mib`: UNAVAILABLE,
/// naming the floor and the setting that sets it.
pub fn assert_refused_below_the_floor(refused: &tonic::Status, floor_mib: u64) {
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let named = format!("below its floor of {floor_mib} MiB ([storage] min_free_mib)");
    assert!(
        refused.message().contains(&named),
        "`{}` names {named}",
        refused.message()
    );
}

/// The standard output of a run that must have succeeded.
pub fn stdout_of(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "lienthong failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `rabbitmqctl` with arguments, failing the test if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    rabbitmqctl_output(args);
}

/// What `rabbitmqctl -q` printed, failing the test if it failed.
pub fn rabbitmqctl_output(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts RabbitMQ's application again after `stop_app`, and waits until it is up and the
/// queues whose names start with `prefix` (there must be some) are all `running`. RabbitMQ
/// 3.10 has been seen to leave quorum queues `down` after `start_app` (every consumer then
/// fails with `INTERNAL_ERROR`, `noproc`, which no hub can mend until RabbitMQ is restarted in
/// full); this fails at once, saying so, where a scenario would wait for minutes and fail on
/// its own timeout.
pub async fn start_rabbitmq_app(prefix: &str) {
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let what = format!(
        "the queues of {prefix} are running again after start_app (if they stay down, restart RabbitMQ in full: rabbitmqctl stop, rabbitmq-server -detached, make clean-test-queues)"
    );
    eventually(&what, Duration::from_secs(60), || async {
        let listed = rabbitmqctl_output(&["list_queues", "name", "state", "--no-table-headers"]);
        let states: Vec<Option<&str>> = listed
            .lines()
            .filter(|line| line.starts_with(prefix))
            .map(|line| line.split_whitespace().nth(1))
            .collect();
        !states.is_empty() && states.iter().all(|state| *state == Some("running"))
    })
    .await;
}

/// Messages in one of a test hub's RabbitMQ queues.
pub async fn amqp_queue_depth(queue: &str) -> u32 {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = connection.close(200, "done".into()).await;
    declared.message_count()
}

/// GETs `path` from an HTTP endpoint (`host:port`); returns the status code and the body.
pub async fn http_get(address: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the HTTP endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    (status, body)
}

/// A document as sent, without the trace hops hubs add on the way.
pub fn without_trace(document: &wire::Document) -> wire::Document {
    wire::Document {
        trace: Vec::new(),
        ..document.clone()
    }
}

/// An `Admin` client as the test hubs' operator (the province).
pub async fn operator(endpoint: &str) -> lienthong::client::AdminClient {
    lienthong::client::connect_admin(endpoint, PROVINCE)
        .await
        .expect("connect to Admin")
}

/// Every agency's queue, as an operator lists them.
pub async fn list_queues(endpoint: &str) -> wire::ListQueuesResponse {
    operator(endpoint)
        .await
        .list_queues(wire::ListQueuesRequest {})
        .await
        .expect("list queues")
        .into_inner()
}

/// The dead letters a hub keeps.
pub async fn dead_letters(endpoint: &str, agency: &str) -> Vec<wire::DeadLetter> {
    operator(endpoint)
        .await
        .list_dead_letters(wire::ListDeadLettersRequest {
            agency: agency.into(),
            limit: 0,
        })
        .await
        .expect("list dead letters")
        .into_inner()
        .dead_letters
}
