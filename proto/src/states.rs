//! Names of run states and events as they appear in storage, logs and the CLI.

use crate::v1::{RunEvent, RunState};

impl RunState {
    /// Lower-case name (`running`, `timed_out`), as stored and printed.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Unspecified => "unspecified",
            RunState::Pending => "pending",
            RunState::Booting => "booting",
            RunState::Running => "running",
            RunState::Idle => "idle",
            RunState::Paused => "paused",
            RunState::Finalizing => "finalizing",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Stopped => "stopped",
            RunState::TimedOut => "timed_out",
        }
    }

    /// Parses a lower-case name as printed by [`RunState::name`].
    pub fn from_name(name: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|state| state.name() == name)
    }

    /// Every state but `unspecified`.
    pub const ALL: [RunState; 10] = [
        RunState::Pending,
        RunState::Booting,
        RunState::Running,
        RunState::Idle,
        RunState::Paused,
        RunState::Finalizing,
        RunState::Completed,
        RunState::Failed,
        RunState::Stopped,
        RunState::TimedOut,
    ];

    /// Terminal states never change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::Stopped | RunState::TimedOut
        )
    }
}

impl RunEvent {
    pub fn name(self) -> &'static str {
        match self {
            RunEvent::Unspecified => "unspecified",
            RunEvent::Claim => "claim",
            RunEvent::Start => "start",
            RunEvent::BeginFinalize => "begin_finalize",
            RunEvent::Complete => "complete",
            RunEvent::Fail => "fail",
            RunEvent::Stop => "stop",
            RunEvent::TimeOut => "time_out",
            RunEvent::TurnEnd => "turn_end",
            RunEvent::Pause => "pause",
            RunEvent::Continue => "continue",
            RunEvent::Resume => "resume",
            RunEvent::ReplaceSandbox => "replace_sandbox",
        }
    }

    /// Parses a lower-case name as printed by [`RunEvent::name`].
    pub fn from_name(name: &str) -> Option<RunEvent> {
        RunEvent::ALL
            .into_iter()
            .chain([RunEvent::ReplaceSandbox])
            .find(|event| event.name() == name)
    }

    /// Every event of the state machine (all but `unspecified` and
    /// `replace_sandbox`, which changes no state).
    pub const ALL: [RunEvent; 11] = [
        RunEvent::Claim,
        RunEvent::Start,
        RunEvent::BeginFinalize,
        RunEvent::Complete,
        RunEvent::Fail,
        RunEvent::Stop,
        RunEvent::TimeOut,
        RunEvent::TurnEnd,
        RunEvent::Pause,
        RunEvent::Continue,
        RunEvent::Resume,
    ];
}
