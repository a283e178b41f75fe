//! OpenTelemetry traces: one trace per document, `send` → `publish` → `deliver` → `ack`, each
//! span the parent of the next, across the outbox and the queue. Spans go to an in-process
//! exporter installed as this test binary's global subscriber.

mod support;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use support::*;
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn spans_named<'a>(spans: &'a [SpanData], name: &str, key: &str, value: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.name == name && attribute(s, key).as_deref() == Some(value))
        .collect()
}

fn one_span<'a>(spans: &'a [SpanData], name: &str, key: &str, value: &str) -> &'a SpanData {
    let matching = spans_named(spans, name, key, value);
    assert_eq!(
        matching.len(),
        1,
        "one `{name}` span with {key}={value}, among {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    matching[0]
}

#[tokio::test]
async fn a_document_leaves_one_trace_from_send_to_ack() {
    let exporter = InMemorySpanExporter::default();
    let provider = lienthong::telemetry::tracer_provider(exporter.clone());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::Targets::new().with_target("lienthong", Level::TRACE))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("lienthong-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    for kind in [TransportKind::Amqp, TransportKind::Embedded] {
        let hub = TestHub::start("traces", HubOptions::new(kind)).await;
        let mut commune = hub.client(COMMUNE).await;
        let mut district = hub.client(DISTRICT).await;
        let id = send(&mut commune, document(COMMUNE, &[DISTRICT], "traced")).await;
        let mut stream = open_stream(&mut district).await;
        let delivery = next_delivery(&mut stream).await;
        ack(&mut district, &delivery).await;
        drop(stream);
        hub.finish().await;

        provider.force_flush().expect("flush spans");
        let spans = exporter.get_finished_spans().expect("finished spans");
        let send = one_span(&spans, "send", "document_id", &id);
        let deliver = one_span(&spans, "deliver", "message_id", &id);
        let acked = one_span(&spans, "ack", "message_id", &id);
        // One `publish` per attempt: those made before RabbitMQ was connected failed and were
        // retried. All are children of `send`; the one that succeeded is `deliver`'s parent.
        let attempts = spans_named(&spans, "publish", "message_id", &id);
        let publish = *attempts
            .iter()
            .find(|p| p.span_context.span_id() == deliver.parent_span_id)
            .unwrap_or_else(|| panic!("{kind:?}: `deliver` is the child of a `publish`"));
        let trace = send.span_context.trace_id();
        let assert_child = |child: &SpanData, parent: &SpanData| {
            assert_eq!(
                child.span_context.trace_id(),
                trace,
                "{kind:?}: `{}` is in the document's trace",
                child.name
            );
            assert_eq!(
                child.parent_span_id,
                parent.span_context.span_id(),
                "{kind:?}: `{}` is the child of `{}`",
                child.name,
                parent.name
            );
        };
        for attempt in &attempts {
            assert_child(attempt, send);
        }
        assert_child(deliver, publish);
        assert_child(acked, deliver);
        assert_eq!(attribute(acked, "recipient").as_deref(), Some(DISTRICT));
        exporter.reset();
    }
}
