//! The receipt ledger's cryptography, shared by the hub and by offline verification: canonical
//! encodings, the hash chain, the Merkle tree (RFC 6962 / Certificate Transparency hashing),
//! inclusion proofs, Ed25519-signed checkpoints, and the verification of an exported ledger.
//!
//! - A record is a receipt at a ledger index (0, 1, 2… with no gaps, in the order the hub
//!   appended them). Its leaf hash is `SHA-256(0x00 ‖ index ‖ canonical receipt)`.
//! - The chain hash of record `i` is `SHA-256("chain" ‖ chain(i-1) ‖ leaf(i))`, with 32 zero bytes
//!   before record 0: changing, removing, reordering or inserting a record changes every chain
//!   hash after it.
//! - The Merkle root of the first `n` leaves is RFC 6962's Merkle Tree Hash (interior nodes
//!   `SHA-256(0x01 ‖ left ‖ right)`), so one record can be proven to be in the ledger with
//!   `log2(n)` hashes, without the others.
//! - A checkpoint signs (hub, size, root, chain hash of the last record, time) with the hub's
//!   Ed25519 key.

use lienthong_proto::v1 as wire;
use ring::signature::{self, KeyPair};
use sha2::{Digest, Sha256};
use std::path::Path;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The chain hash before the first record.
pub const GENESIS: Hash = [0; 32];

/// The canonical encoding of a receipt: every field, in a fixed order, numbers big-endian and
/// strings length-prefixed, so that it is the same in any implementation.
pub fn canonical_receipt(receipt: &wire::Receipt) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + receipt.detail.len());
    out.extend_from_slice(b"lienthong-receipt-v1");
    out.extend_from_slice(&receipt.seq.to_be_bytes());
    out.extend_from_slice(&receipt.kind.to_be_bytes());
    out.extend_from_slice(&receipt.at_unix_ms.to_be_bytes());
    for text in [
        &receipt.document_id,
        &receipt.agency,
        &receipt.hub,
        &receipt.status_code,
        &receipt.detail,
        &receipt.reported_by,
    ] {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out
}

/// The Merkle leaf hash of the record at `index`.
pub fn leaf_hash(index: u64, receipt: &wire::Receipt) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(index.to_be_bytes());
    hasher.update(canonical_receipt(receipt));
    hasher.finalize().into()
}

/// The chain hash of a record from the previous record's chain hash and its leaf hash.
pub fn chain_hash(previous: &Hash, leaf: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(b"chain");
    hasher.update(previous);
    hasher.update(leaf);
    hasher.finalize().into()
}

/// An interior Merkle node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The largest power of two smaller than `n` (n ≥ 2), RFC 6962's split point.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// Where the hashes of complete subtrees come from: `node(level, index)` is the root of leaves
/// `[index·2^level, (index+1)·2^level)`. The hub reads them from its store; verification of an
/// exported file computes them from the leaves it read.
pub trait Nodes {
    type Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// The Merkle Tree Hash of leaves `[start, end)`, from complete subtrees.
pub fn subtree_root<N: Nodes>(nodes: &N, start: u64, end: u64) -> Result<Hash, N::Error> {
    let n = end - start;
    if n.is_power_of_two() && start.is_multiple_of(n) {
        return nodes.node(n.trailing_zeros(), start >> n.trailing_zeros());
    }
    let k = split(n);
    Ok(node_hash(
        &subtree_root(nodes, start, start + k)?,
        &subtree_root(nodes, start + k, end)?,
    ))
}

/// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962 §2.1.1),
/// from the leaf's sibling upwards.
pub fn inclusion_proof<N: Nodes>(nodes: &N, index: u64, size: u64) -> Result<Vec<Hash>, N::Error> {
    fn path<N: Nodes>(
        nodes: &N,
        index: u64,
        start: u64,
        end: u64,
        out: &mut Vec<Hash>,
    ) -> Result<(), N::Error> {
        let n = end - start;
        if n <= 1 {
            return Ok(());
        }
        let k = split(n);
        if index - start < k {
            path(nodes, index, start, start + k, out)?;
            out.push(subtree_root(nodes, start + k, end)?);
        } else {
            path(nodes, index, start + k, end, out)?;
            out.push(subtree_root(nodes, start, start + k)?);
        }
        Ok(())
    }
    let mut out = Vec::new();
    path(nodes, index, 0, size, &mut out)?;
    Ok(out)
}

/// The root an audit path leads to from `leaf` at `index` in a tree of `size` leaves
/// (RFC 9162 §2.1.3.2); `None` when the path has the wrong length.
pub fn root_from_proof(index: u64, size: u64, leaf: &Hash, proof: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut root = *leaf;
    for sibling in proof {
        if sn == 0 {
            return None;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            root = node_hash(sibling, &root);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            root = node_hash(&root, sibling);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(root)
}

/// The bytes a checkpoint's signature covers.
pub fn checkpoint_message(checkpoint: &wire::Checkpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"lienthong-checkpoint-v1");
    out.extend_from_slice(&(checkpoint.hub.len() as u32).to_be_bytes());
    out.extend_from_slice(checkpoint.hub.as_bytes());
    out.extend_from_slice(&checkpoint.tree_size.to_be_bytes());
    out.extend_from_slice(&checkpoint.root_hash);
    out.extend_from_slice(&checkpoint.chain_hash);
    out.extend_from_slice(&checkpoint.at_unix_ms.to_be_bytes());
    out
}

/// Whether `checkpoint` carries a valid signature by `public_key` (raw 32-byte Ed25519).
pub fn checkpoint_signature_valid(checkpoint: &wire::Checkpoint, public_key: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&checkpoint_message(checkpoint), &checkpoint.signature)
        .is_ok()
}

/// The hub's Ed25519 signing key, kept (PKCS#8) in its data directory.
#[derive(Debug)]
pub struct SigningKey {
    pair: signature::Ed25519KeyPair,
}

/// The file holding the signing key, in the data directory.
pub const SIGNING_KEY_FILE: &str = "ledger-signing-key.pk8";

impl SigningKey {
    /// Loads the key from `data_dir`, making it on first start (file mode 0600).
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<SigningKey> {
        let path = data_dir.join(SIGNING_KEY_FILE);
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let generated =
                    signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                        .map_err(|_| std::io::Error::other("cannot generate an Ed25519 key"))?;
                write_private(&path, generated.as_ref())?;
                generated.as_ref().to_vec()
            }
            Err(error) => return Err(error),
        };
        let pair = signature::Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| {
            std::io::Error::other(format!("{} is not an Ed25519 key: {e}", path.display()))
        })?;
        Ok(SigningKey { pair })
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs a checkpoint in place.
    pub fn sign(&self, checkpoint: &mut wire::Checkpoint) {
        checkpoint.signature = self
            .pair
            .sign(&checkpoint_message(checkpoint))
            .as_ref()
            .to_vec();
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let staged = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&staged, path)?;
    // The new name is durable once its directory is synced: a key lost to a power cut would be
    // replaced by another at the next start, and checkpoints signed before would no longer
    // verify against the hub's key.
    path.parent().map_or(Ok(()), crate::store::sync_directory)
}

/// The right edge of a Merkle tree being built: the roots of its perfect subtrees, left to
/// right, so that appending a leaf and computing the root cost O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    subtrees: Vec<Hash>,
}

/// A complete subtree made by an append: `(level, index, hash)`, as [`Nodes::node`] names it.
pub type CompletedNode = (u32, u64, Hash);

impl Frontier {
    /// The frontier of a tree of `size` leaves, from its complete subtrees.
    pub fn restore<N: Nodes>(nodes: &N, size: u64) -> Result<Frontier, N::Error> {
        let mut subtrees = Vec::new();
        let mut start = 0u64;
        for level in (0..64u32).rev() {
            if size & (1 << level) != 0 {
                subtrees.push(nodes.node(level, start >> level)?);
                start += 1 << level;
            }
        }
        Ok(Frontier { size, subtrees })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf; returns the complete subtrees it made (the leaf itself first).
    pub fn push(&mut self, leaf: Hash) -> Vec<CompletedNode> {
        let mut index = self.size;
        let mut level = 0;
        let mut hash = leaf;
        let mut completed = vec![(0, index, leaf)];
        while index & 1 == 1 {
            let left = self
                .subtrees
                .pop()
                .expect("a left sibling for every odd index");
            hash = node_hash(&left, &hash);
            level += 1;
            index >>= 1;
            completed.push((level, index, hash));
        }
        self.subtrees.push(hash);
        self.size += 1;
        completed
    }

    /// The Merkle Tree Hash of every leaf so far; `None` for an empty tree.
    pub fn root(&self) -> Option<Hash> {
        let mut subtrees = self.subtrees.iter().rev();
        let mut root = *subtrees.next()?;
        for left in subtrees {
            root = node_hash(left, &root);
        }
        Some(root)
    }
}

/// Complete subtrees computed from leaves held in memory (for verifying an export from 0).
#[derive(Debug)]
pub struct MemoryNodes<'a> {
    pub leaves: &'a [Hash],
}

impl Nodes for MemoryNodes<'_> {
    type Error = std::convert::Infallible;

    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        let width = 1u64 << level;
        let start = index * width;
        if level == 0 {
            return Ok(self.leaves[start as usize]);
        }
        let half = width / 2;
        Ok(node_hash(
            &self.node(level - 1, start / half)?,
            &self.node(level - 1, start / half + 1)?,
        ))
    }
}

/// One line of an exported ledger (JSON lines): a header, then records in index order with the
/// checkpoints they reach right after the record that completes them.
pub mod export {
    use super::*;
    use serde_json::{Value, json};

    pub fn header_line(hub: &str, public_key: &[u8], from: u64, previous_chain: &Hash) -> String {
        json!({
            "type": "header",
            "hub": hub,
            "public_key": hex::encode(public_key),
            "from": from,
            "previous_chain_hash": hex::encode(previous_chain),
        })
        .to_string()
    }

    pub fn receipt_json(receipt: &wire::Receipt) -> Value {
        json!({
            "seq": receipt.seq,
            "document_id": receipt.document_id,
            "agency": receipt.agency,
            "kind": receipt.kind().as_str_name(),
            "at_unix_ms": receipt.at_unix_ms,
            "hub": receipt.hub,
            "status_code": receipt.status_code,
            "detail": receipt.detail,
            "reported_by": receipt.reported_by,
        })
    }

    pub fn record_line(record: &wire::LedgerRecord) -> String {
        json!({
            "type": "record",
            "index": record.index,
            "chain_hash": hex::encode(&record.chain_hash),
            "receipt": record.receipt.as_ref().map(receipt_json),
        })
        .to_string()
    }

    pub fn checkpoint_json(checkpoint: &wire::Checkpoint) -> Value {
        json!({
            "type": "checkpoint",
            "hub": checkpoint.hub,
            "tree_size": checkpoint.tree_size,
            "root_hash": hex::encode(&checkpoint.root_hash),
            "chain_hash": hex::encode(&checkpoint.chain_hash),
            "at_unix_ms": checkpoint.at_unix_ms,
            "signature": hex::encode(&checkpoint.signature),
        })
    }

    fn text(value: &Value, key: &str) -> Result<String, String> {
        value[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{key}` is missing or not text"))
    }

    fn number(value: &Value, key: &str) -> Result<u64, String> {
        value[key]
            .as_u64()
            .ok_or_else(|| format!("`{key}` is missing or not a number"))
    }

    fn bytes(value: &Value, key: &str) -> Result<Vec<u8>, String> {
        hex::decode(text(value, key)?).map_err(|_| format!("`{key}` is not hex"))
    }

    pub fn parse_receipt(value: &Value) -> Result<wire::Receipt, String> {
        let kind = text(value, "kind")?;
        Ok(wire::Receipt {
            seq: number(value, "seq")?,
            document_id: text(value, "document_id")?,
            agency: text(value, "agency")?,
            kind: wire::ReceiptKind::from_str_name(&kind)
                .ok_or_else(|| format!("`kind` {kind} is not a receipt kind"))?
                as i32,
            at_unix_ms: value["at_unix_ms"]
                .as_i64()
                .ok_or("`at_unix_ms` is missing or not a number")?,
            hub: text(value, "hub")?,
            status_code: text(value, "status_code")?,
            detail: text(value, "detail")?,
            reported_by: text(value, "reported_by")?,
        })
    }

    pub fn parse_checkpoint(value: &Value) -> Result<wire::Checkpoint, String> {
        Ok(wire::Checkpoint {
            hub: text(value, "hub")?,
            tree_size: number(value, "tree_size")?,
            root_hash: bytes(value, "root_hash")?,
            chain_hash: bytes(value, "chain_hash")?,
            at_unix_ms: value["at_unix_ms"]
                .as_i64()
                .ok_or("`at_unix_ms` is missing or not a number")?,
            signature: bytes(value, "signature")?,
        })
    }

    /// What a successful verification covered.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Verified {
        pub records: u64,
        pub checkpoints: u64,
        /// Whether checkpoint roots were recomputed (only possible from record 0).
        pub roots_checked: bool,
    }

    /// The first thing wrong with an export: its line (1-based) and, for records, the ledger
    /// index expected there.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Problem {
        pub line: usize,
        pub index: Option<u64>,
        pub message: String,
    }

    impl std::fmt::Display for Problem {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.index {
                Some(index) => write!(f, "line {}, record {index}: {}", self.line, self.message),
                None => write!(f, "line {}: {}", self.line, self.message),
            }
        }
    }

    /// Verifies an exported ledger with nothing but its text and the hub's public key: every
    /// record's chain hash, their order, and every checkpoint's signature, chain hash and (when
    /// the export starts at record 0) Merkle root.
    pub fn verify(text: &str, public_key: &[u8]) -> Result<Verified, Problem> {
        let mut lines = text.lines().enumerate().map(|(n, line)| (n + 1, line));
        let problem = |line: usize, index: Option<u64>, message: String| Problem {
            line,
            index,
            message,
        };
        let (_, first) = lines
            .next()
            .ok_or_else(|| problem(1, None, "the file is empty".into()))?;
        let header: Value = serde_json::from_str(first)
            .map_err(|e| problem(1, None, format!("unreadable header: {e}")))?;
        if header["type"] != "header" {
            return Err(problem(1, None, "the first line is not the header".into()));
        }
        let from = number(&header, "from").map_err(|e| problem(1, None, e))?;
        let mut chain = Hash::try_from(
            bytes(&header, "previous_chain_hash")
                .map_err(|e| problem(1, None, e))?
                .as_slice(),
        )
        .map_err(|_| problem(1, None, "previous_chain_hash is not 32 bytes".into()))?;
        if from == 0 && chain != GENESIS {
            return Err(problem(
                1,
                None,
                "an export from record 0 must start from the zero chain hash".into(),
            ));
        }
        let mut frontier = (from == 0).then(Frontier::default);
        let mut expected = from;
        let mut checkpoints = 0;
        for (line, text) in lines {
            if text.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(text)
                .map_err(|e| problem(line, Some(expected), format!("unreadable line: {e}")))?;
            match value["type"].as_str() {
                Some("record") => {
                    let index =
                        number(&value, "index").map_err(|e| problem(line, Some(expected), e))?;
                    if index != expected {
                        return Err(problem(
                            line,
                            Some(expected),
                            format!(
                                "found record {index} where record {expected} belongs (records removed, reordered or inserted)"
                            ),
                        ));
                    }
                    let receipt = parse_receipt(&value["receipt"]).map_err(|e| {
                        problem(line, Some(expected), format!("unreadable receipt: {e}"))
                    })?;
                    let leaf = leaf_hash(index, &receipt);
                    chain = chain_hash(&chain, &leaf);
                    let stated = bytes(&value, "chain_hash")
                        .map_err(|e| problem(line, Some(expected), e))?;
                    if stated != chain {
                        return Err(problem(
                            line,
                            Some(expected),
                            "the record was changed: its content does not match its chain hash"
                                .into(),
                        ));
                    }
                    if let Some(frontier) = &mut frontier {
                        frontier.push(leaf);
                    }
                    expected += 1;
                }
                Some("checkpoint") => {
                    let checkpoint = parse_checkpoint(&value)
                        .map_err(|e| problem(line, None, format!("unreadable checkpoint: {e}")))?;
                    let size = checkpoint.tree_size;
                    if !checkpoint_signature_valid(&checkpoint, public_key) {
                        return Err(problem(
                            line,
                            None,
                            format!(
                                "checkpoint {size}: the signature does not verify with the public key (forged or altered)"
                            ),
                        ));
                    }
                    if size > expected {
                        return Err(problem(
                            line,
                            Some(expected),
                            format!(
                                "missing: checkpoint {size} follows, so records {expected}..{} were removed",
                                size - 1
                            ),
                        ));
                    }
                    if size < expected {
                        return Err(problem(
                            line,
                            Some(size),
                            format!(
                                "checkpoint {size} stands after record {} (records inserted before it)",
                                expected - 1
                            ),
                        ));
                    }
                    if checkpoint.chain_hash != chain {
                        return Err(problem(
                            line,
                            None,
                            format!(
                                "checkpoint {size}: the records before it differ from those it signed (chain hash)"
                            ),
                        ));
                    }
                    if let Some(frontier) = &frontier
                        && frontier.root().map(|r| r.to_vec()) != Some(checkpoint.root_hash.clone())
                    {
                        return Err(problem(
                            line,
                            None,
                            format!(
                                "checkpoint {size}: the records before it differ from those it signed (Merkle root)"
                            ),
                        ));
                    }
                    checkpoints += 1;
                }
                _ => {
                    return Err(problem(
                        line,
                        Some(expected),
                        "neither a record nor a checkpoint".into(),
                    ));
                }
            }
        }
        Ok(Verified {
            records: expected - from,
            checkpoints,
            roots_checked: frontier.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(seq: u64) -> wire::Receipt {
        wire::Receipt {
            seq,
            document_id: format!("doc-{seq}"),
            agency: "000.21.31.H53".into(),
            kind: 1,
            at_unix_ms: 1_795_000_000_000 + seq as i64,
            hub: "000.00.00.H53".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_wrong_one_does_not() {
        for size in 1..=33u64 {
            let leaves: Vec<Hash> = (0..size).map(|i| leaf_hash(i, &receipt(i))).collect();
            let nodes = MemoryNodes { leaves: &leaves };
            let root = subtree_root(&nodes, 0, size).expect("root");
            for index in 0..size {
                let proof = inclusion_proof(&nodes, index, size).expect("proof");
                assert_eq!(
                    root_from_proof(index, size, &leaves[index as usize], &proof),
                    Some(root),
                    "leaf {index} of {size}"
                );
                let other = leaf_hash(index, &receipt(index + 1000));
                assert_ne!(
                    root_from_proof(index, size, &other, &proof),
                    Some(root),
                    "a different receipt at {index} of {size}"
                );
                if size > 1 {
                    let wrong_index = (index + 1) % size;
                    assert_ne!(
                        root_from_proof(wrong_index, size, &leaves[index as usize], &proof),
                        Some(root),
                        "leaf {index} claimed at {wrong_index} of {size}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_frontier_agrees_with_the_recursive_definition() {
        let leaves: Vec<Hash> = (0..70).map(|i| leaf_hash(i, &receipt(i))).collect();
        let mut frontier = Frontier::default();
        for (n, leaf) in leaves.iter().enumerate() {
            let completed = frontier.push(*leaf);
            let nodes = MemoryNodes {
                leaves: &leaves[..=n],
            };
            for (level, index, hash) in completed {
                assert_eq!(nodes.node(level, index).expect("node"), hash);
            }
            let size = n as u64 + 1;
            assert_eq!(
                frontier.root(),
                Some(subtree_root(&nodes, 0, size).expect("root"))
            );
            assert_eq!(
                Frontier::restore(&nodes, size).expect("restore"),
                frontier,
                "restored at {size}"
            );
        }
    }

    #[test]
    fn the_root_of_two_leaves_is_rfc_6962s() {
        let leaves = [leaf_hash(0, &receipt(0)), leaf_hash(1, &receipt(1))];
        let nodes = MemoryNodes { leaves: &leaves };
        assert_eq!(
            subtree_root(&nodes, 0, 2).expect("root"),
            node_hash(&leaves[0], &leaves[1])
        );
        assert_eq!(subtree_root(&nodes, 0, 1).expect("root"), leaves[0]);
    }

    #[test]
    fn a_checkpoint_signature_covers_every_field() {
        let dir = tempfile::tempdir().expect("dir");
        let key = SigningKey::load_or_create(dir.path()).expect("key");
        let again = SigningKey::load_or_create(dir.path()).expect("same key");
        assert_eq!(key.public_key(), again.public_key());
        let mut checkpoint = wire::Checkpoint {
            hub: "000.00.00.H53".into(),
            tree_size: 10,
            root_hash: vec![7; 32],
            chain_hash: vec![9; 32],
            at_unix_ms: 5,
            signature: Vec::new(),
        };
        key.sign(&mut checkpoint);
        assert!(checkpoint_signature_valid(&checkpoint, &key.public_key()));
        let mut altered = checkpoint.clone();
        altered.tree_size = 11;
        assert!(!checkpoint_signature_valid(&altered, &key.public_key()));
        let other = SigningKey::load_or_create(tempfile::tempdir().expect("dir").path())
            .expect("another key");
        assert!(!checkpoint_signature_valid(
            &checkpoint,
            &other.public_key()
        ));
    }
}
