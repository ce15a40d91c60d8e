//! The fault suite: "nothing lost, nothing done twice", proven with real faults.
//!
//! Each scenario runs a batch of sagas through real `sagad` processes and the demo
//! participants, causes one fault while they are in flight, then checks the invariants of
//! [`saga_testkit::fault::check_invariants`] and prints what it measured (run with
//! `--nocapture` to see the numbers of passing scenarios). Each test has its own database and
//! vhost ([`saga_testkit::TestEnv`]), so they run in parallel. Faults that stop the shared PostgreSQL or RabbitMQ servers live in
//! the separate `outage` binary, which serialises them.
mod crash;
mod participants;
mod poison;
