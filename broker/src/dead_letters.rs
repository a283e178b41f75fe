//! The dead-letter keeper: takes every message the transport dead-lettered out of the
//! dead-letter queue and keeps it in the hub's store, where operators list and replay it.
//!
//! A message the hub dead-lettered itself already has its DEAD_LETTERED receipt; one the queue
//! dead-lettered on its own (the `queue_delivery_limit` backstop) gets it here. The message is
//! acked on the queue only after it is durable in the store, so nothing is dropped on the way.

use crate::error::HubError;
use crate::hub::{Hub, now_unix_ms};
use crate::transport::{
    Acknowledge, DEATH_BY_DELIVERY_LIMIT, DEATH_BY_REJECTION, Inbound, Subscription, Transport,
};
use lienthong_proto::v1 as wire;
use prost::Message;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PREFETCH: u16 = 64;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `shutdown`, subscribing again whenever the transport reconnects.
pub async fn run<T: Transport>(hub: Hub<T>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = tokio::select! {
            subscribed = hub.transport().subscribe_dead_letters(PREFETCH) => subscribed,
            () = shutdown.cancelled() => return,
        };
        match subscribed {
            Ok(mut subscription) => {
                backoff = Duration::from_millis(100);
                loop {
                    let inbound = tokio::select! {
                        inbound = subscription.next() => inbound,
                        () = shutdown.cancelled() => return,
                    };
                    match inbound {
                        Ok(inbound) => {
                            if let Err(error) = keep(&hub, inbound).await {
                                tracing::error!(%error, "cannot keep a dead letter; it stays on the queue");
                                break;
                            }
                        }
                        Err(error) => {
                            tracing::debug!(%error, "dead-letter subscription lost");
                            break;
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot consume the dead letters yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn keep<T: Transport>(
    hub: &Hub<T>,
    inbound: Inbound<<T::Subscription as Subscription>::Acker>,
) -> Result<(), HubError> {
    let store = hub.store();
    let reason = match inbound.death_reason.as_deref() {
        Some(DEATH_BY_DELIVERY_LIMIT) => format!(
            "returned more than queue_delivery_limit ({}) times",
            hub.config().delivery.queue_delivery_limit
        ),
        Some(DEATH_BY_REJECTION) => "sent to the dead letters by the hub".to_owned(),
        Some(other) => format!("dead-lettered by the transport: {other}"),
        None => "dead-lettered for an unknown reason".to_owned(),
    };
    match wire::QueuedMessage::decode(inbound.payload.as_slice()) {
        Ok(message) => {
            let document_id = match &message.payload {
                Some(wire::queued_message::Payload::Document(document)) => {
                    Some(document.document_id.as_str())
                }
                _ => None,
            };
            store.keep_dead_letter(
                &message.message_id,
                &message.recipient,
                document_id,
                &reason,
                &inbound.payload,
                now_unix_ms(),
            )?;
        }
        Err(error) => store.keep_dead_letter(
            "",
            "",
            None,
            &format!("unreadable message ({error}); {reason}"),
            &inbound.payload,
            now_unix_ms(),
        )?,
    }
    store.durable().await?;
    if let Err(error) = inbound.acker.ack().await {
        tracing::debug!(%error, "acking a kept dead letter failed; it may be kept twice");
    }
    Ok(())
}
