//! The end-to-end harness: each test gets its own database (random name,
//! migrations applied by the tracker), its own subject prefix on the shared
//! NATS server (so its streams are its own) and its own sandbox directory,
//! and runs the services in-process or as real processes when it must kill
//! one. `TestEnv::cleanup` deletes the streams and drops the database.
//!
//! NATS_URL (default nats://127.0.0.1:4222) must be a server with JetStream;
//! DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) a role
//! that may create databases.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use corral_client::Client;
use corral_common::Secret;
use corral_proto::Subjects;
use corral_proto::v1::{LifecycleEvent, Run, RunCommand, RunSpec};
use prost::Message;
use tokio_util::sync::CancellationToken;

pub mod cluster;
pub mod sessions;

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The run-token key of every test deployment.
pub const TOKEN_SECRET: &str = "corral-tests-run-token-key-0123456789";

fn random_suffix() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

/// Polls `check` until it returns `Some`, or panics after `limit` saying
/// what never happened.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub use corral_provider::local::processes_with_cmdline;

/// The API key the tests read events with (scopes `events:read` and
/// `events:stream`); [`http`] sends it unless a request names its own
/// `Authorization` (a run token).
pub const API_KEY: &str = "ck_tests_0123456789abcdefghijklmnopqrstuv";

/// The ingest setting that holds [`API_KEY`], with limits no test reaches.
pub fn api_keys() -> std::collections::BTreeMap<String, corral_event_ingest::auth::ApiKey> {
    std::collections::BTreeMap::from([(
        "tests".to_owned(),
        corral_event_ingest::auth::ApiKey {
            sha256: corral_event_ingest::auth::hash_key(API_KEY),
            scopes: vec!["events:read".into(), "events:stream".into()],
        },
    )])
}

/// [`api_keys`] as environment, for an ingest started as a process.
pub fn api_key_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "CORRAL_API_KEYS__TESTS__SHA256",
            corral_event_ingest::auth::hash_key(API_KEY),
        ),
        (
            "CORRAL_API_KEYS__TESTS__SCOPES",
            "[events:read, events:stream]".to_owned(),
        ),
        ("CORRAL_READ_RATE_PER_SEC", "10000".to_owned()),
        ("CORRAL_MAX_STREAMS_PER_KEY", "1000".to_owned()),
    ]
}

/// An HTTP client for tests: no request waits longer than a minute (a
/// streamed answer included), no connection longer than 5 s; it reads
/// events with [`API_KEY`].
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {API_KEY}"))
            .expect("a valid header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client should build")
}

/// Most pages a test reads before deciding the paging never ends.
pub const MAX_PAGES: usize = 1000;

/// A number for a test's unique `sleep N` command lines, so a check by
/// command line finds this test's processes and no other's.
pub fn unique_secs() -> u32 {
    100_000 + rand::random_range(0..800_000)
}

/// The `corral` binary built next to the test executable.
pub fn corral_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable should have a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps should have a parent");
    let bin = dir.join("corral");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A service running in this process.
pub struct InProcess {
    token: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), String>>,
}

impl InProcess {
    /// Stops it and asserts it returned `Ok`.
    pub async fn stop(self) {
        self.token.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.join)
            .await
            .expect("service should stop within 30 s")
            .expect("service task should not panic");
        result.expect("service should return Ok");
    }
}

/// A service running as a real process (`corral serve <service>`).
pub struct ServiceProcess {
    pub child: tokio::process::Child,
    pub spawner_id: String,
}

impl ServiceProcess {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("process should be running") as i32
    }

    /// SIGKILL, as a crash would.
    pub async fn kill_hard(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("service process should exit within 30 s after SIGTERM")
            .expect("wait should work");
        assert!(status.success(), "service process exited with {status}");
    }
}

pub struct TestEnv {
    pub prefix: String,
    pub subjects: Subjects,
    pub nats_url: String,
    /// How the test's own clients authenticate to NATS (none by default).
    pub nats_auth: corral_common::nats::NatsAuth,
    /// The streams' settings every service of this test is given (one
    /// replica; three on a [`cluster::PrivateCluster`]).
    pub streams: corral_common::streams::Streams,
    pub database_url: String,
    db_name: String,
    pub home: PathBuf,
    /// A directory every sandbox of this test sees, writable, at
    /// [`SHARED_IN_SANDBOX`]: where agents leave what the test checks
    /// (an isolated sandbox sees no other host path).
    pub shared: PathBuf,
}

/// Where sandboxes see [`TestEnv::shared`].
pub const SHARED_IN_SANDBOX: &str = "/shared";

impl TestEnv {
    pub async fn new() -> TestEnv {
        TestEnv::with_nats(&nats_url()).await
    }

    /// Logs of in-process services go through the test harness's capture:
    /// shown for a failing test, never for a passing one.
    fn capture_logs() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
    }

    /// A test environment on a NATS server of the test's own.
    pub async fn with_nats(nats_url: &str) -> TestEnv {
        TestEnv::capture_logs();
        let suffix = random_suffix();
        let prefix = format!("t{suffix}");
        let db_name = format!("corral_test_{suffix}");
        let admin = admin_database_url();
        let mut url = admin.clone();
        if let Some(slash) = url.rfind('/') {
            let query = url[slash..]
                .find('?')
                .map(|q| url[slash + q..].to_owned())
                .unwrap_or_default();
            url.truncate(slash + 1);
            url.push_str(&db_name);
            url.push_str(&query);
        }
        let home = std::env::temp_dir().join(format!("corral-test-{suffix}"));
        std::fs::create_dir_all(&home).expect("test home");
        let shared = home.join("shared");
        std::fs::create_dir_all(&shared).expect("shared directory");
        {
            use std::os::unix::fs::PermissionsExt;
            // Agents run as an unprivileged user.
            std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777))
                .expect("shared directory mode");
        }
        TestEnv {
            subjects: Subjects::new(&prefix).expect("test prefix should be valid"),
            prefix,
            nats_url: nats_url.to_owned(),
            nats_auth: Default::default(),
            streams: Default::default(),
            database_url: url,
            db_name,
            home,
            shared,
        }
    }

    /// The local provider of this test's sandboxes (as its spawners and
    /// reapers have it), to list, inspect and kill them from the test.
    pub fn local_provider(&self) -> corral_provider::LocalProvider {
        corral_provider::LocalProvider::new(&self.home, &corral_provider::LocalConfig::default())
            .expect("the local provider should open the test's sandbox directory")
    }

    pub fn tracker_config(&self) -> corral_tracker::Config {
        corral_tracker::Config {
            nats_url: self.nats_url.clone(),
            database_url: Secret::new(self.database_url.clone()),
            subject_prefix: self.prefix.clone(),
            streams: self.streams.clone(),
            db_pool_size: 8,
            ..Default::default()
        }
    }

    /// The `local.binds` entry that shows [`TestEnv::shared`] to sandboxes.
    pub fn shared_bind(&self) -> String {
        format!("{}:{SHARED_IN_SANDBOX}:rw", self.shared.display())
    }

    pub fn spawner_config(&self) -> corral_spawner::Config {
        corral_spawner::Config {
            local: corral_provider::LocalConfig {
                binds: vec![self.shared_bind()],
                ..Default::default()
            },
            nats_url: self.nats_url.clone(),
            subject_prefix: self.prefix.clone(),
            streams: self.streams.clone(),
            home: self.home.clone(),
            kill_grace_ms: 1000,
            heartbeat_ms: 500,
            drain_timeout_ms: 2000,
            ..Default::default()
        }
    }

    pub fn reaper_config(&self) -> corral_reaper::Config {
        corral_reaper::Config {
            nats_url: self.nats_url.clone(),
            subject_prefix: self.prefix.clone(),
            streams: self.streams.clone(),
            home: self.home.clone(),
            sweep_period_ms: 200,
            lease_ttl_ms: 1500,
            stop_grace_ms: 1000,
            owner_timeout_ms: 2000,
            boot_limit_ms: 5000,
            backstop_grace_ms: 500,
            // Chaos tests kill most spawners at once on purpose: a large
            // disruption, at test scale like the other timings.
            disruption_grace_ms: 3000,
            ..Default::default()
        }
    }

    pub async fn start_reaper_with(&self, config: corral_reaper::Config) -> InProcess {
        let token = CancellationToken::new();
        let cancel = token.clone();
        let join = tokio::spawn(async move {
            corral_reaper::run(config, cancel)
                .await
                .map_err(|e| e.to_string())
        });
        InProcess { token, join }
    }

    /// Sends a child process's output to a log file of this test's
    /// (`<home>/logs/<name>-<n>.log`), printed if the test fails.
    pub fn log_to_file(&self, command: &mut tokio::process::Command, name: &str) {
        let logs = self.home.join("logs");
        let _ = std::fs::create_dir_all(&logs);
        let path = logs.join(format!("{name}-{}.log", random_suffix()));
        match std::fs::File::create(&path) {
            Ok(file) => {
                let stderr = file.try_clone().map(Stdio::from).unwrap_or(Stdio::null());
                command.stdout(file).stderr(stderr);
            }
            Err(err) => eprintln!("no log file {}: {err}", path.display()),
        }
    }

    /// Gives a service process this test's stream settings
    /// (`CORRAL_STREAMS__<STREAM>__REPLICAS`).
    fn streams_env(&self, command: &mut tokio::process::Command) {
        let streams = &self.streams;
        for (name, settings) in [
            ("COMMANDS", &streams.commands),
            ("LIFECYCLE", &streams.lifecycle),
            ("EVENTS", &streams.events),
            ("DEAD_LETTERS", &streams.dead_letters),
        ] {
            command.env(
                format!("CORRAL_STREAMS__{name}__REPLICAS"),
                settings.replicas.to_string(),
            );
        }
    }

    /// Starts `corral serve <service>` as a real process with this test's
    /// prefix, database and sandbox directory, plus `extra` env.
    pub fn spawn_service_process(
        &self,
        service: &str,
        extra: &[(&str, &str)],
    ) -> tokio::process::Child {
        let mut command = tokio::process::Command::new(corral_bin());
        command
            .args(["serve", service])
            .env("NATS_URL", &self.nats_url)
            .env("DATABASE_URL", &self.database_url)
            .env("CORRAL_SUBJECT_PREFIX", &self.prefix)
            .env("CORRAL_HOME", &self.home)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        self.log_to_file(&mut command, service);
        self.streams_env(&mut command);
        // Ingest reads with the tests' API key (the others ignore these).
        for (key, value) in api_key_env() {
            command.env(key, value);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        command.spawn().expect("corral serve should start")
    }

    pub fn ingest_config(&self, listen: &str) -> corral_event_ingest::Config {
        corral_event_ingest::Config {
            nats_url: self.nats_url.clone(),
            database_url: Secret::new(self.database_url.clone()),
            subject_prefix: self.prefix.clone(),
            streams: self.streams.clone(),
            listen: listen.to_owned(),
            token_secret: Secret::new(TOKEN_SECRET),
            api_keys: api_keys(),
            read_rate_per_sec: 10_000,
            max_streams_per_key: 1000,
            ..Default::default()
        }
    }

    /// Starts event ingest in this process on a free port; returns its base URL.
    pub async fn start_ingest(&self) -> (InProcess, String) {
        self.start_ingest_with(self.ingest_config("127.0.0.1:0"))
            .await
    }

    /// [`TestEnv::start_ingest`] with `config` (listening on a free port).
    pub async fn start_ingest_with(
        &self,
        config: corral_event_ingest::Config,
    ) -> (InProcess, String) {
        let bound = corral_event_ingest::Bound::bind(config)
            .await
            .expect("ingest should bind");
        let url = format!("http://127.0.0.1:{}", bound.port());
        let token = CancellationToken::new();
        let cancel = token.clone();
        let join = tokio::spawn(async move { bound.run(cancel).await.map_err(|e| e.to_string()) });
        let http = reqwest::Client::new();
        eventually("event ingest is ready", Duration::from_secs(30), || async {
            let response = http.get(format!("{url}/readyz")).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        (InProcess { token, join }, url)
    }

    /// A run token for `run_id`, valid for an hour.
    pub fn token(&self, run_id: &str) -> String {
        corral_common::token::Keyring::single("default", TOKEN_SECRET.as_bytes())
            .mint(run_id, corral_common::now_ms() + 3_600_000)
    }

    pub async fn client(&self) -> Client {
        Client::connect_with(&self.nats_url, &self.nats_auth, &self.prefix, "corral-test")
            .await
            .expect("NATS should be reachable at NATS_URL")
    }

    /// Starts the tracker in this process and waits until it answers.
    pub async fn start_tracker(&self) -> InProcess {
        self.start_tracker_with(self.tracker_config()).await
    }

    pub async fn start_tracker_with(&self, config: corral_tracker::Config) -> InProcess {
        let token = CancellationToken::new();
        let cancel = token.clone();
        let join = tokio::spawn(async move {
            corral_tracker::run(config, cancel)
                .await
                .map_err(|e| e.to_string())
        });
        let service = InProcess { token, join };
        let client = self.client().await;
        eventually("the tracker answers", Duration::from_secs(30), || async {
            assert!(
                !service.join.is_finished(),
                "the tracker exited during start-up"
            );
            match client.get("probe").await {
                Err(err) if err.code().is_some() => Some(()),
                _ => None,
            }
        })
        .await;
        service
    }

    pub async fn start_spawner(&self) -> InProcess {
        self.start_spawner_with(self.spawner_config()).await
    }

    pub async fn start_spawner_with(&self, config: corral_spawner::Config) -> InProcess {
        let token = CancellationToken::new();
        let cancel = token.clone();
        let join = tokio::spawn(async move {
            corral_spawner::run(config, cancel)
                .await
                .map_err(|e| e.to_string())
        });
        InProcess { token, join }
    }

    /// Starts `corral serve spawner` as a real process with `extra` env, and
    /// waits for its first heartbeat.
    pub async fn spawn_spawner_process(&self, extra: &[(&str, &str)]) -> ServiceProcess {
        let spawner_id = format!("proc-{}", random_suffix());
        let mut command = tokio::process::Command::new(corral_bin());
        command
            .args(["serve", "spawner"])
            .env("NATS_URL", &self.nats_url)
            .env("CORRAL_SUBJECT_PREFIX", &self.prefix)
            .env("CORRAL_HOME", &self.home)
            .env("CORRAL_SPAWNER_ID", &spawner_id)
            .env(
                "CORRAL_LOCAL__BINDS",
                format!("[\"{}\"]", self.shared_bind()),
            )
            .env("CORRAL_KILL_GRACE_MS", "1000")
            .env("CORRAL_HEARTBEAT_MS", "300")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        self.log_to_file(&mut command, "spawner");
        self.streams_env(&mut command);
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().expect("corral serve spawner should start");
        let process = ServiceProcess { child, spawner_id };
        self.wait_for_heartbeat(&process.spawner_id).await;
        process
    }

    async fn wait_for_heartbeat(&self, spawner_id: &str) {
        let pool = self.pool().await;
        eventually(
            &format!("spawner {spawner_id} heartbeats"),
            Duration::from_secs(30),
            || async {
                let row: Option<(String,)> =
                    sqlx::query_as("SELECT spawner_id FROM spawners WHERE spawner_id = $1")
                        .bind(spawner_id)
                        .fetch_optional(&pool)
                        .await
                        .ok()?;
                row.map(|_| ())
            },
        )
        .await;
        pool.close().await;
    }

    /// A direct connection to this test's database, for assertions.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.database_url)
            .await
            .expect("test database should be reachable")
    }

    /// A run command for `argv` with a fresh id.
    pub fn command(&self, argv: &[&str]) -> RunCommand {
        RunCommand {
            run_id: corral_client::new_run_id(),
            spec: Some(RunSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            requested_by: "test".into(),
            submitted_at_ms: corral_common::now_ms(),
        }
    }

    /// How many runs ended up in each state, with the reason when there is
    /// one (`failed (owner_lost)`), for a test's summary line.
    pub async fn outcome_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let pool = self.pool().await;
        let outcomes: Vec<(String, String)> = sqlx::query_as("SELECT state, reason FROM runs")
            .fetch_all(&pool)
            .await
            .expect("runs");
        pool.close().await;
        let mut counts = std::collections::BTreeMap::new();
        for (state, reason) in outcomes {
            let key = if reason.is_empty() {
                state
            } else {
                format!("{state} ({reason})")
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    }

    /// A command for a kept run (`keep_alive`) of `argv` with a fresh id.
    pub fn kept(&self, argv: &[&str]) -> RunCommand {
        let mut command = self.command(argv);
        if let Some(spec) = command.spec.as_mut() {
            spec.keep_alive = true;
        }
        command
    }

    /// Waits until the run is terminal.
    pub async fn wait_terminal(&self, client: &Client, run_id: &str, limit: Duration) -> Run {
        client
            .wait_terminal(run_id, limit)
            .await
            .unwrap_or_else(|err| panic!("run {run_id} did not end: {err}"))
    }

    /// Waits until the run is in `state`, on the run's lifecycle subject;
    /// fails at once if it ends first.
    pub async fn wait_state(
        &self,
        client: &Client,
        run_id: &str,
        state: corral_proto::v1::RunState,
    ) -> Run {
        let limit = Duration::from_secs(60);
        let run = client
            .wait_until(run_id, limit, |run| {
                run.state() == state || run.state().is_terminal()
            })
            .await
            .unwrap_or_else(|err| panic!("run {run_id} never reached {}: {err}", state.name()));
        assert_eq!(
            run.state(),
            state,
            "run {run_id} ended {} ({}) before reaching {}",
            run.state().name(),
            run.reason,
            state.name()
        );
        run
    }

    /// Every message on a stream subject, for assertions.
    /// The run's output lines (`agent.output` events), from the events
    /// stream, in order.
    pub async fn output(&self, run_id: &str) -> Vec<String> {
        use corral_proto::v1::{AgentEvent, agent_event};
        use prost::Message;
        let subject = self.subjects.events(run_id, "agent.output");
        self.stream_messages(&self.subjects.events_stream(), &subject)
            .await
            .into_iter()
            .filter_map(|m| match AgentEvent::decode(m.payload).ok()?.payload? {
                agent_event::Payload::Output(line) => Some(line.line),
                _ => None,
            })
            .collect()
    }

    /// The run's lifecycle announcements as the stream holds them, in
    /// stream order, with each message's `Nats-Msg-Id`.
    pub async fn lifecycle(&self, run_id: &str) -> Vec<(String, LifecycleEvent)> {
        let messages = self
            .stream_messages(
                &self.subjects.lifecycle_stream(),
                &self.subjects.lifecycle(run_id),
            )
            .await;
        messages
            .iter()
            .map(|m| {
                let msg_id = m
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let event =
                    LifecycleEvent::decode(m.payload.clone()).expect("a lifecycle message decodes");
                (msg_id, event)
            })
            .collect()
    }

    /// Waits until the run's history (`run_transitions`) has `rows` rows and
    /// the lifecycle stream announces exactly those rows, once each, in
    /// order; returns the announcements.
    pub async fn wait_lifecycle(&self, run_id: &str, rows: usize) -> Vec<LifecycleEvent> {
        let pool = self.pool().await;
        let announced = eventually(
            &format!("the lifecycle stream announces the {rows} transitions of run {run_id}"),
            Duration::from_secs(30),
            || async {
                let history: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT to_state, version FROM run_transitions WHERE run_id = $1 ORDER BY id",
                )
                .bind(run_id)
                .fetch_all(&pool)
                .await
                .ok()?;
                let announced = self.lifecycle(run_id).await;
                (history.len() == rows && announced.len() >= rows).then_some((history, announced))
            },
        )
        .await;
        pool.close().await;
        let (history, announced) = announced;
        let announced_rows: Vec<(String, i64)> = announced
            .iter()
            .map(|(_, e)| (e.to().name().to_owned(), e.version as i64))
            .collect();
        assert_eq!(
            announced_rows, history,
            "the lifecycle stream holds exactly the run's history, in order"
        );
        for (msg_id, event) in &announced {
            assert_eq!(msg_id, &format!("{run_id}:{}", event.version));
        }
        announced.into_iter().map(|(_, e)| e).collect()
    }

    pub async fn stream_messages(
        &self,
        stream: &str,
        subject: &str,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        let client = self.client().await;
        let js = client.jetstream();
        let mut stream = js.get_stream(stream).await.expect("stream should exist");
        let info = stream.info().await.expect("stream info").clone();
        let mut found = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            if let Ok(message) = stream.get_raw_message(seq).await
                && (subject.is_empty() || subject_matches(subject, &message.subject))
            {
                found.push(message);
            }
        }
        found
    }

    /// Deletes this test's streams, database and sandbox directory.
    pub async fn cleanup(self) {
        if let Ok(client) = Client::connect_with(
            &self.nats_url,
            &self.nats_auth,
            &self.prefix,
            "corral-test-cleanup",
        )
        .await
        {
            for config in corral_common::nats::stream_configs(&self.subjects) {
                let _ = client.jetstream().delete_stream(&config.name).await;
            }
        }
        if let Ok(mut conn) =
            <sqlx::PgConnection as sqlx::Connection>::connect(&admin_database_url()).await
        {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .execute(&mut conn)
            .await;
        }
        self.local_provider().release_control_groups();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// A failing test prints the logs of the processes it started (a passing
/// one removed them with its home in [`TestEnv::cleanup`]).
impl Drop for TestEnv {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.home.join("logs")) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let shown = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "---- {} (last {} of {} lines) ----\n{}",
                path.display(),
                shown.len(),
                lines.len(),
                shown.join("\n")
            );
        }
    }
}

/// NATS subject matching with `*` and `>`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match token {
            ">" => return subject_tokens.next().is_some(),
            "*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            literal => {
                if subject_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}

/// A PostgreSQL server of a test's own, on a free port, that the test may
/// stop and start (the shared server serves the parallel tests). Run as the
/// `postgres` user when the test runs as root, as the server requires.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.filter_map(|v| v.ok()).map(|v| v.path().join("bin")).max())
            .filter(|bin| bin.join("initdb").exists())
            .expect("PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin (Debian package postgresql)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("corral-pg-{}", random_suffix()));
        std::fs::create_dir_all(&dir).expect("data dir");
        let server = PrivatePostgres { dir, bin, port };
        if unsafe { libc::geteuid() } == 0 {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the data directory failed");
        }
        let data = server.dir.join("data");
        server.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        server.start_again();
        server
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("postgres tool runs");
        assert!(
            output.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops it now (fast shutdown: connections are cut).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let program = self.bin.join("pg_ctl");
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let _ = command
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A NATS server (JetStream on, file storage) of a test's own, on a free
/// port, that the test may stop and start again with its streams intact.
pub struct PrivateNats {
    dir: PathBuf,
    pub port: u16,
    child: Option<std::process::Child>,
    /// A configuration file to start with (then the log goes to a file).
    config: Option<PathBuf>,
}

impl PrivateNats {
    pub fn start() -> PrivateNats {
        PrivateNats::start_with(None)
    }

    /// Starts with `conf` added to a configuration file that sets the
    /// port, JetStream and a log file ([`PrivateNats::log`]).
    pub fn start_with_config(conf: &str) -> PrivateNats {
        PrivateNats::start_with(Some(conf))
    }

    fn start_with(conf: Option<&str>) -> PrivateNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("corral-nats-{}", random_suffix()));
        std::fs::create_dir_all(&dir).expect("nats store dir");
        let config = conf.map(|conf| {
            let path = dir.join("server.conf");
            let text = format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\nlog_file: \"{}\"\n{conf}\n",
                dir.join("store").display(),
                dir.join("nats.log").display()
            );
            std::fs::write(&path, text).expect("nats-server configuration");
            path
        });
        let mut server = PrivateNats {
            dir,
            port,
            child: None,
            config,
        };
        server.start_again();
        server
    }

    /// Its directory: configuration, store, log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the server logged (servers started with a configuration).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and store, and waits until it
    /// accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the NATS server is already running");
        let mut command = std::process::Command::new("nats-server");
        match &self.config {
            Some(config) => {
                command.arg("-c").arg(config);
            }
            None => {
                command
                    .args([
                        "-a",
                        "127.0.0.1",
                        "-p",
                        &self.port.to_string(),
                        "-js",
                        "-sd",
                    ])
                    .arg(self.dir.join("store"));
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (Debian package nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {} within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it now (SIGKILL: clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
