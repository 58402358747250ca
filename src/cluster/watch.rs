//! The client's watch over what it sends to a cluster: every query the
//! scheduler runs is planned through [`Planner`], which wraps Ballista's
//! planner so that
//! - a `COPY ... TO` a path on this machine's disk is refused before it
//!   leaves (an executor would write it into its own working folder);
//! - an error says which scheduler it came from (Ballista's own messages
//!   name a job, a gRPC status or a missing header, never the address);
//! - `--cluster-timeout` bounds how long the client waits for an answer
//!   (the job to finish, then each batch of its result), and a query the
//!   client gives up on, or stops reading, is cancelled on the scheduler
//!   instead of running on for nobody.
//!
//! Ballista's client waits for a job without limit: a scheduler whose
//! executors are all frozen, or that never had one, held a run for as long
//! as it was left (`backfill scheduler` fails jobs that have no executor for
//! its `--executor-timeout`, [`super::serve`]; this is the client's own
//! bound, for every other way a cluster can stop answering).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ballista_core::execution_plans::{DistributedExplainAnalyzeExec, DistributedQueryExec};
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
};
use datafusion_proto::protobuf::LogicalPlanNode;
use futures::StreamExt;

use super::Cluster;
use crate::source::named::{NamedFile, find_corrupt};

/// Ballista's planner, watched.
pub struct Planner {
    pub inner: Arc<dyn QueryPlanner + Send + Sync>,
    pub cluster: Cluster,
    /// The archive's files ([`remember_files`]), for naming the one whose
    /// metadata fails when a query fails with a Parquet error.
    pub files: std::sync::RwLock<Arc<Vec<NamedFile>>>,
}

impl Planner {
    pub fn new(inner: Arc<dyn QueryPlanner + Send + Sync>, cluster: Cluster) -> Planner {
        Planner {
            inner,
            cluster,
            files: Default::default(),
        }
    }
}

/// Let the cluster session `ctx` name a corrupt file of `files` (the
/// archive's): the cluster reads them through a plain listing table, whose
/// errors name no file.
pub fn remember_files(ctx: &datafusion::prelude::SessionContext, files: Vec<NamedFile>) {
    let state = ctx.state();
    let planner: &dyn std::any::Any = state.query_planner().as_ref();
    if let Some(p) = planner.downcast_ref::<Planner>()
        && let Ok(mut slot) = p.files.write()
    {
        *slot = Arc::new(files);
    }
}

impl fmt::Debug for Planner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Planner")
            .field("cluster", &self.cluster.url())
            .finish()
    }
}

#[async_trait]
impl QueryPlanner for Planner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        refuse_local_paths(plan, &self.cluster)?;
        // DESCRIBE reads a table's schema, which the client has: planned
        // here (Ballista cannot serialize it).
        if matches!(plan, LogicalPlan::DescribeTable(_)) {
            use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
            return DefaultPhysicalPlanner::default()
                .create_physical_plan(plan, session)
                .await;
        }
        let physical = self
            .inner
            .create_physical_plan(plan, session)
            .await
            .map_err(|e| at(&self.cluster, e))?;
        // What runs here (information_schema, an empty relation) is not
        // the cluster's.
        if physical
            .downcast_ref::<DistributedQueryExec<LogicalPlanNode>>()
            .is_some()
            || physical
                .downcast_ref::<DistributedExplainAnalyzeExec<LogicalPlanNode>>()
                .is_some()
        {
            let files = self.files.read().map(|f| f.clone()).unwrap_or_default();
            Ok(Arc::new(Watched {
                inner: physical,
                cluster: self.cluster.clone(),
                files,
            }))
        } else {
            Ok(physical)
        }
    }
}

/// What would make the executors read or write their own disks: a
/// `COPY ... TO` a local path, and a scan of or an insert into a table at a
/// local `LOCATION` (`CREATE EXTERNAL TABLE` registers it on the client;
/// its files are the executors' business). Each executor would see its own
/// folder, not the client's.
fn refuse_local_paths(plan: &LogicalPlan, cluster: &Cluster) -> Result<()> {
    if cluster.shared_fs {
        return Ok(());
    }
    let refuse = |what: String| {
        DataFusionError::Plan(format!(
            "{what}: a path on this machine's disk, which the cluster's executors would each read or write on theirs; use the object store (s3://, gs://, az://) or, when every executor shares the path, pass --cluster-shared-fs"
        ))
    };
    if let LogicalPlan::Copy(copy) = plan
        && is_local(&copy.output_url)
    {
        return Err(refuse(format!(
            "COPY TO '{}'",
            crate::redact::url(&copy.output_url)
        )));
    }
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        let table = match node {
            LogicalPlan::TableScan(scan) => Some((&scan.table_name, &scan.source)),
            LogicalPlan::Dml(dml) => Some((&dml.table_name, &dml.target)),
            _ => None,
        };
        if let Some((name, source)) = table
            && let Some(path) = local_location(source)
        {
            found = Some(format!("table {name} at '{path}'"));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match found {
        Some(what) => Err(refuse(what)),
        None => Ok(()),
    }
}

/// The local path of a listing table (`CREATE EXTERNAL TABLE ... LOCATION`),
/// if it has one.
fn local_location(source: &Arc<dyn datafusion::logical_expr::TableSource>) -> Option<String> {
    use datafusion::datasource::listing::ListingTable;
    let provider = datafusion::datasource::source_as_provider(source).ok()?;
    let any: &dyn std::any::Any = provider.as_ref();
    let listing = any.downcast_ref::<ListingTable>()?;
    listing
        .table_paths()
        .iter()
        .find(|u| u.scheme() == "file")
        .map(|u| u.as_str().to_string())
}

/// No scheme, or `file://`.
fn is_local(target: &str) -> bool {
    match target.split_once("://") {
        Some((scheme, _)) => scheme.eq_ignore_ascii_case("file"),
        None => true,
    }
}

/// `e`, saying which scheduler it came from (and, for a job the scheduler
/// cancelled, the likely why: Ballista's message is one word).
fn at(cluster: &Cluster, e: DataFusionError) -> DataFusionError {
    let text = e.to_string();
    let why = if text.contains("failed: Cancelled") {
        " (the scheduler cancels a job when no executor has been registered for its --executor-timeout, or when its client gives up: see the scheduler's log)"
    } else {
        ""
    };
    DataFusionError::Execution(format!("the cluster at {}: {text}{why}", cluster.url()))
}

/// A distributed query, watched: its errors name the scheduler, its wait
/// is bounded by the cluster's timeout, and it is cancelled when the client
/// stops reading it before its end.
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn ExecutionPlan>,
    cluster: Cluster,
    files: Arc<Vec<NamedFile>>,
}

impl DisplayAs for Watched {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ClusterQuery: scheduler={}", self.cluster.url())?;
        if let Some(t) = self.cluster.timeout {
            write!(f, ", timeout={}s", t.as_secs())?;
        }
        Ok(())
    }
}

impl ExecutionPlan for Watched {
    fn name(&self) -> &str {
        "ClusterQuery"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.inner]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(inner), true) => Ok(Arc::new(Watched {
                inner,
                cluster: self.cluster.clone(),
                files: self.files.clone(),
            })),
            _ => Err(DataFusionError::Internal(
                "ClusterQuery takes one child".into(),
            )),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let stream = self
            .inner
            .execute(partition, context)
            .map_err(|e| at(&self.cluster, e))?;
        let schema = stream.schema();
        let state = Reading {
            stream,
            files: self.files.clone(),
            job: Job {
                plan: self.inner.clone(),
                cluster: self.cluster.clone(),
                open: true,
            },
        };
        let s = futures::stream::unfold(state, |mut st| async move {
            if !st.job.open {
                return None;
            }
            let next = match st.job.cluster.timeout {
                Some(t) => match tokio::time::timeout(t, st.stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let outcome = st.job.cancel().await;
                        let e = DataFusionError::Execution(format!(
                            "the cluster at {} gave no answer within the cluster timeout of {} (--cluster-timeout, cluster_timeout); {outcome}",
                            st.job.cluster.url(),
                            crate::human::duration(t)
                        ));
                        return Some((Err(e), st));
                    }
                },
                None => st.stream.next().await,
            };
            match next {
                Some(Ok(b)) => Some((Ok(b), st)),
                Some(Err(e)) => {
                    st.job.cancel().await;
                    // A file the cluster could not read: name it if its
                    // footer or page index is what fails (reading every
                    // data page from the client is the cluster's work).
                    let parquet = e.to_string().to_ascii_lowercase().contains("parquet");
                    let e = if parquet && let Some(named) = find_corrupt(&st.files, &[]).await {
                        DataFusionError::External(Box::new(named))
                    } else {
                        e
                    };
                    Some((Err(at(&st.job.cluster, e)), st))
                }
                None => {
                    // Read to its end: nothing left to cancel.
                    st.job.open = false;
                    drop(st);
                    None
                }
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, s)))
    }
}

/// The stream of a watched query and its job.
struct Reading {
    stream: SendableRecordBatchStream,
    files: Arc<Vec<NamedFile>>,
    job: Job,
}

/// A job the client may still have to cancel: until its stream ended
/// (`open` false), an error, a timeout or a drop cancels it.
struct Job {
    plan: Arc<dyn ExecutionPlan>,
    cluster: Cluster,
    open: bool,
}

impl Job {
    /// The scheduler's id of the job, once it accepted it.
    fn id(&self) -> Option<String> {
        self.plan
            .downcast_ref::<DistributedQueryExec<LogicalPlanNode>>()
            .and_then(|e| e.job_id())
            .map(|id| id.to_string())
    }

    /// Cancel the job on the scheduler (best effort: a job that already
    /// ended ignores it; a scheduler that does not answer in seconds is
    /// left, the client is already failing), and say what came of it.
    async fn cancel(&mut self) -> Cancel {
        self.open = false;
        match self.id() {
            Some(id) => match cancel(self.cluster.endpoint(), id.clone()).await {
                Ok(()) => Cancel::Done(id),
                Err(e) => Cancel::Failed(id, e),
            },
            None => Cancel::NoJob,
        }
    }
}

/// What [`Job::cancel`] did, as the end of an error message.
enum Cancel {
    Done(String),
    NoJob,
    Failed(String, String),
}

impl fmt::Display for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cancel::Done(id) => write!(f, "its job {id} was cancelled"),
            Cancel::NoJob => write!(f, "the scheduler had not accepted a job"),
            Cancel::Failed(id, e) => write!(
                f,
                "its job {id} could not be cancelled ({e}): cancel it on the scheduler"
            ),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if let (Some(id), Ok(rt)) = (self.id(), tokio::runtime::Handle::try_current()) {
            let endpoint = self.cluster.endpoint();
            rt.spawn(async move {
                let _ = cancel(endpoint, id).await;
            });
        }
    }
}

/// How long a cancellation may take before the client gives up on it.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

async fn cancel(endpoint: String, job_id: String) -> std::result::Result<(), String> {
    use ballista_core::serde::protobuf::CancelJobParams;
    use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
    let sent = tokio::time::timeout(CANCEL_TIMEOUT, async {
        let channel = ballista_core::utils::create_grpc_client_endpoint(endpoint, None)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        SchedulerGrpcClient::new(channel)
            .cancel_job(CancelJobParams {
                job_id: job_id.clone(),
            })
            .await
            .map_err(|e| e.message().to_string())
    })
    .await;
    let outcome = match sent {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer in {} s", CANCEL_TIMEOUT.as_secs())),
    };
    match &outcome {
        Ok(()) => tracing::info!("cancelled job {job_id} on the cluster"),
        Err(e) => tracing::warn!("could not cancel job {job_id} on the cluster: {e}"),
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_targets_are_paths_and_file_urls() {
        for t in ["/tmp/out", "out.parquet", "file:///tmp/x", "FILE:///x"] {
            assert!(is_local(t), "{t}");
        }
        for t in ["s3://b/k", "gs://b/k", "az://c/k", "https://h/x"] {
            assert!(!is_local(t), "{t}");
        }
    }
}
