//! The admin port of every service (`CORRAL_METRICS_ADDR`, e.g.
//! `127.0.0.1:9464`): Prometheus `/metrics`, `/healthz` (the process is
//! alive: always 200) and `/readyz` (200 when every readiness check passes,
//! 503 with the failing ones otherwise). Services register their checks
//! ([`ready_check`]) when they start: NATS connected, and PostgreSQL
//! reachable where they use it. `corral up` serves the checks of all four.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Check = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks are kept only when the admin port is served (a test process runs
/// many services and serves none).
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn checks() -> &'static Mutex<Vec<(String, Check)>> {
    static CHECKS: OnceLock<Mutex<Vec<(String, Check)>>> = OnceLock::new();
    CHECKS.get_or_init(Default::default)
}

/// Adds a readiness check named `name` (e.g. `tracker.postgres`); `/readyz`
/// answers 503 while any check fails.
pub fn ready_check<F, Fut>(name: &str, check: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    if !SERVING.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let check: Check = Arc::new(move || Box::pin(check()));
    checks()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((name.to_owned(), check));
}

/// Marks a service as starting: `/readyz` fails (`<name>.started:
/// starting`) until the returned flag's [`Starting::done`] is called, once
/// the service has connected, migrated and subscribed.
pub fn starting(name: &str) -> Starting {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = flag.clone();
    ready_check(&format!("{name}.started"), move || {
        let started = seen.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if started {
                Ok(())
            } else {
                Err("starting".into())
            }
        }
    });
    Starting(flag)
}

/// See [`starting`].
pub struct Starting(Arc<std::sync::atomic::AtomicBool>);

impl Starting {
    pub fn done(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A readiness check that NATS is connected.
pub fn nats_check(name: &str, client: async_nats::Client) {
    ready_check(name, move || {
        let state = client.connection_state();
        async move {
            match state {
                async_nats::connection::State::Connected => Ok(()),
                other => Err(format!("nats {other}")),
            }
        }
    });
}

/// Runs every check; the failures, by name.
pub async fn failures() -> Vec<(String, String)> {
    let list: Vec<(String, Check)> = checks().lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut failed = Vec::new();
    for (name, check) in list {
        match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failed.push((name, why)),
            Err(_) => failed.push((name, format!("no answer within {CHECK_TIMEOUT:?}"))),
        }
    }
    failed
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `CORRAL_METRICS_ADDR` when
/// it is set (metrics are no-ops otherwise). Returns the bound address.
pub async fn serve_from_env() -> Result<Option<std::net::SocketAddr>, String> {
    let Ok(addr) = std::env::var("CORRAL_METRICS_ADDR") else {
        return Ok(None);
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|err| format!("CORRAL_METRICS_ADDR {addr:?} is not host:port: {err}"))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| format!("cannot record metrics: {err}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| format!("cannot listen on CORRAL_METRICS_ADDR {addr}: {err}"))?;
    let bound = listener.local_addr().map_err(|err| err.to_string())?;
    SERVING.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router(handle)).await {
            tracing::warn!(error = %err, "admin server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(Some(bound))
}

fn router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|| async {
                let registered = !checks()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty();
                if !registered {
                    // The process serves before its services began to start.
                    return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned());
                }
                let failed = failures().await;
                if failed.is_empty() {
                    return (StatusCode::OK, "ready\n".to_owned());
                }
                for (name, _) in &failed {
                    metrics::counter!("corral_probe_failures_total", "check" => name.clone())
                        .increment(1);
                }
                let lines: Vec<String> = failed
                    .iter()
                    .map(|(name, why)| format!("{name}: {why}\n"))
                    .collect();
                (StatusCode::SERVICE_UNAVAILABLE, lines.concat())
            }),
        )
}
