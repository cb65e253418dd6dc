//! # ratelimit-policyd
//!
//! A Postfix policy service that limits how many recipients (or messages)
//! each authenticated sender may send per hour, day, week, month or fixed
//! period. A drop-in replacement for the Perl ratelimit-policyd: same port,
//! same table, same log line.
//!
//! ## Request path
//!
//! ```text
//! Postfix smtpd ──TCP/unix──▶ server (accept: permit from a semaphore,
//!                              allowed_clients check, one task per connection)
//!   └─ server::connection: protocol::Parser frames one bounded request
//!        └─ policy::evaluate: which stage, which key, how much to charge
//!             └─ store::CounterStore::check_and_increment (sync, in memory,
//!                one dashmap shard lock for a few hundred nanoseconds)
//!        ◀─ Decision ─ protocol::encode_action ─ "action=...\n\n" ─ write
//! ```
//!
//! No database I/O happens on the request path. [`persist::Flusher`] runs on
//! its own and is the one task that merges memory and database: every
//! `flush_interval` it takes the usage added since the last flush
//! ([`store::Delta`]s) and writes it in batches through a
//! [`persist::Backend`] (embedded SQLite by default). A batch that fails is
//! kept and sent again, with the same id, until the database confirms it, so
//! a database outage loses nothing, an unknown outcome doubles nothing, and
//! the daemon keeps answering from memory meanwhile. Refreshes, full
//! re-reads and reloads merge database rows in the same task.
//!
//! ## Modules
//!
//! - [`protocol`]: sans-IO codec with hard bounds.
//! - [`policy`]: the pure decision (stages, keys, charge, reply).
//! - [`store`]: the counters and their window arithmetic.
//! - [`persist`]: backend trait, write-behind flusher, SQLite and memory backends.
//! - [`server`]: listener and per-connection loop.
//! - [`daemon`]: wires everything; what `main` and the tests start.
//! - [`config`], [`cli`], [`logging`], [`clock`], [`signals`], [`stats`], [`error`].

#![deny(missing_docs)]

pub mod ask;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod logging;
pub mod persist;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod signals;
pub mod socket;
pub mod stats;
pub mod store;
pub mod systemd;
