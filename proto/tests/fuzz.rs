//! Every protobuf decoder an outsider can reach, fed arbitrary bytes, and
//! every command check fed what decodes: no input may panic. Ordinary tests
//! (256 cases each); a longer run sets `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=1000000 cargo test --release -p corral-proto --test fuzz`.

use corral_proto::v1::{
    ActivityRequest, AgentEvent, ClaimRequest, ContinueCommand, CostRequest, GetRunRequest,
    HeartbeatRequest, ListRunsRequest, NodeKillRequest, RecordSandboxRequest, ReleaseRequest,
    RunCommand, RunSpec, SessionCommand, StopCommand, SubmitRequest, SweepRequest,
    TransitionRequest,
};
use corral_proto::validate;
use proptest::prelude::*;
use prost::Message;

/// Bytes, and bytes that look like protobuf fields (tag, wire type and a
/// short length), which reach deeper than noise.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(
            (1u8..16, 0u8..6, prop::collection::vec(any::<u8>(), 0..24)).prop_map(
                |(field, wire_type, body)| {
                    let mut out = vec![(field << 3) | wire_type];
                    if wire_type == 2 {
                        out.push(body.len() as u8);
                    }
                    out.extend(body);
                    out
                }
            ),
            0..12
        )
        .prop_map(|parts| parts.concat()),
    ]
}

proptest! {
    #[test]
    fn commands_from_any_bytes_decode_and_check_without_panic(bytes in wire()) {
        if let Ok(command) = RunCommand::decode(bytes.as_slice()) {
            let _ = validate::run_command(&command);
        }
        if let Ok(command) = StopCommand::decode(bytes.as_slice()) {
            let _ = validate::stop_command(&command);
        }
        if let Ok(command) = ContinueCommand::decode(bytes.as_slice()) {
            let _ = validate::continue_command(&command);
        }
        if let Ok(command) = SessionCommand::decode(bytes.as_slice()) {
            let _ = validate::session_command(&command);
        }
        if let Ok(event) = AgentEvent::decode(bytes.as_slice()) {
            let _ = validate::event_at_ms(event.at_ms);
            let _ = corral_proto::validate_run_id(&event.run_id);
        }
    }

    #[test]
    fn tracker_requests_from_any_bytes_decode_without_panic(bytes in wire()) {
        let b = bytes.as_slice();
        let _ = SubmitRequest::decode(b);
        let _ = ClaimRequest::decode(b);
        let _ = TransitionRequest::decode(b);
        let _ = RecordSandboxRequest::decode(b);
        let _ = ReleaseRequest::decode(b);
        let _ = HeartbeatRequest::decode(b);
        let _ = ActivityRequest::decode(b);
        let _ = GetRunRequest::decode(b);
        let _ = ListRunsRequest::decode(b);
        let _ = CostRequest::decode(b);
        let _ = SweepRequest::decode(b);
        let _ = NodeKillRequest::decode(b);
    }

    /// Well-formed commands with arbitrary contents: checked without panic,
    /// and what passes the check encodes and decodes to itself.
    #[test]
    fn any_run_command_is_checked_and_what_passes_round_trips(
        run_id in "\\PC{0,80}",
        argv in prop::collection::vec("\\PC{0,40}", 0..8),
        env in prop::collection::hash_map("\\PC{0,20}", "\\PC{0,40}", 0..6),
        labels in prop::collection::hash_map("\\PC{0,20}", "\\PC{0,40}", 0..6),
        timeout_secs in any::<i32>(),
        provider in prop_oneof![Just(String::new()), Just("local".to_owned()), "\\PC{0,10}"],
        network in prop_oneof![Just(String::new()), Just("none".to_owned()), "\\PC{0,10}"],
        keep_alive in any::<bool>(),
    ) {
        let command = RunCommand {
            run_id,
            spec: Some(RunSpec {
                argv,
                env,
                labels,
                timeout_secs,
                provider,
                network,
                keep_alive,
                ..Default::default()
            }),
            ..Default::default()
        };
        if validate::run_command(&command).is_ok() {
            let again = RunCommand::decode(command.encode_to_vec().as_slice()).expect("decodes");
            prop_assert_eq!(again, command);
        }
    }
}
