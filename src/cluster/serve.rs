//! `backfill scheduler` and `backfill executor`: Ballista's scheduler and
//! executor processes, from its library crates, with what our plans need
//! ([`super::codec`], the stores of [`super::Stores`]). One release gives
//! the client and the cluster, built on the same DataFusion.

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;

use super::{Cluster, base_config, codec, runtime, scheduler_state};
use crate::cli::{ExecutorArgs, SchedulerArgs};
use crate::error::Error;

fn usage(what: &str, message: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{what}: {message}"))
}

/// `backfill scheduler`: serve until interrupted.
pub async fn scheduler(args: SchedulerArgs) -> Result<(), Error> {
    let addr: SocketAddr = args
        .bind
        .parse()
        .map_err(|e| usage("--bind", format!("'{}' is not HOST:PORT ({e})", args.bind)))?;
    let config = SchedulerConfig {
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        external_host: args
            .external_host
            .clone()
            .unwrap_or_else(|| addr.ip().to_string()),
        executor_timeout_seconds: args.executor_timeout.max(1),
        no_executors_grace_period_seconds: args.executor_timeout.max(1),
        expire_dead_executor_interval_seconds: (args.executor_timeout / 4).clamp(1, 15),
        override_config_producer: Some(Arc::new(base_config)),
        override_session_builder: Some(Arc::new(scheduler_state)),
        override_logical_codec: Some(Arc::new(codec::Logical::default())),
        override_physical_codec: Some(Arc::new(codec::Physical::default())),
        ..Default::default()
    };
    // Bind first, so that a port in use is one clear line, not a panic in
    // the server's task.
    std::net::TcpListener::bind(addr)
        .map_err(|e| usage("--bind", format!("cannot listen on {addr}: {e}")))?;
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| Error::Io {
            what: "the scheduler".into(),
            message: format!("did not start: {e}"),
        })?;
    tracing::info!("Ballista scheduler listening on df://{addr}");
    start_server(cluster, addr, Arc::new(config))
        .await
        .map_err(|e| Error::Io {
            what: "the scheduler".into(),
            message: format!("stopped: {e}"),
        })
}

/// `backfill executor`: register with the scheduler, run its tasks until
/// interrupted.
pub async fn executor(args: ExecutorArgs) -> Result<(), Error> {
    let scheduler = Cluster::parse(&args.scheduler).map_err(|m| usage("--scheduler", m))?;
    if let Some(dir) = &args.work_dir
        && !dir.is_dir()
    {
        return Err(usage(
            "--work-dir",
            format!("{} is not a directory", dir.display()),
        ));
    }
    let memory_pool_size = match &args.memory_limit {
        Some(s) => Some(crate::job::parse_size("--memory-limit", s)? as u64),
        None => None,
    };
    let vcores = args
        .concurrent_tasks
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    if vcores == 0 {
        return Err(usage("--concurrent-tasks", "must be at least 1"));
    }
    // Exit 1, not 2: a scheduler that is not up yet may be for a retry.
    scheduler
        .probe()
        .await
        .map_err(|m| Error::from(crate::source::SourceError::Cluster(m)))?;
    let mut config = ExecutorProcessConfig {
        bind_host: args.bind.clone(),
        external_host: args.external_host.clone(),
        port: args.port,
        grpc_port: args.grpc_port,
        scheduler_host: scheduler.host.clone(),
        scheduler_port: scheduler.port,
        vcores,
        executor_heartbeat_interval_seconds: args.heartbeat_interval.max(1),
        work_dir: args.work_dir.as_ref().map(|d| d.display().to_string()),
        override_config_producer: Some(Arc::new(base_config)),
        override_runtime_producer: Some(Arc::new(runtime)),
        override_logical_codec: Some(Arc::new(codec::Logical::default())),
        override_physical_codec: Some(Arc::new(codec::Physical::default())),
        ..Default::default()
    };
    if memory_pool_size.is_some() {
        config.memory_pool_size = memory_pool_size;
    }
    tracing::info!(
        "Ballista executor on {}:{} (flight) / {} (grpc), scheduler {}",
        args.bind,
        args.port,
        args.grpc_port,
        scheduler.url()
    );
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| Error::Io {
            what: "the executor".into(),
            message: format!("stopped: {e}"),
        })
}
