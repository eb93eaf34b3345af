//! Cost: every interval a run spends in a state is billed at its provider's
//! rate for its resource class — the running rate while a sandbox exists and
//! is not paused (`booting`, `running`, `idle`, `finalizing`), the paused rate
//! while `paused`, nothing while `pending` or after the end. The intervals
//! are the run's recorded transitions, the current one open up to now, so a
//! run accrues cost as it goes and the figure always matches its history.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use corral_proto::v1::{CostLine, CostReply, CostRequest};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::store::StoreError;

/// Rates of one resource class, in dollars per hour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub running_per_hour: f64,
    pub paused_per_hour: f64,
}

/// The price table: provider → resource class → rates. A class missing from
/// a provider's table is billed at its `default` class; a provider missing
/// from the table costs nothing (and is logged once per query).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Prices(pub BTreeMap<String, BTreeMap<String, Rate>>);

impl Default for Prices {
    /// List prices as of late 2026 for the smallest sizes (E2B: 2 vCPU and
    /// 512 MiB at $0.000014/vCPU/s and $0.0000045/GiB/s; Daytona: 1 vCPU,
    /// 1 GiB, 3 GiB disk), paused billed as storage only; `local` is a
    /// nominal figure for a shared machine. Set your own in the config file.
    fn default() -> Self {
        let rate = |running_per_hour, paused_per_hour| Rate {
            running_per_hour,
            paused_per_hour,
        };
        let table = [
            ("local", rate(0.05, 0.005)),
            ("e2b", rate(0.1089, 0.0)),
            ("daytona", rate(0.0670, 0.0004)),
        ];
        Prices(
            table
                .into_iter()
                .map(|(provider, rate)| {
                    let classes = BTreeMap::from([("default".to_owned(), rate)]);
                    (provider.to_owned(), classes)
                })
                .collect(),
        )
    }
}

/// Milliseconds billed at each rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Billed {
    pub running_ms: i64,
    pub paused_ms: i64,
}

const MS_PER_HOUR: f64 = 3_600_000.0;

impl Prices {
    pub fn rate(&self, provider: &str, class: &str) -> Rate {
        let Some(classes) = self.0.get(provider) else {
            return Rate::default();
        };
        classes
            .get(class)
            .or_else(|| classes.get("default"))
            .copied()
            .unwrap_or_default()
    }

    pub fn cost(&self, provider: &str, class: &str, billed: &Billed) -> f64 {
        let rate = self.rate(provider, class);
        (rate.running_per_hour * billed.running_ms as f64
            + rate.paused_per_hour * billed.paused_ms as f64)
            / MS_PER_HOUR
    }
}

/// The billed states' intervals, summed exactly (as intervals) before one
/// conversion to milliseconds.
const BILLED_SUMS: &str = "
    floor(extract(epoch FROM COALESCE(SUM(e - s) FILTER (WHERE to_state <> 'paused'), '0'::interval)) * 1000)::bigint,
    floor(extract(epoch FROM COALESCE(SUM(e - s) FILTER (WHERE to_state = 'paused'), '0'::interval)) * 1000)::bigint";

const BILLED_STATES: &str = "('booting', 'running', 'idle', 'finalizing', 'paused')";

/// What each of `run_ids` has been billed for so far (runs never billed
/// are missing).
pub async fn billed_of_runs(
    pool: &PgPool,
    run_ids: &[String],
) -> Result<std::collections::HashMap<String, Billed>, StoreError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT run_id, {BILLED_SUMS} FROM (
            SELECT run_id, to_state, at AS s,
                   COALESCE(lead(at) OVER (PARTITION BY run_id ORDER BY id), now()) AS e
            FROM run_transitions WHERE run_id = ANY($1)
         ) i WHERE to_state IN {BILLED_STATES}
         GROUP BY run_id"
    ))
    .bind(run_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(run_id, running_ms, paused_ms)| {
            let billed = Billed {
                running_ms,
                paused_ms,
            };
            (run_id, billed)
        })
        .collect())
}

/// Cost of the runs carrying every label in `request`, over its period,
/// grouped by a label's value or by provider and class.
pub async fn report(
    pool: &PgPool,
    prices: &Prices,
    request: &CostRequest,
) -> Result<CostReply, StoreError> {
    let labels: BTreeMap<String, String> = request.labels.clone().into_iter().collect();
    let at = |ms: i64| {
        (ms > 0)
            .then(|| DateTime::<Utc>::from_timestamp_millis(ms))
            .flatten()
    };
    type Row = (String, String, String, i64, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "WITH r AS (
            SELECT run_id, provider, resource_class,
                   CASE WHEN $4 = '' THEN provider || '/' || resource_class
                        ELSE COALESCE(labels ->> $4, '(no ' || $4 || ')') END AS key
            FROM runs WHERE labels @> $1
         ), i AS (
            SELECT t.run_id, t.to_state, t.at AS s,
                   COALESCE(lead(t.at) OVER (PARTITION BY t.run_id ORDER BY t.id), now()) AS e
            FROM run_transitions t JOIN r USING (run_id)
         ), c AS (
            SELECT run_id, to_state, GREATEST(s, COALESCE($2, s)) AS s, LEAST(e, COALESCE($3, now())) AS e
            FROM i WHERE to_state IN {BILLED_STATES}
         )
         SELECT r.key, r.provider, r.resource_class, count(DISTINCT c.run_id)::bigint, {BILLED_SUMS}
         FROM c JOIN r USING (run_id)
         WHERE e > s
         GROUP BY r.key, r.provider, r.resource_class
         ORDER BY r.key"
    ))
    .bind(sqlx::types::Json(labels))
    .bind(at(request.since_ms))
    .bind(at(request.until_ms))
    .bind(&request.group_by)
    .fetch_all(pool)
    .await?;
    let mut lines: BTreeMap<String, CostLine> = BTreeMap::new();
    let mut total = CostLine {
        key: "total".into(),
        ..Default::default()
    };
    for (key, provider, class, runs, running_ms, paused_ms) in rows {
        if !prices.0.contains_key(&provider) {
            tracing::warn!(provider = %provider, "no prices for this provider: billed at 0");
        }
        let billed = Billed {
            running_ms,
            paused_ms,
        };
        let cost = prices.cost(&provider, &class, &billed);
        for line in [
            lines.entry(key.clone()).or_insert_with(|| CostLine {
                key,
                ..Default::default()
            }),
            &mut total,
        ] {
            line.runs += runs as u32;
            line.running_ms += running_ms;
            line.paused_ms += paused_ms;
            line.cost_usd += cost;
        }
    }
    Ok(CostReply {
        lines: lines.into_values().collect(),
        total: Some(total),
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_class_is_billed_at_the_default_and_a_missing_provider_at_zero() {
        let prices = Prices::default();
        assert_eq!(prices.rate("e2b", "huge"), prices.rate("e2b", "default"));
        assert_eq!(prices.rate("nowhere", "default"), Rate::default());
        let billed = Billed {
            running_ms: 3_600_000,
            paused_ms: 7_200_000,
        };
        let cost = prices.cost("local", "default", &billed);
        assert!((cost - (0.05 + 2.0 * 0.005)).abs() < 1e-12, "{cost}");
    }
}
