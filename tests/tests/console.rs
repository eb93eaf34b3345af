//! The web console in a real browser (headless Chromium over WebDriver):
//! a new run appears in the list while it runs, its page shows output
//! lines as they are printed, its stop button stops it and its processes
//! are gone, ticked runs stop together, and a run with 10,000 events opens
//! in under two seconds. Screenshots go under `target/console-screenshots/`.
//! Without Chromium these tests print why and pass (see `browser`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use corral_event_ingest::auth::{ApiKey, hash_key};
use corral_proto::v1::{
    AgentEvent, FileEdited, Message as Said, Output, RunState, ToolCompleted, ToolUse,
    agent_event::Payload, output,
};
use corral_provider::LocalProvider;
use corral_tests::browser::Browser;
use corral_tests::{TestEnv, eventually};
use fantoccini::Locator;
use prost::Message;

const LIMIT: Duration = Duration::from_secs(60);

/// A key that may read, tail and press the buttons.
const OPERATOR_KEY: &str = "ck_operator_0123456789abcdefghijklmnopqrst";
/// A key that may only read.
const VIEWER_KEY: &str = "ck_viewer_0123456789abcdefghijklmnopqrstuv";

fn ingest_config(env: &TestEnv) -> corral_event_ingest::Config {
    let mut config = env.ingest_config("127.0.0.1:0");
    config.api_keys = BTreeMap::from([
        (
            "operator".to_owned(),
            ApiKey {
                sha256: hash_key(OPERATOR_KEY),
                scopes: vec![
                    "events:read".into(),
                    "events:stream".into(),
                    "runs:control".into(),
                ],
            },
        ),
        (
            "viewer".to_owned(),
            ApiKey {
                sha256: hash_key(VIEWER_KEY),
                scopes: vec!["events:read".into(), "events:stream".into()],
            },
        ),
    ]);
    config
}

/// Signs the browser in with `key` through the console's own form.
async fn sign_in(browser: &Browser, url: &str, key: &str) {
    browser
        .client
        .goto(&format!("{url}/console"))
        .await
        .expect("console");
    let field = browser.element("input#key", LIMIT).await;
    field.send_keys(key).await.expect("type the key");
    field.send_keys("\n").await.expect("submit");
    browser.element("h1", LIMIT).await;
    eventually("the runs list after signing in", LIMIT, || async {
        let url = browser.client.current_url().await.ok()?;
        url.path().eq("/console").then_some(())
    })
    .await;
}

/// Clicks `css`, again if a live refresh replaced it under the click.
async fn click(browser: &Browser, css: &str) {
    eventually(&format!("a click on {css}"), LIMIT, || async {
        let element = browser.client.find(Locator::Css(css)).await.ok()?;
        element.click().await.ok()
    })
    .await;
}

fn line_numbers(texts: &[String]) -> Vec<u32> {
    texts
        .iter()
        .filter_map(|t| t.trim().strip_prefix("line-")?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_shows_up_live_prints_live_and_stops_from_its_page() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let (ingest, url) = env.start_ingest_with(ingest_config(&env)).await;
    let client = env.client().await;
    sign_in(&browser, &url, OPERATOR_KEY).await;

    // Submitted after the list is open: it must appear without a reload.
    let command = env.command(&[
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo line-$i; sleep 0.3; done",
    ]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("submit");
    let row = format!("tr[data-run='{run_id}']");
    browser.element(&row, LIMIT).await;
    let run = env.wait_state(&client, &run_id, RunState::Running).await;
    eventually("the row shows the run running", LIMIT, || async {
        let texts = browser.texts(&format!("{row} .state")).await;
        texts.iter().any(|t| t == "running").then_some(())
    })
    .await;
    browser.screenshot("runs-list").await;

    click(&browser, &format!("{row} a")).await;
    browser.element("#events[data-tailing='true']", LIMIT).await;
    // Lines arrive on the open page as the agent prints them.
    let first = eventually("output lines on the run page", LIMIT, || async {
        let seen = line_numbers(&browser.texts("#events pre.out").await);
        seen.iter().max().copied()
    })
    .await;
    eventually(
        "later lines, printed after the page opened",
        LIMIT,
        || async {
            let seen = line_numbers(&browser.texts("#events pre.out").await);
            seen.iter().any(|n| *n >= first + 5).then_some(())
        },
    )
    .await;
    let seen = line_numbers(&browser.texts("#events pre.out").await);
    let highest = seen.iter().max().copied().unwrap_or(0);
    let distinct: std::collections::BTreeSet<u32> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "no line shown twice: {seen:?}");
    assert!(
        (1..=highest).all(|n| distinct.contains(&n)),
        "every line up to {highest} shown, in order, none missing: {seen:?}"
    );
    browser.screenshot("run-page-live-output").await;

    click(&browser, "button#stop").await;
    let ended = env.wait_terminal(&client, &run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped, "{ended:?}");
    assert_eq!(
        ended.stop_requested_by, "console:operator",
        "the stop names who pressed it"
    );
    assert!(
        LocalProvider::live_processes(&run.sandbox_id).is_empty(),
        "the agent's processes are gone after the stop button"
    );
    eventually("the page shows the run stopped", LIMIT, || async {
        let state = browser.texts("#run-state").await;
        state.iter().any(|t| t == "stopped").then_some(())
    })
    .await;
    let timeline = browser.texts(".timeline li").await.join("\n");
    assert!(
        timeline.contains("running → stopped") && timeline.contains("stopped from the console"),
        "the timeline shows the stop and why: {timeline}"
    );
    browser.screenshot("run-page-stopped").await;

    // Bulk stop: tick two live runs in the list, one button.
    let mut bulk = Vec::new();
    for _ in 0..2 {
        let command = env.command(&["sleep", "300"]);
        client.start_run(&command).await.expect("submit");
        bulk.push(command.run_id);
    }
    for id in &bulk {
        env.wait_state(&client, id, RunState::Running).await;
    }
    browser
        .client
        .goto(&format!("{url}/console?state=running"))
        .await
        .expect("runs list");
    for id in &bulk {
        click(&browser, &format!("input[type=checkbox][value='{id}']")).await;
    }
    click(&browser, "button#stop-selected").await;
    for id in &bulk {
        let ended = env.wait_terminal(&client, id, LIMIT).await;
        assert_eq!(ended.state(), RunState::Stopped, "{ended:?}");
    }
    let notice = browser.texts(".notice").await.join(" ");
    assert!(notice.contains("stop requested for 2 of 2"), "{notice}");

    browser.close().await;
    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_control_sees_no_buttons_and_its_posts_are_refused() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let (ingest, url) = env.start_ingest_with(ingest_config(&env)).await;
    let client = env.client().await;
    let command = env.command(&["sleep", "300"]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("submit");
    env.wait_state(&client, &run_id, RunState::Running).await;

    sign_in(&browser, &url, VIEWER_KEY).await;
    browser
        .client
        .goto(&format!("{url}/console/runs/{run_id}"))
        .await
        .expect("run page");
    browser.element("#events[data-loaded='true']", LIMIT).await;
    assert!(
        browser.texts("button#stop").await.is_empty(),
        "a viewer gets no stop button"
    );
    // The same post a button would send, with the viewer's key: refused.
    let refused = reqwest::Client::new()
        .post(format!("{url}/console/runs/{run_id}/stop"))
        .header("cookie", format!("corral_key={VIEWER_KEY}"))
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);
    let body = refused.text().await.expect("body");
    assert!(body.contains("runs:control"), "says which scope: {body}");
    // And a post from another site, even with the operator's key.
    let forged = reqwest::Client::new()
        .post(format!("{url}/console/runs/{run_id}/stop"))
        .header("cookie", format!("corral_key={OPERATOR_KEY}"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), reqwest::StatusCode::FORBIDDEN);
    let run = client.get(&run_id).await.expect("get");
    assert_eq!(run.state(), RunState::Running, "nothing stopped it");

    browser.close().await;
    corral_tests::sessions::stop_run(&client, &run_id, "test over").await;
    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// The events a busy agent leaves: output, messages, tool calls with
/// results, and file edits with diffs.
fn busy_agent_event(run_id: &str, i: u64) -> AgentEvent {
    let (kind, payload) = match i % 5 {
        0 => (
            "agent.output",
            Payload::Output(Output {
                stream: output::Stream::Stdout as i32,
                line: format!("compiling crate {i}"),
            }),
        ),
        1 => (
            "agent.assistant_message",
            Payload::Message(Said {
                role: "assistant".into(),
                text: format!("Step {i}: I will read the file and fix the failing test."),
                ..Default::default()
            }),
        ),
        2 => (
            "agent.tool_use",
            Payload::ToolUse(ToolUse {
                tool_use_id: format!("t{i}"),
                tool: "Read".into(),
                input_json: format!(r#"{{"path":"src/lib{i}.rs"}}"#),
            }),
        ),
        3 => (
            "agent.tool_completed",
            Payload::ToolCompleted(ToolCompleted {
                tool_use_id: format!("t{}", i - 1),
                result: format!("fn f{i}() {{}}\n"),
                duration_ms: 12,
                is_error: false,
            }),
        ),
        _ => (
            "agent.file_edited",
            Payload::FileEdited(FileEdited {
                path: format!("src/lib{i}.rs"),
                unified_diff: format!(
                    "--- a/src/lib{i}.rs\n+++ b/src/lib{i}.rs\n@@ -1,2 +1,2 @@\n fn f() {{\n-    old()\n+    new({i})\n }}\n"
                ),
                turn: 1,
            }),
        ),
    };
    AgentEvent {
        event_id: format!("e{i}"),
        run_id: run_id.into(),
        seq: i + 1,
        at_ms: corral_common::now_ms(),
        kind: kind.into(),
        payload: Some(payload),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_ten_thousand_events_opens_in_under_two_seconds() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    const EVENTS: u64 = 10_000;
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let (ingest, url) = env.start_ingest_with(ingest_config(&env)).await;
    let client = env.client().await;
    let command = env.command(&["true"]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("submit");
    env.wait_terminal(&client, &run_id, LIMIT).await;

    // Published as a trusted service does, acknowledged by the stream.
    let js = client.jetstream();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(500) {
        let mut acks = Vec::new();
        for i in chunk {
            let event = busy_agent_event(&run_id, *i);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{run_id}:{}", event.event_id).as_str(),
            );
            acks.push(
                js.publish_with_headers(
                    env.subjects.events(&run_id, &event.kind),
                    headers,
                    event.encode_to_vec().into(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("the stream acknowledged");
        }
    }
    let pool = env.pool().await;
    eventually("10,000 events stored", LIMIT, || async {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sandbox_events WHERE run_id = $1")
                .bind(&run_id)
                .fetch_one(&pool)
                .await
                .ok()?;
        (stored == EVENTS as i64).then_some(())
    })
    .await;

    sign_in(&browser, &url, OPERATOR_KEY).await;
    let started = Instant::now();
    browser
        .client
        .goto(&format!("{url}/console/runs/{run_id}"))
        .await
        .expect("run page");
    browser
        .element("#events[data-loaded='true']", Duration::from_secs(10))
        .await;
    let opened = started.elapsed();
    eprintln!("a run with {EVENTS} events opened in {opened:?}");
    assert!(
        opened < Duration::from_secs(2),
        "a run with {EVENTS} events must open in under 2 s; took {opened:?}"
    );
    let shown = browser.texts("#events article.ev").await.len();
    assert!(
        (300..=500).contains(&shown),
        "a page of events, not all {EVENTS} at once: {shown}"
    );
    let added = browser.texts("#events pre.diff span.add").await;
    assert!(
        added.iter().any(|line| line.starts_with("+    new(")),
        "file edits render as diffs: {added:?}"
    );
    let results = browser
        .texts("#events article.agent-tool_use details")
        .await;
    assert!(
        results.iter().any(|r| r.contains("result")),
        "tool results fold under their calls"
    );
    browser.screenshot("run-page-10000-events").await;

    click(&browser, "#event-pages a[rel='next']").await;
    browser
        .element("#events[data-loaded='true'] article.ev", LIMIT)
        .await;
    let url_now = browser.client.current_url().await.expect("url");
    assert!(
        url_now.query().is_some_and(|q| q.contains("after=")),
        "the page's position is in the URL: {url_now}"
    );

    browser.close().await;
    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
