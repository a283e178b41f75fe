//! Prometheus metrics of the hub, served at `/metrics` on `[server] http_listen`.
//!
//! Counters are labelled by event, urgency and the recipient's level (province, district,
//! commune, unit), so that an operator can see, say, express documents to communes separately.
//! Gauges that mirror state (outbox depth, connection, database size) are read at scrape time;
//! queue depths, dead letters and waiting ages are set by each sample of [`crate::activity`].

use crate::agency::AgencyLevel;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// What happened to a document for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentEvent {
    Accepted,
    Delivered,
    Acknowledged,
    Rejected,
    DeadLettered,
}

impl DocumentEvent {
    fn as_str(self) -> &'static str {
        match self {
            DocumentEvent::Accepted => "accepted",
            DocumentEvent::Delivered => "delivered",
            DocumentEvent::Acknowledged => "acknowledged",
            DocumentEvent::Rejected => "rejected",
            DocumentEvent::DeadLettered => "dead_lettered",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    agency: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrgencyLabels {
    urgency: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DocumentLabels {
    event: &'static str,
    urgency: u8,
    level: &'static str,
}

/// The hub's metrics; shared behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    documents: Family<DocumentLabels, Counter>,
    send_seconds: Histogram,
    publish_confirm_seconds: Histogram,
    end_to_end_seconds: Histogram,
    outbox_depth: Gauge,
    transport_connected: Gauge,
    uplink_connected: Gauge,
    database_bytes: Gauge,
    disk_free_bytes: Gauge,
    queue_messages: Family<QueueLabels, Gauge>,
    queue_consumers: Family<QueueLabels, Gauge>,
    oldest_waiting_seconds: Family<UrgencyLabels, Gauge>,
    dead_letters: Gauge,
}

/// State read at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub outbox_depth: u64,
    pub transport_connected: bool,
    pub database_bytes: u64,
    /// Free space on the database's disk (`None`: unreadable, reported as -1).
    pub disk_free_bytes: Option<u64>,
    pub uplink_connected: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lienthong");
        let documents = Family::<DocumentLabels, Counter>::default();
        registry.register(
            "documents",
            "Documents per recipient by event (accepted, delivered, acknowledged, rejected, dead_lettered), urgency and recipient level",
            documents.clone(),
        );
        let latency = || Histogram::new(exponential_buckets(0.000_25, 2.0, 18));
        let send_seconds = latency();
        registry.register(
            "send_latency_seconds",
            "Time from a Send request to its answer (durable custody)",
            send_seconds.clone(),
        );
        let publish_confirm_seconds = latency();
        registry.register(
            "publish_confirm_latency_seconds",
            "Time from publishing an outbox message to the transport's confirm",
            publish_confirm_seconds.clone(),
        );
        let end_to_end_seconds = latency();
        registry.register(
            "end_to_end_latency_seconds",
            "Time from a document's acceptance to its delivery on a recipient's stream",
            end_to_end_seconds.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Messages waiting in the outbox for the transport",
            outbox_depth.clone(),
        );
        let transport_connected = Gauge::default();
        registry.register(
            "transport_connected",
            "1 when the message transport (RabbitMQ) is connected",
            transport_connected.clone(),
        );
        let uplink_connected = Gauge::default();
        registry.register(
            "uplink_connected",
            "1 when a province hub's stream from the central hub is open; 0 otherwise, and on a hub without [uplink]",
            uplink_connected.clone(),
        );
        let database_bytes = Gauge::default();
        registry.register(
            "database_bytes",
            "Size of the hub's sled database on disk",
            database_bytes.clone(),
        );
        let disk_free_bytes = Gauge::default();
        registry.register(
            "disk_free_bytes",
            "Free space on the disk of the hub's database, as an unprivileged process sees it; below [storage] min_free_mib new documents and status reports are refused (-1: unreadable)",
            disk_free_bytes.clone(),
        );
        let queue_messages = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_messages",
            "Messages in an agency's queue by state (ready, unacknowledged), at the last sample",
            queue_messages.clone(),
        );
        let queue_consumers = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_consumers",
            "Consumers (open Receive streams, on every hub) of an agency's queue, at the last sample",
            queue_consumers.clone(),
        );
        let oldest_waiting_seconds = Family::<UrgencyLabels, Gauge>::default();
        registry.register(
            "oldest_waiting_age_seconds",
            "Age of the oldest message accepted and not yet acknowledged, per urgency (0 normal .. 4 timed express); 0 when none waits",
            oldest_waiting_seconds.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "dead_letters",
            "Dead letters kept by the hub, waiting for an operator",
            dead_letters.clone(),
        );
        Metrics {
            registry,
            queue_messages,
            queue_consumers,
            oldest_waiting_seconds,
            dead_letters,
            documents,
            send_seconds,
            publish_confirm_seconds,
            end_to_end_seconds,
            outbox_depth,
            transport_connected,
            uplink_connected,
            database_bytes,
            disk_free_bytes,
        }
    }

    pub fn document(&self, event: DocumentEvent, urgency: u8, level: AgencyLevel) {
        self.documents
            .get_or_create(&DocumentLabels {
                event: event.as_str(),
                urgency,
                level: level.as_str(),
            })
            .inc();
    }

    pub fn observe_send(&self, latency: Duration) {
        self.send_seconds.observe(latency.as_secs_f64());
    }

    pub fn observe_publish_confirm(&self, latency: Duration) {
        self.publish_confirm_seconds.observe(latency.as_secs_f64());
    }

    pub fn observe_end_to_end(&self, latency: Duration) {
        self.end_to_end_seconds.observe(latency.as_secs_f64());
    }

    /// Sets the gauges of queues, dead letters and waiting ages from one sample.
    pub fn set_queue_gauges(
        &self,
        queues: &[crate::activity::QueueView],
        sample: &crate::activity::Sample,
    ) {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        for queue in queues {
            let labels = |state| QueueLabels {
                agency: queue.agency.clone(),
                state,
            };
            self.queue_messages
                .get_or_create(&labels("ready"))
                .set(gauge(queue.ready));
            self.queue_messages
                .get_or_create(&labels("unacknowledged"))
                .set(gauge(queue.unacknowledged));
            self.queue_consumers
                .get_or_create(&labels("consuming"))
                .set(i64::from(queue.consumers));
        }
        for (urgency, age_ms) in sample.oldest_waiting_ms.iter().enumerate() {
            self.oldest_waiting_seconds
                .get_or_create(&UrgencyLabels {
                    urgency: urgency as u8,
                })
                .set(age_ms.unwrap_or(0) / 1000);
        }
        self.dead_letters.set(gauge(sample.dead_letters));
    }

    /// The OpenMetrics text exposition, with the state gauges set from `snapshot`.
    pub fn render(&self, snapshot: Snapshot) -> String {
        self.outbox_depth
            .set(i64::try_from(snapshot.outbox_depth).unwrap_or(i64::MAX));
        self.transport_connected
            .set(i64::from(snapshot.transport_connected));
        self.uplink_connected
            .set(i64::from(snapshot.uplink_connected));
        self.database_bytes
            .set(i64::try_from(snapshot.database_bytes).unwrap_or(i64::MAX));
        self.disk_free_bytes.set(
            snapshot
                .disk_free_bytes
                .map_or(-1, |free| i64::try_from(free).unwrap_or(i64::MAX)),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_appear_in_the_exposition() {
        let metrics = Metrics::new();
        metrics.document(DocumentEvent::Accepted, 3, AgencyLevel::CommuneOrOffice);
        metrics.document(DocumentEvent::Accepted, 3, AgencyLevel::CommuneOrOffice);
        metrics.observe_send(Duration::from_millis(2));
        let text = metrics.render(Snapshot {
            outbox_depth: 7,
            transport_connected: true,
            database_bytes: 4096,
            disk_free_bytes: Some(1 << 30),
            uplink_connected: false,
        });
        assert!(
            text.contains(
                r#"lienthong_documents_total{event="accepted",urgency="3",level="commune"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("lienthong_outbox_depth 7"), "{text}");
        assert!(text.contains("lienthong_transport_connected 1"), "{text}");
        assert!(
            text.contains("lienthong_disk_free_bytes 1073741824"),
            "{text}"
        );
        assert!(
            text.contains("lienthong_send_latency_seconds_count 1"),
            "{text}"
        );
    }
}
