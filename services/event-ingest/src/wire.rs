//! The JSON form of agent events (HTTP in and out) and its mapping to the
//! `AgentEvent` protobuf. Errors name the offending field.

use corral_proto::v1::{
    AgentEvent, Completed, Error, FileEdited, Heartbeat, Message, Output, Started, ToolCompleted,
    ToolUse, Usage, agent_event::Payload, output,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One event as an agent posts it: `{"kind": "agent.tool_use", "data": {...}}`
/// with optional `event_id` (assigned when absent), `seq` and `at_ms`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incoming {
    pub kind: String,
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub at_ms: Option<i64>,
    #[serde(default)]
    pub data: Value,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    #[serde(default)]
    stream: String,
    line: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartedJson {
    #[serde(default)]
    session_id: String,
    #[serde(default)]
    model: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MessageJson {
    #[serde(default)]
    role: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Option<UsageJson>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UsageJson {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ToolUseJson {
    #[serde(default)]
    tool_use_id: String,
    tool: String,
    #[serde(default)]
    input: Value,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ToolCompletedJson {
    #[serde(default)]
    tool_use_id: String,
    #[serde(default)]
    result: String,
    #[serde(default)]
    duration_ms: u64,
    #[serde(default)]
    is_error: bool,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileEditedJson {
    path: String,
    #[serde(default)]
    unified_diff: String,
    #[serde(default)]
    turn: u32,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CompletedJson {
    #[serde(default)]
    summary: String,
    #[serde(default)]
    session_id: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ErrorJson {
    message: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EmptyJson {}

fn data<T: for<'de> Deserialize<'de> + Default>(value: Value) -> Result<T, String> {
    if value.is_null() {
        return serde_json::from_value(Value::Object(Default::default()))
            .map_err(|e| format!("data: {e}"));
    }
    serde_json::from_value(value).map_err(|e| format!("data: {e}"))
}

/// The protobuf event for `incoming`, posted for `run_id`.
pub fn to_proto(run_id: &str, incoming: Incoming) -> Result<AgentEvent, String> {
    if !corral_proto::kinds::is_known(&incoming.kind) {
        let kinds: Vec<&str> = corral_proto::kinds::KINDS.iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "kind: unknown kind {:?}; use one of {}",
            incoming.kind,
            kinds.join(", ")
        ));
    }
    let payload = match incoming.kind.as_str() {
        "agent.output" => {
            let d: OutputJson = data(incoming.data)?;
            let stream = match d.stream.as_str() {
                "" | "stdout" => output::Stream::Stdout,
                "stderr" => output::Stream::Stderr,
                other => {
                    return Err(format!(
                        "data.stream: {other:?} is neither stdout nor stderr"
                    ));
                }
            };
            Payload::Output(Output {
                stream: stream as i32,
                line: d.line,
            })
        }
        "agent.started" => {
            let d: StartedJson = data(incoming.data)?;
            Payload::Started(Started {
                session_id: d.session_id,
                model: d.model,
            })
        }
        "agent.tool_use" => {
            let d: ToolUseJson = data(incoming.data)?;
            Payload::ToolUse(ToolUse {
                tool_use_id: d.tool_use_id,
                tool: d.tool,
                input_json: d.input.to_string(),
            })
        }
        "agent.tool_completed" => {
            let d: ToolCompletedJson = data(incoming.data)?;
            Payload::ToolCompleted(ToolCompleted {
                tool_use_id: d.tool_use_id,
                result: d.result,
                duration_ms: d.duration_ms,
                is_error: d.is_error,
            })
        }
        "agent.file_edited" => {
            let d: FileEditedJson = data(incoming.data)?;
            Payload::FileEdited(FileEdited {
                path: d.path,
                unified_diff: d.unified_diff,
                turn: d.turn,
            })
        }
        "agent.completed" => {
            let d: CompletedJson = data(incoming.data)?;
            Payload::Completed(Completed {
                summary: d.summary,
                session_id: d.session_id,
            })
        }
        "agent.error" => {
            let d: ErrorJson = data(incoming.data)?;
            Payload::Error(Error { message: d.message })
        }
        "agent.heartbeat" => {
            let _: EmptyJson = data(incoming.data)?;
            Payload::Heartbeat(Heartbeat {})
        }
        // The message kinds: system, assistant, user, tool results, waiting.
        _ => {
            let d: MessageJson = data(incoming.data)?;
            Payload::Message(Message {
                role: d.role,
                text: d.text,
                model: d.model,
                usage: d.usage.map(|u| Usage {
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                }),
            })
        }
    };
    let event_id = match incoming.event_id {
        Some(id) if id.is_empty() || id.len() > 128 => {
            return Err("event_id: 1 to 128 characters".into());
        }
        Some(id) => id,
        None => uuid::Uuid::now_v7().to_string(),
    };
    let at_ms = incoming.at_ms.unwrap_or_else(corral_common::now_ms);
    corral_proto::validate::event_at_ms(at_ms)?;
    Ok(AgentEvent {
        event_id,
        run_id: run_id.to_owned(),
        seq: incoming.seq.unwrap_or(0),
        at_ms,
        kind: incoming.kind,
        payload: Some(payload),
    })
}

/// Replaces every NUL character (which PostgreSQL text and jsonb cannot
/// hold) in the strings and keys of `value` with U+FFFD; returns how many.
pub fn scrub_json(value: &mut Value) -> usize {
    match value {
        Value::String(text) => scrub(text),
        Value::Array(items) => items.iter_mut().map(scrub_json).sum(),
        Value::Object(map) => {
            let mut replaced = 0;
            if map.keys().any(|k| k.contains('\0')) {
                let taken = std::mem::take(map);
                for (mut key, mut item) in taken {
                    replaced += scrub(&mut key) + scrub_json(&mut item);
                    map.insert(key, item);
                }
                return replaced;
            }
            map.values_mut().map(scrub_json).sum()
        }
        _ => 0,
    }
}

/// Replaces NUL characters in `text` with U+FFFD; returns how many.
pub fn scrub(text: &mut String) -> usize {
    let count = text.matches('\0').count();
    if count > 0 {
        *text = text.replace('\0', "\u{FFFD}");
    }
    count
}

/// The `data` JSON of an event, with diffs longer than `max_diff` cut (and
/// the second value true).
pub fn data_json(event: &AgentEvent, max_diff: usize) -> (Value, bool) {
    let mut truncated = false;
    let value = match &event.payload {
        None => Value::Object(Default::default()),
        Some(Payload::Output(p)) => serde_json::json!({
            "stream": if p.stream == output::Stream::Stderr as i32 { "stderr" } else { "stdout" },
            "line": p.line,
        }),
        Some(Payload::Started(p)) => {
            serde_json::json!({ "session_id": p.session_id, "model": p.model })
        }
        Some(Payload::Message(p)) => {
            let mut value = serde_json::json!({ "role": p.role, "text": p.text });
            // Only what the agent reported: messages without them read as before.
            if !p.model.is_empty() {
                value["model"] = Value::String(p.model.clone());
            }
            if let Some(usage) = &p.usage {
                value["usage"] = serde_json::json!({
                    "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                });
            }
            value
        }
        Some(Payload::ToolUse(p)) => serde_json::json!({
            "tool_use_id": p.tool_use_id,
            "tool": p.tool,
            "input": serde_json::from_str::<Value>(&p.input_json).unwrap_or(Value::String(p.input_json.clone())),
        }),
        Some(Payload::ToolCompleted(p)) => serde_json::json!({
            "tool_use_id": p.tool_use_id, "result": p.result, "duration_ms": p.duration_ms, "is_error": p.is_error,
        }),
        Some(Payload::FileEdited(p)) => {
            let mut diff = p.unified_diff.as_str();
            if diff.len() > max_diff {
                let mut cut = max_diff;
                while !diff.is_char_boundary(cut) {
                    cut -= 1;
                }
                diff = &diff[..cut];
                truncated = true;
            }
            serde_json::json!({ "path": p.path, "unified_diff": diff, "turn": p.turn })
        }
        Some(Payload::Heartbeat(_)) => Value::Object(Default::default()),
        Some(Payload::Completed(p)) => {
            serde_json::json!({ "summary": p.summary, "session_id": p.session_id })
        }
        Some(Payload::Error(p)) => serde_json::json!({ "message": p.message }),
    };
    (value, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_replaced_everywhere_and_counted() {
        let mut value = serde_json::json!({"line": "a\0b", "k\0": ["\0", 1]});
        assert_eq!(scrub_json(&mut value), 3);
        assert_eq!(
            value,
            serde_json::json!({"line": "a\u{FFFD}b", "k\u{FFFD}": ["\u{FFFD}", 1]})
        );
        assert!(!value.to_string().contains("\\u0000"), "{value}");
    }

    #[test]
    fn an_event_time_out_of_range_is_refused_naming_at_ms() {
        let incoming: Incoming = serde_json::from_value(
            serde_json::json!({"kind": "agent.heartbeat", "at_ms": -5, "data": {}}),
        )
        .expect("incoming");
        let err = to_proto("r1", incoming).expect_err("out of range");
        assert!(err.starts_with("at_ms"), "{err}");
    }

    fn incoming(json: &str) -> Incoming {
        serde_json::from_str(json).expect("valid envelope")
    }

    #[test]
    fn a_tool_use_round_trips_through_protobuf() {
        let event = to_proto(
            "r1",
            incoming(r#"{"kind":"agent.tool_use","seq":3,"data":{"tool":"Write","input":{"path":"a.rs"}}}"#),
        )
        .expect("valid");
        assert_eq!(event.seq, 3);
        let (data, truncated) = data_json(&event, 100);
        assert_eq!(data["tool"], "Write");
        assert_eq!(data["input"]["path"], "a.rs");
        assert!(!truncated);
    }

    #[test]
    fn a_message_keeps_its_model_and_usage_only_when_reported() {
        let event = to_proto(
            "r1",
            incoming(
                r#"{"kind":"agent.assistant_message","data":{"role":"assistant","text":"hi","model":"m-1","usage":{"input_tokens":12,"output_tokens":3}}}"#,
            ),
        )
        .expect("valid");
        let (data, _) = data_json(&event, 100);
        assert_eq!(data["model"], "m-1");
        assert_eq!(data["usage"]["input_tokens"], 12);
        assert_eq!(data["usage"]["output_tokens"], 3);
        let plain = to_proto(
            "r1",
            incoming(
                r#"{"kind":"agent.assistant_message","data":{"role":"assistant","text":"hi"}}"#,
            ),
        )
        .expect("valid");
        let (data, _) = data_json(&plain, 100);
        assert_eq!(data, serde_json::json!({"role": "assistant", "text": "hi"}));
        let err = to_proto(
            "r1",
            incoming(r#"{"kind":"agent.assistant_message","data":{"usage":{"tokens":1}}}"#),
        )
        .expect_err("unknown usage field");
        assert!(err.starts_with("data:") && err.contains("tokens"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let err = to_proto("r1", incoming(r#"{"kind":"agent.tool_use","data":{}}"#))
            .expect_err("no tool");
        assert!(err.starts_with("data:") && err.contains("tool"), "{err}");
        let err = to_proto("r1", incoming(r#"{"kind":"agent.nope"}"#)).expect_err("unknown kind");
        assert!(err.starts_with("kind:"), "{err}");
    }

    #[test]
    fn long_diffs_are_cut_and_marked() {
        let event = to_proto(
            "r1",
            incoming(
                r#"{"kind":"agent.file_edited","data":{"path":"a","unified_diff":"0123456789"}}"#,
            ),
        )
        .expect("valid");
        let (data, truncated) = data_json(&event, 4);
        assert_eq!(data["unified_diff"], "0123");
        assert!(truncated);
    }
}
