//! `corral bench scale`: capacity by topology. For every combination of
//! spawner processes, tracker processes and NATS (the single server of
//! NATS_URL, and a 3-node cluster when `--cluster` names one), a fresh
//! private stack runs `bench runs` (runs/s, submit->running) and then
//! `bench stop` (a burst of stops, publish->process gone p99), and the
//! figures are printed as one table.

use std::process::ExitCode;

use anyhow::bail;

use super::stack::Stack;
use super::{RunsArgs, measure_runs, stop::stop_burst};
use crate::commands::Global;

#[derive(clap::Args)]
#[command(
    after_help = "Needs NATS_URL and DATABASE_URL; starts its own trackers and spawners under a \
fresh subject prefix per row and removes them after. With --cluster, the same rows again on a \
3-node JetStream cluster, every stream with three replicas.\n\n\
Example:\n  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres\n  \
corral bench scale --cluster \"$(scripts/cluster.sh start)\"\n  scripts/cluster.sh stop\n\n\
Prints one line per row, then one JSON object holding every row."
)]
pub struct ScaleArgs {
    /// Runs (agent `true`) per row.
    #[arg(long, default_value_t = 500)]
    runs: usize,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Sleeping sandboxes stopped at once per row.
    #[arg(long, default_value_t = 200)]
    stops: usize,
    /// Spawner processes per row, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    spawners: Vec<usize>,
    /// Tracker processes per row, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    trackers: Vec<usize>,
    /// A 3-node cluster's seed list (`scripts/cluster.sh start` prints
    /// it): every row again on it, streams with three replicas.
    #[arg(long, value_name = "URLS")]
    cluster: Option<String>,
}

pub async fn run(global: &Global, args: ScaleArgs) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.concurrency == 0 || args.stops == 0 {
        bail!("--runs, --concurrency and --stops must be positive");
    }
    if args.spawners.contains(&0) || args.trackers.contains(&0) {
        bail!("--spawners and --trackers count processes: each must be positive");
    }
    let mut targets = vec![("single", global.nats_url.clone(), 1)];
    if let Some(cluster) = &args.cluster {
        targets.push(("cluster", cluster.clone(), 3));
    }
    println!(
        "{:<8} {:>8} {:>8} {:>10} {:>14} {:>14} {:>12}",
        "nats", "trackers", "spawners", "runs/s", "running p50", "running p99", "stop p99"
    );
    let mut rows = Vec::new();
    let mut all_done = true;
    for (nats, url, replicas) in &targets {
        for trackers in &args.trackers {
            for spawners in &args.spawners {
                let row = measure(&args, url, *replicas, *trackers, *spawners).await?;
                let runs = &row["runs"];
                let stop = &row["stop"];
                println!(
                    "{:<8} {:>8} {:>8} {:>10} {:>11} ms {:>11} ms {:>9} ms",
                    nats,
                    trackers,
                    spawners,
                    runs["runs_per_sec"],
                    runs["submit_to_running_p50_ms"],
                    runs["submit_to_running_p99_ms"],
                    stop["stop_p99_ms"],
                );
                all_done &= runs["completed"].as_u64() == Some(args.runs as u64)
                    && stop["gone"].as_u64() == Some(args.stops as u64);
                rows.push(serde_json::json!({
                    "nats": nats,
                    "trackers": trackers,
                    "spawners": spawners,
                    "runs_per_sec": runs["runs_per_sec"],
                    "submit_to_running_p50_ms": runs["submit_to_running_p50_ms"],
                    "submit_to_running_p99_ms": runs["submit_to_running_p99_ms"],
                    "stop_p99_ms": stop["stop_p99_ms"],
                    "runs": runs,
                    "stop": stop,
                }));
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "scale",
            "runs": args.runs,
            "concurrency": args.concurrency,
            "stops": args.stops,
            "rows": rows,
        })
    );
    Ok(if all_done {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One row: a fresh stack with `trackers` trackers and `spawners`
/// spawners on `nats_url`, its runs, then its stop burst.
async fn measure(
    args: &ScaleArgs,
    nats_url: &str,
    replicas: usize,
    trackers: usize,
    spawners: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut stack = Stack::new(nats_url, "scale").await?;
    let result = async {
        let replicated: Vec<(String, String)> = ["COMMANDS", "LIFECYCLE", "EVENTS", "DEAD_LETTERS"]
            .iter()
            .map(|name| {
                (
                    format!("CORRAL_STREAMS__{name}__REPLICAS"),
                    replicas.to_string(),
                )
            })
            .collect();
        let streams: Vec<(&str, String)> = replicated
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone()))
            .collect();
        for _ in 0..trackers {
            stack.spawn("tracker", &streams)?;
        }
        stack.wait_for_tracker().await?;
        let per_spawner = (args.stops.max(args.concurrency)).div_ceil(spawners) + 8;
        let mut pids = Vec::new();
        for i in 0..spawners {
            let mut env = streams.clone();
            env.push(("CORRAL_SPAWNER_ID", format!("{}-spawner-{i}", stack.prefix)));
            env.push(("CORRAL_MAX_RUNS", per_spawner.to_string()));
            pids.push(stack.spawn("spawner", &env)?);
        }
        // Every spawner has heartbeated before the clock starts.
        let mut waited = 0;
        while stack
            .client
            .spawners()
            .await
            .map(|alive| {
                alive
                    .iter()
                    .filter(|s| s.spawner_id.starts_with(&stack.prefix))
                    .count()
            })
            .unwrap_or(0)
            < spawners
        {
            waited += 1;
            if waited > 300 {
                bail!("{spawners} spawners did not all heartbeat within 30 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        eprintln!(
            "{nats_url}: {trackers} tracker(s), {spawners} spawner(s): {} runs",
            args.runs
        );
        let runs = measure_runs(
            &stack.client,
            &RunsArgs {
                count: args.runs,
                concurrency: args.concurrency,
                run_timeout: 60,
                argv: Vec::new(),
            },
        )
        .await?;
        let stop = stop_burst(&stack, args.stops, &pids, false).await?;
        Ok::<_, anyhow::Error>(serde_json::json!({"runs": runs, "stop": stop}))
    }
    .await;
    stack.teardown().await;
    result
}
