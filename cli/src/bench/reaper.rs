//! `corral bench reaper`: the cost of a sweep that finds nothing due over a
//! large history, and the time from a deadline passing to the sandbox being
//! gone while its owner is frozen (SIGSTOP), so only the reaper can act.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_proto::v1::{RunCommand, RunSpec, RunState};
use corral_provider::{
    CreateSpec, LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, LocalConfig, LocalProvider, Provider,
};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use super::stack::{Stack, exited};
use super::stop::pids_by_sandbox;
use super::{ms, percentile, round};
use crate::commands::Global;

#[derive(clap::Args)]
#[command(
    after_help = "Needs NATS_URL and DATABASE_URL (a role that may create databases): it seeds a \
scratch database, starts its own tracker and spawner, and removes them after.\n\nExample:\n  corral bench reaper --runs 100000 --live 1000"
)]
pub struct ReaperArgs {
    /// Terminal runs in the seeded history.
    #[arg(long, default_value_t = 100_000)]
    runs: usize,
    /// Live runs (each with a sandbox on disk) in the seeded history.
    #[arg(long, default_value_t = 1000)]
    live: usize,
    /// Sweeps to time.
    #[arg(long, default_value_t = 200)]
    sweeps: usize,
    /// Runs whose deadline the frozen owner misses.
    #[arg(long, default_value_t = 20)]
    deadline_runs: usize,
    /// The reaper's sweep period for the deadline measurement, ms.
    #[arg(long, default_value_t = 1000)]
    sweep_period_ms: u64,
    /// The reaper's backstop grace for the deadline measurement, ms.
    #[arg(long, default_value_t = 500)]
    backstop_grace_ms: u32,
}

pub async fn run(global: &Global, args: ReaperArgs) -> anyhow::Result<ExitCode> {
    let mut stack = Stack::new(&global.nats_url, "reaper").await?;
    let admin = stack.database_url.clone();
    let scratch = format!("corral_bench_{}", stack.prefix.replace('-', "_"));
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .context("cannot connect to DATABASE_URL")?;
    sqlx::query(&format!("CREATE DATABASE {scratch}"))
        .execute(&mut conn)
        .await?;
    stack.database_url = replace_database(&admin, &scratch);
    let result = measure(&mut stack, &args).await;
    stack.teardown().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
    result
}

pub fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    match base.rfind('/') {
        Some(slash) if base[..slash].contains("//") && slash > base.find("//").unwrap_or(0) + 1 => {
            format!("{}/{name}{query}", &base[..slash])
        }
        _ => format!("{base}/{name}{query}"),
    }
}

async fn measure(stack: &mut Stack, args: &ReaperArgs) -> anyhow::Result<ExitCode> {
    stack.spawn("tracker", &[])?;
    stack.wait_for_tracker().await?;
    let provider = Arc::new(LocalProvider::new(&stack.home, &LocalConfig::default())?);

    // Seed: live runs own real (idle) sandboxes, so reconciliation finds
    // nothing to do; the owner heartbeats far into the future.
    eprintln!("seeding {} terminal and {} live runs", args.runs, args.live);
    let mut sandbox_ids = Vec::with_capacity(args.live);
    for i in 0..args.live {
        let mut labels = Labels::new();
        labels.insert(LABEL_RUN_ID.into(), format!("live-{i}"));
        labels.insert(LABEL_DEPLOYMENT.into(), stack.prefix.clone());
        let created = provider
            .create(&CreateSpec {
                run_id: format!("live-{i}"),
                labels,
                ..Default::default()
            })
            .await;
        match created {
            Ok(sandbox) => sandbox_ids.push(sandbox.id),
            Err(err) => {
                // Leave nothing behind: every sandbox seeded so far goes.
                for id in &sandbox_ids {
                    let _ = provider.kill(id).await;
                }
                return Err(err).with_context(|| {
                    format!(
                        "seeding live run {i} of {} (each holds a real sandbox)",
                        args.live
                    )
                });
            }
        }
    }
    let pool = sqlx::PgPool::connect(&stack.database_url).await?;
    sqlx::query(
        "INSERT INTO runs (run_id, state, spec, provider, timeout_secs, idle_timeout_secs, owner, sandbox_id,
                           created_at, booting_at, running_at, finished_at, exit_code)
         SELECT 'done-' || g, 'completed', ''::bytea, 'local', 300, 60, 'gone-spawner', 'sbx-gone-' || g,
                now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 0
         FROM generate_series(1, $1) g",
    )
    .bind(args.runs as i64)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO runs (run_id, state, spec, provider, timeout_secs, idle_timeout_secs, owner, sandbox_id,
                           sandbox_epoch, booting_at, running_at, deadline_at, last_activity_at)
         SELECT 'live-' || (i - 1), 'running', ''::bytea, 'local', 86400, 86400, 'bench-owner', id, 1,
                now(), now(), now() + interval '1 day', now() + interval '1 day'
         FROM unnest($1::text[]) WITH ORDINALITY AS s(id, i)",
    )
    .bind(&sandbox_ids)
    .execute(&pool)
    .await?;
    sqlx::query("INSERT INTO spawners (spawner_id, heartbeat_at) VALUES ('bench-owner', now() + interval '1 day')")
        .execute(&pool)
        .await?;
    sqlx::query("ANALYZE runs").execute(&pool).await?;
    pool.close().await;

    let config = corral_reaper::Config {
        nats_url: stack.nats_url.clone(),
        subject_prefix: stack.prefix.clone(),
        home: stack.home.clone(),
        sweep_period_ms: args.sweep_period_ms,
        backstop_grace_ms: args.backstop_grace_ms,
        ..Default::default()
    };
    let reaper =
        corral_reaper::sweep::Reaper::new(stack.client.clone(), provider.clone(), &config, "bench");
    eprintln!("timing {} sweeps", args.sweeps);
    let mut durations = Vec::with_capacity(args.sweeps);
    for _ in 0..args.sweeps {
        // The leader's sweep and this node's reconciliation (which the local
        // provider's sandboxes get from their own node's reaper).
        let report = reaper.sweep().await?;
        let node = reaper.reconcile_node().await?;
        if report.acted() || node.acted() {
            bail!("a sweep over the seeded history acted: {report:?} {node:?}");
        }
        durations.push(ms(report.duration + node.duration));
    }
    for id in &sandbox_ids {
        provider.kill(id).await?;
    }

    // Deadlines with a frozen owner.
    let spawner = stack.spawn(
        "spawner",
        &[("CORRAL_SPAWNER_ID", "bench-frozen".to_owned())],
    )?;
    let mut ids = Vec::new();
    for i in 0..args.deadline_runs {
        let command = RunCommand {
            run_id: format!("deadline-{i}"),
            spec: Some(RunSpec {
                argv: vec!["sleep".into(), "3600".into()],
                timeout_secs: 3,
                idle_timeout_secs: 3600,
                ..Default::default()
            }),
            requested_by: "bench".into(),
            submitted_at_ms: corral_common::now_ms(),
        };
        stack.client.start_run(&command).await?;
        ids.push(command.run_id);
    }
    let mut runs = Vec::new();
    for id in &ids {
        let started = Instant::now();
        loop {
            let run = stack.client.get(id).await?;
            if run.state() == RunState::Running {
                runs.push(run);
                break;
            }
            if started.elapsed() > Duration::from_secs(30) || run.state().is_terminal() {
                bail!(
                    "run {id} did not start: {} {}",
                    run.state().name(),
                    run.reason
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(spawner as i32, libc::SIGSTOP) };
    let shutdown = CancellationToken::new();
    let reaper_task = tokio::spawn(corral_reaper::run(config.clone(), shutdown.clone()));
    let mut pids = pids_by_sandbox();
    let looking = Instant::now();
    while runs.iter().any(|r| !pids.contains_key(&r.sandbox_id))
        && looking.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        pids = pids_by_sandbox();
    }
    let mut waits = Vec::new();
    for run in &runs {
        let pid = *pids
            .get(&run.sandbox_id)
            .and_then(|p| p.first())
            .context("no process for a deadline run")?;
        let deadline_ms = run.deadline_at_ms;
        waits.push(tokio::spawn(async move {
            let _ = exited(pid).await;
            corral_common::now_ms() - deadline_ms
        }));
    }
    let mut to_kill = Vec::new();
    for wait in waits {
        if let Ok(Ok(late)) = tokio::time::timeout(Duration::from_secs(60), wait).await {
            to_kill.push(late.max(0) as f64);
        }
    }
    shutdown.cancel();
    let _ = reaper_task.await;
    // SAFETY: as above.
    unsafe { libc::kill(spawner as i32, libc::SIGCONT) };

    let figures = serde_json::json!({
        "bench": "reaper",
        "runs": args.runs,
        "live": args.live,
        "sweeps": args.sweeps,
        "sweep_p50_ms": round(percentile(&mut durations, 0.50)),
        "sweep_p99_ms": round(percentile(&mut durations, 0.99)),
        "deadline_runs": to_kill.len(),
        "sweep_period_ms": args.sweep_period_ms,
        "backstop_grace_ms": args.backstop_grace_ms,
        "deadline_to_kill_p50_ms": round(percentile(&mut to_kill, 0.50)),
        "deadline_to_kill_p99_ms": round(percentile(&mut to_kill, 0.99)),
    });
    println!(
        "sweep finding nothing due over {} terminal + {} live runs: p50 {} ms, p99 {} ms",
        args.runs, args.live, figures["sweep_p50_ms"], figures["sweep_p99_ms"]
    );
    println!(
        "deadline -> sandbox gone, owner frozen ({} runs, period {} ms, grace {} ms): p50 {} ms, p99 {} ms",
        to_kill.len(),
        args.sweep_period_ms,
        args.backstop_grace_ms,
        figures["deadline_to_kill_p50_ms"],
        figures["deadline_to_kill_p99_ms"]
    );
    println!("{figures}");
    Ok(if to_kill.len() == runs.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn the_scratch_database_replaces_the_path() {
        assert_eq!(
            replace_database("postgres://u:p@h:5432/postgres", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            replace_database("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h", "x"), "postgres://h/x");
    }
}
