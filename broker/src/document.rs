//! Documents as the hub sees them: the wire message checked once at the edge, with the fields
//! that drive routing and custody lifted into domain types.
//!
//! The hub carries a document's content (subject, body, attachments, edXML header fields)
//! verbatim and never interprets it, so that content stays in its wire form; only what the hub
//! decides on (sender, recipients, urgency, identity, size) is validated and typed here.

use crate::agency::AgencyCode;
use crate::error::HubError;
use lienthong_proto::v1 as wire;
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

/// Longest document id accepted, in bytes.
pub const MAX_DOCUMENT_ID_BYTES: usize = 256;

/// Urgency (edXML `OtherInfo/Priority`), 0 normal to 4 timed express.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Urgency(u8);

impl Urgency {
    pub const NORMAL: Urgency = Urgency(0);
    pub const HIGHEST: Urgency = Urgency(4);

    pub fn new(priority: u32) -> Option<Urgency> {
        (priority <= 4).then_some(Urgency(priority as u8))
    }

    pub const fn value(self) -> u8 {
        self.0
    }
}

/// A document that passed validation and is ready for custody.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    pub from: AgencyCode,
    /// Recipients in the order given, without duplicates.
    pub to: Vec<AgencyCode>,
    pub urgency: Urgency,
    /// SHA-256 of the canonical encoding: equal for a resend of the same document.
    pub content_sha256: [u8; 32],
    /// The document as it travels, with `document_id` filled in.
    pub wire: wire::Document,
}

/// Limits a document is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    pub max_document_bytes: usize,
    pub max_recipients: usize,
    pub max_attachments: usize,
    pub max_attachment_bytes: usize,
    pub max_field_bytes: usize,
}

impl Document {
    /// Validates a wire document. `now_unix_ms` dates a generated document id.
    pub fn from_wire(
        mut wire: wire::Document,
        limits: DocumentLimits,
        now_unix_ms: i64,
    ) -> Result<Document, HubError> {
        let from: AgencyCode = wire
            .from
            .parse()
            .map_err(|e| HubError::invalid("document.from", format!("{e}")))?;
        if wire.to.is_empty() {
            return Err(HubError::invalid(
                "document.to",
                "at least one recipient is required",
            ));
        }
        if wire.to.len() > limits.max_recipients {
            return Err(HubError::ResourceExhausted(format!(
                "document.to: {} recipients exceed the limit of {} (limits.max_recipients)",
                wire.to.len(),
                limits.max_recipients
            )));
        }
        let mut to = Vec::with_capacity(wire.to.len());
        let mut seen = BTreeSet::new();
        for (index, recipient) in wire.to.iter().enumerate() {
            let code: AgencyCode = recipient
                .parse()
                .map_err(|e| HubError::invalid(format!("document.to[{index}]"), format!("{e}")))?;
            if !seen.insert(code.clone()) {
                return Err(HubError::invalid(
                    format!("document.to[{index}]"),
                    format!("{code} is listed twice"),
                ));
            }
            to.push(code);
        }
        if wire.subject.trim().is_empty() {
            return Err(HubError::invalid(
                "document.subject",
                "a subject is required",
            ));
        }
        if wire.attachments.len() > limits.max_attachments {
            return Err(HubError::ResourceExhausted(format!(
                "document.attachments: {} attachments exceed the limit of {} (limits.max_attachments)",
                wire.attachments.len(),
                limits.max_attachments
            )));
        }
        for (index, attachment) in wire.attachments.iter().enumerate() {
            if attachment.content.len() > limits.max_attachment_bytes {
                return Err(HubError::ResourceExhausted(format!(
                    "document.attachments[{index}]: {} bytes exceed the limit of {} (limits.max_attachment_bytes)",
                    attachment.content.len(),
                    limits.max_attachment_bytes
                )));
            }
        }
        let mut fields: Vec<(String, &str)> = vec![
            ("document.subject".into(), wire.subject.as_str()),
            ("document.code_number".into(), wire.code_number.as_str()),
            ("document.code_notation".into(), wire.code_notation.as_str()),
            ("document.due_date".into(), wire.due_date.as_str()),
        ];
        for (index, place) in wire.to_places.iter().enumerate() {
            fields.push((format!("document.to_places[{index}]"), place));
        }
        for (index, attachment) in wire.attachments.iter().enumerate() {
            fields.push((
                format!("document.attachments[{index}].name"),
                &attachment.name,
            ));
            fields.push((
                format!("document.attachments[{index}].content_type"),
                &attachment.content_type,
            ));
            fields.push((
                format!("document.attachments[{index}].description"),
                &attachment.description,
            ));
        }
        for (field, text) in fields {
            check_text_field(&field, text, limits.max_field_bytes)?;
        }
        let urgency = Urgency::new(wire.priority).ok_or_else(|| {
            HubError::invalid(
                "document.priority",
                format!(
                    "{} is not an urgency (0 normal .. 4 timed express)",
                    wire.priority
                ),
            )
        })?;
        let business_type = wire::BusinessType::try_from(wire.business_type).map_err(|_| {
            HubError::invalid(
                "document.business_type",
                format!(
                    "{} is not a business type (0 new, 1 revoke, 2 update, 3 replace)",
                    wire.business_type
                ),
            )
        })?;
        if business_type != wire::BusinessType::New && wire.references_document_id.is_empty() {
            return Err(HubError::invalid(
                "document.references_document_id",
                format!(
                    "a {} document must name the document it acts on",
                    business_type.as_str_name()
                ),
            ));
        }
        check_document_id(
            "document.references_document_id",
            &wire.references_document_id,
            true,
        )?;

        let size = wire.encoded_len();
        if size > limits.max_document_bytes {
            return Err(HubError::ResourceExhausted(format!(
                "document: {size} bytes exceed the limit of {} bytes (limits.max_document_bytes)",
                limits.max_document_bytes
            )));
        }

        if wire.document_id.is_empty() {
            wire.document_id =
                generate_document_id(&from, &wire.code_number, &wire.code_notation, now_unix_ms);
        }
        check_document_id("document.document_id", &wire.document_id, false)?;
        let content_sha256 = content_sha256(&wire);
        Ok(Document {
            id: wire.document_id.clone(),
            from,
            to,
            urgency,
            content_sha256,
            wire,
        })
    }
}

/// Checks a short text field: at most `max_bytes`, and no control characters (they have no place
/// in a subject, a code or a file name, and break logs and file systems).
fn check_text_field(field: &str, text: &str, max_bytes: usize) -> Result<(), HubError> {
    if text.len() > max_bytes {
        return Err(HubError::invalid(
            field,
            format!(
                "{} bytes exceed the limit of {max_bytes} (limits.max_field_bytes)",
                text.len()
            ),
        ));
    }
    if let Some(position) = text.chars().position(char::is_control) {
        return Err(HubError::invalid(
            field,
            format!("contains a control character at character {position}"),
        ));
    }
    Ok(())
}

/// Checks a document id: bounded and free of control characters (ids are used in storage keys).
pub fn check_document_id(field: &str, id: &str, allow_empty: bool) -> Result<(), HubError> {
    if id.is_empty() && !allow_empty {
        return Err(HubError::invalid(field, "a document id is required"));
    }
    if id.len() > MAX_DOCUMENT_ID_BYTES {
        return Err(HubError::invalid(
            field,
            format!("longer than {MAX_DOCUMENT_ID_BYTES} bytes"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(HubError::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// The edXML form `{sender},{yyyy/MM/dd},{code_number}/{code_notation}`, dated in Vietnam's time
/// zone (UTC+7). Without a code number a random suffix keeps the id unique.
pub fn generate_document_id(
    from: &AgencyCode,
    code_number: &str,
    code_notation: &str,
    now_unix_ms: i64,
) -> String {
    const VIETNAM_OFFSET_MS: i64 = 7 * 3600 * 1000;
    let days = (now_unix_ms + VIETNAM_OFFSET_MS).div_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let code = if code_number.is_empty() {
        format!("LT{:016x}", rand::random::<u64>())
    } else {
        format!("{code_number}/{code_notation}")
    };
    format!("{from},{year:04}/{month:02}/{day:02},{code}")
}

/// Proleptic Gregorian date of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// SHA-256 over the document's encoding without the fields hubs fill in on the way.
fn content_sha256(wire: &wire::Document) -> [u8; 32] {
    let mut canonical = wire.clone();
    canonical.trace.clear();
    Sha256::digest(canonical.encode_to_vec()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DocumentLimits = DocumentLimits {
        max_document_bytes: 1024,
        max_recipients: 3,
        max_attachments: 2,
        max_attachment_bytes: 100,
        max_field_bytes: 64,
    };
    // 2015-09-30 10:00 in Vietnam.
    const NOW: i64 = 1_443_582_000_000;

    fn valid() -> wire::Document {
        wire::Document {
            from: "000.21.31.H53".into(),
            to: vec!["000.00.31.H53".into()],
            subject: "Báo cáo tình hình".into(),
            code_number: "7816".into(),
            code_notation: "VPCP-TTĐT".into(),
            ..Default::default()
        }
    }

    fn field_of(error: HubError) -> String {
        match error {
            HubError::InvalidArgument { field, .. } => field,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_id_gets_the_edxml_form() {
        let document = Document::from_wire(valid(), LIMITS, NOW).expect("valid");
        assert_eq!(document.id, "000.21.31.H53,2015/09/30,7816/VPCP-TTĐT");
        assert_eq!(document.wire.document_id, document.id);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn the_same_content_hashes_the_same_and_other_content_differently() {
        let first = Document::from_wire(valid(), LIMITS, NOW).expect("valid");
        let again = Document::from_wire(valid(), LIMITS, NOW).expect("valid");
        assert_eq!(first.content_sha256, again.content_sha256);
        let mut changed = valid();
        changed.body = b"other".to_vec();
        let changed = Document::from_wire(changed, LIMITS, NOW).expect("valid");
        assert_eq!(changed.id, first.id);
        assert_ne!(changed.content_sha256, first.content_sha256);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Breaker = fn(&mut wire::Document);
        let cases: Vec<(Breaker, &str)> = vec![
            (|d| d.from = "H53".into(), "document.from"),
            (|d| d.to.clear(), "document.to"),
            (
                |d| d.to = vec!["000.00.31.H53".into(), "bad".into()],
                "document.to[1]",
            ),
            (
                |d| d.to = vec!["000.00.31.H53".into(), "000.00.31.H53".into()],
                "document.to[1]",
            ),
            (|d| d.subject = " ".into(), "document.subject"),
            (|d| d.priority = 5, "document.priority"),
            (|d| d.business_type = 9, "document.business_type"),
            (|d| d.business_type = 1, "document.references_document_id"),
            (|d| d.document_id = "a\u{0}b".into(), "document.document_id"),
            (|d| d.subject = "a\nb".into(), "document.subject"),
            (|d| d.subject = "x".repeat(65), "document.subject"),
            (
                |d| d.code_notation = "\u{1b}[31m".into(),
                "document.code_notation",
            ),
            (
                |d| d.to_places = vec!["Hà Nội".into(), "\u{7}".into()],
                "document.to_places[1]",
            ),
            (
                |d| {
                    d.attachments = vec![wire::Attachment {
                        name: "../\u{0}etc".into(),
                        ..Default::default()
                    }]
                },
                "document.attachments[0].name",
            ),
        ];
        for (break_it, field) in cases {
            let mut document = valid();
            break_it(&mut document);
            let error = Document::from_wire(document, LIMITS, NOW).expect_err(field);
            assert_eq!(field_of(error), field);
        }
    }

    #[test]
    fn too_many_attachments_name_the_limit() {
        let mut many = valid();
        many.attachments = vec![wire::Attachment::default(); 3];
        let error = Document::from_wire(many, LIMITS, NOW).expect_err("three attachments");
        assert!(
            matches!(&error, HubError::ResourceExhausted(m) if m.contains("max_attachments")),
            "{error}"
        );
        let mut big = valid();
        big.attachments = vec![wire::Attachment {
            content: vec![0; 101],
            ..Default::default()
        }];
        let error = Document::from_wire(big, LIMITS, NOW).expect_err("a 101-byte attachment");
        assert!(
            matches!(&error, HubError::ResourceExhausted(m) if m.contains("attachments[0]") && m.contains("max_attachment_bytes")),
            "{error}"
        );
    }

    #[test]
    fn size_and_recipient_limits_name_the_limit() {
        let mut big = valid();
        big.body = vec![0; 2000];
        let error = Document::from_wire(big, LIMITS, NOW).expect_err("too big");
        assert!(
            matches!(&error, HubError::ResourceExhausted(m) if m.contains("max_document_bytes")),
            "{error}"
        );

        let mut many = valid();
        many.to = (1..=4).map(|n| format!("000.{n:02}.31.H53")).collect();
        let error = Document::from_wire(many, LIMITS, NOW).expect_err("too many");
        assert!(
            matches!(&error, HubError::ResourceExhausted(m) if m.contains("max_recipients")),
            "{error}"
        );
    }
}
