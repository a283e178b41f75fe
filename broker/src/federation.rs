//! Hub federation: where a message goes from this hub, what other hubs may hand over
//! (`Forward`), the relay that sends receipts back towards remote senders, and the uplink
//! connector's view of this hub.
//!
//! A hub keeps one queue per agency it serves and one per neighbouring hub, named by that hub's
//! code: a province hub's queue of the central hub holds everything leaving the province; a
//! central hub's queue of a province hub holds everything for that province. A hub's own
//! `Receive` stream carries its queue here, and it hands messages over with `Forward`. Each
//! hand-over is settled only once the next hub has the message on disk (a FORWARDED receipt).

use crate::agency::AgencyCode;
use crate::config::{Config, HubRole};
use crate::directory::AgencyDirectory;
use crate::document::Document;
use crate::error::HubError;
use crate::hub::{AckOutcome, Hub, now_unix_ms};
use crate::identity::{Caller, Role};
use crate::receipt::ReceiptKind;
use crate::status::{Reporter, StatusCode};
use crate::store::{Acceptance, arrival_key};
use crate::transport::Transport;
use lienthong_connectors::uplink::{LocalHub, UplinkLink};
use lienthong_proto::v1 as wire;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often the relay looks for new receipts to send back.
const RELAY_TICK: Duration = Duration::from_millis(50);
/// Ledger records the relay reads per transaction.
const RELAY_BATCH: u64 = 512;
/// The receipts that travel back to a remote sender: what happened to its document beyond
/// this hub. ACCEPTED and ENQUEUED stay where they were written; status reports travel as
/// messages of their own.
const RELAYED_KINDS: [ReceiptKind; 6] = [
    ReceiptKind::Forwarded,
    ReceiptKind::Delivered,
    ReceiptKind::Acknowledged,
    ReceiptKind::Rejected,
    ReceiptKind::DeadLettered,
    ReceiptKind::Replayed,
];

/// Where a message for one agency goes from this hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The agency's own queue here.
    Local,
    /// The queue of the next hub on the agency's way.
    Via(AgencyCode),
}

/// The queues a hub keeps for its neighbouring hubs, besides those of its agencies.
pub fn neighbour_queues(config: &Config) -> Vec<AgencyCode> {
    let federation = &config.federation;
    federation
        .uplink
        .iter()
        .map(|uplink| uplink.hub.clone())
        .chain(federation.peers.iter().map(|peer| peer.identity.clone()))
        .collect()
}

impl<T: Transport> Hub<T> {
    /// Where a message for `recipient` goes from here; `None` when no hub known here serves it.
    pub fn route(&self, recipient: &AgencyCode) -> Option<Route> {
        self.route_in(&self.directory(), recipient).ok()
    }

    /// Where a message for `recipient` goes from here, or why no hub known here serves it
    /// (for the caller).
    pub(crate) fn route_in(
        &self,
        directory: &AgencyDirectory,
        recipient: &AgencyCode,
    ) -> Result<Route, String> {
        if directory.contains(recipient) {
            return Ok(Route::Local);
        }
        let config = self.config();
        let federation = &config.federation;
        match federation.role {
            // Agencies of this province are all in the directory: a code that is not is unknown.
            HubRole::Province if recipient.province() == config.hub_code.province() => Err(
                format!("agency {recipient} is not in the hub's directory"),
            ),
            HubRole::Province => federation
                .uplink
                .as_ref()
                .map(|uplink| Route::Via(uplink.hub.clone()))
                .ok_or_else(|| format!(
                    "agency {recipient} is not in the hub's directory, and this hub has no uplink ([uplink]) to the central hub"
                )),
            HubRole::Central => federation
                .peers
                .iter()
                .find(|peer| peer.province == recipient.province())
                .map(|peer| Route::Via(peer.identity.clone()))
                .ok_or_else(|| format!(
                    "agency {recipient} is not in the hub's directory, and no province hub ([[peer]]) serves province {}",
                    recipient.province()
                )),
        }
    }

    /// The routing key a message for `recipient` is published with: the queue it goes to.
    pub fn routing_key_of(&self, recipient: &str) -> String {
        match recipient.parse().ok().and_then(|code| self.route(&code)) {
            Some(Route::Via(hub)) => hub.to_string(),
            Some(Route::Local) | None => recipient.to_owned(),
        }
    }

    /// Whether `code` is a hub this hub exchanges with (its uplink, or a peer it serves).
    pub fn is_neighbour(&self, code: &AgencyCode) -> bool {
        let federation = &self.config().federation;
        federation.uplink.as_ref().is_some_and(|u| &u.hub == code)
            || federation.peers.iter().any(|p| &p.identity == code)
    }

    /// Whether the stream of `holder` carries messages for `recipient`: its own, or, for a
    /// neighbouring hub, those routed through it.
    pub(crate) fn holds_for(&self, holder: &AgencyCode, recipient: &AgencyCode) -> bool {
        recipient == holder
            || (self.is_neighbour(holder)
                && self.route(recipient) == Some(Route::Via(holder.clone())))
    }

    /// The identity a gRPC caller acts as on `DocumentExchange`. A peer hub's identity needs the
    /// `hub` role under mutual TLS; the uplink's identity is this hub's own business.
    pub fn admit(&self, caller: &Caller) -> Result<AgencyCode, HubError> {
        let config = self.config();
        let federation = &config.federation;
        if federation
            .uplink
            .as_ref()
            .is_some_and(|uplink| uplink.hub == caller.agency)
        {
            return Err(HubError::PermissionDenied(format!(
                "identity {} is this hub's uplink hub; its queue here is read only by this hub",
                caller.agency
            )));
        }
        let is_peer = federation.peers.iter().any(|p| p.identity == caller.agency);
        if is_peer && config.tls.is_some() && !caller.has(Role::Hub) {
            return Err(HubError::PermissionDenied(format!(
                "identity {} is a peer hub; its certificate must carry the role {}hub",
                caller.agency,
                crate::identity::ROLE_URI_PREFIX
            )));
        }
        Ok(caller.agency.clone())
    }

    /// Whether `from_hub` may hand over messages that `agency` sent or reported: a peer for
    /// the agencies of its province, the uplink for agencies outside this hub's province. The
    /// refusal names `what` of `agency` the hub may not hand over ("documents sent by" …).
    fn speaks_for(
        &self,
        from_hub: &AgencyCode,
        agency: &AgencyCode,
        what: &str,
    ) -> Result<(), HubError> {
        let config = self.config();
        let federation = &config.federation;
        let allowed = match federation.peers.iter().find(|p| &p.identity == from_hub) {
            Some(peer) => agency.province() == peer.province,
            None => {
                federation
                    .uplink
                    .as_ref()
                    .is_some_and(|u| &u.hub == from_hub)
                    && agency.province() != config.hub_code.province()
            }
        };
        if allowed {
            return Ok(());
        }
        Err(HubError::PermissionDenied(format!(
            "Forward: hub {from_hub} may not hand over {what} {agency}"
        )))
    }

    /// Takes one message another hub hands over (`Forward`), durably, once per (hub, message,
    /// recipient). Refusals for good (unknown recipient, a loop, a document that does not
    /// validate) travel back to the sender as a REJECTED receipt.
    pub async fn forward(
        &self,
        from_hub: &AgencyCode,
        request: wire::ForwardRequest,
    ) -> Result<(), HubError> {
        if !self.is_neighbour(from_hub) {
            return Err(HubError::PermissionDenied(format!(
                "Forward: identity {from_hub} is not a hub this hub exchanges with ([[peer]])"
            )));
        }
        self.check_disk_floor()?;
        let wire::ForwardRequest {
            message_id,
            recipient,
            payload,
        } = request;
        let recipient: AgencyCode = recipient
            .parse()
            .map_err(|e| HubError::invalid("recipient", format!("{e}")))?;
        if message_id.is_empty() || message_id.len() > 512 {
            return Err(HubError::invalid(
                "message_id",
                "must be 1 to 512 bytes long",
            ));
        }
        match self.route_in(&self.directory(), &recipient) {
            Err(reason) => return Err(HubError::NotFound(format!("recipient: {reason}"))),
            Ok(Route::Via(next)) if &next == from_hub => {
                return Err(HubError::FailedPrecondition(format!(
                    "recipient: agency {recipient} is reached through hub {from_hub} itself; refusing a routing loop"
                )));
            }
            Ok(_) => {}
        }
        let now = now_unix_ms();
        let store = self.store();
        match payload {
            Some(wire::forward_request::Payload::Document(document)) => {
                if document.document_id.is_empty() {
                    return Err(HubError::invalid(
                        "document.document_id",
                        "a forwarded document keeps the id its origin gave it",
                    ));
                }
                let mut document = Document::from_wire(document, self.document_limits(), now)?;
                self.speaks_for(from_hub, &document.from, "documents sent by")?;
                if !document.to.contains(&recipient) {
                    return Err(HubError::invalid(
                        "recipient",
                        format!("{recipient} is not among the document's recipients"),
                    ));
                }
                let own = self.config().hub_code.as_str();
                if document.wire.trace.iter().any(|hop| hop.hub == own) {
                    return Err(HubError::FailedPrecondition(format!(
                        "document.trace: document {} passed hub {own} before; refusing a routing loop",
                        document.id
                    )));
                }
                document.wire.trace.push(wire::TraceHop {
                    hub: own.to_owned(),
                    at_unix_ms: now,
                });
                let span = tracing::info_span!("forward", document_id = %document.id, %from_hub, %recipient);
                let traceparent = crate::telemetry::traceparent_of(&span);
                if let Acceptance::Conflict =
                    store.accept_forwarded(&document, &recipient, &traceparent, now)?
                {
                    return Err(HubError::AlreadyExists(format!(
                        "document.document_id: {} is known here with other content",
                        document.id
                    )));
                }
            }
            Some(wire::forward_request::Payload::Status(mut report)) => {
                let code: StatusCode = report
                    .status_code
                    .parse()
                    .map_err(|reason| HubError::invalid("status.status_code", reason))?;
                let reporter: AgencyCode = report
                    .from
                    .parse()
                    .map_err(|e| HubError::invalid("status.from", format!("{e}")))?;
                self.speaks_for(from_hub, &reporter, "status reports of")?;
                let document = self.known_document(&report.document_id)?;
                let party = |code: &AgencyCode| {
                    document.from == code.as_str()
                        || document.to.iter().any(|to| to == code.as_str())
                };
                if !party(&reporter) || !party(&recipient) {
                    return Err(HubError::PermissionDenied(format!(
                        "Forward: status {code} on {}: {reporter} and {recipient} must both be parties of the document",
                        report.document_id
                    )));
                }
                // The receipt is about the recipient the status concerns: the reporter for a
                // recipient's feedback, the addressee for the sender's recall.
                let about = match code.reporter() {
                    Reporter::Recipient => reporter,
                    Reporter::Sender => recipient.clone(),
                };
                report.description.truncate(4096);
                let arrival = arrival_key(from_hub, &message_id, &recipient);
                store.accept_status_report(
                    &report,
                    std::slice::from_ref(&about),
                    std::slice::from_ref(&recipient),
                    Some(&arrival),
                    now,
                )?;
            }
            Some(wire::forward_request::Payload::Receipt(receipt)) => {
                let about: AgencyCode = receipt
                    .agency
                    .parse()
                    .map_err(|e| HubError::invalid("receipt.agency", format!("{e}")))?;
                self.speaks_for(from_hub, &about, "receipts about")?;
                let document = self.known_document(&receipt.document_id)?;
                if document.from != recipient.as_str() {
                    return Err(HubError::invalid(
                        "recipient",
                        format!(
                            "a receipt goes to the document's sender {}, not to {recipient}",
                            document.from
                        ),
                    ));
                }
                if !document.to.iter().any(|to| to == &receipt.agency) {
                    return Err(HubError::invalid(
                        "receipt.agency",
                        format!(
                            "{} is not a recipient of {}",
                            receipt.agency, receipt.document_id
                        ),
                    ));
                }
                let arrival = arrival_key(from_hub, &message_id, &recipient);
                store.accept_relayed_receipt(&arrival, &receipt)?;
            }
            None => return Err(HubError::invalid("payload", "a message is required")),
        }
        store.durable().await?;
        self.wake_publisher();
        Ok(())
    }
}

/// Sends receipts about documents of remote senders back towards them: follows the ledger
/// (gap-free, in order) from a cursor kept with the queued messages, so that each receipt is
/// queued once, crash or not. Runs until `shutdown`.
pub async fn run_relay<T: Transport>(hub: Hub<T>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELAY_TICK) => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(error) = relay_new_receipts(&hub) {
            tracing::error!(%error, "cannot relay receipts to remote senders");
        }
    }
}

fn relay_new_receipts<T: Transport>(hub: &Hub<T>) -> Result<(), HubError> {
    let store = hub.store();
    loop {
        let cursor = store.relay_cursor()?;
        let size = store.ledger_size();
        if cursor >= size {
            return Ok(());
        }
        let end = size.min(cursor + RELAY_BATCH);
        let mut relays = Vec::new();
        for index in cursor..end {
            // An archived record was relayed before it could be archived, or never needed it.
            let Some(record) = store.ledger_record(index)? else {
                continue;
            };
            let Some(receipt) = record.receipt else {
                continue;
            };
            if !RELAYED_KINDS.contains(&receipt.kind()) {
                continue;
            }
            let Some(document) = store.document(&receipt.document_id)? else {
                continue;
            };
            let Ok(sender) = document.from.parse::<AgencyCode>() else {
                continue;
            };
            if let Some(Route::Via(_)) = hub.route(&sender) {
                relays.push((document.from, receipt));
            }
        }
        store.queue_relayed_receipts(&relays, end, now_unix_ms())?;
        if !relays.is_empty() {
            hub.wake_publisher();
        }
    }
}

/// The uplink connector's view of this hub: its queue of the central hub, settled in process.
#[derive(Debug)]
struct UplinkSide<T: Transport> {
    hub: Hub<T>,
    central: AgencyCode,
    shutdown: CancellationToken,
}

impl<T: Transport> Clone for UplinkSide<T> {
    fn clone(&self) -> Self {
        UplinkSide {
            hub: self.hub.clone(),
            central: self.central.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<T: Transport> LocalHub for UplinkSide<T> {
    async fn outgoing(
        &self,
    ) -> Result<mpsc::Receiver<Result<wire::Delivery, tonic::Status>>, tonic::Status> {
        let mut deliveries = self
            .hub
            .receive(&self.central, self.shutdown.child_token())
            .await?;
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(delivery) = deliveries.recv().await {
                if sender
                    .send(delivery.map_err(tonic::Status::from))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    async fn settle(
        &self,
        ack_token: String,
        refused: Option<String>,
    ) -> Result<(), tonic::Status> {
        let outcome = match &refused {
            None => AckOutcome::Acknowledged,
            Some(reason) => AckOutcome::Undeliverable { reason },
        };
        Ok(self.hub.ack(&self.central, &ack_token, outcome).await?)
    }

    async fn take_custody(&self, message: wire::ForwardRequest) -> Result<(), tonic::Status> {
        Ok(self.hub.forward(&self.central, message).await?)
    }

    fn link_changed(&self, connected: bool) {
        self.hub.set_uplink_connected(connected);
    }
}

/// Runs the uplink connector of a province hub with `[uplink]`, until `shutdown`.
pub async fn run_uplink<T: Transport>(
    hub: Hub<T>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(uplink) = hub.config().federation.uplink.clone() else {
        return Ok(());
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(uplink.endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = &uplink.tls {
        endpoint = endpoint.tls_config(crate::tls::client_config(tls)?)?;
    }
    let link = UplinkLink {
        channel: endpoint.connect_lazy(),
        identity: hub.config().hub_code.to_string(),
        central: uplink.hub.to_string(),
    };
    tracing::info!(central = %uplink.hub, endpoint = %uplink.endpoint, "uplink starting");
    let side = UplinkSide {
        hub,
        central: uplink.hub,
        shutdown: shutdown.clone(),
    };
    lienthong_connectors::uplink::run(link, side, shutdown)
        .await
        .map_err(anyhow::Error::msg)
}
