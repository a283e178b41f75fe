//! The hub's use cases, independent of gRPC: send, receive, acknowledge, report status, track.
//!
//! Each operation checks its input and the caller's rights first, so that a refused request
//! changes nothing; then it writes to the store, waits for durability, and only then answers.

use crate::agency::AgencyCode;
use crate::config::Config;
use crate::directory::AgencyDirectory;
use crate::document::{Document, DocumentLimits, check_document_id};
use crate::error::HubError;
use crate::metrics::{DocumentEvent, Metrics};
use crate::receipt::{delivery_state, status_reports};
use crate::status::{Reporter, StatusCode};
use crate::store::{Acceptance, MessageRef, Settlement, Store};
use crate::transport::{Acknowledge, Inbound, Subscription, Transport, TransportError};
use futures_util::FutureExt;
use lienthong_proto::v1 as wire;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Longest status description accepted, in bytes.
const MAX_STATUS_DESCRIPTION_BYTES: usize = 4096;

type AckerOf<T> = <<T as Transport>::Subscription as Subscription>::Acker;

/// The hub: cheap to clone, shared by the gRPC service and the outbox publisher.
#[derive(Debug)]
pub struct Hub<T: Transport> {
    inner: Arc<HubInner<T>>,
}

impl<T: Transport> Clone for Hub<T> {
    fn clone(&self) -> Self {
        Hub {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct HubInner<T: Transport> {
    config: Config,
    store: Store,
    transport: T,
    /// Replaced whole by `reload_directory`; readers take the current one.
    directory: RwLock<Arc<AgencyDirectory>>,
    outbox_wakeup: Notify,
    metrics: Metrics,
    activity: crate::activity::Activity,
    pending_acks: Mutex<PendingAcks<AckerOf<T>>>,
    /// Open `Receive` streams per agency (`limits.max_streams_per_agency`).
    open_streams: Arc<Mutex<HashMap<AgencyCode, u32>>>,
    /// `Send` allowance per agency (`limits.max_sends_per_second`).
    send_buckets: Mutex<HashMap<AgencyCode, TokenBucket>>,
    /// Whether the uplink's stream from the central hub is open (false without an uplink).
    uplink_connected: std::sync::atomic::AtomicBool,
}

/// A token bucket: `rate` tokens a second, holding at most two seconds' worth.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn take(&mut self, rate: u32) -> bool {
        let capacity = 2.0 * f64::from(rate);
        let now = Instant::now();
        self.tokens = (self.tokens
            + now.duration_since(self.refilled).as_secs_f64() * f64::from(rate))
        .min(capacity);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts one open stream of an agency while it lives.
#[derive(Debug)]
struct StreamSlot {
    agency: AgencyCode,
    open_streams: Arc<Mutex<HashMap<AgencyCode, u32>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open_streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.agency) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.agency);
            }
        }
    }
}

/// A delivery shown on a stream and not yet settled.
#[derive(Debug)]
struct PendingAck<A> {
    stream_id: u64,
    /// Whose stream showed it: the recipient, or the next hub on the recipient's way.
    holder: AgencyCode,
    message: MessageRef,
    /// The document's urgency, for metrics.
    urgency: u8,
    /// The `deliver` span's context, parent of the `ack` span.
    traceparent: String,
    acker: A,
    /// Its settlement is queued for recording ([`Hub::record_settlements`]): a second `Ack`
    /// is refused and the closing of its stream leaves it alone.
    settling: bool,
    /// Its stream closed while it was settling: if the recording fails, it is forgotten as the
    /// stream's other deliveries were, instead of waiting for an `Ack` that cannot come.
    stream_closed: bool,
}

/// An `Ack` waiting for its settlement to be recorded together with the others queued
/// beside it.
#[derive(Debug)]
struct QueuedSettlement<A> {
    ack_token: String,
    /// Why a hub settles the delivery as undeliverable; `None` for an acknowledgement.
    undeliverable: Option<String>,
    /// Answered with the delivery, out of the pending set, once its settlement is on record.
    recorded: tokio::sync::oneshot::Sender<Result<PendingAck<A>, HubError>>,
}

/// Where an `Ack` stands once its delivery is found.
enum Settling<A> {
    /// Out of the pending set already (a rejection records nothing first).
    Now(PendingAck<A>),
    /// Queued for recording; the answer brings the delivery.
    Queued(tokio::sync::oneshot::Receiver<Result<PendingAck<A>, HubError>>),
}

/// A message from the queue, decoded and checked, that its stream's batch will show.
struct PreparedDelivery<A> {
    message: MessageRef,
    payload: wire::delivery::Payload,
    /// The document's urgency, for metrics.
    urgency: u8,
    /// The `deliver` span's context, parent of the `ack` span.
    traceparent: String,
    acker: A,
    /// Whether the transport delivered it before.
    transport_redelivered: bool,
}

/// Deliveries shown and not yet settled, by ack token, and which (message, recipient) pairs
/// they are: a second copy of a pair already shown is never shown beside it (see
/// `Hub::prepare_delivery`).
#[derive(Debug)]
struct PendingAcks<A> {
    by_token: HashMap<String, PendingAck<A>>,
    shown: HashSet<(String, AgencyCode)>,
    /// Pairs whose settlement is being recorded after their stream closed: the transport has
    /// their message back, and a copy of it that arrives now waits for the outcome
    /// ([`CopyOf::Returned`]).
    settling_after_close: HashSet<(String, AgencyCode)>,
    /// Settlements waiting to be recorded in one store transaction.
    settle_queue: Vec<QueuedSettlement<A>>,
}

impl<A> Default for PendingAcks<A> {
    fn default() -> Self {
        PendingAcks {
            by_token: HashMap::new(),
            shown: HashSet::new(),
            settling_after_close: HashSet::new(),
            settle_queue: Vec::new(),
        }
    }
}

impl<A> PendingAcks<A> {
    fn pair(message: &MessageRef) -> (String, AgencyCode) {
        (message.message_id.clone(), message.recipient.clone())
    }

    fn remove(&mut self, ack_token: &str) -> Option<PendingAck<A>> {
        let pending = self.by_token.remove(ack_token)?;
        let pair = Self::pair(&pending.message);
        self.settling_after_close.remove(&pair);
        self.shown.remove(&pair);
        Some(pending)
    }

    fn forget_stream(&mut self, stream_id: u64) {
        let mut tokens = Vec::new();
        for (token, pending) in &mut self.by_token {
            if pending.stream_id != stream_id {
                continue;
            }
            if pending.settling {
                pending.stream_closed = true;
                self.settling_after_close
                    .insert(Self::pair(&pending.message));
            } else {
                tokens.push(token.clone());
            }
        }
        for token in tokens {
            self.remove(&token);
        }
    }

    /// What to do with a message from the queue whose (message, recipient) pair is `pair`;
    /// reserves the pair when the message is to be shown.
    fn copy_of(&mut self, pair: &(String, AgencyCode), acknowledged: bool) -> CopyOf {
        if self.settling_after_close.contains(pair) {
            CopyOf::Returned
        } else if acknowledged || self.shown.contains(pair) {
            CopyOf::Duplicate
        } else {
            self.shown.insert(pair.clone());
            CopyOf::New
        }
    }

    /// The settlement of `ack_token` could not be recorded: the delivery waits for another
    /// `Ack`, or, if its stream has closed meanwhile, is forgotten (and so redelivered).
    fn settlement_failed(&mut self, ack_token: &str) {
        match self.by_token.get_mut(ack_token) {
            Some(pending) if pending.stream_closed => {
                self.remove(ack_token);
            }
            Some(pending) => pending.settling = false,
            None => {}
        }
    }
}

/// A message from the queue, measured against the deliveries shown and settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyOf {
    /// Neither shown nor settled: show it.
    New,
    /// Acknowledged, or shown on a stream that holds it still (this is then a republished
    /// copy): settle it at once, never show it. The shown one is either acknowledged, or
    /// returned to the queue and delivered again.
    Duplicate,
    /// The message itself, back from a stream that closed while its settlement was being
    /// recorded: it goes back to the queue after a pause. Dropping it would lose the document
    /// if the recording failed; showing it would show an acknowledged one again.
    Returned,
}

/// How long a message returned while its settlement is being recorded waits before going
/// back to the queue ([`CopyOf::Returned`]).
const SETTLING_COPY_PAUSE: Duration = Duration::from_millis(200);

/// Has the transport settle a message in the background. What the hub answers depends on what
/// it has on disk, never on the transport, which may be slow or blocked (RabbitMQ's alarms); a
/// settlement that fails leaves the message with the transport, which delivers it again.
fn settle_in_background(
    settling: impl Future<Output = Result<(), TransportError>> + Send + 'static,
    failed: &'static str,
) {
    tokio::spawn(async move {
        if let Err(error) = settling.await {
            tracing::debug!(%error, "{failed}");
        }
    });
}

/// What the holder of a delivery says about it (`Ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome<'a> {
    /// Taken for good: never shown again.
    Acknowledged,
    /// Refused for now: retried after a backoff, dead-lettered past the delivery limit.
    Rejected { reason: &'a str },
    /// Hubs only: it can never reach its recipient; settled with a REJECTED receipt.
    Undeliverable { reason: &'a str },
}

/// The free space on the database's disk, as `/readyz` reports it and the floor judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskRoom {
    /// `statvfs` of the data directory failed.
    Unknown,
    /// Bytes free, at or above `[storage] min_free_mib`.
    Free(u64),
    /// Below the floor: new messages are refused until room is made.
    BelowFloor { free: u64, floor: u64 },
}

/// What `Send` answers.
#[derive(Debug)]
pub struct SendOutcome {
    pub document_id: String,
    pub receipts: Vec<wire::Receipt>,
}

impl<T: Transport> Hub<T> {
    pub fn new(config: Config, store: Store, transport: T, directory: AgencyDirectory) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                config,
                store,
                transport,
                directory: RwLock::new(Arc::new(directory)),
                outbox_wakeup: Notify::new(),
                metrics: Metrics::new(),
                activity: crate::activity::Activity::default(),
                pending_acks: Mutex::new(PendingAcks::default()),
                open_streams: Arc::new(Mutex::new(HashMap::new())),
                send_buckets: Mutex::new(HashMap::new()),
                uplink_connected: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The agency directory as it is now (a reload replaces it; this copy stays valid).
    pub fn directory(&self) -> Arc<AgencyDirectory> {
        self.inner
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs a new directory, after declaring the queues of the agencies it adds. Open
    /// streams go on; agencies it drops can no longer send or be sent to, and their queues
    /// keep what waits in them until the agency returns. Returns (added, removed) codes.
    pub async fn install_directory(
        &self,
        directory: AgencyDirectory,
    ) -> Result<(Vec<AgencyCode>, Vec<AgencyCode>), HubError> {
        let current = self.directory();
        let added: Vec<AgencyCode> = directory
            .codes()
            .filter(|code| !current.contains(code))
            .cloned()
            .collect();
        let removed: Vec<AgencyCode> = current
            .codes()
            .filter(|code| !directory.contains(code))
            .cloned()
            .collect();
        self.inner.transport.add_queues(&added).await?;
        *self
            .inner
            .directory
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(directory);
        Ok((added, removed))
    }

    /// Whether the uplink's stream from the central hub is open now.
    pub fn uplink_connected(&self) -> bool {
        self.inner
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_uplink_connected(&self, connected: bool) {
        self.inner
            .uplink_connected
            .store(connected, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn activity(&self) -> &crate::activity::Activity {
        &self.inner.activity
    }

    /// Wakes the outbox publisher; it also polls on its own.
    pub(crate) fn outbox_wakeup(&self) -> &Notify {
        &self.inner.outbox_wakeup
    }

    /// The free space on the database's disk, against `[storage] min_free_mib`.
    pub fn disk_room(&self) -> DiskRoom {
        let floor = self.inner.config.min_free_disk_bytes;
        match self.inner.store.free_disk_bytes() {
            None => DiskRoom::Unknown,
            Some(free) if free < floor => DiskRoom::BelowFloor { free, floor },
            Some(free) => DiskRoom::Free(free),
        }
    }

    /// Refuses new messages (documents, status reports, forwarded messages) while the
    /// database's disk has less free space than `[storage] min_free_mib`: what room is left
    /// serves what the hub already holds (deliveries, acknowledgements and their receipts), so
    /// that the disk does not fill up and stop the hub.
    pub(crate) fn check_disk_floor(&self) -> Result<(), HubError> {
        if self.inner.config.min_free_disk_bytes == 0 {
            return Ok(());
        }
        match self.disk_room() {
            DiskRoom::BelowFloor { free, floor } => Err(HubError::Unavailable(format!(
                "the hub's disk has {} MiB free, below its floor of {} MiB ([storage] min_free_mib); retry later",
                free >> 20,
                floor >> 20
            ))),
            DiskRoom::Free(_) | DiskRoom::Unknown => Ok(()),
        }
    }

    /// The limits every document is checked against (`[limits]`).
    pub(crate) fn document_limits(&self) -> DocumentLimits {
        let limits = &self.inner.config.limits;
        DocumentLimits {
            max_document_bytes: limits.max_document_bytes,
            max_recipients: limits.max_recipients,
            max_attachments: limits.max_attachments,
            max_attachment_bytes: limits.max_attachment_bytes,
            max_field_bytes: limits.max_field_bytes,
        }
    }

    /// Takes durable custody of a document sent by `caller`.
    #[tracing::instrument(name = "send", skip_all, fields(from = %caller, document_id))]
    pub async fn send(
        &self,
        caller: &AgencyCode,
        document: Option<wire::Document>,
    ) -> Result<SendOutcome, HubError> {
        let started = Instant::now();
        let inner = &*self.inner;
        let document =
            document.ok_or_else(|| HubError::invalid("document", "a document is required"))?;
        self.take_send_allowance(caller)?;
        let mut document = Document::from_wire(document, self.document_limits(), now_unix_ms())?;
        if &document.from != caller {
            return Err(HubError::PermissionDenied(format!(
                "Send: document.from: agency {caller} may send only as itself, not as {}",
                document.from
            )));
        }
        let directory = self.directory();
        if !directory.contains(&document.from) {
            return Err(HubError::NotFound(format!(
                "document.from: agency {} is not in the hub's directory",
                document.from
            )));
        }
        for (index, recipient) in document.to.iter().enumerate() {
            if let Err(reason) = self.route_in(&directory, recipient) {
                return Err(HubError::NotFound(format!(
                    "document.to[{index}]: {reason}"
                )));
            }
        }
        let waiting = inner.store.outbox_len();
        let bound = inner.config.limits.max_outbox_messages;
        if waiting + document.to.len() as u64 > bound {
            return Err(HubError::Unavailable(format!(
                "the outbox holds {waiting} messages and its bound is {bound} (limits.max_outbox_messages); retry later"
            )));
        }
        self.check_disk_floor()?;

        // The hop of this hub, like edXML's TraceHeader; not part of the content hash.
        let now = now_unix_ms();
        document.wire.trace.push(wire::TraceHop {
            hub: inner.config.hub_code.to_string(),
            at_unix_ms: now,
        });
        let span = tracing::Span::current();
        span.record("document_id", document.id.as_str());
        let traceparent = crate::telemetry::traceparent_of(&span);
        let receipts = match inner
            .store
            .accept_document(&document, &traceparent, now)
            .await?
        {
            Acceptance::Accepted(receipts) | Acceptance::AlreadyAccepted(receipts) => receipts,
            Acceptance::Conflict => {
                return Err(HubError::AlreadyExists(format!(
                    "document.document_id: {} was already sent with other content",
                    document.id
                )));
            }
        };
        inner.store.durable().await?;
        inner.outbox_wakeup.notify_one();
        for recipient in &document.to {
            inner.metrics.document(
                DocumentEvent::Accepted,
                document.urgency.value(),
                recipient.level(),
            );
        }
        inner.metrics.observe_send(started.elapsed());
        tracing::debug!(document_id = %document.id, recipients = document.to.len(), "document accepted");
        Ok(SendOutcome {
            document_id: document.id,
            receipts,
        })
    }

    /// Opens `caller`'s queue as a stream of deliveries. The stream ends when the receiver is
    /// dropped or `shutdown` fires; its unsettled deliveries then return to the queue.
    pub async fn receive(
        &self,
        caller: &AgencyCode,
        shutdown: CancellationToken,
    ) -> Result<mpsc::Receiver<Result<wire::Delivery, HubError>>, HubError> {
        if !self.directory().contains(caller) && !self.is_neighbour(caller) {
            return Err(HubError::NotFound(format!(
                "agency {caller} is not in the hub's directory"
            )));
        }
        let slot = self.open_stream_slot(caller)?;
        let prefetch = self.inner.config.delivery.prefetch;
        let subscription = self.inner.transport.subscribe(caller, prefetch).await?;
        let (sender, receiver) = mpsc::channel(usize::from(prefetch));
        let hub = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            hub.deliver(caller, subscription, sender, shutdown).await;
            drop(slot);
        });
        Ok(receiver)
    }

    /// Pumps one stream. When the subscription fails (the transport reconnects), it subscribes
    /// again and the stream goes on; the ack tokens issued before are forgotten, so acking them
    /// answers FAILED_PRECONDITION, and their deliveries come again.
    async fn deliver(
        &self,
        caller: AgencyCode,
        mut subscription: T::Subscription,
        sender: mpsc::Sender<Result<wire::Delivery, HubError>>,
        shutdown: CancellationToken,
    ) {
        let mut stream_id = rand::random::<u64>();
        'stream: loop {
            let first = tokio::select! {
                inbound = subscription.next() => inbound,
                () = sender.closed() => break,
                () = shutdown.cancelled() => break,
            };
            // Take whatever else is already waiting (up to the prefetch), so that one
            // transaction and one flush record the DELIVERED receipts of the whole batch.
            let mut prepared = Vec::new();
            let mut lost = None;
            let mut next = Some(first);
            while let Some(inbound) = next.take() {
                match inbound {
                    Ok(inbound) => match self.prepare_delivery(&caller, inbound).await {
                        Ok(Some(delivery)) => prepared.push(delivery),
                        Ok(None) => {}
                        Err(error) => {
                            tracing::error!(agency = %caller, %error, "cannot record a delivery");
                            self.unreserve(&prepared);
                            let _ = sender.send(Err(error)).await;
                            break 'stream;
                        }
                    },
                    Err(error) => lost = Some(error),
                }
                if lost.is_none()
                    && prepared.len() < usize::from(self.inner.config.delivery.prefetch)
                {
                    next = subscription.next().now_or_never();
                }
            }
            if !prepared.is_empty() {
                let batch = match self.record_shown(&caller, stream_id, prepared) {
                    Ok(batch) => batch,
                    Err(error) => {
                        tracing::error!(agency = %caller, %error, "cannot record a delivery");
                        let _ = sender.send(Err(error)).await;
                        break 'stream;
                    }
                };
                if let Err(error) = self.inner.store.durable().await {
                    tracing::error!(agency = %caller, %error, "cannot record a delivery");
                    let _ = sender.send(Err(error.into())).await;
                    break;
                }
                for delivery in batch {
                    if sender.send(Ok(delivery)).await.is_err() {
                        break 'stream;
                    }
                }
            }
            if let Some(error) = lost {
                tracing::warn!(agency = %caller, %error, "delivery subscription lost; subscribing again");
                self.forget_stream(stream_id);
                match self.resubscribe(&caller, &sender, &shutdown).await {
                    Some(renewed) => {
                        subscription = renewed;
                        stream_id = rand::random::<u64>();
                        tracing::info!(agency = %caller, "delivery stream resumed");
                    }
                    None => return,
                }
            }
        }
        self.forget_stream(stream_id);
    }

    /// Subscribes again with backoff until it works, the client leaves, or the hub stops.
    async fn resubscribe(
        &self,
        caller: &AgencyCode,
        sender: &mpsc::Sender<Result<wire::Delivery, HubError>>,
        shutdown: &CancellationToken,
    ) -> Option<T::Subscription> {
        const MAX_BACKOFF: Duration = Duration::from_secs(5);
        let mut backoff = Duration::from_millis(100);
        loop {
            let prefetch = self.inner.config.delivery.prefetch;
            tokio::select! {
                subscribed = self.inner.transport.subscribe(caller, prefetch) => match subscribed {
                    Ok(subscription) => return Some(subscription),
                    Err(error) => tracing::debug!(agency = %caller, %error, "subscribing again failed"),
                },
                () = sender.closed() => return None,
                () = shutdown.cancelled() => return None,
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = sender.closed() => return None,
                () = shutdown.cancelled() => return None,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Takes one `Send` from the caller's allowance, or refuses naming the limit.
    fn take_send_allowance(&self, caller: &AgencyCode) -> Result<(), HubError> {
        let rate = self.inner.config.limits.max_sends_per_second;
        let mut buckets = self
            .inner
            .send_buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let bucket = buckets
            .entry(caller.clone())
            .or_insert_with(|| TokenBucket {
                tokens: 2.0 * f64::from(rate),
                refilled: Instant::now(),
            });
        if bucket.take(rate) {
            return Ok(());
        }
        tracing::warn!(identity = %caller, action = "Send", "refused: rate limit");
        Err(HubError::ResourceExhausted(format!(
            "agency {caller} sends faster than {rate} documents per second (limits.max_sends_per_second); retry later"
        )))
    }

    /// Reserves one of the caller's open streams, or refuses naming the limit.
    fn open_stream_slot(&self, caller: &AgencyCode) -> Result<StreamSlot, HubError> {
        let limit = self.inner.config.limits.max_streams_per_agency;
        let mut open = self
            .inner
            .open_streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let count = open.entry(caller.clone()).or_insert(0);
        if *count >= limit {
            tracing::warn!(identity = %caller, action = "Receive", "refused: too many open streams");
            return Err(HubError::ResourceExhausted(format!(
                "agency {caller} already has {limit} open Receive streams (limits.max_streams_per_agency)"
            )));
        }
        *count += 1;
        Ok(StreamSlot {
            agency: caller.clone(),
            open_streams: self.inner.open_streams.clone(),
        })
    }

    /// Deliveries shown on `agency`'s streams (a hub's: hand-overs in flight) and not yet
    /// settled.
    pub(crate) fn unacknowledged_of(&self, agency: &AgencyCode) -> u64 {
        self.pending_acks()
            .by_token
            .values()
            .filter(|pending| &pending.holder == agency)
            .count() as u64
    }

    /// Wakes the outbox publisher after something was queued outside `send`.
    pub(crate) fn wake_publisher(&self) {
        self.inner.outbox_wakeup.notify_one();
    }

    /// Forgets the ack tokens of one stream; their transport ackers are dropped with them.
    fn forget_stream(&self, stream_id: u64) {
        self.pending_acks().forget_stream(stream_id);
    }

    /// Turns a message from the queue into a delivery to record as shown ([`Hub::record_shown`]),
    /// or settles it at once when it must not be shown (already acknowledged, unreadable, or
    /// misrouted).
    async fn prepare_delivery(
        &self,
        caller: &AgencyCode,
        inbound: Inbound<AckerOf<T>>,
    ) -> Result<Option<PreparedDelivery<AckerOf<T>>>, HubError> {
        let store = &self.inner.store;
        // The recipient is the caller, or, on a hub's stream, an agency routed through it.
        let decoded = wire::QueuedMessage::decode(inbound.payload.as_slice()).map(|message| {
            let recipient = message.recipient.parse::<AgencyCode>().ok();
            (message, recipient)
        });
        let (message, recipient) = match decoded {
            Ok((message, Some(recipient))) if self.holds_for(caller, &recipient) => {
                (message, recipient)
            }
            Ok((message, _)) => {
                tracing::error!(agency = %caller, recipient = %message.recipient, "misrouted message sent to the dead letters");
                settle_in_background(
                    inbound.acker.dead_letter(),
                    "dead-lettering a misrouted message failed; the transport will redeliver",
                );
                return Ok(None);
            }
            Err(error) => {
                tracing::error!(agency = %caller, %error, "unreadable message sent to the dead letters");
                settle_in_background(
                    inbound.acker.dead_letter(),
                    "dead-lettering an unreadable message failed; the transport will redeliver",
                );
                return Ok(None);
            }
        };
        // Checked and reserved under the lock that `ack` holds while it records an
        // acknowledgement.
        let pair = (message.message_id.clone(), recipient.clone());
        let copy = {
            let mut pending = self.pending_acks();
            let acknowledged = store.is_acknowledged(&message.message_id, recipient.as_str())?;
            pending.copy_of(&pair, acknowledged)
        };
        match copy {
            CopyOf::New => {}
            CopyOf::Duplicate => {
                tracing::debug!(message_id = %message.message_id, agency = %caller, "dropping a copy of a message shown or acknowledged before");
                settle_in_background(
                    inbound.acker.ack(),
                    "dropping a copy failed; the transport will redeliver it",
                );
                return Ok(None);
            }
            CopyOf::Returned => {
                tracing::debug!(message_id = %message.message_id, agency = %caller, "a message whose settlement is being recorded goes back to the queue");
                settle_in_background(
                    async move {
                        tokio::time::sleep(SETTLING_COPY_PAUSE).await;
                        inbound.acker.requeue().await
                    },
                    "returning a message whose settlement is being recorded failed; the transport will redeliver",
                );
                return Ok(None);
            }
        }
        let span =
            tracing::info_span!("deliver", message_id = %message.message_id, recipient = %caller);
        crate::telemetry::set_parent(&span, &message.traceparent);
        let traceparent = crate::telemetry::traceparent_of(&span);
        let waiting_key = crate::store::waiting_key_of(&message);
        let to_hub = &recipient != caller;
        let (payload, document_id, urgency) = match message.payload {
            Some(wire::queued_message::Payload::Document(document)) => {
                let id = document.document_id.clone();
                let urgency = u8::try_from(document.priority).unwrap_or(u8::MAX);
                if !to_hub {
                    self.observe_delivery(&document, urgency, caller);
                }
                (
                    wire::delivery::Payload::Document(document),
                    Some(id),
                    urgency,
                )
            }
            Some(wire::queued_message::Payload::Status(status)) => {
                (wire::delivery::Payload::Status(status), None, 0)
            }
            Some(wire::queued_message::Payload::Receipt(receipt)) if to_hub => {
                (wire::delivery::Payload::Receipt(receipt), None, 0)
            }
            Some(wire::queued_message::Payload::Receipt(_)) | None => {
                tracing::error!(agency = %caller, "message without a payload this stream carries sent to the dead letters");
                self.pending_acks().shown.remove(&pair);
                let _ = inbound.acker.dead_letter().await;
                return Ok(None);
            }
        };
        Ok(Some(PreparedDelivery {
            message: MessageRef {
                message_id: message.message_id,
                recipient,
                document_id,
                waiting_key,
            },
            payload,
            urgency,
            traceparent,
            acker: inbound.acker,
            transport_redelivered: inbound.redelivered,
        }))
    }

    /// Records a batch of prepared deliveries as shown to `caller` (one store transaction;
    /// the caller flushes before showing them) and registers their ack tokens.
    fn record_shown(
        &self,
        caller: &AgencyCode,
        stream_id: u64,
        prepared: Vec<PreparedDelivery<AckerOf<T>>>,
    ) -> Result<Vec<wire::Delivery>, HubError> {
        let messages: Vec<&MessageRef> = prepared.iter().map(|p| &p.message).collect();
        let shown_before = match self
            .inner
            .store
            .mark_delivered(caller, &messages, now_unix_ms())
        {
            Ok(shown_before) => shown_before,
            Err(error) => {
                self.unreserve(&prepared);
                return Err(error.into());
            }
        };
        let mut pending_acks = self.pending_acks();
        let deliveries = prepared
            .into_iter()
            .zip(shown_before)
            .map(|(prepared, shown_before)| {
                let ack_token = format!("{:032x}", rand::random::<u128>());
                // A hub's stream names the recipient and the message, which the hub forwards.
                let (recipient, message_id) = if prepared.message.recipient != *caller {
                    (
                        prepared.message.recipient.to_string(),
                        prepared.message.message_id.clone(),
                    )
                } else {
                    (String::new(), String::new())
                };
                pending_acks.by_token.insert(
                    ack_token.clone(),
                    PendingAck {
                        stream_id,
                        holder: caller.clone(),
                        message: prepared.message,
                        urgency: prepared.urgency,
                        traceparent: prepared.traceparent,
                        acker: prepared.acker,
                        settling: false,
                        stream_closed: false,
                    },
                );
                wire::Delivery {
                    ack_token,
                    redelivered: prepared.transport_redelivered || shown_before,
                    payload: Some(prepared.payload),
                    recipient,
                    message_id,
                }
            })
            .collect();
        Ok(deliveries)
    }

    /// Lets go of the (message, recipient) pairs that prepared deliveries reserved, when they
    /// will not be shown: their messages come again from the queue.
    fn unreserve(&self, prepared: &[PreparedDelivery<AckerOf<T>>]) {
        let mut pending_acks = self.pending_acks();
        for delivery in prepared {
            pending_acks
                .shown
                .remove(&PendingAcks::<AckerOf<T>>::pair(&delivery.message));
        }
    }

    /// Settles a delivery: acknowledged ones are never shown again; rejected ones are retried.
    pub async fn ack(
        &self,
        caller: &AgencyCode,
        ack_token: &str,
        outcome: AckOutcome<'_>,
    ) -> Result<(), HubError> {
        let settling = {
            let mut pending_acks = self.pending_acks();
            let undeliverable = match pending_acks.by_token.get_mut(ack_token) {
                None => {
                    return Err(HubError::FailedPrecondition(format!(
                        "ack_token `{}` is unknown or its stream has closed; the delivery will be redelivered",
                        ack_token.chars().take(64).collect::<String>()
                    )));
                }
                Some(pending) if &pending.holder != caller => {
                    return Err(HubError::PermissionDenied(format!(
                        "Ack: ack_token: agency {caller} may settle only its own deliveries"
                    )));
                }
                Some(pending) if pending.settling => {
                    return Err(HubError::FailedPrecondition(format!(
                        "ack_token `{ack_token}` is being settled by an earlier Ack"
                    )));
                }
                Some(pending) => {
                    let to_hub = pending.holder != pending.message.recipient;
                    let undeliverable = match outcome {
                        AckOutcome::Acknowledged => Some(None),
                        AckOutcome::Undeliverable { reason } if to_hub => {
                            Some(Some(reason.to_owned()))
                        }
                        AckOutcome::Undeliverable { .. } => {
                            return Err(HubError::invalid(
                                "undeliverable",
                                "only a hub settles a delivery as undeliverable; an agency rejects it",
                            ));
                        }
                        AckOutcome::Rejected { .. } => None,
                    };
                    pending.settling = undeliverable.is_some();
                    undeliverable
                }
            };
            match undeliverable {
                // A rejection records nothing before the delivery leaves the pending set.
                None => Settling::Now(
                    pending_acks
                        .remove(ack_token)
                        .expect("present under the lock"),
                ),
                // Recorded before the pair leaves the pending set, so that a copy being
                // prepared meanwhile finds one or the other.
                Some(undeliverable) => {
                    let (recorded, answer) = tokio::sync::oneshot::channel();
                    pending_acks.settle_queue.push(QueuedSettlement {
                        ack_token: ack_token.to_owned(),
                        undeliverable,
                        recorded,
                    });
                    if pending_acks.settle_queue.len() == 1 {
                        // Lets the other `Ack`s that are ready join this transaction.
                        let hub = self.clone();
                        tokio::spawn(async move {
                            tokio::task::yield_now().await;
                            hub.record_settlements();
                        });
                    }
                    Settling::Queued(answer)
                }
            }
        };
        let pending = match settling {
            Settling::Now(pending) => pending,
            Settling::Queued(answer) => answer.await.map_err(|_| {
                HubError::Unavailable(
                    "the hub stopped before recording the settlement; the delivery will be redelivered"
                        .into(),
                )
            })??,
        };
        let (reject, reason) = match outcome {
            AckOutcome::Rejected { reason } => (true, reason),
            AckOutcome::Acknowledged | AckOutcome::Undeliverable { .. } => (false, ""),
        };
        let span = tracing::info_span!(
            "ack",
            message_id = %pending.message.message_id,
            recipient = %pending.message.recipient,
            reject
        );
        crate::telemetry::set_parent(&span, &pending.traceparent);
        self.settle(pending, reject, reason).instrument(span).await
    }

    /// Records every queued settlement in one store transaction, under the lock of the pending
    /// set as a single `Ack` would, and answers their `Ack`s.
    fn record_settlements(&self) {
        let mut pending_acks = self.pending_acks();
        let queue = std::mem::take(&mut pending_acks.settle_queue);
        let recorded = {
            let settled: Vec<(&MessageRef, Settlement<'_>)> = queue
                .iter()
                .filter_map(|queued| {
                    let pending = pending_acks.by_token.get(&queued.ack_token)?;
                    let settlement = if pending.holder == pending.message.recipient {
                        Settlement::Acknowledged
                    } else if let Some(reason) = &queued.undeliverable {
                        Settlement::Undeliverable { reason }
                    } else {
                        Settlement::Forwarded {
                            to_hub: pending.holder.as_str(),
                        }
                    };
                    Some((&pending.message, settlement))
                })
                .collect();
            self.inner.store.mark_settled(&settled, now_unix_ms())
        };
        let mut abandoned = Vec::new();
        for queued in queue {
            let answer = match &recorded {
                Ok(()) => match pending_acks.remove(&queued.ack_token) {
                    Some(pending) => Ok(pending),
                    None => continue,
                },
                Err(error) => {
                    pending_acks.settlement_failed(&queued.ack_token);
                    Err(HubError::Unavailable(format!(
                        "cannot record the settlement ({error}); retry the Ack"
                    )))
                }
            };
            if let Err(Ok(pending)) = queued.recorded.send(answer) {
                abandoned.push(pending);
            }
        }
        drop(pending_acks);
        // An `Ack` whose caller went away: its settlement is on record, so finish it here.
        for pending in abandoned {
            let hub = self.clone();
            tokio::spawn(async move { hub.settle(pending, false, "").await });
        }
    }

    /// Completes an `ack` once the delivery is out of the pending set (and, for an
    /// acknowledgement, recorded): counts it, waits for the disk, then has the transport ack,
    /// requeue or dead-letter it in the background.
    async fn settle(
        &self,
        pending: PendingAck<AckerOf<T>>,
        reject: bool,
        reason: &str,
    ) -> Result<(), HubError> {
        let store = &self.inner.store;
        let caller = pending.message.recipient.clone();
        // A hand-over to the next hub is not the recipient's doing: its receipts count it.
        let by_recipient = pending.holder == pending.message.recipient;
        let count = |event| {
            if by_recipient && pending.message.document_id.is_some() {
                self.inner
                    .metrics
                    .document(event, pending.urgency, caller.level());
            }
        };
        if !reject {
            count(DocumentEvent::Acknowledged);
            self.inner.activity.acknowledged(caller.as_str());
            store.durable().await?;
            // A redelivery after a lost transport ack is recognised and dropped.
            settle_in_background(
                pending.acker.ack(),
                "transport ack failed after the acknowledgement was recorded",
            );
            return Ok(());
        }
        let delivery = &self.inner.config.delivery;
        let rejections = store.count_rejection(&pending.message)?;
        if rejections > delivery.delivery_limit {
            let reason = format!(
                "rejected {rejections} times, more than delivery_limit {}: {reason}",
                delivery.delivery_limit
            );
            count(DocumentEvent::DeadLettered);
            store.mark_dead_lettered(&pending.message, &reason, now_unix_ms())?;
            store.durable().await?;
            tracing::warn!(message_id = %pending.message.message_id, recipient = %caller, %reason, "dead-lettered");
            settle_in_background(
                pending.acker.dead_letter(),
                "dead-lettering failed; the transport will redeliver",
            );
            return Ok(());
        }
        count(DocumentEvent::Rejected);
        store.mark_rejected(&pending.message, reason, now_unix_ms())?;
        store.durable().await?;
        // The message goes back to the queue after a backoff that doubles with each rejection; it
        // holds one prefetch slot of this stream meanwhile, so other agencies are not delayed.
        let backoff = retry_backoff(
            rejections - 1,
            delivery.retry_backoff_base,
            delivery.retry_backoff_max,
        );
        settle_in_background(
            async move {
                tokio::time::sleep(backoff).await;
                pending.acker.requeue().await
            },
            "requeue after reject failed; the transport will redeliver",
        );
        Ok(())
    }

    /// Records a status report and routes it to the other party of the document.
    pub async fn report_status(
        &self,
        caller: &AgencyCode,
        mut report: wire::StatusReport,
    ) -> Result<Vec<wire::Receipt>, HubError> {
        let code: StatusCode = report
            .status_code
            .parse()
            .map_err(|reason| HubError::invalid("status_code", reason))?;
        check_document_id("document_id", &report.document_id, false)?;
        if report.description.len() > MAX_STATUS_DESCRIPTION_BYTES {
            return Err(HubError::ResourceExhausted(format!(
                "description: longer than {MAX_STATUS_DESCRIPTION_BYTES} bytes"
            )));
        }
        let document = self.known_document(&report.document_id)?;
        let sender = parse_stored_code(&document.from)?;
        let recipients = document
            .to
            .iter()
            .map(|code| parse_stored_code(code))
            .collect::<Result<Vec<_>, _>>()?;
        let (about, targets) = match code.reporter() {
            Reporter::Recipient => {
                if !recipients.contains(caller) {
                    return Err(HubError::PermissionDenied(format!(
                        "ReportStatus: status {code} on {}: agency {caller} is not a recipient of this document",
                        report.document_id
                    )));
                }
                (vec![caller.clone()], vec![sender])
            }
            Reporter::Sender => {
                if &sender != caller {
                    return Err(HubError::PermissionDenied(format!(
                        "ReportStatus: status {code} on {}: only the sender may request a recall, not agency {caller}",
                        report.document_id
                    )));
                }
                (recipients.clone(), recipients)
            }
        };
        self.check_disk_floor()?;
        let now = now_unix_ms();
        report.from = caller.to_string();
        report.at_unix_ms = now;
        let receipts = self
            .inner
            .store
            .accept_status_report(&report, &about, &targets, None, now)?;
        self.inner.store.durable().await?;
        self.inner.outbox_wakeup.notify_one();
        Ok(receipts)
    }

    /// Every receipt and status of a document, per recipient; for its sender and recipients.
    pub fn track(
        &self,
        caller: &AgencyCode,
        document_id: &str,
    ) -> Result<wire::TrackResponse, HubError> {
        check_document_id("document_id", document_id, false)?;
        let document = self.known_document(document_id)?;
        let involved =
            document.from == caller.as_str() || document.to.iter().any(|to| to == caller.as_str());
        if !involved {
            return Err(HubError::PermissionDenied(format!(
                "Track: agency {caller} neither sent nor received document {document_id}"
            )));
        }
        let receipts = self.inner.store.receipts_of(document_id)?;
        let recipients = document
            .to
            .iter()
            .map(|agency| {
                let own: Vec<wire::Receipt> = receipts
                    .iter()
                    .filter(|r| &r.agency == agency)
                    .cloned()
                    .collect();
                wire::RecipientTrace {
                    agency: agency.clone(),
                    state: delivery_state(&own) as i32,
                    statuses: status_reports(document_id, &own),
                    receipts: own,
                }
            })
            .collect();
        let referenced_by = self
            .inner
            .store
            .referencing_documents(document_id)?
            .into_iter()
            .map(|referencing| wire::DocumentReference {
                document_id: referencing.document_id,
                business_type: referencing.business_type,
                from: referencing.from,
                accepted_at_unix_ms: referencing.accepted_at_unix_ms,
            })
            .collect();
        Ok(wire::TrackResponse {
            document_id: document_id.to_owned(),
            recipients,
            referenced_by,
        })
    }

    /// Counts a delivery and its end-to-end latency, from this hub's trace hop.
    fn observe_delivery(&self, document: &wire::Document, urgency: u8, recipient: &AgencyCode) {
        let metrics = &self.inner.metrics;
        let hub = self.inner.config.hub_code.as_str();
        if let Some(hop) = document.trace.iter().rev().find(|hop| hop.hub == hub) {
            let waited = now_unix_ms().saturating_sub(hop.at_unix_ms);
            metrics.observe_end_to_end(Duration::from_millis(u64::try_from(waited).unwrap_or(0)));
        }
        metrics.document(DocumentEvent::Delivered, urgency, recipient.level());
    }

    pub(crate) fn known_document(
        &self,
        document_id: &str,
    ) -> Result<wire::StoredDocument, HubError> {
        self.inner.store.document(document_id)?.ok_or_else(|| {
            HubError::NotFound(format!(
                "document_id: {document_id} is not known to this hub"
            ))
        })
    }

    fn pending_acks(&self) -> MutexGuard<'_, PendingAcks<AckerOf<T>>> {
        // Every update of the map is a single insert, remove or retain, so it stays consistent
        // even if a holder panicked.
        self.inner
            .pending_acks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn parse_stored_code(code: &str) -> Result<AgencyCode, HubError> {
    code.parse().map_err(|e| {
        HubError::Store(crate::store::StoreError::Corrupt(format!(
            "stored agency code: {e}"
        )))
    })
}

/// The wait before a rejected message returns to its queue: `base * 2^returns`, at most `max`.
pub fn retry_backoff(returns: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(2u32.saturating_pow(returns.min(30)))
        .min(max)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_up_to_its_maximum() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let waits: Vec<u128> = (0..8)
            .map(|n| retry_backoff(n, base, max).as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(retry_backoff(u32::MAX, base, max), max);
    }

    fn pending_on(stream_id: u64, message_id: &str) -> PendingAck<()> {
        let recipient: AgencyCode = "000.21.31.H53".parse().expect("agency code");
        PendingAck {
            stream_id,
            holder: recipient.clone(),
            message: MessageRef {
                message_id: message_id.to_owned(),
                recipient,
                document_id: Some(message_id.to_owned()),
                waiting_key: Vec::new(),
            },
            urgency: 0,
            traceparent: String::new(),
            acker: (),
            settling: false,
            stream_closed: false,
        }
    }

    #[test]
    fn a_failed_settlement_is_forgotten_only_once_its_stream_has_closed() {
        let mut pending_acks = PendingAcks::<()>::default();
        for (token, stream_id) in [("open", 1), ("closing", 2), ("idle", 2)] {
            let pending = pending_on(stream_id, token);
            pending_acks
                .shown
                .insert(PendingAcks::<()>::pair(&pending.message));
            pending_acks.by_token.insert(token.to_owned(), pending);
        }
        for token in ["open", "closing"] {
            pending_acks
                .by_token
                .get_mut(token)
                .expect("pending")
                .settling = true;
        }
        // Closing stream 2 forgets its idle delivery and leaves the settling one alone.
        pending_acks.forget_stream(2);
        assert!(!pending_acks.by_token.contains_key("idle"));
        assert!(pending_acks.by_token["closing"].stream_closed);
        assert!(!pending_acks.by_token["open"].stream_closed);
        // Both recordings fail: the delivery on the open stream waits for another `Ack`, the
        // one whose stream closed is forgotten with its pair.
        pending_acks.settlement_failed("open");
        pending_acks.settlement_failed("closing");
        assert!(!pending_acks.by_token["open"].settling);
        assert!(!pending_acks.by_token.contains_key("closing"));
        let shown: Vec<&str> = pending_acks
            .shown
            .iter()
            .map(|(message_id, _)| message_id.as_str())
            .collect();
        assert_eq!(shown, ["open"]);
    }

    #[test]
    fn a_message_back_from_a_stream_closed_while_settling_waits_for_the_outcome() {
        let mut pending_acks = PendingAcks::<()>::default();
        let pair_of =
            |message_id: &str| PendingAcks::<()>::pair(&pending_on(0, message_id).message);
        // Each copy in turn, as it arrives: (message, acknowledged in the store, what it is).
        let arrive = |pending_acks: &mut PendingAcks<()>, copies: &[(&str, bool, CopyOf)]| {
            for &(message_id, acknowledged, expected) in copies {
                let copy = pending_acks.copy_of(&pair_of(message_id), acknowledged);
                assert_eq!(copy, expected, "a copy of {message_id}");
            }
        };
        for (token, stream_id) in [("open", 1), ("failing", 2), ("recorded", 2)] {
            let mut pending = pending_on(stream_id, token);
            pending.settling = true;
            arrive(&mut pending_acks, &[(token, false, CopyOf::New)]);
            pending_acks.by_token.insert(token.to_owned(), pending);
        }
        // On a stream still open the message is held there: a copy is a republished one.
        arrive(
            &mut pending_acks,
            &[
                ("open", false, CopyOf::Duplicate),
                ("failing", false, CopyOf::Duplicate),
            ],
        );
        // Its stream closed: the message itself comes back, and waits.
        pending_acks.forget_stream(2);
        arrive(
            &mut pending_acks,
            &[
                ("failing", false, CopyOf::Returned),
                ("recorded", false, CopyOf::Returned),
                ("open", false, CopyOf::Duplicate),
            ],
        );
        // Recorded: dropped as acknowledged. Not recorded: shown again, once.
        pending_acks.remove("recorded");
        pending_acks.settlement_failed("failing");
        arrive(
            &mut pending_acks,
            &[
                ("recorded", true, CopyOf::Duplicate),
                ("failing", false, CopyOf::New),
                ("failing", false, CopyOf::Duplicate),
            ],
        );
        assert!(pending_acks.settling_after_close.is_empty());
    }
}
