//! The `lienthong` command line: `serve` runs a hub; `send`, `receive`, `status` and `track`
//! are a client a person can use by hand.

pub mod audit;

use crate::client::ExchangeClient;
use crate::config::Config;
use crate::store::StoreError;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lienthong_proto::v1 as wire;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for an unusable configuration (EX_USAGE-style, as sysexits' EX_USAGE is 64).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when the hub's disk is full or fails (sysexits' EX_IOERR): the hub stopped, or
/// could not start, because its database cannot write; it can start again once there is room.
pub const EXIT_STORAGE: u8 = 74;

#[derive(Debug, Parser)]
#[command(
    name = "lienthong",
    version,
    about = "A hub for the exchange of official documents between agencies"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs a hub.
    Serve {
        /// The TOML configuration file.
        #[arg(long, default_value = "config/lienthong.toml")]
        config: PathBuf,
    },
    /// Sends a document.
    Send(SendArgs),
    /// Receives the documents and status reports addressed to an agency, acknowledging each.
    Receive(ReceiveArgs),
    /// Reports the processing status of a received document (or, as its sender, requests a recall).
    Status(StatusArgs),
    /// Shows every receipt and status of a document, per recipient.
    Track(TrackArgs),
    /// Operators: per agency queue depths, consumers and dead letters, and the outbox depth.
    Queues(QueuesArgs),
    /// Operators: list or replay the dead letters the hub keeps.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Operators: the agency directory.
    #[command(subcommand)]
    Directory(DirectoryCommand),
    /// Auditors: the tamper-evident receipt ledger (list, export, verify offline, prove).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Development certificates for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Makes a development CA, a hub certificate (localhost, 127.0.0.1) and one client
    /// certificate per agency of the configuration's directory, as PEM files in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The hub configuration whose hub code and directory to use.
        #[arg(long, default_value = "config/lienthong.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DirectoryCommand {
    /// Makes the hub read its directory file again, without dropping open streams.
    Reload {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Lists dead letters, oldest first, with why they were dead-lettered.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this recipient's.
        #[arg(long = "agency", default_value = "")]
        recipient: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Sends dead letters back to their recipients' queues.
    Replay {
        #[command(flatten)]
        client: ClientArgs,
        /// Replay this recipient's dead letters.
        #[arg(long = "agency", default_value = "")]
        recipient: String,
        /// Replay the dead letters of this document; repeat for several.
        #[arg(long = "document")]
        documents: Vec<String>,
        /// Dead letters replayed per request; progress is printed after each.
        #[arg(long, default_value_t = 500)]
        step: u32,
    },
}

/// Who the client is and which hub it talks to.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The hub's gRPC endpoint.
    #[arg(
        long,
        env = "LIENTHONG_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// The agency code to act as (without TLS; with TLS the certificate says who you are).
    #[arg(long = "as", env = "LIENTHONG_AGENCY", value_name = "AGENCY")]
    pub agency: String,
    /// Mutual TLS: the CA that signed the hub's certificate (use an https:// endpoint).
    #[arg(long, env = "LIENTHONG_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (its SAN URI names the agency).
    #[arg(long, env = "LIENTHONG_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "LIENTHONG_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    fn tls(&self) -> Option<crate::tls::ClientTls> {
        Some(crate::tls::ClientTls {
            ca_file: self.tls_ca.clone()?,
            cert_file: self.tls_cert.clone()?,
            key_file: self.tls_key.clone()?,
        })
    }

    async fn exchange(&self) -> anyhow::Result<ExchangeClient> {
        crate::client::connect_with(&self.endpoint, &self.agency, self.tls().as_ref()).await
    }

    async fn admin(&self) -> anyhow::Result<crate::client::AdminClient> {
        crate::client::connect_admin_with(&self.endpoint, &self.agency, self.tls().as_ref()).await
    }

    async fn audit(&self) -> anyhow::Result<crate::client::AuditClient> {
        crate::client::connect_audit_with(&self.endpoint, &self.agency, self.tls().as_ref()).await
    }
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// A recipient agency code; repeat for several.
    #[arg(long, required = true)]
    pub to: Vec<String>,
    #[arg(long)]
    pub subject: String,
    /// The body as text.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// The body read from a file.
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// A file to attach; repeat for several.
    #[arg(long)]
    pub attach: Vec<PathBuf>,
    #[arg(long, default_value = "")]
    pub code_number: String,
    #[arg(long, default_value = "")]
    pub code_notation: String,
    /// Urgency: 0 normal, 1 urgent, 2 very urgent, 3 express, 4 timed express.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    /// A document id of your own; resending with the same id is idempotent.
    #[arg(long, default_value = "")]
    pub document_id: String,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Stop after this many deliveries (default: run until interrupted).
    #[arg(long)]
    pub count: Option<usize>,
    /// Show deliveries without acknowledging them (they will be redelivered).
    #[arg(long)]
    pub no_ack: bool,
    /// Spool each document (body, attachments, summary) into this directory before
    /// acknowledging it; see `lienthong_connectors::spool`.
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub document: String,
    /// 01 arrived, 02 refused, 03 accepted, 04 assigned, 05 in progress, 06 completed,
    /// 13 recall requested, 15 recall agreed, 16 recall refused.
    #[arg(long)]
    pub code: String,
    #[arg(long, default_value = "")]
    pub description: String,
}

#[derive(Debug, Args)]
pub struct TrackArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub document: String,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    if !matches!(cli.command, Command::Serve { .. }) {
        // Client commands log in text; failing to install the subscriber only loses log lines.
        let _ = crate::telemetry::init(crate::telemetry::LogFormat::Text, None);
    }
    let result = match cli.command {
        Command::Serve { config } => return serve(config).await,
        Command::Send(args) => send(args).await,
        Command::Receive(args) => receive(args).await,
        Command::Status(args) => status(args).await,
        Command::Track(args) => track(args).await,
        Command::Queues(args) => queues(args).await,
        Command::DeadLetters(command) => dead_letters(command).await,
        Command::Directory(DirectoryCommand::Reload { client }) => reload_directory(client).await,
        Command::Audit(command) => audit::run(command).await,
        Command::Certs(CertsCommand::Init { dir, config }) => init_certificates(&dir, &config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lienthong: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_path: PathBuf) -> ExitCode {
    let config = match Config::load(&config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("lienthong: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let telemetry = &config.telemetry;
    let _telemetry =
        match crate::telemetry::init(telemetry.log_format, telemetry.otlp_endpoint.as_deref()) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("lienthong: [telemetry]: {error:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let listeners = match crate::server::Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("lienthong: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    match crate::server::run(config, listeners, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lienthong: {error:#}");
            match error.downcast_ref::<StoreError>() {
                Some(StoreError::Failed(_) | StoreError::DiskFull { .. }) => {
                    ExitCode::from(EXIT_STORAGE)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn client(args: &ClientArgs) -> anyhow::Result<ExchangeClient> {
    args.exchange().await
}

async fn send(args: SendArgs) -> anyhow::Result<()> {
    let mut hub = client(&args.client).await?;
    let body = match (&args.body, &args.body_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => Vec::new(),
    };
    let mut attachments = Vec::with_capacity(args.attach.len());
    for path in &args.attach {
        attachments.push(wire::Attachment {
            name: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            content_type: "application/octet-stream".into(),
            content: std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            description: String::new(),
        });
    }
    let document = wire::Document {
        document_id: args.document_id,
        from: args.client.agency.clone(),
        to: args.to,
        subject: args.subject,
        code_number: args.code_number,
        code_notation: args.code_notation,
        priority: args.priority,
        body,
        attachments,
        ..Default::default()
    };
    let response = hub
        .send(wire::SendRequest {
            document: Some(document),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("accepted {}", response.document_id);
    for receipt in &response.receipts {
        println!("  {}", describe_receipt(receipt));
    }
    Ok(())
}

async fn receive(args: ReceiveArgs) -> anyhow::Result<()> {
    let mut hub = client(&args.client).await?;
    let mut stream = hub
        .receive(wire::ReceiveRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut received = 0;
    while args.count.is_none_or(|count| received < count) {
        let Some(delivery) = stream.message().await.map_err(status_error)? else {
            break;
        };
        received += 1;
        let redelivered = if delivery.redelivered {
            " (redelivered)"
        } else {
            ""
        };
        match &delivery.payload {
            Some(wire::delivery::Payload::Document(document)) => {
                println!(
                    "document {} from {}{redelivered}: {} [{} bytes, {} attachments]",
                    document.document_id,
                    document.from,
                    document.subject,
                    document.body.len(),
                    document.attachments.len()
                );
                if let Some(dir) = &args.save_dir {
                    let saved = lienthong_connectors::spool::write_document(dir, document)
                        .with_context(|| format!("spooling into {}", dir.display()))?;
                    println!("  saved to {}", saved.display());
                }
            }
            Some(wire::delivery::Payload::Status(status)) => println!(
                "status {} on {} from {}{redelivered}: {}",
                status.status_code, status.document_id, status.from, status.description
            ),
            Some(wire::delivery::Payload::Receipt(receipt)) => println!(
                "receipt {} of {} for {}{redelivered}",
                crate::receipt::kind_name(receipt),
                receipt.document_id,
                receipt.agency
            ),
            None => println!("empty delivery{redelivered}"),
        }
        if !args.no_ack {
            hub.ack(wire::AckRequest {
                ack_token: delivery.ack_token,
                reject: false,
                reason: String::new(),
                ..Default::default()
            })
            .await
            .map_err(status_error)?;
            println!("  acknowledged");
        }
    }
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut hub = client(&args.client).await?;
    let response = hub
        .report_status(wire::StatusReport {
            document_id: args.document,
            status_code: args.code,
            description: args.description,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for receipt in &response.receipts {
        println!("{}", describe_receipt(receipt));
    }
    Ok(())
}

async fn track(args: TrackArgs) -> anyhow::Result<()> {
    let mut hub = client(&args.client).await?;
    let response = hub
        .track(wire::TrackRequest {
            document_id: args.document,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("document {}", response.document_id);
    for recipient in &response.recipients {
        println!("  {} {}", recipient.agency, recipient.state().as_str_name());
        for receipt in &recipient.receipts {
            println!("    {}", describe_receipt(receipt));
        }
    }
    for reference in &response.referenced_by {
        println!(
            "  {} by {}: {}",
            reference
                .business_type()
                .as_str_name()
                .trim_start_matches("BUSINESS_TYPE_")
                .to_lowercase(),
            reference.from,
            reference.document_id
        );
    }
    Ok(())
}

async fn queues(args: QueuesArgs) -> anyhow::Result<()> {
    let mut admin = args.client.admin().await?;
    loop {
        let response = admin
            .list_queues(wire::ListQueuesRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
        if args.json {
            println!("{}", queues_json(&response));
        } else {
            print!("{}", queues_table(&response));
        }
        let Some(seconds) = args.watch else {
            return Ok(());
        };
        tokio::time::sleep(std::time::Duration::from_secs(seconds.max(1))).await;
        println!();
    }
}

/// The queues as a table a person reads.
pub fn queues_table(response: &wire::ListQueuesResponse) -> String {
    let mut table = format!(
        "{:<15} {:>8} {:>8} {:>9} {:>12} {:>10} {:>8} {:>8}\n",
        "AGENCY", "READY", "UNACKED", "CONSUMERS", "DEAD LETTERS", "OLDEST", "IN/s", "OUT/s"
    );
    for queue in &response.queues {
        table.push_str(&format!(
            "{:<15} {:>8} {:>8} {:>9} {:>12} {:>10} {:>8.1} {:>8.1}\n",
            queue.agency,
            queue.ready,
            queue.unacknowledged,
            queue.consumers,
            queue.dead_letters,
            human_age(queue.oldest_message_age_ms),
            queue.in_per_second,
            queue.out_per_second,
        ));
    }
    table.push_str(&format!(
        "outbox {} waiting, {} dead letters kept\n",
        response.outbox_depth, response.dead_letters
    ));
    if !response.transport_error.is_empty() {
        table.push_str(&format!(
            "queue depths unknown: {}\n",
            response.transport_error
        ));
    }
    table
}

/// An age in the largest unit that keeps it short: `-` for none, `42s`, `17m`, `5h`, `3d`.
pub fn human_age(ms: i64) -> String {
    let seconds = ms / 1000;
    match seconds {
        _ if ms <= 0 => "-".to_owned(),
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86_400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// The queues as one JSON object.
pub fn queues_json(response: &wire::ListQueuesResponse) -> String {
    let queues: Vec<serde_json::Value> = response
        .queues
        .iter()
        .map(|q| {
            serde_json::json!({
                "agency": q.agency,
                "queue": q.queue,
                "ready": q.ready,
                "unacknowledged": q.unacknowledged,
                "consumers": q.consumers,
                "dead_letters": q.dead_letters,
                "oldest_message_age_ms": q.oldest_message_age_ms,
                "in_per_second": q.in_per_second,
                "out_per_second": q.out_per_second,
            })
        })
        .collect();
    serde_json::json!({
        "outbox_depth": response.outbox_depth,
        "dead_letters": response.dead_letters,
        "transport_error": response.transport_error,
        "queues": queues,
    })
    .to_string()
}

async fn dead_letters(command: DeadLettersCommand) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List {
            client,
            recipient,
            limit,
        } => {
            let mut admin = client.admin().await?;
            let listed = admin
                .list_dead_letters(wire::ListDeadLettersRequest {
                    agency: recipient,
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .dead_letters;
            for dead in &listed {
                println!(
                    "#{} {} for {} at {}: {}",
                    dead.id,
                    dead.message_id,
                    dead.recipient,
                    dead.dead_lettered_at_unix_ms,
                    dead.reason
                );
            }
            println!("{} dead letters", listed.len());
        }
        DeadLettersCommand::Replay {
            client,
            recipient,
            documents,
            step,
        } => {
            let mut admin = client.admin().await?;
            let mut replayed = 0u64;
            loop {
                let response = admin
                    .replay_dead_letters(wire::ReplayDeadLettersRequest {
                        agency: recipient.clone(),
                        document_ids: documents.clone(),
                        limit: step.max(1),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for receipt in &response.receipts {
                    println!("{}", describe_receipt(receipt));
                }
                replayed += u64::from(response.replayed);
                let total = replayed + response.remaining;
                eprintln!("replayed {replayed} of {total}");
                // Stop when done, or when a step replays nothing (another operator took them).
                if response.remaining == 0 || response.replayed == 0 {
                    break;
                }
            }
            println!("replayed {replayed}");
        }
    }
    Ok(())
}

fn init_certificates(dir: &std::path::Path, config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let directory = crate::directory::AgencyDirectory::load(&config.directory_file)?;
    let agencies: Vec<_> = directory.codes().cloned().collect();
    let made = crate::tls::init_certificates(dir, &config.hub_code, &agencies)?;
    println!("CA            {}", made.ca.display());
    println!(
        "hub {}  {} (key {})",
        config.hub_code,
        made.hub.cert_file.display(),
        made.hub.key_file.display()
    );
    for (code, cert, _) in &made.agencies {
        println!("agency {code}  {}", cert.display());
    }
    println!(
        "[tls] cert_file = \"{}\"  key_file = \"{}\"  client_ca_file = \"{}\"",
        made.hub.cert_file.display(),
        made.hub.key_file.display(),
        made.ca.display()
    );
    Ok(())
}

async fn reload_directory(client: ClientArgs) -> anyhow::Result<()> {
    let mut admin = client.admin().await?;
    let response = admin
        .reload_directory(wire::ReloadDirectoryRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    for agency in &response.added {
        println!("added {agency}");
    }
    for agency in &response.removed {
        println!("removed {agency}");
    }
    println!("directory reloaded: {} agencies", response.agencies);
    Ok(())
}

/// One line for a receipt: `#seq KIND agency at ms on hub H [status code] [detail]`.
pub fn describe_receipt(receipt: &wire::Receipt) -> String {
    let mut line = format!(
        "#{} {} {} at {} on hub {}",
        receipt.seq,
        crate::receipt::kind_name(receipt),
        receipt.agency,
        receipt.at_unix_ms,
        receipt.hub
    );
    if !receipt.status_code.is_empty() {
        line.push_str(&format!(
            " status {} by {}",
            receipt.status_code, receipt.reported_by
        ));
    }
    if !receipt.detail.is_empty() {
        line.push_str(&format!(": {}", receipt.detail));
    }
    line
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
