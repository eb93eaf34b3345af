//! Lifecycle webhooks against local HTTP receivers: every transition
//! reaches an endpoint that fails, answers late and goes away for a while,
//! once by its idempotency key; a slow endpoint holds back no other; an
//! endpoint that keeps failing gets its transitions dead-lettered; state and
//! label filters keep out what they should.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use corral_client::Client;
use corral_common::Secret;
use corral_event_ingest::config::Webhook;
use corral_event_ingest::webhooks::{self, Delivery};
use corral_proto::v1::{LifecycleEvent, RunCommand, RunState};
use corral_tests::{TestEnv, eventually};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "webhook-test-secret-0123456789abcdef";

/// How a receiver answers one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// 200 at once.
    Ok,
    /// 500 at once.
    Fail,
    /// 200 after [`Receiver::slow`]: later than the sender waits.
    Slow,
}

/// One request as a receiver saw it.
#[derive(Clone, Debug)]
struct Request {
    endpoint: String,
    id: String,
    timestamp: String,
    signature: String,
    attempt: String,
    body: Bytes,
    answer: Answer,
}

impl Request {
    fn delivery(&self) -> Delivery {
        serde_json::from_slice(&self.body).expect("a webhook body is a Delivery")
    }
}

/// Which answer the `n`th request (0 first) to an endpoint gets.
type Script = dyn Fn(&str, usize) -> Answer + Send + Sync;

struct Shared {
    log: Mutex<Vec<Request>>,
    script: Box<Script>,
    slow: Duration,
}

/// A local HTTP receiver of webhooks at `http://127.0.0.1:<port>/<endpoint>`
/// that answers as its script says and may go away and come back on the
/// same port. Every answer closes its connection, so that down is down.
struct Receiver {
    port: u16,
    shared: Arc<Shared>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    async fn start(
        slow: Duration,
        script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let mut receiver = Receiver {
            port: listener.local_addr().expect("bound").port(),
            shared: Arc::new(Shared {
                log: Mutex::new(Vec::new()),
                script: Box::new(script),
                slow,
            }),
            server: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let router = axum::Router::new()
            .route("/{endpoint}", axum::routing::post(hook))
            .with_state(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }));
    }

    fn url(&self, endpoint: &str) -> String {
        format!("http://127.0.0.1:{}/{endpoint}", self.port)
    }

    /// Stops listening: connections are refused until [`Receiver::up`].
    async fn down(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listens again on the same port.
    async fn up(&mut self) {
        let address = format!("127.0.0.1:{}", self.port);
        let listener = eventually("the receiver's port is free again", LIMIT, || async {
            tokio::net::TcpListener::bind(&address).await.ok()
        })
        .await;
        self.serve(listener);
    }

    fn requests(&self, endpoint: &str) -> Vec<Request> {
        let log = self.shared.log.lock().expect("log lock");
        log.iter()
            .filter(|r| r.endpoint == endpoint)
            .cloned()
            .collect()
    }

    /// The ids answered 200 in time, as a set.
    fn taken(&self, endpoint: &str) -> BTreeSet<String> {
        self.requests(endpoint)
            .into_iter()
            .filter(|r| r.answer == Answer::Ok)
            .map(|r| r.id)
            .collect()
    }
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let answer = {
        let mut log = shared.log.lock().expect("log lock");
        let n = log.iter().filter(|r| r.endpoint == endpoint).count();
        let answer = (shared.script)(&endpoint, n);
        log.push(Request {
            endpoint,
            id: header(webhooks::ID_HEADER),
            timestamp: header(webhooks::TIMESTAMP_HEADER),
            signature: header(webhooks::SIGNATURE_HEADER),
            attempt: header(webhooks::ATTEMPT_HEADER),
            body,
            answer,
        });
        answer
    };
    let status = match answer {
        Answer::Ok => StatusCode::OK,
        Answer::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Slow => {
            tokio::time::sleep(shared.slow).await;
            StatusCode::OK
        }
    };
    ([(header::CONNECTION, "close")], status).into_response()
}

/// An endpoint at `url` with test-sized timings: 2 s to answer, retries
/// after 50 ms doubling up to 500 ms.
fn endpoint(url: String) -> Webhook {
    Webhook {
        url,
        secret: Secret::new(SECRET),
        max_attempts: 1000,
        backoff_ms: 50,
        max_backoff_ms: 500,
        timeout_ms: 2000,
        ..Default::default()
    }
}

fn labelled(mut command: RunCommand, team: &str) -> RunCommand {
    if let Some(spec) = command.spec.as_mut() {
        spec.labels.insert("team".into(), team.into());
    }
    command
}

/// One row of `run_transitions`, as a webhook body should tell it.
#[derive(Debug, Clone, PartialEq)]
struct Transition {
    from: Option<String>,
    to: String,
    event: String,
    reason: String,
    actor: String,
    exit_code: Option<i32>,
    sandbox_id: String,
}

/// The transitions of `run_ids` by `<run_id>:<version>`.
async fn transitions(env: &TestEnv, run_ids: &[String]) -> BTreeMap<String, Transition> {
    let pool = env.pool().await;
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        String,
        i64,
        Option<String>,
        String,
        String,
        String,
        String,
        Option<i32>,
        Option<String>,
    )> = sqlx::query_as(
        "SELECT run_id, version, from_state, to_state, event, reason, actor, exit_code, sandbox_id
             FROM run_transitions WHERE run_id = ANY($1) ORDER BY id",
    )
    .bind(run_ids)
    .fetch_all(&pool)
    .await
    .expect("run_transitions");
    pool.close().await;
    rows.into_iter()
        .map(
            |(run_id, version, from, to, event, reason, actor, exit_code, sandbox_id)| {
                (
                    format!("{run_id}:{version}"),
                    Transition {
                        from,
                        to,
                        event,
                        reason,
                        actor,
                        exit_code,
                        sandbox_id: sandbox_id.unwrap_or_default(),
                    },
                )
            },
        )
        .collect()
}

/// Starts each run and waits for its end; returns their ids.
async fn run_all(env: &TestEnv, client: &Client, commands: &[RunCommand]) -> Vec<String> {
    for command in commands {
        client.start_run(command).await.expect("start run");
    }
    for command in commands {
        env.wait_terminal(client, &command.run_id, LIMIT).await;
    }
    commands.iter().map(|c| c.run_id.clone()).collect()
}

/// The endpoint's consumer: what it holds unacknowledged, what it has
/// still to deliver, how many were redelivered, and its ack floor.
async fn consumer_info(env: &TestEnv, client: &Client, endpoint: &str) -> consumer::Info {
    let stream = client
        .jetstream()
        .get_stream(env.subjects.lifecycle_stream())
        .await
        .expect("lifecycle stream");
    let mut consumer: consumer::PullConsumer = stream
        .get_consumer(&webhooks::consumer_name(endpoint))
        .await
        .expect("the endpoint's consumer exists");
    consumer.info().await.expect("consumer info").clone()
}

/// Whether the endpoint's consumer has settled every transition in the
/// lifecycle stream (delivered, filtered out or dead-lettered).
async fn settled(env: &TestEnv, client: &Client, endpoint: &str) -> bool {
    let mut stream = client
        .jetstream()
        .get_stream(env.subjects.lifecycle_stream())
        .await
        .expect("lifecycle stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let info = consumer_info(env, client, endpoint).await;
    info.num_pending == 0 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= last
}

/// Each request is signed with the endpoint's secret, names its body's id,
/// and the body says what the run's history says, with the run's labels.
fn check_requests(requests: &[Request], expected: &BTreeMap<String, Transition>, team: &str) {
    for request in requests {
        assert!(
            webhooks::verify(
                SECRET,
                &request.timestamp,
                &request.body,
                &request.signature
            ),
            "the signature of {} verifies: {request:?}",
            request.id
        );
        let sent: i64 = request.timestamp.parse().expect("a Unix time");
        let now = corral_common::now_ms() / 1000;
        assert!((now - 600..=now).contains(&sent), "{sent} is recent");
        assert!(request.attempt.parse::<u32>().expect("attempt") >= 1);
        let body = request.delivery();
        assert_eq!(body.id, request.id);
        assert_eq!(body.id, format!("{}:{}", body.run_id, body.version));
        let row = expected
            .get(&body.id)
            .unwrap_or_else(|| panic!("{} is a transition of the test's runs", body.id));
        let told = Transition {
            from: body.from.clone(),
            to: body.to.clone(),
            event: body.event.clone(),
            reason: body.reason.clone(),
            actor: body.actor.clone(),
            exit_code: body.exit_code,
            sandbox_id: body.sandbox_id.clone(),
        };
        assert_eq!(&told, row, "the body of {} tells its transition", body.id);
        assert!(body.at_ms > 0);
        assert_eq!(body.labels.get("team").map(String::as_str), Some(team));
        assert_eq!(body.provider.as_deref(), Some("local"));
        assert!(body.cost_usd.is_some_and(|c| c >= 0.0), "{body:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_reaches_an_endpoint_that_fails_answers_late_and_goes_away_once_by_its_id()
{
    let env = TestEnv::new().await;
    // 500 to the first three requests, too late to the next two, then 200.
    let mut receiver = Receiver::start(Duration::from_secs(4), |_, n| match n {
        0..=2 => Answer::Fail,
        3..=4 => Answer::Slow,
        _ => Answer::Ok,
    })
    .await;
    let tracker = env.start_tracker().await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config
        .webhooks
        .insert("hook".into(), endpoint(receiver.url("hook")));
    let (ingest, _) = env.start_ingest_with(config).await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // While the receiver fails and answers late.
    let first: Vec<RunCommand> = [
        env.command(&["true"]),
        env.command(&["sh", "-c", "exit 3"]),
        env.command(&["true"]),
    ]
    .into_iter()
    .map(|c| labelled(c, "infra"))
    .collect();
    let mut run_ids = run_all(&env, &client, &first).await;
    let expected = transitions(&env, &run_ids).await;
    eventually(
        "the receiver takes every transition of the first runs",
        LIMIT,
        || async {
            (expected.keys().cloned().collect::<BTreeSet<_>>() == receiver.taken("hook"))
                .then_some(())
        },
    )
    .await;
    eventually(
        "the endpoint's consumer settles the first runs",
        LIMIT,
        || async { settled(&env, &client, "hook").await.then_some(()) },
    )
    .await;

    // While the receiver is away: refused connections, retried.
    receiver.down().await;
    let second: Vec<RunCommand> = [env.command(&["true"]), env.command(&["sh", "-c", "exit 3"])]
        .into_iter()
        .map(|c| labelled(c, "infra"))
        .collect();
    run_ids.extend(run_all(&env, &client, &second).await);
    eventually(
        "ingest tries the absent receiver and retries",
        LIMIT,
        || async {
            let info = consumer_info(&env, &client, "hook").await;
            (info.num_redelivered > 0).then_some(())
        },
    )
    .await;
    let seen_while_down = receiver.requests("hook").len();

    receiver.up().await;
    let expected = transitions(&env, &run_ids).await;
    let ids: BTreeSet<String> = expected.keys().cloned().collect();
    eventually(
        "the receiver, back, takes every transition of every run",
        LIMIT,
        || async { (ids == receiver.taken("hook")).then_some(()) },
    )
    .await;
    eventually("the endpoint's consumer settles", LIMIT, || async {
        settled(&env, &client, "hook").await.then_some(())
    })
    .await;

    let requests = receiver.requests("hook");
    assert!(
        requests.len() > seen_while_down,
        "requests came after the restart"
    );
    check_requests(&requests, &expected, "infra");
    // A receiver that keeps the ids it processed (200, even too late)
    // processes each transition exactly once.
    let mut processed = BTreeSet::new();
    let mut repeats = 0;
    for request in requests.iter().filter(|r| r.answer != Answer::Fail) {
        if !processed.insert(request.id.clone()) {
            repeats += 1;
        }
    }
    assert_eq!(processed, ids, "no transition missing, none extra");
    assert!(
        repeats >= 1,
        "the late answers were sent again and dropped by their id"
    );
    // A failed request was retried with a higher attempt number.
    let failed = &requests[0];
    assert_eq!(
        (failed.answer, failed.attempt.as_str()),
        (Answer::Fail, "1")
    );
    assert!(
        requests
            .iter()
            .any(|r| r.id == failed.id && r.answer == Answer::Ok && r.attempt != "1"),
        "{} was delivered on a later attempt",
        failed.id
    );
    let every = requests.iter().map(|r| r.id.as_str()).collect::<Vec<_>>();
    eprintln!(
        "{} transitions, {} requests ({repeats} repeats processed once): {every:?}",
        ids.len(),
        requests.len()
    );

    spawner.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    receiver.down().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_holds_back_no_other() {
    let env = TestEnv::new().await;
    // `slow` never answers within its (long) timeout; `fast` answers at once.
    let mut receiver = Receiver::start(Duration::from_secs(120), |endpoint, _| {
        if endpoint == "slow" {
            Answer::Slow
        } else {
            Answer::Ok
        }
    })
    .await;
    let tracker = env.start_tracker().await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config.webhooks.insert(
        "slow".into(),
        Webhook {
            timeout_ms: 60_000,
            max_in_flight: 2,
            ..endpoint(receiver.url("slow"))
        },
    );
    config
        .webhooks
        .insert("fast".into(), endpoint(receiver.url("fast")));
    let (ingest, _) = env.start_ingest_with(config).await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let commands: Vec<RunCommand> = (0..3)
        .map(|_| labelled(env.command(&["true"]), "web"))
        .collect();
    let run_ids = run_all(&env, &client, &commands).await;
    let expected = transitions(&env, &run_ids).await;
    let ids: BTreeSet<String> = expected.keys().cloned().collect();
    eventually(
        "the fast endpoint takes every transition while the slow one hangs",
        Duration::from_secs(20),
        || async { (ids == receiver.taken("fast")).then_some(()) },
    )
    .await;
    let slow = receiver.requests("slow");
    assert!(!slow.is_empty(), "the slow endpoint was asked");
    assert!(
        slow.len() <= 2,
        "at most its max_in_flight at once: {slow:?}"
    );
    let info = consumer_info(&env, &client, "slow").await;
    assert!(
        info.num_ack_pending > 0 && info.ack_floor.stream_sequence < ids.len() as u64,
        "the slow endpoint is still at its first transitions: {info:?}"
    );
    check_requests(&receiver.requests("fast"), &expected, "web");
    let fast = receiver.requests("fast");
    assert_eq!(fast.len(), ids.len(), "each once: {fast:?}");

    spawner.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    receiver.down().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_keeps_failing_gets_its_transitions_dead_lettered_with_the_reason() {
    let env = TestEnv::new().await;
    let mut receiver = Receiver::start(Duration::ZERO, |_, _| Answer::Fail).await;
    let tracker = env.start_tracker().await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config.webhooks.insert(
        "refuses".into(),
        Webhook {
            max_attempts: 2,
            ..endpoint(receiver.url("refuses"))
        },
    );
    let (ingest, _) = env.start_ingest_with(config).await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let command = labelled(env.command(&["true"]), "infra");
    let run_ids = run_all(&env, &client, std::slice::from_ref(&command)).await;
    let expected = transitions(&env, &run_ids).await;
    let letters = eventually(
        "every transition is dead-lettered after two attempts",
        LIMIT,
        || async {
            let letters = env
                .stream_messages(
                    &env.subjects.dlq_stream(),
                    &env.subjects.dlq(webhooks::DLQ_KIND),
                )
                .await;
            (letters.len() >= expected.len()).then_some(letters)
        },
    )
    .await;
    eventually("the endpoint's consumer settles", LIMIT, || async {
        settled(&env, &client, "refuses").await.then_some(())
    })
    .await;

    let header = |letter: &async_nats::jetstream::message::StreamMessage, name: &str| {
        letter
            .headers
            .get(name)
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let mut lettered = BTreeSet::new();
    for letter in &letters {
        let event = LifecycleEvent::decode(letter.payload.clone()).expect("a LifecycleEvent");
        let id = webhooks::idempotency_key(&event);
        assert!(expected.contains_key(&id), "{id}");
        assert!(lettered.insert(id.clone()), "{id} is dead-lettered once");
        assert_eq!(
            header(letter, corral_proto::headers::DLQ_ERROR),
            "webhook refuses: gave up after 2 attempts: answered 500 Internal Server Error"
        );
        assert_eq!(
            header(letter, corral_proto::headers::DLQ_ORIGINAL_SUBJECT),
            env.subjects.lifecycle(&command.run_id)
        );
        assert_eq!(header(letter, corral_proto::headers::DLQ_DELIVERIES), "2");
        assert_eq!(
            header(letter, corral_proto::headers::DLQ_ORIGINAL_MSG_ID),
            id,
            "the lifecycle message's id is kept"
        );
    }
    assert_eq!(lettered.len(), expected.len());
    // Two attempts each, numbered, and nothing after the dead letter.
    let requests = receiver.requests("refuses");
    check_requests(&requests, &expected, "infra");
    let mut attempts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in &requests {
        attempts
            .entry(request.id.clone())
            .or_default()
            .push(request.attempt.clone());
    }
    assert_eq!(attempts.len(), expected.len());
    for (id, numbers) in &attempts {
        assert_eq!(numbers, &["1", "2"], "{id}");
    }

    spawner.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    receiver.down().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_label_filters_keep_out_what_they_should() {
    let env = TestEnv::new().await;
    let mut receiver = Receiver::start(Duration::ZERO, |_, _| Answer::Ok).await;
    let tracker = env.start_tracker().await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config
        .webhooks
        .insert("all".into(), endpoint(receiver.url("all")));
    config.webhooks.insert(
        "ends".into(),
        Webhook {
            states: vec!["completed".into(), "failed".into()],
            ..endpoint(receiver.url("ends"))
        },
    );
    config.webhooks.insert(
        "infra".into(),
        Webhook {
            labels: [("team".to_owned(), "infra".to_owned())].into(),
            ..endpoint(receiver.url("infra"))
        },
    );
    let (ingest, _) = env.start_ingest_with(config).await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let infra = labelled(env.command(&["true"]), "infra");
    let web = labelled(env.command(&["sh", "-c", "exit 3"]), "web");
    let run_ids = run_all(&env, &client, &[infra.clone(), web.clone()]).await;
    let expected = transitions(&env, &run_ids).await;
    let ids: BTreeSet<String> = expected.keys().cloned().collect();
    eventually(
        "the unfiltered endpoint takes everything",
        LIMIT,
        || async { (ids == receiver.taken("all")).then_some(()) },
    )
    .await;
    for endpoint in ["all", "ends", "infra"] {
        eventually(
            &format!("the consumer of {endpoint} settles"),
            LIMIT,
            || async { settled(&env, &client, endpoint).await.then_some(()) },
        )
        .await;
    }

    let ends: BTreeSet<String> = expected
        .iter()
        .filter(|(_, t)| t.to == "completed" || t.to == "failed")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ends.len(), 2, "{expected:?}");
    assert_eq!(receiver.taken("ends"), ends, "only the ends");
    let of_infra: BTreeSet<String> = ids
        .iter()
        .filter(|id| id.starts_with(&format!("{}:", infra.run_id)))
        .cloned()
        .collect();
    assert_eq!(receiver.taken("infra"), of_infra, "only the infra run's");
    for endpoint in ["all", "ends", "infra"] {
        let requests = receiver.requests(endpoint);
        assert_eq!(
            requests.len(),
            receiver.taken(endpoint).len(),
            "{endpoint}: each once"
        );
    }
    let of_run = |run_id: &str, team: &str| {
        let requests: Vec<Request> = receiver
            .requests("all")
            .into_iter()
            .filter(|r| r.delivery().run_id == run_id)
            .collect();
        check_requests(&requests, &expected, team);
    };
    of_run(&infra.run_id, "infra");
    of_run(&web.run_id, "web");
    let failed = receiver
        .requests("ends")
        .into_iter()
        .map(|r| r.delivery())
        .find(|d| d.run_id == web.run_id)
        .expect("the web run's end");
    assert_eq!(
        (failed.to.as_str(), failed.exit_code),
        (RunState::Failed.name(), Some(3))
    );

    spawner.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    receiver.down().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_need_no_more_than_the_ingest_role_may() {
    use corral_common::nats::NatsAuth;
    use corral_common::nats_roles::{self, Role};

    let mut env = TestEnv::new().await;
    let generated =
        nats_roles::generate(&env.home.join("nats-keys"), &env.subjects).expect("generate users");
    let nats = corral_tests::PrivateNats::start_with_config(
        &std::fs::read_to_string(&generated.auth_conf).expect("auth.conf"),
    );
    env.nats_url = nats.url();
    let auth_of = |role: Role| {
        let (_, seed, _) = generated
            .roles
            .iter()
            .find(|(r, _, _)| *r == role)
            .expect("every role is generated");
        NatsAuth {
            nkey_file: Some(seed.clone()),
            inbox_prefix: Some(role.inbox_prefix()),
            ..Default::default()
        }
    };
    env.nats_auth = auth_of(Role::Platform);
    let mut receiver = Receiver::start(Duration::ZERO, |endpoint, _| {
        if endpoint == "refuses" {
            Answer::Fail
        } else {
            Answer::Ok
        }
    })
    .await;
    let mut tracker_config = env.tracker_config();
    tracker_config.nats_auth = auth_of(Role::Tracker);
    let tracker = env.start_tracker_with(tracker_config).await;
    let mut spawner_config = env.spawner_config();
    spawner_config.nats_auth = auth_of(Role::Spawner);
    let spawner = env.start_spawner_with(spawner_config).await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config.nats_auth = auth_of(Role::Ingest);
    config
        .webhooks
        .insert("takes".into(), endpoint(receiver.url("takes")));
    config.webhooks.insert(
        "refuses".into(),
        Webhook {
            max_attempts: 1,
            ..endpoint(receiver.url("refuses"))
        },
    );
    let (ingest, _) = env.start_ingest_with(config).await;
    let client = env.client().await;

    let command = labelled(env.command(&["true"]), "infra");
    let run_ids = run_all(&env, &client, std::slice::from_ref(&command)).await;
    let expected = transitions(&env, &run_ids).await;
    let ids: BTreeSet<String> = expected.keys().cloned().collect();
    eventually("the endpoint takes every transition", LIMIT, || async {
        (ids == receiver.taken("takes")).then_some(())
    })
    .await;
    check_requests(&receiver.requests("takes"), &expected, "infra");
    eventually(
        "the refusing endpoint's transitions are dead-lettered",
        LIMIT,
        || async {
            let letters = env
                .stream_messages(
                    &env.subjects.dlq_stream(),
                    &env.subjects.dlq(webhooks::DLQ_KIND),
                )
                .await;
            (letters.len() == ids.len()).then_some(())
        },
    )
    .await;

    ingest.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    receiver.down().await;
    let log = nats.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("Violation"))
        .collect();
    assert!(
        refused.is_empty(),
        "no service was refused a subject: {refused:#?}"
    );
    // The streams go with the private server; the rest is cleaned up as
    // usual (the platform's credential may not delete streams).
    env.nats_url = corral_tests::nats_url();
    env.nats_auth = NatsAuth::default();
    env.cleanup().await;
}
