//! Fuzzes the conversion of a received `Document` (protobuf bytes) into the hub's domain type:
//! decoding and `Document::from_wire` must refuse bad input with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lienthong::document::{Document, DocumentLimits};
use lienthong_proto::v1 as wire;
use prost::Message;

const LIMITS: DocumentLimits = DocumentLimits {
    max_document_bytes: 64 * 1024,
    max_recipients: 16,
    max_attachments: 8,
    max_attachment_bytes: 16 * 1024,
    max_field_bytes: 256,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(document) = wire::Document::decode(data) {
        let _ = Document::from_wire(document, LIMITS, 1_795_000_000_000);
    }
});
