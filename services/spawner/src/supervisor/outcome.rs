//! What follows an execution: one pure function of how it ended and what
//! the run is ([`outcome`] after a turn, [`finalize_outcome`] after
//! finalize). Nothing else decides it; the supervisor only carries the
//! answer out (asks the tracker, runs finalize, records the transition).
//!
//! Promises: a kept run's turn ends in `idle` unless a stop, a timeout or
//! someone else's SIGKILL ends the run; finalize follows only a successful
//! agent of a run that is not kept and has a finalize command; an agent
//! killed with SIGKILL by someone else (the reaper, an operator) ends the
//! run as the record says, not as a failure of the agent.

use corral_proto::v1::RunEvent;
use corral_provider::ExitStatus;

use super::{Ending, describe, stop_reason};

/// What the supervisor does after a turn's agent ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// A kept run's turn is over: `running -> idle`, the sandbox stays.
    TurnEnd {
        reason: String,
        exit_code: Option<i32>,
    },
    /// Run the finalize command behind the `running -> finalizing` fence.
    Finalize,
    /// The run is over.
    End(End),
}

/// How a run ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Killed by someone else: end as the record says (a stop, the
    /// deadline), or fail with `why` if it does not know.
    AsRecorded { why: String },
    /// A stop ended the agent: kill the sandbox, then record the stop.
    Stopped {
        reason: String,
        /// When the stop was asked (its publisher's clock, Unix ms; 0 if
        /// unknown), for the stop latency metric.
        requested_at_ms: i64,
    },
    /// Record `event`.
    Transition {
        event: RunEvent,
        reason: String,
        exit_code: Option<i32>,
    },
}

/// Whether the agent was killed with SIGKILL, by its own limits or by
/// someone else.
fn killed(ending: &Ending) -> bool {
    matches!(ending, Ending::Exited(ExitStatus::Signal(s)) if *s == libc::SIGKILL)
}

/// Whether what follows `ending` depends on the record: only for a kept
/// run's agent killed with SIGKILL (a resource limit fails the turn while
/// the run goes on; the reaper or an operator ends the run). Ask the
/// tracker (`run_goes_on` of [`outcome`]) exactly then.
pub(super) fn asks_record(ending: &Ending, kept: bool) -> bool {
    kept && killed(ending)
}

/// What follows a turn whose agent ended with `ending`. `kept`: the run
/// keeps its sandbox between turns; `has_finalize`: it has a finalize
/// command; `run_goes_on`: the record lets the run go on (not ended, no
/// stop asked, its deadline ahead), looked at only when [`asks_record`].
pub(super) fn outcome(ending: &Ending, kept: bool, has_finalize: bool, run_goes_on: bool) -> Next {
    // A kept run's turn killed with the run going on (a resource limit)
    // fails the turn, not the session.
    let session_goes_on = asks_record(ending, kept) && run_goes_on;
    match ending {
        // Killed by someone else (the reaper, an operator): let the record
        // say why, if it knows.
        Ending::Exited(_) if killed(ending) && !session_goes_on => Next::End(End::AsRecorded {
            why: "the agent was killed with SIGKILL".into(),
        }),
        Ending::Exited(status) if kept => Next::TurnEnd {
            reason: if status.success() {
                String::new()
            } else {
                format!("turn failed: {}", describe(*status))
            },
            exit_code: Some(status.code()),
        },
        // A spawner going away (a deploy) interrupts the turn, not the
        // session: the sandbox stays for the next continue.
        Ending::Shutdown if kept => Next::TurnEnd {
            reason: "turn interrupted: spawner shut down".into(),
            exit_code: None,
        },
        Ending::Exited(status) if status.success() && has_finalize => Next::Finalize,
        Ending::Exited(status) if status.success() => Next::End(End::Transition {
            event: RunEvent::Complete,
            reason: String::new(),
            exit_code: Some(0),
        }),
        ending => Next::End(ended(ending)),
    }
}

/// How the run ends after its finalize command ended with `ending`.
pub(super) fn finalize_outcome(ending: &Ending) -> End {
    match ending {
        Ending::Exited(status) if status.success() => End::Transition {
            event: RunEvent::Complete,
            reason: "finalized".into(),
            exit_code: Some(0),
        },
        Ending::Exited(status) => End::Transition {
            event: RunEvent::Fail,
            reason: format!("finalize failed: {}", describe(*status)),
            exit_code: Some(status.code()),
        },
        ending => ended(ending),
    }
}

/// How an execution that did not succeed ends the run.
fn ended(ending: &Ending) -> End {
    match ending {
        Ending::Exited(status) => End::Transition {
            event: RunEvent::Fail,
            reason: describe(*status),
            exit_code: Some(status.code()),
        },
        Ending::Stopped(stop) => End::Stopped {
            reason: stop_reason(stop),
            requested_at_ms: stop.requested_at_ms,
        },
        Ending::TimedOut(kind) => End::Transition {
            event: RunEvent::TimeOut,
            reason: kind.reason().to_owned(),
            exit_code: None,
        },
        Ending::Shutdown => End::Transition {
            event: RunEvent::Fail,
            reason: "spawner_shutdown".into(),
            exit_code: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use corral_proto::v1::StopCommand;

    use super::*;
    use crate::supervisor::Timeout;
    use ExitStatus::{Code, Signal};
    use RunEvent as E;

    fn turn_end(reason: &str, exit_code: Option<i32>) -> Next {
        Next::TurnEnd {
            reason: reason.into(),
            exit_code,
        }
    }

    fn transition(event: RunEvent, reason: &str, exit_code: Option<i32>) -> End {
        End::Transition {
            event,
            reason: reason.into(),
            exit_code,
        }
    }

    fn end(event: RunEvent, reason: &str, exit_code: Option<i32>) -> Next {
        Next::End(transition(event, reason, exit_code))
    }

    fn as_recorded() -> Next {
        Next::End(End::AsRecorded {
            why: "the agent was killed with SIGKILL".into(),
        })
    }

    fn stopped(reason: &str, requested_at_ms: i64) -> End {
        End::Stopped {
            reason: reason.into(),
            requested_at_ms,
        }
    }

    fn stop(reason: &str, requested_at_ms: i64) -> Ending {
        Ending::Stopped(StopCommand {
            reason: reason.into(),
            requested_at_ms,
            ..Default::default()
        })
    }

    /// One ending and what follows it for each kind of run, written out by
    /// hand: `once` for a run that is not kept (without, then with a
    /// finalize command; whether the run goes on is never asked), `kept`
    /// for a kept run (the record lets the run go on, then it does not;
    /// a finalize command plays no part).
    struct Row {
        ending: Ending,
        once: [Next; 2],
        kept: [Next; 2],
    }

    /// Every kind of ending: success, failures, signals (SIGKILL apart),
    /// stops with and without a reason, both timeouts, shutdown.
    fn table() -> Vec<Row> {
        let sigkill = libc::SIGKILL;
        let sigterm = libc::SIGTERM;
        vec![
            Row {
                ending: Ending::Exited(Code(0)),
                once: [end(E::Complete, "", Some(0)), Next::Finalize],
                kept: [turn_end("", Some(0)), turn_end("", Some(0))],
            },
            Row {
                ending: Ending::Exited(Code(1)),
                once: [
                    end(E::Fail, "exit code 1", Some(1)),
                    end(E::Fail, "exit code 1", Some(1)),
                ],
                kept: [
                    turn_end("turn failed: exit code 1", Some(1)),
                    turn_end("turn failed: exit code 1", Some(1)),
                ],
            },
            Row {
                ending: Ending::Exited(Code(127)),
                once: [
                    end(E::Fail, "exit code 127", Some(127)),
                    end(E::Fail, "exit code 127", Some(127)),
                ],
                kept: [
                    turn_end("turn failed: exit code 127", Some(127)),
                    turn_end("turn failed: exit code 127", Some(127)),
                ],
            },
            Row {
                ending: Ending::Exited(Signal(sigterm)),
                once: [
                    end(E::Fail, "killed by signal 15", Some(143)),
                    end(E::Fail, "killed by signal 15", Some(143)),
                ],
                kept: [
                    turn_end("turn failed: killed by signal 15", Some(143)),
                    turn_end("turn failed: killed by signal 15", Some(143)),
                ],
            },
            Row {
                ending: Ending::Exited(Signal(sigkill)),
                once: [as_recorded(), as_recorded()],
                kept: [
                    turn_end("turn failed: killed by signal 9", Some(137)),
                    as_recorded(),
                ],
            },
            Row {
                ending: stop("", 0),
                once: [
                    Next::End(stopped("stop requested", 0)),
                    Next::End(stopped("stop requested", 0)),
                ],
                kept: [
                    Next::End(stopped("stop requested", 0)),
                    Next::End(stopped("stop requested", 0)),
                ],
            },
            Row {
                ending: stop("operator", 1_700_000_000_000),
                once: [
                    Next::End(stopped("operator", 1_700_000_000_000)),
                    Next::End(stopped("operator", 1_700_000_000_000)),
                ],
                kept: [
                    Next::End(stopped("operator", 1_700_000_000_000)),
                    Next::End(stopped("operator", 1_700_000_000_000)),
                ],
            },
            Row {
                ending: Ending::TimedOut(Timeout::Deadline),
                once: [
                    end(E::TimeOut, "deadline", None),
                    end(E::TimeOut, "deadline", None),
                ],
                kept: [
                    end(E::TimeOut, "deadline", None),
                    end(E::TimeOut, "deadline", None),
                ],
            },
            Row {
                ending: Ending::TimedOut(Timeout::Inactivity),
                once: [
                    end(E::TimeOut, "inactivity", None),
                    end(E::TimeOut, "inactivity", None),
                ],
                kept: [
                    end(E::TimeOut, "inactivity", None),
                    end(E::TimeOut, "inactivity", None),
                ],
            },
            Row {
                ending: Ending::Shutdown,
                once: [
                    end(E::Fail, "spawner_shutdown", None),
                    end(E::Fail, "spawner_shutdown", None),
                ],
                kept: [
                    turn_end("turn interrupted: spawner shut down", None),
                    turn_end("turn interrupted: spawner shut down", None),
                ],
            },
        ]
    }

    #[test]
    fn every_ending_of_every_kind_of_run_is_followed_as_the_table_says() {
        let table = table();
        let mut checked = 0;
        for row in &table {
            for kept in [false, true] {
                for has_finalize in [false, true] {
                    for run_goes_on in [true, false] {
                        let expected = if kept {
                            &row.kept[usize::from(!run_goes_on)]
                        } else {
                            &row.once[usize::from(has_finalize)]
                        };
                        assert_eq!(
                            &outcome(&row.ending, kept, has_finalize, run_goes_on),
                            expected,
                            "{:?}, kept {kept}, finalize {has_finalize}, run goes on {run_goes_on}",
                            row.ending
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, table.len() * 8);
    }

    #[test]
    fn the_record_is_asked_only_for_a_kept_runs_agent_killed_with_sigkill() {
        for row in table() {
            for kept in [false, true] {
                let expected =
                    kept && matches!(row.ending, Ending::Exited(Signal(s)) if s == libc::SIGKILL);
                assert_eq!(
                    asks_record(&row.ending, kept),
                    expected,
                    "{:?}, kept {kept}",
                    row.ending
                );
            }
        }
    }

    #[test]
    fn whether_the_run_goes_on_matters_only_when_the_record_is_asked() {
        for row in table() {
            for kept in [false, true] {
                for has_finalize in [false, true] {
                    if asks_record(&row.ending, kept) {
                        continue;
                    }
                    assert_eq!(
                        outcome(&row.ending, kept, has_finalize, true),
                        outcome(&row.ending, kept, has_finalize, false),
                        "{:?}, kept {kept}, finalize {has_finalize}",
                        row.ending
                    );
                }
            }
        }
    }

    #[test]
    fn finalize_follows_only_a_successful_agent_of_a_run_that_is_not_kept() {
        for row in table() {
            for kept in [false, true] {
                for has_finalize in [false, true] {
                    for run_goes_on in [false, true] {
                        let finalizes =
                            outcome(&row.ending, kept, has_finalize, run_goes_on) == Next::Finalize;
                        let expected =
                            !kept && has_finalize && matches!(row.ending, Ending::Exited(Code(0)));
                        assert_eq!(finalizes, expected, "{:?}", row.ending);
                    }
                }
            }
        }
    }

    #[test]
    fn a_kept_runs_turn_killed_by_its_limits_fails_the_turn_not_the_session() {
        let killed = Ending::Exited(Signal(libc::SIGKILL));
        assert_eq!(
            outcome(&killed, true, false, true),
            turn_end("turn failed: killed by signal 9", Some(137))
        );
        assert_eq!(outcome(&killed, true, false, false), as_recorded());
    }

    #[test]
    fn every_ending_of_finalize_ends_the_run() {
        let expected = [
            transition(E::Complete, "finalized", Some(0)),
            transition(E::Fail, "finalize failed: exit code 1", Some(1)),
            transition(E::Fail, "finalize failed: exit code 127", Some(127)),
            transition(E::Fail, "finalize failed: killed by signal 15", Some(143)),
            transition(E::Fail, "finalize failed: killed by signal 9", Some(137)),
            stopped("stop requested", 0),
            stopped("operator", 1_700_000_000_000),
            transition(E::TimeOut, "deadline", None),
            transition(E::TimeOut, "inactivity", None),
            transition(E::Fail, "spawner_shutdown", None),
        ];
        let table = table();
        assert_eq!(table.len(), expected.len());
        for (row, expected) in table.iter().zip(expected) {
            assert_eq!(finalize_outcome(&row.ending), expected, "{:?}", row.ending);
        }
    }
}
