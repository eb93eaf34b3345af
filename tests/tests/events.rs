//! Event ingest: real HTTP, real NATS and PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::consumer;
use corral_tests::{TestEnv, eventually};
use futures::StreamExt;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

async fn post(url: &str, run_id: &str, token: Option<&str>, body: String) -> (StatusCode, Value) {
    let mut request = corral_tests::http()
        .post(format!("{url}/v1/runs/{run_id}/events"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("ingest answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn stored(env: &TestEnv, run_id: &str) -> Vec<(String, i64)> {
    let pool = env.pool().await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_id, stream_seq FROM sandbox_events WHERE run_id = $1 ORDER BY stream_seq",
    )
    .bind(run_id)
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    pool.close().await;
    rows
}

/// The `event_id`s of the first `n` events of an SSE body, failing with
/// `what` when they do not come within [`LIMIT`].
async fn sse_event_ids<B: AsRef<[u8]>>(
    body: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    n: usize,
    what: &str,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut buffer = String::new();
    tokio::time::timeout(LIMIT, async {
        while ids.len() < n {
            let chunk = body.next().await.expect("stream open").expect("chunk");
            buffer.push_str(&String::from_utf8_lossy(chunk.as_ref()));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                    let event: Value = serde_json::from_str(data.trim()).expect("event json");
                    ids.push(event["event_id"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out after {LIMIT:?}: {what}"));
    ids
}

fn tool_use(i: usize) -> Value {
    json!({ "kind": "agent.tool_use", "seq": i, "event_id": format!("e-{i}"), "data": { "tool": "Bash", "input": { "i": i } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_to_their_run_and_bad_input_is_refused_with_the_field() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let token = env.token("run-a");
    let good = tool_use(1).to_string();

    assert_eq!(
        post(&url, "run-a", None, good.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(
            &url,
            "run-a",
            Some("v1.run-a.9999999999999.00"),
            good.clone()
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = post(&url, "run-b", Some(&token), good.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = post(&url, "run-a", Some(&token), good.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["event_ids"], json!(["e-1"]));

    let cases = [
        ("{not json".to_owned(), "body"),
        (json!({ "kind": "agent.nope" }).to_string(), "kind"),
        (
            json!({ "kind": "agent.tool_use", "data": {} }).to_string(),
            "tool",
        ),
        (
            json!([tool_use(2), { "kind": "agent.file_edited", "data": { "diff": 1 } }])
                .to_string(),
            "[1].",
        ),
        (
            json!({ "kind": "agent.message", "colour": "red" }).to_string(),
            "colour",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&url, "run-a", Some(&token), body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{body}: {message:?} should name {field:?}"
        );
    }
    let huge = json!({ "kind": "agent.message", "data": { "text": "x".repeat(2 * 1024 * 1024) } })
        .to_string();
    assert_eq!(
        post(&url, "run-a", Some(&token), huge).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // Refused requests stored nothing; the accepted one is stored.
    let rows = eventually("the accepted event is stored", LIMIT, || async {
        let rows = stored(&env, "run-a").await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["e-1"]
    );

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_over_http_and_nats_are_stored_once_and_read_back_in_pages() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let token = env.token("run-d");
    let client = env.client().await;

    let batch: Vec<Value> = (1..=10).map(tool_use).collect();
    assert_eq!(
        post(
            &url,
            "run-d",
            Some(&token),
            Value::Array(batch.clone()).to_string()
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    // The same events again, over HTTP and as a trusted service on NATS
    // (outside the stream's de-duplication window's help: a new message id).
    assert_eq!(
        post(&url, "run-d", Some(&token), Value::Array(batch).to_string())
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let again = corral_proto::v1::AgentEvent {
        event_id: "e-3".into(),
        run_id: "run-d".into(),
        seq: 3,
        at_ms: corral_common::now_ms(),
        kind: "agent.tool_use".into(),
        payload: None,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "different-id");
    client
        .jetstream()
        .publish_with_headers(
            env.subjects.events("run-d", "agent.tool_use"),
            headers,
            again.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    // A poison event on the same subject goes to the dead letters.
    client
        .jetstream()
        .publish(
            env.subjects.events("run-d", "agent.tool_use"),
            "garbage \u{1}".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");

    let rows = eventually("ten distinct events stored", LIMIT, || async {
        let rows = stored(&env, "run-d").await;
        (rows.len() >= 10).then_some(rows)
    })
    .await;
    let ids: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        (rows.len(), ids.len()),
        (10, 10),
        "each event stored exactly once"
    );
    eventually("the poison event is dead-lettered", LIMIT, || async {
        let dead = env
            .stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("events"))
            .await;
        (dead.len() == 1).then_some(())
    })
    .await;

    // Cursor pages: 4 + 4 + 2, no gap, no duplicate (pages are served up
    // to the settled watermark: read again until the acks have landed).
    let http = corral_tests::http();
    let (seen, sizes) = eventually("ten events served in pages", LIMIT, || async {
        let mut after = 0;
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        for page_read in 0.. {
            assert!(page_read < corral_tests::MAX_PAGES, "the pages never end");
            let page: Value = http
                .get(format!("{url}/v1/runs/run-d/events?after={after}&limit=4"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                break;
            }
            sizes.push(events.len());
            seen.extend(
                events
                    .iter()
                    .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned()),
            );
            after = page["next_after"].as_i64()?;
        }
        (seen.len() >= 10).then_some((seen, sizes))
    })
    .await;
    assert_eq!(sizes, [4, 4, 2]);
    assert_eq!(seen, (1..=10).map(|i| format!("e-{i}")).collect::<Vec<_>>());

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_tail_continues_a_cursor_with_no_gap_and_no_duplicate() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let token = env.token("run-t");
    for i in 1..=5 {
        assert_eq!(
            post(&url, "run-t", Some(&token), tool_use(i).to_string())
                .await
                .0,
            StatusCode::ACCEPTED
        );
    }
    let rows = eventually("five stored", LIMIT, || async {
        let rows = stored(&env, "run-t").await;
        (rows.len() == 5).then_some(rows)
    })
    .await;
    let cursor = rows[1].1; // after the second event

    let response = corral_tests::http()
        .get(format!("{url}/v1/runs/run-t/events/stream?after={cursor}"))
        .send()
        .await
        .expect("tail");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let poster = {
        let (url, token) = (url.clone(), token.clone());
        tokio::spawn(async move {
            for i in 6..=10 {
                post(&url, "run-t", Some(&token), tool_use(i).to_string()).await;
            }
        })
    };
    let ids = sse_event_ids(&mut body, 8, "eight events on the tail").await;
    poster.await.expect("poster");
    assert_eq!(ids, (3..=10).map(|i| format!("e-{i}")).collect::<Vec<_>>());
    drop(body);
    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_analytics_consumers_each_receive_every_event() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let client = env.client().await;
    let stream = client
        .jetstream()
        .get_stream(env.subjects.events_stream())
        .await
        .expect("stream");
    let mut consumers = Vec::new();
    for name in ["analytics-a", "analytics-b"] {
        consumers.push(
            stream
                .get_or_create_consumer(
                    name,
                    consumer::pull::Config {
                        durable_name: Some(name.into()),
                        filter_subject: env.subjects.events_all(),
                        ..Default::default()
                    },
                )
                .await
                .expect("consumer"),
        );
    }
    let token = env.token("run-x");
    let batch: Vec<Value> = (1..=20).map(tool_use).collect();
    assert_eq!(
        post(&url, "run-x", Some(&token), Value::Array(batch).to_string())
            .await
            .0,
        StatusCode::ACCEPTED
    );

    for consumer in consumers {
        let mut messages = consumer.messages().await.expect("messages");
        let mut ids = HashSet::new();
        tokio::time::timeout(LIMIT, async {
            while ids.len() < 20 {
                let message = messages.next().await.expect("open").expect("message");
                let event =
                    corral_proto::v1::AgentEvent::decode(message.payload.clone()).expect("event");
                ids.insert(event.event_id);
                message.ack().await.expect("ack");
            }
        })
        .await
        .expect("every event reaches each consumer");
        assert_eq!(ids.len(), 20);
    }

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_stored_exactly_once_across_a_sigkilled_ingest() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let start = || {
        env.spawn_service_process(
            "event-ingest",
            &[
                ("CORRAL_LISTEN", listen.as_str()),
                ("CORRAL_TOKEN_SECRET", corral_tests::TOKEN_SECRET),
                ("CORRAL_BATCH_MAX", "50"),
            ],
        )
    };
    let mut ingest = start();
    let token = env.token("run-k");
    let mut accepted = Vec::new();
    let mut refused = 0;
    for round in 0..30 {
        let batch: Vec<Value> = (0..10).map(|j| tool_use(round * 10 + j)).collect();
        let ids: Vec<String> = batch
            .iter()
            .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        let response = corral_tests::http()
            .post(format!("{url}/v1/runs/run-k/events"))
            .bearer_auth(&token)
            .json(&batch)
            .send()
            .await;
        match response {
            Ok(response) if response.status() == StatusCode::ACCEPTED => accepted.extend(ids),
            _ => refused += 1,
        }
        if round == 12 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(ingest.id().expect("pid") as i32, libc::SIGKILL) };
            let _ = ingest.wait().await;
            ingest = start();
            // The posts go on once the new process listens: what is
            // measured is what it stores, not how fast it starts.
            eventually("the restarted ingest is ready", LIMIT, || async {
                let response = corral_tests::http()
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .ok()?;
                response.status().is_success().then_some(())
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        accepted.len() >= 200,
        "most posts should be accepted ({refused} refused)"
    );
    let rows = eventually("every accepted event stored", LIMIT, || async {
        let rows = stored(&env, "run-k").await;
        let ids: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        accepted
            .iter()
            .all(|id| ids.contains(id.as_str()))
            .then_some(rows)
    })
    .await;
    let distinct: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(rows.len(), distinct.len(), "no event stored twice");
    assert!(
        rows.len() >= accepted.len(),
        "every accepted event has its row ({} rows, {} accepted)",
        rows.len(),
        accepted.len()
    );

    let _ = ingest.kill().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_stored_exactly_once_across_a_postgres_restart() {
    let env = TestEnv::new().await;
    let postgres = corral_tests::PrivatePostgres::start();
    let mut config = env.ingest_config("127.0.0.1:0");
    config.database_url = corral_common::Secret::new(postgres.url());
    let bound = corral_event_ingest::Bound::bind(config)
        .await
        .expect("bind");
    let url = format!("http://127.0.0.1:{}", bound.port());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ingest = tokio::spawn(bound.run(shutdown.clone()));
    let http = corral_tests::http();
    eventually("ingest is ready", LIMIT, || async {
        http.get(format!("{url}/readyz"))
            .send()
            .await
            .ok()?
            .status()
            .is_success()
            .then_some(())
    })
    .await;

    let token = env.token("run-p");
    let mut accepted = Vec::new();
    for round in 0..30 {
        if round == 10 {
            postgres.stop();
        }
        if round == 20 {
            postgres.start_again();
        }
        let batch: Vec<Value> = (0..10).map(|j| tool_use(round * 10 + j)).collect();
        let (status, body) =
            post(&url, "run-p", Some(&token), Value::Array(batch).to_string()).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "posts are accepted while the database is down: {body}"
        );
        accepted.extend(body["event_ids"].as_array().cloned().unwrap_or_default());
    }
    let pool = sqlx::PgPool::connect(&postgres.url())
        .await
        .expect("private database");
    let rows: Vec<(String,)> = eventually(
        "every accepted event stored after the restart",
        LIMIT,
        || async {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT event_id FROM sandbox_events WHERE run_id = 'run-p'")
                    .fetch_all(&pool)
                    .await
                    .ok()?;
            (rows.len() >= accepted.len()).then_some(rows)
        },
    )
    .await;
    let stored: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(rows.len(), 300, "no event stored twice");
    assert!(
        accepted
            .iter()
            .all(|id| stored.contains(id.as_str().unwrap_or_default()))
    );
    pool.close().await;

    shutdown.cancel();
    ingest
        .await
        .expect("ingest task")
        .expect("ingest returns Ok");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_token_stops_working_when_the_run_ends() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let (ingest, url) = env.start_ingest().await;
    let client = env.client().await;
    let command = env.command(&["sleep", "300"]);
    client.start_run(&command).await.expect("submit");
    env.wait_state(
        &client,
        &command.run_id,
        corral_proto::v1::RunState::Running,
    )
    .await;
    let token = env.token(&command.run_id);
    let (status, body) = post(&url, &command.run_id, Some(&token), tool_use(1).to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let stop = corral_proto::v1::StopCommand {
        run_id: command.run_id.clone(),
        reason: "done".into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    client.stop(&stop).await.expect("stop");
    env.wait_terminal(&client, &command.run_id, LIMIT).await;
    // The liveness answer is cached for up to two seconds.
    let (status, body) = eventually("the token is refused", LIMIT, || async {
        let (status, body) =
            post(&url, &command.run_id, Some(&token), tool_use(2).to_string()).await;
        (status != StatusCode::ACCEPTED).then_some((status, body))
    })
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("has ended"),
        "{body}"
    );

    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// Publishes one `agent.tool_use` event for `run_id` on NATS (a trusted
/// service's way), acknowledged by the stream; returns its stream sequence.
async fn publish_event(
    env: &TestEnv,
    client: &corral_client::Client,
    run_id: &str,
    id: &str,
) -> u64 {
    let event = corral_proto::v1::AgentEvent {
        event_id: id.into(),
        run_id: run_id.into(),
        seq: 1,
        at_ms: corral_common::now_ms(),
        kind: "agent.tool_use".into(),
        payload: None,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{run_id}:{id}").as_str());
    client
        .jetstream()
        .publish_with_headers(
            env.subjects.events(run_id, "agent.tool_use"),
            headers,
            event.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

/// Reads every page from `after`; returns the cursors read and the last.
async fn read_pages(url: &str, run_id: &str, mut after: i64) -> (Vec<i64>, i64) {
    let http = corral_tests::http();
    let mut cursors = Vec::new();
    for _ in 0..corral_tests::MAX_PAGES {
        let page: Value = http
            .get(format!(
                "{url}/v1/runs/{run_id}/events?after={after}&limit=7"
            ))
            .send()
            .await
            .expect("ingest answers")
            .json()
            .await
            .expect("a page");
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            return (cursors, after);
        }
        for event in &events {
            cursors.push(event["cursor"].as_i64().expect("cursor"));
        }
        after = page["next_after"].as_i64().expect("next_after");
    }
    panic!(
        "the pages of {run_id} never end ({} pages read)",
        corral_tests::MAX_PAGES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_have_no_gap_while_three_ingests_commit_out_of_order() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (first, url) = env.start_ingest().await;
    let (second, _) = env.start_ingest().await;
    let (third, _) = env.start_ingest().await;
    let client = env.client().await;
    let run_id = "run-w";

    let early = publish_event(&env, &client, run_id, "e-early").await;
    eventually("the first event is stored", LIMIT, || async {
        (!stored(&env, run_id).await.is_empty()).then_some(())
    })
    .await;

    // One event's commit is held back: the test holds its key, so the
    // instance that stores it waits, while the others store later events.
    let pool = env.pool().await;
    let mut holding = pool.begin().await.expect("a transaction");
    sqlx::query(
        "INSERT INTO sandbox_events (event_id, run_id, stream_seq, seq, kind, at, payload)
         VALUES ('e-held', $1, 0, 0, 'agent.tool_use', now(), '{}')",
    )
    .bind(run_id)
    .execute(&mut *holding)
    .await
    .expect("hold the key");
    let held = publish_event(&env, &client, run_id, "e-held").await;
    let mut later = Vec::new();
    for i in 0..30 {
        later.push(publish_event(&env, &client, run_id, &format!("e-{i}")).await);
    }
    eventually(
        "later events are stored by the other instances",
        LIMIT,
        || async {
            let rows = stored(&env, run_id).await;
            (rows.iter().filter(|(_, seq)| *seq as u64 > held).count() >= 5).then_some(())
        },
    )
    .await;

    // A reader now gets nothing past the held event: its cursor cannot skip it.
    let (cursors, reached) = read_pages(&url, run_id, 0).await;
    assert_eq!(
        cursors,
        vec![early as i64],
        "pages stop below the unsettled event"
    );
    assert!((reached as u64) < held);

    holding.rollback().await.expect("let the held commit go");
    let mut all = cursors;
    let (rest, _) = eventually("the reader gets every later event", LIMIT, || async {
        let (rest, last) = read_pages(&url, run_id, reached).await;
        (rest.len() == 1 + later.len()).then_some((rest, last))
    })
    .await;
    all.extend(rest);
    let mut expected = vec![early as i64, held as i64];
    expected.extend(later.iter().map(|s| *s as i64));
    assert_eq!(
        all, expected,
        "every event once, in cursor order, none skipped"
    );
    pool.close().await;

    first.stop().await;
    second.stop().await;
    third.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_run_id_in_a_path_is_refused_not_read() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let http = corral_tests::http();
    for (run_id, encoded) in [("*", "%2A"), (">", "%3E"), ("a.b", "a.b")] {
        for path in ["events", "events/stream"] {
            let response = http
                .get(format!("{url}/v1/runs/{encoded}/{path}"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .expect("ingest answers");
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{run_id} {path}"
            );
            let body: Value = response.json().await.expect("json");
            assert!(
                body["error"].as_str().unwrap_or_default().contains(run_id),
                "names the run id: {body}"
            );
        }
    }
    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// The `kind` filter of a page, a tail resumed by `Last-Event-ID`, and what
/// ingest answers while its NATS server is down (killed, not simulated):
/// 503 on a post and on `/readyz`, then 202 again once it is back, with
/// every accepted event stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_filter_last_event_id_and_503_while_nats_is_down() {
    let mut nats = corral_tests::PrivateNats::start();
    let env = TestEnv::with_nats(&nats.url()).await;
    let tracker = env.start_tracker().await;
    let (ingest, url) = env.start_ingest().await;
    let token = env.token("run-k");
    let error = |i: usize| json!({ "kind": "agent.error", "seq": i, "event_id": format!("e-{i}"), "data": { "message": "oops" } });
    for i in 1..=5 {
        let event = if i % 2 == 0 { error(i) } else { tool_use(i) };
        let (status, body) = post(&url, "run-k", Some(&token), event.to_string()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let rows = eventually("five stored", LIMIT, || async {
        let rows = stored(&env, "run-k").await;
        (rows.len() == 5).then_some(rows)
    })
    .await;
    let http = corral_tests::http();

    let page: Value = http
        .get(format!("{url}/v1/runs/run-k/events?kind=agent.tool_use"))
        .send()
        .await
        .expect("a page")
        .json()
        .await
        .expect("page json");
    let ids: Vec<&str> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids, ["e-1", "e-3", "e-5"]);

    // A reconnecting EventSource names the last id it saw.
    let response = http
        .get(format!("{url}/v1/runs/run-k/events/stream"))
        .header("Last-Event-ID", rows[2].1.to_string())
        .send()
        .await
        .expect("tail");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let tail = sse_event_ids(&mut body, 2, "the tail resumed after the third event").await;
    assert_eq!(tail, ["e-4", "e-5"]);
    drop(body);

    nats.stop();
    eventually("readyz says 503 while NATS is down", LIMIT, || async {
        let response = http.get(format!("{url}/readyz")).send().await.ok()?;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let (status, body) = post(&url, "run-k", Some(&token), tool_use(6).to_string()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    nats.start_again();
    eventually("a post is accepted once NATS is back", LIMIT, || async {
        let (status, _) = post(&url, "run-k", Some(&token), tool_use(7).to_string()).await;
        (status == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    // A 503 asks the agent to send again; what NATS held for the refused
    // post may still arrive, and is stored once at most (its id).
    let rows = eventually("the accepted event stored", LIMIT, || async {
        let rows = stored(&env, "run-k").await;
        rows.iter().any(|(id, _)| id == "e-7").then_some(rows)
    })
    .await;
    assert!(
        rows.iter().filter(|(id, _)| id == "e-6").count() <= 1,
        "{rows:?}"
    );

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
