//! A durable saga orchestrator.
//!
//! - [`definition`]: saga definition files (`sagas/*.toml`), parsed and validated.
//! - [`engine`]: the pure state machine: (saga, event, now) -> (saga, effects).
//! - [`demo`]: the demo participants (`saga-demo`) that follow [`contract`].
pub mod contract;
pub mod definition;
pub mod demo;
pub mod engine;
pub mod proto;
