//! The hub's durable state in sled: accepted documents, the outbox, the receipt log, and which
//! deliveries were shown and settled.
//!
//! Architecture invariant: a write the hub reports to a caller is made durable first through
//! [`Store::durable`], which groups the flushes of concurrent requests into one.
//!
//! Inside transactions, writes whose old value is not needed use `set` and `unset` (the patched
//! sled's writes that do not read the tree first); `insert` and `remove` are kept where the old
//! value decides something (a document taken before, a delivery shown before).
//!
//! Trees and their keys:
//! - `documents`: document id → `StoredDocument` (what idempotency, `Track` and routing need);
//! - `document_bodies`: document id → the encoded wire document, while an outbox entry needs it;
//! - `outbox_refs`: document id → number of outbox entries still needing the body (u32 BE);
//! - `outbox`: `[255 - urgency][seq BE]` → `OutboxEntry`, so a scan yields most urgent, then oldest;
//! - `receipts`: seq BE → `Receipt`; `receipts_by_document`: `id 0x00 seq BE` → ();
//! - `delivered`, `settled`: `message id 0x00 recipient` → () for deliveries shown and acknowledged;
//! - `rejections`: `message id 0x00 recipient` → rejections so far (u32 BE);
//! - `dead_letters`: seq BE → `StoredDeadLetter`, kept until an operator replays them;
//! - `waiting`: `recipient 0x00 urgency accepted-at BE message id` → () for every message accepted
//!   and not yet acknowledged or dead-lettered, so that the oldest one per recipient and urgency
//!   is one prefix lookup (the age operators alert on);
//! - `references`: `original id 0x00 referencing id` → () for revoke, update and replace
//!   documents, so that `Track` on the original lists them;
//! - the ledger's trees (`ledger*`), described in [`ledger`];
//! - `arrivals` and `relay`, for what other hubs hand over and what goes back to them,
//!   described in [`federation`].

mod federation;
mod ledger;

pub use federation::arrival_key;

pub use ledger::{Archive, CheckpointPolicy, ReceiptFilter, Verification};

use crate::agency::AgencyCode;
use crate::document::Document;
use crate::receipt::ReceiptKind;
use lienthong_proto::v1 as wire;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use tokio::sync::{Notify, watch};

/// The page cache of a store opened without a setting (`[storage] cache_mib`'s default).
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// The size of sled's log segments, and of its write buffers, for a new database. sled writes
/// a log message larger than a quarter of a segment to a file of its own (a blob: a file
/// created, written and later deleted, never synced), so this keeps messages up to 2 MiB in
/// the log: document bodies and the leaves that hold several of them. sled's default, 512 KiB,
/// sent every leaf of more than eight 16 KiB bodies to a blob. A database keeps the size it
/// was created with ([`segment_bytes_for`]).
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// A storage failure. Never shown to callers in detail beyond its message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the hub's database in {data_dir}: {source}; the hub refuses to start rather than start empty (restore or move the directory)"
    )]
    Open {
        data_dir: PathBuf,
        source: sled::Error,
    },
    #[error(
        "cannot open the hub's database in {data_dir}: its disk is full; the hub starts once there is room"
    )]
    DiskFull { data_dir: PathBuf },
    #[error(
        "the hub's database in {data_dir} has lost records: its receipt log ends at #{found}, but #{durable} was on disk before; the hub refuses to start on a damaged database (restore it from a backup)"
    )]
    LostRecords {
        data_dir: PathBuf,
        durable: u64,
        found: u64,
    },
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    /// A flush of the database failed (a full or failing disk). sled keeps its first write
    /// error and fails every write after it, so the hub stops; a new start reopens the
    /// database from what reached the disk.
    #[error(
        "the hub's database cannot write to disk ({0}); the hub stops, to start again from what is on disk"
    )]
    Failed(String),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(String),
    /// A request that finds nothing to act on (mapped to FAILED_PRECONDITION).
    #[error("{0}")]
    Nothing(String),
}

/// What became of a document handed to [`Store::accept_document`].
#[derive(Debug)]
pub enum Acceptance {
    /// Newly accepted: one ACCEPTED receipt per recipient.
    Accepted(Vec<wire::Receipt>),
    /// The same document (same id, same content) was accepted before: its ACCEPTED receipts.
    AlreadyAccepted(Vec<wire::Receipt>),
    /// Another document with this id was accepted before.
    Conflict,
}

/// One message of the outbox, ready to publish.
#[derive(Debug)]
pub struct PendingPublish {
    key: sled::IVec,
    pub message_id: String,
    pub recipient: String,
    /// The encoded `QueuedMessage` to put on the recipient's queue.
    pub payload: Vec<u8>,
    /// W3C trace context of the span that accepted the message; empty when tracing is off.
    pub traceparent: String,
    /// The document the ENQUEUED receipt is about (none for status reports).
    document_id: Option<String>,
    /// Whether publishing releases one reference to the document's stored body.
    holds_body: bool,
    /// The sequence number of the ENQUEUED receipt (documents only), taken before publishing so
    /// that it orders before the DELIVERED receipt of a consumer that is faster than the
    /// publisher confirm; held until the confirm is recorded or the publish abandoned.
    enqueued_seq: ReservedSeqs,
}

impl PendingPublish {
    /// Its key in the outbox, which it keeps until its confirm is recorded.
    pub fn outbox_key(&self) -> &sled::IVec {
        &self.key
    }
}

/// How a message was settled for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement<'a> {
    /// The recipient acknowledged it (ACKNOWLEDGED).
    Acknowledged,
    /// The next hub on the way took durable custody (FORWARDED, naming that hub).
    Forwarded { to_hub: &'a str },
    /// It can never reach its recipient (REJECTED, with the reason).
    Undeliverable { reason: &'a str },
}

/// A message settled for a recipient: a document or a status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    pub message_id: String,
    pub recipient: AgencyCode,
    /// Set for documents: receipts are written for documents only.
    pub document_id: Option<String>,
    /// The message's key in the `waiting` index (see [`waiting_key_of`]).
    pub waiting_key: Vec<u8>,
}

/// A document's writes, made ready for the transaction that records a batch of documents.
#[derive(Debug)]
struct PreparedDocument {
    id: String,
    content_sha256: Vec<u8>,
    /// The encoded `StoredDocument`.
    stored: Vec<u8>,
    /// The encoded wire document, kept until every outbox entry is published.
    body: Vec<u8>,
    /// Its key in `references`, when it answers another document.
    reference: Option<Vec<u8>>,
    /// One outbox entry (key, value) per recipient, and the recipient's `waiting` key.
    outbox: Vec<([u8; 9], Vec<u8>)>,
    waiting: Vec<Vec<u8>>,
    /// One ACCEPTED receipt per recipient.
    accepted: Vec<wire::Receipt>,
    /// Their sequence numbers, open until the transaction has ended.
    _receipt_seqs: ReservedSeqs,
}

/// A document waiting for [`Store::record_acceptances`], and where its answer goes.
type QueuedDocument = (
    PreparedDocument,
    tokio::sync::oneshot::Sender<Result<Acceptance, StoreError>>,
);

/// Handle to the hub's database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    db: sled::Db,
    data_dir: PathBuf,
    hub_code: String,
    documents: sled::Tree,
    document_bodies: sled::Tree,
    outbox_refs: sled::Tree,
    outbox: sled::Tree,
    receipts: sled::Tree,
    receipts_by_document: sled::Tree,
    delivered: sled::Tree,
    settled: sled::Tree,
    rejections: sled::Tree,
    dead_letters: sled::Tree,
    waiting: sled::Tree,
    references: sled::Tree,
    arrivals: sled::Tree,
    relay: sled::Tree,
    /// Receipt sequence numbers handed out, and those whose transactions may still commit.
    receipt_seqs: Arc<ReceiptSeqs>,
    ledger: ledger::LedgerTrees,
    outbox_len: OutboxCount,
    /// Documents waiting to be recorded together ([`Store::accept_document`]).
    accept_queue: std::sync::Mutex<Vec<QueuedDocument>>,
    group_commit: Arc<GroupCommit>,
    flusher: tokio::task::AbortHandle,
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}

impl Store {
    /// Opens (or creates) the database in `data_dir`, with the default checkpoint policy. Must
    /// run inside a tokio runtime.
    pub fn open(data_dir: &Path, hub_code: &AgencyCode) -> Result<Store, StoreError> {
        Store::open_with(
            data_dir,
            hub_code,
            CheckpointPolicy::default(),
            DEFAULT_CACHE_BYTES,
        )
    }

    /// Opens (or creates) the database in `data_dir`, signing ledger checkpoints by `policy`,
    /// with a page cache of `cache_bytes` (`[storage] cache_mib`).
    pub fn open_with(
        data_dir: &Path,
        hub_code: &AgencyCode,
        policy: CheckpointPolicy,
        cache_bytes: u64,
    ) -> Result<Store, StoreError> {
        let open_error = |source| match source {
            sled::Error::Io(error) if error.kind() == std::io::ErrorKind::StorageFull => {
                StoreError::DiskFull {
                    data_dir: data_dir.to_owned(),
                }
            }
            source => StoreError::Open {
                data_dir: data_dir.to_owned(),
                source,
            },
        };
        // sled creates a missing data directory, without syncing the directory that holds it.
        create_directory_durably(data_dir).map_err(|error| open_error(sled::Error::Io(error)))?;
        let db = sled::Config::new()
            .path(data_dir)
            .cache_capacity(cache_bytes)
            .segment_size(segment_bytes_for(data_dir))
            .open()
            .map_err(open_error)?;
        // sled writes `conf` (the segment size among other things) when it creates a database
        // and never syncs it. A power cut soon after can leave it empty; sled then takes the
        // segment size it is given, which is the database's only while [`SEGMENT_BYTES`] is the
        // size it was created with. Synced at every open: two `fsync`s.
        std::fs::File::open(data_dir.join("conf"))
            .and_then(|conf| conf.sync_all())
            .and_then(|()| sync_directory(data_dir))
            .map_err(|error| open_error(sled::Error::Io(error)))?;
        let tree = |name: &str| db.open_tree(name).map_err(open_error);
        let outbox = tree("outbox")?;
        let receipts = tree("receipts")?;
        let watermark = Watermark::open(data_dir);
        let receipts_end = receipts_end(&receipts)?;
        let found = receipts_end.saturating_sub(1);
        if let Some(durable) = watermark.durable
            && found < durable
        {
            return Err(StoreError::LostRecords {
                data_dir: data_dir.to_owned(),
                durable,
                found,
            });
        }
        let outbox_len = OutboxCount::new(outbox.len() as u64);
        let group_commit = Arc::new(GroupCommit::new());
        let flusher = tokio::spawn(GroupCommit::run(
            group_commit.clone(),
            db.clone(),
            receipts.clone(),
            watermark,
        ))
        .abort_handle();
        let ledger = ledger::LedgerTrees::open(&db, data_dir, policy)?;
        let store = Store {
            inner: Arc::new(StoreInner {
                hub_code: hub_code.to_string(),
                documents: tree("documents")?,
                document_bodies: tree("document_bodies")?,
                outbox_refs: tree("outbox_refs")?,
                receipts,
                receipts_by_document: tree("receipts_by_document")?,
                delivered: tree("delivered")?,
                settled: tree("settled")?,
                rejections: tree("rejections")?,
                dead_letters: tree("dead_letters")?,
                waiting: tree("waiting")?,
                references: tree("references")?,
                arrivals: tree("arrivals")?,
                relay: tree("relay")?,
                receipt_seqs: Arc::new(ReceiptSeqs::new(receipts_end)),
                ledger,
                outbox,
                outbox_len,
                accept_queue: std::sync::Mutex::new(Vec::new()),
                group_commit,
                flusher,
                db,
                data_dir: data_dir.to_owned(),
            }),
        };
        tokio::spawn(ledger::run_appender(Arc::downgrade(&store.inner)));
        Ok(store)
    }

    /// The underlying database, for components that keep trees of their own (the embedded transport).
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Waits until every write made before this call is on disk. Concurrent callers share flushes.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.inner.group_commit.wait().await
    }

    /// Resolves, with the reason, once the database has failed to write: from then on no write
    /// becomes durable, and [`Store::durable`] answers [`StoreError::Failed`].
    pub async fn failure(&self) -> String {
        self.inner.group_commit.failure().await
    }

    /// The free space on the database's file system ([`free_space_on`] its directory).
    pub fn free_disk_bytes(&self) -> Option<u64> {
        free_space_on(&self.inner.data_dir)
    }

    /// The database's size on disk, in bytes (0 if it cannot be read).
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Messages waiting in the outbox.
    pub fn outbox_len(&self) -> u64 {
        self.inner.outbox_len.get()
    }

    /// Takes custody of a validated document: records it, queues one outbox entry per recipient
    /// and writes their ACCEPTED receipts, atomically. Not yet durable: see [`Store::durable`].
    ///
    /// Documents accepted concurrently are recorded together, in one transaction: the first
    /// of them spawns a task that, after a yield, takes every one queued by then (each sled
    /// transaction costs a log write).
    pub async fn accept_document(
        &self,
        document: &Document,
        traceparent: &str,
        now_unix_ms: i64,
    ) -> Result<Acceptance, StoreError> {
        let prepared = self.prepare_document(document, traceparent, now_unix_ms)?;
        let (answer_to, answer) = tokio::sync::oneshot::channel();
        let leads = {
            let mut queue = self
                .inner
                .accept_queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.push((prepared, answer_to));
            queue.len() == 1
        };
        if leads {
            let store = self.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                store.record_acceptances();
            });
        }
        answer
            .await
            .map_err(|_| StoreError::Corrupt("the task recording documents stopped".into()))?
    }

    /// Everything [`Store::accept_document`] writes for one document, made ready outside the
    /// transaction.
    fn prepare_document(
        &self,
        document: &Document,
        traceparent: &str,
        now_unix_ms: i64,
    ) -> Result<PreparedDocument, StoreError> {
        let receipt_seqs = self.reserve_receipt_seqs(document.to.len())?;
        let mut outbox = Vec::with_capacity(document.to.len());
        let mut waiting = Vec::with_capacity(document.to.len());
        let mut accepted = Vec::with_capacity(document.to.len());
        for (recipient, seq) in document.to.iter().zip(receipt_seqs.iter()) {
            outbox.push((
                outbox_key(document.urgency.value(), self.inner.db.generate_id()?),
                document_entry(document, recipient, traceparent, now_unix_ms),
            ));
            waiting.push(waiting_key(
                recipient.as_str(),
                document.urgency.value(),
                now_unix_ms,
                &document.id,
            ));
            accepted.push(self.new_receipt(
                *seq,
                &document.id,
                recipient.as_str(),
                ReceiptKind::Accepted,
                now_unix_ms,
                ReceiptDetail::default(),
            ));
        }
        let reference = Some(&document.wire.references_document_id)
            .filter(|referenced| !referenced.is_empty())
            .map(|referenced| {
                let mut key = referenced.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(document.id.as_bytes());
                key
            });
        Ok(PreparedDocument {
            id: document.id.clone(),
            content_sha256: document.content_sha256.to_vec(),
            stored: stored_document(document, now_unix_ms).encode_to_vec(),
            body: document.wire.encode_to_vec(),
            reference,
            outbox,
            waiting,
            accepted,
            _receipt_seqs: receipt_seqs,
        })
    }

    /// Records the documents queued by [`Store::accept_document`] in one transaction and
    /// answers each.
    fn record_acceptances(&self) {
        let inner = &*self.inner;
        let (prepared, answers): (Vec<_>, Vec<_>) = std::mem::take(
            &mut *inner
                .accept_queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
        .into_iter()
        .unzip();
        let result = (
            &inner.documents,
            &inner.document_bodies,
            &inner.outbox_refs,
            &inner.outbox,
            &inner.receipts,
            &inner.receipts_by_document,
            &inner.waiting,
            &inner.references,
        )
            .transaction(
                |(documents, bodies, refs, outbox, receipts, by_document, waiting, references)| {
                    let mut found = Vec::with_capacity(prepared.len());
                    for document in &prepared {
                        let id = document.id.as_bytes();
                        if let Some(existing) = documents.get(id)? {
                            found.push(Some(existing));
                            continue;
                        }
                        found.push(None);
                        documents.set(id, document.stored.as_slice());
                        if let Some(reference) = &document.reference {
                            references.set(reference.as_slice(), &[]);
                        }
                        bodies.set(id, document.body.as_slice());
                        refs.set(id, &(document.outbox.len() as u32).to_be_bytes());
                        for ((key, entry), waiting_key) in
                            document.outbox.iter().zip(&document.waiting)
                        {
                            outbox.set(key, entry.as_slice());
                            waiting.set(waiting_key.as_slice(), &[]);
                        }
                        for receipt in &document.accepted {
                            insert_receipt(receipts, by_document, receipt);
                        }
                    }
                    Ok(found)
                },
            );
        match unwrap_transaction(result) {
            Ok(found) => {
                for ((document, answer), existing) in prepared.into_iter().zip(answers).zip(found) {
                    let _ = answer.send(self.acceptance_of(document, existing));
                }
            }
            Err(error) => {
                for answer in answers {
                    let _ = answer.send(Err(error.clone()));
                }
            }
        }
    }

    /// What became of a recorded document, given what its id named before.
    fn acceptance_of(
        &self,
        document: PreparedDocument,
        existing: Option<sled::IVec>,
    ) -> Result<Acceptance, StoreError> {
        let Some(existing) = existing else {
            self.inner.outbox_len.raise(document.outbox.len() as u64);
            return Ok(Acceptance::Accepted(document.accepted));
        };
        let existing = wire::StoredDocument::decode(&*existing).map_err(corrupt("documents"))?;
        if existing.content_sha256 != document.content_sha256 {
            return Ok(Acceptance::Conflict);
        }
        let accepted = self
            .receipts_of(&document.id)?
            .into_iter()
            .filter(|r| r.kind() == ReceiptKind::Accepted)
            .collect();
        Ok(Acceptance::AlreadyAccepted(accepted))
    }

    /// Queues a status report for each of `recipients` and writes a STATUS_REPORTED receipt for
    /// each recipient of the document it concerns (`about`).
    ///
    /// `arrival` ([`arrival_key`]) is set for a report another hub handed over: a report taken
    /// before under the same key changes nothing and returns no receipts.
    pub fn accept_status_report(
        &self,
        report: &wire::StatusReport,
        about: &[AgencyCode],
        recipients: &[AgencyCode],
        arrival: Option<&[u8]>,
        now_unix_ms: i64,
    ) -> Result<Vec<wire::Receipt>, StoreError> {
        let inner = &*self.inner;
        let report_seq = inner.db.generate_id()?;
        let message_id = format!("status/{report_seq}");
        let mut entries = Vec::with_capacity(recipients.len());
        let mut waiting_keys = Vec::with_capacity(recipients.len());
        for recipient in recipients {
            waiting_keys.push(waiting_key(
                recipient.as_str(),
                crate::document::Urgency::HIGHEST.value(),
                now_unix_ms,
                &message_id,
            ));
            entries.push(self.urgent_entry(
                &message_id,
                recipient.as_str(),
                wire::outbox_entry::Payload::Status(report.clone()),
                now_unix_ms,
            )?);
        }
        let receipt_seqs = self.reserve_receipt_seqs(about.len())?;
        let mut receipts = Vec::with_capacity(about.len());
        for (agency, seq) in about.iter().zip(receipt_seqs.iter()) {
            receipts.push(self.new_receipt(
                *seq,
                &report.document_id,
                agency.as_str(),
                ReceiptKind::StatusReported,
                now_unix_ms,
                ReceiptDetail {
                    status_code: &report.status_code,
                    detail: &report.description,
                    reported_by: &report.from,
                },
            ));
        }
        let result = (
            &inner.outbox,
            &inner.receipts,
            &inner.receipts_by_document,
            &inner.waiting,
            &inner.arrivals,
        )
            .transaction(|(outbox, receipts_tree, by_document, waiting, arrivals)| {
                if let Some(arrival) = arrival
                    && arrivals.insert(arrival, &[])?.is_some()
                {
                    return Ok(false);
                }
                for (key, entry) in &entries {
                    outbox.set(key, entry.as_slice());
                }
                for key in &waiting_keys {
                    waiting.set(key.as_slice(), &[]);
                }
                for receipt in &receipts {
                    insert_receipt(receipts_tree, by_document, receipt);
                }
                Ok(true)
            });
        if !unwrap_transaction(result)? {
            return Ok(Vec::new());
        }
        inner.outbox_len.raise(recipients.len() as u64);
        Ok(receipts)
    }

    /// An outbox entry (key and encoded value) for a message that goes before every document:
    /// a status report or a relayed receipt.
    fn urgent_entry(
        &self,
        message_id: &str,
        recipient: &str,
        payload: wire::outbox_entry::Payload,
        now_unix_ms: i64,
    ) -> Result<([u8; 9], Vec<u8>), StoreError> {
        let entry = wire::OutboxEntry {
            message_id: message_id.to_owned(),
            recipient: recipient.to_owned(),
            payload: Some(payload),
            accepted_at_unix_ms: now_unix_ms,
            receipt_document_id: String::new(),
            traceparent: String::new(),
        };
        let key = outbox_key(
            crate::document::Urgency::HIGHEST.value(),
            self.inner.db.generate_id()?,
        );
        Ok((key, entry.encode_to_vec()))
    }

    /// Up to `limit` outbox messages, most urgent first, then oldest first, leaving out those
    /// whose key `skip` names (messages already on their way to the transport).
    pub fn outbox_batch(
        &self,
        limit: usize,
        skip: impl Fn(&sled::IVec) -> bool,
    ) -> Result<Vec<PendingPublish>, StoreError> {
        let inner = &*self.inner;
        let mut batch = Vec::new();
        for item in inner.outbox.iter() {
            if batch.len() == limit {
                break;
            }
            let (key, value) = item?;
            if skip(&key) {
                continue;
            }
            let entry = wire::OutboxEntry::decode(&*value).map_err(corrupt("outbox"))?;
            let header = wire::QueuedMessage {
                message_id: entry.message_id.clone(),
                recipient: entry.recipient.clone(),
                payload: None,
                accepted_at_unix_ms: entry.accepted_at_unix_ms,
                traceparent: String::new(),
            };
            let holds_body = matches!(
                entry.payload,
                Some(wire::outbox_entry::Payload::DocumentId(_))
            );
            let (payload, document_id) = match entry.payload {
                Some(wire::outbox_entry::Payload::DocumentId(document_id)) => {
                    let body = inner
                        .document_bodies
                        .get(document_id.as_bytes())?
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "outbox names document {document_id} whose body is missing"
                            ))
                        })?;
                    (encode_queued_document(header, &body), Some(document_id))
                }
                Some(wire::outbox_entry::Payload::QueuedMessage(queued)) => {
                    let document =
                        Some(entry.receipt_document_id.clone()).filter(|id| !id.is_empty());
                    (queued, document)
                }
                Some(wire::outbox_entry::Payload::Status(status)) => {
                    let message = wire::QueuedMessage {
                        payload: Some(wire::queued_message::Payload::Status(status)),
                        ..header
                    };
                    (message.encode_to_vec(), None)
                }
                Some(wire::outbox_entry::Payload::Receipt(receipt)) => {
                    let message = wire::QueuedMessage {
                        payload: Some(wire::queued_message::Payload::Receipt(receipt)),
                        ..header
                    };
                    (message.encode_to_vec(), None)
                }
                None => return Err(StoreError::Corrupt("an outbox entry has no payload".into())),
            };
            let enqueued_seq = self.reserve_receipt_seqs(usize::from(document_id.is_some()))?;
            batch.push(PendingPublish {
                key,
                message_id: entry.message_id,
                recipient: entry.recipient,
                payload,
                traceparent: entry.traceparent,
                document_id,
                holds_body,
                enqueued_seq,
            });
        }
        Ok(batch)
    }

    /// Removes published messages from the outbox and, for documents, writes their ENQUEUED
    /// receipts, in one transaction. Called only after the transport confirmed each message.
    /// One transaction for a whole batch of confirms: each sled transaction costs a log write.
    pub fn mark_enqueued(
        &self,
        published: &[&PendingPublish],
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        if published.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        let receipts: Vec<Option<wire::Receipt>> = published
            .iter()
            .map(|message| {
                message.document_id.as_ref().map(|document_id| {
                    self.new_receipt(
                        message.enqueued_seq[0],
                        document_id,
                        &message.recipient,
                        ReceiptKind::Enqueued,
                        now_unix_ms,
                        ReceiptDetail::default(),
                    )
                })
            })
            .collect();
        let result = (
            &inner.outbox,
            &inner.outbox_refs,
            &inner.document_bodies,
            &inner.receipts,
            &inner.receipts_by_document,
        )
            .transaction(|(outbox, refs, bodies, receipts_tree, by_document)| {
                let mut removed = 0;
                for (message, receipt) in published.iter().zip(&receipts) {
                    if outbox.remove(&message.key)?.is_none() {
                        continue;
                    }
                    removed += 1;
                    if let Some(document_id) =
                        message.document_id.as_ref().filter(|_| message.holds_body)
                    {
                        let remaining = refs
                            .get(document_id.as_bytes())?
                            .and_then(|v| <[u8; 4]>::try_from(&*v).ok())
                            .map_or(0, u32::from_be_bytes)
                            .saturating_sub(1);
                        if remaining == 0 {
                            refs.unset(document_id.as_bytes());
                            bodies.unset(document_id.as_bytes());
                        } else {
                            refs.set(document_id.as_bytes(), &remaining.to_be_bytes());
                        }
                    }
                    if let Some(receipt) = receipt {
                        insert_receipt(receipts_tree, by_document, receipt);
                    }
                }
                Ok(removed)
            });
        let removed = unwrap_transaction(result)?;
        inner.outbox_len.lower(removed);
        Ok(())
    }

    /// Records that messages were shown to `holder`: to their recipient, or, for a message
    /// whose recipient is another agency, to the next hub on its way (no DELIVERED receipt:
    /// the recipient has not seen it). Returns, for each message, whether it had been shown
    /// before, which makes the delivery a redelivery even when the transport does not know it.
    /// One transaction for a whole batch of deliveries.
    pub fn mark_delivered(
        &self,
        holder: &AgencyCode,
        messages: &[&MessageRef],
        now_unix_ms: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let inner = &*self.inner;
        // The document a DELIVERED receipt is about: none for a hand-over or a status report.
        fn receipt_about<'m>(message: &'m MessageRef, holder: &AgencyCode) -> Option<&'m String> {
            message
                .document_id
                .as_ref()
                .filter(|_| message.recipient == *holder)
        }
        let receipt_count = messages
            .iter()
            .filter_map(|m| receipt_about(m, holder))
            .count();
        let receipt_seqs = self.reserve_receipt_seqs(receipt_count)?;
        let mut seqs = receipt_seqs.iter();
        let receipts: Vec<Option<wire::Receipt>> = messages
            .iter()
            .map(|message| {
                let document_id = receipt_about(message, holder)?;
                Some(self.new_receipt(
                    *seqs.next().expect("one sequence number per receipt"),
                    document_id,
                    message.recipient.as_str(),
                    ReceiptKind::Delivered,
                    now_unix_ms,
                    ReceiptDetail::default(),
                ))
            })
            .collect();
        let result = (
            &inner.delivered,
            &inner.receipts,
            &inner.receipts_by_document,
        )
            .transaction(|(delivered, receipts_tree, by_document)| {
                let mut shown_before = Vec::with_capacity(messages.len());
                for (message, receipt) in messages.iter().zip(&receipts) {
                    let pair = pair_key(&message.message_id, message.recipient.as_str());
                    shown_before.push(delivered.insert(pair, &[])?.is_some());
                    if let Some(receipt) = receipt {
                        insert_receipt(receipts_tree, by_document, receipt);
                    }
                }
                Ok(shown_before)
            });
        unwrap_transaction(result)
    }

    /// Records that messages are settled for good ([`Settlement`]); they will never be shown
    /// again. One transaction for all of them: each sled transaction costs a log write.
    pub fn mark_settled(
        &self,
        settled: &[(&MessageRef, Settlement<'_>)],
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        // The settled mark and its receipt go to disk together: a mark without its receipt
        // would drop every redelivery while `Track` still showed the document pending.
        if settled.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        let receipt_count = settled
            .iter()
            .filter(|(message, _)| message.document_id.is_some())
            .count();
        let receipt_seqs = self.reserve_receipt_seqs(receipt_count)?;
        let mut seqs = receipt_seqs.iter();
        let receipts: Vec<Option<wire::Receipt>> = settled
            .iter()
            .map(|(message, settlement)| {
                let document_id = message.document_id.as_ref()?;
                let (kind, detail) = match settlement {
                    Settlement::Acknowledged => (ReceiptKind::Acknowledged, ""),
                    Settlement::Forwarded { to_hub } => (ReceiptKind::Forwarded, *to_hub),
                    Settlement::Undeliverable { reason } => (ReceiptKind::Rejected, *reason),
                };
                Some(self.new_receipt(
                    *seqs.next().expect("one sequence number per receipt"),
                    document_id,
                    message.recipient.as_str(),
                    kind,
                    now_unix_ms,
                    ReceiptDetail {
                        detail,
                        ..ReceiptDetail::default()
                    },
                ))
            })
            .collect();
        let result = (
            &inner.settled,
            &inner.receipts,
            &inner.receipts_by_document,
            &inner.waiting,
        )
            .transaction(|(settled_tree, receipts_tree, by_document, waiting)| {
                for ((message, _), receipt) in settled.iter().zip(&receipts) {
                    let pair = pair_key(&message.message_id, message.recipient.as_str());
                    settled_tree.set(pair, &[]);
                    waiting.unset(message.waiting_key.as_slice());
                    if let Some(receipt) = receipt {
                        insert_receipt(receipts_tree, by_document, receipt);
                    }
                }
                Ok(())
            });
        unwrap_transaction(result)
    }

    /// Counts one more rejection of a message by its recipient; returns the count so far.
    pub fn count_rejection(&self, message: &MessageRef) -> Result<u32, StoreError> {
        let updated = self.inner.rejections.update_and_fetch(
            pair_key(&message.message_id, message.recipient.as_str()),
            |old| {
                let count = old
                    .and_then(|v| <[u8; 4]>::try_from(v).ok())
                    .map_or(0, u32::from_be_bytes);
                Some(count.saturating_add(1).to_be_bytes().to_vec())
            },
        )?;
        Ok(updated
            .and_then(|v| <[u8; 4]>::try_from(&*v).ok())
            .map_or(1, u32::from_be_bytes))
    }

    /// Records that the recipient rejected a delivery, with its reason.
    pub fn mark_rejected(
        &self,
        message: &MessageRef,
        reason: &str,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        self.append_refusal(message, ReceiptKind::Rejected, reason, now_unix_ms)
    }

    /// Records that a message went to the dead letters, with the reason.
    pub fn mark_dead_lettered(
        &self,
        message: &MessageRef,
        reason: &str,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner.waiting.remove(message.waiting_key.as_slice())?;
        self.append_refusal(message, ReceiptKind::DeadLettered, reason, now_unix_ms)
    }

    fn append_refusal(
        &self,
        message: &MessageRef,
        kind: ReceiptKind,
        reason: &str,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        self.append_document_receipt(
            message,
            kind,
            now_unix_ms,
            ReceiptDetail {
                detail: reason,
                ..ReceiptDetail::default()
            },
        )
    }

    /// Writes a receipt about `message` for its recipient, if the message is a document
    /// (status reports get no per-delivery receipts).
    fn append_document_receipt(
        &self,
        message: &MessageRef,
        kind: ReceiptKind,
        now_unix_ms: i64,
        detail: ReceiptDetail<'_>,
    ) -> Result<(), StoreError> {
        if let Some(document_id) = &message.document_id {
            self.append_receipt(
                document_id,
                message.recipient.as_str(),
                kind,
                now_unix_ms,
                detail,
            )?;
        }
        Ok(())
    }

    /// Keeps a message the transport dead-lettered. Writes a DEAD_LETTERED receipt unless the
    /// hub already wrote one for this delivery (when it dead-lettered the message itself).
    pub fn keep_dead_letter(
        &self,
        message_id: &str,
        recipient: &str,
        document_id: Option<&str>,
        transport_reason: &str,
        queued_message: &[u8],
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let inner = &*self.inner;
        if let Ok(message) = wire::QueuedMessage::decode(queued_message) {
            inner.waiting.remove(waiting_key_of(&message))?;
        }
        let mut reason = transport_reason.to_owned();
        if let Some(document_id) = document_id {
            let last = self
                .receipts_of(document_id)?
                .into_iter()
                .rfind(|r| r.agency == recipient);
            match last {
                Some(receipt) if receipt.kind() == ReceiptKind::DeadLettered => {
                    reason = receipt.detail
                }
                _ => {
                    self.append_receipt(
                        document_id,
                        recipient,
                        ReceiptKind::DeadLettered,
                        now_unix_ms,
                        ReceiptDetail {
                            detail: transport_reason,
                            ..ReceiptDetail::default()
                        },
                    )?;
                }
            }
        }
        let kept = wire::StoredDeadLetter {
            message_id: message_id.to_owned(),
            recipient: recipient.to_owned(),
            document_id: document_id.unwrap_or_default().to_owned(),
            reason,
            dead_lettered_at_unix_ms: now_unix_ms,
            queued_message: queued_message.to_vec(),
        };
        inner
            .dead_letters
            .insert(inner.db.generate_id()?.to_be_bytes(), kept.encode_to_vec())?;
        Ok(())
    }

    /// Dead letters kept, oldest first, with their ids; only `recipient`'s when given.
    pub fn dead_letters(
        &self,
        recipient: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(u64, wire::StoredDeadLetter)>, StoreError> {
        let mut kept = Vec::new();
        for item in self.inner.dead_letters.iter() {
            if kept.len() >= limit {
                break;
            }
            let (id, dead_letter) = decode_dead_letter(item?)?;
            if recipient.is_none_or(|r| r == dead_letter.recipient) {
                kept.push((id, dead_letter));
            }
        }
        Ok(kept)
    }

    /// The newest `limit` dead letters, newest first, with their ids.
    pub fn newest_dead_letters(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, wire::StoredDeadLetter)>, StoreError> {
        self.inner
            .dead_letters
            .iter()
            .rev()
            .take(limit)
            .map(|item| decode_dead_letter(item?))
            .collect()
    }

    /// How many dead letters the hub keeps.
    pub fn dead_letter_count(&self) -> u64 {
        self.inner.dead_letters.len() as u64
    }

    /// The newest `limit` receipts, newest first.
    pub fn newest_receipts(&self, limit: usize) -> Result<Vec<wire::Receipt>, StoreError> {
        self.inner
            .receipts
            .iter()
            .rev()
            .take(limit)
            .map(|item| {
                let (_, value) = item?;
                wire::Receipt::decode(&*value).map_err(corrupt("receipts"))
            })
            .collect()
    }

    /// Sends dead letters back to their recipients' queues through the outbox, each with a
    /// REPLAYED receipt (for documents) naming `operator`; their rejection counts start again.
    /// Returns how many were replayed and the receipts.
    pub fn replay_dead_letters(
        &self,
        ids: &[u64],
        operator: &str,
        now_unix_ms: i64,
    ) -> Result<(u64, Vec<wire::Receipt>), StoreError> {
        let inner = &*self.inner;
        let mut receipts = Vec::new();
        let mut replayed = 0;
        for id in ids {
            let key = id.to_be_bytes();
            let Some(value) = inner.dead_letters.get(key)? else {
                continue;
            };
            let dead_letter =
                wire::StoredDeadLetter::decode(&*value).map_err(corrupt("dead_letters"))?;
            let entry = wire::OutboxEntry {
                message_id: dead_letter.message_id.clone(),
                recipient: dead_letter.recipient.clone(),
                payload: Some(wire::outbox_entry::Payload::QueuedMessage(
                    dead_letter.queued_message.clone(),
                )),
                accepted_at_unix_ms: now_unix_ms,
                receipt_document_id: dead_letter.document_id.clone(),
                traceparent: String::new(),
            };
            let outbox_key = outbox_key(
                crate::document::Urgency::NORMAL.value(),
                inner.db.generate_id()?,
            );
            let receipt = (!dead_letter.document_id.is_empty()).then(|| {
                self.new_receipt(
                    0,
                    &dead_letter.document_id,
                    &dead_letter.recipient,
                    ReceiptKind::Replayed,
                    now_unix_ms,
                    ReceiptDetail {
                        detail: &format!("replayed by {operator}"),
                        ..ReceiptDetail::default()
                    },
                )
            });
            let receipt_seqs = self.reserve_receipt_seqs(usize::from(receipt.is_some()))?;
            let receipt = receipt.map(|receipt| wire::Receipt {
                seq: receipt_seqs[0],
                ..receipt
            });
            let pair = pair_key(&dead_letter.message_id, &dead_letter.recipient);
            let waiting = wire::QueuedMessage::decode(dead_letter.queued_message.as_slice())
                .map(|message| waiting_key_of(&message))
                .ok();
            let result = (
                &inner.dead_letters,
                &inner.outbox,
                &inner.rejections,
                &inner.receipts,
                &inner.receipts_by_document,
                &inner.waiting,
            )
                .transaction(
                    |(
                        dead_letters,
                        outbox,
                        rejections,
                        receipts_tree,
                        by_document,
                        waiting_tree,
                    )| {
                        if dead_letters.remove(&key)?.is_none() {
                            return Ok(false);
                        }
                        outbox.set(&outbox_key, entry.encode_to_vec());
                        if let Some(waiting) = &waiting {
                            waiting_tree.set(waiting.as_slice(), &[]);
                        }
                        rejections.unset(pair.as_slice());
                        if let Some(receipt) = &receipt {
                            insert_receipt(receipts_tree, by_document, receipt);
                        }
                        Ok(true)
                    },
                );
            if unwrap_transaction(result)? {
                replayed += 1;
                receipts.extend(receipt);
            }
        }
        inner.outbox_len.raise(replayed);
        Ok((replayed, receipts))
    }

    /// When the oldest message waiting for `recipient` was accepted, per urgency (index 0
    /// normal .. 4): waiting means accepted and not yet acknowledged nor dead-lettered.
    pub fn oldest_waiting(
        &self,
        recipient: &str,
    ) -> Result<[Option<i64>; URGENCY_LEVELS], StoreError> {
        let mut oldest = [None; URGENCY_LEVELS];
        for (urgency, slot) in oldest.iter_mut().enumerate() {
            let mut prefix = recipient.as_bytes().to_vec();
            prefix.push(0);
            prefix.push(urgency as u8);
            if let Some(item) = self.inner.waiting.scan_prefix(&prefix).next() {
                let (key, _) = item?;
                let at = key
                    .get(prefix.len()..prefix.len() + 8)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .ok_or_else(|| StoreError::Corrupt("tree waiting: short key".into()))?;
                *slot = Some(u64::from_be_bytes(at) as i64);
            }
        }
        Ok(oldest)
    }

    /// Whether the recipient already acknowledged this message.
    pub fn is_acknowledged(&self, message_id: &str, recipient: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .settled
            .contains_key(pair_key(message_id, recipient))?)
    }

    /// What the hub remembers of a document, if it accepted it.
    pub fn document(&self, document_id: &str) -> Result<Option<wire::StoredDocument>, StoreError> {
        self.inner
            .documents
            .get(document_id.as_bytes())?
            .map(|v| wire::StoredDocument::decode(&*v).map_err(corrupt("documents")))
            .transpose()
    }

    /// The documents that reference `document_id` (revoke, update, replace), oldest first.
    pub fn referencing_documents(
        &self,
        document_id: &str,
    ) -> Result<Vec<wire::StoredDocument>, StoreError> {
        let mut prefix = document_id.as_bytes().to_vec();
        prefix.push(0);
        let mut found = Vec::new();
        for item in self.inner.references.scan_prefix(&prefix) {
            let (key, _) = item?;
            let referencing = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(document) = self.document(&referencing)? {
                found.push(document);
            }
        }
        found.sort_by_key(|d| d.accepted_at_unix_ms);
        Ok(found)
    }

    /// Every receipt of a document, in sequence order.
    pub fn receipts_of(&self, document_id: &str) -> Result<Vec<wire::Receipt>, StoreError> {
        let inner = &*self.inner;
        let mut prefix = document_id.as_bytes().to_vec();
        prefix.push(0);
        let mut receipts = Vec::new();
        for item in inner.receipts_by_document.scan_prefix(&prefix) {
            let (key, _) = item?;
            let seq = &key[prefix.len()..];
            let record = inner.receipts.get(seq)?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "receipt index of {document_id} names a missing receipt"
                ))
            })?;
            receipts.push(wire::Receipt::decode(&*record).map_err(corrupt("receipts"))?);
        }
        Ok(receipts)
    }

    /// Writes one receipt outside any other transaction.
    fn append_receipt(
        &self,
        document_id: &str,
        agency: &str,
        kind: ReceiptKind,
        now_unix_ms: i64,
        detail: ReceiptDetail<'_>,
    ) -> Result<wire::Receipt, StoreError> {
        let inner = &*self.inner;
        let receipt_seqs = self.reserve_receipt_seqs(1)?;
        let receipt = self.new_receipt(
            receipt_seqs[0],
            document_id,
            agency,
            kind,
            now_unix_ms,
            detail,
        );
        let result = (&inner.receipts, &inner.receipts_by_document).transaction(
            |(receipts, by_document)| {
                insert_receipt(receipts, by_document, &receipt);
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            },
        );
        unwrap_transaction(result)?;
        Ok(receipt)
    }

    /// Takes `count` receipt sequence numbers for one transaction; keep the result until the
    /// transaction has ended.
    fn reserve_receipt_seqs(&self, count: usize) -> Result<ReservedSeqs, StoreError> {
        let registry = self.inner.receipt_seqs.clone();
        let mut state = registry.lock();
        let mut seqs = Vec::with_capacity(count);
        for _ in 0..count {
            seqs.push(self.inner.db.generate_id()?);
        }
        if let Some(last) = seqs.last() {
            state.issued_end = state.issued_end.max(last + 1);
        }
        state.open.extend(&seqs);
        drop(state);
        Ok(ReservedSeqs { seqs, registry })
    }

    fn new_receipt(
        &self,
        seq: u64,
        document_id: &str,
        agency: &str,
        kind: ReceiptKind,
        now_unix_ms: i64,
        detail: ReceiptDetail<'_>,
    ) -> wire::Receipt {
        wire::Receipt {
            seq,
            document_id: document_id.to_owned(),
            agency: agency.to_owned(),
            kind: kind as i32,
            at_unix_ms: now_unix_ms,
            hub: self.inner.hub_code.clone(),
            status_code: detail.status_code.to_owned(),
            detail: detail.detail.to_owned(),
            reported_by: detail.reported_by.to_owned(),
        }
    }
}

/// What the store remembers of a document it takes custody of.
fn stored_document(document: &Document, now_unix_ms: i64) -> wire::StoredDocument {
    wire::StoredDocument {
        document_id: document.id.clone(),
        from: document.from.to_string(),
        to: document.to.iter().map(ToString::to_string).collect(),
        content_sha256: document.content_sha256.to_vec(),
        accepted_at_unix_ms: now_unix_ms,
        priority: u32::from(document.urgency.value()),
        business_type: document.wire.business_type,
        references_document_id: document.wire.references_document_id.clone(),
    }
}

/// The encoded outbox entry of a document for one recipient (its body is stored once, apart).
fn document_entry(
    document: &Document,
    recipient: &AgencyCode,
    traceparent: &str,
    now_unix_ms: i64,
) -> Vec<u8> {
    wire::OutboxEntry {
        message_id: document.id.clone(),
        recipient: recipient.to_string(),
        payload: Some(wire::outbox_entry::Payload::DocumentId(document.id.clone())),
        accepted_at_unix_ms: now_unix_ms,
        receipt_document_id: String::new(),
        traceparent: traceparent.to_owned(),
    }
    .encode_to_vec()
}

/// Inserts a receipt and its index entry inside a transaction.
fn insert_receipt(
    receipts: &TransactionalTree,
    by_document: &TransactionalTree,
    receipt: &wire::Receipt,
) {
    let mut index_key = receipt.document_id.as_bytes().to_vec();
    index_key.push(0);
    index_key.extend_from_slice(&receipt.seq.to_be_bytes());
    receipts.set(&receipt.seq.to_be_bytes(), receipt.encode_to_vec());
    by_document.set(index_key, &[]);
}

#[derive(Default, Clone, Copy)]
struct ReceiptDetail<'a> {
    status_code: &'a str,
    detail: &'a str,
    reported_by: &'a str,
}

fn outbox_key(urgency: u8, seq: u64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = 255 - urgency;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Urgencies a message can have (0 normal .. 4 timed express).
pub const URGENCY_LEVELS: usize = crate::document::Urgency::HIGHEST.value() as usize + 1;

fn waiting_key(
    recipient: &str,
    urgency: u8,
    accepted_at_unix_ms: i64,
    message_id: &str,
) -> Vec<u8> {
    let mut key = Vec::with_capacity(recipient.len() + 10 + message_id.len());
    key.extend_from_slice(recipient.as_bytes());
    key.push(0);
    key.push(urgency);
    key.extend_from_slice(&(accepted_at_unix_ms.max(0) as u64).to_be_bytes());
    key.extend_from_slice(message_id.as_bytes());
    key
}

/// A queued message's key in the `waiting` index. Status reports wait at the highest urgency,
/// as they do in the outbox.
pub fn waiting_key_of(message: &wire::QueuedMessage) -> Vec<u8> {
    let urgency = match &message.payload {
        Some(wire::queued_message::Payload::Document(document)) => {
            u8::try_from(document.priority).unwrap_or(u8::MAX)
        }
        _ => crate::document::Urgency::HIGHEST.value(),
    };
    waiting_key(
        &message.recipient,
        urgency,
        message.accepted_at_unix_ms,
        &message.message_id,
    )
}

fn pair_key(message_id: &str, recipient: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(message_id.len() + 1 + recipient.len());
    key.extend_from_slice(message_id.as_bytes());
    key.push(0);
    key.extend_from_slice(recipient.as_bytes());
    key
}

/// Encodes a `QueuedMessage` whose document is `document_bytes`, without decoding the document:
/// an embedded message field is its key, its length and its bytes.
fn encode_queued_document(header: wire::QueuedMessage, document_bytes: &[u8]) -> Vec<u8> {
    const DOCUMENT_FIELD: u32 = 3;
    // The slack leaves room for the publisher to append a `traceparent` field without copying.
    let mut buffer = Vec::with_capacity(header.encoded_len() + document_bytes.len() + 96);
    header.encode(&mut buffer).expect("a Vec grows as needed");
    prost::encoding::encode_key(
        DOCUMENT_FIELD,
        prost::encoding::WireType::LengthDelimited,
        &mut buffer,
    );
    prost::encoding::encode_varint(document_bytes.len() as u64, &mut buffer);
    buffer.extend_from_slice(document_bytes);
    buffer
}

/// A `dead_letters` entry: its id (the key) and the dead letter.
fn decode_dead_letter(
    (key, value): (sled::IVec, sled::IVec),
) -> Result<(u64, wire::StoredDeadLetter), StoreError> {
    let dead_letter = wire::StoredDeadLetter::decode(&*value).map_err(corrupt("dead_letters"))?;
    let id = <[u8; 8]>::try_from(&*key).map_or(0, u64::from_be_bytes);
    Ok((id, dead_letter))
}

fn corrupt(tree: &'static str) -> impl Fn(prost::DecodeError) -> StoreError {
    move |e| StoreError::Corrupt(format!("tree {tree}: {e}"))
}

fn unwrap_transaction<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

/// Receipt sequence numbers: handed out in increasing order under one lock, and tracked until
/// the transaction that writes their receipts has ended. The ledger appender follows the
/// `receipts` tree in sequence order and stops at the first number still open, so a receipt
/// that commits after a higher-numbered one is never passed over.
#[derive(Debug)]
struct ReceiptSeqs {
    state: std::sync::Mutex<ReceiptSeqState>,
}

#[derive(Debug)]
struct ReceiptSeqState {
    /// One past the highest number handed out (or found in the receipt log at open).
    issued_end: u64,
    /// Numbers handed out whose transaction has not ended yet.
    open: std::collections::BTreeSet<u64>,
}

impl ReceiptSeqs {
    fn new(receipts_end: u64) -> Self {
        ReceiptSeqs {
            state: std::sync::Mutex::new(ReceiptSeqState {
                issued_end: receipts_end,
                open: std::collections::BTreeSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReceiptSeqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every receipt numbered below this has committed, or never will.
    fn settled_before(&self) -> u64 {
        let state = self.lock();
        state.open.first().copied().unwrap_or(state.issued_end)
    }
}

/// Receipt sequence numbers taken for one transaction (see [`ReceiptSeqs`]); released when
/// dropped, which must come after the transaction has ended.
#[derive(Debug)]
struct ReservedSeqs {
    seqs: Vec<u64>,
    registry: Arc<ReceiptSeqs>,
}

impl std::ops::Deref for ReservedSeqs {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        &self.seqs
    }
}

impl Drop for ReservedSeqs {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        for seq in &self.seqs {
            state.open.remove(seq);
        }
    }
}

/// The segment size to open the database in `data_dir` with: the one sled recorded in its
/// `conf` file when the database exists (sled refuses to open a database with another), else
/// [`SEGMENT_BYTES`]. A database created with sled's default keeps its 512 KiB segments.
fn segment_bytes_for(data_dir: &Path) -> usize {
    std::fs::read(data_dir.join("conf"))
        .ok()
        .and_then(|conf| {
            String::from_utf8_lossy(&conf)
                .lines()
                .find_map(|line| line.strip_prefix("segment_size: ")?.trim().parse().ok())
        })
        .unwrap_or(SEGMENT_BYTES)
}

/// Syncs `directory`, so that the names in it (a file just created or renamed into it) survive
/// a power cut.
pub(crate) fn sync_directory(directory: &Path) -> std::io::Result<()> {
    std::fs::File::open(directory)?.sync_all()
}

/// Creates `directory` and its missing parents so that they survive a power cut: after
/// creating them, syncs the directory that holds each new one. Nothing is synced for a
/// directory that exists already (its parent may not even be readable by the hub).
pub(crate) fn create_directory_durably(directory: &Path) -> std::io::Result<()> {
    let missing: Vec<PathBuf> = directory
        .ancestors()
        .take_while(|ancestor| !ancestor.as_os_str().is_empty() && !ancestor.exists())
        .map(Path::to_owned)
        .collect();
    std::fs::create_dir_all(directory)?;
    for created in missing {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_directory(parent)?,
            _ => sync_directory(Path::new("."))?,
        }
    }
    Ok(())
}

/// The free space on the file system that holds `path`, in bytes, as an unprivileged process
/// sees it (root's reserved blocks left out): what `[storage] min_free_mib` is compared with.
/// `None` if it cannot be read.
pub fn free_space_on(path: &Path) -> Option<u64> {
    match rustix::fs::statvfs(path) {
        Ok(stats) => Some(stats.f_bavail.saturating_mul(stats.f_frsize)),
        Err(error) => {
            tracing::debug!(%error, path = %path.display(), "cannot read the free space of a disk");
            None
        }
    }
}

/// The highest receipt sequence number known to be on disk, kept in a file beside the database.
///
/// sled recovers a damaged log by keeping its intact prefix, which would silently lose the newest
/// records. The watermark is written after each group flush (without fsync: it only has to
/// survive the hub process, and a stale one is merely a weaker check), and checked at open: a
/// receipt log that ends before the watermark means records were lost. The file stays open and
/// its eight bytes are overwritten in place: one system call per flush.
#[derive(Debug)]
struct Watermark {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// The value in the file: read at open, then the last one written.
    durable: Option<u64>,
}

impl Watermark {
    /// The watermark of `data_dir`, read once.
    fn open(data_dir: &Path) -> Self {
        let path = data_dir.join("durable-receipt-watermark");
        let durable = std::fs::read(&path)
            .ok()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map(u64::from_be_bytes);
        Watermark {
            path,
            file: None,
            durable,
        }
    }

    /// Writes `seq` if it is above the watermark.
    fn advance(&mut self, seq: u64) {
        use std::os::unix::fs::FileExt;
        if seq <= self.durable.unwrap_or(0) {
            return;
        }
        self.durable = Some(seq);
        let file = match self.file.take() {
            Some(file) => Ok(file),
            None => std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path),
        };
        match file.and_then(|file| file.write_all_at(&seq.to_be_bytes(), 0).map(|()| file)) {
            Ok(file) => self.file = Some(file),
            Err(error) => {
                tracing::warn!(%error, path = %self.path.display(), "cannot update the durability watermark");
            }
        }
    }
}

/// The number of entries in the outbox, kept in memory. What adds entries raises it after its
/// transaction commits, and a confirm lowers it after its own; a publisher that takes and
/// confirms an entry between the commit and the raise takes the count below zero for that
/// moment, and it then reads as zero.
#[derive(Debug)]
struct OutboxCount(AtomicI64);

impl OutboxCount {
    fn new(entries: u64) -> Self {
        OutboxCount(AtomicI64::new(i64::try_from(entries).unwrap_or(i64::MAX)))
    }

    fn raise(&self, by: u64) {
        self.0
            .fetch_add(i64::try_from(by).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn lower(&self, by: u64) {
        self.0
            .fetch_sub(i64::try_from(by).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        u64::try_from(self.0.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// One past the highest receipt sequence number in the log; 0 when the log is empty.
fn receipts_end(receipts: &sled::Tree) -> Result<u64, StoreError> {
    Ok(receipts
        .last()?
        .and_then(|(key, _)| <[u8; 8]>::try_from(&*key).ok())
        .map_or(0, |key| u64::from_be_bytes(key) + 1))
}

/// How long the group committer waits for a writer before it flushes anyway: sled's own flushing
/// thread may have met a write error, which only a flush reports, and nothing else would stop a
/// hub whose database can no longer write.
const IDLE_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Groups the flushes of concurrent writers: each waiter takes a ticket after its write, and one
/// flush that starts after a ticket was taken makes that ticket's write durable.
#[derive(Debug)]
struct GroupCommit {
    requested: AtomicU64,
    flushed: watch::Sender<Flushed>,
    /// Cancelled once a flush has failed, for whoever waits only for that: `flushed` wakes its
    /// receivers at every flush, several times per document.
    failed: tokio_util::sync::CancellationToken,
    wake: Notify,
}

/// What the group committer has made durable, or why it stopped.
#[derive(Debug, Default)]
struct Flushed {
    /// Every ticket up to this one is on disk.
    through: u64,
    /// Set by the first flush that fails; no flush runs after it.
    failure: Option<String>,
}

impl GroupCommit {
    fn new() -> Self {
        GroupCommit {
            requested: AtomicU64::new(0),
            flushed: watch::Sender::new(Flushed::default()),
            failed: tokio_util::sync::CancellationToken::new(),
            wake: Notify::new(),
        }
    }

    async fn wait(&self) -> Result<(), StoreError> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed = self.flushed.subscribe();
        self.wake.notify_one();
        let flushed = flushed
            .wait_for(|flushed| flushed.through >= ticket || flushed.failure.is_some())
            .await
            .map_err(|_| StoreError::Corrupt("the database flusher stopped".into()))?;
        match &flushed.failure {
            Some(failure) if flushed.through < ticket => Err(StoreError::Failed(failure.clone())),
            _ => Ok(()),
        }
    }

    /// Resolves with the reason once a flush has failed.
    async fn failure(&self) -> String {
        self.failed.cancelled().await;
        self.flushed.borrow().failure.clone().unwrap_or_default()
    }

    /// Flushes for the writers that wait. sled's flush (vendor/sled, PATCHES.md 6) writes the
    /// log buffers and ends with an `fdatasync` of the log: what it covered survives a power cut.
    async fn run(this: Arc<GroupCommit>, db: sled::Db, receipts: sled::Tree, watermark: Watermark) {
        // The flush and the watermark's write wait for the disk, so both run on a blocking
        // thread: a disk that stalls then holds back the writers that wait for it, not the
        // async workers that serve everything else.
        let watermark = Arc::new(std::sync::Mutex::new(watermark));
        loop {
            let woken = tokio::time::timeout(IDLE_FLUSH_INTERVAL, this.wake.notified())
                .await
                .is_ok();
            let target = this.requested.load(Ordering::SeqCst);
            // A writer's wake-up that an earlier flush already served; the idle flush runs anyway.
            if woken && target <= this.flushed.borrow().through {
                continue;
            }
            // Taken before the flush starts, so the flush covers the receipt it names.
            let high = receipts_end(&receipts).map_or(0, |end| end.saturating_sub(1));
            let db = db.clone();
            let watermark = watermark.clone();
            let flushed = tokio::task::spawn_blocking(move || {
                db.flush()?;
                watermark
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .advance(high);
                Ok::<(), sled::Error>(())
            })
            .await;
            // A failed flush is not retried: sled fails every write after its first failed one,
            // and what a failed write left on disk is known only to the next start's recovery.
            let failure = match flushed {
                Ok(Ok(())) => {
                    this.flushed.send_if_modified(|flushed| {
                        let advanced = target > flushed.through;
                        flushed.through = flushed.through.max(target);
                        advanced
                    });
                    continue;
                }
                Ok(Err(error)) => error.to_string(),
                Err(join_error) => format!("the flush stopped: {join_error}"),
            };
            tracing::error!(%failure, "flushing the database failed; no write can be made durable any more");
            this.flushed
                .send_modify(|flushed| flushed.failure = Some(failure));
            this.failed.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The publisher's view of the outbox: messages on their way to the transport are left out
    /// of the next batch, and those recorded as enqueued leave the outbox.
    #[tokio::test]
    async fn a_batch_leaves_out_the_messages_on_their_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub: AgencyCode = "000.00.00.H53".parse().expect("code");
        let store = Store::open(dir.path(), &hub).expect("open");
        let district: AgencyCode = "000.00.31.H53".parse().expect("code");
        for _ in 0..3 {
            store
                .accept_status_report(
                    &wire::StatusReport::default(),
                    &[],
                    std::slice::from_ref(&district),
                    None,
                    1_000,
                )
                .expect("a status report");
        }
        let first = store.outbox_batch(2, |_| false).expect("a batch");
        assert_eq!(first.len(), 2);
        let on_the_way: HashSet<sled::IVec> =
            first.iter().map(|p| p.outbox_key().clone()).collect();
        let second = store
            .outbox_batch(10, |key| on_the_way.contains(key))
            .expect("a batch");
        assert_eq!(second.len(), 1, "only the message not on its way");
        assert!(!on_the_way.contains(second[0].outbox_key()));

        store
            .mark_enqueued(&first.iter().collect::<Vec<_>>(), 1_001)
            .expect("confirms recorded");
        let left: Vec<String> = store
            .outbox_batch(10, |_| false)
            .expect("a batch")
            .into_iter()
            .map(|p| p.message_id)
            .collect();
        assert_eq!(left, [second[0].message_id.clone()]);
        assert_eq!(store.outbox_len(), 1);
    }

    /// A confirm counted before the acceptance it follows reads as an empty outbox, and the
    /// count is right again once the acceptance is counted.
    #[test]
    fn an_outbox_count_lowered_before_it_was_raised_reads_zero() {
        let count = OutboxCount::new(2);
        count.lower(3);
        assert_eq!(count.get(), 0);
        count.raise(3);
        assert_eq!(count.get(), 2);
    }

    /// The outbox's count rises after an acceptance's transaction and falls after a confirm's.
    /// A publisher that takes and confirms a document between the two must leave the count at
    /// zero for that moment, not wrapped to 2^64 minus a few: `Send` compares it with the
    /// outbox's bound and would refuse every document.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_confirm_recorded_before_its_acceptance_counted_does_not_wrap_the_outbox_count() {
        const DOCUMENTS: u64 = 10_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let hub: AgencyCode = "000.00.00.H53".parse().expect("code");
        let store = Store::open(dir.path(), &hub).expect("open");
        let limits = crate::document::DocumentLimits {
            max_document_bytes: 4096,
            max_recipients: 4,
            max_attachments: 1,
            max_attachment_bytes: 1024,
            max_field_bytes: 64,
        };
        let accepting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let publisher = {
            let (store, accepting) = (store.clone(), accepting.clone());
            std::thread::spawn(move || {
                let mut highest = 0;
                let mut published = 0;
                while accepting.load(Ordering::SeqCst) || published < DOCUMENTS {
                    let batch = store.outbox_batch(64, |_| false).expect("a batch");
                    store
                        .mark_enqueued(&batch.iter().collect::<Vec<_>>(), 1_000)
                        .expect("confirms recorded");
                    published += batch.len() as u64;
                    highest = highest.max(store.outbox_len());
                }
                highest
            })
        };
        let mut sends = tokio::task::JoinSet::new();
        for n in 0..DOCUMENTS {
            let store = store.clone();
            let wire = wire::Document {
                from: "000.21.31.H53".into(),
                to: vec!["000.00.31.H53".into()],
                subject: "outbox count".into(),
                code_number: n.to_string(),
                code_notation: "UBND".into(),
                ..Default::default()
            };
            let document = Document::from_wire(wire, limits, 1_000).expect("a valid document");
            sends.spawn(async move {
                store
                    .accept_document(&document, "", 1_000)
                    .await
                    .expect("accepted");
                store.outbox_len()
            });
        }
        let mut highest = 0;
        while let Some(count) = sends.join_next().await {
            highest = highest.max(count.expect("a send"));
        }
        accepting.store(false, Ordering::SeqCst);
        highest = highest.max(publisher.join().expect("the publisher"));
        assert!(
            highest <= DOCUMENTS,
            "the outbox count read {highest} with {DOCUMENTS} documents accepted"
        );
        assert_eq!(store.outbox_len(), 0, "every entry was published");
    }

    /// A new database keeps log messages up to 2 MiB in sled's log: a value of a megabyte
    /// leaves no blob file (sled's default segments sent anything over 128 KiB to one).
    #[tokio::test]
    async fn a_value_of_a_megabyte_is_written_to_the_log_not_to_a_blob_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub: AgencyCode = "000.00.00.H53".parse().expect("code");
        let store = Store::open(dir.path(), &hub).expect("open");
        store
            .db()
            .open_tree("document_bodies")
            .expect("tree")
            .insert("a document", vec![7; 1024 * 1024])
            .expect("insert");
        store.durable().await.expect("flushed");
        let blobs = std::fs::read_dir(dir.path().join("blobs")).map_or(0, Iterator::count);
        assert_eq!(blobs, 0, "blob files in {}", dir.path().display());
    }

    /// sled refuses to open a database with a segment size other than its own, so a database
    /// created with sled's default keeps it; a new one gets [`SEGMENT_BYTES`].
    #[tokio::test]
    async fn a_database_opens_with_the_segment_size_it_was_created_with() {
        let hub: AgencyCode = "000.00.00.H53".parse().expect("code");
        let older = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(older.path()).expect("a database with sled's defaults");
            db.insert("key", "value").expect("insert");
            db.flush().expect("flush");
        }
        let store = Store::open(older.path(), &hub).expect("the older database opens");
        assert_eq!(segment_bytes_for(older.path()), 512 * 1024);
        assert_eq!(
            store.db().get("key").expect("read").as_deref(),
            Some(&b"value"[..])
        );

        let new = tempfile::tempdir().expect("tempdir");
        let _store = Store::open(new.path(), &hub).expect("a new database");
        assert_eq!(segment_bytes_for(new.path()), SEGMENT_BYTES);
    }

    /// The patched sled's `set` and `unset` write without reading the tree first: a later read
    /// in the same transaction sees them, and the commit applies them over what was there.
    #[test]
    fn writes_that_do_not_read_are_seen_in_their_transaction_and_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("open");
        let tree = db.open_tree("t").expect("tree");
        tree.insert("kept", "old").expect("insert");
        tree.insert("dropped", "old").expect("insert");
        let result = tree.transaction(|tx| {
            tx.set("kept", "new");
            tx.set("added", "new");
            tx.unset("dropped");
            assert_eq!(tx.get("kept")?.as_deref(), Some(&b"new"[..]));
            assert_eq!(tx.get("added")?.as_deref(), Some(&b"new"[..]));
            assert_eq!(tx.get("dropped")?, None);
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        result.expect("committed");
        assert_eq!(tree.get("kept").expect("get").as_deref(), Some(&b"new"[..]));
        assert_eq!(
            tree.get("added").expect("get").as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(tree.get("dropped").expect("get"), None);
    }

    /// The patched sled keeps a written log buffer for the next segment (vendor/sled,
    /// PATCHES.md 8) instead of freeing it, so a new segment's buffer holds the bytes of one
    /// written before. 2.8 MB of values, more than forty segments of the log, some in full
    /// buffers and some flushed part-way, read back the same after the database is opened again.
    #[test]
    fn values_written_through_reused_log_buffers_read_back_after_a_reopen() {
        const SEGMENT: usize = 64 * 1024;
        let value = |key: u32, round: u32| vec![(key.wrapping_mul(31) ^ round) as u8; 700];
        let dir = tempfile::tempdir().expect("tempdir");
        let config = || {
            sled::Config::new()
                .path(dir.path())
                .segment_size(SEGMENT)
                .flush_every_ms(None)
        };
        {
            let db = config().open().expect("open");
            let tree = db.open_tree("values").expect("tree");
            for round in 0..8 {
                for key in 0..500u32 {
                    tree.insert(key.to_be_bytes(), value(key, round))
                        .expect("insert");
                    if key % 97 == 0 {
                        db.flush().expect("flush");
                    }
                }
            }
            db.flush().expect("flush");
        }
        let db = config().open().expect("open again");
        let tree = db.open_tree("values").expect("tree");
        let wrong = (0..500u32)
            .filter(|key| {
                tree.get(key.to_be_bytes()).expect("get").as_deref() != Some(&value(*key, 7)[..])
            })
            .count();
        assert_eq!(wrong, 0, "keys read back wrong or missing");
    }

    /// sled writes a sealed log buffer on the next thread that waits for the log (vendor/sled,
    /// PATCHES.md 7), not on a thread of its own. A read of a page that the cache dropped
    /// before anything flushed waits for the log too: it must write what is queued and find
    /// every value, not wait for a writer that never comes.
    #[test]
    fn a_page_read_back_before_any_flush_is_found() {
        const KEYS: u32 = 4_000;
        let value = |key: u32| vec![(key % 251) as u8; 600];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_owned();
        // On a thread of its own, so that a wait for a writer that never comes fails the test.
        let (found, reader) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let db = sled::Config::new()
                .path(path)
                .cache_capacity(64 * 1024)
                .flush_every_ms(None)
                .open()
                .expect("open");
            let tree = db.open_tree("values").expect("tree");
            for batch in (0..KEYS).collect::<Vec<_>>().chunks(100) {
                tree.transaction(|tx| {
                    for &key in batch {
                        tx.set(&key.to_be_bytes(), value(key));
                    }
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .expect("transaction");
            }
            let wrong = (0..KEYS)
                .filter(|key| {
                    let read = tree.get(key.to_be_bytes()).expect("get");
                    read.as_deref() != Some(&value(*key)[..])
                })
                .count();
            drop((tree, db));
            let _ = found.send(wrong);
        });
        let wrong = reader
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the writes and reads ended within 30 s");
        assert_eq!(wrong, 0, "keys read back wrong or missing");
    }
}
