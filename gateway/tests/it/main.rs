//! The gateway's integration tests: one binary (it links once), each module
//! a group of tests against real processes started by `harness`.

mod harness;
mod harness_smoke;
