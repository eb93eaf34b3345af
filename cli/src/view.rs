//! How a run is shown: one JSON shape (`--json`) and a human summary.

use chrono::{DateTime, Utc};
use corral_proto::v1::Run;
use serde::Serialize;
use std::collections::BTreeMap;

/// The JSON form of a run. Times are RFC 3339 (UTC) or null.
#[derive(Serialize)]
pub struct RunView {
    pub run_id: String,
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub owner: String,
    /// The owner got SIGTERM and is draining (`corral ls` fills it in).
    pub owner_draining: bool,
    pub sandbox_id: String,
    pub sandbox_epoch: u32,
    pub provider: String,
    pub argv: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub timeout_secs: i32,
    pub idle_timeout_secs: i32,
    pub requested_by: String,
    pub stop_requested_at: Option<String>,
    pub stop_reason: String,
    pub stop_requested_by: String,
    pub created_at: Option<String>,
    pub booting_at: Option<String>,
    pub running_at: Option<String>,
    pub finalizing_at: Option<String>,
    pub finished_at: Option<String>,
    pub deadline_at: Option<String>,
    pub last_activity_at: Option<String>,
    pub updated_at: Option<String>,
    pub version: u64,
    pub keep_alive: bool,
    pub turn: u32,
    pub session_id: String,
    pub idle_pause_secs: i32,
    pub idle_at: Option<String>,
    pub paused_at: Option<String>,
    pub resource_class: String,
    pub cost_usd: f64,
    pub billed_running_ms: i64,
    pub billed_paused_ms: i64,
}

pub fn time(ms: i64) -> Option<String> {
    if ms <= 0 {
        return None;
    }
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

impl From<&Run> for RunView {
    fn from(run: &Run) -> RunView {
        let spec = run.spec.clone().unwrap_or_default();
        RunView {
            run_id: run.run_id.clone(),
            state: run.state().name(),
            exit_code: run.exit_code,
            reason: run.reason.clone(),
            owner: run.owner.clone(),
            owner_draining: false,
            sandbox_id: run.sandbox_id.clone(),
            sandbox_epoch: run.sandbox_epoch,
            provider: run.provider.clone(),
            keep_alive: spec.keep_alive,
            argv: spec.argv,
            labels: spec.labels.into_iter().collect(),
            timeout_secs: run.timeout_secs,
            idle_timeout_secs: run.idle_timeout_secs,
            requested_by: run.requested_by.clone(),
            stop_requested_at: time(run.stop_requested_at_ms),
            stop_reason: run.stop_reason.clone(),
            stop_requested_by: run.stop_requested_by.clone(),
            created_at: time(run.created_at_ms),
            booting_at: time(run.booting_at_ms),
            running_at: time(run.running_at_ms),
            finalizing_at: time(run.finalizing_at_ms),
            finished_at: time(run.finished_at_ms),
            deadline_at: time(run.deadline_at_ms),
            last_activity_at: time(run.last_activity_at_ms),
            updated_at: time(run.updated_at_ms),
            version: run.version,
            turn: run.turn,
            session_id: run.session_id.clone(),
            idle_pause_secs: run.idle_pause_secs,
            idle_at: time(run.idle_at_ms),
            paused_at: time(run.paused_at_ms),
            resource_class: run.resource_class.clone(),
            cost_usd: run.cost_usd,
            billed_running_ms: run.billed_running_ms,
            billed_paused_ms: run.billed_paused_ms,
        }
    }
}

/// `corral status` without `--json`.
pub fn describe(run: &Run) -> String {
    let view = RunView::from(run);
    let mut lines = vec![
        format!("run         {}", view.run_id),
        format!("state       {}", view.state),
    ];
    let mut push = |name: &str, value: String| {
        if !value.is_empty() {
            lines.push(format!("{name:<11} {value}"));
        }
    };
    push(
        "exit code",
        view.exit_code.map(|c| c.to_string()).unwrap_or_default(),
    );
    push("reason", view.reason.clone());
    push("command", view.argv.join(" "));
    push(
        "labels",
        view.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    push("owner", view.owner.clone());
    push("sandbox", view.sandbox_id.clone());
    push(
        "provider",
        format!("{} ({})", view.provider, view.resource_class),
    );
    if view.keep_alive {
        push(
            "session",
            format!(
                "kept: turn {}, pause after {}s idle, lifetime {}s",
                view.turn, view.idle_pause_secs, view.timeout_secs
            ),
        );
        push("session id", view.session_id.clone());
    }
    push(
        "timeouts",
        format!(
            "{}s absolute, {}s inactivity",
            view.timeout_secs, view.idle_timeout_secs
        ),
    );
    push(
        "cost",
        format!(
            "${:.6} ({} running, {} paused)",
            view.cost_usd,
            hms(view.billed_running_ms),
            hms(view.billed_paused_ms)
        ),
    );
    for (name, value) in [
        ("created", &view.created_at),
        ("booting", &view.booting_at),
        ("running", &view.running_at),
        ("finalizing", &view.finalizing_at),
        ("idle since", &view.idle_at),
        ("last paused", &view.paused_at),
        ("finished", &view.finished_at),
        ("deadline", &view.deadline_at),
        ("stop asked", &view.stop_requested_at),
    ] {
        push(name, value.clone().unwrap_or_default());
    }
    if view.stop_requested_at.is_some() {
        push(
            "stop by",
            format!("{} ({})", view.stop_requested_by, view.stop_reason),
        );
    }
    lines.join("\n")
}

/// Milliseconds as `1h02m03.004s`.
pub fn hms(ms: i64) -> String {
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = rest as f64 / 1000.0;
    match (h, m) {
        (0, 0) => format!("{secs:.3}s"),
        (0, m) => format!("{m}m{secs:06.3}s"),
        (h, m) => format!("{h}h{m:02}m{secs:06.3}s"),
    }
}

/// One line of `corral ls`.
pub fn row(run: &Run, draining: bool) -> String {
    let spec = run.spec.clone().unwrap_or_default();
    let exit = run
        .exit_code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "-".into());
    let created = time(run.created_at_ms).unwrap_or_default();
    let owner = match (run.owner.as_str(), draining) {
        ("", _) => "-".to_owned(),
        (owner, true) => format!("{owner} (draining)"),
        (owner, false) => owner.to_owned(),
    };
    format!(
        "{:<36}  {:<10}  {:>4}  {:<24}  {:>10.6}  {:<32}  {}",
        run.run_id,
        run.state().name(),
        exit,
        created,
        run.cost_usd,
        owner,
        spec.argv.join(" ")
    )
}
