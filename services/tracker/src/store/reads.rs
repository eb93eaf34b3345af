//! Reads: one run, a page of runs, the spawners, each run's cost so far and
//! cost reports ([`crate::cost`] holds the billing SQL).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use corral_proto::v1::{ListRunsRequest, Run, RunState};

use super::rows::{COLUMNS, RunRow};
use super::{Store, StoreError};

impl Store {
    pub(super) async fn load(&self, run_id: &str) -> Result<RunRow, StoreError> {
        sqlx::query_as::<_, RunRow>(&format!("SELECT {COLUMNS} FROM runs WHERE run_id = $1"))
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(run_id.to_owned()))
    }

    /// The run, with its cost so far.
    pub async fn get(&self, run_id: &str) -> Result<Run, StoreError> {
        let mut runs = vec![self.load(run_id).await?.to_proto()];
        self.with_cost(&mut runs).await?;
        Ok(runs.remove(0))
    }

    /// Fills in each run's cost so far (one query for all).
    async fn with_cost(&self, runs: &mut [Run]) -> Result<(), StoreError> {
        let ids: Vec<String> = runs.iter().map(|r| r.run_id.clone()).collect();
        let billed = crate::cost::billed_of_runs(&self.pool, &ids).await?;
        for run in runs {
            let billed = billed.get(&run.run_id).copied().unwrap_or_default();
            run.billed_running_ms = billed.running_ms;
            run.billed_paused_ms = billed.paused_ms;
            run.cost_usd = self
                .prices
                .cost(&run.provider, &run.resource_class, &billed);
        }
        Ok(())
    }

    /// Cost of the runs matching `request`, grouped.
    pub async fn cost(
        &self,
        request: &corral_proto::v1::CostRequest,
    ) -> Result<corral_proto::v1::CostReply, StoreError> {
        crate::cost::report(&self.pool, &self.prices, request).await
    }

    /// Newest first, filtered by states and labels, paged by `before_run_id`.
    pub async fn list(&self, request: &ListRunsRequest) -> Result<Vec<Run>, StoreError> {
        let states: Option<Vec<String>> = if request.states.is_empty() {
            None
        } else {
            Some(
                request
                    .states
                    .iter()
                    .map(|s| {
                        RunState::try_from(*s)
                            .unwrap_or(RunState::Unspecified)
                            .name()
                            .to_owned()
                    })
                    .collect(),
            )
        };
        let labels: BTreeMap<String, String> = request.labels.clone().into_iter().collect();
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit.min(10_000)
        };
        let cursor = (!request.before_run_id.is_empty()).then_some(request.before_run_id.as_str());
        let rows = sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {COLUMNS} FROM runs
             WHERE ($1::text[] IS NULL OR state = ANY($1))
               AND labels @> $2
               AND ($3::text IS NULL OR (created_at, run_id) <
                    (SELECT created_at, run_id FROM runs WHERE run_id = $3))
             ORDER BY created_at DESC, run_id DESC
             LIMIT $4"
        ))
        .bind(states)
        .bind(sqlx::types::Json(labels))
        .bind(cursor)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut runs: Vec<Run> = rows.iter().map(RunRow::to_proto).collect();
        self.with_cost(&mut runs).await?;
        Ok(runs)
    }

    /// The spawners that heartbeat within the last ten minutes, by id.
    pub async fn spawners(&self) -> Result<Vec<corral_proto::v1::Spawner>, StoreError> {
        type Row = (
            String,
            DateTime<Utc>,
            i32,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT spawner_id, heartbeat_at, owned_runs, draining_since, drain_deadline
             FROM spawners WHERE heartbeat_at > now() - interval '10 minutes'
             ORDER BY spawner_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let ms = |t: Option<DateTime<Utc>>| t.map_or(0, |t| t.timestamp_millis());
        Ok(rows
            .into_iter()
            .map(
                |(spawner_id, heartbeat_at, owned, since, deadline)| corral_proto::v1::Spawner {
                    spawner_id,
                    heartbeat_at_ms: heartbeat_at.timestamp_millis(),
                    owned_runs: owned.max(0) as u32,
                    draining_since_ms: ms(since),
                    drain_deadline_ms: ms(deadline),
                },
            )
            .collect())
    }
}
