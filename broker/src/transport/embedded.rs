//! The embedded transport: RabbitMQ's queue model kept in the hub's own sled database, so that
//! `make run` works on a machine with no broker.
//!
//! Each agency queue is a sled tree keyed by a monotonic sequence number (FIFO). A message taken
//! by a subscription is marked in flight, in memory, until it is acked (removed), requeued
//! (its delivery count grows; past the limit it moves to the dead letters) or its subscription
//! is dropped (it returns to the queue marked redelivered). A publish is confirmed once it is
//! flushed to disk, like a RabbitMQ publisher confirm.
//!
//! Stored value: `[redelivered: u8][delivery count: u32 BE][payload]`.

use super::{
    Acknowledge, Inbound, OutboundMessage, Subscription, TopologyNames, Transport, TransportError,
};
use crate::agency::{AgencyCode, topic_matches};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The embedded transport; cheap to clone.
#[derive(Debug, Clone)]
pub struct EmbeddedTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// Binding pattern (the agency code) → queue.
    queues: Vec<(String, Arc<Queue>)>,
    dead_letters: sled::Tree,
}

#[derive(Debug)]
struct Queue {
    tree: sled::Tree,
    dead_letters: sled::Tree,
    delivery_limit: u32,
    /// Message key → the subscription holding it.
    in_flight: Mutex<InFlight>,
    arrivals: Notify,
}

#[derive(Debug, Default)]
struct InFlight {
    holders: HashMap<sled::IVec, u64>,
    next_subscription: u64,
}

impl EmbeddedTransport {
    /// Opens (or creates) the queues of `agencies` in the store's database.
    pub fn open(
        store: &Store,
        names: &TopologyNames,
        agencies: &[AgencyCode],
        delivery_limit: u32,
    ) -> Result<EmbeddedTransport, StoreError> {
        let db = store.db();
        let dead_letters = db.open_tree(format!("embedded/{}", names.dead_letter_queue()))?;
        let mut queues = Vec::with_capacity(agencies.len());
        for agency in agencies {
            let tree = db.open_tree(format!("embedded/{}", names.agency_queue(agency)))?;
            let queue = Queue {
                tree,
                dead_letters: dead_letters.clone(),
                delivery_limit,
                in_flight: Mutex::default(),
                arrivals: Notify::new(),
            };
            queues.push((agency.to_string(), Arc::new(queue)));
        }
        Ok(EmbeddedTransport {
            inner: Arc::new(Inner {
                store: store.clone(),
                queues,
                dead_letters,
            }),
        })
    }

    fn queue_of(&self, agency: &AgencyCode) -> Option<&Arc<Queue>> {
        self.inner
            .queues
            .iter()
            .find(|(binding, _)| binding == agency.as_str())
            .map(|(_, queue)| queue)
    }
}

impl Transport for EmbeddedTransport {
    type Subscription = EmbeddedSubscription;

    async fn publish(&self, message: OutboundMessage<'_>) -> Result<(), TransportError> {
        let targets: Vec<&Arc<Queue>> = self
            .inner
            .queues
            .iter()
            .filter(|(binding, _)| topic_matches(binding, message.routing_key))
            .map(|(_, queue)| queue)
            .collect();
        if targets.is_empty() {
            return Err(TransportError::Unroutable {
                routing_key: message.routing_key.to_owned(),
            });
        }
        for queue in &targets {
            let seq = self.inner.store.db().generate_id().map_err(storage_error)?;
            queue
                .tree
                .insert(seq.to_be_bytes(), encode_value(false, 0, message.payload))
                .map_err(storage_error)?;
        }
        self.inner
            .store
            .durable()
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        for queue in targets {
            queue.arrivals.notify_waiters();
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        agency: &AgencyCode,
        prefetch: u16,
    ) -> Result<EmbeddedSubscription, TransportError> {
        let queue = self
            .queue_of(agency)
            .ok_or_else(|| TransportError::Unavailable(format!("no queue for agency {agency}")))?
            .clone();
        let id = {
            let mut in_flight = queue.lock();
            in_flight.next_subscription += 1;
            in_flight.next_subscription
        };
        Ok(EmbeddedSubscription {
            queue,
            id,
            permits: Arc::new(Semaphore::new(usize::from(prefetch))),
        })
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn dead_letter_count(&self) -> Result<u64, TransportError> {
        Ok(self.inner.dead_letters.len() as u64)
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, InFlight> {
        // A panic while holding the lock leaves the map consistent (each step is one insert or
        // remove), so a poisoned lock is still usable.
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns a message to the queue (or dead-letters it past the delivery limit).
    fn put_back(&self, key: &sled::IVec, count_delivery: bool) -> Result<(), TransportError> {
        let Some(value) = self.tree.get(key).map_err(storage_error)? else {
            return Ok(());
        };
        let (_, delivery_count, payload) = decode_value(&value)?;
        let delivery_count = delivery_count + u32::from(count_delivery);
        if delivery_count > self.delivery_limit {
            self.move_to_dead_letters(key, payload)?;
        } else {
            self.tree
                .insert(key, encode_value(true, delivery_count, payload))
                .map_err(storage_error)?;
        }
        Ok(())
    }

    fn move_to_dead_letters(&self, key: &sled::IVec, payload: &[u8]) -> Result<(), TransportError> {
        self.dead_letters
            .insert(key, encode_value(false, 0, payload))
            .map_err(storage_error)?;
        self.tree.remove(key).map_err(storage_error)?;
        Ok(())
    }
}

/// A consumer of one embedded queue.
#[derive(Debug)]
pub struct EmbeddedSubscription {
    queue: Arc<Queue>,
    id: u64,
    permits: Arc<Semaphore>,
}

impl Subscription for EmbeddedSubscription {
    type Acker = EmbeddedAcker;

    async fn next(&mut self) -> Result<Inbound<EmbeddedAcker>, TransportError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TransportError::Closed)?;
        loop {
            let arrivals = self.queue.arrivals.notified();
            tokio::pin!(arrivals);
            arrivals.as_mut().enable();
            if let Some((key, value)) = self.take_first_free()? {
                let (redelivered, delivery_count, payload) = decode_value(&value)?;
                return Ok(Inbound {
                    payload: payload.to_vec(),
                    redelivered,
                    delivery_count,
                    acker: EmbeddedAcker {
                        queue: self.queue.clone(),
                        key,
                        subscription: self.id,
                        _permit: permit,
                    },
                });
            }
            arrivals.await;
        }
    }
}

impl EmbeddedSubscription {
    fn take_first_free(&self) -> Result<Option<(sled::IVec, sled::IVec)>, TransportError> {
        let mut in_flight = self.queue.lock();
        for item in self.queue.tree.iter() {
            let (key, value) = item.map_err(storage_error)?;
            if !in_flight.holders.contains_key(&key) {
                in_flight.holders.insert(key.clone(), self.id);
                return Ok(Some((key, value)));
            }
        }
        Ok(None)
    }
}

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        let mut in_flight = self.queue.lock();
        let held: Vec<sled::IVec> = in_flight
            .holders
            .iter()
            .filter(|(_, holder)| **holder == self.id)
            .map(|(key, _)| key.clone())
            .collect();
        for key in held {
            in_flight.holders.remove(&key);
            if let Err(error) = self.queue.put_back(&key, false) {
                tracing::error!(%error, "cannot return a message to its embedded queue");
            }
        }
        drop(in_flight);
        self.queue.arrivals.notify_waiters();
    }
}

/// Settles one message of an embedded queue; frees a prefetch slot when dropped.
#[derive(Debug)]
pub struct EmbeddedAcker {
    queue: Arc<Queue>,
    key: sled::IVec,
    subscription: u64,
    _permit: OwnedSemaphorePermit,
}

impl EmbeddedAcker {
    /// Releases the message from this subscription; fails if the subscription is gone.
    fn release(&self) -> Result<MutexGuard<'_, InFlight>, TransportError> {
        let mut in_flight = self.queue.lock();
        if in_flight.holders.get(&self.key) != Some(&self.subscription) {
            return Err(TransportError::Closed);
        }
        in_flight.holders.remove(&self.key);
        Ok(in_flight)
    }
}

impl Acknowledge for EmbeddedAcker {
    async fn ack(self) -> Result<(), TransportError> {
        let _in_flight = self.release()?;
        self.queue.tree.remove(&self.key).map_err(storage_error)?;
        Ok(())
    }

    async fn requeue(self) -> Result<(), TransportError> {
        {
            let _in_flight = self.release()?;
            self.queue.put_back(&self.key, true)?;
        }
        self.queue.arrivals.notify_waiters();
        Ok(())
    }

    async fn dead_letter(self) -> Result<(), TransportError> {
        let _in_flight = self.release()?;
        if let Some(value) = self.queue.tree.get(&self.key).map_err(storage_error)? {
            let (_, _, payload) = decode_value(&value)?;
            self.queue.move_to_dead_letters(&self.key, payload)?;
        }
        Ok(())
    }
}

fn encode_value(redelivered: bool, delivery_count: u32, payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(5 + payload.len());
    value.push(u8::from(redelivered));
    value.extend_from_slice(&delivery_count.to_be_bytes());
    value.extend_from_slice(payload);
    value
}

fn decode_value(value: &[u8]) -> Result<(bool, u32, &[u8]), TransportError> {
    if value.len() < 5 {
        return Err(TransportError::Protocol(
            "an embedded queue entry is truncated".into(),
        ));
    }
    let delivery_count = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok((value[0] != 0, delivery_count, &value[5..]))
}

fn storage_error(error: sled::Error) -> TransportError {
    TransportError::Protocol(format!("embedded queue storage: {error}"))
}
