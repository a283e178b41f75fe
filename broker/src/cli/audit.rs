//! `lienthong audit …`: the auditor's tools. `receipts`, `export`, `prove` and `public-key` ask a
//! hub; `verify` and `verify-proof` work offline with nothing but a file and the hub's key.

use super::{ClientArgs, status_error};
use crate::ledger::{self, export};
use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use lienthong_proto::v1 as wire;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Lists receipts of the ledger, oldest first, filtered.
    Receipts(ReceiptsArgs),
    /// Writes a range of the ledger with its signed checkpoints to a file (JSON lines).
    Export {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Exclusive; up to the newest checkpoint when 0.
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
    /// Verifies an exported file offline: chain, order, checkpoint signatures and roots.
    Verify {
        file: PathBuf,
        /// The hub's Ed25519 public key, in hex (`lienthong audit public-key`).
        #[arg(long)]
        public_key: String,
    },
    /// Writes one receipt with its inclusion proof and the signed checkpoint it is proven against.
    Prove {
        #[command(flatten)]
        client: ClientArgs,
        /// The receipt's ledger index…
        #[arg(long, conflicts_with = "seq", required_unless_present = "seq")]
        index: Option<u64>,
        /// …or its receipt number (`#seq` in `track`).
        #[arg(long)]
        seq: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Verifies a proof file offline against the hub's public key.
    VerifyProof {
        file: PathBuf,
        #[arg(long)]
        public_key: String,
    },
    /// Prints the hub's ledger public key (hex), its size and newest checkpoint.
    PublicKey {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Operators: moves the oldest records (up to a signed checkpoint) out of the hub's database
    /// into a verified file under `[ledger] archive_dir` on the hub's disk.
    Archive {
        #[command(flatten)]
        client: ClientArgs,
        /// Archive up to the newest checkpoint at or below this ledger size.
        #[arg(long)]
        up_to: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct ReceiptsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "")]
    pub document: String,
    /// The agency the receipts are about.
    #[arg(long = "agency", default_value = "")]
    pub about_agency: String,
    /// ACCEPTED, ENQUEUED, DELIVERED, ACKNOWLEDGED, REJECTED, DEAD_LETTERED, STATUS_REPORTED, REPLAYED.
    #[arg(long)]
    pub kind: Option<String>,
    /// One UTC day, `YYYY-MM-DD`.
    #[arg(long)]
    pub day: Option<String>,
    /// At most this many receipts.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Receipts(args) => receipts(args).await,
        AuditCommand::Export {
            client,
            out,
            from,
            to,
        } => export_file(client, out, from, to).await,
        AuditCommand::Verify { file, public_key } => {
            let (text, key) = read_with_key(&file, &public_key)?;
            match export::verify(&text, &key) {
                Ok(verified) => {
                    println!(
                        "ok: {} records, {} checkpoints{}",
                        verified.records,
                        verified.checkpoints,
                        if verified.roots_checked {
                            ", Merkle roots recomputed"
                        } else {
                            " (export does not start at record 0: roots not recomputed)"
                        }
                    );
                    Ok(())
                }
                Err(problem) => bail!("{}: {problem}", file.display()),
            }
        }
        AuditCommand::Prove {
            client,
            index,
            seq,
            out,
        } => prove(client, index, seq, out).await,
        AuditCommand::VerifyProof { file, public_key } => {
            let (text, key) = read_with_key(&file, &public_key)?;
            let (index, receipt) = verify_proof(&text, &key)?;
            println!(
                "ok: record {index} (receipt #{} {} {} of {}) is in the ledger signed by the key",
                receipt.seq,
                crate::receipt::kind_name(&receipt),
                receipt.agency,
                receipt.document_id
            );
            Ok(())
        }
        AuditCommand::Archive { client, up_to } => {
            let mut admin = client.admin().await?;
            let archived = admin
                .archive_ledger(wire::ArchiveLedgerRequest { up_to })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "archived records {}..{} ({} checkpoints) to {}",
                archived.from_index, archived.to_index, archived.checkpoints, archived.path
            );
            Ok(())
        }
        AuditCommand::PublicKey { client } => {
            let mut audit = client.audit().await?;
            let info = audit
                .get_ledger_info(wire::GetLedgerInfoRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", hex::encode(&info.public_key));
            eprintln!(
                "hub {}: {} records, newest checkpoint at {}",
                info.hub,
                info.size,
                info.checkpoint.map_or(0, |c| c.tree_size)
            );
            Ok(())
        }
    }
}

/// What the offline commands take: a file's text, and the hub's public key from hex.
fn read_with_key(file: &std::path::Path, public_key: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let key = parse_key(public_key)?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok((text, key))
}

fn parse_key(text: &str) -> anyhow::Result<Vec<u8>> {
    let key = hex::decode(text.trim()).context("--public-key: not hex")?;
    if key.len() != 32 {
        bail!(
            "--public-key: an Ed25519 public key is 32 bytes, this is {}",
            key.len()
        );
    }
    Ok(key)
}

/// Milliseconds since the epoch of midnight UTC of `YYYY-MM-DD`.
fn day_start_ms(day: &str) -> anyhow::Result<i64> {
    let parts: Vec<i64> = day
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--day: `{day}` is not YYYY-MM-DD"))?;
    let [year, month, date] = parts[..] else {
        bail!("--day: `{day}` is not YYYY-MM-DD");
    };
    // Days from 1970-01-01 (the civil-from-days inverse, proleptic Gregorian).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + date - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Ok((era * 146_097 + day_of_era - 719_468) * 86_400_000)
}

async fn receipts(args: ReceiptsArgs) -> anyhow::Result<()> {
    let mut audit = args.client.audit().await?;
    let kind = match &args.kind {
        Some(name) => wire::ReceiptKind::from_str_name(&format!("RECEIPT_KIND_{name}"))
            .with_context(|| format!("--kind: `{name}` is not a receipt kind"))?
            as i32,
        None => 0,
    };
    let (from_unix_ms, to_unix_ms) = match &args.day {
        Some(day) => {
            let start = day_start_ms(day)?;
            (start, start + 86_400_000)
        }
        None => (0, 0),
    };
    let mut records = Vec::new();
    let mut page_token = String::new();
    while records.len() < args.limit {
        let page = audit
            .list_receipts(wire::ListReceiptsRequest {
                document_id: args.document.clone(),
                agency: args.about_agency.clone(),
                kind,
                from_unix_ms,
                to_unix_ms,
                page_size: (args.limit - records.len()).min(1000) as u32,
                page_token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        records.extend(page.records);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            for record in &records {
                writeln!(out, "{}", export::record_line(record))?;
            }
        }
        Format::Csv => {
            writeln!(
                out,
                "index,seq,kind,agency,document_id,at_unix_ms,status_code,detail"
            )?;
            for record in &records {
                let r = record.receipt.clone().unwrap_or_default();
                let field = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{}",
                    record.index,
                    r.seq,
                    crate::receipt::kind_name(&r),
                    r.agency,
                    field(&r.document_id),
                    r.at_unix_ms,
                    r.status_code,
                    field(&r.detail)
                )?;
            }
        }
        Format::Table => {
            writeln!(
                out,
                "{:>8} {:>8} {:<16} {:<15} {:<45} {:>14}",
                "INDEX", "SEQ", "KIND", "AGENCY", "DOCUMENT", "AT (ms)"
            )?;
            for record in &records {
                let r = record.receipt.clone().unwrap_or_default();
                writeln!(
                    out,
                    "{:>8} {:>8} {:<16} {:<15} {:<45} {:>14}",
                    record.index,
                    r.seq,
                    crate::receipt::kind_name(&r),
                    r.agency,
                    r.document_id,
                    r.at_unix_ms
                )?;
            }
            writeln!(out, "{} receipts", records.len())?;
        }
    }
    Ok(())
}

async fn export_file(client: ClientArgs, out: PathBuf, from: u64, to: u64) -> anyhow::Result<()> {
    let mut audit = client.audit().await?;
    let info = audit
        .get_ledger_info(wire::GetLedgerInfoRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let previous_chain = if from == 0 {
        ledger::GENESIS
    } else if from == info.archived_before {
        ledger::Hash::try_from(info.archived_chain_hash.as_slice())
            .context("the hub sent an archive chain hash that is not 32 bytes")?
    } else {
        let mut before = audit
            .export_ledger(wire::ExportLedgerRequest {
                from_index: from - 1,
                to_index: from,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        match before.message().await.map_err(status_error)? {
            Some(wire::ExportLedgerItem {
                item: Some(wire::export_ledger_item::Item::Record(record)),
            }) => ledger::Hash::try_from(record.chain_hash.as_slice())
                .context("the hub sent a chain hash that is not 32 bytes")?,
            _ => bail!("the hub has no record {} before --from", from - 1),
        }
    };
    let mut stream = audit
        .export_ledger(wire::ExportLedgerRequest {
            from_index: from,
            to_index: to,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let staged = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&staged)
            .with_context(|| format!("cannot create {}", staged.display()))?,
    );
    writeln!(
        file,
        "{}",
        export::header_line(&info.hub, &info.public_key, from, &previous_chain)
    )?;
    let (mut records, mut checkpoints) = (0u64, 0u64);
    while let Some(item) = stream.message().await.map_err(status_error)? {
        match item.item {
            Some(wire::export_ledger_item::Item::Record(record)) => {
                writeln!(file, "{}", export::record_line(&record))?;
                records += 1;
            }
            Some(wire::export_ledger_item::Item::Checkpoint(checkpoint)) => {
                writeln!(file, "{}", export::checkpoint_json(&checkpoint))?;
                checkpoints += 1;
            }
            None => {}
        }
    }
    file.into_inner()?.sync_all()?;
    std::fs::rename(&staged, &out)?;
    println!(
        "exported {records} records and {checkpoints} checkpoints to {}",
        out.display()
    );
    Ok(())
}

async fn prove(
    client: ClientArgs,
    index: Option<u64>,
    seq: Option<u64>,
    out: PathBuf,
) -> anyhow::Result<()> {
    let mut audit = client.audit().await?;
    let response = audit
        .get_proof(wire::GetProofRequest {
            index: index.unwrap_or(0),
            receipt_seq: seq.unwrap_or(0),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let record = response.record.context("the hub sent no record")?;
    let checkpoint = response.checkpoint.context("the hub sent no checkpoint")?;
    let proof = serde_json::json!({
        "index": record.index,
        "receipt": record.receipt.as_ref().map(export::receipt_json),
        "proof": response.proof.iter().map(hex::encode).collect::<Vec<_>>(),
        "checkpoint": export::checkpoint_json(&checkpoint),
    });
    std::fs::write(&out, format!("{proof:#}\n"))
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "record {} proven against checkpoint {} in {}",
        record.index,
        checkpoint.tree_size,
        out.display()
    );
    Ok(())
}

/// Checks a proof file: the checkpoint's signature, then the path from the receipt's leaf to
/// the checkpoint's root. Returns the index and receipt proven.
pub fn verify_proof(text: &str, public_key: &[u8]) -> anyhow::Result<(u64, wire::Receipt)> {
    let value: serde_json::Value = serde_json::from_str(text).context("the proof is not JSON")?;
    let index = value["index"].as_u64().context("`index` is missing")?;
    let receipt = export::parse_receipt(&value["receipt"]).map_err(anyhow::Error::msg)?;
    let checkpoint = export::parse_checkpoint(&value["checkpoint"]).map_err(anyhow::Error::msg)?;
    if !ledger::checkpoint_signature_valid(&checkpoint, public_key) {
        bail!("the checkpoint's signature does not verify with the public key");
    }
    let proof = value["proof"]
        .as_array()
        .context("`proof` is missing")?
        .iter()
        .map(|h| {
            h.as_str()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|h| ledger::Hash::try_from(h.as_slice()).ok())
                .context("a proof hash is not 32 bytes of hex")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let leaf = ledger::leaf_hash(index, &receipt);
    match ledger::root_from_proof(index, checkpoint.tree_size, &leaf, &proof) {
        Some(root) if root.as_slice() == checkpoint.root_hash => Ok((index, receipt)),
        _ => bail!(
            "the receipt at record {index} is not in the ledger of checkpoint {} (the proof leads elsewhere)",
            checkpoint.tree_size
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_start_at_midnight_utc() {
        assert_eq!(day_start_ms("1970-01-01").expect("day"), 0);
        assert_eq!(day_start_ms("2026-11-27").expect("day"), 1_795_737_600_000);
        assert_eq!(day_start_ms("2000-03-01").expect("day"), 951_868_800_000);
        assert!(day_start_ms("27/11/2026").is_err());
    }
}
