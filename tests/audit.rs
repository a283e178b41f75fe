//! The auditors' view of the receipt ledger, end to end: an export verified offline and each way
//! of tampering with it found at its position; inclusion proofs; the Audit service's access rules;
//! the ledger intact across a restart.

mod support;

use lienthong::ledger::{self, export};
use lienthong_proto::v1 as wire;
use std::path::Path;
use support::*;
use tonic::Code;

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read the export")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The line (0-based) holding record `index`.
fn line_of_record(lines: &[String], index: u64) -> usize {
    lines
        .iter()
        .position(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["type"] == "record" && v["index"] == index)
        })
        .expect("the record is in the export")
}

fn verify(lines: &[String], key: &[u8]) -> Result<export::Verified, export::Problem> {
    export::verify(&lines.join("\n"), key)
}

#[tokio::test]
async fn every_way_of_tampering_with_an_export_is_found_where_it_happened() {
    let options = HubOptions {
        checkpoint_every: 8,
        ..HubOptions::new(TransportKind::Embedded)
    };
    let hub = TestHub::start("ledger-export", options).await;
    exchange_some_documents(&hub.endpoint, 6).await;
    let info = settled_ledger(&hub.endpoint).await;
    assert!(info.size >= 24, "4 receipts per document: {}", info.size);

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("ledger.jsonl");
    stdout_of(
        &lienthong(&[
            "audit",
            "export",
            "--endpoint",
            &hub.endpoint,
            "--as",
            AUDITOR,
            "--out",
            file.to_str().expect("path"),
        ])
        .await,
    );
    let key_hex = hex::encode(&info.public_key);
    let said = verify_exported_ledger(&file, &key_hex).await;
    assert!(
        said.contains(&format!("ok: {} records", info.size)),
        "{said}"
    );

    let lines = lines_of(&file);
    let key = info.public_key.clone();
    let checkpoint_lines: Vec<usize> = (0..lines.len())
        .filter(|&n| lines[n].contains(r#""type":"checkpoint""#))
        .collect();
    assert!(checkpoint_lines.len() >= 3, "checkpoints every 8 records");
    assert_eq!(verify(&lines, &key).expect("intact").records, info.size);

    // A flipped byte in record 5: found at record 5.
    let mut flipped = lines.clone();
    let at = line_of_record(&lines, 5);
    flipped[at] = flipped[at].replacen(DISTRICT, "000.00.32.H53", 1);
    assert_ne!(flipped[at], lines[at]);
    let problem = verify(&flipped, &key).expect_err("a changed record");
    assert_eq!(
        (problem.line, problem.index),
        (at + 1, Some(5)),
        "{problem}"
    );
    assert!(problem.message.contains("changed"), "{problem}");
    // The same through the command line: exit status and the position in the message.
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, flipped.join("\n")).expect("write");
    let refused = lienthong(&[
        "audit",
        "verify",
        tampered.to_str().expect("path"),
        "--public-key",
        &key_hex,
    ])
    .await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("record 5"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // A record removed: found where it is missing.
    let mut dropped = lines.clone();
    dropped.remove(line_of_record(&lines, 7));
    let problem = verify(&dropped, &key).expect_err("a removed record");
    assert_eq!(problem.index, Some(7), "{problem}");

    // Two records swapped.
    let mut swapped = lines.clone();
    let (a, b) = (line_of_record(&lines, 10), line_of_record(&lines, 11));
    swapped.swap(a, b);
    let problem = verify(&swapped, &key).expect_err("swapped records");
    assert_eq!(problem.index, Some(10), "{problem}");

    // A record inserted (a copy of record 2 after record 12).
    let mut inserted = lines.clone();
    inserted.insert(
        line_of_record(&lines, 12) + 1,
        lines[line_of_record(&lines, 2)].clone(),
    );
    let problem = verify(&inserted, &key).expect_err("an inserted record");
    assert_eq!(problem.index, Some(13), "{problem}");

    // A forged checkpoint signature.
    let mut forged = lines.clone();
    let at = checkpoint_lines[1];
    let mut checkpoint: serde_json::Value = serde_json::from_str(&forged[at]).expect("json");
    let signature = checkpoint["signature"]
        .as_str()
        .expect("signature")
        .to_owned();
    let flipped_digit = if signature.starts_with('0') { "1" } else { "0" };
    checkpoint["signature"] = format!("{flipped_digit}{}", &signature[1..]).into();
    forged[at] = checkpoint.to_string();
    let problem = verify(&forged, &key).expect_err("a forged signature");
    assert_eq!(problem.line, at + 1, "{problem}");
    assert!(problem.message.contains("signature"), "{problem}");

    // A rewrite that recomputes every chain hash after a changed record cannot re-sign: the next
    // checkpoint says the records before it are not the ones it signed.
    let mut rewritten = lines.clone();
    let mut chain = ledger::GENESIS;
    for line in rewritten.iter_mut() {
        let mut value: serde_json::Value = serde_json::from_str(line).expect("json");
        if value["type"] != "record" {
            continue;
        }
        let index = value["index"].as_u64().expect("index");
        if index == 3 {
            value["receipt"]["detail"] = "nothing happened".into();
        }
        let receipt = export::parse_receipt(&value["receipt"]).expect("receipt");
        chain = ledger::chain_hash(&chain, &ledger::leaf_hash(index, &receipt));
        value["chain_hash"] = hex::encode(chain).into();
        *line = value.to_string();
    }
    let problem = verify(&rewritten, &key).expect_err("a rewritten history");
    let first_checkpoint_after_3 = *checkpoint_lines
        .iter()
        .find(|&&n| {
            let checkpoint: serde_json::Value = serde_json::from_str(&lines[n]).expect("json");
            checkpoint["tree_size"].as_u64().expect("size") > 3
        })
        .expect("a checkpoint after record 3");
    assert_eq!(problem.line, first_checkpoint_after_3 + 1, "{problem}");
    assert!(
        problem.message.contains("differ from those it signed"),
        "{problem}"
    );

    // Another hub's key verifies nothing.
    let other_key = vec![7u8; 32];
    assert!(
        verify(&lines, &other_key)
            .expect_err("wrong key")
            .message
            .contains("signature")
    );
    hub.finish().await;
}

#[tokio::test]
async fn a_proof_verifies_offline_and_a_wrong_one_fails() {
    let hub = TestHub::start("ledger-proof", HubOptions::new(TransportKind::Embedded)).await;
    let ids = exchange_some_documents(&hub.endpoint, 3).await;
    let info = settled_ledger(&hub.endpoint).await;
    let mut commune = hub.client(COMMUNE).await;
    let acknowledged = track(&mut commune, &ids[1]).await.recipients[0]
        .receipts
        .iter()
        .find(|r| r.kind() == wire::ReceiptKind::Acknowledged)
        .expect("acknowledged")
        .seq;

    let dir = tempfile::tempdir().expect("dir");
    let proof = dir.path().join("proof.json");
    // The sender itself may prove a receipt of its document.
    stdout_of(
        &lienthong(&[
            "audit",
            "prove",
            "--endpoint",
            &hub.endpoint,
            "--as",
            COMMUNE,
            "--seq",
            &acknowledged.to_string(),
            "--out",
            proof.to_str().expect("path"),
        ])
        .await,
    );
    let key = hex::encode(&info.public_key);
    let said = stdout_of(
        &lienthong(&[
            "audit",
            "verify-proof",
            proof.to_str().expect("path"),
            "--public-key",
            &key,
        ])
        .await,
    );
    assert!(
        said.contains("ACKNOWLEDGED") && said.contains(&ids[1]),
        "{said}"
    );

    let text = std::fs::read_to_string(&proof).expect("read the proof");
    let altered = text.replacen(&ids[1], &ids[0], 1);
    let error = lienthong::cli::audit::verify_proof(&altered, &info.public_key)
        .expect_err("a proof of another receipt");
    assert!(error.to_string().contains("not in the ledger"), "{error}");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
    value["index"] = (value["index"].as_u64().expect("index") + 1).into();
    assert!(lienthong::cli::audit::verify_proof(&value.to_string(), &info.public_key).is_err());
    assert!(lienthong::cli::audit::verify_proof(&text, &[9u8; 32]).is_err());

    // A stranger to the document may not.
    let denied = audit_client(&hub.endpoint, COMMUNE_2)
        .await
        .get_proof(wire::GetProofRequest {
            index: 0,
            receipt_seq: acknowledged,
        })
        .await
        .expect_err("not a party");
    assert_eq!(denied.code(), Code::PermissionDenied);
    hub.finish().await;
}

#[tokio::test]
async fn the_audit_service_answers_auditors_and_parties_only() {
    let hub = TestHub::start("ledger-access", HubOptions::new(TransportKind::Embedded)).await;
    let ids = exchange_some_documents(&hub.endpoint, 2).await;
    settled_ledger(&hub.endpoint).await;
    let mut auditor = audit_client(&hub.endpoint, AUDITOR).await;
    let all = auditor
        .list_receipts(wire::ListReceiptsRequest {
            page_size: 3,
            ..Default::default()
        })
        .await
        .expect("an auditor lists everything")
        .into_inner();
    assert_eq!(all.records.len(), 3);
    assert!(!all.next_page_token.is_empty());
    let next = auditor
        .list_receipts(wire::ListReceiptsRequest {
            page_size: 3,
            page_token: all.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("the next page")
        .into_inner();
    assert_eq!(next.records[0].index, 3, "pages follow each other");
    let by_agency = auditor
        .list_receipts(wire::ListReceiptsRequest {
            agency: DISTRICT.into(),
            kind: wire::ReceiptKind::Acknowledged as i32,
            ..Default::default()
        })
        .await
        .expect("by agency and kind")
        .into_inner();
    assert_eq!(by_agency.records.len(), 2);
    let verified = auditor
        .verify_ledger(wire::VerifyLedgerRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert!(
        verified.records_checked >= 8 && verified.checkpoints_checked >= 1,
        "{verified:?}"
    );

    let mut sender = audit_client(&hub.endpoint, COMMUNE).await;
    let own = sender
        .list_receipts(wire::ListReceiptsRequest {
            document_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .expect("the sender lists its document's receipts")
        .into_inner();
    assert_eq!(
        own.records.len(),
        4,
        "accepted, enqueued, delivered, acknowledged"
    );
    for request in [
        wire::ListReceiptsRequest::default(),
        wire::ListReceiptsRequest {
            agency: DISTRICT.into(),
            ..Default::default()
        },
    ] {
        let denied = sender
            .list_receipts(request)
            .await
            .expect_err("not an auditor");
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(denied.message().contains(COMMUNE), "{}", denied.message());
    }
    let mut neighbour = audit_client(&hub.endpoint, COMMUNE_2).await;
    let denied = neighbour
        .list_receipts(wire::ListReceiptsRequest {
            document_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .expect_err("not a party to the document");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = sender
        .verify_ledger(wire::VerifyLedgerRequest::default())
        .await
        .expect_err("agencies do not verify the ledger");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = sender
        .export_ledger(wire::ExportLedgerRequest::default())
        .await
        .expect_err("agencies do not export the ledger");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let operator_is_not_auditor = audit_client(&hub.endpoint, PROVINCE)
        .await
        .verify_ledger(wire::VerifyLedgerRequest::default())
        .await
        .expect_err("operators are not auditors");
    assert_eq!(operator_is_not_auditor.code(), Code::PermissionDenied);
    hub.finish().await;
}

#[tokio::test]
async fn the_ledger_continues_intact_after_a_restart() {
    let hub = TestHub::start("ledger-restart", HubOptions::new(TransportKind::Embedded)).await;
    exchange_some_documents(&hub.endpoint, 2).await;
    let before = settled_ledger(&hub.endpoint).await;
    let files = hub.stop().await;
    let hub = TestHub::start_with(files, HubOptions::new(TransportKind::Embedded)).await;
    exchange_some_documents(&hub.endpoint, 2).await;
    let after = settled_ledger(&hub.endpoint).await;
    assert_eq!(
        after.public_key, before.public_key,
        "the key is kept in the data directory"
    );
    assert!(
        after.size >= before.size + 8,
        "{} then {}",
        before.size,
        after.size
    );
    let verified = verify_ledger(&hub.endpoint).await;
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, after.size);
    hub.finish().await;
}

/// The recall flow and a revocation, as the ledger and `Track` show them: the recall request
/// (`13`) from the sender and its answer (`15`) are receipts of the original; the revoking
/// document names the original and `Track` on the original lists it.
#[tokio::test]
async fn recalls_and_revocations_are_visible_on_the_original() {
    let hub = TestHub::start("ledger-flows", HubOptions::new(TransportKind::Embedded)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let original = send(&mut commune, document(COMMUNE, &[DISTRICT], "quyết định")).await;
    let report = |from: &str, code: &str| wire::StatusReport {
        document_id: original.clone(),
        status_code: code.into(),
        description: format!("{code} from {from}"),
        ..Default::default()
    };
    commune
        .report_status(report(COMMUNE, "13"))
        .await
        .expect("the sender requests a recall");
    district
        .report_status(report(DISTRICT, "15"))
        .await
        .expect("the recipient agrees");
    let mut revocation = document(COMMUNE, &[DISTRICT], "thu hồi quyết định");
    revocation.business_type = wire::BusinessType::Revoke as i32;
    revocation.references_document_id = original.clone();
    let revoking = send(&mut commune, revocation).await;

    let trace = track(&mut commune, &original).await;
    assert_eq!(trace.referenced_by.len(), 1, "{trace:?}");
    let reference = &trace.referenced_by[0];
    assert_eq!(reference.document_id, revoking);
    assert_eq!(reference.business_type(), wire::BusinessType::Revoke);
    assert_eq!(reference.from, COMMUNE);

    settled_ledger(&hub.endpoint).await;
    let statuses = audit_client(&hub.endpoint, AUDITOR)
        .await
        .list_receipts(wire::ListReceiptsRequest {
            document_id: original.clone(),
            kind: wire::ReceiptKind::StatusReported as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let flow: Vec<(String, String)> = statuses
        .records
        .iter()
        .filter_map(|r| r.receipt.as_ref())
        .map(|r| (r.status_code.clone(), r.reported_by.clone()))
        .collect();
    assert_eq!(
        flow,
        [
            ("13".to_owned(), COMMUNE.to_owned()),
            ("15".to_owned(), DISTRICT.to_owned())
        ]
    );
    hub.finish().await;
}

/// An archived range leaves the database for a file that verifies on its own; what stays in
/// the database still verifies, exports from the archive mark, and grows.
#[tokio::test]
async fn an_archived_range_verifies_from_its_file_and_the_rest_from_the_hub() {
    let options = HubOptions {
        checkpoint_every: 8,
        ..HubOptions::new(TransportKind::Embedded)
    };
    let hub = TestHub::start("ledger-archive", options).await;
    exchange_some_documents(&hub.endpoint, 5).await;
    let info = settled_ledger(&hub.endpoint).await;
    assert!(info.size >= 20, "{}", info.size);
    let key = hex::encode(&info.public_key);

    let denied = archive_ledger(&hub.endpoint, COMMUNE, 12).await;
    assert!(!denied.status.success(), "only operators archive");
    let said = stdout_of(&archive_ledger(&hub.endpoint, PROVINCE, 12).await);
    let archive = hub
        .files
        .data_dir()
        .join("ledger-archive/ledger-000000000000-000000000008.jsonl");
    assert!(
        said.contains("archived records 0..8"),
        "up to the checkpoint at 8: {said}"
    );
    let said = verify_exported_ledger(&archive, &key).await;
    assert!(said.contains("ok: 8 records"), "{said}");

    let mut auditor = audit_client(&hub.endpoint, AUDITOR).await;
    let gone = auditor
        .get_proof(wire::GetProofRequest {
            index: 3,
            receipt_seq: 0,
        })
        .await
        .expect_err("record 3 is archived");
    assert_eq!(gone.code(), Code::NotFound);
    assert!(gone.message().contains("archived"), "{}", gone.message());
    let listed = auditor
        .list_receipts(wire::ListReceiptsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.records[0].index, 8,
        "listing starts after the archive"
    );

    exchange_some_documents(&hub.endpoint, 2).await;
    let after = settled_ledger(&hub.endpoint).await;
    assert_eq!(after.archived_before, 8);
    let check = auditor
        .verify_ledger(wire::VerifyLedgerRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(check.ok, "{check:?}");
    assert_eq!(check.records_checked, after.size - 8);

    let rest = hub.files.dir.path().join("rest.jsonl");
    stdout_of(
        &lienthong(&[
            "audit",
            "export",
            "--endpoint",
            &hub.endpoint,
            "--as",
            AUDITOR,
            "--from",
            "8",
            "--out",
            rest.to_str().expect("path"),
        ])
        .await,
    );
    verify_exported_ledger(&rest, &key).await;
    hub.finish().await;
}
