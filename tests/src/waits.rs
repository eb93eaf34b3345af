//! Waits: polling until something happens, waiting for runs to reach a
//! state or end, and what the runs came to.

use std::future::Future;
use std::time::{Duration, Instant};

use corral_client::Client;
use corral_proto::v1::{LifecycleEvent, Run};

use crate::TestEnv;

/// Polls `check` until it returns `Some`, or panics after `limit` saying
/// what never happened.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a tracker answers on `client`'s prefix (a refusal of an
/// unknown run is an answer); `what` says which, should it never.
pub async fn tracker_answers(client: &Client, what: &str) {
    eventually(what, Duration::from_secs(30), || async {
        client.get("probe").await.err()?.code().map(|_| ())
    })
    .await;
}

impl TestEnv {
    /// How many runs ended up in each state, with the reason when there is
    /// one (`failed (owner_lost)`), for a test's summary line.
    pub async fn outcome_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let pool = self.pool().await;
        let outcomes: Vec<(String, String)> = sqlx::query_as("SELECT state, reason FROM runs")
            .fetch_all(&pool)
            .await
            .expect("runs");
        pool.close().await;
        let mut counts = std::collections::BTreeMap::new();
        for (state, reason) in outcomes {
            let key = if reason.is_empty() {
                state
            } else {
                format!("{state} ({reason})")
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    }

    /// Waits until the run is terminal.
    pub async fn wait_terminal(&self, client: &Client, run_id: &str, limit: Duration) -> Run {
        client
            .wait_terminal(run_id, limit)
            .await
            .unwrap_or_else(|err| panic!("run {run_id} did not end: {err}"))
    }

    /// Waits until the run is in `state`, on the run's lifecycle subject;
    /// fails at once if it ends first.
    pub async fn wait_state(
        &self,
        client: &Client,
        run_id: &str,
        state: corral_proto::v1::RunState,
    ) -> Run {
        let limit = Duration::from_secs(60);
        let run = client
            .wait_until(run_id, limit, |run| {
                run.state() == state || run.state().is_terminal()
            })
            .await
            .unwrap_or_else(|err| panic!("run {run_id} never reached {}: {err}", state.name()));
        assert_eq!(
            run.state(),
            state,
            "run {run_id} ended {} ({}) before reaching {}",
            run.state().name(),
            run.reason,
            state.name()
        );
        run
    }

    /// Waits until the run's history (`run_transitions`) has `rows` rows and
    /// the lifecycle stream announces exactly those rows, once each, in
    /// order; returns the announcements.
    pub async fn wait_lifecycle(&self, run_id: &str, rows: usize) -> Vec<LifecycleEvent> {
        let pool = self.pool().await;
        let announced = eventually(
            &format!("the lifecycle stream announces the {rows} transitions of run {run_id}"),
            Duration::from_secs(30),
            || async {
                let history: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT to_state, version FROM run_transitions WHERE run_id = $1 ORDER BY id",
                )
                .bind(run_id)
                .fetch_all(&pool)
                .await
                .ok()?;
                let announced = self.lifecycle(run_id).await;
                (history.len() == rows && announced.len() >= rows).then_some((history, announced))
            },
        )
        .await;
        pool.close().await;
        let (history, announced) = announced;
        let announced_rows: Vec<(String, i64)> = announced
            .iter()
            .map(|(_, e)| (e.to().name().to_owned(), e.version as i64))
            .collect();
        assert_eq!(
            announced_rows, history,
            "the lifecycle stream holds exactly the run's history, in order"
        );
        for (msg_id, event) in &announced {
            assert_eq!(msg_id, &format!("{run_id}:{}", event.version));
        }
        announced.into_iter().map(|(_, e)| e).collect()
    }
}
