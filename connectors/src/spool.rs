//! The spool directory connector: each received document becomes a folder of files that a
//! document-management system can pick up, written so that a crash never leaves half a document.
//!
//! A document is written into `<spool>/.incoming/<name>`, every file is synced, and the folder
//! is renamed to `<spool>/<name>` (a rename within one file system is atomic) and the spool
//! directory synced. Only then may the caller acknowledge the delivery to the hub. A redelivery
//! of a document already spooled replaces its folder with the same content.
//!
//! Folder contents: `document.pb` (the whole document, protobuf), `body`, one file per
//! attachment (names made safe), and `document.txt`, a summary a person can read.

use lienthong_proto::v1 as wire;
use prost::Message;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `document` into `spool_dir` and returns its folder. Durable when it returns.
pub fn write_document(spool_dir: &Path, document: &wire::Document) -> io::Result<PathBuf> {
    let name = safe_file_name(&document.document_id);
    let incoming = spool_dir.join(".incoming");
    fs::create_dir_all(&incoming)?;
    let staging = incoming.join(&name);
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir(&staging)?;
    write_synced(&staging.join("document.pb"), &document.encode_to_vec())?;
    write_synced(&staging.join("body"), &document.body)?;
    for attachment in &document.attachments {
        let mut file_name = safe_file_name(&attachment.name);
        if matches!(file_name.as_str(), "document.pb" | "body" | "document.txt") {
            file_name.insert_str(0, "attachment-");
        }
        write_synced(&staging.join(file_name), &attachment.content)?;
    }
    write_synced(&staging.join("document.txt"), summary(document).as_bytes())?;
    sync_dir(&staging)?;

    let target = spool_dir.join(&name);
    if target.exists() {
        fs::remove_dir_all(&target)?;
    }
    fs::rename(&staging, &target)?;
    sync_dir(spool_dir)?;
    Ok(target)
}

/// A file name with every character outside letters, digits, `-`, `_` and `.` replaced, and no
/// leading dot, so that names from the network cannot escape the spool directory.
pub fn safe_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        "_".into()
    } else {
        cleaned.to_owned()
    }
}

fn summary(document: &wire::Document) -> String {
    let mut text = format!(
        "document_id: {}\nfrom: {}\nto: {}\nsubject: {}\ncode: {}/{}\npriority: {}\n",
        document.document_id,
        document.from,
        document.to.join(", "),
        document.subject,
        document.code_number,
        document.code_notation,
        document.priority,
    );
    for attachment in &document.attachments {
        text.push_str(&format!(
            "attachment: {} ({}, {} bytes)\n",
            attachment.name,
            attachment.content_type,
            attachment.content.len()
        ));
    }
    text
}

fn write_synced(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> wire::Document {
        wire::Document {
            document_id: "000.21.31.H53,2026/11/27,12/TTr-UBND".into(),
            from: "000.21.31.H53".into(),
            to: vec!["000.00.31.H53".into()],
            subject: "Tờ trình".into(),
            body: b"noi dung".to_vec(),
            attachments: vec![
                wire::Attachment {
                    name: "../../escape.pdf".into(),
                    content: b"pdf".to_vec(),
                    ..Default::default()
                },
                wire::Attachment {
                    name: "body".into(),
                    content: b"not the body".to_vec(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_spooled_document_reads_back_whole_and_stays_inside_the_spool() {
        let spool = tempfile::tempdir().expect("temporary directory");
        let folder = write_document(spool.path(), &document()).expect("spool");
        assert_eq!(folder.parent(), Some(spool.path()));
        let decoded = wire::Document::decode(
            fs::read(folder.join("document.pb"))
                .expect("read")
                .as_slice(),
        )
        .expect("decode");
        assert_eq!(decoded, document());
        assert_eq!(fs::read(folder.join("body")).expect("body"), b"noi dung");
        assert_eq!(
            fs::read(folder.join("_.._escape.pdf")).expect("attachment"),
            b"pdf"
        );
        assert_eq!(
            fs::read(folder.join("attachment-body")).expect("renamed"),
            b"not the body"
        );
        assert!(!spool.path().join("escape.pdf").exists());
        assert_eq!(
            fs::read_dir(spool.path().join(".incoming"))
                .expect("staging")
                .count(),
            0
        );
    }

    #[test]
    fn spooling_again_replaces_the_folder() {
        let spool = tempfile::tempdir().expect("temporary directory");
        let first = write_document(spool.path(), &document()).expect("spool");
        let mut changed = document();
        changed.body = b"second".to_vec();
        let second = write_document(spool.path(), &changed).expect("spool again");
        assert_eq!(first, second);
        assert_eq!(fs::read(second.join("body")).expect("body"), b"second");
    }

    #[test]
    fn file_names_from_the_network_are_made_safe() {
        assert_eq!(safe_file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(safe_file_name(".."), "_");
        assert_eq!(safe_file_name("quyết định.pdf"), "quyết_định.pdf");
    }
}
