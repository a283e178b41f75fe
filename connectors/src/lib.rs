//! Outbound adapters: how documents leave a lienthong hub for the systems around it.
//!
//! # Layout
//! - [`spool`]: writes received documents into a directory, durably and atomically, for a
//!   document-management system that picks up files. The hub acknowledges a document only
//!   after its spool write is on disk.

pub mod spool;
