//! The `Transport` abstraction: how queued messages get from the outbox to a recipient's stream.
//!
//! Two implementations pass the same conformance suite (`tests/conformance.rs`):
//! [`amqp::AmqpTransport`] (RabbitMQ, the production transport) and
//! [`embedded::EmbeddedTransport`] (queues kept in the hub's own sled database, so that one
//! process runs with no broker at all).
//!
//! Both follow RabbitMQ's model: a topic exchange routes by agency code to one queue per agency;
//! publishing is confirmed and `mandatory` (an unroutable message is an error, never a success);
//! consumers hold at most `prefetch` unsettled messages; a message returned too many times goes
//! to the dead letters.

pub mod amqp;
pub mod embedded;

use crate::agency::AgencyCode;
use std::future::Future;

/// A message for one agency's queue.
#[derive(Debug, Clone, Copy)]
pub struct OutboundMessage<'a> {
    /// The recipient's agency code: the routing key.
    pub routing_key: &'a str,
    pub message_id: &'a str,
    pub payload: &'a [u8],
    /// W3C trace context of the publishing span (empty when tracing is off); RabbitMQ carries
    /// it as the `traceparent` header, the payload carries it too.
    pub traceparent: &'a str,
}

/// A message taken from a queue, held until it is settled through its acker.
#[derive(Debug)]
pub struct Inbound<A> {
    pub payload: Vec<u8>,
    /// The transport delivered this message before without it being acknowledged.
    pub redelivered: bool,
    /// How many times the message was returned to the queue before (requeued or left
    /// unsettled): 0 on its first delivery. Compared with the delivery limit.
    pub delivery_count: u32,
    /// For a message taken from the dead-letter queue: why it was dead-lettered
    /// ([`DEATH_BY_REJECTION`], [`DEATH_BY_DELIVERY_LIMIT`], or the broker's own word).
    pub death_reason: Option<String>,
    pub acker: A,
}

/// A message sent to the dead letters explicitly (a nack without requeue).
pub const DEATH_BY_REJECTION: &str = "rejected";
/// A message dead-lettered by the queue because it was returned too many times.
pub const DEATH_BY_DELIVERY_LIMIT: &str = "delivery_limit";

/// How many messages a queue holds and who consumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Messages waiting, not taken by any consumer.
    pub ready: u64,
    pub consumers: u32,
}

/// Why the transport could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("the message transport is not connected: {0}")]
    Unavailable(String),
    #[error("no queue is bound to routing key {routing_key}")]
    Unroutable { routing_key: String },
    #[error("the message transport refused the message (negative confirm)")]
    Nacked,
    #[error("the subscription or channel is closed")]
    Closed,
    #[error("message transport error: {0}")]
    Protocol(String),
}

/// Names of every exchange and queue, all under one prefix so that hubs and tests can share a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyNames {
    prefix: String,
}

impl TopologyNames {
    pub fn new(prefix: &str) -> Self {
        TopologyNames {
            prefix: prefix.to_owned(),
        }
    }

    /// The topic exchange documents are published to.
    pub fn documents_exchange(&self) -> String {
        format!("{}.documents", self.prefix)
    }

    /// The exchange rejected and expired messages go to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    /// The queue that keeps dead letters.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letters", self.prefix)
    }

    /// One agency's queue.
    pub fn agency_queue(&self, agency: &AgencyCode) -> String {
        format!("{}.agency.{}", self.prefix, agency)
    }
}

/// What the hub needs from a message transport.
pub trait Transport: Clone + Send + Sync + 'static {
    type Subscription: Subscription;

    /// Publishes durably: resolves only once the transport has the message in the recipient's
    /// queue (a positive confirm); an unroutable or refused message is an error.
    fn publish(
        &self,
        message: OutboundMessage<'_>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Starts consuming one agency's queue with at most `prefetch` unsettled messages.
    /// Dropping the subscription returns its unsettled messages to the queue, marked redelivered.
    fn subscribe(
        &self,
        agency: &AgencyCode,
        prefetch: u16,
    ) -> impl Future<Output = Result<Self::Subscription, TransportError>> + Send;

    /// Starts consuming the dead-letter queue (to keep its messages in the hub's store).
    fn subscribe_dead_letters(
        &self,
        prefetch: u16,
    ) -> impl Future<Output = Result<Self::Subscription, TransportError>> + Send;

    /// How many messages an agency's queue holds, and its consumers.
    fn queue_depth(
        &self,
        agency: &AgencyCode,
    ) -> impl Future<Output = Result<QueueDepth, TransportError>> + Send;

    /// Whether the transport can carry messages now (for readiness).
    fn is_ready(&self) -> bool;

    /// Messages in the dead-letter queue.
    fn dead_letter_count(&self) -> impl Future<Output = Result<u64, TransportError>> + Send;

    /// Declares and binds the queues of agencies added to the directory (idempotent; queues
    /// of agencies already known are left as they are). They are declared again after every
    /// reconnection, like those the transport started with.
    fn add_queues(
        &self,
        agencies: &[AgencyCode],
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// A consumer of one queue.
pub trait Subscription: Send + 'static {
    type Acker: Acknowledge;

    /// The next message; an error when the subscription can no longer deliver.
    fn next(&mut self)
    -> impl Future<Output = Result<Inbound<Self::Acker>, TransportError>> + Send;
}

/// Settles one inbound message.
pub trait Acknowledge: std::fmt::Debug + Send + Sync + 'static {
    /// Removes the message from the queue for good.
    fn ack(self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Returns the message to the queue to be delivered again; each return counts towards the
    /// delivery limit, past which the message goes to the dead letters.
    fn requeue(self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Sends the message straight to the dead letters.
    fn dead_letter(self) -> impl Future<Output = Result<(), TransportError>> + Send;
}
