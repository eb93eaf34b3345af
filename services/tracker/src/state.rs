//! The run state machine: one pure function. Nothing else in corral decides
//! whether a transition is legal.
//!
//! ```text
//! pending -> booting -> running -> finalizing -> completed
//!                       running -> completed            (no finalize step)
//!                       running <-> idle, idle <-> paused -> running
//! any live state -> failed | timed_out
//! any live state but finalizing -> stopped   (finalize is past the fence)
//! ```
//! Terminal states (completed, failed, stopped, timed_out) never change.
//!
//! The fence on `begin_finalize` (no stop requested, no deadline passed) and
//! the requirement that a sandbox id is recorded before `start` depend on the
//! row, not only on the state; the store checks them in the same
//! compare-and-set that applies the transition.

use corral_proto::v1::{RunEvent, RunState};

/// A refused transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event} from {from}", event = .event.name(), from = .from.name())]
pub struct Illegal {
    pub from: RunState,
    pub event: RunEvent,
}

/// The state a run in `from` moves to on `event`, or [`Illegal`].
pub fn next(from: RunState, event: RunEvent) -> Result<RunState, Illegal> {
    use RunEvent as E;
    use RunState as S;
    let to = match (from, event) {
        (S::Pending, E::Claim) => S::Booting,
        (S::Booting, E::Start) => S::Running,
        (S::Running, E::BeginFinalize) => S::Finalizing,
        (S::Running | S::Finalizing, E::Complete) => S::Completed,
        (S::Running, E::TurnEnd) => S::Idle,
        (S::Idle, E::Pause) => S::Paused,
        (S::Idle | S::Paused, E::Continue) => S::Running,
        (S::Paused, E::Resume) => S::Idle,
        (S::Pending | S::Booting | S::Running | S::Idle | S::Paused | S::Finalizing, E::Fail) => {
            S::Failed
        }
        (
            S::Pending | S::Booting | S::Running | S::Idle | S::Paused | S::Finalizing,
            E::TimeOut,
        ) => S::TimedOut,
        (S::Pending | S::Booting | S::Running | S::Idle | S::Paused, E::Stop) => S::Stopped,
        _ => return Err(Illegal { from, event }),
    };
    Ok(to)
}

/// The states from which `event` applies. Every event leads to one state
/// whatever its source (tested below), so a store may apply an event in one
/// statement guarded by `state IN sources(event)`.
pub fn sources(event: RunEvent) -> Vec<RunState> {
    RunState::ALL
        .into_iter()
        .filter(|&from| next(from, event).is_ok())
        .collect()
}

/// Whether the run is still live (not terminal, not unspecified).
pub fn is_live(state: RunState) -> bool {
    state != RunState::Unspecified && !state.is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunEvent as E;
    use RunState as S;

    /// Every legal edge, written out once more by hand.
    const LEGAL: &[(RunState, RunEvent, RunState)] = &[
        (S::Pending, E::Claim, S::Booting),
        (S::Booting, E::Start, S::Running),
        (S::Running, E::BeginFinalize, S::Finalizing),
        (S::Running, E::Complete, S::Completed),
        (S::Finalizing, E::Complete, S::Completed),
        (S::Running, E::TurnEnd, S::Idle),
        (S::Idle, E::Pause, S::Paused),
        (S::Idle, E::Continue, S::Running),
        (S::Paused, E::Continue, S::Running),
        (S::Paused, E::Resume, S::Idle),
        (S::Pending, E::Fail, S::Failed),
        (S::Booting, E::Fail, S::Failed),
        (S::Running, E::Fail, S::Failed),
        (S::Idle, E::Fail, S::Failed),
        (S::Paused, E::Fail, S::Failed),
        (S::Finalizing, E::Fail, S::Failed),
        (S::Pending, E::TimeOut, S::TimedOut),
        (S::Booting, E::TimeOut, S::TimedOut),
        (S::Running, E::TimeOut, S::TimedOut),
        (S::Idle, E::TimeOut, S::TimedOut),
        (S::Paused, E::TimeOut, S::TimedOut),
        (S::Finalizing, E::TimeOut, S::TimedOut),
        (S::Pending, E::Stop, S::Stopped),
        (S::Booting, E::Stop, S::Stopped),
        (S::Running, E::Stop, S::Stopped),
        (S::Idle, E::Stop, S::Stopped),
        (S::Paused, E::Stop, S::Stopped),
    ];

    #[test]
    fn every_legal_edge_is_accepted() {
        for &(from, event, to) in LEGAL {
            assert_eq!(
                next(from, event),
                Ok(to),
                "{} on {}",
                from.name(),
                event.name()
            );
        }
    }

    #[test]
    fn every_other_pair_is_refused() {
        let mut refused = 0;
        for from in RunState::ALL.into_iter().chain([RunState::Unspecified]) {
            for event in RunEvent::ALL.into_iter().chain([RunEvent::Unspecified]) {
                if LEGAL.iter().any(|&(f, e, _)| f == from && e == event) {
                    continue;
                }
                assert_eq!(
                    next(from, event),
                    Err(Illegal { from, event }),
                    "{} on {} should be illegal",
                    from.name(),
                    event.name()
                );
                refused += 1;
            }
        }
        let pairs = (RunState::ALL.len() + 1) * (RunEvent::ALL.len() + 1);
        assert_eq!(refused, pairs - LEGAL.len());
    }

    #[test]
    fn each_event_leads_to_one_state_from_all_its_sources() {
        for event in RunEvent::ALL {
            let targets: std::collections::BTreeSet<i32> = sources(event)
                .into_iter()
                .map(|from| next(from, event).expect("a source accepts the event") as i32)
                .collect();
            assert_eq!(targets.len(), 1, "{} leads to {targets:?}", event.name());
        }
        assert!(sources(RunEvent::Unspecified).is_empty());
    }

    #[test]
    fn terminal_states_never_change() {
        for from in RunState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in RunEvent::ALL {
                assert!(
                    next(from, event).is_err(),
                    "{} left on {}",
                    from.name(),
                    event.name()
                );
            }
        }
    }

    #[test]
    fn stop_is_refused_once_finalize_began() {
        assert!(next(S::Finalizing, E::Stop).is_err());
        assert_eq!(next(S::Finalizing, E::TimeOut), Ok(S::TimedOut));
    }

    #[test]
    fn an_illegal_transition_names_the_event_and_state() {
        let err = next(S::Completed, E::Start).expect_err("illegal");
        assert_eq!(err.to_string(), "illegal transition: start from completed");
    }
}
