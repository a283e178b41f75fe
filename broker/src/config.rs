//! The hub's configuration: the TOML file's shape, its defaults, and its validation.
//!
//! Keys are part of the contract (operators' files must keep working). Every error is one line
//! naming the key, and the binary exits with code 64 on it.

use crate::agency::AgencyCode;
pub use crate::telemetry::LogFormat;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The validated configuration the hub runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// This hub's own agency code; written into every receipt.
    pub hub_code: AgencyCode,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The database's page cache, in bytes (`[storage] cache_mib`).
    pub cache_bytes: u64,
    /// Below this much free space on the database's disk, new messages are refused
    /// (`[storage] min_free_mib`, in bytes here); 0 turns the floor off.
    pub min_free_disk_bytes: u64,
    pub transport: TransportConfig,
    pub directory_file: PathBuf,
    pub limits: Limits,
    pub delivery: DeliveryConfig,
    /// Identities (agency codes) allowed to use the `Admin` service.
    pub operators: Vec<AgencyCode>,
    /// Identities allowed to read the whole receipt ledger (`Audit` service).
    pub auditors: Vec<AgencyCode>,
    pub telemetry: TelemetryConfig,
    /// When the receipt ledger signs checkpoints.
    pub checkpoints: crate::store::CheckpointPolicy,
    /// Where `ArchiveLedger` writes archived ledger ranges.
    pub archive_dir: PathBuf,
    /// Mutual TLS for gRPC; `None` runs without authentication (callers named by metadata).
    pub tls: Option<crate::tls::TlsFiles>,
    /// This hub's place among hubs: its role, its uplink, the hubs it serves.
    pub federation: Federation,
}

/// What a hub is in a national deployment (`[hub] role`, `[uplink]`, `[[peer]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    pub role: HubRole,
    /// A province hub's link to the central hub; `None` for a hub on its own.
    pub uplink: Option<Uplink>,
    /// The province hubs a central hub serves.
    pub peers: Vec<Peer>,
}

/// `[hub] role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubRole {
    /// Serves the agencies of one province (its code's last part); sends the rest up.
    Province,
    /// Serves the ministries of its directory and carries documents between provinces.
    Central,
}

/// `[uplink]`: where a province hub sends what leaves the province.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// The central hub's code; this hub's queue of that name holds what waits to go up.
    pub hub: AgencyCode,
    /// The central hub's gRPC address, `http://host:port` (or `https://` with `tls`).
    pub endpoint: String,
    /// Mutual TLS towards the central hub: its CA, and this hub's certificate (with the
    /// `hub` role) and key.
    pub tls: Option<crate::tls::ClientTls>,
}

/// `[[peer]]`: a province hub that a central hub serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The province code (`H53`): documents for its agencies go to this hub.
    pub province: String,
    /// The identity the province hub presents (its `[hub] code`); also its queue here.
    pub identity: AgencyCode,
}

/// Logs, traces and the sampling behind the status page and queue rates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for traces (`http://host:4317`); no traces when unset.
    pub otlp_endpoint: Option<String>,
    /// How often queue depths and flows are sampled (status page, rates, age gauges).
    pub sample_interval: Duration,
}

/// Which transport carries documents between the outbox and recipients' streams.
#[derive(Clone, PartialEq, Eq)]
pub enum TransportConfig {
    /// Queues kept in the hub's own sled database: one process, no RabbitMQ.
    Embedded { prefix: String },
    /// RabbitMQ over AMQP 0-9-1: the production transport. `ca_file`: for `amqps://`, the CA
    /// that signed RabbitMQ's certificate (PEM), instead of the system's roots.
    Amqp {
        url: String,
        prefix: String,
        ca_file: Option<PathBuf>,
    },
}

impl TransportConfig {
    /// The namespace of every exchange and queue this hub declares.
    pub fn prefix(&self) -> &str {
        match self {
            TransportConfig::Embedded { prefix } | TransportConfig::Amqp { prefix, .. } => prefix,
        }
    }
}

impl std::fmt::Debug for TransportConfig {
    // The AMQP URL may carry a password, so it never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportConfig::Embedded { prefix } => {
                f.debug_struct("Embedded").field("prefix", prefix).finish()
            }
            TransportConfig::Amqp {
                url,
                prefix,
                ca_file,
            } => f
                .debug_struct("Amqp")
                .field("url", &redact_url_password(url))
                .field("prefix", prefix)
                .field("ca_file", ca_file)
                .finish(),
        }
    }
}

/// Bounds on what a caller may ask of the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest document accepted, body and attachments together.
    pub max_document_bytes: usize,
    /// Most recipients one document may have.
    pub max_recipients: usize,
    /// Most messages waiting in the outbox before `Send` answers `UNAVAILABLE`.
    pub max_outbox_messages: u64,
    /// Most attachments one document may have.
    pub max_attachments: usize,
    /// Largest single attachment, in bytes.
    pub max_attachment_bytes: usize,
    /// Longest short text field (subject, code, names, places), in bytes.
    pub max_field_bytes: usize,
    /// Most `Receive` streams one agency may hold open at once.
    pub max_streams_per_agency: u32,
    /// `Send` calls per second allowed to one agency (a token bucket holding two seconds' worth).
    pub max_sends_per_second: u32,
}

/// How documents are handed to recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Deliveries a `Receive` stream may hold unacknowledged.
    pub prefetch: u16,
    /// Returns (rejections, failed deliveries) of one message before it goes to the dead letters:
    /// a message is delivered at most `delivery_limit + 1` times.
    pub delivery_limit: u32,
    /// Returns of one message, for any reason, before the queue itself dead-letters it. A
    /// backstop above `delivery_limit`: RabbitMQ counts a message left unacknowledged by a
    /// closed stream as a return, and such returns are not the recipient's refusals.
    pub queue_delivery_limit: u32,
    /// How long a graceful shutdown waits for work in progress.
    pub shutdown_grace: Duration,
    /// The wait before a rejected message returns to its queue, doubled with each return…
    pub retry_backoff_base: Duration,
    /// …up to this.
    pub retry_backoff_max: Duration,
}

/// A configuration that cannot be used, in one line.
#[derive(Debug, thiserror::Error)]
#[error("configuration {path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    hub: HubToml,
    #[serde(default)]
    server: ServerToml,
    #[serde(default)]
    storage: StorageToml,
    #[serde(default)]
    transport: TransportToml,
    #[serde(default)]
    directory: DirectoryToml,
    #[serde(default)]
    limits: LimitsToml,
    #[serde(default)]
    delivery: DeliveryToml,
    #[serde(default)]
    access: AccessToml,
    #[serde(default)]
    telemetry: TelemetryToml,
    #[serde(default)]
    ledger: LedgerToml,
    #[serde(default)]
    tls: TlsToml,
    uplink: Option<UplinkToml>,
    #[serde(default)]
    peer: Vec<PeerToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UplinkToml {
    hub: String,
    endpoint: String,
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerToml {
    province: String,
    identity: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct TlsToml {
    cert_file: String,
    key_file: String,
    client_ca_file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LedgerToml {
    checkpoint_every: u64,
    checkpoint_interval_ms: u64,
    archive_dir: String,
}

impl Default for LedgerToml {
    fn default() -> Self {
        LedgerToml {
            checkpoint_every: 1000,
            checkpoint_interval_ms: 5000,
            archive_dir: String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TelemetryToml {
    log_format: String,
    otlp_endpoint: String,
    sample_interval_ms: u64,
}

impl Default for TelemetryToml {
    fn default() -> Self {
        TelemetryToml {
            log_format: "text".into(),
            otlp_endpoint: String::new(),
            sample_interval_ms: 10_000,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AccessToml {
    operators: Vec<String>,
    auditors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HubToml {
    code: String,
    #[serde(default)]
    role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerToml {
    grpc_listen: String,
    http_listen: String,
}

impl Default for ServerToml {
    fn default() -> Self {
        ServerToml {
            grpc_listen: "127.0.0.1:50051".into(),
            http_listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `[storage] min_free_mib` when the file does not set it: room for a few of the largest
/// documents and for what the documents already accepted still write (receipts, marks).
pub const DEFAULT_MIN_FREE_MIB: u64 = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StorageToml {
    data_dir: PathBuf,
    cache_mib: u64,
    min_free_mib: u64,
}

impl Default for StorageToml {
    fn default() -> Self {
        StorageToml {
            data_dir: "data".into(),
            cache_mib: crate::store::DEFAULT_CACHE_BYTES / (1024 * 1024),
            min_free_mib: DEFAULT_MIN_FREE_MIB,
        }
    }
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum TransportKind {
    #[default]
    Embedded,
    Amqp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TransportToml {
    kind: TransportKind,
    amqp_url: String,
    amqp_ca_file: String,
    prefix: String,
}

impl Default for TransportToml {
    fn default() -> Self {
        TransportToml {
            kind: TransportKind::Embedded,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_ca_file: String::new(),
            prefix: "lienthong".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DirectoryToml {
    file: PathBuf,
}

impl Default for DirectoryToml {
    fn default() -> Self {
        DirectoryToml {
            file: "config/agencies.toml".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsToml {
    max_document_bytes: usize,
    max_recipients: usize,
    max_outbox_messages: u64,
    max_attachments: usize,
    max_attachment_bytes: usize,
    max_field_bytes: usize,
    max_streams_per_agency: u32,
    max_sends_per_second: u32,
}

impl Default for LimitsToml {
    fn default() -> Self {
        LimitsToml {
            max_document_bytes: 16 * 1024 * 1024,
            max_recipients: 1000,
            max_outbox_messages: 1_000_000,
            max_attachments: 100,
            max_attachment_bytes: 16 * 1024 * 1024,
            max_field_bytes: 2048,
            max_streams_per_agency: 8,
            max_sends_per_second: 10_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DeliveryToml {
    prefetch: u16,
    delivery_limit: u32,
    queue_delivery_limit: u32,
    shutdown_grace_ms: u64,
    retry_backoff_base_ms: u64,
    retry_backoff_max_ms: u64,
}

impl Default for DeliveryToml {
    fn default() -> Self {
        DeliveryToml {
            prefetch: 64,
            delivery_limit: 10,
            queue_delivery_limit: 1000,
            shutdown_grace_ms: 10_000,
            retry_backoff_base_ms: 1_000,
            retry_backoff_max_ms: 60_000,
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let error = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| error(format!("cannot read it: {e}")))?;
        Config::parse_and_validate(&text).map_err(error)
    }

    /// Parses TOML text; the error names the key at fault.
    pub fn parse_and_validate(text: &str) -> Result<Config, String> {
        let parsed: ConfigToml = toml::from_str(text).map_err(|e| one_line_toml_error(text, &e))?;
        // Destructured field by field, so that a key added to the file cannot be forgotten here.
        let ConfigToml {
            hub: HubToml { code, role },
            server:
                ServerToml {
                    grpc_listen,
                    http_listen,
                },
            storage:
                StorageToml {
                    data_dir,
                    cache_mib,
                    min_free_mib,
                },
            transport:
                TransportToml {
                    kind,
                    amqp_url,
                    amqp_ca_file,
                    prefix,
                },
            directory: DirectoryToml {
                file: directory_file,
            },
            limits:
                LimitsToml {
                    max_document_bytes,
                    max_recipients,
                    max_outbox_messages,
                    max_attachments,
                    max_attachment_bytes,
                    max_field_bytes,
                    max_streams_per_agency,
                    max_sends_per_second,
                },
            delivery:
                DeliveryToml {
                    prefetch,
                    delivery_limit,
                    queue_delivery_limit,
                    shutdown_grace_ms,
                    retry_backoff_base_ms,
                    retry_backoff_max_ms,
                },
            access: AccessToml {
                operators,
                auditors,
            },
            ledger:
                LedgerToml {
                    checkpoint_every,
                    checkpoint_interval_ms,
                    archive_dir,
                },
            tls:
                TlsToml {
                    cert_file,
                    key_file,
                    client_ca_file,
                },
            telemetry:
                TelemetryToml {
                    log_format,
                    otlp_endpoint,
                    sample_interval_ms,
                },
            uplink,
            peer: peers,
        } = parsed;

        let hub_code = code.parse().map_err(|e| format!("[hub] code: {e}"))?;
        let grpc_listen = grpc_listen.parse().map_err(|e| {
            format!("[server] grpc_listen: `{grpc_listen}` is not a socket address: {e}")
        })?;
        let http_listen = http_listen.parse().map_err(|e| {
            format!("[server] http_listen: `{http_listen}` is not a socket address: {e}")
        })?;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "[transport] prefix: `{prefix}` must be non-empty and use only letters, digits, `-` and `_`"
            ));
        }
        let transport = match kind {
            TransportKind::Embedded => TransportConfig::Embedded { prefix },
            TransportKind::Amqp => {
                if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
                    return Err("[transport] amqp_url: must start with amqp:// or amqps://".into());
                }
                if !amqp_ca_file.is_empty() && !amqp_url.starts_with("amqps://") {
                    return Err(
                        "[transport] amqp_ca_file: only used with an amqps:// amqp_url".into(),
                    );
                }
                TransportConfig::Amqp {
                    url: amqp_url,
                    prefix,
                    ca_file: Some(PathBuf::from(amqp_ca_file))
                        .filter(|p| !p.as_os_str().is_empty()),
                }
            }
        };
        if max_document_bytes == 0 {
            return Err("[limits] max_document_bytes: must be greater than 0".into());
        }
        if max_recipients == 0 {
            return Err("[limits] max_recipients: must be greater than 0".into());
        }
        for (key, value) in [
            ("max_field_bytes", max_field_bytes as u64),
            ("max_streams_per_agency", u64::from(max_streams_per_agency)),
            ("max_sends_per_second", u64::from(max_sends_per_second)),
        ] {
            if value == 0 {
                return Err(format!("[limits] {key}: must be greater than 0"));
            }
        }
        if prefetch == 0 {
            return Err("[delivery] prefetch: must be greater than 0".into());
        }
        if delivery_limit == 0 {
            return Err("[delivery] delivery_limit: must be greater than 0".into());
        }
        if queue_delivery_limit <= delivery_limit {
            return Err(format!(
                "[delivery] queue_delivery_limit: {queue_delivery_limit} must be greater than delivery_limit ({delivery_limit})"
            ));
        }
        let log_format = match log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(format!(
                    "[telemetry] log_format: `{other}` is neither \"text\" nor \"json\""
                ));
            }
        };
        if !(otlp_endpoint.is_empty()
            || otlp_endpoint.starts_with("http://")
            || otlp_endpoint.starts_with("https://"))
        {
            return Err(format!(
                "[telemetry] otlp_endpoint: `{otlp_endpoint}` must start with http:// or https://"
            ));
        }
        if sample_interval_ms < 100 {
            return Err("[telemetry] sample_interval_ms: must be at least 100".into());
        }
        let identities = |key: &str, codes: &[String]| {
            codes
                .iter()
                .enumerate()
                .map(|(index, code)| {
                    code.parse()
                        .map_err(|e| format!("[access] {key}[{index}]: {e}"))
                })
                .collect::<Result<Vec<AgencyCode>, String>>()
        };
        let operators = identities("operators", &operators)?;
        let auditors = identities("auditors", &auditors)?;
        if checkpoint_every == 0 {
            return Err("[ledger] checkpoint_every: must be greater than 0".into());
        }
        if checkpoint_interval_ms == 0 {
            return Err("[ledger] checkpoint_interval_ms: must be greater than 0".into());
        }
        let tls = match (
            cert_file.is_empty(),
            key_file.is_empty(),
            client_ca_file.is_empty(),
        ) {
            (true, true, true) => None,
            (false, false, false) => Some(crate::tls::TlsFiles {
                cert_file: cert_file.into(),
                key_file: key_file.into(),
                client_ca_file: client_ca_file.into(),
            }),
            _ => {
                return Err(
                    "[tls]: set cert_file, key_file and client_ca_file together (mutual TLS), or none of them".into(),
                );
            }
        };
        let federation = federation(&hub_code, role.as_deref(), uplink, peers)?;
        if !(4..=65_536).contains(&cache_mib) {
            return Err(format!(
                "[storage] cache_mib: {cache_mib} must be between 4 and 65536"
            ));
        }
        let archive_dir = if archive_dir.is_empty() {
            data_dir.join("ledger-archive")
        } else {
            PathBuf::from(archive_dir)
        };
        Ok(Config {
            federation,
            tls,
            archive_dir,
            operators,
            auditors,
            checkpoints: crate::store::CheckpointPolicy {
                every: checkpoint_every,
                interval: Duration::from_millis(checkpoint_interval_ms),
            },
            hub_code,
            grpc_listen,
            http_listen,
            data_dir,
            cache_bytes: cache_mib * 1024 * 1024,
            min_free_disk_bytes: min_free_mib.saturating_mul(1024 * 1024),
            transport,
            directory_file,
            limits: Limits {
                max_document_bytes,
                max_recipients,
                max_outbox_messages,
                max_attachments,
                max_attachment_bytes,
                max_field_bytes,
                max_streams_per_agency,
                max_sends_per_second,
            },
            delivery: DeliveryConfig {
                prefetch,
                delivery_limit,
                queue_delivery_limit,
                shutdown_grace: Duration::from_millis(shutdown_grace_ms),
                retry_backoff_base: Duration::from_millis(retry_backoff_base_ms),
                retry_backoff_max: Duration::from_millis(retry_backoff_max_ms),
            },
            telemetry: TelemetryConfig {
                log_format,
                otlp_endpoint: Some(otlp_endpoint).filter(|e| !e.is_empty()),
                sample_interval: Duration::from_millis(sample_interval_ms),
            },
        })
    }
}

/// Validates `[hub] role`, `[uplink]` and `[[peer]]` together.
fn federation(
    hub_code: &AgencyCode,
    role: Option<&str>,
    uplink: Option<UplinkToml>,
    peers: Vec<PeerToml>,
) -> Result<Federation, String> {
    let role = match role.unwrap_or("province") {
        "province" => HubRole::Province,
        "central" => HubRole::Central,
        other => {
            return Err(format!(
                "[hub] role: `{other}` is neither \"province\" nor \"central\""
            ));
        }
    };
    let uplink = match uplink {
        None => None,
        Some(_) if role == HubRole::Central => {
            return Err("[uplink]: a central hub has no uplink; remove the section".into());
        }
        Some(UplinkToml {
            hub,
            endpoint,
            ca_file,
            cert_file,
            key_file,
        }) => {
            let hub: AgencyCode = hub.parse().map_err(|e| format!("[uplink] hub: {e}"))?;
            if hub.province() == hub_code.province() {
                return Err(format!(
                    "[uplink] hub: {hub} is in this hub's own province {}; name the central hub",
                    hub_code.province()
                ));
            }
            let tls = match (
                ca_file.is_empty(),
                cert_file.is_empty(),
                key_file.is_empty(),
            ) {
                (true, true, true) => None,
                (false, false, false) => Some(crate::tls::ClientTls {
                    ca_file: ca_file.into(),
                    cert_file: cert_file.into(),
                    key_file: key_file.into(),
                }),
                _ => {
                    return Err(
                        "[uplink]: set ca_file, cert_file and key_file together (mutual TLS), or none of them".into(),
                    );
                }
            };
            let scheme_ok = match tls {
                Some(_) => endpoint.starts_with("https://"),
                None => endpoint.starts_with("http://"),
            };
            if !scheme_ok {
                return Err(format!(
                    "[uplink] endpoint: `{endpoint}` must start with {}",
                    if tls.is_some() {
                        "https:// (TLS files are set)"
                    } else {
                        "http:// (no TLS files are set)"
                    }
                ));
            }
            Some(Uplink { hub, endpoint, tls })
        }
    };
    if role == HubRole::Province && !peers.is_empty() {
        return Err("[[peer]]: only a central hub ([hub] role = \"central\") serves peers".into());
    }
    let mut validated: Vec<Peer> = Vec::with_capacity(peers.len());
    for (index, PeerToml { province, identity }) in peers.into_iter().enumerate() {
        if province.len() != 3 || !province.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "[[peer]] {index}: province `{province}` is not a province code (three letters and digits, like H53)"
            ));
        }
        let identity: AgencyCode = identity
            .parse()
            .map_err(|e| format!("[[peer]] {index}: identity: {e}"))?;
        if province == hub_code.province() {
            return Err(format!(
                "[[peer]] {index}: province {province} is this hub's own"
            ));
        }
        if validated.iter().any(|p| p.province == province) {
            return Err(format!(
                "[[peer]] {index}: province {province} is listed twice"
            ));
        }
        if validated.iter().any(|p| p.identity == identity) {
            return Err(format!(
                "[[peer]] {index}: identity {identity} is listed twice"
            ));
        }
        validated.push(Peer { province, identity });
    }
    Ok(Federation {
        role,
        uplink,
        peers: validated,
    })
}

/// Turns a TOML error (several lines with a snippet) into one line with the line number.
pub(crate) fn one_line_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Replaces the password of a `scheme://user:password@host` URL with `***`.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let config = Config::parse_and_validate(
            r#"
[hub]
code = "000.00.00.H53"
[server]
grpc_listen = "127.0.0.1:50051"
http_listen = "127.0.0.1:9464"
[storage]
data_dir = "data"
[transport]
kind = "amqp"
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
prefix = "lienthong"
[directory]
file = "config/agencies.toml"
[limits]
max_document_bytes = 16777216
"#,
        )
        .expect("valid");
        assert_eq!(config.hub_code.as_str(), "000.00.00.H53");
        assert_eq!(config.transport.prefix(), "lienthong");
        assert!(matches!(config.transport, TransportConfig::Amqp { .. }));
        assert_eq!(config.limits.max_document_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn wrong_and_missing_keys_are_named_on_one_line() {
        let cases = [
            (
                "[hub]\ncode = \"000.00.00.H53\"\n[server]\ngrpc_lisen = \"x\"\n",
                "grpc_lisen",
            ),
            ("[server]\ngrpc_listen = \"127.0.0.1:1\"\n", "hub"),
            ("[hub]\n", "code"),
            ("[hub]\ncode = \"H53\"\n", "[hub] code"),
            (
                "[hub]\ncode = \"000.00.00.H53\"\n[transport]\nkind = \"kafka\"\n",
                "kafka",
            ),
            (
                "[hub]\ncode = \"000.00.00.H53\"\n[server]\ngrpc_listen = \"nowhere\"\n",
                "[server] grpc_listen",
            ),
            (
                "[hub]\ncode = \"000.00.00.H53\"\n[transport]\nprefix = \"a b\"\n",
                "[transport] prefix",
            ),
            (
                "[hub]\ncode = \"000.00.00.H53\"\n[limits]\nmax_document_bytes = \"big\"\n",
                "line 4",
            ),
        ];
        for (text, expected) in cases {
            let error = Config::parse_and_validate(text).expect_err(text);
            assert!(
                error.contains(expected),
                "`{error}` should name `{expected}`"
            );
            assert!(!error.contains('\n'), "`{error}` should be one line");
        }
    }

    #[test]
    fn province_and_central_roles_parse_with_their_links() {
        let province = Config::parse_and_validate(
            "[hub]\ncode = \"000.00.00.H53\"\nrole = \"province\"\n[uplink]\nhub = \"000.00.00.G22\"\nendpoint = \"http://central:50051\"\n",
        )
        .expect("valid province");
        let uplink = province.federation.uplink.expect("an uplink");
        assert_eq!(uplink.hub.as_str(), "000.00.00.G22");
        assert_eq!(uplink.endpoint, "http://central:50051");
        assert!(uplink.tls.is_none());
        let central = Config::parse_and_validate(
            "[hub]\ncode = \"000.00.00.G22\"\nrole = \"central\"\n[[peer]]\nprovince = \"H53\"\nidentity = \"000.00.00.H53\"\n[[peer]]\nprovince = \"H54\"\nidentity = \"000.00.00.H54\"\n",
        )
        .expect("valid central");
        assert_eq!(central.federation.role, HubRole::Central);
        let provinces: Vec<&str> = central
            .federation
            .peers
            .iter()
            .map(|p| p.province.as_str())
            .collect();
        assert_eq!(provinces, ["H53", "H54"]);
        let standalone =
            Config::parse_and_validate("[hub]\ncode = \"000.00.00.H53\"\n").expect("valid");
        assert_eq!(standalone.federation.role, HubRole::Province);
        assert!(standalone.federation.uplink.is_none());
    }

    #[test]
    fn federation_mistakes_are_named_on_one_line() {
        let hub = "[hub]\ncode = \"000.00.00.H53\"\n";
        let central = "[hub]\ncode = \"000.00.00.G22\"\nrole = \"central\"\n";
        let cases = [
            (
                "[hub]\ncode = \"000.00.00.H53\"\nrole = \"axis\"\n".to_owned(),
                "[hub] role",
            ),
            (
                format!("{central}[uplink]\nhub = \"000.00.00.G01\"\nendpoint = \"http://x:1\"\n"),
                "[uplink]",
            ),
            (
                format!("{hub}[uplink]\nhub = \"000.00.00.H53\"\nendpoint = \"http://x:1\"\n"),
                "own province",
            ),
            (
                format!("{hub}[uplink]\nhub = \"000.00.00.G22\"\nendpoint = \"x:1\"\n"),
                "[uplink] endpoint",
            ),
            (
                format!(
                    "{hub}[uplink]\nhub = \"000.00.00.G22\"\nendpoint = \"https://x:1\"\nca_file = \"ca.pem\"\n"
                ),
                "together",
            ),
            (
                format!("{hub}[[peer]]\nprovince = \"H54\"\nidentity = \"000.00.00.H54\"\n"),
                "only a central hub",
            ),
            (
                format!("{central}[[peer]]\nprovince = \"H5\"\nidentity = \"000.00.00.H54\"\n"),
                "not a province code",
            ),
            (
                format!(
                    "{central}[[peer]]\nprovince = \"H54\"\nidentity = \"000.00.00.H54\"\n[[peer]]\nprovince = \"H54\"\nidentity = \"000.00.00.H55\"\n"
                ),
                "listed twice",
            ),
        ];
        for (text, expected) in cases {
            let error = Config::parse_and_validate(&text).expect_err(&text);
            assert!(
                error.contains(expected),
                "`{error}` should name `{expected}`"
            );
            assert!(!error.contains('\n'), "`{error}` should be one line");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url_password("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        let config = Config::parse_and_validate(
            "[hub]\ncode = \"000.00.00.H53\"\n[transport]\nkind = \"amqp\"\namqp_url = \"amqp://u:hunter2@h/\"\n",
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
