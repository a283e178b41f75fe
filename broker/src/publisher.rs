//! The outbox publisher: moves accepted messages from sled to the transport, most urgent first,
//! and removes each one (writing its ENQUEUED receipt) only after a positive confirm.

use crate::hub::{Hub, now_unix_ms};
use crate::transport::{OutboundMessage, Transport};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Messages published concurrently; their confirms are awaited together.
const BATCH: usize = 128;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle publisher looks at the outbox without being woken.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs until `shutdown`. A message whose publish fails stays in the outbox and is retried with
/// backoff, so an outage of the transport delays messages but never loses them.
pub async fn run<T: Transport>(hub: Hub<T>, shutdown: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let store = hub.store();
        let mut batch = match store.outbox_batch(BATCH) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, "cannot read the outbox");
                if sleep_or_shutdown(MAX_BACKOFF, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = hub.outbox_wakeup().notified() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = shutdown.cancelled() => return,
            }
            continue;
        }
        let spans: Vec<(tracing::Span, String)> = batch
            .iter_mut()
            .map(|pending| {
                let span = tracing::info_span!("publish", message_id = %pending.message_id, recipient = %pending.recipient);
                crate::telemetry::set_parent(&span, &pending.traceparent);
                let traceparent = crate::telemetry::traceparent_of(&span);
                crate::telemetry::append_traceparent(&mut pending.payload, &traceparent);
                (span, traceparent)
            })
            .collect();
        let routing_keys: Vec<String> = batch
            .iter()
            .map(|pending| hub.routing_key_of(&pending.recipient))
            .collect();
        let publishes = batch.iter().zip(&spans).zip(&routing_keys).map(
            |((pending, (span, traceparent)), routing_key)| {
                async {
                    let started = std::time::Instant::now();
                    let result = hub
                        .transport()
                        .publish(OutboundMessage {
                            routing_key,
                            message_id: &pending.message_id,
                            payload: &pending.payload,
                            traceparent,
                        })
                        .await;
                    if result.is_ok() {
                        hub.metrics().observe_publish_confirm(started.elapsed());
                    }
                    result
                }
                .instrument(span.clone())
            },
        );
        let results = futures_util::future::join_all(publishes).await;
        let mut first_failure = None;
        let mut confirmed = Vec::with_capacity(batch.len());
        for (pending, result) in batch.iter().zip(results) {
            match result {
                Ok(()) => {
                    hub.activity().enqueued(&pending.recipient);
                    confirmed.push(pending);
                }
                Err(error) => {
                    first_failure.get_or_insert((error, pending.recipient.clone()));
                }
            }
        }
        // A message whose confirm is not recorded stays in the outbox and is published again.
        if let Err(error) = store.mark_enqueued(&confirmed, now_unix_ms()) {
            tracing::error!(%error, messages = confirmed.len(), "cannot record confirmed publishes");
        }
        drop(confirmed);
        match first_failure {
            None => backoff = MIN_BACKOFF,
            Some((error, recipient)) => {
                tracing::warn!(%error, %recipient, retry_in = ?backoff, waiting = store.outbox_len(), "publishing from the outbox failed");
                // The batch holds the sequence numbers of its ENQUEUED receipts, which the
                // ledger appender waits for: let them go while the transport is away.
                drop(batch);
                if sleep_or_shutdown(backoff, &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Sleeps; returns true if shutdown came first.
async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = shutdown.cancelled() => true,
    }
}
