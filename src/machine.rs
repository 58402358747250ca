//! What the machine offers: the memory the process may use, for the default
//! `--memory-limit`.
//!
//! A fixed default cannot fit every machine: 4 GiB starves DataFusion on a
//! 64 GiB host and gets the process OOM-killed in a 2 GiB container, where
//! the kernel enforces the cgroup's limit, not the host's RAM. So the default
//! is half of what is available: the smaller of the physical RAM
//! (`/proc/meminfo`) and the cgroup's limit (v2 `memory.max`, v1
//! `memory.limit_in_bytes`). Half, because the pool bounds only the query
//! engine's big operators: Parquet decoding, the policy and the sinks
//! allocate outside it. The parsing is pure (file contents in, bytes out) so
//! that it is tested without the files.

/// The floor of the default: below it DataFusion spills for every sort.
pub const MIN_DEFAULT_MEMORY_LIMIT: u64 = 256 << 20;

/// The default when nothing can be read (not Linux, no /proc): the fixed
/// default of earlier versions.
pub const FALLBACK_MEMORY_LIMIT: u64 = 4 << 30;

const MEMINFO: &str = "/proc/meminfo";
const CGROUP_V2_MAX: &str = "/sys/fs/cgroup/memory.max";
const CGROUP_V1_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";

/// The share of `--memory-limit` given to DataFusion's memory pool (and,
/// inside it, the detection's buckets and candidates). The rest is for
/// what no pool sees: the binary and its threads, Parquet decoding ahead
/// of the operators, the sinks' row groups, the allocator's partly used
/// pages. Measured with the memory watch ([`MemoryWatch`]) over 50M events
/// at 1G, that rest is 250-520 MiB in every phase (330 in the narrow
/// pass, 250-430 in the fetch, where the pool is full and RSS peaks), so
/// the limit bounds the process's RSS only if the pool leaves it: half of
/// a small limit, and [`OUTSIDE_POOL`] of a large one, where 3/8 of the
/// default (half of a 24 GiB machine) kept 4.5 GiB idle while 50M events
/// spilled 4.9 GB. (Pools of 5/8 and 9/16 of 1G left 50M events over
/// 1 GiB in three runs of seven and in one of nine: 933-1,100 and
/// 885-1,065 MiB.)
pub fn pool_bytes(memory_limit: usize) -> usize {
    (memory_limit / 2).max(memory_limit.saturating_sub(OUTSIDE_POOL))
}

/// What a large `--memory-limit` keeps outside the pool: several times the
/// measured rest, for the sinks' row groups and decoding ahead.
pub const OUTSIDE_POOL: usize = 3 << 29;

/// The most a Parquet writer (an output sink, the ledger) buffers of a row
/// group before it writes it out; under a small `--memory-limit`, less
/// ([`set_writer_budget`]).
pub const MAX_ROW_GROUP_BYTES: usize = 32 << 20;

static ROW_GROUP_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(MAX_ROW_GROUP_BYTES);

/// Size the writers' row groups for `memory_limit`: 1/64 of it, between
/// 1 MiB and [`MAX_ROW_GROUP_BYTES`]. Three sinks and the ledger buffer a
/// row group each outside the pool, in the seven sixteenths the pool leaves:
/// at their fixed 32 MiB they alone were twice `--memory-limit 64M`, and at
/// 1/32 they were 128 MiB of a 1G run's fetch phase, when its RSS peaks.
pub fn set_writer_budget(memory_limit: usize) {
    ROW_GROUP_BYTES.store(
        (memory_limit / 64).clamp(1 << 20, MAX_ROW_GROUP_BYTES),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Bytes a Parquet writer buffers before it writes a row group out.
pub fn row_group_bytes() -> usize {
    ROW_GROUP_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// What the binary does when the settings bound memory: it tunes its
/// allocator (`main.rs`), which the library cannot name. Registered once,
/// before the settings are read.
static ON_MEMORY_BOUND: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Register the binary's reaction to a memory bound (first call wins).
pub fn on_memory_bound(f: fn()) {
    let _ = ON_MEMORY_BOUND.set(f);
}

/// The settings give a memory limit (`--memory-limit` or `memory_limit`):
/// tell the binary, so that RSS follows the limit instead of keeping what
/// was freed for reuse.
pub fn memory_bounded() {
    if let Some(f) = ON_MEMORY_BOUND.get() {
        f()
    }
}

/// The default memory limit of the query engine on this machine, in bytes.
pub fn default_memory_limit() -> usize {
    usize::try_from(memory_limit_for(available_here())).unwrap_or(usize::MAX)
}

/// The memory this process may use: the smallest of the physical RAM and
/// the cgroup limits of its own group, its ancestors and the root; `None`
/// when none can be read.
pub fn available_here() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    // The process's own cgroup and its ancestors (a container is usually a
    // nested group; the limit may sit on any level), besides the root files.
    let nested = read("/proc/self/cgroup")
        .map(|t| cgroup_limit_files(&t))
        .unwrap_or_default()
        .iter()
        .filter_map(|f| read(f).as_deref().and_then(parse_cgroup_limit))
        .min();
    let available = available_memory(
        read(MEMINFO).as_deref(),
        read(CGROUP_V2_MAX).as_deref(),
        read(CGROUP_V1_LIMIT).as_deref(),
    );
    match (available, nested) {
        (Some(a), Some(n)) => Some(a.min(n)),
        (a, n) => a.or(n),
    }
}

/// The limit files of the process's memory cgroup and of each ancestor,
/// from `/proc/self/cgroup`: v2 (`0::/a/b`) → `/sys/fs/cgroup/a/b/memory.max`,
/// `/sys/fs/cgroup/a/memory.max`; v1 (`4:memory:/a/b`) →
/// `/sys/fs/cgroup/memory/a/b/memory.limit_in_bytes`, and so on up.
pub fn cgroup_limit_files(proc_self_cgroup: &str) -> Vec<String> {
    let mut out = vec![];
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = path.trim_end_matches('/').to_string();
        while !dir.is_empty() {
            if !dir.split('/').any(|c| c == "..") {
                out.push(format!("{root}{dir}/{file}"));
            }
            dir.truncate(dir.rfind('/').unwrap_or(0));
        }
    }
    out
}

/// Half of `available`, at least [`MIN_DEFAULT_MEMORY_LIMIT`];
/// [`FALLBACK_MEMORY_LIMIT`] when it is unknown.
pub fn memory_limit_for(available: Option<u64>) -> u64 {
    match available {
        Some(bytes) => (bytes / 2).max(MIN_DEFAULT_MEMORY_LIMIT),
        None => FALLBACK_MEMORY_LIMIT,
    }
}

/// The memory available to the process: the smallest of the physical RAM
/// and the cgroup limits that are set, from the contents of
/// `/proc/meminfo`, cgroup v2 `memory.max` and cgroup v1
/// `memory.limit_in_bytes` (each `None` when the file is absent). A v1
/// limit of "unlimited" is a huge number (about 2^63), which the minimum
/// takes care of.
pub fn available_memory(
    meminfo: Option<&str>,
    cgroup_v2_max: Option<&str>,
    cgroup_v1_limit: Option<&str>,
) -> Option<u64> {
    [
        meminfo.and_then(parse_mem_total),
        cgroup_v2_max.and_then(parse_cgroup_limit),
        cgroup_v1_limit.and_then(parse_cgroup_limit),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// `MemTotal` of `/proc/meminfo`, in bytes (the file says kB, meaning KiB).
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    let mult = match words.next() {
        None => 1,
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        Some(_) => return None,
    };
    n.checked_mul(mult).filter(|&b| b > 0)
}

/// A cgroup memory limit file: a number of bytes, or `max` (v2) for none.
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&b| b > 0)
}

/// The log target of the memory watch: `--log-level
/// info,event_backfill::memory=debug` shows the pool against RSS.
pub const MEMORY_TARGET: &str = "event_backfill::memory";

/// The process's resident memory now, from `/proc/self/statm` (Linux);
/// `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a constant name only reads.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages * p)
}

/// While alive, a task logs what DataFusion's memory pool holds beside the
/// process's resident memory, every `every`, at debug level under
/// [`MEMORY_TARGET`]; the highest of each on drop. The limit bounds RSS
/// only if what the pool does not see stays in the share it leaves
/// ([`pool_bytes`]): this is how that share is measured, on the user's
/// archive as on ours. Nothing runs when the target is off.
pub struct MemoryWatch {
    task: Option<tokio::task::JoinHandle<()>>,
    peaks: std::sync::Arc<std::sync::Mutex<(usize, u64)>>,
}

impl MemoryWatch {
    pub fn start(
        pool: std::sync::Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
        every: std::time::Duration,
    ) -> Self {
        let peaks = std::sync::Arc::new(std::sync::Mutex::new((0usize, 0u64)));
        let task = tracing::enabled!(target: MEMORY_TARGET, tracing::Level::DEBUG).then(|| {
            let peaks = peaks.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let reserved = pool.reserved();
                    let rss = resident_bytes().unwrap_or(0);
                    if let Ok(mut p) = peaks.lock() {
                        p.0 = p.0.max(reserved);
                        p.1 = p.1.max(rss);
                    }
                    tracing::debug!(
                        target: MEMORY_TARGET,
                        pool_reserved = reserved,
                        rss,
                        outside_pool = rss.saturating_sub(reserved as u64),
                        "memory: pool {} MiB, resident {} MiB",
                        reserved >> 20,
                        rss >> 20
                    );
                }
            })
        });
        Self { task, peaks }
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            if let Ok(p) = self.peaks.lock() {
                tracing::debug!(
                    target: MEMORY_TARGET,
                    pool_peak = p.0,
                    rss_peak = p.1,
                    "memory peaks: pool {} MiB, resident {} MiB",
                    p.0 >> 20,
                    p.1 >> 20
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO_24G: &str = "MemTotal:       24683652 kB\n\
                               MemFree:         1234567 kB\n\
                               MemAvailable:   20000000 kB\n";

    #[test]
    fn mem_total() {
        assert_eq!(parse_mem_total(MEMINFO_24G), Some(24683652 * 1024));
        assert_eq!(
            parse_mem_total("MemFree: 1 kB\nMemTotal: 2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
        assert_eq!(parse_mem_total(""), None);
    }

    #[test]
    fn cgroup_limits() {
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("2147483648\n"), Some(2 << 30));
        assert_eq!(
            parse_cgroup_limit("9223372036854771712\n"),
            Some(9223372036854771712)
        );
        assert_eq!(parse_cgroup_limit(""), None);
        assert_eq!(parse_cgroup_limit("0\n"), None);
    }

    #[test]
    fn available_is_the_smallest_known_limit() {
        let ram = 24683652 * 1024;
        // A host: no cgroup files.
        assert_eq!(available_memory(Some(MEMINFO_24G), None, None), Some(ram));
        // cgroup v2 without a limit, and with one.
        assert_eq!(
            available_memory(Some(MEMINFO_24G), Some("max\n"), None),
            Some(ram)
        );
        assert_eq!(
            available_memory(Some(MEMINFO_24G), Some("2147483648\n"), None),
            Some(2 << 30)
        );
        // cgroup v1 "unlimited" is above the RAM: the RAM wins.
        assert_eq!(
            available_memory(Some(MEMINFO_24G), None, Some("9223372036854771712\n")),
            Some(ram)
        );
        assert_eq!(
            available_memory(Some(MEMINFO_24G), None, Some("1073741824\n")),
            Some(1 << 30)
        );
        // No /proc/meminfo: a cgroup limit still counts.
        assert_eq!(
            available_memory(None, Some("1073741824"), None),
            Some(1 << 30)
        );
        assert_eq!(available_memory(None, Some("max"), None), None);
        assert_eq!(available_memory(None, None, None), None);
    }

    #[test]
    fn limit_is_half_with_a_floor() {
        assert_eq!(memory_limit_for(Some(24 << 30)), 12 << 30);
        assert_eq!(memory_limit_for(Some(2 << 30)), 1 << 30);
        assert_eq!(memory_limit_for(Some(300 << 20)), MIN_DEFAULT_MEMORY_LIMIT);
        assert_eq!(memory_limit_for(None), FALLBACK_MEMORY_LIMIT);
    }

    #[test]
    fn cgroup_files_of_the_process_and_its_ancestors() {
        let v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n";
        assert_eq!(
            cgroup_limit_files(v1),
            [
                "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
            ]
        );
        assert_eq!(
            cgroup_limit_files("0::/kubepods/pod1/c2\n"),
            [
                "/sys/fs/cgroup/kubepods/pod1/c2/memory.max",
                "/sys/fs/cgroup/kubepods/pod1/memory.max",
                "/sys/fs/cgroup/kubepods/memory.max",
            ]
        );
        assert!(
            cgroup_limit_files("0::/\n").is_empty(),
            "the root is read already"
        );
        assert!(cgroup_limit_files("garbage").is_empty());
    }

    #[test]
    fn this_machine_has_a_default() {
        let limit = default_memory_limit() as u64;
        assert!(limit >= MIN_DEFAULT_MEMORY_LIMIT, "{limit}");
    }
}
