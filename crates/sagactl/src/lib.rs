//! `sagactl`, the command-line client for sagad's gRPC API. The library is its pure half
//! ([`cli`]): what it prints is decided there and unit-tested without a server; `main.rs` parses
//! flags, calls the API and prints.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cli;
