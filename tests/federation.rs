//! Hub federation end to end: a central hub and two province hubs as real processes on the
//! shared RabbitMQ. Documents cross provinces and reach ministries through the central hub;
//! receipts and status reports come back hop by hop; what no hub serves is refused where it
//! can be told, and otherwise comes back as a REJECTED receipt.

mod support;

use lienthong_proto::v1 as wire;
use std::time::Duration;
use support::federation::*;
use support::*;
use tonic::Code;
use wire::ReceiptKind as Kind;

/// The receipts of one recipient as (hub, kind), in order.
fn hops(trace: &wire::TrackResponse, agency: &str) -> Vec<(String, Kind)> {
    recipient_trace(trace, agency)
        .receipts
        .iter()
        .map(|r| (r.hub.clone(), r.kind()))
        .collect()
}

/// Tracks the document until `done` holds of the answer, failing the test after 15 s.
async fn track_until(
    client: &mut lienthong::client::ExchangeClient,
    document_id: &str,
    what: &str,
    done: impl Fn(&wire::TrackResponse) -> bool,
) -> wire::TrackResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let trace = track(client, document_id).await;
        if done(&trace) {
            return trace;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {trace:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_of(trace: &wire::TrackResponse, agency: &str) -> wire::DeliveryState {
    recipient_trace(trace, agency).state()
}

on_both_transports!(a_document_crosses_provinces_and_reaches_a_ministry_and_the_receipts_come_back);

async fn a_document_crosses_provinces_and_reaches_a_ministry_and_the_receipts_come_back(
    kind: TransportKind,
) {
    let federation = Federation::start("fed-path", kind).await;
    let mut sender = federation.province_a.client(COMMUNE_A).await;
    let mut commune_b = federation.province_b.client(COMMUNE_B).await;
    let mut ministry = federation.central.client(MINISTRY_HOME_AFFAIRS).await;
    let mut stream_b = open_stream(&mut commune_b).await;
    let mut stream_ministry = open_stream(&mut ministry).await;

    let sent = document(
        COMMUNE_A,
        &[COMMUNE_B, MINISTRY_HOME_AFFAIRS],
        "cross-province",
    );
    let id = send(&mut sender, sent.clone()).await;

    // Each recipient gets it once, as sent, with the hubs it passed.
    let at_b = next_delivery(&mut stream_b).await;
    let document_b = delivered_document(&at_b);
    assert_eq!(document_b.document_id, id);
    assert_eq!(without_trace(document_b), without_trace(&sent));
    let passed: Vec<&str> = document_b
        .trace
        .iter()
        .map(|hop| hop.hub.as_str())
        .collect();
    assert_eq!(passed, [PROVINCE_A, CENTRAL, PROVINCE_B]);
    ack(&mut commune_b, &at_b).await;
    let at_ministry = next_delivery(&mut stream_ministry).await;
    let document_ministry = delivered_document(&at_ministry);
    assert_eq!(document_ministry.document_id, id);
    let passed: Vec<&str> = document_ministry
        .trace
        .iter()
        .map(|hop| hop.hub.as_str())
        .collect();
    assert_eq!(passed, [PROVINCE_A, CENTRAL]);
    ack(&mut ministry, &at_ministry).await;
    assert_no_delivery(&mut stream_b, Duration::from_millis(500)).await;
    assert_no_delivery(&mut stream_ministry, Duration::from_millis(100)).await;

    // The commune of province B reports "accepted"; the status reaches the sender's stream.
    commune_b
        .report_status(wire::StatusReport {
            document_id: id.clone(),
            status_code: "03".into(),
            description: "received by the office".into(),
            ..Default::default()
        })
        .await
        .expect("the recipient reports a status");
    let mut stream_a = open_stream(&mut sender).await;
    let status = next_delivery(&mut stream_a).await;
    match &status.payload {
        Some(wire::delivery::Payload::Status(report)) => {
            assert_eq!(report.document_id, id);
            assert_eq!(report.status_code, "03");
            assert_eq!(report.from, COMMUNE_B);
        }
        other => panic!("expected a status report, got {other:?}"),
    }
    ack(&mut sender, &status).await;

    // Track at the origin shows the whole path of both recipients, hop by hop.
    let trace = track_until(
        &mut sender,
        &id,
        "the receipts of both recipients come back to the origin",
        |trace| {
            let b = hops(trace, COMMUNE_B);
            let m = hops(trace, MINISTRY_HOME_AFFAIRS);
            b.iter().any(|(_, k)| *k == Kind::Acknowledged)
                && b.iter().any(|(_, k)| *k == Kind::StatusReported)
                && m.iter().any(|(_, k)| *k == Kind::Acknowledged)
        },
    )
    .await;
    let to_b = hops(&trace, COMMUNE_B);
    for expected in [
        (PROVINCE_A, Kind::Accepted),
        (PROVINCE_A, Kind::Enqueued),
        (PROVINCE_A, Kind::Forwarded),
        (CENTRAL, Kind::Forwarded),
        (PROVINCE_B, Kind::Delivered),
        (PROVINCE_B, Kind::Acknowledged),
        (PROVINCE_A, Kind::StatusReported),
    ] {
        let count = to_b
            .iter()
            .filter(|(hub, kind)| hub == expected.0 && *kind == expected.1)
            .count();
        assert_eq!(count, 1, "{expected:?} once in {to_b:?}");
    }
    let forwarded: Vec<String> = recipient_trace(&trace, COMMUNE_B)
        .receipts
        .iter()
        .filter(|r| r.kind() == Kind::Forwarded)
        .map(|r| format!("{}->{}", r.hub, r.detail))
        .collect();
    assert_eq!(
        forwarded,
        [
            format!("{PROVINCE_A}->{CENTRAL}"),
            format!("{CENTRAL}->{PROVINCE_B}")
        ]
    );
    assert_eq!(
        state_of(&trace, COMMUNE_B),
        wire::DeliveryState::Acknowledged
    );
    let statuses = &recipient_trace(&trace, COMMUNE_B).statuses;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].status_code, "03");
    let to_ministry = hops(&trace, MINISTRY_HOME_AFFAIRS);
    for expected in [
        (PROVINCE_A, Kind::Forwarded),
        (CENTRAL, Kind::Delivered),
        (CENTRAL, Kind::Acknowledged),
    ] {
        assert!(
            to_ministry.contains(&(expected.0.to_owned(), expected.1)),
            "{expected:?} in {to_ministry:?}"
        );
    }
    assert_eq!(
        state_of(&trace, MINISTRY_HOME_AFFAIRS),
        wire::DeliveryState::Acknowledged
    );

    // Operators see the queue of the central hub among the province's queues, with the uplink
    // as its consumer, and nothing left in it.
    let queues = list_queues(federation.province_a.endpoint()).await;
    let uplink = queues
        .queues
        .iter()
        .find(|q| q.agency == CENTRAL)
        .expect("the queue of the central hub is listed");
    assert_eq!((uplink.ready, uplink.consumers), (0, 1), "{uplink:?}");

    // The recipient in province B can track the document at its own hub too.
    let at_b = track(&mut commune_b, &id).await;
    assert_eq!(
        state_of(&at_b, COMMUNE_B),
        wire::DeliveryState::Acknowledged
    );

    // A recall from the sender reaches the remote recipient.
    sender
        .report_status(wire::StatusReport {
            document_id: id.clone(),
            status_code: "13".into(),
            description: "sent in error".into(),
            ..Default::default()
        })
        .await
        .expect("the sender requests a recall");
    let recall = next_delivery(&mut stream_b).await;
    match &recall.payload {
        Some(wire::delivery::Payload::Status(report)) => {
            assert_eq!(
                (report.status_code.as_str(), report.from.as_str()),
                ("13", COMMUNE_A)
            );
        }
        other => panic!("expected the recall, got {other:?}"),
    }
    ack(&mut commune_b, &recall).await;
    federation.finish().await;
}

#[tokio::test]
async fn what_no_hub_serves_is_refused_where_it_can_be_told_and_rejected_otherwise() {
    let federation = Federation::start("fed-unknown", TransportKind::Amqp).await;
    let mut sender = federation.province_a.client(COMMUNE_A).await;

    // An unknown agency of the sender's own province: the origin can tell.
    let refused = sender
        .send(wire::SendRequest {
            document: Some(document(COMMUNE_A, &[STRANGER_CODE], "own province")),
        })
        .await
        .expect_err("an unknown agency of the province is refused");
    assert_eq!(refused.code(), Code::NotFound);
    assert!(
        refused.message().contains(STRANGER_CODE),
        "{}",
        refused.message()
    );

    // A province no hub serves: the central hub refuses; an unknown commune of province B:
    // province B refuses. Both come back to the sender as REJECTED, naming who refused.
    let no_province = "000.21.31.H99";
    let no_commune = "000.99.31.H54";
    let id = send(
        &mut sender,
        document(
            COMMUNE_A,
            &[no_province, no_commune, COMMUNE_B],
            "partly unknown",
        ),
    )
    .await;
    let trace = track_until(
        &mut sender,
        &id,
        "both refusals come back to the origin",
        |trace| {
            state_of(trace, no_province) == wire::DeliveryState::Rejected
                && state_of(trace, no_commune) == wire::DeliveryState::Rejected
        },
    )
    .await;
    let reason = |agency: &str| {
        recipient_trace(&trace, agency)
            .receipts
            .iter()
            .rfind(|r| r.kind() == Kind::Rejected)
            .map(|r| (r.hub.clone(), r.detail.clone()))
            .expect("a REJECTED receipt")
    };
    let (hub, detail) = reason(no_province);
    assert_eq!(hub, PROVINCE_A);
    assert!(
        detail.contains(&format!("refused by hub {CENTRAL}")) && detail.contains("H99"),
        "{detail}"
    );
    let (hub, detail) = reason(no_commune);
    assert_eq!(hub, CENTRAL);
    assert!(
        detail.contains(&format!("refused by hub {PROVINCE_B}")) && detail.contains(no_commune),
        "{detail}"
    );
    // The known recipient is not held up by the others.
    let mut commune_b = federation.province_b.client(COMMUNE_B).await;
    let mut stream_b = open_stream(&mut commune_b).await;
    let delivery = next_delivery(&mut stream_b).await;
    assert_eq!(delivered_document(&delivery).document_id, id);
    ack(&mut commune_b, &delivery).await;
    federation.finish().await;
}

#[tokio::test]
async fn forward_is_for_peer_hubs_and_refuses_loops() {
    let federation = Federation::start("fed-forward", TransportKind::Amqp).await;
    let forward = |identity: &'static str, request: wire::ForwardRequest| {
        let endpoint = federation.central.endpoint().to_owned();
        async move {
            let mut client = lienthong::client::connect(&endpoint, identity)
                .await
                .expect("connect");
            client.forward(request).await
        }
    };
    let mut looped = document(COMMUNE_A, &[COMMUNE_B], "looping");
    looped.trace = vec![
        wire::TraceHop {
            hub: PROVINCE_A.into(),
            at_unix_ms: 1,
        },
        wire::TraceHop {
            hub: CENTRAL.into(),
            at_unix_ms: 2,
        },
    ];
    let request = |document: wire::Document, recipient: &str| wire::ForwardRequest {
        message_id: document.document_id.clone(),
        recipient: recipient.into(),
        payload: Some(wire::forward_request::Payload::Document(document)),
    };
    let refused = forward(PROVINCE_A, request(looped.clone(), COMMUNE_B))
        .await
        .expect_err("a document that passed the central hub before is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("loop"), "{}", refused.message());

    // Back to the hub it came from: a loop too.
    let refused = forward(
        PROVINCE_A,
        request(document(COMMUNE_A, &[COMMUNE_2], "back home"), COMMUNE_2),
    )
    .await
    .expect_err("a message for the forwarding hub's own province is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Only peers forward, and each only for its own province's agencies.
    let fresh = document(COMMUNE_A, &[COMMUNE_B], "fresh");
    let refused = forward(COMMUNE_A, request(fresh.clone(), COMMUNE_B))
        .await
        .expect_err("an agency is not a hub");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = forward(
        PROVINCE_B,
        request(
            document(COMMUNE_A, &[MINISTRY_HOME_AFFAIRS], "impersonated"),
            MINISTRY_HOME_AFFAIRS,
        ),
    )
    .await
    .expect_err("province B does not speak for province A's communes");
    assert_eq!(refused.code(), Code::PermissionDenied);
    forward(PROVINCE_A, request(fresh.clone(), COMMUNE_B))
        .await
        .expect("province A forwards its commune's document");
    // Taken once, however often it is handed over.
    forward(PROVINCE_A, request(fresh.clone(), COMMUNE_B))
        .await
        .expect("a second hand-over is answered the same");
    let mut commune_b = federation.province_b.client(COMMUNE_B).await;
    let mut stream_b = open_stream(&mut commune_b).await;
    let delivery = next_delivery(&mut stream_b).await;
    assert_eq!(delivered_document(&delivery).document_id, fresh.document_id);
    ack(&mut commune_b, &delivery).await;
    assert_no_delivery(&mut stream_b, Duration::from_millis(700)).await;
    federation.finish().await;
}

/// Below its disk floor a hub refuses what another hub hands over as it refuses `Send`:
/// UNAVAILABLE, naming the floor, which the forwarding hub retries later.
#[tokio::test]
async fn below_its_disk_floor_a_hub_refuses_what_is_forwarded() {
    let mut federation = Federation::start("fed-floor", TransportKind::Amqp).await;
    // A floor above any disk's free space.
    const FLOOR_MIB: u64 = u64::MAX >> 21;
    federation.central.options.min_free_mib = FLOOR_MIB;
    federation.central.restart_after(Duration::ZERO).await;
    let mut province_a = lienthong::client::connect(federation.central.endpoint(), PROVINCE_A)
        .await
        .expect("connect");
    let document = document(COMMUNE_A, &[COMMUNE_B], "while the disk is low");
    let refused = province_a
        .forward(wire::ForwardRequest {
            message_id: document.document_id.clone(),
            recipient: COMMUNE_B.into(),
            payload: Some(wire::forward_request::Payload::Document(document)),
        })
        .await
        .expect_err("a document forwarded while the disk is below its floor");
    assert_refused_below_the_floor(&refused, FLOOR_MIB);
    federation.finish().await;
}

/// With the central hub down, a province goes on: it accepts every document, delivers inside
/// the province, and keeps the rest in its queue of the central hub until the link is back.
#[tokio::test]
async fn a_province_goes_on_while_the_central_hub_is_down() {
    let mut federation = Federation::start("fed-outage", TransportKind::Amqp).await;
    federation
        .central
        .process
        .child
        .kill()
        .await
        .expect("SIGKILL the central hub");
    let mut sender = federation.province_a.client(COMMUNE_A).await;
    let crossing = send(&mut sender, document(COMMUNE_A, &[COMMUNE_B], "waits")).await;
    let local = send(&mut sender, document(COMMUNE_A, &[COMMUNE_2], "stays home")).await;
    let mut neighbour = federation.province_a.client(COMMUNE_2).await;
    let mut stream_local = open_stream(&mut neighbour).await;
    let delivery = next_delivery(&mut stream_local).await;
    assert_eq!(delivered_document(&delivery).document_id, local);
    ack(&mut neighbour, &delivery).await;

    // The crossing document waits in the province's queue of the central hub (held by the
    // uplink, which retries).
    let origin = federation.province_a.endpoint().to_owned();
    eventually(
        "the crossing document waits in the queue of the central hub",
        Duration::from_secs(10),
        || async {
            list_queues(&origin)
                .await
                .queues
                .iter()
                .any(|q| q.agency == CENTRAL && q.ready + q.unacknowledged == 1)
        },
    )
    .await;
    // Still ready (it serves its province), and it says the uplink is down.
    let http = federation.province_a.options.http_listen.clone();
    let (status, body) = http_get(&http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("uplink: {CENTRAL} unreachable")),
        "{body}"
    );
    let trace = track(&mut sender, &crossing).await;
    assert!(
        !hops(&trace, COMMUNE_B)
            .iter()
            .any(|(_, kind)| *kind == Kind::Forwarded),
        "not forwarded while the central hub is down: {trace:?}"
    );

    // The central hub comes back on the same data and port; the document flows.
    federation.central.restart_after(Duration::ZERO).await;
    let mut commune_b = federation.province_b.client(COMMUNE_B).await;
    let mut stream_b = open_stream(&mut commune_b).await;
    let delivery = tokio::time::timeout(Duration::from_secs(30), stream_b.message())
        .await
        .expect("the document arrives once the central hub is back")
        .expect("healthy stream")
        .expect("open stream");
    assert_eq!(delivered_document(&delivery).document_id, crossing);
    ack(&mut commune_b, &delivery).await;
    assert_no_delivery(&mut stream_b, Duration::from_millis(500)).await;
    // The uplink's own stream from the central hub reconnects too (after its backoff).
    eventually(
        "the province reports its uplink connected again",
        Duration::from_secs(15),
        || async {
            let (_, body) = http_get(&http, "/readyz").await;
            let (_, metrics) = http_get(&http, "/metrics").await;
            body.contains(&format!("uplink: connected to {CENTRAL}"))
                && metrics.contains("lienthong_uplink_connected 1")
        },
    )
    .await;
    federation.finish().await;
}
