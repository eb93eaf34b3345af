//! `corral-reaper`: the reaper alone (also `corral serve reaper`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = corral_reaper::Cli::parse();
    let config = cli.flags.load(&corral_common::config::process_env())?;
    let telemetry = corral_common::telemetry::init("corral-reaper").map_err(anyhow::Error::msg)?;
    corral_common::admin::serve_from_env()
        .await
        .map_err(anyhow::Error::msg)?;
    let shutdown = corral_common::shutdown::signal_token();
    let result = corral_reaper::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(result?)
}
