//! The generated protobuf and gRPC types of `mistguard.v1` (from `proto/mistguard/v1/guard.proto`).
//!
//! Nothing outside `daemon/` uses these types; `convert.rs` maps them to and from the core's.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("mistguard.v1");

/// The encoded `FileDescriptorSet` of `mistguard.v1`, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mistguard_v1_descriptor.bin"));
