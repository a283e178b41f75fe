//! End-to-end tests of the document exchange through a hub running in the test process:
//! send → receive → ack → track, status reports, redelivery, idempotency, refusals that leave
//! no trace, and access rules. Each scenario runs on RabbitMQ and on the embedded transport.

mod support;

use lienthong_proto::v1 as wire;
use std::time::Duration;
use support::*;
use tonic::Code;
use wire::ReceiptKind::{Accepted, Acknowledged, Delivered, Enqueued, Rejected};

const QUIET: Duration = Duration::from_millis(500);

async fn send_receive_ack_track<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("e2e", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut neighbour = hub.client(COMMUNE_2).await;
    let mut district_stream = open_stream(&mut district).await;
    let mut neighbour_stream = open_stream(&mut neighbour).await;

    let mut sent = document(
        COMMUNE,
        &[DISTRICT, COMMUNE_2],
        "Báo cáo tình hình tháng 11",
    );
    sent.priority = 1;
    sent.attachments.push(wire::Attachment {
        name: "bao-cao.pdf".into(),
        content_type: "application/pdf".into(),
        content: vec![0x25, 0x50, 0x44, 0x46],
        description: "Báo cáo".into(),
    });
    let response = commune
        .send(wire::SendRequest {
            document: Some(sent.clone()),
        })
        .await
        .expect("send")
        .into_inner();
    assert_eq!(response.document_id, sent.document_id);
    assert_eq!(response.receipts.len(), 2);
    assert!(
        response
            .receipts
            .iter()
            .all(|r| r.kind() == Accepted && r.hub == PROVINCE)
    );

    for (client, stream) in [
        (&mut district, &mut district_stream),
        (&mut neighbour, &mut neighbour_stream),
    ] {
        let delivery = next_delivery(stream).await;
        assert!(!delivery.redelivered);
        let received = delivered_document(&delivery);
        assert_eq!(
            without_trace(received),
            sent,
            "the document arrives unchanged"
        );
        assert_eq!(received.trace.len(), 1, "one hop: this hub");
        assert_eq!(received.trace[0].hub, PROVINCE);
        ack(client, &delivery).await;
    }

    let trace = track(&mut commune, &sent.document_id).await;
    for recipient in [DISTRICT, COMMUNE_2] {
        assert_eq!(
            receipt_kinds(&trace, recipient),
            vec![Accepted, Enqueued, Delivered, Acknowledged]
        );
    }
    assert!(
        trace
            .recipients
            .iter()
            .all(|r| r.state() == wire::DeliveryState::Acknowledged)
    );
    let seqs: Vec<u64> = trace.recipients[0].receipts.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "receipt sequence numbers grow: {seqs:?}"
    );
    hub.finish().await;
}

async fn status_reports_reach_the_other_party<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("status", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut commune_stream = open_stream(&mut commune).await;
    let mut district_stream = open_stream(&mut district).await;
    let document_id = send(&mut commune, document(COMMUNE, &[DISTRICT], "Tờ trình")).await;
    let delivery = next_delivery(&mut district_stream).await;
    ack(&mut district, &delivery).await;

    for (code, description) in [
        ("01", "đã nhận"),
        ("03", "đã vào sổ"),
        ("06", "đã hoàn thành"),
    ] {
        let receipts = district
            .report_status(wire::StatusReport {
                document_id: document_id.clone(),
                status_code: code.into(),
                description: description.into(),
                ..Default::default()
            })
            .await
            .expect("report status")
            .into_inner()
            .receipts;
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].kind(), wire::ReceiptKind::StatusReported);
        let delivery = next_delivery(&mut commune_stream).await;
        match &delivery.payload {
            Some(wire::delivery::Payload::Status(status)) => {
                assert_eq!(status.document_id, document_id);
                assert_eq!(status.status_code, code);
                assert_eq!(status.description, description);
                assert_eq!(status.from, DISTRICT);
            }
            other => panic!("expected a status report, got {other:?}"),
        }
        ack(&mut commune, &delivery).await;
    }

    // The sender asks for a recall; the recipient answers.
    commune
        .report_status(wire::StatusReport {
            document_id: document_id.clone(),
            status_code: "13".into(),
            description: "xin thu hồi".into(),
            ..Default::default()
        })
        .await
        .expect("recall request");
    let recall = next_delivery(&mut district_stream).await;
    assert!(
        matches!(&recall.payload, Some(wire::delivery::Payload::Status(s)) if s.status_code == "13")
    );
    ack(&mut district, &recall).await;

    let trace = track(&mut commune, &document_id).await;
    let codes: Vec<&str> = trace.recipients[0]
        .statuses
        .iter()
        .map(|s| s.status_code.as_str())
        .collect();
    assert_eq!(codes, ["01", "03", "06", "13"]);
    assert_eq!(
        trace.recipients[0].state(),
        wire::DeliveryState::Acknowledged
    );
    hub.finish().await;
}

async fn unacknowledged_documents_are_redelivered<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("redeliver", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let document_id = send(&mut commune, document(COMMUNE, &[DISTRICT], "Công văn")).await;

    let mut first_stream = open_stream(&mut district).await;
    let first = next_delivery(&mut first_stream).await;
    assert!(!first.redelivered);
    drop(first_stream);

    let mut second_stream = open_stream(&mut district).await;
    let second = next_delivery(&mut second_stream).await;
    assert_eq!(delivered_document(&second).document_id, document_id);
    assert!(
        second.redelivered,
        "a document shown before and not acknowledged is marked redelivered"
    );

    // The first stream's token died with it.
    let stale = district
        .ack(wire::AckRequest {
            ack_token: first.ack_token.clone(),
            reject: false,
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("stale token");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("redelivered"),
        "{}",
        stale.message()
    );

    ack(&mut district, &second).await;
    drop(second_stream);
    let mut third_stream = open_stream(&mut district).await;
    assert_no_delivery(&mut third_stream, QUIET).await;

    let trace = track(&mut commune, &document_id).await;
    assert_eq!(
        receipt_kinds(&trace, DISTRICT),
        vec![Accepted, Enqueued, Delivered, Delivered, Acknowledged]
    );
    hub.finish().await;
}

async fn rejected_documents_come_back<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("reject", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let document_id = send(&mut commune, document(COMMUNE, &[DISTRICT], "Giấy mời")).await;
    let first = next_delivery(&mut stream).await;
    district
        .ack(wire::AckRequest {
            ack_token: first.ack_token.clone(),
            reject: true,
            reason: "cannot store attachments right now".into(),
            ..Default::default()
        })
        .await
        .expect("reject");
    let again = next_delivery(&mut stream).await;
    assert!(again.redelivered);
    ack(&mut district, &again).await;
    let trace = track(&mut commune, &document_id).await;
    assert_eq!(
        receipt_kinds(&trace, DISTRICT),
        vec![
            Accepted,
            Enqueued,
            Delivered,
            Rejected,
            Delivered,
            Acknowledged
        ]
    );
    let rejected = &trace.recipients[0].receipts[3];
    assert_eq!(rejected.detail, "cannot store attachments right now");
    hub.finish().await;
}

async fn several_deliveries_are_settled_in_one_ack<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("ack-many", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let mut document_ids = Vec::new();
    for title in ["Công văn số 1", "Công văn số 2", "Công văn số 3"] {
        document_ids.push(send(&mut commune, document(COMMUNE, &[DISTRICT], title)).await);
    }
    let mut deliveries = Vec::new();
    for _ in 0..document_ids.len() {
        deliveries.push(next_delivery(&mut stream).await);
    }
    let token_of = |document_id: &str| {
        deliveries
            .iter()
            .find(|delivery| delivered_document(delivery).document_id == document_id)
            .expect("delivered")
            .ack_token
            .clone()
    };
    let (first, second, third) = (
        token_of(&document_ids[0]),
        token_of(&document_ids[1]),
        token_of(&document_ids[2]),
    );

    // Refused whole, settling nothing: a token in both fields, or too many tokens.
    let both = district
        .ack(wire::AckRequest {
            ack_token: first.clone(),
            ack_tokens: vec![second.clone()],
            ..Default::default()
        })
        .await
        .expect_err("ack_token beside ack_tokens");
    assert_eq!(both.code(), Code::InvalidArgument);
    assert!(both.message().contains("ack_token"), "{}", both.message());
    let too_many = district
        .ack(wire::AckRequest {
            ack_tokens: vec![first.clone(); 1025],
            ..Default::default()
        })
        .await
        .expect_err("more tokens than one call settles");
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(
        too_many.message().contains("ack_tokens") && too_many.message().contains("1024"),
        "{}",
        too_many.message()
    );

    // Two settled in one call; an unknown token and a repeated one fail on their own.
    let answer = district
        .ack(wire::AckRequest {
            ack_tokens: vec![
                first.clone(),
                "not-a-token".into(),
                second.clone(),
                first.clone(),
            ],
            ..Default::default()
        })
        .await
        .expect("a call with some bad tokens is answered")
        .into_inner();
    let failures: Vec<(&str, Code)> = answer
        .failures
        .iter()
        .map(|failure| (failure.ack_token.as_str(), Code::from(failure.code)))
        .collect();
    assert_eq!(
        failures,
        [
            ("not-a-token", Code::FailedPrecondition),
            (first.as_str(), Code::FailedPrecondition),
        ]
    );
    assert!(
        answer.failures[1].message.contains("earlier Ack"),
        "{}",
        answer.failures[1].message
    );

    // Only the third comes again, on the next stream.
    drop(stream);
    let mut stream = open_stream(&mut district).await;
    let again = next_delivery(&mut stream).await;
    assert_eq!(delivered_document(&again).document_id, document_ids[2]);
    assert!(again.redelivered);
    let answer = district
        .ack(wire::AckRequest {
            ack_tokens: vec![again.ack_token.clone()],
            ..Default::default()
        })
        .await
        .expect("ack")
        .into_inner();
    assert!(answer.failures.is_empty(), "{:?}", answer.failures);
    assert_ne!(again.ack_token, third, "a new stream gives new tokens");
    drop(stream);
    let mut stream = open_stream(&mut district).await;
    assert_no_delivery(&mut stream, QUIET).await;

    for document_id in &document_ids[..2] {
        let trace = track(&mut commune, document_id).await;
        assert_eq!(
            receipt_kinds(&trace, DISTRICT),
            vec![Accepted, Enqueued, Delivered, Acknowledged]
        );
    }
    let trace = track(&mut commune, &document_ids[2]).await;
    assert_eq!(
        receipt_kinds(&trace, DISTRICT),
        vec![Accepted, Enqueued, Delivered, Delivered, Acknowledged]
    );
    hub.finish().await;
}

async fn sending_is_idempotent_on_the_document_id<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("idempotent", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let original = document(COMMUNE, &[DISTRICT], "Quyết định");
    let first = commune
        .send(wire::SendRequest {
            document: Some(original.clone()),
        })
        .await
        .expect("send")
        .into_inner();
    let again = commune
        .send(wire::SendRequest {
            document: Some(original.clone()),
        })
        .await
        .expect("resend")
        .into_inner();
    assert_eq!(
        first, again,
        "the same id and content answer the first result"
    );

    let mut altered = original.clone();
    altered.body = b"other content".to_vec();
    let conflict = commune
        .send(wire::SendRequest {
            document: Some(altered),
        })
        .await
        .expect_err("other content under the same id");
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(
        conflict.message().contains("document.document_id"),
        "{}",
        conflict.message()
    );

    // Sent eight times at once, a document is still accepted once: copies recorded in the
    // same transaction find the first.
    let at_once = document(COMMUNE, &[DISTRICT], "Công văn");
    let answers = futures_util::future::join_all((0..8).map(|_| {
        let mut commune = commune.clone();
        let request = wire::SendRequest {
            document: Some(at_once.clone()),
        };
        async move {
            commune
                .send(request)
                .await
                .expect("send at once")
                .into_inner()
        }
    }))
    .await;
    assert_eq!(answers[0].receipts.len(), 1, "{answers:?}");
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "every copy answers the first result: {answers:?}"
    );

    let mut stream = open_stream(&mut district).await;
    for expected in [&original, &at_once] {
        let delivery = next_delivery(&mut stream).await;
        assert_eq!(&without_trace(delivered_document(&delivery)), expected);
        ack(&mut district, &delivery).await;
    }
    assert_no_delivery(&mut stream, QUIET).await;
    hub.finish().await;
}

async fn bad_input_is_refused_and_leaves_no_trace<K: Into<Kind>>(kind: K) {
    let options = HubOptions {
        max_document_bytes: 4096,
        ..HubOptions::new(kind.into().0)
    };
    let hub = TestHub::start("refusals", options).await;
    let mut commune = hub.client(COMMUNE).await;

    type Breaker = fn(&mut wire::Document);
    let cases: Vec<(&str, Breaker, Code, &str)> = vec![
        (
            "malformed recipient",
            |d| d.to = vec!["31.H53".into()],
            Code::InvalidArgument,
            "document.to[0]",
        ),
        (
            "no recipients",
            |d| d.to.clear(),
            Code::InvalidArgument,
            "document.to",
        ),
        (
            "unknown recipient",
            |d| d.to = vec![STRANGER_CODE.into()],
            Code::NotFound,
            "document.to[0]",
        ),
        (
            "spoofed sender",
            |d| d.from = DISTRICT.into(),
            Code::PermissionDenied,
            "document.from",
        ),
        (
            "malformed sender",
            |d| d.from = "H53".into(),
            Code::InvalidArgument,
            "document.from",
        ),
        (
            "body over the limit",
            |d| d.body = vec![b'x'; 8192],
            Code::ResourceExhausted,
            "max_document_bytes",
        ),
        (
            "bad urgency",
            |d| d.priority = 7,
            Code::InvalidArgument,
            "document.priority",
        ),
        (
            "no subject",
            |d| d.subject.clear(),
            Code::InvalidArgument,
            "document.subject",
        ),
    ];
    let mut refused_ids = Vec::new();
    for (case, break_it, code, named) in cases {
        let mut bad = document(COMMUNE, &[DISTRICT], case);
        break_it(&mut bad);
        refused_ids.push(bad.document_id.clone());
        let status = commune
            .send(wire::SendRequest {
                document: Some(bad),
            })
            .await
            .expect_err(case);
        assert_eq!(status.code(), code, "{case}: {}", status.message());
        assert!(
            status.message().contains(named),
            "{case}: `{}` names {named}",
            status.message()
        );
    }
    let missing = commune
        .send(wire::SendRequest { document: None })
        .await
        .expect_err("no document");
    assert_eq!(missing.code(), Code::InvalidArgument);

    let mut anonymous =
        lienthong_proto::v1::document_exchange_client::DocumentExchangeClient::connect(
            hub.endpoint.clone(),
        )
        .await
        .expect("connect");
    let unauthenticated = anonymous
        .send(wire::SendRequest {
            document: Some(document(COMMUNE, &[DISTRICT], "anonymous")),
        })
        .await
        .expect_err("no identity");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    // Nothing was stored or published: no document is known, no queue got a message.
    for id in &refused_ids {
        let status = commune
            .track(wire::TrackRequest {
                document_id: id.clone(),
            })
            .await
            .expect_err("refused documents are unknown");
        assert_eq!(status.code(), Code::NotFound, "{id}");
    }
    for agency in [DISTRICT, COMMUNE_2, PROVINCE] {
        let mut client = hub.client(agency).await;
        let mut stream = open_stream(&mut client).await;
        assert_no_delivery(&mut stream, QUIET).await;
    }
    hub.finish().await;
}

async fn access_rules_hold<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("access", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut outsider = hub.client(COMMUNE_2).await;
    let document_id = send(&mut commune, document(COMMUNE, &[DISTRICT], "Mật")).await;
    let mut stream = open_stream(&mut district).await;
    let delivery = next_delivery(&mut stream).await;

    let denied = outsider
        .track(wire::TrackRequest {
            document_id: document_id.clone(),
        })
        .await
        .expect_err("an outsider cannot track");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains(COMMUNE_2), "{}", denied.message());

    let denied = outsider
        .ack(wire::AckRequest {
            ack_token: delivery.ack_token.clone(),
            reject: false,
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("an outsider cannot settle another agency's delivery");
    assert_eq!(denied.code(), Code::PermissionDenied);

    let denied = outsider
        .report_status(wire::StatusReport {
            document_id: document_id.clone(),
            status_code: "03".into(),
            ..Default::default()
        })
        .await
        .expect_err("only a recipient reports status");
    assert_eq!(denied.code(), Code::PermissionDenied);

    let denied = district
        .report_status(wire::StatusReport {
            document_id: document_id.clone(),
            status_code: "13".into(),
            ..Default::default()
        })
        .await
        .expect_err("only the sender requests a recall");
    assert_eq!(denied.code(), Code::PermissionDenied);

    let invalid = district
        .report_status(wire::StatusReport {
            document_id: document_id.clone(),
            status_code: "07".into(),
            ..Default::default()
        })
        .await
        .expect_err("07 is not a status code");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("status_code"),
        "{}",
        invalid.message()
    );

    let unknown = district
        .ack(wire::AckRequest {
            ack_token: "not-a-token".into(),
            reject: false,
            reason: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("unknown token");
    assert_eq!(unknown.code(), Code::FailedPrecondition);

    // The refused calls changed nothing: the delivery is still the district's to settle.
    ack(&mut district, &delivery).await;
    let trace = track(&mut commune, &document_id).await;
    assert_eq!(
        receipt_kinds(&trace, DISTRICT),
        vec![Accepted, Enqueued, Delivered, Acknowledged]
    );
    assert!(trace.recipients[0].statuses.is_empty());
    hub.finish().await;
}

/// A copy of an acknowledged document put on the queue again (as a republish after a crash
/// would) is dropped by the hub, never shown to the recipient.
#[tokio::test]
async fn a_duplicate_of_an_acknowledged_document_is_never_shown() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use prost::Message;

    let hub = TestHub::start("duplicate", HubOptions::new(TransportKind::Amqp)).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let sent = document(COMMUNE, &[DISTRICT], "Thông báo");
    let document_id = send(&mut commune, sent.clone()).await;
    let mut stream = open_stream(&mut district).await;
    let delivery = next_delivery(&mut stream).await;
    ack(&mut district, &delivery).await;

    let duplicate = wire::QueuedMessage {
        message_id: document_id.clone(),
        recipient: DISTRICT.into(),
        payload: Some(wire::queued_message::Payload::Document(sent)),
        ..Default::default()
    };
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let names = lienthong::transport::TopologyNames::new(&hub.files.prefix);
    channel
        .basic_publish(
            names.documents_exchange().into(),
            DISTRICT.into(),
            BasicPublishOptions::default(),
            &duplicate.encode_to_vec(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    assert_no_delivery(&mut stream, Duration::from_secs(1)).await;
    let queue = channel
        .queue_declare(
            names.agency_queue(&DISTRICT.parse().expect("code")).into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("inspect the queue");
    assert_eq!(
        queue.message_count(),
        0,
        "the duplicate was consumed and dropped"
    );
    let _ = connection.close(200, "done".into()).await;
    hub.finish().await;
}

/// While RabbitMQ cannot be reached, `Send` keeps accepting into the outbox up to its bound,
/// then answers UNAVAILABLE naming the limit.
#[tokio::test]
async fn the_outbox_bound_refuses_with_unavailable() {
    let options = HubOptions {
        amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port())),
        max_outbox_messages: 3,
        ..HubOptions::new(TransportKind::Amqp)
    };
    let hub = TestHub::start("outbox_bound", options).await;
    let mut commune = hub.client(COMMUNE).await;
    for n in 0..3 {
        send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], &format!("queued {n}")),
        )
        .await;
    }
    let refused = commune
        .send(wire::SendRequest {
            document: Some(document(COMMUNE, &[DISTRICT], "one too many")),
        })
        .await
        .expect_err("the outbox is full");
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("max_outbox_messages"),
        "{}",
        refused.message()
    );
    let (status, body) = http_get(&hub.options.http_listen, "/readyz").await;
    assert_eq!(status, 503, "not ready without RabbitMQ: {body}");
    assert!(
        body.contains("transport: not connected") && body.contains("3 messages in the outbox"),
        "{body}"
    );
    let (status, _) = http_get(&hub.options.http_listen, "/healthz").await;
    assert_eq!(status, 200, "alive all the same");
    let listed = operator(&hub.endpoint)
        .await
        .list_queues(wire::ListQueuesRequest {})
        .await
        .expect("operators still see the outbox while RabbitMQ is away")
        .into_inner();
    assert_eq!(listed.outbox_depth, 3);
    assert!(!listed.transport_error.is_empty());
    hub.finish().await;
}

async fn a_document_rejected_past_the_delivery_limit_is_dead_lettered<K: Into<Kind>>(kind: K) {
    let kind = kind.into().0;
    let options = HubOptions {
        delivery_limit: 2,
        ..HubOptions::new(kind)
    };
    let hub = TestHub::start("poison", options).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let poison = send(&mut commune, document(COMMUNE, &[DISTRICT], "poison")).await;
    for attempt in 0..3 {
        let delivery = next_delivery(&mut stream).await;
        assert_eq!(delivered_document(&delivery).document_id, poison);
        assert_eq!(delivery.redelivered, attempt > 0);
        district
            .ack(wire::AckRequest {
                ack_token: delivery.ack_token.clone(),
                reject: true,
                reason: format!("cannot parse, attempt {attempt}"),
                ..Default::default()
            })
            .await
            .expect("reject");
    }
    // Dead-lettered: not delivered again, and other documents still flow.
    let healthy = send(&mut commune, document(COMMUNE, &[DISTRICT], "healthy")).await;
    let delivery = next_delivery(&mut stream).await;
    assert_eq!(delivered_document(&delivery).document_id, healthy);
    ack(&mut district, &delivery).await;
    assert_no_delivery(&mut stream, QUIET).await;

    let trace = track(&mut commune, &poison).await;
    let dead = wire::ReceiptKind::DeadLettered;
    assert_eq!(
        receipt_kinds(&trace, DISTRICT),
        vec![
            Accepted, Enqueued, Delivered, Rejected, Delivered, Rejected, Delivered, dead
        ]
    );
    assert_eq!(
        trace.recipients[0].state(),
        wire::DeliveryState::DeadLettered
    );
    let reason = &trace.recipients[0].receipts.last().expect("receipt").detail;
    assert!(
        reason.contains("delivery_limit 2") && reason.contains("attempt 2"),
        "{reason}"
    );
    // The hub keeps the dead letter; an operator sees it with its reason and replays it.
    eventually(
        "the hub keeps the dead letter",
        Duration::from_secs(10),
        || async { dead_letters(&hub.endpoint, DISTRICT).await.len() == 1 },
    )
    .await;
    let kept = dead_letters(&hub.endpoint, DISTRICT).await;
    assert_eq!(kept[0].document_id, poison);
    assert!(
        kept[0].reason.contains("delivery_limit 2"),
        "{}",
        kept[0].reason
    );
    let replay = operator(&hub.endpoint)
        .await
        .replay_dead_letters(wire::ReplayDeadLettersRequest {
            agency: DISTRICT.into(),
            document_ids: vec![poison.clone()],
            limit: 0,
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replay.replayed, 1);
    let again = next_delivery(&mut stream).await;
    assert_eq!(delivered_document(&again).document_id, poison);
    ack(&mut district, &again).await;
    assert!(dead_letters(&hub.endpoint, DISTRICT).await.is_empty());
    let trace = track(&mut commune, &poison).await;
    let kinds = receipt_kinds(&trace, DISTRICT);
    assert_eq!(
        kinds[7..],
        [
            dead,
            wire::ReceiptKind::Replayed,
            Enqueued,
            Delivered,
            Acknowledged
        ]
    );
    assert_eq!(
        trace.recipients[0].state(),
        wire::DeliveryState::Acknowledged
    );
    hub.finish().await;
}

async fn a_stuck_recipient_does_not_delay_another<K: Into<Kind>>(kind: K) {
    let options = HubOptions {
        prefetch: 2,
        ..HubOptions::new(kind.into().0)
    };
    let hub = TestHub::start("stuck", options).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut neighbour = hub.client(COMMUNE_2).await;
    let mut stuck = open_stream(&mut district).await;
    let mut flowing = open_stream(&mut neighbour).await;
    for n in 0..6 {
        send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], &format!("backlog {n}")),
        )
        .await;
    }
    // The district holds its prefetch of 2 and acknowledges nothing.
    next_delivery(&mut stuck).await;
    next_delivery(&mut stuck).await;
    assert_no_delivery(&mut stuck, QUIET).await;
    for n in 0..3 {
        let id = send(
            &mut commune,
            document(COMMUNE, &[COMMUNE_2], &format!("other {n}")),
        )
        .await;
        let delivery = next_delivery(&mut flowing).await;
        assert_eq!(delivered_document(&delivery).document_id, id);
        ack(&mut neighbour, &delivery).await;
    }
    hub.finish().await;
}

/// Documents that waited in the outbox (RabbitMQ unreachable) are published most urgent first.
#[tokio::test]
async fn the_outbox_drains_most_urgent_first() {
    let unreachable = HubOptions {
        amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port())),
        ..HubOptions::new(TransportKind::Amqp)
    };
    let hub = TestHub::start("drain_order", unreachable).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut expected = Vec::new();
    for (n, priority) in [0, 0, 3, 1, 0, 4, 3, 2, 0, 4].into_iter().enumerate() {
        let mut doc = document(COMMUNE, &[DISTRICT], &format!("urgency {priority} #{n}"));
        doc.priority = priority;
        expected.push((priority, send(&mut commune, doc).await));
    }
    let files = hub.stop().await;
    // Most urgent first, then oldest first.
    expected.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));

    let reachable = HubOptions::new(TransportKind::Amqp);
    files.write_config(&reachable);
    let hub = TestHub::start_with(files, reachable).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let mut received = Vec::new();
    for _ in 0..expected.len() {
        let delivery = next_delivery(&mut stream).await;
        let document = delivered_document(&delivery);
        received.push((document.priority, document.document_id.clone()));
        ack(&mut district, &delivery).await;
    }
    assert_eq!(received, expected);
    hub.finish().await;
}

async fn operators_see_health_readiness_and_metrics<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("http", HubOptions::new(kind.into().0)).await;
    let address = hub.options.http_listen.clone();
    assert_eq!(
        http_get(&address, "/healthz").await,
        (200, "ok\n".to_owned())
    );
    eventually("the hub is ready", Duration::from_secs(10), || async {
        http_get(&address, "/readyz").await.0 == 200
    })
    .await;
    let (_, ready) = http_get(&address, "/readyz").await;
    assert!(
        ready.starts_with("ready\n") && ready.contains("warning: no authentication"),
        "{ready}"
    );

    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let mut stream = open_stream(&mut district).await;
    let mut express = document(COMMUNE, &[DISTRICT], "Hỏa tốc");
    express.priority = 3;
    send(&mut commune, express).await;
    let delivery = next_delivery(&mut stream).await;
    ack(&mut district, &delivery).await;

    let (status, metrics) = http_get(&address, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        r#"lienthong_documents_total{event="accepted",urgency="3",level="district"} 1"#,
        r#"lienthong_documents_total{event="delivered",urgency="3",level="district"} 1"#,
        r#"lienthong_documents_total{event="acknowledged",urgency="3",level="district"} 1"#,
        "lienthong_send_latency_seconds_count 1",
        "lienthong_end_to_end_latency_seconds_count 1",
        "lienthong_publish_confirm_latency_seconds_count 1",
        "lienthong_outbox_depth 0",
        "lienthong_transport_connected 1",
    ] {
        assert!(
            metrics.contains(expected),
            "/metrics shows `{expected}`:\n{metrics}"
        );
    }
    hub.finish().await;
}

/// gRPC health reports the exchange as serving, and reflection lists its services.
#[tokio::test]
async fn health_and_reflection_are_on() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let hub = TestHub::start("grpc_services", HubOptions::new(TransportKind::Embedded)).await;
    let channel = tonic::transport::Endpoint::from_shared(hub.endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lienthong.v1.DocumentExchange".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("a response")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"lienthong.v1.DocumentExchange"),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    hub.finish().await;
}

/// The hub tells clients in its HTTP/2 settings that they may send frames of up to
/// `MAX_HTTP2_FRAME_BYTES`, so a document of 16 KiB or 256 KiB crosses in one DATA frame.
#[tokio::test]
async fn the_hub_takes_a_document_in_one_http2_frame() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SETTINGS: u8 = 0x4;
    const ACK: u8 = 0x1;
    const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

    let hub = TestHub::start("frames", HubOptions::new(TransportKind::Embedded)).await;
    let address = hub.endpoint.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    // The client preface and an empty SETTINGS frame (length 0, stream 0).
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("write the preface");
    let advertised = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut header = [0u8; 9];
            socket.read_exact(&mut header).await.expect("frame header");
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; length];
            socket
                .read_exact(&mut payload)
                .await
                .expect("frame payload");
            if header[3] != SETTINGS || header[4] & ACK != 0 {
                continue;
            }
            break payload
                .chunks_exact(6)
                .find(|entry| u16::from_be_bytes([entry[0], entry[1]]) == SETTINGS_MAX_FRAME_SIZE)
                .map(|entry| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
        }
    })
    .await
    .expect("the hub's SETTINGS frame within 5 s");
    assert_eq!(advertised, Some(lienthong::server::MAX_HTTP2_FRAME_BYTES));
    hub.finish().await;
}

async fn operators_list_queues_and_others_may_not<K: Into<Kind>>(kind: K) {
    let hub = TestHub::start("admin", HubOptions::new(kind.into().0)).await;
    let mut commune = hub.client(COMMUNE).await;
    for n in 0..2 {
        send(
            &mut commune,
            document(COMMUNE, &[COMMUNE_2], &format!("waiting {n}")),
        )
        .await;
    }
    let admin = operator(&hub.endpoint).await;
    let list = || list_queues(&hub.endpoint);
    let waiting = |listed: &wire::ListQueuesResponse| {
        listed
            .queues
            .iter()
            .find(|q| q.agency == COMMUNE_2)
            .map(|q| q.ready)
    };
    // The publisher records a confirmed publish just after the queue shows the message.
    eventually(
        "both documents wait in the neighbour's queue, none in the outbox",
        Duration::from_secs(10),
        || async {
            let listed = list().await;
            waiting(&listed) == Some(2) && listed.outbox_depth == 0
        },
    )
    .await;
    let listed = list().await;
    assert_eq!(listed.queues.len(), test_agencies().len());
    assert_eq!(listed.outbox_depth, 0);
    let table = lienthong::cli::queues_table(&listed);
    assert!(
        table.contains(COMMUNE_2) && table.contains("READY"),
        "{table}"
    );
    assert!(lienthong::cli::queues_json(&listed).contains(r#""ready":2"#));

    let outsider = lienthong::client::connect_admin(&hub.endpoint, COMMUNE)
        .await
        .expect("connect");
    let denied = outsider
        .clone()
        .list_queues(wire::ListQueuesRequest {})
        .await
        .expect_err("an agency is not an operator");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains(COMMUNE) && denied.message().contains("ListQueues"),
        "{}",
        denied.message()
    );
    let denied = outsider
        .clone()
        .list_dead_letters(wire::ListDeadLettersRequest::default())
        .await
        .expect_err("not an operator");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = outsider
        .clone()
        .replay_dead_letters(wire::ReplayDeadLettersRequest {
            agency: COMMUNE_2.into(),
            document_ids: vec![],
            limit: 0,
        })
        .await
        .expect_err("not an operator");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let invalid = admin
        .clone()
        .replay_dead_letters(wire::ReplayDeadLettersRequest::default())
        .await
        .expect_err("replay what?");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    hub.finish().await;
}

/// RabbitMQ counts deliveries left unacknowledged by closed streams; past the backstop
/// `queue_delivery_limit` the queue dead-letters the document itself, and the hub's keeper
/// still writes its DEAD_LETTERED receipt.
#[tokio::test]
async fn the_queue_backstop_dead_letters_with_a_receipt() {
    let options = HubOptions {
        delivery_limit: 1,
        queue_delivery_limit: 2,
        ..HubOptions::new(TransportKind::Amqp)
    };
    let hub = TestHub::start("backstop", options).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let id = send(
        &mut commune,
        document(COMMUNE, &[DISTRICT], "never acknowledged"),
    )
    .await;
    for _ in 0..3 {
        let mut stream = open_stream(&mut district).await;
        let delivery = next_delivery(&mut stream).await;
        assert_eq!(delivered_document(&delivery).document_id, id);
    }
    eventually(
        "the queue dead-letters the document",
        Duration::from_secs(15),
        || async { dead_letters(&hub.endpoint, DISTRICT).await.len() == 1 },
    )
    .await;
    let kept = &dead_letters(&hub.endpoint, DISTRICT).await[0];
    assert!(
        kept.reason.contains("queue_delivery_limit (2)"),
        "{}",
        kept.reason
    );
    let trace = track(&mut commune, &id).await;
    assert_eq!(
        trace.recipients[0].state(),
        wire::DeliveryState::DeadLettered
    );
    hub.finish().await;
}

/// A `Document` as a client with a broken encoder might send it: the subject as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawDocument {
    #[prost(string, tag = "2")]
    from: String,
    #[prost(string, repeated, tag = "3")]
    to: Vec<String>,
    #[prost(bytes = "vec", tag = "4")]
    subject: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawSendRequest {
    #[prost(message, optional, tag = "1")]
    document: Option<RawDocument>,
}

/// A subject that is not UTF-8 is refused as INVALID_ARGUMENT naming the field, not INTERNAL.
#[tokio::test]
async fn a_subject_that_is_not_utf8_is_an_invalid_argument() {
    let hub = TestHub::start("not-utf8", HubOptions::new(TransportKind::Embedded)).await;
    let channel = tonic::transport::Endpoint::from_shared(hub.endpoint.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(RawSendRequest {
        document: Some(RawDocument {
            from: COMMUNE.into(),
            to: vec![DISTRICT.into()],
            subject: vec![b'B', 0xC3, 0x28, b'o'],
        }),
    });
    request
        .metadata_mut()
        .insert("x-lienthong-agency", COMMUNE.parse().expect("metadata"));
    let refused = grpc
        .unary::<_, wire::SendResponse, _>(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/lienthong.v1.DocumentExchange/Send",
            ),
            lienthong_proto::codec::Codec::<RawSendRequest, wire::SendResponse>::default(),
        )
        .await
        .expect_err("not UTF-8");
    assert_eq!(
        refused.code(),
        Code::InvalidArgument,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("subject") && refused.message().contains("UTF-8"),
        "{}",
        refused.message()
    );
    hub.finish().await;
}

/// Per-agency limits: open streams and the send rate. A refusal names the limit and leaves
/// nothing behind; other agencies are not affected.
#[tokio::test]
async fn stream_and_rate_limits_are_per_agency() {
    let options = HubOptions {
        max_streams_per_agency: 2,
        max_sends_per_second: 2,
        ..HubOptions::new(TransportKind::Embedded)
    };
    let hub = TestHub::start("limits", options).await;
    let mut district = hub.client(DISTRICT).await;
    let first = open_stream(&mut district).await;
    let _second = open_stream(&mut district).await;
    let third = district
        .receive(wire::ReceiveRequest {})
        .await
        .expect_err("a third stream");
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(
        third.message().contains("limits.max_streams_per_agency"),
        "{}",
        third.message()
    );
    drop(first);
    eventually(
        "a closed stream frees its place",
        Duration::from_secs(5),
        || {
            let mut district = district.clone();
            async move { district.receive(wire::ReceiveRequest {}).await.is_ok() }
        },
    )
    .await;

    // The bucket holds two seconds' worth (4); the fifth quick send is refused.
    let mut commune = hub.client(COMMUNE).await;
    let mut refused = None;
    for n in 0..6 {
        let sent = document(COMMUNE, &[DISTRICT], &format!("nhanh {n}"));
        let id = sent.document_id.clone();
        match commune
            .send(wire::SendRequest {
                document: Some(sent),
            })
            .await
        {
            Ok(_) => {}
            Err(status) => {
                refused = Some((status, id));
                break;
            }
        }
    }
    let (status, id) = refused.expect("a send past the rate is refused");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("limits.max_sends_per_second"),
        "{}",
        status.message()
    );
    let unknown = commune
        .track(wire::TrackRequest { document_id: id })
        .await
        .expect_err("the refused document left nothing");
    assert_eq!(unknown.code(), Code::NotFound);
    // Another agency has its own allowance.
    let mut neighbour = hub.client(COMMUNE_2).await;
    send(
        &mut neighbour,
        document(COMMUNE_2, &[DISTRICT], "của xã bên"),
    )
    .await;
    hub.finish().await;
}

/// Picks the transport of a scenario.
struct Kind(TransportKind);

impl From<TransportKind> for Kind {
    fn from(kind: TransportKind) -> Self {
        Kind(kind)
    }
}

on_both_transports!(send_receive_ack_track);
on_both_transports!(status_reports_reach_the_other_party);
on_both_transports!(unacknowledged_documents_are_redelivered);
on_both_transports!(rejected_documents_come_back);
on_both_transports!(several_deliveries_are_settled_in_one_ack);
on_both_transports!(sending_is_idempotent_on_the_document_id);
on_both_transports!(bad_input_is_refused_and_leaves_no_trace);
on_both_transports!(access_rules_hold);
on_both_transports!(a_document_rejected_past_the_delivery_limit_is_dead_lettered);
on_both_transports!(a_stuck_recipient_does_not_delay_another);
on_both_transports!(operators_see_health_readiness_and_metrics);
on_both_transports!(operators_list_queues_and_others_may_not);
