//! The gRPC face of the hub: `lienthong.v1.DocumentExchange`, the caller's identity, and the
//! conversion of hub results and errors into gRPC responses and statuses.

use crate::agency::AgencyCode;
use crate::error::HubError;
use crate::hub::{AckOutcome, Hub};
use crate::identity::Caller;
use crate::transport::Transport;
use futures_util::Stream;
use lienthong_proto::v1 as wire;
use lienthong_proto::v1::document_exchange_server::DocumentExchange;
use std::pin::Pin;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The most deliveries one `Ack` settles (`AckRequest.ack_tokens`).
pub const MAX_ACK_TOKENS_PER_CALL: usize = 1024;

/// The metadata key that carries the caller's agency code while mutual TLS is not configured.
pub const AGENCY_METADATA_KEY: &str = "x-lienthong-agency";

/// The `DocumentExchange` service over a hub.
#[derive(Debug)]
pub struct ExchangeService<T: Transport> {
    hub: Hub<T>,
    shutdown: CancellationToken,
}

impl<T: Transport> ExchangeService<T> {
    /// `shutdown` ends every open `Receive` stream, so that a graceful stop does not wait on them.
    pub fn new(hub: Hub<T>, shutdown: CancellationToken) -> Self {
        ExchangeService { hub, shutdown }
    }
}

/// The caller's agency: from its client certificate when the connection has one (mutual TLS;
/// the metadata is then ignored), else from the `x-lienthong-agency` metadata.
pub fn caller_identity<R>(request: &Request<R>) -> Result<AgencyCode, HubError> {
    caller(request).map(|caller| caller.agency)
}

/// The caller with the roles its certificate grants (none without TLS).
pub fn caller<R>(request: &Request<R>) -> Result<Caller, HubError> {
    if let Some(certificates) = request.peer_certs()
        && let Some(leaf) = certificates.first()
    {
        return crate::tls::caller_of_certificate(leaf).map_err(HubError::Unauthenticated);
    }
    metadata_identity(request).map(Caller::agency)
}

fn metadata_identity<R>(request: &Request<R>) -> Result<AgencyCode, HubError> {
    let value = request.metadata().get(AGENCY_METADATA_KEY).ok_or_else(|| {
        HubError::Unauthenticated(format!("the `{AGENCY_METADATA_KEY}` metadata is required"))
    })?;
    let value = value
        .to_str()
        .map_err(|_| HubError::Unauthenticated(format!("`{AGENCY_METADATA_KEY}` is not text")))?;
    value
        .parse()
        .map_err(|e| HubError::Unauthenticated(format!("{AGENCY_METADATA_KEY}: {e}")))
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<wire::Delivery, Status>> + Send>>;

#[tonic::async_trait]
impl<T: Transport> DocumentExchange for ExchangeService<T> {
    async fn send(
        &self,
        request: Request<wire::SendRequest>,
    ) -> Result<Response<wire::SendResponse>, Status> {
        let caller = caller_identity(&request)?;
        let outcome = self
            .hub
            .send(&caller, request.into_inner().document)
            .await?;
        Ok(Response::new(wire::SendResponse {
            document_id: outcome.document_id,
            receipts: outcome.receipts,
        }))
    }

    type ReceiveStream = DeliveryStream;

    async fn receive(
        &self,
        request: Request<wire::ReceiveRequest>,
    ) -> Result<Response<DeliveryStream>, Status> {
        let caller = self.hub.admit(&caller(&request)?)?;
        let deliveries = self
            .hub
            .receive(&caller, self.shutdown.child_token())
            .await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(deliveries);
        let stream =
            futures_util::StreamExt::map(stream, |delivery| delivery.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<wire::AckRequest>,
    ) -> Result<Response<wire::AckResponse>, Status> {
        let caller = self.hub.admit(&caller(&request)?)?;
        let wire::AckRequest {
            ack_token,
            reject,
            reason,
            undeliverable,
            ack_tokens,
        } = request.into_inner();
        let outcome = match (reject, undeliverable) {
            (false, false) => AckOutcome::Acknowledged,
            (true, false) => AckOutcome::Rejected { reason: &reason },
            (false, true) => AckOutcome::Undeliverable { reason: &reason },
            (true, true) => {
                return Err(HubError::invalid(
                    "undeliverable",
                    "set either reject or undeliverable, not both",
                )
                .into());
            }
        };
        if ack_tokens.is_empty() {
            self.hub.ack(&caller, &ack_token, outcome).await?;
            return Ok(Response::new(wire::AckResponse::default()));
        }
        if !ack_token.is_empty() {
            return Err(HubError::invalid(
                "ack_token",
                "leave it empty when ack_tokens lists the deliveries",
            )
            .into());
        }
        if ack_tokens.len() > MAX_ACK_TOKENS_PER_CALL {
            return Err(HubError::invalid(
                "ack_tokens",
                format!(
                    "{} tokens; at most {MAX_ACK_TOKENS_PER_CALL} in one call",
                    ack_tokens.len()
                ),
            )
            .into());
        }
        // Polled together, the settlements queue up before the first is recorded, so they
        // share one store transaction and one flush.
        let settled = futures_util::future::join_all(
            ack_tokens
                .iter()
                .map(|ack_token| self.hub.ack(&caller, ack_token, outcome)),
        )
        .await;
        let failures = ack_tokens
            .into_iter()
            .zip(settled)
            .filter_map(|(ack_token, settled)| {
                let status = Status::from(settled.err()?);
                Some(wire::AckFailure {
                    ack_token,
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                })
            })
            .collect();
        Ok(Response::new(wire::AckResponse { failures }))
    }

    async fn report_status(
        &self,
        request: Request<wire::StatusReport>,
    ) -> Result<Response<wire::ReportStatusResponse>, Status> {
        let caller = caller_identity(&request)?;
        let receipts = self
            .hub
            .report_status(&caller, request.into_inner())
            .await?;
        Ok(Response::new(wire::ReportStatusResponse { receipts }))
    }

    async fn track(
        &self,
        request: Request<wire::TrackRequest>,
    ) -> Result<Response<wire::TrackResponse>, Status> {
        let caller = caller_identity(&request)?;
        let response = self.hub.track(&caller, &request.into_inner().document_id)?;
        Ok(Response::new(response))
    }

    async fn forward(
        &self,
        request: Request<wire::ForwardRequest>,
    ) -> Result<Response<wire::ForwardResponse>, Status> {
        let caller = self.hub.admit(&caller(&request)?)?;
        self.hub.forward(&caller, request.into_inner()).await?;
        Ok(Response::new(wire::ForwardResponse {}))
    }
}

/// The `Admin` service over a hub, for operators.
#[derive(Debug)]
pub struct AdminService<T: Transport> {
    hub: Hub<T>,
}

impl<T: Transport> AdminService<T> {
    pub fn new(hub: Hub<T>) -> Self {
        AdminService { hub }
    }
}

#[tonic::async_trait]
impl<T: Transport> lienthong_proto::v1::admin_server::Admin for AdminService<T> {
    async fn list_queues(
        &self,
        request: Request<wire::ListQueuesRequest>,
    ) -> Result<Response<wire::ListQueuesResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(self.hub.list_queues(&caller).await?))
    }

    async fn list_dead_letters(
        &self,
        request: Request<wire::ListDeadLettersRequest>,
    ) -> Result<Response<wire::ListDeadLettersResponse>, Status> {
        let caller = caller(&request)?;
        let wire::ListDeadLettersRequest { agency, limit } = request.into_inner();
        let dead_letters = self.hub.list_dead_letters(&caller, &agency, limit)?;
        Ok(Response::new(wire::ListDeadLettersResponse {
            dead_letters,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<wire::ReplayDeadLettersRequest>,
    ) -> Result<Response<wire::ReplayDeadLettersResponse>, Status> {
        let caller = caller(&request)?;
        let wire::ReplayDeadLettersRequest {
            agency,
            document_ids,
            limit,
        } = request.into_inner();
        Ok(Response::new(
            self.hub
                .replay_dead_letters(&caller, &agency, &document_ids, limit)
                .await?,
        ))
    }

    async fn reload_directory(
        &self,
        request: Request<wire::ReloadDirectoryRequest>,
    ) -> Result<Response<wire::ReloadDirectoryResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(self.hub.reload_directory(&caller).await?))
    }

    async fn archive_ledger(
        &self,
        request: Request<wire::ArchiveLedgerRequest>,
    ) -> Result<Response<wire::ArchiveLedgerResponse>, Status> {
        let caller = caller(&request)?;
        let up_to = request.into_inner().up_to;
        Ok(Response::new(
            self.hub.archive_ledger(&caller, up_to).await?,
        ))
    }
}

/// The `Audit` service over a hub: the receipt ledger, read-only.
#[derive(Debug)]
pub struct AuditService<T: Transport> {
    hub: Hub<T>,
}

impl<T: Transport> AuditService<T> {
    pub fn new(hub: Hub<T>) -> Self {
        AuditService { hub }
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<wire::ExportLedgerItem, Status>> + Send>>;

#[tonic::async_trait]
impl<T: Transport> lienthong_proto::v1::audit_server::Audit for AuditService<T> {
    async fn list_receipts(
        &self,
        request: Request<wire::ListReceiptsRequest>,
    ) -> Result<Response<wire::ListReceiptsResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(
            self.hub.list_receipts(&caller, request.into_inner())?,
        ))
    }

    async fn get_proof(
        &self,
        request: Request<wire::GetProofRequest>,
    ) -> Result<Response<wire::GetProofResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(
            self.hub
                .receipt_proof(&caller, request.into_inner())
                .await?,
        ))
    }

    async fn verify_ledger(
        &self,
        request: Request<wire::VerifyLedgerRequest>,
    ) -> Result<Response<wire::VerifyLedgerResponse>, Status> {
        let caller = caller(&request)?;
        let wire::VerifyLedgerRequest {
            from_index,
            to_index,
        } = request.into_inner();
        let hub = self.hub.clone();
        // Verification reads the whole range; keep it off the async workers.
        let response =
            tokio::task::spawn_blocking(move || hub.verify_ledger(&caller, from_index, to_index))
                .await
                .map_err(|e| Status::internal(format!("verification stopped: {e}")))??;
        Ok(Response::new(response))
    }

    type ExportLedgerStream = ExportStream;

    async fn export_ledger(
        &self,
        request: Request<wire::ExportLedgerRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let caller = caller(&request)?;
        let wire::ExportLedgerRequest {
            from_index,
            to_index,
        } = request.into_inner();
        let (from, to) = self.hub.export_range(&caller, from_index, to_index)?;
        let store = self.hub.store().clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let checkpoints = match store.ledger_checkpoints(from, to) {
                Ok(checkpoints) => checkpoints,
                Err(error) => {
                    let _ = sender.send(Err(Status::from(HubError::from(error)))).await;
                    return;
                }
            };
            let mut checkpoints = checkpoints.into_iter().peekable();
            for index in from..to {
                let item = match store.ledger_record(index) {
                    Ok(Some(record)) => Ok(wire::ExportLedgerItem {
                        item: Some(wire::export_ledger_item::Item::Record(record)),
                    }),
                    Ok(None) => Err(Status::internal(format!(
                        "ledger record {index} is missing"
                    ))),
                    Err(error) => Err(Status::from(HubError::from(error))),
                };
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    return;
                }
                while let Some(checkpoint) = checkpoints.next_if(|c| c.tree_size == index + 1) {
                    let item = wire::ExportLedgerItem {
                        item: Some(wire::export_ledger_item::Item::Checkpoint(checkpoint)),
                    };
                    if sender.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn get_ledger_info(
        &self,
        request: Request<wire::GetLedgerInfoRequest>,
    ) -> Result<Response<wire::GetLedgerInfoResponse>, Status> {
        caller(&request)?;
        Ok(Response::new(self.hub.ledger_info()?))
    }
}
