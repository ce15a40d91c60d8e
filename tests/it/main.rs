//! Integration tests against the real PostgreSQL and RabbitMQ; each test isolated in its own
//! database and vhost.
mod admin;
mod api;
mod auth;
mod bounds;
mod check;
mod console;
mod contract;
mod definitions;
mod demo;
mod graphs;
mod helpers;
mod large;
mod observe;
mod poison;
mod sagactl;
mod sagas;
mod supervision;
mod timers;
mod tls;
mod upgrade;
