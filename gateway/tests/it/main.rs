//! The gateway's integration tests: one binary (it links once), each module
//! a group of tests against real processes started by `harness`.

mod harness;
mod harness_smoke;

mod access;
mod auth;
mod bad_input;
mod cache;
mod dead_letters;
mod drain;
mod faults;
mod flood;
mod group;
mod idempotency;
mod limits;
mod ops;
mod ordering;
mod persisting;
mod private;
mod redis_outage;
mod restore;
mod typing;
mod web;
