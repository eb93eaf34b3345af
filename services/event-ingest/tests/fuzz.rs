//! The JSON event wire (what an agent posts), fed arbitrary JSON and JSON
//! shaped like events with arbitrary contents: every input gives an event
//! or an error naming what is wrong, never a panic. A longer run:
//! `PROPTEST_CASES=1000000 cargo test --release -p corral-event-ingest --test fuzz`.

use corral_event_ingest::wire::{self, Incoming};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,20}".prop_map(Value::String),
        // NUL and other control characters: stored text must not carry them.
        "[\\x00-\\x1f]{0,4}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map("\\PC{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object shaped like an event: a known kind (or not), and any data.
fn event_like() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        prop::sample::select(vec![
            "agent.output",
            "agent.started",
            "agent.tool_use",
            "agent.tool_completed",
            "agent.file_edited",
            "agent.completed",
            "agent.error",
            "agent.heartbeat",
            "agent.message",
            "agent.system",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,20}",
    ];
    (
        kind,
        json_value(),
        prop::option::of("\\PC{0,40}"),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(kind, data, event_id, seq, at_ms)| {
            let mut event = json!({ "kind": kind, "data": data });
            if let Some(id) = event_id {
                event["event_id"] = json!(id);
            }
            if let Some(seq) = seq {
                event["seq"] = json!(seq);
            }
            if let Some(at_ms) = at_ms {
                event["at_ms"] = json!(at_ms);
            }
            event
        })
}

/// What ingest does with a posted event: read it, and for one it accepts,
/// render its data as served.
fn judge(value: Value) {
    if let Ok(incoming) = serde_json::from_value::<Incoming>(value)
        && let Ok(event) = wire::to_proto("run-fuzz", incoming)
    {
        let _ = wire::data_json(&event, 1024);
    }
}

proptest! {
    #[test]
    fn any_json_is_an_event_or_an_error(value in json_value()) {
        judge(value);
    }

    #[test]
    fn any_event_shaped_json_is_an_event_or_an_error(value in event_like()) {
        judge(value);
    }

    #[test]
    fn any_bytes_as_a_body_are_refused_or_read_without_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200)
    ) {
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            judge(value);
        }
    }
}
