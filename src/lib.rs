//! A durable saga orchestrator.
//!
//! - [`definition`]: saga definition files (`sagas/*.toml`), parsed and validated.
//! - [`engine`]: the pure state machine: (saga, event, now) -> (saga, effects).
//! - [`cli`]: `sagactl`'s rendering of API responses as tables or JSON.
pub mod cli;
pub mod contract;
pub mod definition;
pub mod engine;
pub mod proto;
