//! Agent output at least once, stored once: every line an agent prints
//! while NATS restarts reaches the events stream and the event store,
//! exactly once each (stable ids, sent again until acknowledged).

use std::collections::BTreeMap;
use std::time::Duration;

use corral_proto::v1::{AgentEvent, RunState, agent_event};
use corral_tests::{PrivateNats, TestEnv, eventually};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(90);
const LINES: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_printed_across_a_nats_restart_is_stored_exactly_once() {
    let mut nats = PrivateNats::start();
    let env = TestEnv::with_nats(&nats.url()).await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let (ingest, _url) = env.start_ingest().await;
    let client = env.client().await;

    let (command, subject) = start_printing(&env, &client, "0.05").await;

    // NATS goes away for 10 s while the agent keeps printing: longer than
    // a publish acknowledgement is awaited, so the spawner sends lines again
    // (with their ids) that the client may also deliver from its buffer.
    nats.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    nats.start_again();
    eventually("the tracker answers again", LIMIT, || async {
        client.get(&command.run_id).await.ok()
    })
    .await;

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);

    // In the stream: every line, once.
    let messages = env
        .stream_messages(&env.subjects.events_stream(), &subject)
        .await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for message in &messages {
        let event = AgentEvent::decode(message.payload.clone()).expect("an event");
        if let Some(agent_event::Payload::Output(output)) = event.payload {
            *seen.entry(output.line).or_default() += 1;
        }
    }
    let missing: Vec<usize> = (0..LINES)
        .filter(|i| !seen.contains_key(&format!("line-{i}")))
        .collect();
    assert!(missing.is_empty(), "lines lost: {missing:?}");
    let repeated: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "lines in the stream twice: {repeated:?}"
    );
    assert_eq!(messages.len(), LINES);

    // In the store: every line, once.
    let pool = env.pool().await;
    let stored = eventually("ingest stored every line", LIMIT, || async {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT payload->>'line', count(*) FROM sandbox_events
             WHERE run_id = $1 AND kind = 'agent.output' GROUP BY 1",
        )
        .bind(&command.run_id)
        .fetch_all(&pool)
        .await
        .ok()?;
        (rows.len() >= LINES).then_some(rows)
    })
    .await;
    pool.close().await;
    assert_eq!(stored.len(), LINES);
    assert!(
        stored.iter().all(|(_, n)| *n == 1),
        "a line stored twice: {:?}",
        stored.iter().filter(|(_, n)| *n > 1).collect::<Vec<_>>()
    );

    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// Starts an agent printing `line-0`..`line-{LINES}` with `pause` seconds
/// between lines, and waits until its first lines are in the stream.
async fn start_printing(
    env: &TestEnv,
    client: &corral_client::Client,
    pause: &str,
) -> (corral_proto::v1::RunCommand, String) {
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do echo line-$i; i=$((i+1)); sleep {pause}; done");
    let command = env.command(&["sh", "-c", &script]);
    client.start_run(&command).await.expect("submit");
    let subject = env.subjects.events(&command.run_id, "agent.output");
    eventually(
        "the agent's first lines are in the stream",
        LIMIT,
        || async {
            let messages = env
                .stream_messages(&env.subjects.events_stream(), &subject)
                .await;
            (messages.len() >= 30).then_some(())
        },
    )
    .await;
    (command, subject)
}

/// Makes the events stream refuse every new message (none fits its
/// maximum message size), as a stream without a leader or out of space
/// does; returns the stream, its configuration before and how many
/// messages it held. Lowering the message limit instead would evict the
/// oldest messages when a line lands between reading the count and the
/// update, which loses a line the spawner was told was stored.
async fn refuse_new_messages(
    env: &TestEnv,
    js: &async_nats::jetstream::Context,
) -> (
    async_nats::jetstream::stream::Stream,
    async_nats::jetstream::stream::Config,
    u64,
) {
    let mut stream = js
        .get_stream(env.subjects.events_stream())
        .await
        .expect("events stream");
    let original = stream.info().await.expect("info").config.clone();
    let mut refusing = original.clone();
    refusing.max_message_size = 1;
    js.update_stream(&refusing)
        .await
        .expect("make the stream refuse");
    let held = stream.info().await.expect("info").state.messages;
    (stream, original, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_the_stream_refuses_for_a_while_is_sent_again_until_it_lands() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;
    let js = client.jetstream().clone();

    let (command, subject) = start_printing(&env, &client, "0.02").await;

    // The stream refuses every new message for 3 s (full, discard new), as
    // a stream without a leader or out of space does.
    let (mut stream, original, held) = refuse_new_messages(&env, &js).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused_meanwhile = stream.info().await.expect("info").state.messages;
    js.update_stream(&original)
        .await
        .expect("let the stream take messages again");
    assert_eq!(
        refused_meanwhile, held,
        "the stream took nothing while full"
    );

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let lines = eventually("every line reaches the stream", LIMIT, || async {
        let messages = env
            .stream_messages(&env.subjects.events_stream(), &subject)
            .await;
        (messages.len() >= LINES).then_some(messages)
    })
    .await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for message in &lines {
        let event = AgentEvent::decode(message.payload.clone()).expect("an event");
        if let Some(agent_event::Payload::Output(output)) = event.payload {
            *seen.entry(output.line).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), LINES, "every line, by its text");
    assert!(seen.values().all(|n| *n == 1), "no line twice");

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_past_the_spawners_buffer_are_dropped_counted_and_announced() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;
    let js = client.jetstream().clone();

    // The stream refuses everything while the agent prints 50,000 lines at
    // once: more than the spawner's buffer (8192 lines) holds.
    let (_, original, _) = refuse_new_messages(&env, &js).await;

    // Far more than the buffer, the provider's channel and the pipe hold.
    let total = 50_000;
    let command = env.command(&["sh", "-c", &format!("seq 1 {total}; touch /shared/printed")]);
    client.start_run(&command).await.expect("submit");
    let printed = env.shared.join("printed");
    eventually("the agent printed everything", LIMIT, || async {
        printed.exists().then_some(())
    })
    .await;
    js.update_stream(&original)
        .await
        .expect("let the stream take messages again");

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let messages = env
        .stream_messages(
            &env.subjects.events_stream(),
            &env.subjects.events_of_run(&command.run_id),
        )
        .await;
    let mut lines = 0usize;
    let mut announced = Vec::new();
    for message in &messages {
        match AgentEvent::decode(message.payload.clone())
            .expect("an event")
            .payload
        {
            Some(agent_event::Payload::Output(_)) => lines += 1,
            Some(agent_event::Payload::Error(error)) => announced.push(error.message),
            _ => {}
        }
    }
    let dropped: usize = announced
        .iter()
        .filter_map(|m| m.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert!(
        !announced.is_empty() && announced.iter().all(|m| m.contains("output lines dropped")),
        "the run's events say lines were dropped: {announced:?}"
    );
    assert!(lines >= 8192, "the buffer's lines arrived: {lines}");
    assert_eq!(
        lines + dropped,
        total,
        "every line either arrived or is counted as dropped"
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
