//! `corral-spawner`: the spawner alone (also `corral serve spawner`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = corral_spawner::Cli::parse();
    let config = cli.flags.load(&corral_common::config::process_env())?;
    let telemetry = corral_common::telemetry::init("corral-spawner").map_err(anyhow::Error::msg)?;
    corral_common::admin::serve_from_env()
        .await
        .map_err(anyhow::Error::msg)?;
    let shutdown = corral_common::shutdown::signal_token();
    let result = corral_spawner::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(result?)
}
