//! A durable saga orchestrator.
//!
//! - [`definition`], [`engine`]: the pure core, re-exported from the `saga-engine` crate
//!   (`crates/engine`): definition files and the state machine, (saga, event, now) -> (saga, effects).
//! - [`driver`]: the one place a saga moves: lock, engine, write, commit, signal; owns the
//!   definitions, the [`clock`], the metrics and the after-commit signals.
//! - [`store`]: PostgreSQL, persistence only: saga rows, attempts, history, outbox, participants.
//! - [`broker`]: RabbitMQ: the outbox relay and the reply consumer.
//! - [`breaker`]: dispatch control per participant: pauses and the circuit breaker's decisions.
//! - [`contract`]: the AMQP wire contract shared with participants, re-exported from the
//!   `saga-contract` crate (`crates/contract`).
//! - [`timers`]: the sweeper that fires reply deadlines and retry back-offs.
//! - [`supervisor`]: restarts failed long-lived tasks and reports them in readiness.
//! - [`api`]: the gRPC service; [`proto`]: its generated code and codec, re-exported from the
//!   `saga-proto` crate (`crates/proto`), which sagactl uses too.
//! - [`console`]: the operator console, HTML on its own listener, a client of [`api`] in-process.
//! - [`app`]: start-up and shutdown; [`config`]: settings; [`telemetry`]: logs and traces;
//!   [`metrics`]: the Prometheus figures, served with the health checks by [`endpoints`].
// A panic in a task of a long-running server stops work for every saga behind it (until its
// supervisor restarts it); the lints make every possible panic an explicit, reviewed `allow`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub use saga_contract as contract;
pub use saga_engine::{definition, engine, explore, expr, graph};
pub use saga_proto as proto;

pub mod api;
pub mod app;
pub mod breaker;
pub mod broker;
pub mod clock;
pub mod config;
pub mod console;
pub mod driver;
pub mod endpoints;
pub mod metrics;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod timers;
