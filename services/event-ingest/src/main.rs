//! `corral-event-ingest`: event ingest alone (also `corral serve event-ingest`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = corral_event_ingest::Cli::parse();
    let config = cli.flags.load(&corral_common::config::process_env())?;
    let telemetry =
        corral_common::telemetry::init("corral-event-ingest").map_err(anyhow::Error::msg)?;
    corral_common::admin::serve_from_env()
        .await
        .map_err(anyhow::Error::msg)?;
    let shutdown = corral_common::shutdown::signal_token();
    let result = corral_event_ingest::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(result?)
}
