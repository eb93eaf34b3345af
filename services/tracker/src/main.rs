//! `corral-tracker`: the tracker alone (also `corral serve tracker`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = corral_tracker::Cli::parse();
    let config = cli.flags.load(&corral_common::config::process_env())?;
    let telemetry = corral_common::telemetry::init("corral-tracker").map_err(anyhow::Error::msg)?;
    corral_common::admin::serve_from_env()
        .await
        .map_err(anyhow::Error::msg)?;
    let shutdown = corral_common::shutdown::signal_token();
    let result = corral_tracker::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(result?)
}
