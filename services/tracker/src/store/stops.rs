//! Stop requests, recorded durably: at once on a pending run, as a mark a
//! live run's owner (or the reaper) acts on, or kept for a run not recorded
//! yet.

use corral_proto::v1::{Run, RunEvent, RunState, StopCommand, stop_reply, tracker_error::Refusal};

use super::rows::{COLUMNS, RunRow};
use super::transitions::{Applied, Changes};
use super::{CAS_ATTEMPTS, Store, StoreError};

impl Store {
    /// Records a stop durably. A pending run is stopped at once (no owner has
    /// it yet); a live one keeps its state for the owner (or the reaper) to
    /// end, and its version changes, which closes the finalize fence.
    /// With `remember_unknown`, a stop for a run not recorded yet is kept
    /// and applies when the run appears (the outcome is still `NotFound`).
    pub async fn request_stop(
        &self,
        stop: &StopCommand,
        remember_unknown: bool,
    ) -> Result<(stop_reply::Outcome, Option<Run>, Option<Applied>), StoreError> {
        use stop_reply::Outcome;
        let requested_by = if stop.requested_by.is_empty() {
            "unknown"
        } else {
            stop.requested_by.as_str()
        };
        for _ in 0..CAS_ATTEMPTS {
            let row = match self.load(&stop.run_id).await {
                Ok(row) => row,
                Err(StoreError::NotFound(_)) => {
                    if remember_unknown {
                        sqlx::query(
                            "INSERT INTO early_stops (run_id, reason, requested_by) VALUES ($1, $2, $3)
                             ON CONFLICT (run_id) DO NOTHING",
                        )
                        .bind(&stop.run_id)
                        .bind(&stop.reason)
                        .bind(requested_by)
                        .execute(&self.pool)
                        .await?;
                        // The run may have been created in between.
                        if let Ok(run) = self.get(&stop.run_id).await {
                            return Ok((Outcome::NotFound, Some(run), None));
                        }
                    }
                    return Ok((Outcome::NotFound, None, None));
                }
                Err(err) => return Err(err),
            };
            let state = row.state();
            if state.is_terminal() {
                return Ok((Outcome::AlreadyTerminal, Some(row.to_proto()), None));
            }
            if row.stop_requested_at.is_some() {
                let outcome = if state == RunState::Finalizing {
                    Outcome::FinalizeInProgress
                } else {
                    Outcome::AlreadyRequested
                };
                return Ok((outcome, Some(row.to_proto()), None));
            }
            let recorded = sqlx::query_as::<_, RunRow>(&format!(
                "UPDATE runs SET stop_requested_at = now(), stop_reason = $3, stop_requested_by = $4,
                     version = version + 1, updated_at = now()
                 WHERE run_id = $1 AND version = $2
                 RETURNING {COLUMNS}"
            ))
            .bind(&stop.run_id)
            .bind(row.version)
            .bind(&stop.reason)
            .bind(requested_by)
            .fetch_optional(&self.pool)
            .await?;
            let Some(recorded) = recorded else { continue };
            if state == RunState::Finalizing {
                return Ok((Outcome::FinalizeInProgress, Some(recorded.to_proto()), None));
            }
            if state == RunState::Pending {
                let changes = Changes {
                    reason: &stop.reason,
                    actor: requested_by,
                    ..Default::default()
                };
                match self.apply(&recorded, RunEvent::Stop, changes).await? {
                    Some(applied) => {
                        let run = applied.run.clone();
                        return Ok((Outcome::Accepted, Some(run), Some(applied)));
                    }
                    // Claimed in between: the owner will stop it.
                    None => {
                        return Ok((Outcome::Accepted, Some(self.get(&stop.run_id).await?), None));
                    }
                }
            }
            return Ok((Outcome::Accepted, Some(recorded.to_proto()), None));
        }
        Err(StoreError::Refused(
            Refusal::Contended,
            format!(
                "run {} kept changing while a stop was recorded",
                stop.run_id
            ),
        ))
    }
}
