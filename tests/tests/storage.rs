//! Event storage never stalls: a NUL byte, a clock gone wrong, an event the
//! database refuses or an event naming another run than its subject each
//! lose nothing else, and what cannot be stored is dead-lettered with why.

use std::time::Duration;

use corral_proto::v1::{AgentEvent, RunState};
use corral_tests::{TestEnv, eventually};
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

async fn post(url: &str, run_id: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let response = corral_tests::http()
        .post(format!("{url}/v1/runs/{run_id}/events"))
        .bearer_auth(token)
        .json(&body)
        .timeout(LIMIT)
        .send()
        .await
        .expect("ingest answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every event of the run the HTTP API serves, oldest first (bounded pages).
async fn served(url: &str, run_id: &str) -> Vec<Value> {
    let http = corral_tests::http();
    let mut after = 0;
    let mut all = Vec::new();
    for _ in 0..100 {
        let page: Value = http
            .get(format!(
                "{url}/v1/runs/{run_id}/events?after={after}&limit=100"
            ))
            .timeout(LIMIT)
            .send()
            .await
            .expect("page")
            .json()
            .await
            .expect("json");
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            return all;
        }
        all.extend(events);
        after = page["next_after"].as_i64().expect("cursor");
    }
    panic!("more than 100 pages of events for {run_id}");
}

async fn stored_ids(env: &TestEnv, run_id: &str) -> Vec<String> {
    let pool = env.pool().await;
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT event_id FROM sandbox_events WHERE run_id = $1 ORDER BY stream_seq")
            .bind(run_id)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
    pool.close().await;
    rows.into_iter().map(|(id,)| id).collect()
}

/// Dead-lettered events: (error header, original payload).
async fn dead_letters(env: &TestEnv) -> Vec<(String, Vec<u8>)> {
    env.stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("events"))
        .await
        .into_iter()
        .map(|m| {
            let error = m
                .headers
                .get(corral_proto::headers::DLQ_ERROR)
                .map(|v| v.to_string())
                .unwrap_or_default();
            (error, m.payload.to_vec())
        })
        .collect()
}

fn event(run_id: &str, event_id: &str, at_ms: i64) -> AgentEvent {
    AgentEvent {
        event_id: event_id.into(),
        run_id: run_id.into(),
        seq: 1,
        at_ms,
        kind: "agent.heartbeat".into(),
        payload: None,
    }
}

async fn publish(env: &TestEnv, subject_run: &str, event: &AgentEvent) {
    let client = env.client().await;
    client
        .jetstream()
        .publish(
            env.subjects.events(subject_run, &event.kind),
            event.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_printing_a_nul_byte_has_every_line_stored_and_served() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let (ingest, url) = env.start_ingest().await;
    let client = env.client().await;

    let command = env.command(&["printf", "before\\na\\0b\\nafter\\n"]);
    client.start_run(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let lines = eventually("the three lines are served", LIMIT, || async {
        let events = served(&url, &command.run_id).await;
        (events.len() == 3).then_some(events)
    })
    .await;
    let lines: Vec<&str> = lines
        .iter()
        .map(|e| e["data"]["line"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(lines, ["before", "a\u{FFFD}b", "after"]);
    assert!(dead_letters(&env).await.is_empty(), "nothing dead-lettered");

    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_out_of_range_is_refused_at_the_edge_and_dead_lettered_over_nats() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let token = env.token("run-t");

    let (status, body) = post(
        &url,
        "run-t",
        &token,
        json!({"kind": "agent.heartbeat", "at_ms": 5, "data": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body.to_string().contains("at_ms"),
        "names the field: {body}"
    );

    // Over NATS: the far-future event is dead-lettered, the next is stored.
    publish(
        &env,
        "run-t",
        &event("run-t", "far", 10_000_000_000_000_000),
    )
    .await;
    publish(
        &env,
        "run-t",
        &event("run-t", "next", corral_common::now_ms()),
    )
    .await;
    eventually("the good event after it is stored", LIMIT, || async {
        (stored_ids(&env, "run-t").await == ["next"]).then_some(())
    })
    .await;
    let dead = dead_letters(&env).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.contains("at_ms"), "{}", dead[0].0);
    assert_eq!(
        AgentEvent::decode(dead[0].1.as_slice())
            .expect("the original")
            .event_id,
        "far"
    );

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_database_refuses_is_split_until_the_event_at_fault_is_dead_lettered() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let token = env.token("run-p");
    // The fault: the database refuses one event (as it would a value it
    // cannot hold), whatever batch it comes in.
    let pool = env.pool().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
         BEGIN
           IF NEW.event_id = 'poison' THEN RAISE EXCEPTION 'poison refused'; END IF;
           RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON sandbox_events
           FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&pool)
    .await
    .expect("trigger");
    pool.close().await;

    let ids: Vec<String> = (1..=9)
        .map(|i| {
            if i == 5 {
                "poison".to_owned()
            } else {
                format!("e-{i}")
            }
        })
        .collect();
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"kind": "agent.heartbeat", "event_id": id, "data": {}}))
        .collect();
    let (status, body) = post(&url, "run-p", &token, Value::Array(batch)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let expected: Vec<String> = ids.iter().filter(|id| *id != "poison").cloned().collect();
    eventually("every other event is stored", LIMIT, || async {
        (stored_ids(&env, "run-p").await == expected).then_some(())
    })
    .await;
    let dead = eventually("the event at fault is dead-lettered", LIMIT, || async {
        let dead = dead_letters(&env).await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1, "only the event at fault: {dead:?}");
    assert!(dead[0].0.contains("poison refused"), "{}", dead[0].0);

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_are_per_run_and_an_event_naming_another_run_is_dead_lettered() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;

    // The same agent-chosen id in two runs: two events.
    for run_id in ["run-x", "run-y"] {
        let (status, body) = post(
            &url,
            run_id,
            &env.token(run_id),
            json!({"kind": "agent.heartbeat", "event_id": "same", "data": {}}),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    // Published on run-y's subject, claiming to be run-x's.
    publish(
        &env,
        "run-y",
        &event("run-x", "forged", corral_common::now_ms()),
    )
    .await;
    publish(
        &env,
        "run-y",
        &event("run-y", "after", corral_common::now_ms()),
    )
    .await;

    eventually("both runs have their event", LIMIT, || async {
        let x = stored_ids(&env, "run-x").await;
        let y = stored_ids(&env, "run-y").await;
        (x == ["same"] && y == ["same", "after"]).then_some(())
    })
    .await;
    let dead = dead_letters(&env).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.contains("run-y"), "{}", dead[0].0);

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
