//! Generated gRPC code for `proto/saga/v1/saga.proto` (clients and servers) and the protobuf
//! codec both sides use. sagad serves it, sagactl and the tests call it.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod codec;
pub mod graph;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("saga.v1");
}

/// Serialized descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_descriptor");
