//! The uplink: carries a province hub's traffic to and from the central hub over the central
//! hub's public `DocumentExchange` API, authenticated as the province hub.
//!
//! Two loops run side by side, each on its own connection and each retrying with backoff for as
//! long as the hub runs:
//! - **up**: messages waiting in the hub's queue of the central hub (documents, status reports
//!   and receipts for agencies outside the province) are handed over with `Forward`. Only when
//!   the central hub answers (it has them on disk) is the local delivery settled, which writes
//!   the FORWARDED receipt; a refusal for good (an agency no hub serves, a loop) settles it as
//!   undeliverable, with a REJECTED receipt that the sender sees.
//! - **down**: the central hub's `Receive` stream for this province. Each message is handed to
//!   the local hub, and acknowledged to the central hub only after the local hub has it on disk;
//!   a local refusal for good is acknowledged as undeliverable, so that the sender learns it.
//!
//! While the central hub is unreachable, nothing leaves the queue: documents wait there, and
//! flow again when the link returns. Redeliveries on either side are harmless, because a hub
//! takes each (message, recipient) once.

use lienthong_proto::v1 as wire;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::Status;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use wire::document_exchange_client::DocumentExchangeClient;

/// The metadata that names the caller when the link has no client certificate.
const IDENTITY_METADATA_KEY: &str = "x-lienthong-agency";
/// Messages in flight in each direction at once.
const WINDOW: usize = 64;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest message sent or accepted; above any hub's document limit.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What the uplink needs from the hub it runs in.
pub trait LocalHub: Clone + Send + Sync + 'static {
    /// Opens the stream of messages waiting to go up, each with `recipient` and `message_id`.
    fn outgoing(
        &self,
    ) -> impl Future<Output = Result<mpsc::Receiver<Result<wire::Delivery, Status>>, Status>> + Send;

    /// Settles one outgoing delivery: the central hub has it (`refused` is `None`), or refused
    /// it for good, for the reason given.
    fn settle(
        &self,
        ack_token: String,
        refused: Option<String>,
    ) -> impl Future<Output = Result<(), Status>> + Send;

    /// Takes durable custody of a message the central hub handed down; returns once it is on
    /// disk.
    fn take_custody(
        &self,
        message: wire::ForwardRequest,
    ) -> impl Future<Output = Result<(), Status>> + Send;

    /// Whether the stream from the central hub is open now: told at every change, for
    /// operators (readiness text and metrics).
    fn link_changed(&self, connected: bool);
}

/// Where the central hub is and who this hub is to it.
#[derive(Debug, Clone)]
pub struct UplinkLink {
    /// A channel to the central hub (lazy: it connects, and reconnects, on use).
    pub channel: Channel,
    /// This hub's code: the metadata identity without TLS, and the name in log lines.
    pub identity: String,
    /// The central hub's code, for log lines and receipts.
    pub central: String,
}

type CentralClient = DocumentExchangeClient<
    tonic::service::interceptor::InterceptedService<Channel, IdentityInterceptor>,
>;

#[derive(Debug, Clone)]
struct IdentityInterceptor(AsciiMetadataValue);

impl tonic::service::Interceptor for IdentityInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert(IDENTITY_METADATA_KEY, self.0.clone());
        Ok(request)
    }
}

/// Whether a refusal by a hub is final for this message (no retry can change it). Refusals of
/// the link itself (identity, permissions) are not: they are configuration, which an operator
/// fixes, and the messages wait meanwhile.
pub fn is_final(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange
    )
}

/// Runs both directions until `shutdown`.
pub async fn run<L: LocalHub>(
    link: UplinkLink,
    local: L,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let identity = AsciiMetadataValue::try_from(link.identity.as_str())
        .map_err(|_| format!("hub code `{}` is not valid metadata", link.identity))?;
    let client = DocumentExchangeClient::with_interceptor(
        link.channel.clone(),
        IdentityInterceptor(identity),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let link = Arc::new(link);
    tokio::join!(
        up(
            link.clone(),
            client.clone(),
            local.clone(),
            shutdown.clone()
        ),
        down(link, client, local, shutdown),
    );
    Ok(())
}

/// Local queue → central hub.
async fn up<L: LocalHub>(
    link: Arc<UplinkLink>,
    client: CentralClient,
    local: L,
    shutdown: CancellationToken,
) {
    let window = Arc::new(Semaphore::new(WINDOW));
    let mut backoff = MIN_BACKOFF;
    while !shutdown.is_cancelled() {
        let mut outgoing = match local.outgoing().await {
            Ok(outgoing) => outgoing,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "uplink: cannot open the outgoing queue");
                if pause(&mut backoff, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        loop {
            let next = tokio::select! {
                next = outgoing.recv() => next,
                () = shutdown.cancelled() => return,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(status)) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "uplink: the outgoing queue failed; opening it again");
                    break;
                }
                None => break,
            };
            let Ok(permit) = window.clone().acquire_owned().await else {
                return;
            };
            let (link, client, local, shutdown) = (
                link.clone(),
                client.clone(),
                local.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                forward_up(&link, client, &local, delivery, &shutdown).await;
                drop(permit);
            });
        }
        if pause(&mut backoff, &shutdown).await {
            return;
        }
    }
}

/// Hands one message to the central hub, retrying until it answers, then settles it locally.
async fn forward_up<L: LocalHub>(
    link: &UplinkLink,
    mut client: CentralClient,
    local: &L,
    delivery: wire::Delivery,
    shutdown: &CancellationToken,
) {
    let request = forward_request(delivery.message_id, delivery.recipient, delivery.payload);
    let mut backoff = MIN_BACKOFF;
    let refused = loop {
        match client.forward(request.clone()).await {
            Ok(_) => break None,
            Err(status) if is_final(&status) => {
                tracing::warn!(message_id = %request.message_id, recipient = %request.recipient, code = ?status.code(), reason = status.message(), "uplink: the central hub refused a message for good");
                break Some(refusal(&link.central, &status));
            }
            Err(status) => {
                tracing::debug!(message_id = %request.message_id, code = ?status.code(), reason = status.message(), "uplink: forwarding failed; retrying");
                if pause(&mut backoff, shutdown).await {
                    return;
                }
            }
        }
    };
    if let Err(status) = local.settle(delivery.ack_token, refused).await {
        // The local stream closed meanwhile: the message comes again, and the central hub,
        // which has it already, takes it once.
        tracing::debug!(code = ?status.code(), reason = status.message(), "uplink: settling a forwarded message failed");
    }
}

/// Central hub → local hub.
async fn down<L: LocalHub>(
    link: Arc<UplinkLink>,
    client: CentralClient,
    local: L,
    shutdown: CancellationToken,
) {
    let window = Arc::new(Semaphore::new(WINDOW));
    let mut backoff = MIN_BACKOFF;
    let mut connected = false;
    while !shutdown.is_cancelled() {
        let mut opener = client.clone();
        let opened = tokio::select! {
            opened = opener.receive(wire::ReceiveRequest {}) => opened,
            () = shutdown.cancelled() => return,
        };
        let mut stream = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                local.link_changed(false);
                if connected {
                    tracing::warn!(central = %link.central, code = ?status.code(), reason = status.message(), "uplink: the central hub is unreachable; retrying");
                    connected = false;
                } else {
                    tracing::debug!(central = %link.central, code = ?status.code(), reason = status.message(), "uplink: the central hub is still unreachable");
                }
                if pause(&mut backoff, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(central = %link.central, "uplink: connected to the central hub");
        local.link_changed(true);
        connected = true;
        backoff = MIN_BACKOFF;
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                () = shutdown.cancelled() => return,
            };
            let delivery = match next {
                Ok(Some(delivery)) => delivery,
                Ok(None) => {
                    tracing::warn!(central = %link.central, "uplink: the central hub closed the stream");
                    break;
                }
                Err(status) => {
                    tracing::warn!(central = %link.central, code = ?status.code(), reason = status.message(), "uplink: the stream from the central hub failed");
                    break;
                }
            };
            let Ok(permit) = window.clone().acquire_owned().await else {
                return;
            };
            let (link, client, local) = (link.clone(), client.clone(), local.clone());
            tokio::spawn(async move {
                take_down(&link, client, &local, delivery).await;
                drop(permit);
            });
        }
        local.link_changed(false);
        if pause(&mut backoff, &shutdown).await {
            return;
        }
    }
}

/// Gives one message from the central hub to the local hub, then settles it with the central
/// hub: acknowledged once on disk here, undeliverable if refused for good, rejected (retried
/// later) otherwise.
async fn take_down<L: LocalHub>(
    link: &UplinkLink,
    mut client: CentralClient,
    local: &L,
    delivery: wire::Delivery,
) {
    let request = forward_request(delivery.message_id, delivery.recipient, delivery.payload);
    let (message_id, recipient) = (request.message_id.clone(), request.recipient.clone());
    let ack = match local.take_custody(request).await {
        Ok(()) => wire::AckRequest {
            ack_token: delivery.ack_token,
            ..wire::AckRequest::default()
        },
        Err(status) if is_final(&status) => {
            tracing::warn!(%message_id, %recipient, code = ?status.code(), reason = status.message(), "uplink: refusing a message from the central hub for good");
            wire::AckRequest {
                ack_token: delivery.ack_token,
                undeliverable: true,
                reason: refusal(&link.identity, &status),
                ..wire::AckRequest::default()
            }
        }
        Err(status) => {
            tracing::warn!(%message_id, %recipient, code = ?status.code(), reason = status.message(), "uplink: cannot take a message from the central hub now; it will come again");
            wire::AckRequest {
                ack_token: delivery.ack_token,
                reject: true,
                reason: format!(
                    "hub {} cannot take it now: {}",
                    link.identity,
                    status.message()
                ),
                ..wire::AckRequest::default()
            }
        }
    };
    if let Err(status) = client.ack(ack).await {
        // The stream is gone: the central hub delivers the message again, and it is taken once.
        tracing::debug!(code = ?status.code(), reason = status.message(), "uplink: acknowledging to the central hub failed");
    }
}

/// The reason a final refusal by `hub` carries back to the sender, in its REJECTED receipt.
fn refusal(hub: &str, status: &Status) -> String {
    format!(
        "refused by hub {hub}: {:?}: {}",
        status.code(),
        status.message()
    )
}

fn forward_request(
    message_id: String,
    recipient: String,
    payload: Option<wire::delivery::Payload>,
) -> wire::ForwardRequest {
    let payload = payload.map(|payload| match payload {
        wire::delivery::Payload::Document(document) => {
            wire::forward_request::Payload::Document(document)
        }
        wire::delivery::Payload::Status(status) => wire::forward_request::Payload::Status(status),
        wire::delivery::Payload::Receipt(receipt) => {
            wire::forward_request::Payload::Receipt(receipt)
        }
    });
    wire::ForwardRequest {
        message_id,
        recipient,
        payload,
    }
}

/// Sleeps for `backoff` (then doubles it); returns true if shutdown came first.
async fn pause(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(*backoff) => false,
        () = shutdown.cancelled() => true,
    };
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    stopped
}
