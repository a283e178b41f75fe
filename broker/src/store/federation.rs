//! What a hub stores for other hubs: documents, status reports and receipts handed over by
//! `Forward`, each taken once, and the receipts it sends back towards remote senders.
//!
//! Trees: `arrivals` (`from hub 0x00 message id 0x00 recipient` → ()) remembers every status
//! report and receipt taken from another hub, and (`0x01 document id 0x00 recipient` → ())
//! every forwarded document, so that a redelivery by that hub is taken once;
//! `relay` holds the relay's cursor (`cursor` → the next ledger index to look at, u64 BE).

use super::{
    Acceptance, ReceiptDetail, Store, StoreError, corrupt, document_entry, insert_receipt,
    outbox_key, stored_document, unwrap_transaction, waiting_key,
};
use crate::agency::AgencyCode;
use crate::document::Document;
use crate::receipt::ReceiptKind;
use lienthong_proto::v1 as wire;
use prost::Message;
use sled::Transactional;

const RELAY_CURSOR: &[u8] = b"cursor";

/// The key that identifies a message handed over by another hub.
pub fn arrival_key(from_hub: &AgencyCode, message_id: &str, recipient: &AgencyCode) -> Vec<u8> {
    let mut key = Vec::with_capacity(from_hub.as_str().len() + message_id.len() + 16);
    key.extend_from_slice(from_hub.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(message_id.as_bytes());
    key.push(0);
    key.extend_from_slice(recipient.as_str().as_bytes());
    key
}

/// The key that marks a forwarded document taken for one recipient, whichever hub handed it
/// over (hub codes never start with byte 1).
fn custody_key(document_id: &str, recipient: &AgencyCode) -> Vec<u8> {
    let mut key = vec![1];
    key.extend_from_slice(document_id.as_bytes());
    key.push(0);
    key.extend_from_slice(recipient.as_str().as_bytes());
    key
}

impl Store {
    /// Takes custody of a document another hub forwards for one of its recipients: records the
    /// document (once, whichever recipient comes first), queues it for `recipient` and writes
    /// its ACCEPTED receipt. A second hand-over for the same recipient changes nothing and
    /// answers `AlreadyAccepted`; other content under the same id is a `Conflict`.
    pub fn accept_forwarded(
        &self,
        document: &Document,
        recipient: &AgencyCode,
        traceparent: &str,
        now_unix_ms: i64,
    ) -> Result<Acceptance, StoreError> {
        let inner = &*self.inner;
        let stored = stored_document(document, now_unix_ms);
        let body = document.wire.encode_to_vec();
        let receipt_seqs = self.reserve_receipt_seqs(1)?;
        let accepted = self.new_receipt(
            receipt_seqs[0],
            &document.id,
            recipient.as_str(),
            ReceiptKind::Accepted,
            now_unix_ms,
            ReceiptDetail::default(),
        );
        let entry = document_entry(document, recipient, traceparent, now_unix_ms);
        let entry_key = outbox_key(document.urgency.value(), inner.db.generate_id()?);
        let waiting = waiting_key(
            recipient.as_str(),
            document.urgency.value(),
            now_unix_ms,
            &document.id,
        );
        let custody = custody_key(&document.id, recipient);

        let result =
            (
                &inner.documents,
                &inner.document_bodies,
                &inner.outbox_refs,
                &inner.outbox,
                &inner.receipts,
                &inner.receipts_by_document,
                &inner.waiting,
                &inner.arrivals,
            )
                .transaction(
                    |(
                        documents,
                        bodies,
                        refs,
                        outbox,
                        receipts,
                        by_document,
                        waiting_tree,
                        arrivals,
                    )| {
                        match documents.get(document.id.as_bytes())? {
                            Some(existing) => {
                                let existing =
                                    wire::StoredDocument::decode(&*existing).map_err(|e| {
                                        sled::transaction::ConflictableTransactionError::Abort(
                                            corrupt("documents")(e),
                                        )
                                    })?;
                                if existing.content_sha256 != stored.content_sha256 {
                                    return Ok(Some(false));
                                }
                            }
                            None => {
                                documents.set(document.id.as_bytes(), stored.encode_to_vec());
                            }
                        }
                        // Taken for this recipient before: nothing to do.
                        if arrivals.insert(custody.as_slice(), &[])?.is_some() {
                            return Ok(Some(true));
                        }
                        let references = refs
                            .get(document.id.as_bytes())?
                            .and_then(|v| <[u8; 4]>::try_from(&*v).ok())
                            .map_or(0, u32::from_be_bytes);
                        if references == 0 {
                            bodies.set(document.id.as_bytes(), body.as_slice());
                        }
                        refs.set(document.id.as_bytes(), &(references + 1).to_be_bytes());
                        outbox.set(&entry_key, entry.as_slice());
                        waiting_tree.set(waiting.as_slice(), &[]);
                        insert_receipt(receipts, by_document, &accepted);
                        Ok(None)
                    },
                );
        match unwrap_transaction(result)? {
            Some(false) => Ok(Acceptance::Conflict),
            Some(true) => {
                let accepted = self
                    .receipts_of(&document.id)?
                    .into_iter()
                    .filter(|r| r.kind() == ReceiptKind::Accepted && r.agency == recipient.as_str())
                    .collect();
                Ok(Acceptance::AlreadyAccepted(accepted))
            }
            None => {
                inner.outbox_len.raise(1);
                Ok(Acceptance::Accepted(vec![accepted]))
            }
        }
    }

    /// Keeps a receipt another hub wrote about one of this hub's documents (it travels back
    /// towards the sender): a new entry in this hub's receipt log, with the writer's hub, kind,
    /// time and detail. Returns false when this hand-over was taken before.
    pub fn accept_relayed_receipt(
        &self,
        arrival: &[u8],
        receipt: &wire::Receipt,
    ) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let receipt_seqs = self.reserve_receipt_seqs(1)?;
        let kept = wire::Receipt {
            seq: receipt_seqs[0],
            ..receipt.clone()
        };
        let result = (
            &inner.arrivals,
            &inner.receipts,
            &inner.receipts_by_document,
        )
            .transaction(|(arrivals, receipts, by_document)| {
                if arrivals.insert(arrival, &[])?.is_some() {
                    return Ok(false);
                }
                insert_receipt(receipts, by_document, &kept);
                Ok(true)
            });
        unwrap_transaction(result)
    }

    /// Where the relay stopped: the next ledger index it has to look at.
    pub fn relay_cursor(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .relay
            .get(RELAY_CURSOR)?
            .and_then(|v| <[u8; 8]>::try_from(&*v).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Queues receipts for their way back to remote senders (`(sender, receipt)`), and moves
    /// the relay's cursor to `next_cursor`, atomically: a crash leaves both or neither.
    pub fn queue_relayed_receipts(
        &self,
        relays: &[(String, wire::Receipt)],
        next_cursor: u64,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let mut entries = Vec::with_capacity(relays.len());
        for (sender, receipt) in relays {
            entries.push(self.urgent_entry(
                &format!("receipt/{}/{}", inner.hub_code, receipt.seq),
                sender,
                wire::outbox_entry::Payload::Receipt(receipt.clone()),
                now_unix_ms,
            )?);
        }
        let result = (&inner.outbox, &inner.relay).transaction(|(outbox, relay)| {
            for (key, entry) in &entries {
                outbox.set(key, entry.as_slice());
            }
            relay.set(RELAY_CURSOR, &next_cursor.to_be_bytes());
            Ok(())
        });
        unwrap_transaction(result)?;
        inner.outbox_len.raise(entries.len() as u64);
        Ok(())
    }
}
