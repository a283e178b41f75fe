//! The operators' use cases: queue statistics, dead letters and their replay, reloading the
//! agency directory, archiving old ledger ranges. Only identities listed in `[access] operators` may call them.

use crate::agency::AgencyCode;
use crate::directory::AgencyDirectory;
use crate::error::HubError;
use crate::hub::{Hub, now_unix_ms};
use crate::identity::{Caller, Role};
use crate::transport::Transport;
use lienthong_proto::v1 as wire;

/// Dead letters listed when the caller gives no limit.
const DEFAULT_LIST_LIMIT: usize = 100;

impl<T: Transport> Hub<T> {
    fn require_operator(&self, caller: &Caller, action: &str) -> Result<(), HubError> {
        if self.config().operators.contains(&caller.agency) || caller.has(Role::Operator) {
            return Ok(());
        }
        Err(HubError::PermissionDenied(format!(
            "{action}: {caller} is not an operator of this hub ([access] operators, or a certificate role operator)"
        )))
    }

    /// Per agency queue statistics, and the outbox depth.
    pub async fn list_queues(&self, caller: &Caller) -> Result<wire::ListQueuesResponse, HubError> {
        self.require_operator(caller, "ListQueues")?;
        let kept = self.store().dead_letters(None, usize::MAX)?;
        let names = crate::transport::TopologyNames::new(self.config().transport.prefix());
        let now = now_unix_ms();
        let (readings, transport_error) = crate::activity::read_queues(self).await?;
        let queues = readings
            .into_iter()
            .map(|reading| {
                let agency = &reading.agency;
                let rates = self.activity().rates(agency.as_str());
                wire::QueueStats {
                    agency: agency.to_string(),
                    queue: names.agency_queue(agency),
                    ready: reading.depth.ready,
                    unacknowledged: reading.unacknowledged,
                    consumers: reading.depth.consumers,
                    dead_letters: kept
                        .iter()
                        .filter(|(_, d)| d.recipient == agency.as_str())
                        .count() as u64,
                    oldest_message_age_ms: reading.oldest().map_or(0, |at| (now - at).max(0)),
                    in_per_second: rates.in_per_second,
                    out_per_second: rates.out_per_second,
                }
            })
            .collect();
        Ok(wire::ListQueuesResponse {
            queues,
            outbox_depth: self.store().outbox_len(),
            dead_letters: kept.len() as u64,
            transport_error: transport_error.unwrap_or_default(),
        })
    }

    /// Dead letters kept by the hub, oldest first.
    pub fn list_dead_letters(
        &self,
        caller: &Caller,
        agency: &str,
        limit: u32,
    ) -> Result<Vec<wire::DeadLetter>, HubError> {
        self.require_operator(caller, "ListDeadLetters")?;
        let agency = parse_optional_agency(agency)?;
        let limit = if limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            limit as usize
        };
        let kept = self
            .store()
            .dead_letters(agency.as_ref().map(AgencyCode::as_str), limit)?;
        Ok(kept
            .into_iter()
            .map(|(id, dead_letter)| wire::DeadLetter {
                id,
                message_id: dead_letter.message_id,
                recipient: dead_letter.recipient,
                document_id: dead_letter.document_id,
                reason: dead_letter.reason,
                dead_lettered_at_unix_ms: dead_letter.dead_lettered_at_unix_ms,
            })
            .collect())
    }

    /// Sends dead letters back to their recipients: one agency's, some documents', or both;
    /// at most `limit` of them (all when 0), oldest first.
    pub async fn replay_dead_letters(
        &self,
        caller: &Caller,
        agency: &str,
        document_ids: &[String],
        limit: u32,
    ) -> Result<wire::ReplayDeadLettersResponse, HubError> {
        self.require_operator(caller, "ReplayDeadLetters")?;
        let agency = parse_optional_agency(agency)?;
        if agency.is_none() && document_ids.is_empty() {
            return Err(HubError::invalid(
                "agency",
                "name an agency or document_ids to say which dead letters to replay",
            ));
        }
        let mut chosen: Vec<u64> = self
            .store()
            .dead_letters(agency.as_ref().map(AgencyCode::as_str), usize::MAX)?
            .into_iter()
            .filter(|(_, d)| document_ids.is_empty() || document_ids.contains(&d.document_id))
            .map(|(id, _)| id)
            .collect();
        let remaining = if limit > 0 && chosen.len() > limit as usize {
            chosen.split_off(limit as usize).len() as u64
        } else {
            0
        };
        let (replayed, receipts) =
            self.store()
                .replay_dead_letters(&chosen, caller.agency.as_str(), now_unix_ms())?;
        self.store().durable().await?;
        self.wake_publisher();
        tracing::info!(operator = %caller, replayed, remaining, "dead letters replayed");
        Ok(wire::ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
            receipts,
            remaining,
        })
    }

    /// Reads the directory file named by the configuration again and installs it.
    pub async fn reload_directory(
        &self,
        caller: &Caller,
    ) -> Result<wire::ReloadDirectoryResponse, HubError> {
        self.require_operator(caller, "ReloadDirectory")?;
        let directory = AgencyDirectory::load(&self.config().directory_file).map_err(|e| {
            HubError::FailedPrecondition(format!("{e}; the directory in use is unchanged"))
        })?;
        let agencies = u32::try_from(directory.len()).unwrap_or(u32::MAX);
        let (added, removed) = self.install_directory(directory).await?;
        tracing::info!(operator = %caller, agencies, added = added.len(), removed = removed.len(), "agency directory reloaded");
        Ok(wire::ReloadDirectoryResponse {
            agencies,
            added: added.iter().map(ToString::to_string).collect(),
            removed: removed.iter().map(ToString::to_string).collect(),
        })
    }

    /// Archives the oldest ledger records into a verified file under `[ledger] archive_dir`.
    pub async fn archive_ledger(
        &self,
        caller: &Caller,
        up_to: u64,
    ) -> Result<wire::ArchiveLedgerResponse, HubError> {
        self.require_operator(caller, "ArchiveLedger")?;
        let store = self.store().clone();
        let dir = self.config().archive_dir.clone();
        let archive = tokio::task::spawn_blocking(move || store.archive_ledger(up_to, &dir))
            .await
            .map_err(|e| HubError::Unavailable(format!("archiving stopped: {e}")))??;
        tracing::info!(operator = %caller, path = %archive.path.display(), from = archive.from, to = archive.to, "ledger range archived");
        Ok(wire::ArchiveLedgerResponse {
            path: archive.path.display().to_string(),
            from_index: archive.from,
            to_index: archive.to,
            checkpoints: archive.checkpoints,
        })
    }
}

fn parse_optional_agency(agency: &str) -> Result<Option<AgencyCode>, HubError> {
    if agency.is_empty() {
        return Ok(None);
    }
    agency
        .parse()
        .map(Some)
        .map_err(|e| HubError::invalid("agency", format!("{e}")))
}
