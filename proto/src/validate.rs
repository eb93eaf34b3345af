//! Checks a command must pass before anyone acts on it. The CLI checks
//! before publishing; the spawner checks again (other clients publish too)
//! and dead-letters what fails, with the message returned here.

use crate::v1::{ContinueCommand, RunCommand, SessionCommand, StopCommand, session_command};
use crate::validate_run_id;

/// Providers corral knows by name. Whether a spawner has one configured is
/// the spawner's question.
pub const KNOWN_PROVIDERS: [&str; 3] = ["local", "e2b", "daytona"];

/// Longest absolute timeout accepted: 7 days.
pub const MAX_TIMEOUT_SECS: i32 = 7 * 24 * 3600;

/// Most labels a run may carry, and the longest label key and value
/// (bytes): labels travel with every sandbox and every list.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
/// Most words of a command and variables of its environment, and the most
/// bytes of all of them together (argv, env, finalize): a command travels in
/// one NATS message (1 MiB by default) and an exec takes at most 2 MiB of
/// arguments and environment on Linux.
pub const MAX_ARGV: usize = 4096;
pub const MAX_ENV: usize = 1024;
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;

/// Why the command is invalid, if it is.
pub fn run_command(command: &RunCommand) -> Result<(), String> {
    validate_run_id(&command.run_id).map_err(|e| e.to_string())?;
    let Some(spec) = &command.spec else {
        return Err("spec is missing".into());
    };
    match spec.argv.first() {
        None => return Err("spec.argv is empty: give the agent command to run".into()),
        Some(program) if program.is_empty() => {
            return Err("spec.argv[0] is empty: give the agent program".into());
        }
        Some(_) => {}
    }
    for (field, value) in [
        ("spec.timeout_secs", spec.timeout_secs),
        ("spec.idle_timeout_secs", spec.idle_timeout_secs),
        ("spec.idle_pause_secs", spec.idle_pause_secs),
        ("spec.max_lifetime_secs", spec.max_lifetime_secs),
    ] {
        if value < 0 {
            return Err(format!(
                "{field} is {value}: it must be 0 (the default) or positive"
            ));
        }
        if value > MAX_TIMEOUT_SECS {
            return Err(format!(
                "{field} is {value}: at most {MAX_TIMEOUT_SECS} (7 days)"
            ));
        }
    }
    if !spec.provider.is_empty() && !KNOWN_PROVIDERS.contains(&spec.provider.as_str()) {
        return Err(format!(
            "spec.provider {:?} is unknown: use one of {}",
            spec.provider,
            KNOWN_PROVIDERS.join(", ")
        ));
    }
    if spec.keep_alive && !spec.finalize.is_empty() {
        return Err(
            "spec.finalize cannot be combined with spec.keep_alive: a kept run has no last turn to finalize after"
                .into(),
        );
    }
    if !spec.keep_alive && (spec.idle_pause_secs != 0 || spec.max_lifetime_secs != 0) {
        return Err(
            "spec.idle_pause_secs and spec.max_lifetime_secs apply only with spec.keep_alive"
                .into(),
        );
    }
    if !spec.resource_class.is_empty() && !is_token(&spec.resource_class) {
        return Err(format!(
            "spec.resource_class {:?} is invalid: use 1 to 64 of a-z, 0-9, '_' or '-'",
            spec.resource_class
        ));
    }
    if !matches!(spec.network.as_str(), "" | "host" | "none") {
        return Err(format!(
            "spec.network {:?} is invalid: use host or none",
            spec.network
        ));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("spec.env has an invalid variable name {key:?}"));
        }
        if key.starts_with("CORRAL_") {
            return Err(format!(
                "spec.env may not set {key}: CORRAL_* variables are corral's"
            ));
        }
    }
    if spec.env.values().any(|v| v.contains('\0')) {
        return Err("spec.env has a value with a NUL byte: exec cannot pass it".into());
    }
    argv_bounds("spec.argv", &spec.argv)?;
    if spec.env.len() > MAX_ENV {
        return Err(format!(
            "spec.env has {} variables: at most {MAX_ENV}",
            spec.env.len()
        ));
    }
    let bytes = spec.argv.iter().map(String::len).sum::<usize>()
        + spec
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + spec.finalize.len();
    if bytes > MAX_COMMAND_BYTES {
        return Err(format!(
            "spec.argv, spec.env and spec.finalize hold {bytes} bytes together: at most {MAX_COMMAND_BYTES}"
        ));
    }
    if spec.labels.len() > MAX_LABELS {
        return Err(format!(
            "spec.labels has {} labels: at most {MAX_LABELS}",
            spec.labels.len()
        ));
    }
    for (key, value) in &spec.labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_BYTES {
            return Err(format!(
                "spec.labels key {key:?} is {} bytes: give 1 to {MAX_LABEL_KEY_BYTES}",
                key.len()
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(format!(
                "spec.labels[{key:?}] is {} bytes: at most {MAX_LABEL_VALUE_BYTES}",
                value.len()
            ));
        }
    }
    Ok(())
}

/// An argv's word count and its words (no NUL: exec cannot pass one).
fn argv_bounds(field: &str, argv: &[String]) -> Result<(), String> {
    if argv.len() > MAX_ARGV {
        return Err(format!(
            "{field} has {} words: at most {MAX_ARGV}",
            argv.len()
        ));
    }
    if let Some(i) = argv.iter().position(|word| word.contains('\0')) {
        return Err(format!("{field}[{i}] has a NUL byte: exec cannot pass it"));
    }
    let bytes: usize = argv.iter().map(String::len).sum();
    if bytes > MAX_COMMAND_BYTES {
        return Err(format!(
            "{field} holds {bytes} bytes: at most {MAX_COMMAND_BYTES}"
        ));
    }
    Ok(())
}

/// The earliest and latest `at_ms` an agent event may carry (2000-01-01 and
/// 2100-01-01, UTC): outside them a clock is wrong, and PostgreSQL would
/// refuse far-off values.
pub const EVENT_AT_MS_RANGE: std::ops::RangeInclusive<i64> = 946_684_800_000..=4_102_444_800_000;

/// An agent event's time: within [`EVENT_AT_MS_RANGE`].
pub fn event_at_ms(at_ms: i64) -> Result<(), String> {
    if EVENT_AT_MS_RANGE.contains(&at_ms) {
        return Ok(());
    }
    Err(format!(
        "at_ms {at_ms} is out of range: milliseconds since the Unix epoch between {} (2000-01-01) and {} (2100-01-01)",
        EVENT_AT_MS_RANGE.start(),
        EVENT_AT_MS_RANGE.end()
    ))
}

pub fn stop_command(command: &StopCommand) -> Result<(), String> {
    validate_run_id(&command.run_id).map_err(|e| e.to_string())
}

pub fn continue_command(command: &ContinueCommand) -> Result<(), String> {
    validate_run_id(&command.run_id).map_err(|e| e.to_string())?;
    if command.argv.first().is_some_and(String::is_empty) {
        return Err(
            "argv[0] is empty: give the turn's program, or no argv to rerun the run's own".into(),
        );
    }
    argv_bounds("argv", &command.argv)
}

pub fn session_command(command: &SessionCommand) -> Result<(), String> {
    validate_run_id(&command.run_id).map_err(|e| e.to_string())?;
    match command.action() {
        session_command::Action::Unspecified => Err(format!(
            "action {} is not pause, resume or end",
            command.action
        )),
        _ => Ok(()),
    }
}

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::RunSpec;

    fn command(argv: &[&str]) -> RunCommand {
        RunCommand {
            run_id: "r1".into(),
            spec: Some(RunSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with(change: impl FnOnce(&mut RunSpec)) -> RunCommand {
        let mut c = command(&["true"]);
        if let Some(spec) = c.spec.as_mut() {
            change(spec);
        }
        c
    }

    #[test]
    fn session_and_continue_commands_are_checked() {
        let bad = SessionCommand {
            run_id: "r1".into(),
            ..Default::default()
        };
        assert!(
            session_command(&bad)
                .expect_err("no action")
                .contains("not pause")
        );
        let empty = ContinueCommand {
            run_id: "r1".into(),
            argv: vec![String::new()],
            ..Default::default()
        };
        assert!(
            continue_command(&empty)
                .expect_err("empty")
                .contains("argv[0] is empty")
        );
    }

    #[test]
    fn each_bound_holds_at_its_edge_and_fails_past_it_naming_the_field() {
        use std::collections::HashMap;
        let labels = |n: usize| -> HashMap<String, String> {
            (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect()
        };
        let cases: Vec<(RunCommand, RunCommand, &str)> = vec![
            (
                with(|s| s.labels = labels(MAX_LABELS)),
                with(|s| s.labels = labels(MAX_LABELS + 1)),
                "spec.labels has 65 labels",
            ),
            (
                with(|s| s.labels = HashMap::from([("k".repeat(MAX_LABEL_KEY_BYTES), "v".into())])),
                with(|s| {
                    s.labels = HashMap::from([("k".repeat(MAX_LABEL_KEY_BYTES + 1), "v".into())])
                }),
                "spec.labels key",
            ),
            (
                with(|s| {
                    s.labels = HashMap::from([("k".into(), "v".repeat(MAX_LABEL_VALUE_BYTES))])
                }),
                with(|s| {
                    s.labels = HashMap::from([("k".into(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1))])
                }),
                "spec.labels[\"k\"] is 1025 bytes",
            ),
            (
                with(|s| s.argv = vec!["x".into(); MAX_ARGV]),
                with(|s| s.argv = vec!["x".into(); MAX_ARGV + 1]),
                "spec.argv has 4097 words",
            ),
            (
                with(|s| {
                    s.env = (0..MAX_ENV)
                        .map(|i| (format!("V{i}"), String::new()))
                        .collect()
                }),
                with(|s| {
                    s.env = (0..=MAX_ENV)
                        .map(|i| (format!("V{i}"), String::new()))
                        .collect()
                }),
                "spec.env has 1025 variables",
            ),
            (
                with(|s| s.argv = vec!["x".repeat(MAX_COMMAND_BYTES)]),
                with(|s| s.argv = vec!["x".repeat(MAX_COMMAND_BYTES + 1)]),
                "spec.argv holds 262145 bytes",
            ),
            (
                with(|s| {
                    s.argv = vec!["x".repeat(MAX_COMMAND_BYTES - 2)];
                    s.env = HashMap::from([("A".into(), "b".into())]);
                }),
                with(|s| {
                    s.argv = vec!["x".repeat(MAX_COMMAND_BYTES - 1)];
                    s.env = HashMap::from([("A".into(), "b".into())]);
                }),
                "hold 262145 bytes together",
            ),
        ];
        for (edge, past, said) in cases {
            run_command(&edge).unwrap_or_else(|err| panic!("at the edge of {said}: {err}"));
            let err = run_command(&past).expect_err(said);
            assert!(err.contains(said), "{err} should say {said}");
        }
        let nul = with(|s| s.argv = vec!["a\0b".into()]);
        assert!(
            run_command(&nul)
                .expect_err("nul")
                .contains("spec.argv[0] has a NUL byte")
        );
        let turn = ContinueCommand {
            run_id: "r1".into(),
            argv: vec!["x".into(); MAX_ARGV + 1],
            ..Default::default()
        };
        assert!(
            continue_command(&turn)
                .expect_err("too long")
                .contains("argv has 4097 words")
        );
    }

    #[test]
    fn a_plain_command_is_valid() {
        run_command(&command(&["true"])).expect("valid");
    }

    #[test]
    fn invalid_commands_say_what_is_wrong() {
        let cases: Vec<(RunCommand, &str)> = vec![
            (command(&[]), "argv is empty"),
            (command(&[""]), "argv[0] is empty"),
            (
                RunCommand {
                    run_id: "a.b".into(),
                    ..command(&["true"])
                },
                "invalid run id",
            ),
            (
                RunCommand {
                    spec: None,
                    ..command(&["true"])
                },
                "spec is missing",
            ),
            (
                {
                    let mut c = command(&["true"]);
                    if let Some(s) = c.spec.as_mut() {
                        s.timeout_secs = -5;
                    }
                    c
                },
                "spec.timeout_secs is -5",
            ),
            (
                {
                    let mut c = command(&["true"]);
                    if let Some(s) = c.spec.as_mut() {
                        s.provider = "nope".into();
                    }
                    c
                },
                "spec.provider \"nope\" is unknown",
            ),
            (
                with(|s| {
                    s.keep_alive = true;
                    s.finalize = "git push".into();
                }),
                "spec.finalize cannot be combined with spec.keep_alive",
            ),
            (
                with(|s| s.idle_pause_secs = 60),
                "apply only with spec.keep_alive",
            ),
            (
                with(|s| {
                    s.keep_alive = true;
                    s.max_lifetime_secs = -1;
                }),
                "spec.max_lifetime_secs is -1",
            ),
            (
                with(|s| s.resource_class = "Big!".into()),
                "spec.resource_class",
            ),
            (with(|s| s.network = "bridge".into()), "spec.network"),
        ];
        for (command, expected) in cases {
            let err = run_command(&command).expect_err(expected);
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }
}
