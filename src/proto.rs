//! Generated gRPC code for `proto/saga/v1/saga.proto`.
#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("saga.v1");
}

/// Serialized descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_descriptor");
