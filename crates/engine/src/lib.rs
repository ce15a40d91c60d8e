//! The saga orchestrator's pure core, apart from every server it talks to.
//!
//! - [`definition`]: saga definition files (`sagas/*.toml`), parsed and validated, with errors
//!   that name the file, line and field.
//! - [`graph`]: the state machine sagad runs: (definition, state, event, time) -> (state,
//!   effects), one small machine per step, parallel branches, conditions, mapped inputs.
//! - [`engine`]: the vocabulary both machines share (statuses, events, repairs, [`engine::Ctx`])
//!   and the corridor machine sagas ran on before graphs: kept as the reference the graph
//!   machine is tested against on every corridor (`tests/graph_props.rs`), and for converting
//!   sagas stored on its shape ([`graph::GraphState::from_linear`]).
//! - [`expr`]: CEL expressions in definitions (`when` conditions, mapped command inputs), the
//!   only module that knows the `cel` crate.
//! - [`explore`]: the exhaustive checker that drives [`graph`] through every order of replies.
//!
//! Nothing here reads the clock, draws random numbers or does I/O: the driver in `sagad` passes
//! time, ids and jitter in and carries the effects out.

// A panic here would take down whichever task called the engine; the lints make every possible
// panic an explicit, reviewed `allow`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod definition;
pub mod engine;
pub mod explore;
pub mod expr;
pub mod graph;
