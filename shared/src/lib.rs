//! Types and codecs shared by the gateway and the persister.
//!
//! This crate is the only code the two binaries have in common. It owns the
//! client contract's event types (`protocol`), their wire encodings (`codec`),
//! the ids and the private-chat id rule (`ids`), the durable queue's job format
//! (`queue`), the names of the Redis keys (`keys`), and the typed environment
//! readers (`config`).
//!
//! It must never import anything else of ours, open a socket or spawn a task:
//! it is plain data and pure functions, so both binaries (and the fuzzers and
//! property tests) can use it without dragging in a runtime.

pub mod cache;
pub mod codec;
pub mod config;
pub mod ids;
pub mod keys;
pub mod protocol;
pub mod queue;
