//! The auditors' use cases over the receipt ledger: list receipts, prove one, verify a range,
//! export. Auditors (`[access] auditors`) read everything; an agency may list the receipts of a
//! document it sent or received, and get their proofs; nobody can change anything here.

use crate::agency::AgencyCode;
use crate::error::HubError;
use crate::hub::Hub;
use crate::identity::{Caller, Role};
use crate::store::ReceiptFilter;
use crate::transport::Transport;
use lienthong_proto::v1 as wire;

/// Receipts per page when the caller gives no page size, and the most it may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

impl<T: Transport> Hub<T> {
    fn is_auditor(&self, caller: &Caller) -> bool {
        self.config().auditors.contains(&caller.agency) || caller.has(Role::Auditor)
    }

    fn require_auditor(&self, caller: &Caller, action: &str) -> Result<(), HubError> {
        if self.is_auditor(caller) {
            return Ok(());
        }
        Err(HubError::PermissionDenied(format!(
            "{action}: {caller} is not an auditor of this hub ([access] auditors)"
        )))
    }

    /// Whether `caller` sent or received `document_id`.
    fn is_party_to(&self, caller: &AgencyCode, document_id: &str) -> Result<bool, HubError> {
        Ok(self.store().document(document_id)?.is_some_and(|document| {
            document.from == caller.as_str() || document.to.iter().any(|to| to == caller.as_str())
        }))
    }

    /// One page of receipts matching the request.
    pub fn list_receipts(
        &self,
        caller: &Caller,
        request: wire::ListReceiptsRequest,
    ) -> Result<wire::ListReceiptsResponse, HubError> {
        let filter = ReceiptFilter {
            document_id: Some(request.document_id).filter(|d| !d.is_empty()),
            agency: Some(request.agency).filter(|a| !a.is_empty()),
            kind: Some(request.kind).filter(|k| *k != 0),
            from_unix_ms: Some(request.from_unix_ms).filter(|t| *t != 0),
            to_unix_ms: Some(request.to_unix_ms).filter(|t| *t != 0),
        };
        if !self.is_auditor(caller) {
            let allowed = match &filter.document_id {
                Some(document_id) => self.is_party_to(&caller.agency, document_id)?,
                None => false,
            };
            if !allowed {
                return Err(HubError::PermissionDenied(format!(
                    "ListReceipts: {caller} is not an auditor; an agency may list only the receipts of a document_id it sent or received"
                )));
            }
        }
        let page = match request.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(hex::decode(&request.page_token).map_err(|_| {
                HubError::invalid("page_token", "not a token from a previous response")
            })?)
        };
        let (records, next) = self
            .store()
            .ledger_records(&filter, after.as_deref(), page)?;
        Ok(wire::ListReceiptsResponse {
            records,
            next_page_token: next.map(hex::encode).unwrap_or_default(),
        })
    }

    /// A record with its inclusion proof against the newest checkpoint.
    pub async fn receipt_proof(
        &self,
        caller: &Caller,
        request: wire::GetProofRequest,
    ) -> Result<wire::GetProofResponse, HubError> {
        let index = if request.receipt_seq != 0 {
            self.store()
                .ledger_index_of(request.receipt_seq)?
                .ok_or_else(|| {
                    HubError::NotFound(format!(
                        "receipt_seq: receipt #{} is not in the ledger (yet)",
                        request.receipt_seq
                    ))
                })?
        } else {
            request.index
        };
        let archived_before = self.store().archived_before()?;
        let record = self.store().ledger_record(index)?.ok_or_else(|| {
            if index < archived_before {
                HubError::NotFound(format!(
                    "index: record {index} is archived in a file under [ledger] archive_dir (records before {archived_before}); it verifies there with `lienthong audit verify`"
                ))
            } else {
                HubError::NotFound(format!("index: the ledger has no record {index}"))
            }
        })?;
        if !self.is_auditor(caller) {
            let document_id = record
                .receipt
                .as_ref()
                .map(|r| r.document_id.clone())
                .unwrap_or_default();
            if !self.is_party_to(&caller.agency, &document_id)? {
                return Err(HubError::PermissionDenied(format!(
                    "GetProof: {caller} is neither an auditor nor a party to document {document_id}"
                )));
            }
        }
        // A record newer than the last checkpoint gets one signed now.
        let covered = self
            .store()
            .newest_checkpoint()?
            .is_some_and(|c| c.tree_size > index);
        if !covered {
            self.store().checkpoint().await?;
        }
        let (record, proof, checkpoint) = self.store().ledger_proof(index)?.ok_or_else(|| {
            HubError::NotFound(format!("index: no checkpoint covers record {index} yet"))
        })?;
        Ok(wire::GetProofResponse {
            record: Some(record),
            proof: proof.iter().map(|h| h.to_vec()).collect(),
            checkpoint: Some(checkpoint),
        })
    }

    /// Re-verifies `[from, to)` of the ledger (the whole of it when `to` is 0).
    pub fn verify_ledger(
        &self,
        caller: &Caller,
        from: u64,
        to: u64,
    ) -> Result<wire::VerifyLedgerResponse, HubError> {
        self.require_auditor(caller, "VerifyLedger")?;
        let to = if to == 0 { u64::MAX } else { to };
        let verification = self.store().verify_ledger(from, to)?;
        let (first_bad_index, problem) = verification.problem.clone().unwrap_or_default();
        Ok(wire::VerifyLedgerResponse {
            ok: verification.problem.is_none(),
            records_checked: verification.records_checked,
            checkpoints_checked: verification.checkpoints_checked,
            first_bad_index,
            problem,
        })
    }

    /// The range an export covers: up to the newest checkpoint unless `to` says otherwise.
    pub fn export_range(
        &self,
        caller: &Caller,
        from: u64,
        to: u64,
    ) -> Result<(u64, u64), HubError> {
        self.require_auditor(caller, "ExportLedger")?;
        let archived_before = self.store().archived_before()?;
        if from < archived_before {
            return Err(HubError::FailedPrecondition(format!(
                "from_index: records before {archived_before} are archived in files under [ledger] archive_dir; export from {archived_before}"
            )));
        }
        let checkpointed = self.store().newest_checkpoint()?.map_or(0, |c| c.tree_size);
        let to = if to == 0 {
            checkpointed
        } else {
            to.min(self.store().ledger_size())
        };
        Ok((from.min(to), to))
    }

    /// The public key and the newest checkpoint; for any caller.
    pub fn ledger_info(&self) -> Result<wire::GetLedgerInfoResponse, HubError> {
        let archived_before = self.store().archived_before()?;
        Ok(wire::GetLedgerInfoResponse {
            hub: self.config().hub_code.to_string(),
            public_key: self.store().ledger_public_key(),
            size: self.store().ledger_size(),
            checkpoint: self.store().newest_checkpoint()?,
            archived_before,
            archived_chain_hash: self.store().chain_before(archived_before)?.to_vec(),
        })
    }
}
