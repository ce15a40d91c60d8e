//! The test environment shared by the root package's `it`, `fault` and `outage` suites and its
//! benchmark: each test (or scenario) gets its own PostgreSQL database and RabbitMQ vhost on the
//! real servers ([`env`]), runs sagad, saga-demo and sagactl as the binaries cargo built
//! ([`bins`], [`process`]), and the fault suites drive a load through them and check what must
//! hold afterwards ([`fault`]).
//!
//! It is test code: a set-up that cannot be done is a failed test, so most of it panics with a
//! message rather than returning errors (the product crates' lints against panics do not apply
//! here). What the benchmark calls returns errors instead, as the benchmark reports them.

pub mod bins;
pub mod env;
pub mod fault;
pub mod process;

pub use bins::built_bin;
pub use env::{PG, TestEnv, definitions_dir, psql, rabbitmqctl, repo_sagas};
