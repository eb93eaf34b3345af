//! Service runners: the services of a test in this process ([`InProcess`])
//! or as real processes of the `corral` binary ([`ServiceProcess`]), with
//! their logs in files of the test's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{TestEnv, api_key_env, eventually, random_suffix};

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

impl TestEnv {
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
        let exited = async {
            while !service.join.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = crate::tracker_answers(&client, "the tracker answers") => {}
            _ = exited => panic!("the tracker exited during start-up"),
        }
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
}
