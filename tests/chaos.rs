//! The chaos suite: real `lienthong` processes and the real RabbitMQ driven through faults while
//! documents flow, then counted. Each scenario prints one line:
//!
//! `scenario NAME: sent N, accepted N, delivered N, lost 0, duplicates-after-ack 0, dead-lettered N`
//!
//! and fails unless nothing accepted was lost and nothing acknowledged was shown again.
//!
//! Some scenarios stop RabbitMQ itself or raise its memory or disk alarm, so this suite must not
//! run beside other tests: `make test` runs it in a second pass with one test thread (`--skip
//! faults::` in the first pass), and `make chaos` runs it at full scale
//! (`LIENTHONG_CHAOS_SCALE=full`: 200,000-document backlog).

mod support;

mod faults {
    use super::support::power_cut::{PowerCutDisk, SECTOR, Unsynced};
    use super::support::*;
    use lienthong::client::{ExchangeClient, connect};
    use lienthong_proto::v1 as wire;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;
    use tokio::task::JoinSet;
    use tonic::Code;

    /// How big the load of each scenario is.
    #[derive(Debug, Clone, Copy)]
    struct Scale {
        documents: usize,
        backlog: usize,
        senders: usize,
        kills: usize,
        /// Between the kills of `hub-sigkill`: short enough that they fall inside the load.
        kill_interval: Duration,
    }

    fn scale() -> Scale {
        match std::env::var("LIENTHONG_CHAOS_SCALE").as_deref() {
            Ok("full") => Scale {
                documents: 5_000,
                backlog: 200_000,
                senders: 32,
                kills: 5,
                kill_interval: Duration::from_millis(700),
            },
            _ => Scale {
                documents: 300,
                backlog: 2_000,
                senders: 8,
                kills: 3,
                kill_interval: Duration::from_millis(150),
            },
        }
    }

    /// How long the recipient waits for the answer to one `Ack`.
    const ACK_ANSWER_WAIT: Duration = Duration::from_secs(60);

    /// What the clients saw.
    #[derive(Debug, Default)]
    struct Tally {
        sent: usize,
        accepted: HashSet<String>,
        delivered: HashSet<String>,
        acknowledged: HashSet<String>,
        duplicates_after_ack: usize,
        redelivered_flags: usize,
        rejections: std::collections::HashMap<String, u32>,
        /// Acks whose answer was lost (the hub died): the hub may or may not have recorded them.
        ack_unknown: HashSet<String>,
        /// Every answer to an `Ack` other than success, by document, in order: what a document
        /// that never counts as acknowledged went through.
        ack_refusals: std::collections::HashMap<String, Vec<String>>,
    }

    impl Tally {
        /// Accepted documents the client has not seen acknowledged.
        fn unacknowledged(&self) -> Vec<String> {
            self.accepted
                .difference(&self.acknowledged)
                .cloned()
                .collect()
        }
    }

    #[derive(Debug, Clone, Default)]
    struct Shared {
        tally: Arc<Mutex<Tally>>,
        senders_done: Arc<AtomicBool>,
    }

    impl Shared {
        fn tally(&self) -> MutexGuard<'_, Tally> {
            self.tally.lock().expect("tally lock")
        }

        /// Sending is over, every accepted document was acknowledged (or its ack's answer was
        /// lost with the hub that received it), and each poison document was refused often
        /// enough to be dead-lettered.
        ///
        /// When the hub dies after recording an ack but before answering it, the client cannot
        /// know; the hub rightly never shows that document again. `report` asks the hub about
        /// every document the client did not see acknowledged.
        fn all_accounted_for(&self, behaviour: &RecipientBehaviour) -> bool {
            if !self.senders_done.load(Ordering::SeqCst) {
                return false;
            }
            let tally = self.tally();
            let poison_done = behaviour.poison.iter().all(|id| {
                tally.rejections.get(id).copied().unwrap_or(0) > behaviour.delivery_limit
            });
            poison_done
                && tally.accepted.iter().all(|id| {
                    tally.acknowledged.contains(id)
                        || tally.ack_unknown.contains(id)
                        || behaviour.poison.contains(id)
                })
        }
    }

    /// How the recipient behaves.
    #[derive(Debug, Clone, Default)]
    struct RecipientBehaviour {
        /// Reject these documents every time.
        poison: HashSet<String>,
        /// Drop the stream without acknowledging every this many deliveries.
        drop_stream_every: Option<usize>,
        /// The hub's `delivery_limit`: rejections before a poison document is dead-lettered.
        delivery_limit: u32,
    }

    fn documents(count: usize, scenario: &str) -> Vec<wire::Document> {
        documents_for(count, scenario, DISTRICT)
    }

    /// `count` documents from the commune to `recipient`, of every urgency.
    fn documents_for(count: usize, scenario: &str, recipient: &str) -> Vec<wire::Document> {
        (0..count)
            .map(|n| {
                let mut doc = document(COMMUNE, &[recipient], &format!("{scenario} {n}"));
                doc.document_id = format!("{COMMUNE},2026/11/27,{n}/{scenario}");
                doc.priority = (n % 5) as u32;
                doc
            })
            .collect()
    }

    async fn connect_retrying(endpoint: &str, agency: &str) -> ExchangeClient {
        loop {
            if let Ok(client) = connect(endpoint, agency).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends every document from `senders` concurrent clients, retrying each (same id, so the
    /// retry is idempotent) until the hub accepts it.
    async fn send_all(endpoint: String, docs: Vec<wire::Document>, senders: usize, shared: Shared) {
        shared.tally().sent += docs.len();
        let mut tasks = JoinSet::new();
        let per_sender = docs.len().div_ceil(senders.max(1)).max(1);
        for chunk in docs.chunks(per_sender) {
            let chunk = chunk.to_vec();
            let endpoint = endpoint.clone();
            let shared = shared.clone();
            tasks.spawn(async move {
                let mut client = connect_retrying(&endpoint, COMMUNE).await;
                for doc in chunk {
                    loop {
                        match client
                            .send(wire::SendRequest {
                                document: Some(doc.clone()),
                            })
                            .await
                        {
                            Ok(_) => {
                                shared.tally().accepted.insert(doc.document_id.clone());
                                break;
                            }
                            Err(status) => {
                                assert!(
                                    matches!(
                                        status.code(),
                                        Code::Unavailable
                                            | Code::Unknown
                                            | Code::Cancelled
                                            | Code::Internal
                                    ),
                                    "unexpected refusal of {}: {status:?}",
                                    doc.document_id
                                );
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.expect("sender task");
        }
        shared.senders_done.store(true, Ordering::SeqCst);
    }

    /// Receives as `recipient` until every accepted document (but the poison) is acknowledged,
    /// then listens a little longer for anything shown again.
    async fn receive_all(
        endpoint: String,
        recipient: &'static str,
        behaviour: RecipientBehaviour,
        shared: Shared,
        deadline: Duration,
    ) {
        let start = tokio::time::Instant::now();
        let mut finished_at: Option<tokio::time::Instant> = None;
        let mut acks = JoinSet::new();
        let mut deliveries = 0usize;
        'connection: loop {
            let mut client = connect_retrying(&endpoint, recipient).await;
            let Ok(response) = client.receive(wire::ReceiveRequest {}).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut stream = response.into_inner();
            loop {
                if finished_at.is_none()
                    && shared.all_accounted_for(&behaviour)
                    && unknown_acks_recorded(&mut client, &shared).await
                {
                    finished_at = Some(tokio::time::Instant::now());
                }
                // Listen a while longer, for copies shown again after an ack (counted as
                // duplicates).
                if finished_at.is_some_and(|at| at.elapsed() > Duration::from_secs(2)) {
                    break 'connection;
                }
                if start.elapsed() >= deadline {
                    let missing = shared.tally().unacknowledged();
                    let mut states = Vec::new();
                    for id in missing.iter().take(5) {
                        let state = client
                            .track(wire::TrackRequest {
                                document_id: id.clone(),
                            })
                            .await
                            .map(|t| format!("{:?}", t.into_inner().recipients[0].state()));
                        let refusals = shared.tally().ack_refusals.get(id).cloned();
                        states.push(format!("{id}: {state:?}, Ack answers {refusals:?}"));
                    }
                    let tally = shared.tally();
                    panic!(
                        "not done after {deadline:?}: sent {}, accepted {}, acknowledged {}, ack answer lost {}; not acknowledged: {states:?}",
                        tally.sent,
                        tally.accepted.len(),
                        tally.acknowledged.len(),
                        tally.ack_unknown.len()
                    );
                }
                let delivery = match tokio::time::timeout(
                    Duration::from_millis(300),
                    stream.message(),
                )
                .await
                {
                    Err(_) => continue,
                    Ok(Ok(Some(delivery))) => delivery,
                    Ok(Ok(None) | Err(_)) => continue 'connection,
                };
                let Some(wire::delivery::Payload::Document(doc)) = &delivery.payload else {
                    panic!("only documents are sent in the chaos suite: {delivery:?}");
                };
                let id = doc.document_id.clone();
                {
                    let mut tally = shared.tally();
                    if tally.acknowledged.contains(&id) {
                        tally.duplicates_after_ack += 1;
                    }
                    tally.delivered.insert(id.clone());
                    tally.redelivered_flags += usize::from(delivery.redelivered);
                }
                deliveries += 1;
                if behaviour
                    .drop_stream_every
                    .is_some_and(|every| deliveries.is_multiple_of(every))
                {
                    continue 'connection;
                }
                let reject = behaviour.poison.contains(&id);
                let mut acker = client.clone();
                let shared = shared.clone();
                acks.spawn(async move {
                    let acking = acker.ack(wire::AckRequest {
                        ack_token: delivery.ack_token,
                        reject,
                        reason: if reject {
                            "unreadable attachment".into()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    });
                    let Ok(acked) = tokio::time::timeout(ACK_ANSWER_WAIT, acking).await else {
                        shared
                            .tally()
                            .ack_refusals
                            .entry(id)
                            .or_default()
                            .push(format!("no answer within {ACK_ANSWER_WAIT:?}"));
                        return;
                    };
                    let mut tally = shared.tally();
                    if let Err(status) = &acked {
                        let refusal = format!("{:?}: {}", status.code(), status.message());
                        tally
                            .ack_refusals
                            .entry(id.clone())
                            .or_default()
                            .push(refusal);
                    }
                    match acked {
                        Ok(_) if reject => *tally.rejections.entry(id).or_default() += 1,
                        Ok(_) => {
                            tally.ack_unknown.remove(&id);
                            tally.acknowledged.insert(id);
                        }
                        // The stream closed first: the document will come again.
                        Err(status) if status.code() == Code::FailedPrecondition => {}
                        Err(_) => {
                            tally.ack_unknown.insert(id);
                        }
                    }
                });
                while acks.len() > 64 {
                    acks.join_next().await;
                }
            }
        }
        while acks.join_next().await.is_some() {}
    }

    /// Whether the hub recorded every ack whose answer the client lost. One it did not record
    /// is still unsettled on the queue and comes again, so the receiver keeps listening.
    async fn unknown_acks_recorded(client: &mut ExchangeClient, shared: &Shared) -> bool {
        let unknown: Vec<String> = shared.tally().ack_unknown.iter().cloned().collect();
        for id in unknown {
            let Ok(trace) = client
                .track(wire::TrackRequest {
                    document_id: id.clone(),
                })
                .await
            else {
                return false;
            };
            if trace.into_inner().recipients[0].state() != wire::DeliveryState::Acknowledged {
                return false;
            }
        }
        true
    }

    /// Counts, prints the scenario's line, and checks it.
    async fn report(
        name: &str,
        endpoint: &str,
        shared: &Shared,
        expect_dead_lettered: usize,
    ) -> String {
        let kept = || async { list_queues(endpoint).await.dead_letters as usize };
        if expect_dead_lettered > 0 {
            eventually(
                "the dead letters are kept",
                Duration::from_secs(20),
                || async { kept().await >= expect_dead_lettered },
            )
            .await;
        }
        let dead_lettered = kept().await;
        let mut commune = connect_retrying(endpoint, COMMUNE).await;
        let unacknowledged = shared.tally().unacknowledged();
        // Lost: accepted, never shown to the recipient, and not dead-lettered. A document shown
        // but not acked from the client's side must be acknowledged (or dead-lettered) at the hub.
        let mut lost = 0;
        for id in &unacknowledged {
            let trace = commune
                .track(wire::TrackRequest {
                    document_id: id.clone(),
                })
                .await
                .expect("track an accepted document")
                .into_inner();
            let state = trace.recipients[0].state();
            let settled = matches!(
                state,
                wire::DeliveryState::Acknowledged | wire::DeliveryState::DeadLettered
            );
            if !shared.tally().delivered.contains(id) || !settled {
                lost += 1;
            }
        }
        let tally = shared.tally();
        let line = format!(
            "scenario {name}: sent {}, accepted {}, delivered {}, lost {lost}, duplicates-after-ack {}, dead-lettered {dead_lettered}",
            tally.sent,
            tally.accepted.len(),
            tally.delivered.len(),
            tally.duplicates_after_ack
        );
        println!("{line}");
        assert_eq!(tally.accepted.len(), tally.sent, "{line}");
        assert_eq!(lost, 0, "{line}");
        assert_eq!(tally.duplicates_after_ack, 0, "{line}");
        assert_eq!(dead_lettered, expect_dead_lettered, "{line}");
        line
    }

    const CHAOS_DELIVERY_LIMIT: u32 = 3;

    /// A hub process on RabbitMQ with a fixed port, so that clients find it after restarts.
    fn chaos_options() -> HubOptions {
        let cache_mib = std::env::var("LIENTHONG_CHAOS_CACHE_MIB")
            .ok()
            .and_then(|mib| mib.parse().ok());
        HubOptions {
            cache_mib: cache_mib.unwrap_or(HubOptions::new(TransportKind::Amqp).cache_mib),
            grpc_listen: format!("127.0.0.1:{}", free_port()),
            prefetch: 64,
            delivery_limit: CHAOS_DELIVERY_LIMIT,
            max_outbox_messages: 1_000_000,
            ..HubOptions::new(TransportKind::Amqp)
        }
    }

    fn endpoint_of(options: &HubOptions) -> String {
        format!("http://{}", options.grpc_listen)
    }

    /// One scenario: its hub process on RabbitMQ, and the clients' tally.
    struct Scenario {
        files: HubFiles,
        options: HubOptions,
        endpoint: String,
        hub: HubProcess,
        shared: Shared,
    }

    impl Scenario {
        async fn start(name: &str) -> Scenario {
            let options = chaos_options();
            let files = HubFiles::create(name, &options);
            let endpoint = endpoint_of(&options);
            let hub = HubProcess::start(&files, &options).await;
            Scenario {
                files,
                options,
                endpoint,
                hub,
                shared: Shared::default(),
            }
        }

        /// Starts a scenario whose hub keeps its data on a disk of its own, which `mount`
        /// mounts at the data directory before the hub starts. The disk comes back apart from
        /// the scenario: bound after it, `let (scenario, disk) = …`, it is dropped first.
        async fn start_on<D>(
            name: &str,
            options: HubOptions,
            mount: impl FnOnce(&std::path::Path) -> D,
        ) -> (Scenario, D) {
            let files = HubFiles::create(name, &options);
            let disk = mount(&files.data_dir());
            let endpoint = endpoint_of(&options);
            let hub = HubProcess::start(&files, &options).await;
            let scenario = Scenario {
                files,
                options,
                endpoint,
                hub,
                shared: Shared::default(),
            };
            (scenario, disk)
        }

        /// Starts sending `docs` and receiving them with `behaviour`, in the background.
        fn load(
            &self,
            docs: Vec<wire::Document>,
            behaviour: RecipientBehaviour,
        ) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
            let sending = tokio::spawn(send_all(
                self.endpoint.clone(),
                docs,
                scale().senders,
                self.shared.clone(),
            ));
            let receiving = tokio::spawn(receive_all(
                self.endpoint.clone(),
                DISTRICT,
                behaviour,
                self.shared.clone(),
                Duration::from_secs(300),
            ));
            (sending, receiving)
        }

        /// Prints and checks the scenario's line, and cleans up.
        async fn finish(self, name: &str, expect_dead_lettered: usize) -> String {
            let line = report(name, &self.endpoint, &self.shared, expect_dead_lettered).await;
            self.hub.kill().await;
            if self.options.kind == TransportKind::Amqp {
                self.files.delete_topology().await;
            }
            line
        }
    }

    /// Waits until the district's queue (of the hub whose names start with `prefix`) holds
    /// `backlog` messages: all of them published. Returns the queue's name.
    async fn district_queue_holds(prefix: &str, backlog: usize, deadline: Duration) -> String {
        let names = lienthong::transport::TopologyNames::new(prefix);
        let queue = names.agency_queue(&DISTRICT.parse().expect("code"));
        eventually(
            "the backlog is in the recipient's queue",
            deadline,
            || async { amqp_queue_depth(&queue).await as usize == backlog },
        )
        .await;
        queue
    }

    /// Waits for the senders and the receiver of a scenario's load.
    async fn wait_for(load: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>)) {
        let (sending, receiving) = load;
        sending.await.expect("senders");
        receiving.await.expect("receiver");
    }

    /// Documents cross from province A to province B through the central hub, which is
    /// killed (SIGKILL) and stays down a while, several times. Province A keeps accepting
    /// meanwhile; what waits in its uplink queue flows when the central hub is back.
    #[tokio::test]
    async fn central_hub_killed_while_documents_cross_provinces() {
        use super::support::federation::{COMMUNE_B, Federation};
        let mut federation = Federation::start("chaos-central", TransportKind::Amqp).await;
        let shared = Shared::default();
        let origin = federation.province_a.endpoint().to_owned();
        let docs = documents_for(scale().documents, "central", COMMUNE_B);
        let load = load_across_provinces(&federation, docs, &shared);
        for _ in 0..scale().kills {
            tokio::time::sleep(Duration::from_millis(700)).await;
            federation
                .central
                .restart_after(Duration::from_millis(1500))
                .await;
        }
        wait_for(load).await;
        report("central-sigkill", &origin, &shared, 0).await;
        federation.finish().await;
    }

    /// Starts sending `docs` from a commune of province A and receiving them as the commune of
    /// province B, in the background.
    fn load_across_provinces(
        federation: &super::support::federation::Federation,
        docs: Vec<wire::Document>,
        shared: &Shared,
    ) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
        let sending = tokio::spawn(send_all(
            federation.province_a.endpoint().to_owned(),
            docs,
            scale().senders,
            shared.clone(),
        ));
        let receiving = tokio::spawn(receive_all(
            federation.province_b.endpoint().to_owned(),
            super::support::federation::COMMUNE_B,
            RecipientBehaviour::default(),
            shared.clone(),
            Duration::from_secs(300),
        ));
        (sending, receiving)
    }

    /// Documents cross from province A to province B through the central hub, whose machine
    /// loses its power mid-load (its data on a [`PowerCutDisk`]). The central hub answers a
    /// province's `Forward` only once the message is synced, and the province settles its copy
    /// only on that answer: started again on what its disk kept, the central hub still holds
    /// every message it took, and nothing is lost or shown again after its acknowledgement. The
    /// three hubs run on the embedded transport, so that what the central hub holds is on that
    /// disk alone (on RabbitMQ it would be in the central hub's queues within milliseconds).
    #[tokio::test]
    async fn the_central_hub_loses_its_power_while_documents_cross_provinces() {
        use super::support::federation::{COMMUNE_B, Federation};
        let mut federation =
            Federation::start_with("chaos-central-power", TransportKind::Embedded, true).await;
        let shared = Shared::default();
        let origin = federation.province_a.endpoint().to_owned();
        let total = scale().documents * 2;
        let docs = documents_for(total, "central-power", COMMUNE_B);
        let load = load_across_provinces(&federation, docs, &shared);
        eventually(
            "a tenth of the documents are acknowledged",
            Duration::from_secs(60),
            || async { shared.tally().acknowledged.len() >= total / 10 },
        )
        .await;
        let central = &mut federation.central;
        central
            .process
            .child
            .kill()
            .await
            .expect("kill the central hub");
        let cut = central
            .disk
            .take()
            .expect("the central hub's disk")
            .cut_power(Unsynced::Lost);
        let acknowledged = shared.tally().acknowledged.len();
        println!(
            "scenario central-power-cut: the power failed with {acknowledged} of {total} documents acknowledged; unsynced writes {cut:?}"
        );
        assert!(
            acknowledged < total,
            "the power failed before the load ended"
        );
        central.process = HubProcess::start(&central.files, &central.options).await;
        wait_for(load).await;
        report("central-power-cut", &origin, &shared, 0).await;
        federation.finish().await;
    }

    #[tokio::test]
    async fn hub_killed_repeatedly_mid_load() {
        let mut scenario = Scenario::start("chaos_kill").await;
        let load = scenario.load(
            documents(scale().documents, "kill"),
            RecipientBehaviour::default(),
        );
        for _ in 0..scale().kills {
            tokio::time::sleep(scale().kill_interval).await;
            let Scenario {
                files,
                options,
                hub,
                ..
            } = &mut scenario;
            hub.restart(files, options).await;
        }
        wait_for(load).await;
        let accepted = scenario.shared.tally().accepted.len() as u64;
        assert_ledger_survived("hub-sigkill", &scenario.endpoint, accepted).await;
        scenario.finish("hub-sigkill", 0).await;
    }

    /// The receipt ledger after the kills: it holds at least the four receipts of every
    /// accepted document (ACCEPTED, ENQUEUED, DELIVERED, ACKNOWLEDGED), every record chains,
    /// and every checkpoint, including those signed after a restart from a Merkle frontier
    /// rebuilt partly from records, matches its root and signature.
    async fn assert_ledger_survived(name: &str, endpoint: &str, accepted: u64) {
        let info = settled_ledger(endpoint).await;
        let verified = verify_ledger(endpoint).await;
        println!(
            "scenario {name}: ledger of {} records verified, {} checkpoints, {}",
            verified.records_checked,
            verified.checkpoints_checked,
            if verified.ok {
                "intact"
            } else {
                verified.problem.as_str()
            }
        );
        assert!(verified.ok, "{verified:?}");
        assert_eq!(verified.records_checked, info.size);
        assert!(
            info.size >= 4 * accepted,
            "{} records for {accepted} accepted documents",
            info.size
        );
    }

    #[tokio::test]
    async fn rabbitmq_stopped_and_started_mid_load() {
        let scenario = Scenario::start("chaos_rabbit").await;
        let load = scenario.load(
            documents(scale().documents, "rabbit"),
            RecipientBehaviour::default(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        rabbitmqctl(&["stop_app"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        start_rabbitmq_app(&scenario.files.prefix).await;
        wait_for(load).await;
        scenario.finish("rabbitmq-restart", 0).await;
    }

    #[tokio::test]
    async fn recipient_streams_killed_mid_batch() {
        let scenario = Scenario::start("chaos_streams").await;
        let shared = scenario.shared.clone();
        let behaviour = RecipientBehaviour {
            drop_stream_every: Some(7),
            ..RecipientBehaviour::default()
        };
        let load = scenario.load(documents(scale().documents, "streams"), behaviour);
        wait_for(load).await;
        scenario.finish("streams-killed", 0).await;
        assert!(
            shared.tally().redelivered_flags > 0,
            "documents left unacknowledged come back flagged"
        );
    }

    #[tokio::test]
    async fn recipient_offline_during_a_backlog() {
        let backlog = scale().backlog;
        let scenario = Scenario::start("chaos_backlog").await;
        send_all(
            scenario.endpoint.clone(),
            documents(backlog, "backlog"),
            scale().senders,
            scenario.shared.clone(),
        )
        .await;
        district_queue_holds(&scenario.files.prefix, backlog, Duration::from_secs(600)).await;
        let rss_with_backlog = scenario.hub.peak_rss_bytes();
        receive_all(
            scenario.endpoint.clone(),
            DISTRICT,
            RecipientBehaviour::default(),
            scenario.shared.clone(),
            Duration::from_secs(1200),
        )
        .await;
        let rss_after = scenario.hub.peak_rss_bytes();
        let line = scenario.finish("recipient-offline", 0).await;
        println!(
            "scenario recipient-offline: backlog {backlog}, hub peak rss {} MiB while the backlog waited, {} MiB after draining",
            rss_with_backlog / (1024 * 1024),
            rss_after / (1024 * 1024)
        );
        assert!(line.contains(&format!("delivered {backlog}")), "{line}");
    }

    #[tokio::test]
    async fn a_poison_document_is_dead_lettered_and_the_rest_flow() {
        let scenario = Scenario::start("chaos_poison").await;
        let docs = documents(scale().documents, "poison");
        let behaviour = RecipientBehaviour {
            poison: HashSet::from([docs[docs.len() / 2].document_id.clone()]),
            delivery_limit: CHAOS_DELIVERY_LIMIT,
            ..RecipientBehaviour::default()
        };
        let load = scenario.load(docs, behaviour);
        wait_for(load).await;
        scenario.finish("poison-document", 1).await;
    }

    /// A file system of its own for a hub's data, on a loop device, that a scenario can freeze
    /// (`fsfreeze`: every write to it then waits, as on a disk that stalls) or fill (every write
    /// that needs room then fails, as on a full disk). Needs root, as `make test` has on its CI
    /// machine. Dropped, it thaws and unmounts, even after a panic.
    struct LoopDisk {
        mount_point: std::path::PathBuf,
        /// The file behind the loop device; removed after the unmount.
        _image: tempfile::NamedTempFile,
    }

    impl LoopDisk {
        /// The file that [`LoopDisk::fill`] writes, beside the hub's files.
        const FILLER: &'static str = "filler";

        fn mount(mount_point: &std::path::Path) -> LoopDisk {
            let image = tempfile::NamedTempFile::new().expect("an image file");
            image
                .as_file()
                .set_len(256 * 1024 * 1024)
                .expect("size the image");
            std::fs::create_dir_all(mount_point).expect("the mount point");
            let image_path = image.path().to_str().expect("a UTF-8 path");
            let mount_path = mount_point.to_str().expect("a UTF-8 path");
            run_as_root("mkfs.ext4", &["-q", "-F", image_path]);
            run_as_root("mount", &["-o", "loop", image_path, mount_path]);
            LoopDisk {
                mount_point: mount_point.to_owned(),
                _image: image,
            }
        }

        fn freeze(&self) {
            run_as_root("fsfreeze", &["-f", self.path()]);
        }

        fn thaw(&self) {
            run_as_root("fsfreeze", &["-u", self.path()]);
        }

        /// Writes one file until the file system has no room left (root's reserved blocks
        /// included: the test and the hub both run as root).
        fn fill(&self) {
            use std::io::Write;
            let mut filler = std::fs::File::create(self.mount_point.join(Self::FILLER))
                .expect("create the filler");
            // Large writes first, then small ones for the last blocks.
            for chunk in [vec![0u8; 1 << 20], vec![0u8; 4096]] {
                loop {
                    match filler.write_all(&chunk) {
                        Ok(()) => {}
                        Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                        Err(error) => panic!("filling the disk: {error}"),
                    }
                }
            }
        }

        /// Writes one file until `room` bytes are left free, measured as the hub's floor
        /// measures it, give or take a MiB.
        fn fill_leaving(&self, room: u64) {
            use std::io::Write;
            let free = lienthong::store::free_space_on(&self.mount_point).expect("the free space");
            let mut filler = std::fs::File::create(self.mount_point.join(Self::FILLER))
                .expect("create the filler");
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..free.saturating_sub(room) >> 20 {
                filler.write_all(&chunk).expect("fill the disk");
            }
            filler.sync_all().expect("sync the filler");
        }

        /// Removes what [`LoopDisk::fill`] or [`LoopDisk::fill_leaving`] wrote.
        fn free(&self) {
            std::fs::remove_file(self.mount_point.join(Self::FILLER)).expect("remove the filler");
        }

        fn path(&self) -> &str {
            self.mount_point.to_str().expect("a UTF-8 path")
        }
    }

    impl Drop for LoopDisk {
        fn drop(&mut self) {
            // Quiet: the file system is seldom still frozen here.
            let _ = std::process::Command::new("fsfreeze")
                .args(["-u", self.path()])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = std::process::Command::new("umount")
                .args(["-l", self.path()])
                .status();
        }
    }

    /// Runs a system command that needs root; fails the scenario with what it printed.
    fn run_as_root(command: &str, args: &[&str]) {
        let output = std::process::Command::new(command)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{command}: {e} (the disk scenarios need it)"));
        assert!(
            output.status.success(),
            "{command} {args:?} failed (the disk scenarios need root and loop devices): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A scenario whose hub keeps its data on a [`LoopDisk`], with four times the scale's
    /// documents flowing and the first of them accepted. The disk comes apart from the
    /// scenario, to be bound after it (dropped first), so that after a panic it thaws and
    /// unmounts before the scenario's directory is removed (a removal on a frozen file system
    /// would wait).
    async fn start_on_a_loop_disk(
        name: &str,
        tag: &str,
    ) -> (
        Scenario,
        LoopDisk,
        (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
    ) {
        // Bound after the scenario here too, for a panic below.
        let (scenario, disk) = Scenario::start_on(name, chaos_options(), LoopDisk::mount).await;
        let load = scenario.load(
            documents(scale().documents * 4, tag),
            RecipientBehaviour::default(),
        );
        let shared = scenario.shared.clone();
        eventually(
            "the first documents are accepted",
            Duration::from_secs(30),
            || async { shared.tally().accepted.len() >= 20 },
        )
        .await;
        (scenario, disk, load)
    }

    /// The hub's disk stalls mid-load: every write waits for 2 s. No `Send` is answered while
    /// nothing can be made durable, yet the hub keeps answering what needs no write (`/healthz`,
    /// `/metrics`, `Track`); when the disk is back, everything flows, nothing lost or shown
    /// again after its acknowledgement.
    #[tokio::test]
    async fn the_disk_stalls_mid_load() {
        let (scenario, disk, load) = start_on_a_loop_disk("chaos_disk", "disk").await;
        let shared = scenario.shared.clone();
        disk.freeze();
        let frozen_at = tokio::time::Instant::now();
        // Sends already past their flush may still be answered in the first moments.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (accepted_early, already) = {
            let tally = shared.tally();
            let any = tally.accepted.iter().next().cloned().expect("one accepted");
            (tally.accepted.len(), any)
        };
        assert!(
            accepted_early < shared.tally().sent,
            "the disk froze before the load ended"
        );
        let quick = Duration::from_secs(1);
        let (status, _) =
            tokio::time::timeout(quick, http_get(&scenario.options.http_listen, "/healthz"))
                .await
                .expect("/healthz answers while the disk stalls");
        assert_eq!(status, 200);
        let (status, metrics) =
            tokio::time::timeout(quick, http_get(&scenario.options.http_listen, "/metrics"))
                .await
                .expect("/metrics answers while the disk stalls");
        assert_eq!(status, 200);
        assert!(metrics.contains("lienthong_send_latency_seconds_count"));
        let mut commune = connect_retrying(&scenario.endpoint, COMMUNE).await;
        let trace = tokio::time::timeout(
            quick,
            commune.track(wire::TrackRequest {
                document_id: already.clone(),
            }),
        )
        .await
        .expect("Track answers while the disk stalls")
        .expect("Track of an accepted document");
        assert_eq!(trace.into_inner().document_id, already);
        tokio::time::sleep(Duration::from_secs(2).saturating_sub(frozen_at.elapsed())).await;
        assert_eq!(
            shared.tally().accepted.len(),
            accepted_early,
            "no Send is answered while nothing can be written"
        );
        disk.thaw();
        wait_for(load).await;
        report("disk-stall", &scenario.endpoint, &shared, 0).await;
        scenario.hub.kill().await;
        scenario.files.delete_topology().await;
        // Unmounted before the scenario's directory, which holds the mount point, is removed.
        drop(disk);
    }

    /// The hub's disk fills up mid-load. sled fails every write after its first failed one, so
    /// the hub stops by itself (exit status 74, `EXIT_STORAGE`), answering UNAVAILABLE to what
    /// waited for the disk; started again once there is room, it carries on from what reached
    /// the disk: nothing accepted is lost, nothing acknowledged is shown again.
    #[tokio::test]
    async fn the_disk_fills_mid_load() {
        let (mut scenario, disk, load) = start_on_a_loop_disk("chaos_full", "full").await;
        let shared = scenario.shared.clone();
        disk.fill();
        let filled_at = tokio::time::Instant::now();
        let exit = tokio::time::timeout(Duration::from_secs(30), scenario.hub.child.wait())
            .await
            .expect("the hub stops by itself once its disk is full")
            .expect("the hub's exit status");
        let stopped_after = filled_at.elapsed();
        assert_eq!(
            exit.code(),
            Some(i32::from(lienthong::cli::EXIT_STORAGE)),
            "the hub stops with the storage exit status (a panic is 101)"
        );
        let (accepted, sent) = {
            let tally = shared.tally();
            (tally.accepted.len(), tally.sent)
        };
        assert!(accepted < sent, "the disk filled before the load ended");
        // Started again by its supervisor before there is room, it stops again the same way.
        let again = tokio::process::Command::new(env!("CARGO_BIN_EXE_lienthong"))
            .args(["serve", "--config"])
            .arg(&scenario.files.config_path)
            .env("RUST_LOG", "off")
            .kill_on_drop(true)
            .output();
        let again = tokio::time::timeout(Duration::from_secs(30), again)
            .await
            .expect("started on a full disk, the hub stops by itself")
            .expect("the hub's output");
        let printed = String::from_utf8_lossy(&again.stderr);
        assert_eq!(
            again.status.code(),
            Some(i32::from(lienthong::cli::EXIT_STORAGE)),
            "{printed}"
        );
        assert!(printed.contains("its disk is full"), "{printed}");
        disk.free();
        scenario.hub = HubProcess::start(&scenario.files, &scenario.options).await;
        wait_for(load).await;
        report("disk-full", &scenario.endpoint, &shared, 0).await;
        // What the recipient's `Ack`s met around the stop, by code.
        let mut refusals = std::collections::BTreeMap::<String, usize>::new();
        for refusal in shared.tally().ack_refusals.values().flatten() {
            let code = refusal.split(':').next().unwrap_or_default().to_owned();
            *refusals.entry(code).or_default() += 1;
        }
        println!(
            "scenario disk-full: the hub stopped {} ms after the disk filled; Ack answers other than success: {refusals:?}",
            stopped_after.as_millis()
        );
        scenario.hub.kill().await;
        scenario.files.delete_topology().await;
        // Unmounted before the scenario's directory, which holds the mount point, is removed.
        drop(disk);
    }

    /// Below `[storage] min_free_mib` on its disk, the hub refuses new documents and status
    /// reports with UNAVAILABLE naming the floor, and delivers and records the acknowledgement
    /// of what it accepted before, on the room left; with room again, it accepts both again.
    /// It never stops.
    #[tokio::test]
    async fn below_its_disk_floor_the_hub_refuses_new_messages_and_delivers_the_rest() {
        const FLOOR_MIB: u64 = 100;
        let options = HubOptions {
            min_free_mib: FLOOR_MIB,
            ..chaos_options()
        };
        let files = HubFiles::create("chaos_low", &options);
        let disk = LoopDisk::mount(&files.data_dir());
        let mut hub = HubProcess::start(&files, &options).await;
        // Serving gRPC comes before the connection to RabbitMQ: ready first, so that the
        // readiness asserted below the floor is the floor's doing.
        eventually(
            "the hub is ready before its disk runs low",
            Duration::from_secs(30),
            || async { http_get(&options.http_listen, "/readyz").await.0 == 200 },
        )
        .await;
        let mut commune = hub.client(COMMUNE).await;
        let mut district = hub.client(DISTRICT).await;
        let before = send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], "before the disk runs low"),
        )
        .await;

        disk.fill_leaving((FLOOR_MIB / 2) << 20);
        let refused = commune
            .send(wire::SendRequest {
                document: Some(document(COMMUNE, &[DISTRICT], "while the disk is low")),
            })
            .await
            .expect_err("a new document while the disk is below its floor");
        assert_refused_below_the_floor(&refused, FLOOR_MIB);
        let status_refused = district
            .report_status(received_status(&before))
            .await
            .expect_err("a status report while the disk is below its floor");
        assert_refused_below_the_floor(&status_refused, FLOOR_MIB);
        let (_, metrics) = http_get(&options.http_listen, "/metrics").await;
        let free: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("lienthong_disk_free_bytes "))
            .and_then(|value| value.trim().parse().ok())
            .expect("lienthong_disk_free_bytes in /metrics");
        assert!(free < FLOOR_MIB << 20, "{free} bytes free");
        let (status, readiness) = http_get(&options.http_listen, "/readyz").await;
        assert_eq!(status, 200, "still ready: it delivers");
        assert!(readiness.contains("below the floor"), "{readiness}");

        let mut stream = open_stream(&mut district).await;
        let delivery = next_delivery(&mut stream).await;
        assert_eq!(delivered_document(&delivery).document_id, before);
        ack(&mut district, &delivery).await;

        disk.free();
        district
            .report_status(received_status(&before))
            .await
            .expect("a status report once the disk has room");
        let after = send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], "after the disk has room"),
        )
        .await;
        let delivery = next_delivery(&mut stream).await;
        assert_eq!(delivered_document(&delivery).document_id, after);
        ack(&mut district, &delivery).await;
        assert!(
            hub.child.try_wait().expect("the hub's state").is_none(),
            "the hub ran throughout"
        );
        drop(stream);
        hub.kill().await;
        files.delete_topology().await;
        // Unmounted before the hub's directory, which holds the mount point, is removed.
        drop(disk);
    }

    /// `fsync` of the file or directory at `path`: of a directory, it makes its names durable.
    fn fsync(path: &std::path::Path) {
        std::fs::File::open(path)
            .and_then(|file| file.sync_all())
            .unwrap_or_else(|error| panic!("fsync {}: {error}", path.display()));
    }

    /// The disk the power-cut scenarios stand on. Before the cut, what the processes wrote is
    /// what they read; after it, a file holds what `fdatasync` or `fsync` made durable and
    /// nothing written later, under the names its directory had when last synced: a rename
    /// followed by a sync of the directory is kept, one not followed by it is undone, and a
    /// file whose directory was not synced after its creation is gone, synced or not.
    #[test]
    fn the_power_cut_disk_keeps_only_what_was_synced() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().join("disk");
        let disk = PowerCutDisk::mount(&mount_point);
        let at = |name: &str| mount_point.join(name);
        let mut synced = std::fs::File::create(at("synced")).expect("create");
        synced.write_all(b"kept").expect("write");
        synced.sync_data().expect("fdatasync");
        synced.write_all(b", then lost").expect("write");
        drop(synced);
        for name in ["staged", "moved"] {
            let mut file = std::fs::File::create(at(name)).expect("create");
            file.write_all(name.as_bytes()).expect("write");
            file.sync_all().expect("fsync");
        }
        std::fs::create_dir(at("inner")).expect("mkdir");
        std::fs::write(at("inner/file"), b"inner").expect("write");
        fsync(&at("inner/file"));
        fsync(&at("inner"));
        fsync(&mount_point);
        std::fs::rename(at("moved"), at("moved-and-synced")).expect("rename");
        fsync(&mount_point);
        std::fs::rename(at("staged"), at("renamed")).expect("rename");
        std::fs::write(at("never-synced"), b"written and closed").expect("write");
        let mut unnamed = std::fs::File::create(at("unnamed")).expect("create");
        unnamed.write_all(b"synced, its name not").expect("write");
        unnamed.sync_all().expect("fsync");
        drop(unnamed);
        assert_eq!(
            std::fs::read(at("synced")).expect("read"),
            b"kept, then lost"
        );
        assert_eq!(std::fs::read(at("renamed")).expect("read"), b"staged");

        let cut = disk.cut_power(Unsynced::Lost);
        assert_eq!(std::fs::read(at("synced")).expect("read"), b"kept");
        assert_eq!(std::fs::read(at("staged")).expect("read"), b"staged");
        assert!(
            !at("renamed").exists(),
            "a rename whose directory was not synced"
        );
        assert_eq!(
            std::fs::read(at("moved-and-synced")).expect("read"),
            b"moved"
        );
        assert!(!at("moved").exists());
        assert_eq!(std::fs::read(at("inner/file")).expect("read"), b"inner");
        assert!(!at("never-synced").exists());
        assert!(!at("unnamed").exists());
        // `renamed`, `never-synced` and `unnamed` appeared, `staged` went.
        assert_eq!(cut.names_lost, 4, "{cut:?}");
    }

    /// The disk's other way to lose its power: of the writes not synced, some are kept whole,
    /// some torn at a sector boundary, the rest lost, each on its own, what was synced kept.
    #[test]
    fn the_power_cut_disk_can_keep_part_of_what_was_not_synced() {
        const WRITES: usize = 64;
        const SIZE: usize = 8192;
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().join("disk");
        let disk = PowerCutDisk::mount(&mount_point);
        let file = std::fs::File::create(mount_point.join("log")).expect("create");
        fsync(&mount_point);
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[1u8; SIZE], 0).expect("write");
        file.sync_data().expect("fdatasync");
        for n in 1..=WRITES {
            file.write_all_at(&[n as u8 + 1; SIZE], (n * SIZE) as u64)
                .expect("write");
        }
        drop(file);
        let cut = disk.cut_power(Unsynced::PartlyKept { seed: 7 });

        let log = std::fs::read(mount_point.join("log")).expect("read");
        assert_eq!(&log[..SIZE], &[1u8; SIZE][..], "the synced write is kept");
        let (mut kept, mut torn, mut lost) = (0, 0, 0);
        for n in 1..=WRITES {
            let region = log.get(n * SIZE..(n + 1) * SIZE).unwrap_or(&[]);
            let written = region
                .iter()
                .take_while(|byte| **byte == n as u8 + 1)
                .count();
            assert!(
                region[written..].iter().all(|byte| *byte == 0),
                "write {n} holds only its own bytes, then nothing"
            );
            match written {
                SIZE => kept += 1,
                0 => lost += 1,
                part => {
                    assert_eq!(part % SECTOR, 0, "write {n} torn at {part}");
                    torn += 1;
                }
            }
        }
        // A write torn at 0 bytes reads as lost.
        assert_eq!(
            (kept, torn + lost),
            (cut.kept, cut.torn + cut.lost),
            "{cut:?}"
        );
        assert!(kept > 0 && lost > 0 && torn > 0, "{cut:?}");
    }

    /// The hub's machine loses its power mid-load: its data lives on a [`PowerCutDisk`], which
    /// keeps only what was synced, and the power fails while documents are being sent,
    /// delivered and acknowledged. Started again on what the disk kept, the hub has lost
    /// nothing it accepted and shows nothing acknowledged again, and its ledger verifies.
    /// RabbitMQ, on a disk of its own, keeps running, as on a machine of its own.
    #[tokio::test]
    async fn the_power_fails_mid_load() {
        power_fails_mid_load(TransportKind::Amqp, "power-cut", Unsynced::Lost).await;
    }

    /// The same on the embedded transport, whose queues are in the hub's database and lose
    /// their power with it.
    #[tokio::test]
    async fn the_power_fails_mid_load_on_the_embedded_transport() {
        power_fails_mid_load(
            TransportKind::Embedded,
            "power-cut-embedded",
            Unsynced::Lost,
        )
        .await;
    }

    /// The same, on a disk that had written back part of what was not synced, in any order,
    /// some of it torn: sled's recovery must find where its log stops being whole. The seed is
    /// printed; `LIENTHONG_POWER_CUT_SEED` replays one.
    #[tokio::test]
    async fn the_power_fails_mid_load_with_part_of_the_unsynced_writes_kept() {
        let seed = power_cut_seed();
        let unsynced = Unsynced::PartlyKept { seed };
        power_fails_mid_load(TransportKind::Amqp, "power-cut-partial", unsynced).await;
    }

    /// The seed of a power cut that keeps part of what was not synced: `LIENTHONG_POWER_CUT_SEED`
    /// when set (to replay one), a random one otherwise.
    fn power_cut_seed() -> u64 {
        std::env::var("LIENTHONG_POWER_CUT_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(rand::random)
    }

    async fn power_fails_mid_load(kind: TransportKind, name: &str, unsynced: Unsynced) {
        let options = HubOptions {
            kind,
            ..chaos_options()
        };
        // Bound after the scenario, so that after a panic it unmounts before the scenario's
        // directory, which holds the mount point, is removed.
        let (mut scenario, disk) =
            Scenario::start_on("chaos_power", options, PowerCutDisk::mount).await;
        let total = scale().documents * 4;
        let load = scenario.load(documents(total, "power"), RecipientBehaviour::default());
        let shared = scenario.shared.clone();
        eventually(
            "a tenth of the documents are acknowledged",
            Duration::from_secs(60),
            || async { shared.tally().acknowledged.len() >= total / 10 },
        )
        .await;
        scenario.hub.child.kill().await.expect("kill the hub");
        let cut = disk.cut_power(unsynced);
        let (accepted, acknowledged) = {
            let tally = shared.tally();
            (tally.accepted.len(), tally.acknowledged.len())
        };
        println!(
            "scenario {name}: the power failed with {accepted} of {total} documents accepted, {acknowledged} acknowledged; unsynced writes {unsynced:?}: {cut:?}"
        );
        assert!(accepted < total, "the power failed before the load ended");
        scenario.hub = HubProcess::start(&scenario.files, &scenario.options).await;
        wait_for(load).await;
        let accepted = scenario.shared.tally().accepted.len() as u64;
        assert_ledger_survived(name, &scenario.endpoint, accepted).await;
        scenario.finish(name, 0).await;
    }

    /// A document too large for sled's log (over a quarter of a segment: 2 MiB) is written to
    /// a file of its own. Accepted for a recipient that is offline, it survives a power cut like
    /// any other. On the embedded transport, whose queues are in the hub's database, so that the
    /// document is there and nowhere else until it is delivered.
    #[tokio::test]
    async fn a_large_document_survives_a_power_cut() {
        let options = HubOptions {
            max_document_bytes: 8 << 20,
            ..HubOptions::new(TransportKind::Embedded)
        };
        let files = HubFiles::create("chaos_power_large", &options);
        let disk = PowerCutDisk::mount(&files.data_dir());
        let hub = HubProcess::start(&files, &options).await;
        let mut commune = hub.client(COMMUNE).await;
        let mut large = document(COMMUNE, &[DISTRICT], "a large document");
        large.body = (0..3 << 20).map(|n| (n % 251) as u8).collect();
        let id = send(&mut commune, large.clone()).await;
        hub.kill().await;
        disk.cut_power(Unsynced::Lost);

        let hub = HubProcess::start(&files, &options).await;
        let mut district = hub.client(DISTRICT).await;
        let mut stream = open_stream(&mut district).await;
        let delivery = next_delivery(&mut stream).await;
        let delivered = delivered_document(&delivery);
        assert_eq!(delivered.document_id, id);
        assert!(delivered.body == large.body, "the body came back altered");
        ack(&mut district, &delivery).await;
        drop(stream);
        hub.kill().await;
    }

    /// A hub's first start and a first archive of its ledger create directories: the data
    /// directory (two levels here, `hub/data` on a disk mounted at `disk`) and the archive's.
    /// Both survive a power cut that follows, with the archive file and the database without
    /// the archived records; a directory whose name was lost would take them with it.
    #[tokio::test]
    async fn new_directories_survive_a_power_cut() {
        let options = HubOptions {
            checkpoint_every: 8,
            data_dir: "disk/hub/data",
            ..HubOptions::new(TransportKind::Embedded)
        };
        let files = HubFiles::create("chaos_power_directories", &options);
        let disk = PowerCutDisk::mount(&files.dir.path().join("disk"));
        let hub = HubProcess::start(&files, &options).await;
        exchange_some_documents(&hub.endpoint, 3).await;
        let key = hex::encode(settled_ledger(&hub.endpoint).await.public_key);
        let archive = files
            .data_dir()
            .join("ledger-archive/ledger-000000000000-000000000008.jsonl");
        let said = stdout_of(&archive_ledger(&hub.endpoint, PROVINCE, 8).await);
        assert!(said.contains("archived records 0..8"), "{said}");
        hub.kill().await;
        let cut = disk.cut_power(Unsynced::Lost);
        println!("scenario power-cut-directories: the power failed after an archive: {cut:?}");

        assert!(
            data_dir_exists(&files.data_dir()),
            "the database is gone: {cut:?}"
        );
        assert!(archive.exists(), "the archive is gone: {cut:?}");
        let said = verify_exported_ledger(&archive, &key).await;
        assert!(said.contains("ok: 8 records"), "{said}");
        let hub = HubProcess::start(&files, &options).await;
        let ledger = settled_ledger(&hub.endpoint).await;
        assert_eq!(ledger.archived_before, 8, "{ledger:?}");
        let check = verify_ledger(&hub.endpoint).await;
        assert!(check.ok, "{check:?}");
        hub.kill().await;
    }

    /// `lienthong certs init` makes keys that exist nowhere else: once it has returned, a power
    /// cut keeps every file it wrote, whole, in the directories it created for them.
    #[test]
    fn development_certificates_survive_a_power_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().join("disk");
        let disk = PowerCutDisk::mount(&mount_point);
        let hub: lienthong::agency::AgencyCode = PROVINCE.parse().expect("code");
        let made = lienthong::tls::init_certificates(
            &mount_point.join("etc/certs"),
            &hub,
            &test_agencies(),
        )
        .expect("development certificates");
        let mut files = vec![made.ca.clone(), made.hub.cert_file, made.hub.key_file];
        files.push(made.ca.with_file_name("ca-key.pem"));
        for (_, certificate, key) in made.agencies {
            files.extend([certificate, key]);
        }
        let written: Vec<Vec<u8>> = files
            .iter()
            .map(|file| std::fs::read(file).expect("read before the cut"))
            .collect();

        let cut = disk.cut_power(Unsynced::Lost);
        assert_eq!((cut.lost, cut.names_lost), (0, 0), "not synced: {cut:?}");
        for (file, before) in files.iter().zip(&written) {
            let after = std::fs::read(file).unwrap_or_else(|error| {
                panic!("{} after the cut: {error} ({cut:?})", file.display())
            });
            assert!(after == *before, "{} changed in the cut", file.display());
            assert!(!after.is_empty(), "{} is empty", file.display());
        }
    }

    /// sled reuses a log segment once every page in it has a newer copy elsewhere. The newer
    /// copies must be durable before the segment is written again: a power cut that keeps the
    /// segment's new contents but loses the copies would take pages that were durable with it.
    /// A writer process rewrites every key in rounds, flushing after each but the last few,
    /// and is killed; the power fails, keeping part of what was not synced. sled must open
    /// what the disk kept with every key at a value of its last flushed round or later. The
    /// seed is printed; `LIENTHONG_POWER_CUT_SEED` replays one.
    #[test]
    fn a_reused_segment_keeps_what_was_durable_through_a_power_cut() {
        if let Some(path) = std::env::var_os(SLED_WRITER) {
            write_rounds_until_killed(std::path::Path::new(&path));
        }
        use std::io::BufRead;
        let seed = power_cut_seed();
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().join("disk");
        let disk = PowerCutDisk::mount(&mount_point);
        let mut writer = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "faults::a_reused_segment_keeps_what_was_durable_through_a_power_cut",
                "--exact",
                "--nocapture",
            ])
            .env(SLED_WRITER, &mount_point)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the writer");
        // Read on a thread of its own, so that a writer that hangs is killed, not waited for.
        let (said_line, said) = std::sync::mpsc::channel();
        let stdout = std::io::BufReader::new(writer.stdout.take().expect("the writer's stdout"));
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if said_line.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + WRITER_TIME_LIMIT;
        let (mut said_durable, mut longest_log, mut written) = (None, 0, false);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match said.recv_timeout(left) {
                Ok(line) => line,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = writer.kill();
                    panic!("the writer did not finish its rounds within {WRITER_TIME_LIMIT:?}");
                }
            };
            match line.strip_prefix(WRITER_SAYS) {
                Some("written") => {
                    written = true;
                    break;
                }
                Some(said) => {
                    let (round, log_bytes) = said.split_once(' ').expect("round and log length");
                    said_durable = round.parse::<usize>().ok();
                    longest_log = longest_log.max(log_bytes.parse::<u64>().expect("log length"));
                }
                None => {}
            }
        }
        writer.kill().expect("kill the writer");
        writer.wait().expect("the writer's end");
        let cut = disk.cut_power(Unsynced::PartlyKept { seed });
        println!(
            "the power failed with rounds flushed through {said_durable:?}, sled's log at most {longest_log} bytes when flushed, seed {seed}: {cut:?}"
        );
        assert!(written, "the writer stopped before its last round");
        let durable_round = ROUNDS - UNSYNCED_ROUNDS - 1;
        assert_eq!(said_durable, Some(durable_round));
        let flushed_bytes = ((durable_round + 1) * KEYS * VALUE_BYTES) as u64;
        assert!(
            longest_log < flushed_bytes / 2,
            "segments were reused: the log reached {longest_log} bytes for {flushed_bytes} of values flushed"
        );

        let db = sled::Config::new()
            .path(&mount_point)
            .segment_size(SEGMENT_BYTES)
            .open()
            .unwrap_or_else(|error| panic!("sled opens what the disk kept (seed {seed}): {error}"));
        for key in 0..KEYS {
            let value = db
                .get(key.to_be_bytes())
                .expect("read")
                .unwrap_or_else(|| panic!("key {key} is gone (seed {seed})"));
            let round = (durable_round..ROUNDS).find(|round| value == round_value(key, *round));
            assert!(
                round.is_some(),
                "key {key} holds {:?}, not a value of round {durable_round} or later (seed {seed})",
                String::from_utf8_lossy(&value[..value.len().min(16)])
            );
        }
    }

    /// Set to the writer's database path in the process that
    /// `a_reused_segment_keeps_what_was_durable_through_a_power_cut` starts.
    const SLED_WRITER: &str = "LIENTHONG_SLED_WRITER";
    /// What the writer's lines start with, among the test harness's.
    const WRITER_SAYS: &str = "sled writer: ";
    const KEYS: usize = 2_000;
    const VALUE_BYTES: usize = 500;
    const ROUNDS: usize = 20;
    /// The last rounds, not flushed.
    const UNSYNCED_ROUNDS: usize = 3;
    /// Small, so that the rounds fill and free many segments.
    const SEGMENT_BYTES: usize = 64 * 1024;
    /// The writer takes well under a second; one that hangs is killed after this.
    const WRITER_TIME_LIMIT: Duration = Duration::from_secs(60);

    fn round_value(key: usize, round: usize) -> Vec<u8> {
        let mut value = format!("{key:05}:{round:02}:").into_bytes();
        value.resize(VALUE_BYTES, b'a' + round as u8);
        value
    }

    /// The writer: each round sets every key, then flushes (the last [`UNSYNCED_ROUNDS`] do not)
    /// and says which round is durable and how long the log is; then waits to be killed.
    fn write_rounds_until_killed(path: &std::path::Path) -> ! {
        let db = sled::Config::new()
            .path(path)
            .segment_size(SEGMENT_BYTES)
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        // sled syncs neither its configuration nor the names it creates.
        fsync(&path.join("conf"));
        fsync(path);
        for round in 0..ROUNDS {
            for key in 0..KEYS {
                db.insert(key.to_be_bytes(), round_value(key, round))
                    .expect("insert");
            }
            if round < ROUNDS - UNSYNCED_ROUNDS {
                db.flush().expect("flush");
                let log_bytes = std::fs::metadata(path.join("db"))
                    .expect("sled's log")
                    .len();
                println!("{WRITER_SAYS}{round} {log_bytes}");
            }
        }
        println!("{WRITER_SAYS}written");
        loop {
            std::thread::park();
        }
    }

    /// The recipient's "received" (01) on `document_id`.
    fn received_status(document_id: &str) -> wire::StatusReport {
        wire::StatusReport {
            document_id: document_id.to_owned(),
            status_code: "01".into(),
            description: "đã nhận".into(),
            ..Default::default()
        }
    }

    /// An open `Receive` stream survives a RabbitMQ restart without the client reconnecting:
    /// tokens from before answer FAILED_PRECONDITION and their documents come again.
    #[tokio::test]
    async fn streams_resume_after_a_rabbitmq_restart() {
        let hub = TestHub::start("resume", HubOptions::new(TransportKind::Amqp)).await;
        let mut commune = hub.client(COMMUNE).await;
        let mut district = hub.client(DISTRICT).await;
        let mut stream = open_stream(&mut district).await;
        let before = send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], "before the restart"),
        )
        .await;
        let first = next_delivery(&mut stream).await;
        assert_eq!(delivered_document(&first).document_id, before);

        rabbitmqctl(&["stop_app"]);
        let during = send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], "while RabbitMQ is down"),
        )
        .await;
        let readyz = hub.options.http_listen.clone();
        eventually(
            "readiness falls while RabbitMQ is down",
            Duration::from_secs(20),
            || async { http_get(&readyz, "/readyz").await.0 == 503 },
        )
        .await;
        start_rabbitmq_app(&hub.files.prefix).await;
        eventually(
            "readiness returns with RabbitMQ",
            Duration::from_secs(30),
            || async { http_get(&readyz, "/readyz").await.0 == 200 },
        )
        .await;

        let mut seen = Vec::new();
        while seen.len() < 2 {
            let delivery = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("deliveries resume within 30 s")
                .expect("the same stream stays healthy")
                .expect("the same stream stays open");
            let id = delivered_document(&delivery).document_id.clone();
            if id == before {
                assert!(
                    delivery.redelivered,
                    "the unacknowledged document comes again, flagged"
                );
            }
            ack(&mut district, &delivery).await;
            seen.push(id);
        }
        seen.sort();
        let mut expected = vec![before.clone(), during];
        expected.sort();
        assert_eq!(seen, expected);

        let stale = district
            .ack(wire::AckRequest {
                ack_token: first.ack_token,
                reject: false,
                reason: String::new(),
                ..Default::default()
            })
            .await
            .expect_err("a token from before the restart");
        assert_eq!(stale.code(), Code::FailedPrecondition);
        assert!(
            stale.message().contains("redelivered"),
            "{}",
            stale.message()
        );
        hub.finish().await;
    }

    /// A RabbitMQ resource alarm, raised by a limit the node is already past: a memory high
    /// watermark of 0, or a disk free limit above the free space. RabbitMQ then blocks every
    /// connection that publishes. Dropped, it puts the limit back as it was, even after a panic.
    struct ResourceAlarm {
        /// The `rabbitmqctl` command that sets the limit.
        command: &'static str,
        raised: Vec<String>,
        restored: Vec<String>,
    }

    /// The disk free limit a disk alarm sets: 1 PB, above any disk's free space.
    const DISK_LIMIT_RAISED: u64 = 1 << 50;

    impl ResourceAlarm {
        /// Reads the watermark to put back. A run killed while its alarm was raised left 0:
        /// RabbitMQ's default is put back at once instead.
        fn memory() -> ResourceAlarm {
            let printed =
                rabbitmqctl_output(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
            // `0.4`, or `{absolute,1073741824}` when set in bytes.
            let restored = match printed.trim().trim_matches(['{', '}']).split_once(',') {
                Some(("absolute", bytes)) => vec!["absolute".to_owned(), bytes.trim().to_owned()],
                _ if printed.trim().parse::<f64>() == Ok(0.0) => {
                    rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
                    vec!["0.4".to_owned()]
                }
                _ => vec![printed.trim().to_owned()],
            };
            ResourceAlarm {
                command: "set_vm_memory_high_watermark",
                raised: vec!["0".to_owned()],
                restored,
            }
        }

        /// Reads the disk free limit to put back (in bytes). A run killed while its alarm was
        /// raised left the raised limit: RabbitMQ's default (50 MB) is put back at once instead.
        fn disk() -> ResourceAlarm {
            let printed =
                rabbitmqctl_output(&["eval", "rabbit_disk_monitor:get_disk_free_limit()."]);
            let limit = match printed.trim().parse::<u64>() {
                Ok(bytes) if bytes < DISK_LIMIT_RAISED => bytes,
                _ => {
                    rabbitmqctl(&["set_disk_free_limit", "50000000"]);
                    50_000_000
                }
            };
            ResourceAlarm {
                command: "set_disk_free_limit",
                raised: vec![DISK_LIMIT_RAISED.to_string()],
                restored: vec![limit.to_string()],
            }
        }

        fn raise(&self) {
            let mut args = vec![self.command];
            args.extend(self.raised.iter().map(String::as_str));
            rabbitmqctl(&args);
        }
    }

    impl Drop for ResourceAlarm {
        fn drop(&mut self) {
            let _ = std::process::Command::new("rabbitmqctl")
                .arg(self.command)
                .args(&self.restored)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }

    /// During a memory alarm RabbitMQ blocks the hub's publishing connection, and a blocked
    /// connection carries nothing, acks included. The hub consumes and inspects on a connection
    /// of its own, so the recipient drains its queue (which is what frees RabbitMQ's memory),
    /// new streams open and `ListQueues` answers while the alarm lasts; a document sent
    /// meanwhile waits in the hub's outbox and flows after it.
    #[tokio::test]
    async fn a_recipient_drains_its_queue_during_a_memory_alarm() {
        drain_during(ResourceAlarm::memory(), "memory-alarm").await;
    }

    /// A disk alarm blocks publishers as a memory alarm does: the same holds.
    #[tokio::test]
    async fn a_recipient_drains_its_queue_during_a_disk_alarm() {
        drain_during(ResourceAlarm::disk(), "disk-alarm").await;
    }

    async fn drain_during(alarm: ResourceAlarm, name: &str) {
        const BACKLOG: usize = 100;
        let hub = TestHub::start(name, HubOptions::new(TransportKind::Amqp)).await;
        let mut commune = hub.client(COMMUNE).await;
        let mut district = hub.client(DISTRICT).await;
        let mut backlog = HashSet::new();
        for n in 0..BACKLOG {
            let doc = document(COMMUNE, &[DISTRICT], &format!("before the alarm {n}"));
            backlog.insert(send(&mut commune, doc).await);
        }
        let district_queue =
            district_queue_holds(&hub.files.prefix, BACKLOG, Duration::from_secs(30)).await;
        let mut stream = open_stream(&mut district).await;

        alarm.raise();
        let during = send(
            &mut commune,
            document(COMMUNE, &[DISTRICT], "during the alarm"),
        )
        .await;
        eventually(
            "RabbitMQ blocks the connection the hub publishes on",
            Duration::from_secs(30),
            || async {
                rabbitmqctl_output(&["list_connections", "state"])
                    .lines()
                    .any(|state| state.trim() == "blocked")
            },
        )
        .await;
        // More than the prefetch: each delivery past it needs RabbitMQ to have read an ack.
        let mut drained = HashSet::new();
        while drained.len() < BACKLOG {
            let delivery = next_delivery(&mut stream).await;
            let id = delivered_document(&delivery).document_id.clone();
            assert!(
                backlog.contains(&id),
                "only the backlog flows during the alarm: {id}"
            );
            tokio::time::timeout(Duration::from_secs(10), ack(&mut district, &delivery))
                .await
                .expect("the Ack answers during the alarm");
            drained.insert(id);
        }
        eventually(
            "RabbitMQ has the acks: the queue holds nothing, unacknowledged or ready",
            Duration::from_secs(30),
            || async {
                rabbitmqctl_output(&["list_queues", "name", "messages"])
                    .lines()
                    .any(|line| line.split_whitespace().eq([district_queue.as_str(), "0"]))
            },
        )
        .await;
        let queues = tokio::time::timeout(Duration::from_secs(10), list_queues(&hub.endpoint))
            .await
            .expect("ListQueues answers during the alarm");
        assert_eq!(
            queues.transport_error, "",
            "RabbitMQ answers the hub's inspection"
        );
        assert_eq!(
            queues.outbox_depth, 1,
            "the document sent during the alarm waits"
        );
        let district_stats = queues
            .queues
            .iter()
            .find(|stats| stats.agency == DISTRICT)
            .expect("the district's queue");
        assert_eq!(district_stats.consumers, 1, "{district_stats:?}");
        let mut province = hub.client(PROVINCE).await;
        tokio::time::timeout(Duration::from_secs(10), open_stream(&mut province))
            .await
            .expect("a stream opens during the alarm");

        drop(alarm);
        let after = next_delivery(&mut stream).await;
        assert_eq!(delivered_document(&after).document_id, during);
        ack(&mut district, &after).await;
        hub.finish().await;
    }
}
