//! The one integration-test binary: a module per area (link time matters on
//! two cores).

mod app_logs;
mod archive;
mod bad_input;
mod barrier;
mod cli;
mod cluster;
mod commit;
mod compact;
mod crash;
mod e2e;
mod impossible;
mod infer;
mod kafka;
mod kafka_e2e;
mod logs;
mod memory;
mod passes;
mod reconcile;
mod recover;
mod redis;
mod redrive;
mod reference;
mod rerun;
mod s3;
mod schedulers;
mod secrets;
mod services;
mod shards;
mod silences;
mod sql_shell;
mod state_at;
mod volume;
