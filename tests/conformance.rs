//! The transport conformance suite: the RabbitMQ and embedded transports must behave alike
//! (routing, mandatory publishing, redelivery, acknowledgement, prefetch, delivery limit).
//!
//! Each check is one generic function run against both transports; the RabbitMQ runs use a
//! real broker under a namespace of their own.

mod support;

use lienthong::agency::AgencyCode;
use lienthong::store::Store;
use lienthong::transport::amqp::{AmqpSettings, AmqpTransport};
use lienthong::transport::embedded::EmbeddedTransport;
use lienthong::transport::{
    Acknowledge, Inbound, OutboundMessage, Subscription, TopologyNames, Transport, TransportError,
};
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

/// The delivery limit of the conformance queues.
const DELIVERY_LIMIT: u32 = 3;
const QUIET: Duration = Duration::from_millis(400);

fn code(s: &str) -> AgencyCode {
    s.parse().expect("valid code")
}

/// A transport under test and what to clean up after it.
struct Harness<T> {
    transport: T,
    prefix: String,
    stop: CancellationToken,
    _data: tempfile::TempDir,
    _store: Store,
}

async fn amqp(name: &str) -> Harness<AmqpTransport> {
    let prefix = unique_prefix(name);
    let stop = CancellationToken::new();
    let data = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(data.path(), &code(PROVINCE)).expect("open store");
    let transport = AmqpTransport::start(
        AmqpSettings {
            url: amqp_url(),
            ca_pem: None,
            names: TopologyNames::new(&prefix),
            agencies: test_agencies(),
            delivery_limit: DELIVERY_LIMIT,
        },
        stop.clone(),
    );
    transport
        .wait_connected(Duration::from_secs(15))
        .await
        .expect("RabbitMQ at LIENTHONG_TEST_AMQP_URL (default 127.0.0.1:5672) is reachable");
    Harness {
        transport,
        prefix,
        stop,
        _data: data,
        _store: store,
    }
}

fn embedded(name: &str) -> Harness<EmbeddedTransport> {
    let prefix = unique_prefix(name);
    let data = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(data.path(), &code(PROVINCE)).expect("open store");
    let transport = EmbeddedTransport::open(
        &store,
        &TopologyNames::new(&prefix),
        &test_agencies(),
        DELIVERY_LIMIT,
    )
    .expect("open embedded transport");
    Harness {
        transport,
        prefix,
        stop: CancellationToken::new(),
        _data: data,
        _store: store,
    }
}

impl<T> Harness<T> {
    async fn finish(self, is_amqp: bool) {
        self.stop.cancel();
        if is_amqp {
            lienthong::transport::amqp::delete_topology(
                &amqp_url(),
                &TopologyNames::new(&self.prefix),
                &test_agencies(),
            )
            .await
            .expect("delete topology");
        }
    }
}

async fn publish<T: Transport>(transport: &T, to: &str, payload: &str) {
    transport
        .publish(OutboundMessage {
            routing_key: to,
            message_id: payload,
            payload: payload.as_bytes(),
            traceparent: "",
        })
        .await
        .expect("publish confirmed");
}

async fn next<S: Subscription>(subscription: &mut S) -> Inbound<S::Acker> {
    tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("a message within 10 s")
        .expect("the subscription is healthy")
}

async fn assert_quiet<S: Subscription>(subscription: &mut S) {
    if let Ok(message) = tokio::time::timeout(QUIET, subscription.next()).await {
        panic!(
            "expected no message, got {:?}",
            message.map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        );
    }
}

fn text<A>(message: &Inbound<A>) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

async fn routes_by_agency_code_in_order<T: Transport>(transport: &T) {
    let mut district = transport
        .subscribe(&code(DISTRICT), 16)
        .await
        .expect("subscribe");
    let mut commune = transport
        .subscribe(&code(COMMUNE), 16)
        .await
        .expect("subscribe");
    for n in 0..5 {
        publish(transport, DISTRICT, &format!("to-district-{n}")).await;
    }
    for n in 0..5 {
        let message = next(&mut district).await;
        assert_eq!(text(&message), format!("to-district-{n}"));
        assert!(!message.redelivered);
        message.acker.ack().await.expect("ack");
    }
    assert_quiet(&mut commune).await;
}

/// A message of many frames (the hub asks RabbitMQ for 64 KiB frames) arrives whole, in one
/// delivery.
async fn a_message_larger_than_a_frame_arrives_whole<T: Transport>(transport: &T) {
    let mut district = transport
        .subscribe(&code(DISTRICT), 16)
        .await
        .expect("subscribe");
    let payload: Vec<u8> = (0..300 * 1024).map(|n: u32| (n % 251) as u8).collect();
    transport
        .publish(OutboundMessage {
            routing_key: DISTRICT,
            message_id: "large",
            payload: &payload,
            traceparent: "",
        })
        .await
        .expect("publish confirmed");
    let message = next(&mut district).await;
    assert_eq!(message.payload.len(), payload.len());
    assert!(
        message.payload[..] == payload[..],
        "the payload arrives unchanged"
    );
    message.acker.ack().await.expect("ack");
}

async fn unroutable_publishes_fail<T: Transport>(transport: &T) {
    let error = transport
        .publish(OutboundMessage {
            routing_key: STRANGER_CODE,
            message_id: "nowhere",
            payload: b"nowhere",
            traceparent: "",
        })
        .await
        .expect_err("no queue is bound to a stranger's code");
    assert!(
        matches!(error, TransportError::Unroutable { .. }),
        "{error:?}"
    );
}

async fn unsettled_messages_return_redelivered<T: Transport>(transport: &T) {
    let mut first = transport
        .subscribe(&code(COMMUNE), 16)
        .await
        .expect("subscribe");
    publish(transport, COMMUNE, "unsettled").await;
    let message = next(&mut first).await;
    assert!(!message.redelivered);
    drop(message);
    drop(first);
    let mut second = transport
        .subscribe(&code(COMMUNE), 16)
        .await
        .expect("subscribe again");
    let message = next(&mut second).await;
    assert_eq!(text(&message), "unsettled");
    assert!(
        message.redelivered,
        "a message returned unsettled is marked redelivered"
    );
    message.acker.ack().await.expect("ack");
}

async fn acknowledged_messages_are_gone<T: Transport>(transport: &T) {
    let mut first = transport
        .subscribe(&code(COMMUNE_2), 16)
        .await
        .expect("subscribe");
    publish(transport, COMMUNE_2, "acked").await;
    next(&mut first).await.acker.ack().await.expect("ack");
    drop(first);
    let mut second = transport
        .subscribe(&code(COMMUNE_2), 16)
        .await
        .expect("subscribe again");
    assert_quiet(&mut second).await;
}

async fn acking_after_the_subscription_closed_fails<T: Transport>(transport: &T) {
    let mut first = transport
        .subscribe(&code(PROVINCE), 16)
        .await
        .expect("subscribe");
    publish(transport, PROVINCE, "late ack").await;
    let message = next(&mut first).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        message.acker.ack().await.is_err(),
        "an ack on a closed subscription is refused"
    );
    let mut second = transport
        .subscribe(&code(PROVINCE), 16)
        .await
        .expect("subscribe again");
    let again = next(&mut second).await;
    assert_eq!(text(&again), "late ack");
    assert!(again.redelivered);
    again.acker.ack().await.expect("ack");
}

async fn prefetch_bounds_unsettled_messages<T: Transport>(transport: &T) {
    let mut subscription = transport
        .subscribe(&code(MINISTRY), 2)
        .await
        .expect("subscribe");
    for n in 0..3 {
        publish(transport, MINISTRY, &format!("prefetch-{n}")).await;
    }
    let first = next(&mut subscription).await;
    let second = next(&mut subscription).await;
    assert_quiet(&mut subscription).await;
    first.acker.ack().await.expect("ack");
    let third = next(&mut subscription).await;
    assert_eq!(text(&third), "prefetch-2");
    second.acker.ack().await.expect("ack");
    third.acker.ack().await.expect("ack");
}

/// Returns how many times a message that is always requeued was delivered before it went to
/// the dead letters.
async fn requeued_messages_go_to_the_dead_letters_at_the_limit<T: Transport>(transport: &T) -> u32 {
    let dead_before = transport.dead_letter_count().await.expect("count");
    let mut subscription = transport
        .subscribe(&code(DISTRICT), 16)
        .await
        .expect("subscribe");
    publish(transport, DISTRICT, "poison").await;
    let mut deliveries = 0;
    while let Ok(Ok(message)) =
        tokio::time::timeout(Duration::from_secs(2), subscription.next()).await
    {
        assert_eq!(text(&message), "poison");
        assert_eq!(message.redelivered, deliveries > 0);
        assert_eq!(
            message.delivery_count, deliveries,
            "returns before this delivery"
        );
        deliveries += 1;
        message.acker.requeue().await.expect("requeue");
        assert!(
            deliveries <= DELIVERY_LIMIT + 1,
            "the delivery limit stops redelivery"
        );
    }
    eventually(
        "the poison message is dead-lettered",
        Duration::from_secs(10),
        || async { transport.dead_letter_count().await.expect("count") == dead_before + 1 },
    )
    .await;
    deliveries
}

macro_rules! conformance {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn amqp() {
                let harness = super::amqp(stringify!($name)).await;
                super::$name(&harness.transport).await;
                harness.finish(true).await;
            }

            #[tokio::test]
            async fn embedded() {
                let harness = super::embedded(stringify!($name));
                super::$name(&harness.transport).await;
                harness.finish(false).await;
            }
        }
    };
}

conformance!(routes_by_agency_code_in_order);
conformance!(a_message_larger_than_a_frame_arrives_whole);
conformance!(unroutable_publishes_fail);
conformance!(unsettled_messages_return_redelivered);
conformance!(acknowledged_messages_are_gone);
conformance!(acking_after_the_subscription_closed_fails);
conformance!(prefetch_bounds_unsettled_messages);

/// Both transports deliver a poison message the same number of times before dead-lettering it.
#[tokio::test]
async fn the_delivery_limit_is_the_same_on_both_transports() {
    let rabbit = amqp("delivery_limit").await;
    let on_rabbit = requeued_messages_go_to_the_dead_letters_at_the_limit(&rabbit.transport).await;
    rabbit.finish(true).await;
    let local = embedded("delivery_limit");
    let on_embedded = requeued_messages_go_to_the_dead_letters_at_the_limit(&local.transport).await;
    local.finish(false).await;
    assert_eq!(on_rabbit, on_embedded, "deliveries before dead-lettering");
    assert_eq!(
        on_rabbit,
        DELIVERY_LIMIT + 1,
        "the first delivery and one per allowed return"
    );
}
