//! The wire contract of lienthong: generated prost messages and tonic services of `lienthong.v1`.
//!
//! Only this crate and the broker's gRPC layer see these types; the rest of the hub works on
//! validated domain types converted at the edge.

pub mod codec;

/// Messages and services of package `lienthong.v1`.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
    #![allow(clippy::all)]
    tonic::include_proto!("lienthong.v1");
}

/// The encoded `FileDescriptorSet` of every lienthong proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lienthong_descriptor");
