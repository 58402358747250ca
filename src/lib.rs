//! `backfill`: detect unprocessed, missing and conflicting events in a
//! Parquet archive, decide replay or dead-letter, write the results, and
//! commit the run in a ledger kept in the lake.
//!
//! Data flows one way: [`job`] (settings) → [`source`] (the archive as
//! tables) → [`detect`] (SQL views) → [`policy`] (the decision) → [`sink`]
//! (outputs) → [`state`] (ledger + manifest, the commit) → [`report`].

pub mod cli;
pub mod cluster;
pub mod commands;
pub mod detect;
pub mod error;
pub mod failpoint;
pub mod generate;
pub mod human;
pub mod infer;
pub mod job;
pub mod kafka;
pub mod location;
pub mod log;
pub mod machine;
pub mod policy;
pub mod progress;
pub mod reconcile;
pub mod redact;
pub mod report;
pub mod run;
pub mod runs;
pub mod shard;
pub mod shell;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod spill;
pub mod state;
pub mod state_at;
