//! Agent event kinds: the last tokens of `<prefix>.events.<run_id>.<kind>`
//! and `AgentEvent.kind`.

/// Every kind corral knows, with whether it is progress. Only progress
/// resets a run's inactivity window; heartbeats prove liveness, not progress.
pub const KINDS: [(&str, bool); 13] = [
    ("agent.started", true),
    ("agent.system_message", true),
    ("agent.assistant_message", true),
    ("agent.message", true),
    ("agent.tool_use", true),
    ("agent.tool_completed", true),
    ("agent.user_tool_result", true),
    ("agent.file_edited", true),
    ("agent.output", true),
    ("agent.completed", true),
    ("agent.waiting", false),
    ("agent.heartbeat", false),
    ("agent.error", false),
];

/// Whether `kind` is one corral knows.
pub fn is_known(kind: &str) -> bool {
    KINDS.iter().any(|(k, _)| *k == kind)
}

/// Whether events of `kind` count as progress.
pub fn is_progress(kind: &str) -> bool {
    KINDS.iter().any(|(k, progress)| *k == kind && *progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_known_but_not_progress() {
        assert!(is_known("agent.heartbeat") && !is_progress("agent.heartbeat"));
        assert!(is_progress("agent.tool_use") && is_progress("agent.file_edited"));
        assert!(!is_known("agent.nonsense") && !is_progress("agent.nonsense"));
    }
}
