//! Logs and traces: the `tracing` subscriber (human-readable or JSON lines), and OpenTelemetry
//! traces exported over OTLP when `[telemetry] otlp_endpoint` is set.
//!
//! One trace follows a document through the hub: the `send` span, then a `publish` span per
//! recipient (child of `send` through the W3C `traceparent` kept with the outbox entry), then
//! `deliver` (child of `publish` through the `traceparent` carried on the queued message and in
//! the AMQP headers), then `ack` (child of `deliver`). With tracing off every `traceparent` is
//! empty and nothing is exported.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The W3C header (and AMQP header) that carries a span's context.
pub const TRACEPARENT: &str = "traceparent";

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Keeps the trace exporter alive; dropping it flushes the spans not yet exported.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("lienthong: flushing traces at exit failed: {error}");
        }
    }
}

/// Installs the global subscriber: logs in `format` (filtered by `RUST_LOG`, `info` by
/// default), and, when `otlp_endpoint` is given, spans exported there over OTLP/gRPC.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = match otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            Some(tracer_provider(exporter))
        }
        None => None,
    };
    let traces = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("lienthong")));
    let text = (format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(traces)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// A tracer provider over `exporter` with the hub's service name. Tests pass an in-memory one.
pub fn tracer_provider(
    exporter: impl opentelemetry_sdk::trace::SpanExporter + 'static,
) -> SdkTracerProvider {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("lienthong")
        .build();
    SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build()
}

/// The W3C `traceparent` of a span; empty when tracing is off or the span is disabled.
pub fn traceparent_of(span: &tracing::Span) -> String {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// Makes `span` a child of the span a `traceparent` names; does nothing for an empty or
/// malformed one (the span then starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // Fails only when the span is disabled, and then there is nothing to link.
    let _ = span.set_parent(parent);
}

/// Appends the `traceparent` field to an encoded `QueuedMessage`. Protobuf keeps the last value
/// of a repeated scalar field, so this overrides any earlier one without decoding the message.
pub fn append_traceparent(queued_message: &mut Vec<u8>, traceparent: &str) {
    const TRACEPARENT_FIELD: u32 = 6;
    if traceparent.is_empty() {
        return;
    }
    prost::encoding::string::encode(TRACEPARENT_FIELD, &traceparent.to_owned(), queued_message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lienthong_proto::v1 as wire;
    use prost::Message;

    #[test]
    fn an_appended_traceparent_overrides_the_encoded_one() {
        let message = wire::QueuedMessage {
            message_id: "m".into(),
            recipient: "000.00.00.H53".into(),
            traceparent: "old".into(),
            ..Default::default()
        };
        let mut bytes = message.encode_to_vec();
        append_traceparent(
            &mut bytes,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let decoded = wire::QueuedMessage::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(
            decoded.traceparent,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(decoded.message_id, "m");
        append_traceparent(&mut bytes, "");
        assert_eq!(
            wire::QueuedMessage::decode(bytes.as_slice())
                .expect("decodes")
                .traceparent,
            decoded.traceparent
        );
    }
}
