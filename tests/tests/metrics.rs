//! The figures an operator watches, on real service processes: tracker
//! request latency per op, stop latency from the request to the sandbox
//! gone, and which reaper leads.

use std::time::Duration;

use corral_proto::v1::{RunState, StopCommand};
use corral_tests::{TestEnv, eventually, tracker_answers};

const LIMIT: Duration = Duration::from_secs(60);

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("addr").to_string()
}

/// The first value of a series (`name` with its labels, as exposed).
async fn series(addr: &str, name: &str) -> Option<f64> {
    let body = corral_tests::http()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_latency_stop_latency_and_the_reaper_leader_are_exported() {
    let env = TestEnv::new().await;
    let tracker_addr = free_addr();
    let spawner_addr = free_addr();
    let reaper_addr = free_addr();
    let mut tracker =
        env.spawn_service_process("tracker", &[("CORRAL_METRICS_ADDR", &tracker_addr)]);
    let client = env.client().await;
    tracker_answers(&client, "the tracker answers").await;
    let mut spawner =
        env.spawn_service_process("spawner", &[("CORRAL_METRICS_ADDR", &spawner_addr)]);
    let mut reaper = env.spawn_service_process("reaper", &[("CORRAL_METRICS_ADDR", &reaper_addr)]);

    let command = env.command(&["sleep", "300"]);
    client.start_run(&command).await.expect("submit");
    env.wait_state(&client, &command.run_id, RunState::Running)
        .await;
    client
        .stop(&StopCommand {
            run_id: command.run_id.clone(),
            reason: "metrics".into(),
            requested_by: "test".into(),
            requested_at_ms: corral_common::now_ms(),
        })
        .await
        .expect("stop");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Stopped, "{}", run.reason);

    for op in ["submit", "claim", "transition", "stop"] {
        let name = format!("corral_tracker_request_seconds_count{{op=\"{op}\"}}");
        let count = eventually(&format!("op {op} is timed"), LIMIT, || {
            series(&tracker_addr, &name)
        })
        .await;
        assert!(count >= 1.0, "op {op}: {count}");
    }
    let stops = eventually("the stop is timed", LIMIT, || {
        series(&spawner_addr, "corral_stop_seconds_count")
    })
    .await;
    assert_eq!(stops, 1.0, "one stop, one sample");
    let slowest = series(&spawner_addr, "corral_stop_seconds_sum")
        .await
        .expect("a sum");
    assert!(
        slowest > 0.0 && slowest < LIMIT.as_secs_f64(),
        "stop took {slowest} s"
    );
    eventually("the only reaper leads", LIMIT, || async {
        (series(&reaper_addr, "corral_reaper_leader").await? == 1.0).then_some(())
    })
    .await;

    let _ = reaper.kill().await;
    let _ = spawner.kill().await;
    let _ = tracker.kill().await;
    env.cleanup().await;
}
