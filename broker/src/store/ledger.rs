//! The receipt ledger in sled: one appender moves every new receipt (following the store's
//! `receipts` tree in sequence order, up to the first number whose transaction may still commit,
//! see `ReceiptSeqs`) to the next ledger index with its chain hash and Merkle nodes, and signs
//! checkpoints; queries, proofs, verification and export read it.
//!
//! Trees and their keys:
//! - `ledger`: index BE → `LedgerRecord`;
//! - `ledger_nodes`: `level u8 ‖ index BE` → 32-byte hash of that complete Merkle subtree, for
//!   levels from [`LOWEST_STORED_LEVEL`] up; the smaller subtrees (at most 8 leaves) are
//!   computed from their records when a proof or a restart needs them, which saves two writes
//!   per receipt on the appender's path (leaves of archived records are kept, see below);
//! - `ledger_checkpoints`: tree size BE → signed `Checkpoint`;
//! - `ledger_by_seq`: receipt seq BE → index BE; `ledger_by_agency`: `agency 0x00 at-ms BE
//!   index BE` → (), for the auditors' queries. Queries by document go through the store's
//!   `receipts_by_document` (seq) and `ledger_by_seq`.
//!
//! - `ledger_meta`: `append_from` → the sequence number of the next receipt to append (BE),
//!   written with each batch; `archived_before` → index BE, `archived_chain` → the chain hash
//!   of the last archived record.
//!
//! A database written before `append_from` existed kept a `ledger_pending` tree (receipt seq →
//! () until appended): at open the appender starts from its first entry, or after the last
//! appended receipt, and skips receipts that `ledger_by_seq` already holds up to that one.
//!
//! Records are never deleted, but old ranges can be archived: written to a file in the export
//! format (ending at a signed checkpoint), the file verified, then the range removed from the
//! database. Merkle nodes stay, and the leaf hashes of the archived records are stored first,
//! so roots and later checkpoints still verify from the database alone; the archived records
//! verify from their file. The appender is the only writer of these trees, so the ledger order
//! is the order it took receipts in; a checkpoint is signed only after the records it covers
//! are flushed, so a crash can never leave a signature over records that were lost.

use super::{Store, StoreError, StoreInner, corrupt, unwrap_transaction};
use crate::ledger::{self, Frontier, Hash, Nodes, SigningKey};
use lienthong_proto::v1 as wire;
use prost::Message;
use sled::Transactional;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

/// Receipts appended per transaction.
const APPEND_BATCH: usize = 2048;
/// The lowest level of Merkle subtrees written to `ledger_nodes` as the ledger grows; below it a
/// node costs at most 8 record reads to compute.
const LOWEST_STORED_LEVEL: u32 = 4;
/// How often the appender looks for new receipts.
const APPEND_TICK: Duration = Duration::from_millis(25);

/// When the hub signs a checkpoint: after `every` new records, or `interval` after the first
/// record not yet covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub every: u64,
    pub interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every: 1000,
            interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
pub(super) struct LedgerTrees {
    records: sled::Tree,
    nodes: sled::Tree,
    checkpoints: sled::Tree,
    by_seq: sled::Tree,
    by_agency: sled::Tree,
    meta: sled::Tree,
    key: SigningKey,
    policy: CheckpointPolicy,
    head: Mutex<Head>,
}

/// The end of the ledger, as the appender left it.
#[derive(Debug, Clone)]
struct Head {
    frontier: Frontier,
    chain: Hash,
    checkpointed: u64,
    /// When the first record after the last checkpoint was appended.
    uncovered_since: Option<Instant>,
    /// The sequence number of the next receipt to append (`append_from` in `ledger_meta`).
    append_from: u64,
    /// Receipts numbered below this may be in the ledger already (a database from before
    /// `append_from`): the appender skips those that `ledger_by_seq` holds.
    recheck_before: u64,
}

impl LedgerTrees {
    pub(super) fn open(
        db: &sled::Db,
        data_dir: &std::path::Path,
        policy: CheckpointPolicy,
    ) -> Result<LedgerTrees, StoreError> {
        let records = db.open_tree("ledger")?;
        let nodes = db.open_tree("ledger_nodes")?;
        let checkpoints = db.open_tree("ledger_checkpoints")?;
        let key = SigningKey::load_or_create(data_dir).map_err(|e| {
            StoreError::Corrupt(format!(
                "the ledger signing key in {}: {e}",
                data_dir.display()
            ))
        })?;
        let meta = db.open_tree("ledger_meta")?;
        let (size, chain) = match records.last()? {
            Some((_, value)) => {
                let record = wire::LedgerRecord::decode(&*value).map_err(corrupt("ledger"))?;
                (record.index + 1, to_hash(&record.chain_hash)?)
            }
            // Every record archived: the ledger goes on from the archive mark.
            None => match (meta.get(ARCHIVED_BEFORE)?, meta.get(ARCHIVED_CHAIN)?) {
                (Some(before), Some(chain)) => (be_u64(&before)?, to_hash(&chain)?),
                _ => (0, ledger::GENESIS),
            },
        };
        let frontier = Frontier::restore(
            &StoredNodes {
                nodes: &nodes,
                records: &records,
            },
            size,
        )?;
        let checkpointed = match checkpoints.last()? {
            Some((key, _)) => be_u64(&key)?,
            None => 0,
        };
        let by_seq = db.open_tree("ledger_by_seq")?;
        let (append_from, recheck_before) = match meta.get(APPEND_FROM)? {
            Some(value) => (be_u64(&value)?, 0),
            None => {
                let appended_end = match by_seq.last()? {
                    Some((seq, _)) => be_u64(&seq)? + 1,
                    // Every record archived: each receipt is in the ledger or pending.
                    None if size > 0 => super::receipts_end(&db.open_tree("receipts")?)?,
                    None => 0,
                };
                let legacy_pending = if db.tree_names().iter().any(|n| &**n == b"ledger_pending") {
                    db.open_tree("ledger_pending")?.first()?
                } else {
                    None
                };
                let first_pending = match legacy_pending {
                    Some((seq, _)) => be_u64(&seq)?,
                    None => appended_end,
                };
                (first_pending.min(appended_end), appended_end)
            }
        };
        Ok(LedgerTrees {
            records,
            nodes,
            checkpoints,
            by_seq,
            by_agency: db.open_tree("ledger_by_agency")?,
            meta,
            key,
            policy,
            head: Mutex::new(Head {
                frontier,
                chain,
                checkpointed,
                uncovered_since: (size > checkpointed).then(Instant::now),
                append_from,
                recheck_before,
            }),
        })
    }

    fn head(&self) -> std::sync::MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stored_nodes(&self) -> StoredNodes<'_> {
        StoredNodes {
            nodes: &self.nodes,
            records: &self.records,
        }
    }
}

/// Complete Merkle subtrees: kept in `ledger_nodes`, or, below [`LOWEST_STORED_LEVEL`],
/// computed from the records (a leaf is the hash of its record).
struct StoredNodes<'a> {
    nodes: &'a sled::Tree,
    records: &'a sled::Tree,
}

impl Nodes for StoredNodes<'_> {
    type Error = StoreError;

    fn node(&self, level: u32, index: u64) -> Result<Hash, StoreError> {
        if let Some(value) = self.nodes.get(node_key(level, index))? {
            return to_hash(&value);
        }
        let missing = || StoreError::Corrupt(format!("ledger node {level}/{index} is missing"));
        if level >= LOWEST_STORED_LEVEL {
            return Err(missing());
        }
        if level == 0 {
            let value = self.records.get(index.to_be_bytes())?.ok_or_else(missing)?;
            let record = wire::LedgerRecord::decode(&*value).map_err(corrupt("ledger"))?;
            let receipt = record.receipt.as_ref().ok_or_else(missing)?;
            return Ok(ledger::leaf_hash(index, receipt));
        }
        Ok(ledger::node_hash(
            &self.node(level - 1, 2 * index)?,
            &self.node(level - 1, 2 * index + 1)?,
        ))
    }
}

fn receipt_of(record: &wire::LedgerRecord) -> Result<&wire::Receipt, StoreError> {
    record.receipt.as_ref().ok_or_else(|| {
        StoreError::Corrupt(format!("ledger record {} has no receipt", record.index))
    })
}

fn node_key(level: u32, index: u64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = level as u8;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn to_hash(bytes: &[u8]) -> Result<Hash, StoreError> {
    Hash::try_from(bytes).map_err(|_| StoreError::Corrupt("a ledger hash is not 32 bytes".into()))
}

fn be_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a ledger key is not 8 bytes".into()))
}

fn prefixed(text: &str) -> Vec<u8> {
    let mut key = text.as_bytes().to_vec();
    key.push(0);
    key
}

/// Appends pending receipts and signs checkpoints until the store is dropped.
pub(super) async fn run_appender(store: Weak<StoreInner>) {
    loop {
        tokio::time::sleep(APPEND_TICK).await;
        let Some(inner) = store.upgrade() else { return };
        let store = Store { inner };
        // Batches end at checkpoint boundaries, so that a checkpoint comes every `every` records.
        loop {
            let appended = match store.append_pending() {
                Ok(appended) => appended,
                Err(error) => {
                    tracing::error!(%error, "cannot append receipts to the ledger");
                    break;
                }
            };
            if let Err(error) = store.checkpoint_if_due().await {
                tracing::error!(%error, "cannot sign a ledger checkpoint");
                break;
            }
            if appended == 0 {
                break;
            }
        }
    }
}

/// Which receipts an auditor asks for.
#[derive(Debug, Clone, Default)]
pub struct ReceiptFilter {
    pub document_id: Option<String>,
    pub agency: Option<String>,
    pub kind: Option<i32>,
    pub from_unix_ms: Option<i64>,
    pub to_unix_ms: Option<i64>,
}

impl ReceiptFilter {
    fn matches(&self, receipt: &wire::Receipt) -> bool {
        self.document_id
            .as_ref()
            .is_none_or(|d| *d == receipt.document_id)
            && self.agency.as_ref().is_none_or(|a| *a == receipt.agency)
            && self.kind.is_none_or(|k| k == receipt.kind)
            && self
                .from_unix_ms
                .is_none_or(|from| receipt.at_unix_ms >= from)
            && self.to_unix_ms.is_none_or(|to| receipt.at_unix_ms < to)
    }
}

/// What `archive_ledger` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    pub path: std::path::PathBuf,
    pub from: u64,
    pub to: u64,
    pub checkpoints: u64,
}

const APPEND_FROM: &[u8] = b"append_from";
const ARCHIVED_BEFORE: &[u8] = b"archived_before";
const ARCHIVED_CHAIN: &[u8] = b"archived_chain";

/// What `verify_ledger` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub records_checked: u64,
    pub checkpoints_checked: u32,
    /// The first bad index and what is wrong with it.
    pub problem: Option<(u64, String)>,
}

impl Store {
    fn ledger(&self) -> &LedgerTrees {
        &self.inner.ledger
    }

    /// Moves up to one batch of new receipts into the ledger; returns how many it took.
    pub fn append_pending(&self) -> Result<usize, StoreError> {
        let ledger = self.ledger();
        // Read before the receipts: every receipt numbered below it has committed or never will.
        let settled_before = self.inner.receipt_seqs.settled_before();
        let mut head = ledger.head();
        if head.append_from >= settled_before {
            return Ok(0);
        }
        let until_checkpoint =
            ledger.policy.every - (head.frontier.size() - head.checkpointed) % ledger.policy.every;
        let batch = APPEND_BATCH.min(usize::try_from(until_checkpoint).unwrap_or(APPEND_BATCH));
        let mut taken = 0;
        let mut next = head.append_from;
        let mut receipts = Vec::with_capacity(batch);
        for item in self
            .inner
            .receipts
            .range(head.append_from.to_be_bytes()..settled_before.to_be_bytes())
            .take(batch)
        {
            let (key, value) = item?;
            taken += 1;
            let seq = be_u64(&key)?;
            next = seq + 1;
            if seq < head.recheck_before && ledger.by_seq.contains_key(&key)? {
                continue;
            }
            receipts.push(wire::Receipt::decode(&*value).map_err(corrupt("receipts"))?);
        }
        if taken == 0 {
            return Ok(0);
        }
        let mut frontier = head.frontier.clone();
        let mut chain = head.chain;
        let mut records = Vec::with_capacity(receipts.len());
        let mut nodes = Vec::with_capacity(receipts.len() * 2);
        for receipt in receipts {
            let index = frontier.size();
            let leaf = ledger::leaf_hash(index, &receipt);
            chain = ledger::chain_hash(&chain, &leaf);
            nodes.extend(frontier.push(leaf));
            records.push(wire::LedgerRecord {
                index,
                receipt: Some(receipt),
                chain_hash: chain.to_vec(),
            });
        }
        nodes.retain(|(level, _, _)| *level >= LOWEST_STORED_LEVEL);
        let result = (
            &ledger.records,
            &ledger.nodes,
            &ledger.by_seq,
            &ledger.by_agency,
            &ledger.meta,
        )
            .transaction(|(tx_records, tx_nodes, by_seq, by_agency, meta)| {
                for record in &records {
                    let receipt = record.receipt.as_ref().expect("set above");
                    let index = record.index.to_be_bytes();
                    tx_records.set(&index, record.encode_to_vec());
                    by_seq.set(&receipt.seq.to_be_bytes(), &index);
                    let mut key = prefixed(&receipt.agency);
                    key.extend_from_slice(&(receipt.at_unix_ms.max(0) as u64).to_be_bytes());
                    key.extend_from_slice(&index);
                    by_agency.set(key, &[]);
                }
                for (level, index, hash) in &nodes {
                    tx_nodes.set(&node_key(*level, *index), hash);
                }
                meta.set(APPEND_FROM, &next.to_be_bytes());
                Ok(())
            });
        unwrap_transaction(result)?;
        head.frontier = frontier;
        head.chain = chain;
        head.append_from = next;
        if !records.is_empty() {
            head.uncovered_since.get_or_insert_with(Instant::now);
        }
        Ok(taken)
    }

    /// Signs a checkpoint when the policy says so; returns it if one was made.
    pub async fn checkpoint_if_due(&self) -> Result<Option<wire::Checkpoint>, StoreError> {
        let ledger = self.ledger();
        let due = {
            let head = ledger.head();
            let uncovered = head.frontier.size() - head.checkpointed;
            uncovered > 0
                && (uncovered >= ledger.policy.every
                    || head
                        .uncovered_since
                        .is_some_and(|since| since.elapsed() >= ledger.policy.interval))
        };
        if !due {
            return Ok(None);
        }
        self.checkpoint().await.map(Some)
    }

    /// Signs a checkpoint of the whole ledger now (after flushing the records it covers).
    pub async fn checkpoint(&self) -> Result<wire::Checkpoint, StoreError> {
        let ledger = self.ledger();
        let head = ledger.head().clone();
        let size = head.frontier.size();
        if size == head.checkpointed
            && let Some(existing) = self.newest_checkpoint()?
        {
            return Ok(existing);
        }
        // The records must be on disk before a signature vouches for them.
        self.durable().await?;
        let mut checkpoint = wire::Checkpoint {
            hub: self.inner.hub_code.clone(),
            tree_size: size,
            root_hash: head.frontier.root().unwrap_or_default().to_vec(),
            chain_hash: head.chain.to_vec(),
            at_unix_ms: crate::hub::now_unix_ms(),
            signature: Vec::new(),
        };
        ledger.key.sign(&mut checkpoint);
        ledger
            .checkpoints
            .insert(size.to_be_bytes(), checkpoint.encode_to_vec())?;
        let mut current = ledger.head();
        current.checkpointed = current.checkpointed.max(size);
        if current.frontier.size() == size {
            current.uncovered_since = None;
        }
        Ok(checkpoint)
    }

    /// The hub's Ed25519 public key (raw 32 bytes).
    pub fn ledger_public_key(&self) -> Vec<u8> {
        self.ledger().key.public_key()
    }

    /// Records in the ledger.
    pub fn ledger_size(&self) -> u64 {
        self.ledger().head().frontier.size()
    }

    /// Whether some receipt written is not yet in the ledger.
    pub fn ledger_has_pending(&self) -> Result<bool, StoreError> {
        let append_from = self.ledger().head().append_from;
        Ok(self
            .inner
            .receipts
            .range(append_from.to_be_bytes()..)
            .next()
            .transpose()?
            .is_some())
    }

    pub fn newest_checkpoint(&self) -> Result<Option<wire::Checkpoint>, StoreError> {
        self.ledger()
            .checkpoints
            .last()?
            .map(|(_, v)| wire::Checkpoint::decode(&*v).map_err(corrupt("ledger_checkpoints")))
            .transpose()
    }

    pub fn ledger_record(&self, index: u64) -> Result<Option<wire::LedgerRecord>, StoreError> {
        self.ledger()
            .records
            .get(index.to_be_bytes())?
            .map(|v| wire::LedgerRecord::decode(&*v).map_err(corrupt("ledger")))
            .transpose()
    }

    /// The record at `index`, which an index entry names: missing means the database is damaged.
    fn indexed_record(&self, index: u64) -> Result<wire::LedgerRecord, StoreError> {
        self.ledger_record(index)?.ok_or_else(|| {
            StoreError::Corrupt(format!("a ledger index names missing record {index}"))
        })
    }

    /// The ledger index of the receipt `seq`, once appended.
    pub fn ledger_index_of(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        self.ledger()
            .by_seq
            .get(seq.to_be_bytes())?
            .map(|v| be_u64(&v))
            .transpose()
    }

    /// Up to `limit` records matching `filter`, oldest first, starting at the opaque position
    /// `after` (from a previous page); returns them and the next position, if any.
    pub fn ledger_records(
        &self,
        filter: &ReceiptFilter,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<wire::LedgerRecord>, Option<Vec<u8>>), StoreError> {
        let ledger = self.ledger();
        if let Some(document) = &filter.document_id {
            return self.document_ledger_records(document, filter, after, limit);
        }
        // The narrowest index: by agency (from the start of the time range), else the ledger
        // itself.
        let (tree, prefix, start): (&sled::Tree, Vec<u8>, Vec<u8>) = match &filter.agency {
            Some(agency) => {
                let prefix = prefixed(agency);
                let mut start = prefix.clone();
                start.extend_from_slice(
                    &(filter.from_unix_ms.unwrap_or(0).max(0) as u64).to_be_bytes(),
                );
                (&ledger.by_agency, prefix, start)
            }
            None => (&ledger.records, Vec::new(), Vec::new()),
        };
        let start = match after {
            Some(position) if position.starts_with(&prefix) && position >= start.as_slice() => {
                position.to_vec()
            }
            _ => start,
        };
        let mut records = Vec::new();
        for item in tree.range(start..) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            if records.len() == limit {
                return Ok((records, Some(key.to_vec())));
            }
            let record = if prefix.is_empty() {
                wire::LedgerRecord::decode(&*value).map_err(corrupt("ledger"))?
            } else {
                self.indexed_record(be_u64(&key[key.len() - 8..])?)?
            };
            let receipt = receipt_of(&record)?;
            if filter.agency.is_some()
                && filter.to_unix_ms.is_some_and(|to| receipt.at_unix_ms >= to)
            {
                break;
            }
            if filter.matches(receipt) {
                records.push(record);
            }
        }
        Ok((records, None))
    }

    /// [`Store::ledger_records`] of one document: its receipts (`receipts_by_document`) that
    /// are in the ledger, in ledger order. The position is `id 0x00 index BE`.
    fn document_ledger_records(
        &self,
        document: &str,
        filter: &ReceiptFilter,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<wire::LedgerRecord>, Option<Vec<u8>>), StoreError> {
        let prefix = prefixed(document);
        let mut indexes = Vec::new();
        for item in self.inner.receipts_by_document.scan_prefix(&prefix) {
            let (key, _) = item?;
            let seq = be_u64(&key[prefix.len()..])?;
            // A receipt not yet appended, or archived, has no index.
            if let Some(index) = self.ledger_index_of(seq)? {
                indexes.push(index);
            }
        }
        indexes.sort_unstable();
        let resume_at = match after {
            Some(position)
                if position.len() == prefix.len() + 8 && position.starts_with(&prefix) =>
            {
                be_u64(&position[prefix.len()..])?
            }
            _ => 0,
        };
        let mut records = Vec::new();
        for index in indexes.into_iter().filter(|index| *index >= resume_at) {
            if records.len() == limit {
                let mut position = prefix;
                position.extend_from_slice(&index.to_be_bytes());
                return Ok((records, Some(position)));
            }
            let record = self.indexed_record(index)?;
            let receipt = receipt_of(&record)?;
            if filter.matches(receipt) {
                records.push(record);
            }
        }
        Ok((records, None))
    }

    /// The inclusion proof of record `index` against the newest checkpoint covering it.
    pub fn ledger_proof(
        &self,
        index: u64,
    ) -> Result<Option<(wire::LedgerRecord, Vec<Hash>, wire::Checkpoint)>, StoreError> {
        let Some(record) = self.ledger_record(index)? else {
            return Ok(None);
        };
        let Some(checkpoint) = self.newest_checkpoint()? else {
            return Ok(None);
        };
        if checkpoint.tree_size <= index {
            return Ok(None);
        }
        let proof =
            ledger::inclusion_proof(&self.ledger().stored_nodes(), index, checkpoint.tree_size)?;
        Ok(Some((record, proof, checkpoint)))
    }

    /// Checkpoints whose size is in `(from, to]`, oldest first.
    pub fn ledger_checkpoints(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<wire::Checkpoint>, StoreError> {
        let mut checkpoints = Vec::new();
        for item in self
            .ledger()
            .checkpoints
            .range((from + 1).to_be_bytes()..=to.to_be_bytes())
        {
            let (_, value) = item?;
            checkpoints
                .push(wire::Checkpoint::decode(&*value).map_err(corrupt("ledger_checkpoints"))?);
        }
        Ok(checkpoints)
    }

    /// Records before this index are archived in files (0 when none are).
    pub fn archived_before(&self) -> Result<u64, StoreError> {
        self.ledger()
            .meta
            .get(ARCHIVED_BEFORE)?
            .map_or(Ok(0), |v| be_u64(&v))
    }

    /// The chain hash of record `index - 1` (the genesis hash for 0), from the database or,
    /// for the last archived record, from the archive mark.
    pub fn chain_before(&self, index: u64) -> Result<Hash, StoreError> {
        if index == 0 {
            return Ok(ledger::GENESIS);
        }
        if let Some(record) = self.ledger_record(index - 1)? {
            return to_hash(&record.chain_hash);
        }
        if index == self.archived_before()?
            && let Some(chain) = self.ledger().meta.get(ARCHIVED_CHAIN)?
        {
            return to_hash(&chain);
        }
        Err(StoreError::Corrupt(format!(
            "the chain hash before record {index} is neither in the ledger nor at the archive mark"
        )))
    }

    /// Archives the records from the last archive mark up to the newest checkpoint at or below
    /// `up_to` into a file in `dir`, verifies the file, then removes those records (and their
    /// query indexes) from the database.
    pub fn archive_ledger(&self, up_to: u64, dir: &std::path::Path) -> Result<Archive, StoreError> {
        let ledger = self.ledger();
        let from = self.archived_before()?;
        let to = match ledger.checkpoints.range(..=up_to.to_be_bytes()).next_back() {
            Some(item) => be_u64(&item?.0)?,
            None => 0,
        };
        if to <= from {
            return Err(StoreError::Nothing(format!(
                "no signed checkpoint between the archive mark ({from}) and {up_to}: nothing to archive"
            )));
        }
        let io =
            |e: std::io::Error| StoreError::Corrupt(format!("archive in {}: {e}", dir.display()));
        super::create_directory_durably(dir).map_err(io)?;
        let path = dir.join(format!("ledger-{from:012}-{to:012}.jsonl"));
        let staged = path.with_extension("partial");
        let previous = self.chain_before(from)?;
        let public_key = self.ledger_public_key();
        let mut text =
            ledger::export::header_line(&self.inner.hub_code, &public_key, from, &previous);
        text.push('\n');
        let mut checkpoints = self.ledger_checkpoints(from, to)?.into_iter().peekable();
        let mut written_checkpoints = 0;
        let mut leaves = Vec::with_capacity(usize::try_from(to - from).unwrap_or(0));
        for index in from..to {
            let record = self
                .ledger_record(index)?
                .ok_or_else(|| StoreError::Corrupt(format!("ledger record {index} is missing")))?;
            if let Some(receipt) = &record.receipt {
                leaves.push((index, ledger::leaf_hash(index, receipt)));
            }
            text.push_str(&ledger::export::record_line(&record));
            text.push('\n');
            while let Some(checkpoint) = checkpoints.next_if(|c| c.tree_size == index + 1) {
                text.push_str(&ledger::export::checkpoint_json(&checkpoint).to_string());
                text.push('\n');
                written_checkpoints += 1;
            }
        }
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&staged).map_err(io)?;
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&staged, &path).map_err(io)?;
        super::sync_directory(dir).map_err(io)?;
        let written = std::fs::read_to_string(&path).map_err(io)?;
        match ledger::export::verify(&written, &public_key) {
            Ok(verified) if verified.records == to - from => {}
            Ok(verified) => {
                return Err(StoreError::Corrupt(format!(
                    "archive {} holds {} records, not {}",
                    path.display(),
                    verified.records,
                    to - from
                )));
            }
            Err(problem) => {
                return Err(StoreError::Corrupt(format!(
                    "archive {} does not verify: {problem}",
                    path.display()
                )));
            }
        }
        // The leaf hashes of the records about to go, which the Merkle nodes below
        // `LOWEST_STORED_LEVEL` are computed from; then the mark (durably): a crash before the
        // removals leaves records that reads below the mark ignore, and the next archive does
        // not write them again.
        for (index, leaf) in &leaves {
            ledger.nodes.insert(node_key(0, *index), leaf)?;
        }
        let last_chain = self.chain_before(to)?;
        ledger.meta.insert(ARCHIVED_CHAIN, last_chain.to_vec())?;
        ledger.meta.insert(ARCHIVED_BEFORE, &to.to_be_bytes())?;
        self.inner.db.flush()?;
        for index in from..to {
            let Some(record) = self.ledger_record(index)? else {
                continue;
            };
            if let Some(receipt) = &record.receipt {
                let mut key = prefixed(&receipt.agency);
                key.extend_from_slice(&(receipt.at_unix_ms.max(0) as u64).to_be_bytes());
                key.extend_from_slice(&index.to_be_bytes());
                ledger.by_agency.remove(key)?;
                ledger.by_seq.remove(receipt.seq.to_be_bytes())?;
            }
            ledger.records.remove(index.to_be_bytes())?;
        }
        self.inner.db.flush()?;
        Ok(Archive {
            path,
            from,
            to,
            checkpoints: written_checkpoints,
        })
    }

    /// Re-verifies records `[from, to)` still in the database (from the archive mark on): their
    /// chain, and the checkpoints they reach (signature, chain hash, Merkle root).
    pub fn verify_ledger(&self, from: u64, to: u64) -> Result<Verification, StoreError> {
        let to = to.min(self.ledger_size());
        let from = from.max(self.archived_before()?).min(to);
        let mut chain = self.chain_before(from)?;
        let checkpoints = self.ledger_checkpoints(from, to)?;
        let mut checkpoints = checkpoints.iter().peekable();
        let public_key = self.ledger_public_key();
        let mut frontier = Some(Frontier::restore(&self.ledger().stored_nodes(), from)?);
        let mut verification = Verification {
            records_checked: 0,
            checkpoints_checked: 0,
            problem: None,
        };
        for item in self
            .ledger()
            .records
            .range(from.to_be_bytes()..to.to_be_bytes())
        {
            let (key, value) = item?;
            let expected = from + verification.records_checked;
            let checked = verification.clone();
            let fail = |problem: String| {
                Ok(Verification {
                    problem: Some((expected, problem)),
                    ..checked
                })
            };
            let Ok(record) = wire::LedgerRecord::decode(&*value) else {
                return fail("the record is unreadable".into());
            };
            if be_u64(&key)? != expected || record.index != expected {
                return fail(format!(
                    "found record {} where {expected} belongs",
                    record.index
                ));
            }
            let Some(receipt) = &record.receipt else {
                return fail("the record has no receipt".into());
            };
            let leaf = ledger::leaf_hash(expected, receipt);
            chain = ledger::chain_hash(&chain, &leaf);
            if record.chain_hash != chain {
                return fail("its content does not match its chain hash".into());
            }
            if let Some(frontier) = &mut frontier {
                frontier.push(leaf);
            }
            verification.records_checked += 1;
            while let Some(checkpoint) = checkpoints.next_if(|c| c.tree_size == expected + 1) {
                verification.checkpoints_checked += 1;
                if !ledger::checkpoint_signature_valid(checkpoint, &public_key) {
                    return fail(format!(
                        "checkpoint {}: bad signature",
                        checkpoint.tree_size
                    ));
                }
                if checkpoint.chain_hash != chain {
                    return fail(format!(
                        "checkpoint {}: chain differs",
                        checkpoint.tree_size
                    ));
                }
                if let Some(frontier) = &frontier
                    && frontier.root().map(|r| r.to_vec()) != Some(checkpoint.root_hash.clone())
                {
                    return fail(format!(
                        "checkpoint {}: Merkle root differs",
                        checkpoint.tree_size
                    ));
                }
            }
        }
        if from + verification.records_checked < to {
            let missing = from + verification.records_checked;
            verification.problem = Some((missing, "the record is missing".into()));
        }
        Ok(verification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agency::AgencyCode;
    use crate::receipt::ReceiptKind;
    use crate::store::{MessageRef, ReceiptDetail, Settlement};

    async fn write_receipts(store: &Store, from: usize, to: usize) {
        for n in from..to {
            store
                .append_receipt(
                    &format!("doc-{}", n % 3),
                    "000.21.31.H53",
                    ReceiptKind::Accepted,
                    1_000 + n as i64,
                    ReceiptDetail::default(),
                )
                .expect("receipt");
        }
        wait_until_appended(store).await;
    }

    /// Writes an ACCEPTED receipt under a sequence number the test chose.
    fn write_receipt_numbered(store: &Store, seq: u64, document_id: &str) {
        let receipt = store.new_receipt(
            seq,
            document_id,
            "000.21.31.H53",
            ReceiptKind::Accepted,
            2_000,
            ReceiptDetail::default(),
        );
        let inner = &store.inner;
        let result = (&inner.receipts, &inner.receipts_by_document).transaction(
            |(receipts, by_document)| {
                crate::store::insert_receipt(receipts, by_document, &receipt);
                Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
            },
        );
        unwrap_transaction(result).expect("write the receipt");
    }

    fn test_hub() -> AgencyCode {
        "000.00.00.H53".parse().expect("code")
    }

    /// A new store in a directory of its own (kept while the `TempDir` lives).
    fn new_store(policy: CheckpointPolicy) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(dir.path(), &test_hub(), policy, 1 << 20).expect("open");
        (dir, store)
    }

    /// Opens the store again once the dropped one has let go of the database (its background
    /// tasks do when they are next polled).
    async fn reopen(dir: &std::path::Path, policy: CheckpointPolicy) -> Store {
        let hub = test_hub();
        let mut reopened = Store::open_with(dir, &hub, policy, 1 << 20);
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            reopened = Store::open_with(dir, &hub, policy, 1 << 20);
        }
        reopened.expect("reopen")
    }

    /// The store's own appender moves receipts into the ledger.
    async fn wait_until_appended(store: &Store) {
        while store.ledger_has_pending().expect("read the receipts") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn assert_every_proof_verifies(store: &Store, indexes: std::ops::Range<u64>) {
        for index in indexes {
            let (record, proof, checkpoint) = store
                .ledger_proof(index)
                .expect("proof")
                .unwrap_or_else(|| panic!("no proof of record {index}"));
            let leaf = ledger::leaf_hash(index, record.receipt.as_ref().expect("receipt"));
            let root = ledger::root_from_proof(index, checkpoint.tree_size, &leaf, &proof);
            assert_eq!(
                root.map(|r| r.to_vec()),
                Some(checkpoint.root_hash.clone()),
                "the proof of record {index} against checkpoint {}",
                checkpoint.tree_size
            );
        }
    }

    /// Deliveries and settlements recorded a batch at a time leave one receipt per message,
    /// none for a hand-over to the next hub's stream, and all of them reach the ledger.
    #[tokio::test]
    async fn a_batch_of_deliveries_and_settlements_leaves_a_receipt_for_each() {
        let (_dir, store) = new_store(CheckpointPolicy::default());
        let district: AgencyCode = "000.00.31.H53".parse().expect("code");
        let commune: AgencyCode = "000.21.31.H53".parse().expect("code");
        let message = |n: u32, recipient: &AgencyCode| MessageRef {
            message_id: format!("doc-{n}"),
            recipient: recipient.clone(),
            document_id: Some(format!("doc-{n}")),
            waiting_key: Vec::new(),
        };
        let (first, second) = (message(1, &district), message(2, &district));
        // Shown on the district's stream, but for a commune it serves as a hub would.
        let handed_over = message(3, &commune);
        let shown_before = store
            .mark_delivered(&district, &[&first, &second, &handed_over], 1_000)
            .expect("deliveries");
        assert_eq!(shown_before, [false, false, false]);
        let shown_before = store
            .mark_delivered(&district, &[&second], 1_001)
            .expect("a redelivery");
        assert_eq!(shown_before, [true]);
        store
            .mark_settled(
                &[
                    (&first, Settlement::Acknowledged),
                    (
                        &handed_over,
                        Settlement::Forwarded {
                            to_hub: "000.00.31.H53",
                        },
                    ),
                ],
                1_002,
            )
            .expect("settlements");

        let kinds = |document_id: &str| -> Vec<(ReceiptKind, String)> {
            let receipts = store.receipts_of(document_id).expect("receipts");
            receipts
                .iter()
                .map(|r| (r.kind(), r.detail.clone()))
                .collect()
        };
        let delivered = (ReceiptKind::Delivered, String::new());
        let acknowledged = (ReceiptKind::Acknowledged, String::new());
        assert_eq!(kinds("doc-1"), [delivered.clone(), acknowledged]);
        assert_eq!(kinds("doc-2"), [delivered.clone(), delivered]);
        assert_eq!(
            kinds("doc-3"),
            [(ReceiptKind::Forwarded, "000.00.31.H53".to_owned())]
        );
        assert!(
            store
                .is_acknowledged("doc-1", "000.00.31.H53")
                .expect("read")
        );
        assert!(
            !store
                .is_acknowledged("doc-2", "000.00.31.H53")
                .expect("read")
        );
        wait_until_appended(&store).await;
        assert_eq!(store.ledger_size(), 5);
    }

    /// Subtrees under 16 leaves are not stored but computed: proofs still reach the signed
    /// root, before and after an archive that ends inside such a subtree and after a reopen;
    /// queries by document still page through the ledger in order.
    #[tokio::test]
    async fn small_subtrees_are_computed_for_proofs_archives_and_restarts() {
        let policy = CheckpointPolicy {
            every: 1_000,
            interval: Duration::from_secs(3_600),
        };
        let (dir, store) = new_store(policy);
        write_receipts(&store, 0, 13).await;
        store.checkpoint().await.expect("checkpoint at 13");
        write_receipts(&store, 13, 45).await;
        store.checkpoint().await.expect("checkpoint at 45");

        for item in store.ledger().nodes.iter() {
            let (key, _) = item.expect("node");
            assert!(
                u32::from(key[0]) >= LOWEST_STORED_LEVEL,
                "node at level {} stored",
                key[0]
            );
        }
        assert_every_proof_verifies(&store, 0..45);

        let of_doc_1 = ReceiptFilter {
            document_id: Some("doc-1".into()),
            ..ReceiptFilter::default()
        };
        let (first, next) = store.ledger_records(&of_doc_1, None, 10).expect("page 1");
        let (second, last) = store
            .ledger_records(&of_doc_1, next.as_deref(), 10)
            .expect("page 2");
        assert_eq!((first.len(), second.len(), last), (10, 5, None));
        let indexes: Vec<u64> = first.iter().chain(&second).map(|r| r.index).collect();
        assert_eq!(indexes, (1..45).step_by(3).collect::<Vec<u64>>());

        let archive = store
            .archive_ledger(13, &dir.path().join("archive"))
            .expect("archive");
        assert_eq!((archive.from, archive.to), (0, 13));
        assert_every_proof_verifies(&store, 13..45);
        assert_eq!(store.verify_ledger(0, 45).expect("verify").problem, None);
        let (after_archive, _) = store.ledger_records(&of_doc_1, None, 100).expect("query");
        assert_eq!(after_archive.first().map(|r| r.index), Some(13));

        store.durable().await.expect("flush");
        drop(store);
        let store = reopen(dir.path(), policy).await;
        write_receipts(&store, 45, 50).await;
        store.checkpoint().await.expect("checkpoint at 50");
        assert_every_proof_verifies(&store, 13..50);
        let verification = store.verify_ledger(0, 50).expect("verify");
        assert_eq!(
            (verification.problem, verification.records_checked),
            (None, 37)
        );
    }

    /// A receipt whose transaction commits after receipts numbered above it is appended in its
    /// turn: the appender stops below the first sequence number still open.
    #[tokio::test]
    async fn a_receipt_committed_late_is_appended_in_its_turn() {
        let (_dir, store) = new_store(CheckpointPolicy::default());
        let late = store.reserve_receipt_seqs(1).expect("seq");
        for n in 0..20 {
            store
                .append_receipt(
                    &format!("doc-{n}"),
                    "000.21.31.H53",
                    ReceiptKind::Accepted,
                    1_000 + n,
                    ReceiptDetail::default(),
                )
                .expect("receipt");
        }
        // Several appender ticks: the receipts after the open number wait.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            store.ledger_size(),
            0,
            "appended past an open sequence number"
        );

        write_receipt_numbered(&store, late[0], "doc-late");
        drop(late);
        wait_until_appended(&store).await;
        assert_eq!(store.ledger_size(), 21);
        let first = store.ledger_record(0).expect("read").expect("record 0");
        assert_eq!(
            first.receipt.map(|r| r.document_id).as_deref(),
            Some("doc-late")
        );
        store.checkpoint().await.expect("checkpoint");
        assert_eq!(store.verify_ledger(0, 21).expect("verify").problem, None);
    }

    /// A database from before `append_from`: its appended receipts stay appended once, and
    /// the receipts its `ledger_pending` tree names are appended at the next open.
    #[tokio::test]
    async fn a_database_with_a_pending_tree_is_taken_over() {
        let (dir, store) = new_store(CheckpointPolicy::default());
        write_receipts(&store, 0, 5).await;
        // Receipts numbered above every number handed out, as the older hub left them: written,
        // marked pending, not appended (the appender does not look above what it handed out).
        let legacy = store.db().open_tree("ledger_pending").expect("tree");
        for seq in [1_000_000, 1_000_002] {
            write_receipt_numbered(&store, seq, "doc-legacy");
            legacy.insert(seq.to_be_bytes(), &[]).expect("pending mark");
        }
        store
            .ledger()
            .meta
            .remove(APPEND_FROM)
            .expect("as before append_from");
        store.durable().await.expect("flush");
        drop((legacy, store));
        let store = reopen(dir.path(), CheckpointPolicy::default()).await;
        wait_until_appended(&store).await;
        assert_eq!(store.ledger_size(), 7);
        let legacy_records = ReceiptFilter {
            document_id: Some("doc-legacy".into()),
            ..ReceiptFilter::default()
        };
        let (records, _) = store
            .ledger_records(&legacy_records, None, 10)
            .expect("query");
        let indexes: Vec<u64> = records.iter().map(|r| r.index).collect();
        assert_eq!(indexes, vec![5, 6]);
        store.checkpoint().await.expect("checkpoint");
        assert_eq!(store.verify_ledger(0, 7).expect("verify").problem, None);
    }

    /// Archiving every record leaves the ledger's size, chain and frontier to a reopened hub.
    #[tokio::test]
    async fn a_ledger_archived_to_its_end_continues_after_a_reopen() {
        let policy = CheckpointPolicy::default();
        let (dir, store) = new_store(policy);
        write_receipts(&store, 0, 10).await;
        store.checkpoint().await.expect("checkpoint at 10");
        store
            .archive_ledger(10, &dir.path().join("archive"))
            .expect("archive");
        store.durable().await.expect("flush");
        drop(store);
        let store = reopen(dir.path(), policy).await;
        assert_eq!(store.ledger_size(), 10);
        write_receipts(&store, 10, 13).await;
        assert_eq!(store.ledger_size(), 13);
        store.checkpoint().await.expect("checkpoint at 13");
        assert_every_proof_verifies(&store, 10..13);
        assert_eq!(store.verify_ledger(0, 13).expect("verify").problem, None);
    }
}
