//! The outbox publisher: moves accepted messages from sled to the transport, most urgent first,
//! and removes each one (writing its ENQUEUED receipt) only after a positive confirm.
//!
//! Publishing is pipelined: a batch is published while earlier batches still wait for their
//! confirms, so a message accepted now is not held behind the slowest confirm of the batch
//! before it. Messages on their way stay in the outbox and are skipped by later batches until
//! their confirm is recorded or their publish has failed.

use crate::hub::{Hub, now_unix_ms};
use crate::store::PendingPublish;
use crate::transport::{OutboundMessage, Transport, TransportError};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The most messages published together in one batch.
const BATCH: usize = 128;
/// The most messages published and not yet confirmed, over all batches.
const MAX_IN_FLIGHT: usize = 4 * BATCH;
/// No new batch starts while the messages on their way hold this many bytes or more (one batch
/// of 256 KiB documents), so that a slow transport does not multiply the memory they take.
const MAX_BYTES_IN_FLIGHT: usize = 32 * 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle publisher looks at the outbox without being woken.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// A batch whose publishes have all been answered: each message with its transport's answer.
type Answered = Vec<(PendingPublish, Result<(), TransportError>)>;

/// Runs until `shutdown`, then records the confirms of the messages already on their way. A
/// message whose publish fails stays in the outbox and is retried with backoff, so an outage of
/// the transport delays messages but never loses them.
pub async fn run<T: Transport>(hub: Hub<T>, shutdown: CancellationToken) {
    let store = hub.store();
    let mut backoff = MIN_BACKOFF;
    // Publishing waits until then after a failure; messages already on their way are answered.
    let mut paused_until: Option<Instant> = None;
    let mut on_the_way = OnTheWay::default();
    let mut answers = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        if stopping && answers.is_empty() {
            return;
        }
        let room = on_the_way.room();
        if !stopping && paused_until.is_none() && room > 0 {
            match store.outbox_batch(room, |key| on_the_way.keys.contains_key(key)) {
                Ok(batch) if !batch.is_empty() => {
                    on_the_way.add(&batch);
                    answers.push(publish_batch(&hub, batch));
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(%error, "cannot read the outbox");
                    paused_until = Some(Instant::now() + MAX_BACKOFF);
                }
            }
        }
        let resume = paused_until.unwrap_or_else(|| Instant::now() + IDLE_POLL);
        tokio::select! {
            Some(first) = answers.next() => {
                // Batches answered meanwhile are recorded in the same transaction.
                let mut answered: Answered = first;
                while let Some(Some(more)) = answers.next().now_or_never() {
                    answered.extend(more);
                }
                let failure = record_answers(&hub, &mut on_the_way, answered);
                match failure {
                    None => backoff = MIN_BACKOFF,
                    Some((error, recipient)) => {
                        tracing::warn!(%error, %recipient, retry_in = ?backoff, waiting = store.outbox_len(), "publishing from the outbox failed");
                        paused_until = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            () = hub.outbox_wakeup().notified(), if !stopping && paused_until.is_none() && room > 0 => {}
            () = tokio::time::sleep_until(resume) => paused_until = None,
            () = shutdown.cancelled(), if !stopping => stopping = true,
        }
    }
}

/// Publishes every message of `batch` concurrently; resolves once each has been answered.
fn publish_batch<T: Transport>(
    hub: &Hub<T>,
    mut batch: Vec<PendingPublish>,
) -> impl Future<Output = Answered> + Send + 'static {
    let hub = hub.clone();
    async move {
        let spans: Vec<tracing::Span> = batch
            .iter_mut()
            .map(|pending| {
                let span = tracing::info_span!("publish", message_id = %pending.message_id, recipient = %pending.recipient);
                crate::telemetry::set_parent(&span, &pending.traceparent);
                let traceparent = crate::telemetry::traceparent_of(&span);
                crate::telemetry::append_traceparent(&mut pending.payload, &traceparent);
                pending.traceparent = traceparent;
                span
            })
            .collect();
        let routing_keys: Vec<String> = batch
            .iter()
            .map(|pending| hub.routing_key_of(&pending.recipient))
            .collect();
        let publishes =
            batch
                .iter()
                .zip(spans)
                .zip(&routing_keys)
                .map(|((pending, span), routing_key)| {
                    let hub = &hub;
                    async move {
                        let started = std::time::Instant::now();
                        let result = hub
                            .transport()
                            .publish(OutboundMessage {
                                routing_key,
                                message_id: &pending.message_id,
                                payload: &pending.payload,
                                traceparent: &pending.traceparent,
                            })
                            .await;
                        if result.is_ok() {
                            hub.metrics().observe_publish_confirm(started.elapsed());
                        }
                        result
                    }
                    .instrument(span)
                });
        let results = futures_util::future::join_all(publishes).await;
        batch.into_iter().zip(results).collect()
    }
}

/// Records the confirmed messages of `answered` (one transaction) and lets every message of it
/// leave `on_the_way`; returns the first failure. A message whose confirm is not recorded stays
/// in the outbox and is published again.
fn record_answers<T: Transport>(
    hub: &Hub<T>,
    on_the_way: &mut OnTheWay,
    answered: Answered,
) -> Option<(TransportError, String)> {
    let mut first_failure = None;
    let mut confirmed = Vec::with_capacity(answered.len());
    for (pending, result) in &answered {
        match result {
            Ok(()) => {
                hub.activity().enqueued(&pending.recipient);
                confirmed.push(pending);
            }
            Err(error) => {
                first_failure.get_or_insert_with(|| (error.clone(), pending.recipient.clone()));
            }
        }
    }
    if let Err(error) = hub.store().mark_enqueued(&confirmed, now_unix_ms()) {
        tracing::error!(%error, messages = confirmed.len(), "cannot record confirmed publishes");
    }
    // Dropping the batch also lets go of the sequence numbers of its ENQUEUED receipts, which
    // the ledger appender waits for.
    on_the_way.remove(answered.iter().map(|(pending, _)| pending));
    drop(answered);
    first_failure
}

/// The messages published and not yet answered: their outbox keys with the bytes of their
/// payloads, and the sum of those.
#[derive(Default)]
struct OnTheWay {
    keys: HashMap<sled::IVec, usize>,
    bytes: usize,
}

impl OnTheWay {
    /// How many messages the next batch may take.
    fn room(&self) -> usize {
        if self.bytes >= MAX_BYTES_IN_FLIGHT {
            return 0;
        }
        MAX_IN_FLIGHT.saturating_sub(self.keys.len()).min(BATCH)
    }

    fn add(&mut self, batch: &[PendingPublish]) {
        for pending in batch {
            self.keys
                .insert(pending.outbox_key().clone(), pending.payload.len());
            self.bytes += pending.payload.len();
        }
    }

    fn remove<'a>(&mut self, answered: impl Iterator<Item = &'a PendingPublish>) {
        for pending in answered {
            if let Some(bytes) = self.keys.remove(pending.outbox_key()) {
                self.bytes -= bytes;
            }
        }
    }
}
