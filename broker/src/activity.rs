//! What the queues did lately, for operators: per agency flows (messages put on its queue and
//! acknowledged from it), sampled every `[telemetry] sample_interval_ms` into an hour of history
//! (the status page's charts), rates over the last minute (`ListQueues`), and the gauges of queue
//! depths and of the oldest waiting message per urgency (Prometheus alerts).
//!
//! Flows count since the hub started; they are not persisted, so rates start again from zero
//! after a restart while depths and ages, read from RabbitMQ and the store, do not.

use crate::agency::AgencyCode;
use crate::hub::{Hub, now_unix_ms};
use crate::store::URGENCY_LEVELS;
use crate::transport::{QueueDepth, Transport};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How much history the status page shows.
pub const HISTORY: Duration = Duration::from_secs(3600);
/// The window rates are computed over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Messages that went through one agency's queue since the hub started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Put on the queue (confirmed by the transport).
    pub enqueued: u64,
    /// Acknowledged by the agency.
    pub acknowledged: u64,
}

/// Messages per second over the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub in_per_second: f64,
    pub out_per_second: f64,
}

/// The whole hub at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    pub at_unix_ms: i64,
    /// Messages ready in every agency queue.
    pub ready: u64,
    /// Messages shown on streams and not yet settled.
    pub unacknowledged: u64,
    pub outbox: u64,
    pub dead_letters: u64,
    /// Totals since start; the page derives throughput from consecutive samples.
    pub enqueued: u64,
    pub acknowledged: u64,
    /// Age of the oldest message waiting (accepted, not acknowledged), per urgency 0..4.
    pub oldest_waiting_ms: [Option<i64>; URGENCY_LEVELS],
}

/// One agency's queue at the last sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueView {
    pub agency: String,
    pub ready: u64,
    pub unacknowledged: u64,
    pub consumers: u32,
    pub oldest_waiting_ms: Option<i64>,
    pub rates: Rates,
}

/// Flows, history and the last per-queue view; shared by the hub.
#[derive(Debug, Default)]
pub struct Activity {
    flows: Mutex<HashMap<String, Flow>>,
    history: Mutex<History>,
}

#[derive(Debug, Default)]
struct History {
    samples: VecDeque<Sample>,
    /// Snapshots of the flows over the last rate window, oldest first.
    recent_flows: VecDeque<(Instant, HashMap<String, Flow>)>,
    queues: Vec<QueueView>,
    transport_error: Option<String>,
}

impl Activity {
    /// A message was put on `agency`'s queue.
    pub fn enqueued(&self, agency: &str) {
        self.count(agency, |flow| flow.enqueued += 1);
    }

    /// `agency` acknowledged a message.
    pub fn acknowledged(&self, agency: &str) {
        self.count(agency, |flow| flow.acknowledged += 1);
    }

    /// Updates one agency's flow; the key is allocated only the first time an agency is seen,
    /// since this runs for every publish and every acknowledgement.
    fn count(&self, agency: &str, update: impl FnOnce(&mut Flow)) {
        let mut flows = lock(&self.flows);
        match flows.get_mut(agency) {
            Some(flow) => update(flow),
            None => update(flows.entry(agency.to_owned()).or_default()),
        }
    }

    /// Messages per second in and out of `agency`'s queue over the last minute.
    pub fn rates(&self, agency: &str) -> Rates {
        let now = Instant::now();
        let current = lock(&self.flows).get(agency).copied().unwrap_or_default();
        let history = lock(&self.history);
        let Some((then, flows)) = history.recent_flows.front() else {
            return Rates::default();
        };
        let seconds = now.duration_since(*then).as_secs_f64();
        if seconds <= 0.0 {
            return Rates::default();
        }
        let before = flows.get(agency).copied().unwrap_or_default();
        Rates {
            in_per_second: (current.enqueued - before.enqueued) as f64 / seconds,
            out_per_second: (current.acknowledged - before.acknowledged) as f64 / seconds,
        }
    }

    /// The samples of the last hour, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.history).samples.iter().cloned().collect()
    }

    /// Every agency's queue at the last sample, and the transport's error if it could not be
    /// asked then.
    pub fn queues(&self) -> (Vec<QueueView>, Option<String>) {
        let history = lock(&self.history);
        (history.queues.clone(), history.transport_error.clone())
    }

    /// Adds a sample to the history, and the flows as they are now to the rate window.
    fn record(&self, sample: Sample, at: Instant) {
        let flows = lock(&self.flows).clone();
        let mut history = lock(&self.history);
        let oldest_kept = sample.at_unix_ms - HISTORY.as_millis() as i64;
        while history
            .samples
            .front()
            .is_some_and(|s| s.at_unix_ms < oldest_kept)
        {
            history.samples.pop_front();
        }
        history.samples.push_back(sample);
        while history
            .recent_flows
            .front()
            .is_some_and(|(then, _)| at.duration_since(*then) > RATE_WINDOW)
        {
            history.recent_flows.pop_front();
        }
        history.recent_flows.push_back((at, flows));
    }

    fn set_queues(&self, queues: Vec<QueueView>, transport_error: Option<String>) {
        let mut history = lock(&self.history);
        history.queues = queues;
        history.transport_error = transport_error;
    }
}

/// One agency's queue as read now.
#[derive(Debug, Clone)]
pub struct QueueReading {
    pub agency: AgencyCode,
    /// Unknown (zero) once the transport failed to answer for an earlier queue.
    pub depth: QueueDepth,
    /// Deliveries shown on this hub's streams and not yet settled.
    pub unacknowledged: u64,
    /// When the oldest message waiting at each urgency was accepted.
    pub oldest_accepted: [Option<i64>; URGENCY_LEVELS],
}

impl QueueReading {
    /// When the oldest waiting message, of any urgency, was accepted.
    pub fn oldest(&self) -> Option<i64> {
        self.oldest_accepted.iter().flatten().min().copied()
    }
}

/// Reads every agency's queue, then the queues of neighbouring hubs (federation): depth and
/// consumers from the transport, which is asked until its first error (returned beside the
/// readings), and the waiting ages from the store (by final recipient, so none for a hub).
pub async fn read_queues<T: Transport>(
    hub: &Hub<T>,
) -> Result<(Vec<QueueReading>, Option<String>), crate::store::StoreError> {
    let directory = hub.directory();
    let neighbours = crate::federation::neighbour_queues(hub.config());
    let mut readings = Vec::with_capacity(directory.len() + neighbours.len());
    let mut transport_error = None;
    for agency in directory.codes().chain(&neighbours) {
        let depth = if transport_error.is_none() {
            match hub.transport().queue_depth(agency).await {
                Ok(depth) => depth,
                Err(error) => {
                    transport_error = Some(error.to_string());
                    QueueDepth::default()
                }
            }
        } else {
            QueueDepth::default()
        };
        readings.push(QueueReading {
            agency: agency.clone(),
            depth,
            unacknowledged: hub.unacknowledged_of(agency),
            oldest_accepted: hub.store().oldest_waiting(agency.as_str())?,
        });
    }
    Ok((readings, transport_error))
}

/// Samples the hub every `interval` until `shutdown`.
pub async fn run<T: Transport>(hub: Hub<T>, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(error) = sample(&hub).await {
            tracing::warn!(%error, "sampling the queues failed");
        }
    }
}

/// Takes one sample: asks the transport for each queue's depth, the store for waiting ages.
pub async fn sample<T: Transport>(hub: &Hub<T>) -> Result<(), crate::store::StoreError> {
    let now = now_unix_ms();
    let at = Instant::now();
    let store = hub.store();
    let flows = lock(&hub.activity().flows).clone();
    let mut sample = Sample {
        at_unix_ms: now,
        outbox: store.outbox_len(),
        dead_letters: store.dead_letter_count(),
        enqueued: flows.values().map(|f| f.enqueued).sum(),
        acknowledged: flows.values().map(|f| f.acknowledged).sum(),
        ..Sample::default()
    };
    let (readings, transport_error) = read_queues(hub).await?;
    for reading in &readings {
        for (urgency, accepted_at) in reading.oldest_accepted.iter().enumerate() {
            if let Some(accepted_at) = accepted_at {
                let age = now - accepted_at;
                let slot = &mut sample.oldest_waiting_ms[urgency];
                *slot = Some(slot.map_or(age, |known| known.max(age)));
            }
        }
        sample.ready += reading.depth.ready;
        sample.unacknowledged += reading.unacknowledged;
    }
    let activity = hub.activity();
    // Rates are measured against the window that includes the flows recorded now.
    let queues: Vec<QueueView> = readings
        .iter()
        .map(|reading| QueueView {
            agency: reading.agency.to_string(),
            ready: reading.depth.ready,
            unacknowledged: reading.unacknowledged,
            consumers: reading.depth.consumers,
            oldest_waiting_ms: reading.oldest().map(|at| now - at),
            rates: Rates::default(),
        })
        .collect();
    hub.metrics().set_queue_gauges(&queues, &sample);
    activity.record(sample, at);
    let queues = queues
        .into_iter()
        .map(|queue| QueueView {
            rates: activity.rates(&queue.agency),
            ..queue
        })
        .collect();
    activity.set_queues(queues, transport_error);
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each update is a single insert or replacement, consistent even after a panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_measured_from_the_oldest_snapshot_in_the_window() {
        let activity = Activity::default();
        let start = Instant::now() - Duration::from_secs(10);
        activity.record(Sample::default(), start);
        for _ in 0..50 {
            activity.enqueued("000.21.31.H53");
        }
        for _ in 0..20 {
            activity.acknowledged("000.21.31.H53");
        }
        let rates = activity.rates("000.21.31.H53");
        assert!(
            (4.5..=5.1).contains(&rates.in_per_second),
            "50 in about 10 s: {rates:?}"
        );
        assert!(
            (1.8..=2.1).contains(&rates.out_per_second),
            "20 in about 10 s: {rates:?}"
        );
        assert_eq!(activity.rates("000.00.00.H53"), Rates::default());
    }

    #[test]
    fn history_keeps_one_hour() {
        let activity = Activity::default();
        let now = now_unix_ms();
        for minutes_ago in [90, 61, 30, 0] {
            let sample = Sample {
                at_unix_ms: now - minutes_ago * 60_000,
                ..Sample::default()
            };
            activity.record(sample, Instant::now());
        }
        let kept: Vec<i64> = activity
            .samples()
            .iter()
            .map(|s| (now - s.at_unix_ms) / 60_000)
            .collect();
        assert_eq!(kept, [30, 0]);
    }
}
