//! The test environment: a test's own database, subject prefix and sandbox
//! directory ([`TestEnv`]), the services' configurations for it, the test's
//! own clients, and its cleanup.

use std::path::PathBuf;

use corral_client::Client;
use corral_common::Secret;
use corral_proto::Subjects;
use corral_proto::v1::{RunCommand, RunSpec};

use crate::{TOKEN_SECRET, api_keys, random_suffix};

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct TestEnv {
    pub prefix: String,
    pub subjects: Subjects,
    pub nats_url: String,
    /// How the test's own clients authenticate to NATS (none by default).
    pub nats_auth: corral_common::nats::NatsAuth,
    /// The streams' settings every service of this test is given (one
    /// replica; three on a [`crate::cluster::PrivateCluster`]).
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

    pub async fn client(&self) -> Client {
        Client::connect_with(&self.nats_url, &self.nats_auth, &self.prefix, "corral-test")
            .await
            .expect("NATS should be reachable at NATS_URL")
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

    /// A command for a kept run (`keep_alive`) of `argv` with a fresh id.
    pub fn kept(&self, argv: &[&str]) -> RunCommand {
        let mut command = self.command(argv);
        if let Some(spec) = command.spec.as_mut() {
            spec.keep_alive = true;
        }
        command
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
/// one removed them with its home in [`TestEnv::cleanup`]) and kills the
/// sandboxes it left: a panic never reaches `cleanup`, and hundreds of
/// sandboxes left running would slow every test and bench after it.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        kill_sandboxes_left(&self.home);
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

/// Kills every sandbox under `home` (on a thread of its own: this runs in
/// a drop, maybe inside the test's runtime). Never panics: it runs while a
/// test is panicking.
fn kill_sandboxes_left(home: &std::path::Path) {
    let home = home.to_owned();
    let killing = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(provider) = corral_provider::LocalProvider::new(
                &home,
                &corral_provider::LocalConfig::default(),
            ) else {
                return;
            };
            if let Ok((left, _)) = provider.kill_all().await
                && left > 0
            {
                eprintln!("---- killed {left} sandboxes the failed test left ----");
            }
        });
    });
    let _ = killing.join();
}
