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
cost_p50_ms, cost_p99_ms.\n\nExample:\n  corral bench isolation --count 200"
)]
pub struct IsolationArgs {
    /// Sandboxes per mode.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Directory for the sandboxes [default: a new directory under the temporary directory, removed
    /// at the end].
    #[arg(long, value_name = "DIR")]
    home: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Phases {
    create: Vec<f64>,
    first: Vec<f64>,
    kill: Vec<f64>,
    start: Vec<f64>,
}

async fn measure(provider: &LocalProvider, count: usize) -> Result<Phases, ProviderError> {
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
    if args.count == 0 {
        bail!("--count must be positive");
    }
    let scratch =
        std::env::temp_dir().join(format!("corral-bench-isolation-{}", std::process::id()));
    let home = args.home.unwrap_or_else(|| scratch.clone());
    let mut results = Vec::new();
    for isolation in [Isolation::Namespaces, Isolation::None] {
        let config = LocalConfig {
            isolation,
            ..Default::default()
        };
        let provider = LocalProvider::new(&home.join(format!("{isolation:?}")), &config)
            .context("the local provider")?;
        // A few sandboxes first, so caches are warm for both modes alike.
        measure(&provider, 5.min(args.count)).await?;
        let mut phases = measure(&provider, args.count).await?;
        println!("isolation {isolation:?}, {} sandboxes:", args.count);
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
        })
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(ExitCode::SUCCESS)
}
