//! Checks a command must pass before anyone acts on it. The CLI checks
//! before publishing; the spawner checks again (other clients publish too)
//! and dead-letters what fails, with the message returned here.

use crate::v1::{RunCommand, StopCommand};
use crate::validate_run_id;

/// Providers corral knows by name. Whether a spawner has one configured is
/// the spawner's question.
pub const KNOWN_PROVIDERS: [&str; 1] = ["local"];

/// Longest absolute timeout accepted: 7 days.
pub const MAX_TIMEOUT_SECS: i32 = 7 * 24 * 3600;

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
    Ok(())
}

pub fn stop_command(command: &StopCommand) -> Result<(), String> {
    validate_run_id(&command.run_id).map_err(|e| e.to_string())
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
