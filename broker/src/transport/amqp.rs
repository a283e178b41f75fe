//! The RabbitMQ transport (AMQP 0-9-1 with lapin): quorum queues, confirmed `mandatory`
//! publishing, manual acknowledgements, and two supervised connections.
//!
//! A supervisor task owns the connections: one to publish, one for the rest (see [`Session`]).
//! It connects with exponential backoff, declares the topology, and publishes the live
//! [`Session`] on a watch channel; when either connection reports an error (or a publish fails)
//! the session is marked lost, withdrawn, and the supervisor connects both again. Nothing here
//! waits for RabbitMQ on the caller's behalf: while there is no session, calls fail fast with
//! [`TransportError::Unavailable`], and the outbox keeps the messages until a session returns.

use super::{
    Acknowledge, Inbound, OutboundMessage, QueueDepth, Subscription, TopologyNames, Transport,
    TransportError,
};
use crate::agency::AgencyCode;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long opening a subscription waits for a connection.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// How long closing a session waits for RabbitMQ's answer on each connection.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The largest AMQP frame the hub asks for, unless the URL names one (`?frame_max=`). lapin
/// keeps a send and a receive buffer of 32 frames per connection: 4 MiB each at RabbitMQ's
/// 128 KiB, 2 MiB each at this size. A 16 KiB document still travels in one frame. Smaller
/// frames cost memory elsewhere: lapin grows a delivery's body frame by frame, and at 32 KiB
/// the hub's peak at 256 KiB × 64 senders rose by about 30 MiB (docs/performance.md, 20).
const FRAME_MAX_BYTES: u32 = 64 * 1024;

/// Settings of the RabbitMQ transport.
#[derive(Clone)]
pub struct AmqpSettings {
    pub url: String,
    /// For `amqps://`: the CA (PEM) that signed RabbitMQ's certificate; the system's roots
    /// when `None`.
    pub ca_pem: Option<String>,
    pub names: TopologyNames,
    /// Every agency gets a queue bound to its code (more are added by `add_queues`).
    pub agencies: Vec<AgencyCode>,
    /// Returns of one message before RabbitMQ dead-letters it (`x-delivery-limit`): a message
    /// is delivered at most `delivery_limit + 1` times.
    pub delivery_limit: u32,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &crate::config::redact_url_password(&self.url))
            .field("ca_pem", &self.ca_pem.is_some())
            .field("names", &self.names)
            .field("agencies", &self.agencies.len())
            .field("delivery_limit", &self.delivery_limit)
            .finish()
    }
}

/// The RabbitMQ transport; cheap to clone.
#[derive(Debug, Clone)]
pub struct AmqpTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: AmqpSettings,
    /// The agencies whose queues are declared at each connection: the settings' and those added.
    agencies: std::sync::Mutex<Vec<AgencyCode>>,
    session: watch::Sender<Option<Arc<Session>>>,
}

impl Inner {
    fn agencies(&self) -> Vec<AgencyCode> {
        self.agencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Two live connections: one publishes, on its confirming channel, and does nothing else; the
/// other consumes, declares and inspects. RabbitMQ blocks a connection that publishes during a
/// memory or disk alarm, and a blocked connection carries nothing, acks included; on the other
/// connection, deliveries and their acks go on draining the queues that the alarm is about, and
/// operators can still read the queues' depths.
struct Session {
    publishing: Connection,
    /// Consumes, declares and inspects: it never publishes, so an alarm never blocks it.
    consuming: Connection,
    publisher: Channel,
    /// Cancelled when either connection fails: the supervisor then replaces both.
    lost: CancellationToken,
}

impl Session {
    /// Closes both connections, waiting at most [`CLOSE_WAIT`] for RabbitMQ's answers: one that
    /// RabbitMQ is closing from its side at the same moment may never answer.
    async fn close(&self, reason: &str) {
        let _ = tokio::join!(
            tokio::time::timeout(CLOSE_WAIT, self.publishing.close(200, reason.into())),
            tokio::time::timeout(CLOSE_WAIT, self.consuming.close(200, reason.into())),
        );
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl AmqpTransport {
    /// Starts the connection supervisor; returns at once. The supervisor stops on `shutdown`.
    pub fn start(settings: AmqpSettings, shutdown: CancellationToken) -> AmqpTransport {
        let inner = Arc::new(Inner {
            agencies: std::sync::Mutex::new(settings.agencies.clone()),
            settings,
            session: watch::Sender::new(None),
        });
        tokio::spawn(supervise(inner.clone(), shutdown));
        AmqpTransport { inner }
    }

    /// Whether a session is live now.
    pub fn is_connected(&self) -> bool {
        self.inner
            .session
            .borrow()
            .as_ref()
            .is_some_and(|s| !s.lost.is_cancelled())
    }

    /// Waits until a session is live, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), TransportError> {
        let mut session = self.inner.session.subscribe();
        tokio::time::timeout(
            timeout,
            session.wait_for(|s| s.as_ref().is_some_and(|s| !s.lost.is_cancelled())),
        )
        .await
        .map_err(|_| {
            TransportError::Unavailable(format!("not connected to RabbitMQ after {timeout:?}"))
        })?
        .map_err(|_| TransportError::Unavailable("the connection supervisor stopped".into()))?;
        Ok(())
    }

    fn session(&self) -> Result<Arc<Session>, TransportError> {
        match &*self.inner.session.borrow() {
            Some(session) if !session.lost.is_cancelled() => Ok(session.clone()),
            _ => Err(TransportError::Unavailable(
                "not connected to RabbitMQ".into(),
            )),
        }
    }
}

impl Transport for AmqpTransport {
    type Subscription = AmqpSubscription;

    async fn publish(&self, message: OutboundMessage<'_>) -> Result<(), TransportError> {
        let session = self.session()?;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(message.message_id.into())
            .with_content_type("application/x-protobuf".into());
        if !message.traceparent.is_empty() {
            let mut headers = FieldTable::default();
            headers.insert(
                crate::telemetry::TRACEPARENT.into(),
                AMQPValue::LongString(LongString::from(message.traceparent)),
            );
            properties = properties.with_headers(headers);
        }
        let outcome = async {
            session
                .publisher
                .basic_publish(
                    self.inner.settings.names.documents_exchange().into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    message.payload,
                    properties,
                )
                .await?
                .await
        }
        .await;
        match outcome {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => {
                tracing::warn!(routing_key = message.routing_key, reply = %returned.reply_text, "message returned unroutable");
                Err(TransportError::Unroutable {
                    routing_key: message.routing_key.to_owned(),
                })
            }
            Ok(Confirmation::Nack(_)) => Err(TransportError::Nacked),
            Ok(Confirmation::NotRequested) => Err(TransportError::Protocol(
                "publisher confirms are not enabled".into(),
            )),
            Err(error) => {
                session.lost.cancel();
                Err(TransportError::Unavailable(error.to_string()))
            }
        }
    }

    async fn subscribe(
        &self,
        agency: &AgencyCode,
        prefetch: u16,
    ) -> Result<AmqpSubscription, TransportError> {
        self.consume(self.inner.settings.names.agency_queue(agency), prefetch)
            .await
    }

    async fn subscribe_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<AmqpSubscription, TransportError> {
        self.consume(self.inner.settings.names.dead_letter_queue(), prefetch)
            .await
    }

    async fn queue_depth(&self, agency: &AgencyCode) -> Result<QueueDepth, TransportError> {
        let queue = self
            .inspect(self.inner.settings.names.agency_queue(agency))
            .await?;
        Ok(QueueDepth {
            ready: u64::from(queue.message_count()),
            consumers: queue.consumer_count(),
        })
    }

    fn is_ready(&self) -> bool {
        self.is_connected()
    }

    async fn dead_letter_count(&self) -> Result<u64, TransportError> {
        let queue = self
            .inspect(self.inner.settings.names.dead_letter_queue())
            .await?;
        Ok(u64::from(queue.message_count()))
    }

    async fn add_queues(&self, agencies: &[AgencyCode]) -> Result<(), TransportError> {
        let added: Vec<AgencyCode> = {
            let mut known = self
                .inner
                .agencies
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let added: Vec<AgencyCode> = agencies
                .iter()
                .filter(|agency| !known.contains(agency))
                .cloned()
                .collect();
            known.extend(added.iter().cloned());
            added
        };
        if added.is_empty() {
            return Ok(());
        }
        // Not connected: the supervisor declares them with the rest when it reconnects.
        let Ok(session) = self.session() else {
            return Ok(());
        };
        let declared = async {
            let channel = session.consuming.create_channel().await?;
            declare_agency_queues(&channel, &self.inner.settings, &added).await?;
            channel.close(200, "queues declared".into()).await
        };
        declared.await.map_err(|e| {
            TransportError::Protocol(format!("declaring the queues of new agencies: {e}"))
        })
    }
}

impl AmqpTransport {
    /// Consumes a queue on a channel of its own, with at most `prefetch` unacknowledged.
    async fn consume(
        &self,
        queue: String,
        prefetch: u16,
    ) -> Result<AmqpSubscription, TransportError> {
        // A stream opened while the connection is being (re)established waits a little for it
        // rather than failing at once.
        self.wait_connected(SUBSCRIBE_WAIT).await?;
        let session = self.session()?;
        let subscribe = async {
            let channel = session.consuming.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        let (channel, consumer) = subscribe
            .await
            .map_err(|e| TransportError::Unavailable(format!("cannot consume {queue}: {e}")))?;
        Ok(AmqpSubscription { channel, consumer })
    }

    /// A passive declare: the queue's message and consumer counts.
    async fn inspect(&self, queue: String) -> Result<lapin::Queue, TransportError> {
        let session = self.session()?;
        let channel = session
            .consuming
            .create_channel()
            .await
            .map_err(|e| TransportError::Unavailable(e.to_string()))?;
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| TransportError::Protocol(format!("inspecting {queue}: {e}")));
        let _ = channel.close(200, "done".into()).await;
        declared
    }
}

/// A consumer on its own channel; dropping it closes the channel, which returns its
/// unacknowledged messages to the queue.
#[derive(Debug)]
pub struct AmqpSubscription {
    channel: Channel,
    consumer: lapin::Consumer,
}

impl Subscription for AmqpSubscription {
    type Acker = AmqpAcker;

    async fn next(&mut self) -> Result<Inbound<AmqpAcker>, TransportError> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(Inbound {
                payload: delivery.data,
                redelivered: delivery.redelivered,
                delivery_count: delivery_count(&delivery.properties),
                death_reason: death_reason(&delivery.properties),
                acker: AmqpAcker(delivery.acker),
            }),
            Some(Err(error)) => Err(TransportError::Unavailable(error.to_string())),
            None => Err(TransportError::Closed),
        }
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = channel.close(200, "subscription closed".into()).await;
            });
        }
    }
}

/// Settles one RabbitMQ delivery.
#[derive(Debug)]
pub struct AmqpAcker(lapin::Acker);

impl Acknowledge for AmqpAcker {
    async fn ack(self) -> Result<(), TransportError> {
        settled(self.0.ack(BasicAckOptions::default()).await)
    }

    async fn requeue(self) -> Result<(), TransportError> {
        settled(
            self.0
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await,
        )
    }

    async fn dead_letter(self) -> Result<(), TransportError> {
        settled(
            self.0
                .nack(BasicNackOptions {
                    requeue: false,
                    ..BasicNackOptions::default()
                })
                .await,
        )
    }
}

/// The `x-first-death-reason` header RabbitMQ puts on a dead-lettered message.
fn death_reason(properties: &BasicProperties) -> Option<String> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-first-death-reason")?
    {
        AMQPValue::LongString(reason) => Some(reason.to_string()),
        AMQPValue::ShortString(reason) => Some(reason.to_string()),
        _ => None,
    }
}

/// The `x-delivery-count` header quorum queues put on redelivered messages (absent the first time).
fn delivery_count(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers() else {
        return 0;
    };
    let count = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(count).unwrap_or(0)
}

fn settled(result: lapin::Result<bool>) -> Result<(), TransportError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(TransportError::Closed),
        Err(_) => Err(TransportError::Closed),
    }
}

async fn supervise(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    let safe_url = crate::config::redact_url_password(&inner.settings.url);
    loop {
        let agencies = inner.agencies();
        let connected = tokio::select! {
            result = connect(&inner.settings, &agencies) => result,
            () = shutdown.cancelled() => break,
        };
        match connected {
            Ok(session) => {
                tracing::info!(url = %safe_url, "connected to RabbitMQ; topology declared");
                backoff = MIN_BACKOFF;
                let session = Arc::new(session);
                inner.session.send_replace(Some(session.clone()));
                tokio::select! {
                    () = session.lost.cancelled() => {
                        tracing::warn!(url = %safe_url, "lost the connection to RabbitMQ; reconnecting");
                    }
                    () = shutdown.cancelled() => {
                        inner.session.send_replace(None);
                        session.close("hub shutting down").await;
                        break;
                    }
                }
                inner.session.send_replace(None);
                // In the background: the connections that replace these need not wait for them.
                tokio::spawn(async move { session.close("reconnecting").await });
            }
            Err(error) => {
                tracing::warn!(url = %safe_url, %error, retry_in = ?backoff, "cannot connect to RabbitMQ");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(
    settings: &AmqpSettings,
    agencies: &[AgencyCode],
) -> Result<Session, lapin::Error> {
    // A connection dropped on an early return closes itself.
    let lost = CancellationToken::new();
    let publishing = open_connection(settings, "publishing", &lost).await?;
    let consuming = open_connection(settings, "consuming", &lost).await?;
    declare_topology(&consuming, settings, agencies).await?;
    let publisher = publishing.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Session {
        publishing,
        consuming,
        publisher,
        lost,
    })
}

/// Opens one connection named `lienthong <role>` (RabbitMQ lists it so); `lost` is cancelled
/// when it fails. Blocking by a resource alarm is logged, not treated as a failure.
async fn open_connection(
    settings: &AmqpSettings,
    role: &'static str,
    lost: &CancellationToken,
) -> Result<Connection, lapin::Error> {
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: settings.ca_pem.clone(),
    };
    let mut uri: lapin::uri::AMQPUri = settings
        .url
        .parse()
        .map_err(|reason: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, reason))?;
    uri.query.frame_max.get_or_insert(FRAME_MAX_BYTES);
    let connection = Connection::connect_uri_with_config(
        uri,
        ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("lienthong {role}"))),
        tls,
        lapin::runtime::default_runtime()?,
    )
    .await?;
    let mut events = connection.events_listener();
    let on_error = lost.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::Error(error) => {
                    tracing::debug!(connection = role, %error, "RabbitMQ connection error");
                    break;
                }
                lapin::Event::ConnectionBlocked(reason) => {
                    tracing::warn!(connection = role, %reason, "RabbitMQ blocks the connection (resource alarm)");
                }
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!(connection = role, "RabbitMQ unblocks the connection");
                }
                _ => {}
            }
        }
        on_error.cancel();
    });
    Ok(connection)
}

/// Declares the exchanges and queues; idempotent, so it runs again after every reconnection.
async fn declare_topology(
    connection: &Connection,
    settings: &AmqpSettings,
    agencies: &[AgencyCode],
) -> Result<(), lapin::Error> {
    let names = &settings.names;
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            names.documents_exchange().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.dead_letter_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            names.dead_letter_queue().into(),
            queue_options,
            quorum_arguments(),
        )
        .await?;
    channel
        .queue_bind(
            names.dead_letter_queue().into(),
            names.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    declare_agency_queues(&channel, settings, agencies).await?;
    channel.close(200, "topology declared".into()).await?;
    Ok(())
}

/// Declares the quorum queue of each agency and binds it to the agency's code.
async fn declare_agency_queues(
    channel: &Channel,
    settings: &AmqpSettings,
    agencies: &[AgencyCode],
) -> Result<(), lapin::Error> {
    let names = &settings.names;
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for agency in agencies {
        let queue = names.agency_queue(agency);
        channel
            .queue_declare(
                queue.as_str().into(),
                queue_options,
                agency_queue_arguments(settings),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                names.documents_exchange().into(),
                agency.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments
}

/// A recipient's quorum queue: a delivery limit, then at-least-once dead lettering (which needs
/// `reject-publish` overflow), so that a message refused too often is kept, never dropped.
fn agency_queue_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut arguments = quorum_arguments();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(settings.names.dead_letter_exchange())),
    );
    arguments.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
    );
    arguments
}

/// Deletes every exchange and queue of `names` for `agencies`, with their messages. For tests
/// and for decommissioning a hub; a running hub would declare them again.
pub async fn delete_topology(
    url: &str,
    names: &TopologyNames,
    agencies: &[AgencyCode],
) -> Result<(), lapin::Error> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for agency in agencies {
        channel
            .queue_delete(
                names.agency_queue(agency).into(),
                QueueDeleteOptions::default(),
            )
            .await?;
    }
    channel
        .queue_delete(
            names.dead_letter_queue().into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    for exchange in [names.documents_exchange(), names.dead_letter_exchange()] {
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    connection.close(200, "topology deleted".into()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RabbitMQ the tests use (`LIENTHONG_TEST_AMQP_URL`, default the local guest account).
    fn amqp_url() -> String {
        std::env::var("LIENTHONG_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    async fn negotiated_frame_max(url: String) -> u32 {
        let settings = AmqpSettings {
            url,
            ca_pem: None,
            names: TopologyNames::new("frame-max"),
            agencies: Vec::new(),
            delivery_limit: 0,
        };
        let connection = open_connection(&settings, "frame size test", &CancellationToken::new())
            .await
            .expect("RabbitMQ at LIENTHONG_TEST_AMQP_URL (default 127.0.0.1:5672) is reachable");
        let frame_max = connection.configuration().frame_max();
        connection
            .close(200, "frame size read".into())
            .await
            .expect("close");
        frame_max
    }

    /// The hub asks RabbitMQ for frames of [`FRAME_MAX_BYTES`] (RabbitMQ offers 128 KiB), which
    /// sizes lapin's buffers; a `frame_max` in the URL wins.
    #[tokio::test]
    async fn connections_use_the_hubs_frame_size_unless_the_url_names_one() {
        assert_eq!(negotiated_frame_max(amqp_url()).await, FRAME_MAX_BYTES);
        let separator = if amqp_url().contains('?') { '&' } else { '?' };
        let named = format!("{}{separator}frame_max=32768", amqp_url());
        assert_eq!(negotiated_frame_max(named).await, 32_768);
    }
}
