//! Receipts: the record of every state change of a document for one recipient, and the
//! delivery state a recipient's receipts add up to.
//!
//! Receipts are written by the store and read back in their record form, `wire::Receipt`,
//! which is also what callers and auditors are shown.

use lienthong_proto::v1 as wire;

pub use wire::{DeliveryState, ReceiptKind};

/// A receipt kind as people read it: `ACCEPTED`, `DEAD_LETTERED`… (the enum name without its
/// `RECEIPT_KIND_` prefix).
pub fn kind_name(receipt: &wire::Receipt) -> &'static str {
    receipt
        .kind()
        .as_str_name()
        .trim_start_matches("RECEIPT_KIND_")
}

/// The delivery state a recipient's receipts (in sequence order) add up to.
///
/// Acknowledged is final; dead-lettered lasts until an operator replays the message; a
/// rejection is superseded by a later delivery.
pub fn delivery_state<'a>(receipts: impl IntoIterator<Item = &'a wire::Receipt>) -> DeliveryState {
    let mut state = DeliveryState::Pending;
    for receipt in receipts {
        if state == DeliveryState::Acknowledged {
            break;
        }
        if state == DeliveryState::DeadLettered && receipt.kind() != ReceiptKind::Replayed {
            continue;
        }
        state = match receipt.kind() {
            ReceiptKind::Replayed => DeliveryState::Pending,
            ReceiptKind::Delivered => DeliveryState::Delivered,
            ReceiptKind::Acknowledged => DeliveryState::Acknowledged,
            ReceiptKind::Rejected => DeliveryState::Rejected,
            ReceiptKind::DeadLettered => DeliveryState::DeadLettered,
            ReceiptKind::Accepted
            | ReceiptKind::Enqueued
            | ReceiptKind::Forwarded
            | ReceiptKind::StatusReported
            | ReceiptKind::Unspecified => state,
        };
    }
    state
}

/// The status reports among a recipient's receipts, as callers see them.
pub fn status_reports<'a>(
    document_id: &str,
    receipts: impl IntoIterator<Item = &'a wire::Receipt>,
) -> Vec<wire::StatusReport> {
    receipts
        .into_iter()
        .filter(|r| r.kind() == ReceiptKind::StatusReported)
        .map(|r| wire::StatusReport {
            document_id: document_id.to_owned(),
            status_code: r.status_code.clone(),
            description: r.detail.clone(),
            from: r.reported_by.clone(),
            at_unix_ms: r.at_unix_ms,
            staff: String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(kind: ReceiptKind) -> wire::Receipt {
        wire::Receipt {
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn states_follow_the_receipts() {
        use ReceiptKind::*;
        let cases = [
            (vec![], DeliveryState::Pending),
            (vec![Accepted, Enqueued], DeliveryState::Pending),
            (
                vec![Accepted, Enqueued, Delivered],
                DeliveryState::Delivered,
            ),
            (vec![Accepted, Delivered, Rejected], DeliveryState::Rejected),
            (
                vec![Accepted, Delivered, Rejected, Delivered],
                DeliveryState::Delivered,
            ),
            (
                vec![Accepted, Delivered, Acknowledged, StatusReported],
                DeliveryState::Acknowledged,
            ),
            (
                vec![Accepted, Delivered, Acknowledged, Delivered],
                DeliveryState::Acknowledged,
            ),
            (
                vec![Delivered, Rejected, DeadLettered, Delivered],
                DeliveryState::DeadLettered,
            ),
        ];
        for (kinds, expected) in cases {
            let receipts: Vec<_> = kinds.iter().map(|k| receipt(*k)).collect();
            assert_eq!(delivery_state(&receipts), expected, "{kinds:?}");
        }
    }
}
