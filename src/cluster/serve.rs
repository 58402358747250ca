//! `backfill scheduler` and `backfill executor`: Ballista's scheduler and
//! executor processes, from its library crates, with what our plans need
//! ([`super::codec`], the stores of [`super::Stores`]). One release gives
//! the client and the cluster, built on the same DataFusion.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service};
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

use super::{Cluster, base_config, codec, runtime, scheduler_state};
use crate::cli::{ExecutorArgs, SchedulerArgs};
use crate::error::Error;

fn usage(what: &str, message: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{what}: {message}"))
}

/// `HOST:PORT` (a name such as `localhost` resolved), with a port given:
/// port 0 would make the scheduler advertise a port nobody listens on.
fn bind_address(flag: &str, bind: &str) -> Result<SocketAddr, Error> {
    let addr = resolve(flag, bind)?;
    if addr.port() == 0 {
        return Err(usage(flag, format!("'{bind}': give a port (not 0)")));
    }
    Ok(addr)
}

/// `bind` (`HOST:PORT`, a name resolved) as an address.
fn resolve(flag: &str, bind: &str) -> Result<SocketAddr, Error> {
    bind.to_socket_addrs()
        .map_err(|e| usage(flag, format!("'{bind}' is not HOST:PORT ({e})")))?
        .next()
        .ok_or_else(|| usage(flag, format!("'{bind}' resolves to no address")))
}

/// `HOST:PORT`, an IPv6 literal host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `backfill scheduler`: serve until interrupted.
pub async fn scheduler(args: SchedulerArgs) -> Result<(), Error> {
    let addr = bind_address("--bind", &args.bind)?;
    let config = SchedulerConfig {
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        external_host: args
            .external_host
            .clone()
            .unwrap_or_else(|| addr.ip().to_string()),
        executor_timeout_seconds: args.executor_timeout,
        no_executors_grace_period_seconds: args.executor_timeout,
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
    let stopped = |e: ballista_core::error::BallistaError| Error::Io {
        what: "the scheduler".into(),
        message: format!("stopped: {e}"),
    };
    let config = Arc::new(config);
    config.validate().map_err(stopped)?;
    let server = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config)
        .await
        .map_err(stopped)?;
    tokio::spawn(fail_jobs_without_executors(
        server.clone(),
        Duration::from_secs(args.executor_timeout),
    ));
    tracing::info!("Ballista scheduler listening on df://{addr}");
    // SIGINT or SIGTERM is how a scheduler is stopped: exit 0 (its jobs
    // fail on their clients, which commit nothing).
    tokio::select! {
        served = start_grpc_service(addr, server) => served.map_err(stopped),
        _ = stop_signal() => {
            tracing::info!("scheduler stopped");
            Ok(())
        }
    }
}

/// Ballista fails a job when its cluster *loses* its last executor, but
/// leaves one submitted to a scheduler that never had an executor queued
/// forever (it waits for autoscaling), and its client with it. A run from
/// cron has nobody to notice: cancel what has waited `grace` with no
/// executor alive, and say so.
async fn fail_jobs_without_executors(
    server: SchedulerServer<LogicalPlanNode, PhysicalPlanNode>,
    grace: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut empty_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let jobs: Vec<_> = server
            .state
            .task_manager
            .get_running_job_cache()
            .keys()
            .cloned()
            .collect();
        if jobs.is_empty() || server.is_ready() {
            empty_since = None;
            continue;
        }
        if empty_since.get_or_insert_with(Instant::now).elapsed() < grace {
            continue;
        }
        for job in jobs {
            tracing::warn!(
                "cancelling job {job}: no executor has been registered for {} s (--executor-timeout); start `backfill executor --scheduler df://...`",
                grace.as_secs()
            );
            if let Err(e) = server.cancel_job(job.clone()).await {
                tracing::warn!("could not cancel job {job}: {e}");
            }
        }
        empty_since = None;
    }
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
    if !(1..=MAX_CONCURRENT_TASKS).contains(&vcores) {
        return Err(usage(
            "--concurrent-tasks",
            format!("{vcores}: give 1 to {MAX_CONCURRENT_TASKS}"),
        ));
    }
    // Both services' ports, before anything starts: Ballista logs a port in
    // use and carries on, then stops with status 0.
    let bind_ip = resolve("--bind", &host_port(&args.bind, 0))?.ip();
    for (flag, port) in [("--port", args.port), ("--grpc-port", args.grpc_port)] {
        if port == 0 {
            return Err(usage(flag, "give a port (not 0)"));
        }
        let addr = SocketAddr::new(bind_ip, port);
        std::net::TcpListener::bind(addr)
            .map_err(|e| usage(flag, format!("cannot listen on {addr}: {e}")))?;
    }
    if args.port == args.grpc_port {
        return Err(usage(
            "--grpc-port",
            format!("{} is also --port: give each service its own", args.port),
        ));
    }
    // Executors and their scheduler start together (compose, Kubernetes):
    // wait a while for it to listen. Then exit 1, not 2: a supervisor's
    // retry may find it.
    let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let asked = asked.clone();
        async move {
            stop_signal().await;
            asked.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let waiting = Instant::now();
    while let Err(m) = scheduler.probe().await {
        if asked.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        if waiting.elapsed() >= SCHEDULER_WAIT {
            return Err(Error::from(crate::source::SourceError::Cluster(format!(
                "{m} (waited {} s)",
                SCHEDULER_WAIT.as_secs()
            ))));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Ballista wants an address, not a name (`localhost`), and IPv6 in
    // brackets.
    let bind_host = match bind_ip {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let mut config = ExecutorProcessConfig {
        bind_host,
        external_host: args.external_host.clone(),
        port: args.port,
        grpc_port: args.grpc_port,
        scheduler_host: scheduler.host.clone(),
        scheduler_port: scheduler.port,
        vcores,
        executor_heartbeat_interval_seconds: args.heartbeat_interval,
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
    // Ballista's executor returns the same `Ok` whether it was interrupted,
    // told to stop by its scheduler or lost a service: only a signal is a
    // clean stop (exit 0), anything else is for its supervisor to see.
    let url = scheduler.url();
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| Error::Io {
            what: "the executor".into(),
            message: format!("stopped (scheduler {url}): {e}"),
        })?;
    // The signal reached Ballista's listener and ours at once; give ours
    // the moment it may still need.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if asked.load(std::sync::atomic::Ordering::SeqCst) {
        Ok(())
    } else {
        Err(Error::Io {
            what: "the executor".into(),
            message: format!(
                "stopped without being asked: it lost its scheduler {} or was told to stop by it, or one of its services failed (see the lines above)",
                scheduler.url()
            ),
        })
    }
}

/// How long an executor waits for its scheduler to listen.
const SCHEDULER_WAIT: Duration = Duration::from_secs(30);

/// The most task slots an executor takes (Ballista counts them in 32 bits;
/// a larger number wrapped to 0 slots).
const MAX_CONCURRENT_TASKS: usize = 4096;

/// Returns when the process gets SIGINT or SIGTERM, how a scheduler or an
/// executor is asked to stop (Ballista's executor listens for both too).
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
