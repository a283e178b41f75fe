//! Outbound adapters: how documents leave a lienthong hub for the systems around it.
//!
//! # Layout
//! - [`spool`]: writes received documents into a directory, durably and atomically, for a
//!   document-management system that picks up files. The hub acknowledges a document only
//!   after its spool write is on disk.
//! - [`uplink`]: carries a province hub's documents, status reports and receipts to and from
//!   the central hub, acknowledging each side only after the other has it on disk.

pub mod spool;
pub mod uplink;
