//! A private deployment for self-contained benchmarks: a fresh subject
//! prefix and sandbox directory, services as real `corral serve` processes,
//! removed (streams, processes, directory) when done.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use corral_client::Client;
use tokio::process::{Child, Command};

pub struct Stack {
    pub prefix: String,
    pub home: PathBuf,
    pub nats_url: String,
    pub database_url: String,
    pub client: Client,
    children: Vec<Child>,
}

impl Stack {
    pub async fn new(nats_url: &str, name: &str) -> anyhow::Result<Stack> {
        let database_url = std::env::var("DATABASE_URL")
            .context("DATABASE_URL must name the PostgreSQL database the benchmark may use")?;
        Stack::with(nats_url, &database_url, name).await
    }

    /// A stack on the given NATS and database.
    pub async fn with(nats_url: &str, database_url: &str, name: &str) -> anyhow::Result<Stack> {
        let database_url = database_url.to_owned();
        let id = corral_client::new_run_id().replace('-', "");
        let prefix = format!("bench-{name}-{}", &id[id.len() - 8..]);
        let home = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&home)?;
        let client = Client::connect(nats_url, &prefix, "corral-bench").await?;
        Ok(Stack {
            prefix,
            home,
            nats_url: nats_url.to_owned(),
            database_url,
            client,
            children: Vec::new(),
        })
    }

    /// Starts `corral serve <service>` with this stack's settings and `extra` env.
    pub fn spawn(&mut self, service: &str, extra: &[(&str, String)]) -> anyhow::Result<u32> {
        let exe = std::env::current_exe().context("cannot find the corral binary")?;
        let mut command = Command::new(exe);
        command
            .args(["serve", service])
            .env("NATS_URL", &self.nats_url)
            .env("DATABASE_URL", &self.database_url)
            .env("CORRAL_SUBJECT_PREFIX", &self.prefix)
            .env("CORRAL_HOME", &self.home)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start corral serve {service}"))?;
        let pid = child.id().context("the service exited at once")?;
        self.children.push(child);
        Ok(pid)
    }

    /// Waits until the tracker answers.
    pub async fn wait_for_tracker(&self) -> anyhow::Result<()> {
        for _ in 0..300 {
            if let Err(err) = self.client.get("probe").await
                && err.code().is_some()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the tracker did not answer within 30 s")
    }

    /// Stops one service the stack started (`pid`, as [`Stack::spawn`]
    /// returned it) and waits until it is gone.
    pub async fn stop(&mut self, pid: u32) {
        if let Some(child) = self.children.iter_mut().find(|c| c.id() == Some(pid)) {
            stop_child(child).await;
        }
    }

    /// Stops the services (SIGTERM, then SIGKILL) and removes what the
    /// stack made.
    pub async fn teardown(mut self) {
        // Newest first: spawners end their runs while the tracker still answers.
        for child in self.children.iter_mut().rev() {
            stop_child(child).await;
        }
        // A spawner killed before it drained leaves its sandboxes running:
        // whatever is still under this stack's home goes with it.
        self.kill_sandboxes().await;
        for config in corral_common::nats::stream_configs(self.client.subjects()) {
            let _ = self.client.jetstream().delete_stream(&config.name).await;
        }
        let _ = self
            .client
            .jetstream()
            .delete_stream(format!(
                "KV_{}",
                self.client.subjects().reaper_lease_bucket()
            ))
            .await;
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

impl Stack {
    /// Kills every local sandbox under this stack's home.
    async fn kill_sandboxes(&self) {
        use corral_provider::{LocalConfig, LocalProvider};
        let Ok(provider) = LocalProvider::new(&self.home, &LocalConfig::default()) else {
            return;
        };
        let Ok((left, failed)) = provider.kill_all().await else {
            return;
        };
        if left > 0 {
            eprintln!("removed {left} sandboxes the services left");
        }
        for (id, err) in failed {
            eprintln!("warning: sandbox {id} not removed: {err}");
        }
    }
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resolves when process `pid` has exited (a pidfd becomes readable).
pub async fn exited(pid: i32) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        // Already gone (and reaped).
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err);
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns `fd`, which stays open and the same until dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|err| std::io::Error::other(err.to_string()))?;
    let _guard = fd.readable().await?;
    Ok(())
}

/// SIGTERM, then SIGKILL if the service has not exited within 15 s.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
