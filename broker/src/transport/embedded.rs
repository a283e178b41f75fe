//! The embedded transport: RabbitMQ's queue model kept in the hub's own sled database, so that
//! `make run` works on a machine with no broker.
//!
//! Each agency queue is a sled tree keyed by a monotonic sequence number (FIFO). A message taken
//! by a subscription is marked in flight, in memory, until it is acked (removed), requeued
//! (its delivery count grows; past the limit it moves to the dead letters) or its subscription
//! is dropped (it returns to the queue marked redelivered). A publish is confirmed once it is
//! flushed to disk, like a RabbitMQ publisher confirm. The dead letters are a queue of the same
//! kind, so the hub consumes them like RabbitMQ's dead-letter queue.
//!
//! Stored value: `[flags: u8][delivery count: u32 BE][payload]`, flags bit 0 = redelivered,
//! bit 1 = dead-lettered by the delivery limit (rather than sent there explicitly).

use super::{
    Acknowledge, DEATH_BY_DELIVERY_LIMIT, DEATH_BY_REJECTION, Inbound, OutboundMessage, QueueDepth,
    Subscription, TopologyNames, Transport, TransportError,
};
use crate::agency::{AgencyCode, topic_matches};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

const REDELIVERED: u8 = 1;
const BY_DELIVERY_LIMIT: u8 = 2;

/// The embedded transport; cheap to clone.
#[derive(Debug, Clone)]
pub struct EmbeddedTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    names: TopologyNames,
    delivery_limit: u32,
    /// Binding pattern (the agency code) → queue; grows when the directory is reloaded.
    queues: RwLock<Vec<(String, Arc<Queue>)>>,
    dead_letters: Arc<Queue>,
}

#[derive(Debug)]
struct Queue {
    tree: sled::Tree,
    /// Where messages go past the delivery limit; none for the dead-letter queue itself.
    dead_letters: Option<Arc<Queue>>,
    delivery_limit: u32,
    in_flight: Mutex<InFlight>,
    arrivals: Notify,
}

#[derive(Debug, Default)]
struct InFlight {
    /// Message key → the subscription holding it.
    holders: HashMap<sled::IVec, u64>,
    next_subscription: u64,
    subscriptions: u32,
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
        let dead_letters = Arc::new(Queue::new(
            db.open_tree(format!("embedded/{}", names.dead_letter_queue()))?,
            None,
            u32::MAX,
        ));
        let transport = EmbeddedTransport {
            inner: Arc::new(Inner {
                store: store.clone(),
                names: names.clone(),
                delivery_limit,
                queues: RwLock::new(Vec::with_capacity(agencies.len())),
                dead_letters,
            }),
        };
        transport.open_queues(agencies)?;
        Ok(transport)
    }

    /// Opens the queues of `agencies` that are not open yet.
    fn open_queues(&self, agencies: &[AgencyCode]) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let mut queues = inner.queues.write().unwrap_or_else(|p| p.into_inner());
        for agency in agencies {
            if queues.iter().any(|(binding, _)| binding == agency.as_str()) {
                continue;
            }
            let tree = inner
                .store
                .db()
                .open_tree(format!("embedded/{}", inner.names.agency_queue(agency)))?;
            let queue = Queue::new(tree, Some(inner.dead_letters.clone()), inner.delivery_limit);
            queues.push((agency.to_string(), Arc::new(queue)));
        }
        Ok(())
    }

    fn queue_of(&self, agency: &AgencyCode) -> Result<Arc<Queue>, TransportError> {
        self.inner
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(binding, _)| binding == agency.as_str())
            .map(|(_, queue)| queue.clone())
            .ok_or_else(|| TransportError::Unavailable(format!("no queue for agency {agency}")))
    }
}

impl Transport for EmbeddedTransport {
    type Subscription = EmbeddedSubscription;

    async fn publish(&self, message: OutboundMessage<'_>) -> Result<(), TransportError> {
        let targets: Vec<Arc<Queue>> = self
            .inner
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(binding, _)| topic_matches(binding, message.routing_key))
            .map(|(_, queue)| queue.clone())
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
                .insert(seq.to_be_bytes(), encode_value(0, 0, message.payload))
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
        Ok(EmbeddedSubscription::new(self.queue_of(agency)?, prefetch))
    }

    async fn subscribe_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<EmbeddedSubscription, TransportError> {
        Ok(EmbeddedSubscription::new(
            self.inner.dead_letters.clone(),
            prefetch,
        ))
    }

    async fn queue_depth(&self, agency: &AgencyCode) -> Result<QueueDepth, TransportError> {
        let queue = self.queue_of(agency)?;
        let in_flight = queue.lock();
        Ok(QueueDepth {
            ready: (queue.tree.len() as u64).saturating_sub(in_flight.holders.len() as u64),
            consumers: in_flight.subscriptions,
        })
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn dead_letter_count(&self) -> Result<u64, TransportError> {
        Ok(self.inner.dead_letters.tree.len() as u64)
    }

    async fn add_queues(&self, agencies: &[AgencyCode]) -> Result<(), TransportError> {
        self.open_queues(agencies)
            .map_err(|e| TransportError::Protocol(e.to_string()))
    }
}

impl Queue {
    fn new(tree: sled::Tree, dead_letters: Option<Arc<Queue>>, delivery_limit: u32) -> Self {
        Queue {
            tree,
            dead_letters,
            delivery_limit,
            in_flight: Mutex::default(),
            arrivals: Notify::new(),
        }
    }

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
            self.move_to_dead_letters(key, payload, BY_DELIVERY_LIMIT)?;
        } else {
            self.tree
                .insert(key, encode_value(REDELIVERED, delivery_count, payload))
                .map_err(storage_error)?;
        }
        Ok(())
    }

    /// Moves a message to the dead letters; from the dead-letter queue itself, drops it (it is
    /// settled there only once the hub has kept it).
    fn move_to_dead_letters(
        &self,
        key: &sled::IVec,
        payload: &[u8],
        flags: u8,
    ) -> Result<(), TransportError> {
        if let Some(dead_letters) = &self.dead_letters {
            dead_letters
                .tree
                .insert(key, encode_value(flags, 0, payload))
                .map_err(storage_error)?;
            dead_letters.arrivals.notify_waiters();
        }
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

impl EmbeddedSubscription {
    fn new(queue: Arc<Queue>, prefetch: u16) -> Self {
        let id = {
            let mut in_flight = queue.lock();
            in_flight.next_subscription += 1;
            in_flight.subscriptions += 1;
            in_flight.next_subscription
        };
        EmbeddedSubscription {
            queue,
            id,
            permits: Arc::new(Semaphore::new(usize::from(prefetch))),
        }
    }

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
                let (flags, delivery_count, payload) = decode_value(&value)?;
                let death_reason = self.queue.dead_letters.is_none().then(|| {
                    if flags & BY_DELIVERY_LIMIT != 0 {
                        DEATH_BY_DELIVERY_LIMIT
                    } else {
                        DEATH_BY_REJECTION
                    }
                    .to_owned()
                });
                return Ok(Inbound {
                    payload: payload.to_vec(),
                    redelivered: flags & REDELIVERED != 0,
                    delivery_count,
                    death_reason,
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

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        let mut in_flight = self.queue.lock();
        in_flight.subscriptions = in_flight.subscriptions.saturating_sub(1);
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
            self.queue.move_to_dead_letters(&self.key, payload, 0)?;
        }
        Ok(())
    }
}

fn encode_value(flags: u8, delivery_count: u32, payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(5 + payload.len());
    value.push(flags);
    value.extend_from_slice(&delivery_count.to_be_bytes());
    value.extend_from_slice(payload);
    value
}

fn decode_value(value: &[u8]) -> Result<(u8, u32, &[u8]), TransportError> {
    if value.len() < 5 {
        return Err(TransportError::Protocol(
            "an embedded queue entry is truncated".into(),
        ));
    }
    let delivery_count = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok((value[0], delivery_count, &value[5..]))
}

fn storage_error(error: sled::Error) -> TransportError {
    TransportError::Protocol(format!("embedded queue storage: {error}"))
}
