//! `corral-tracker`: the tracker alone. See `corral serve tracker --help`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "corral-tracker",
    version,
    about = "corral's tracker: the single authority over run state"
)]
struct Cli {
    #[command(flatten)]
    flags: corral_tracker::config::Flags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.flags.load(&corral_common::config::process_env())?;
    let telemetry = corral_common::telemetry::init("corral-tracker").map_err(anyhow::Error::msg)?;
    let shutdown = corral_common::shutdown::signal_token();
    let result = corral_tracker::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(result?)
}
