//! `/healthz` and `/readyz` on every service's admin port
//! (`CORRAL_METRICS_ADDR`), with the fault really injected: a private
//! PostgreSQL stopped under a tracker process.

use std::time::Duration;

use corral_tests::{PrivatePostgres, TestEnv, eventually};
use reqwest::StatusCode;

const LIMIT: Duration = Duration::from_secs(60);

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("addr").to_string()
}

async fn get(addr: &str, path: &str) -> Option<(StatusCode, String)> {
    let response = corral_tests::http()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = response.status();
    Some((status, response.text().await.unwrap_or_default()))
}

async fn until_status(addr: &str, path: &str, want: StatusCode) -> String {
    eventually(
        &format!("{path} on {addr} answers {want}"),
        LIMIT,
        || async {
            get(addr, path)
                .await
                .filter(|(status, _)| *status == want)
                .map(|(_, body)| body)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_postgres_and_healthz_stays_up() {
    let env = TestEnv::new().await;
    let postgres = PrivatePostgres::start();
    let tracker_addr = free_addr();
    let database_url = postgres.url();
    let mut tracker = env.spawn_service_process(
        "tracker",
        &[
            ("CORRAL_METRICS_ADDR", &tracker_addr),
            ("DATABASE_URL", &database_url),
        ],
    );
    until_status(&tracker_addr, "/readyz", StatusCode::OK).await;
    until_status(&tracker_addr, "/healthz", StatusCode::OK).await;
    until_status(&tracker_addr, "/metrics", StatusCode::OK).await;

    let spawner_addr = free_addr();
    let mut spawner =
        env.spawn_service_process("spawner", &[("CORRAL_METRICS_ADDR", &spawner_addr)]);
    until_status(&spawner_addr, "/readyz", StatusCode::OK).await;

    postgres.stop();
    let body = until_status(&tracker_addr, "/readyz", StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(body.contains("tracker.postgres"), "names the check: {body}");
    let metrics = until_status(&tracker_addr, "/metrics", StatusCode::OK).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("corral_probe_failures_total{check=\"tracker.postgres\"}")),
        "the failed probe is counted: {metrics}"
    );
    assert_eq!(
        get(&tracker_addr, "/healthz").await.map(|(s, _)| s),
        Some(StatusCode::OK),
        "alive while not ready"
    );
    postgres.start_again();
    until_status(&tracker_addr, "/readyz", StatusCode::OK).await;

    let _ = spawner.kill().await;
    let _ = tracker.kill().await;
    env.cleanup().await;
}
