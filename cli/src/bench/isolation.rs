//! `corral bench isolation`: what a sandbox's namespaces and control groups
//! cost at start. Self-contained (no NATS, no database): it creates local
//! sandboxes with `isolation: namespaces` and with `isolation: none`, runs
//! `true` in each and kills it, and prints the percentiles of each phase and
//! the difference.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use corral_provider::{
    CreateSpec, ExecSpec, Isolation, LocalConfig, LocalProvider, Provider, ProviderError,
};

use super::{ms, percentile, round};

#[derive(clap::Args)]
#[command(
    after_help = "Prints, for each isolation mode, the percentiles of create (the sandbox \
up and ready), first command (start of `true` to its exit) and kill; then the isolation cost per \
sandbox start (create + first command, namespaces minus none). The last line is JSON with \
isolated_start_p50_ms, isolated_start_p99_ms, plain_start_p50_ms, plain_start_p99_ms, \
cost_p50_ms, cost_p99_ms, and isolated_per_sec and plain_per_sec: sandboxes created, run and \
killed per second at --concurrency.\n\nExamples:\n  corral bench isolation --count 200\n  \
corral bench isolation --count 1000 --concurrency 8   # the ceiling of `bench runs` here"
)]
pub struct IsolationArgs {
    /// Sandboxes per mode.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Directory for the sandboxes [default: a new directory under the temporary directory, removed
    /// at the end].
    #[arg(long, value_name = "DIR")]
    home: Option<std::path::PathBuf>,
    /// Sandboxes in flight at once. Above 1 the phases overlap, and the
    /// figure to read is sandboxes/s: the provider alone (no NATS, no
    /// database, no spawner) running the `true` of `bench runs` in a sandbox
    /// of its own. That is the ceiling of runs/s on this machine.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

#[derive(Default)]
struct Phases {
    create: Vec<f64>,
    first: Vec<f64>,
    kill: Vec<f64>,
    start: Vec<f64>,
}

/// `count` sandboxes, `concurrency` at a time, each created, running `true`
/// and killed; the phases of all, and their rate.
async fn measure(
    provider: &LocalProvider,
    count: usize,
    concurrency: usize,
) -> Result<(Phases, f64), ProviderError> {
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency.min(count) {
        let provider = provider.clone();
        // Worker w takes sandboxes w, w + concurrency, ...
        let share = (count - worker).div_ceil(concurrency);
        workers.spawn(async move { cycle(&provider, share).await });
    }
    let mut phases = Phases::default();
    while let Some(worker) = workers.join_next().await {
        let done = worker.map_err(|err| ProviderError::Failed(err.to_string()))??;
        phases.create.extend(done.create);
        phases.first.extend(done.first);
        phases.kill.extend(done.kill);
        phases.start.extend(done.start);
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    Ok((phases, rate))
}

/// `count` sandboxes one after another.
async fn cycle(provider: &LocalProvider, count: usize) -> Result<Phases, ProviderError> {
    let mut phases = Phases::default();
    let spec = CreateSpec {
        run_id: "bench".into(),
        memory_mib: 1024,
        cpu_secs: 60,
        ..Default::default()
    };
    let exec = ExecSpec {
        argv: vec!["true".into()],
        env: Default::default(),
    };
    for _ in 0..count {
        let started = Instant::now();
        let sandbox = provider.create(&spec).await?;
        let created = Instant::now();
        let execution = provider.exec(&sandbox.id, &exec).await?;
        let status = execution.process.wait().await;
        if !status.success() {
            return Err(ProviderError::Failed(format!("true exited {status:?}")));
        }
        let ran = Instant::now();
        provider.kill(&sandbox.id).await?;
        let killed = Instant::now();
        phases.create.push(ms(created - started));
        phases.first.push(ms(ran - created));
        phases.kill.push(ms(killed - ran));
        phases.start.push(ms(ran - started));
    }
    Ok(phases)
}

fn line(name: &str, samples: &mut [f64]) -> (f64, f64) {
    let (p50, p99) = (percentile(samples, 0.50), percentile(samples, 0.99));
    println!("  {name:<14} p50 {p50:>7.2} ms   p99 {p99:>7.2} ms");
    (p50, p99)
}

pub async fn run(args: IsolationArgs) -> anyhow::Result<ExitCode> {
    if args.count == 0 || args.concurrency == 0 {
        bail!("--count and --concurrency must be positive");
    }
    let scratch =
        std::env::temp_dir().join(format!("corral-bench-isolation-{}", std::process::id()));
    let home = args.home.unwrap_or_else(|| scratch.clone());
    let mut results = Vec::new();
    let mut rates = Vec::new();
    for isolation in [Isolation::Namespaces, Isolation::None] {
        let config = LocalConfig {
            isolation,
            ..Default::default()
        };
        let provider = LocalProvider::new(&home.join(format!("{isolation:?}")), &config)
            .context("the local provider")?;
        // A few sandboxes first, so caches are warm for both modes alike.
        measure(&provider, 5.min(args.count), 1).await?;
        let (mut phases, rate) = measure(&provider, args.count, args.concurrency).await?;
        println!(
            "isolation {isolation:?}, {} sandboxes, {} at a time: {rate:.1} sandboxes/s",
            args.count, args.concurrency
        );
        rates.push(rate);
        line("create", &mut phases.create);
        line("first command", &mut phases.first);
        line("kill", &mut phases.kill);
        results.push(line("start", &mut phases.start));
    }
    let ((iso50, iso99), (plain50, plain99)) = (results[0], results[1]);
    let (cost50, cost99) = (iso50 - plain50, iso99 - plain99);
    println!("isolation cost per sandbox start: p50 {cost50:.2} ms, p99 {cost99:.2} ms");
    println!(
        "{}",
        serde_json::json!({
            "isolated_start_p50_ms": round(iso50),
            "isolated_start_p99_ms": round(iso99),
            "plain_start_p50_ms": round(plain50),
            "plain_start_p99_ms": round(plain99),
            "cost_p50_ms": round(cost50),
            "cost_p99_ms": round(cost99),
            "concurrency": args.concurrency,
            "isolated_per_sec": round(rates[0]),
            "plain_per_sec": round(rates[1]),
        })
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(ExitCode::SUCCESS)
}
