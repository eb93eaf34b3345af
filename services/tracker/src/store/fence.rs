//! The fence: when a transition may apply to a run beyond what the state
//! machine allows — no start, finalize or new turn once a stop is asked or
//! the deadline passed, only the owner (or the reaper) acts on a run someone
//! owns, and a kept run between turns is held by whoever pauses or resumes
//! it. Said twice, side by side: in SQL ([`guard`]), which decides in the
//! compare-and-set, and in words ([`fence`], [`not_owner`]), which explain a
//! refusal after the fact.

use chrono::Utc;
use corral_proto::v1::{RunEvent, RunState, tracker_error::Refusal};

use super::rows::RunRow;

/// How long an instance pausing or resuming a kept run holds it; a holder
/// that died lets go by itself after this.
pub(super) const HOLD_SECS: i32 = 30;

/// The fence's conditions on the run `r` for `event`, in SQL, to follow the
/// compare-and-set's other conditions (`$6` the request's owner, `$9` its
/// actor).
pub(super) fn guard(event: RunEvent) -> String {
    let guard = match event {
            RunEvent::BeginFinalize => {
                "AND r.stop_requested_at IS NULL AND (r.deadline_at IS NULL OR r.deadline_at > now())"
            }
            RunEvent::Start => "AND r.stop_requested_at IS NULL AND r.sandbox_id IS NOT NULL",
            RunEvent::Claim | RunEvent::TurnEnd => "AND r.stop_requested_at IS NULL",
            // Between turns the owner column is a short hold: whoever
            // pauses, resumes or continues the run holds it, and nobody else
            // acts on the sandbox meanwhile (a hold older than HOLD_SECS is
            // from an instance that died).
            RunEvent::Continue | RunEvent::Pause | RunEvent::Resume => {
                "AND r.stop_requested_at IS NULL AND (r.deadline_at IS NULL OR r.deadline_at > now())
                 AND (r.owner IS NULL OR r.owner = $6 OR r.updated_at < now() - make_interval(secs => $HOLD))"
            }
            _ => "",
        };
    let mut guard = guard.replace("$HOLD", &HOLD_SECS.to_string());
    if owner_only(event) {
        guard.push_str(OWNER_GUARD);
    }
    guard
}

/// Events that, on a run someone owns (booting, running, finalizing), only
/// its owner or the reaper may apply.
fn owner_only(event: RunEvent) -> bool {
    matches!(
        event,
        RunEvent::Start
            | RunEvent::BeginFinalize
            | RunEvent::Complete
            | RunEvent::Fail
            | RunEvent::Stop
            | RunEvent::TimeOut
            | RunEvent::TurnEnd
    )
}

/// The rule of [`owner_only`] in SQL (`$6` the request's owner, `$9` its
/// actor): one place, [`not_owner`] says why in words.
const OWNER_GUARD: &str = " AND (r.state NOT IN ('booting', 'running', 'finalizing')
    OR r.owner IS NULL OR r.owner = $6 OR $9 LIKE 'reaper:%')";

/// Why `owner` (acting as `actor`) may not apply `event` to `row`, if so.
pub(super) fn not_owner(row: &RunRow, event: RunEvent, owner: &str, actor: &str) -> Option<String> {
    let owned = matches!(
        row.state(),
        RunState::Booting | RunState::Running | RunState::Finalizing
    );
    let held = row.owner.as_deref()?;
    (owner_only(event) && owned && held != owner && !actor.starts_with("reaper:")).then(|| {
        format!(
            "run {} is owned by {held}: only its owner or the reaper may {} it ({actor:?} as owner {owner:?} may not)",
            row.run_id,
            event.name()
        )
    })
}

/// Why a fenced event may not apply to this row, if it may not.
pub(super) fn fence(row: &RunRow, event: RunEvent, owner: &str) -> Option<(Refusal, String)> {
    let between_turns = matches!(
        event,
        RunEvent::Continue | RunEvent::Pause | RunEvent::Resume
    );
    match event {
        RunEvent::BeginFinalize | RunEvent::Start | RunEvent::TurnEnd
            if row.stop_requested_at.is_some() =>
        {
            Some((
                Refusal::StopRequested,
                format!("stop requested for run {}", row.run_id),
            ))
        }
        _ if between_turns && row.stop_requested_at.is_some() => Some((
            Refusal::StopRequested,
            format!("stop requested for run {}", row.run_id),
        )),
        _ if (between_turns || event == RunEvent::BeginFinalize)
            && row.deadline_at.is_some_and(|d| d <= Utc::now()) =>
        {
            Some((
                Refusal::DeadlinePassed,
                format!("deadline passed for run {}", row.run_id),
            ))
        }
        _ if between_turns
            && row.owner.as_deref().is_some_and(|held| {
                held != owner
                    && row.updated_at > Utc::now() - chrono::Duration::seconds(HOLD_SECS.into())
            }) =>
        {
            Some((
                Refusal::HeldByAnother,
                format!(
                    "run {} is held by {} (pausing or resuming); try again",
                    row.run_id,
                    row.owner.as_deref().unwrap_or_default()
                ),
            ))
        }
        RunEvent::Start if row.sandbox_id.is_none() => Some((
            Refusal::NoSandbox,
            format!(
                "run {} has no recorded sandbox id; record it before start",
                row.run_id
            ),
        )),
        _ => None,
    }
}
