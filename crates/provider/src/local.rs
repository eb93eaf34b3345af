//! The local provider: each sandbox is a directory under
//! `<home>/sandboxes/<id>/` (state in `sandbox.json`, the agent's files in
//! `work/`) and each command in it is a process group of its own with
//! address-space and CPU-time limits.
//!
//! The state on disk names the process groups with their leaders' start times,
//! so any process on this machine (a restarted spawner, the reaper) can list
//! and kill what another left. Every process of a sandbox also carries
//! `CORRAL_SANDBOX_ID` in its environment, which identifies stragglers whose
//! group leader already exited. It is node-local: only processes on the same
//! machine can see its sandboxes.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::{
    CreateSpec, ExecControl, ExecSpec, Execution, ExitStatus, Health, KillOutcome, Labels,
    OutputLine, OutputStream, Process, Provider, ProviderError, SandboxInfo,
};

const STATE_FILE: &str = "sandbox.json";
const WORK_DIR: &str = "work";
/// Output lines longer than this are split.
const MAX_LINE: usize = 64 * 1024;
const ENV_MARKER: &str = "CORRAL_SANDBOX_ID";

/// Sandboxes as process groups on this machine. Cheap to clone.
#[derive(Clone)]
pub struct LocalProvider {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    path_env: String,
    /// Serializes this process's read-modify-write of state files.
    state_lock: Mutex<()>,
    /// Bounds the blocking work in flight: a burst of kills must not become
    /// hundreds of threads fighting the agents' signals for the CPU.
    blocking_slots: tokio::sync::Semaphore,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SandboxState {
    id: String,
    labels: Labels,
    created_at_ms: i64,
    memory_mib: u64,
    cpu_secs: u64,
    paused: bool,
    groups: Vec<Group>,
}

/// A process group and its leader's start time (clock ticks since boot),
/// which tells a live leader from a later process that reused its pid.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Group {
    pgid: i32,
    start_time: u64,
}

impl LocalProvider {
    /// A provider keeping its sandboxes under `<home>/sandboxes`.
    pub fn new(home: &Path) -> io::Result<LocalProvider> {
        let root = home.join("sandboxes");
        std::fs::create_dir_all(&root)?;
        let inner = Inner {
            root,
            path_env: std::env::var("PATH")
                .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
            state_lock: Mutex::new(()),
            blocking_slots: tokio::sync::Semaphore::new(4),
        };
        Ok(LocalProvider {
            inner: Arc::new(inner),
        })
    }

    /// The sandbox's working directory (the agent's `HOME` and cwd).
    pub fn work_dir(&self, sandbox_id: &str) -> PathBuf {
        self.inner.work_dir(sandbox_id)
    }

    /// Process ids of every live (non-zombie) process of the sandbox, found
    /// by its environment marker. For tests and diagnostics: it scans /proc.
    pub fn live_processes(sandbox_id: &str) -> Vec<i32> {
        scan_proc(|_, _| true, Some(sandbox_id))
    }

    /// Runs blocking file and process work off the async workers, so a
    /// burst of kills never delays the signals of other runs.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let _slot = self
            .inner
            .blocking_slots
            .acquire()
            .await
            .map_err(|err| ProviderError::Failed(err.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|err| ProviderError::Failed(format!("provider task failed: {err}")))?
    }
}

impl Inner {
    fn work_dir(&self, sandbox_id: &str) -> PathBuf {
        self.root.join(sandbox_id).join(WORK_DIR)
    }

    fn dir(&self, sandbox_id: &str) -> Result<PathBuf, ProviderError> {
        let valid = !sandbox_id.is_empty()
            && sandbox_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(ProviderError::Invalid(format!(
                "bad local sandbox id {sandbox_id:?}"
            )));
        }
        Ok(self.root.join(sandbox_id))
    }

    fn read_state(&self, sandbox_id: &str) -> Result<SandboxState, ProviderError> {
        let path = self.dir(sandbox_id)?.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(ProviderError::NotFound(sandbox_id.to_owned()));
            }
            Err(err) => return Err(io_failed(&path, err)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|err| ProviderError::Failed(format!("{} is corrupt: {err}", path.display())))
    }

    fn write_state(&self, state: &SandboxState) -> Result<(), ProviderError> {
        let dir = self.dir(&state.id)?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec(state).expect("sandbox state should serialize");
        std::fs::write(&tmp, bytes).map_err(|err| io_failed(&tmp, err))?;
        std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|err| io_failed(&tmp, err))
    }

    fn update_state(
        &self,
        sandbox_id: &str,
        change: impl FnOnce(&mut SandboxState),
    ) -> Result<SandboxState, ProviderError> {
        let _guard = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.read_state(sandbox_id)?;
        change(&mut state);
        self.write_state(&state)?;
        Ok(state)
    }

    fn kill(&self, sandbox_id: &str) -> Result<KillOutcome, ProviderError> {
        let dir = self.dir(sandbox_id)?;
        let state = match self.read_state(sandbox_id) {
            Ok(state) => state,
            Err(ProviderError::NotFound(_)) => {
                // No state file: either gone, or a create that crashed before
                // writing it. Kill anything carrying the marker regardless.
                let strays = scan_proc(|_, _| true, Some(sandbox_id));
                for pid in &strays {
                    killpg(*pid, libc::SIGKILL);
                }
                let existed = dir.exists();
                let _ = std::fs::remove_dir_all(&dir);
                return Ok(if existed || !strays.is_empty() {
                    KillOutcome::Killed
                } else {
                    KillOutcome::AlreadyGone
                });
            }
            Err(err) => return Err(err),
        };
        // Remove the state first so a concurrent exec notices and gives up.
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
        self.signal_groups(&state, libc::SIGKILL);
        // A paused group must be continued for SIGKILL to finish it promptly.
        self.signal_groups(&state, libc::SIGCONT);
        for group in &state.groups {
            wait_group_gone(group.pgid, Duration::from_secs(1));
        }
        if state.groups.is_empty() {
            for pid in scan_proc(|_, _| true, Some(sandbox_id)) {
                killpg(pid, libc::SIGKILL);
            }
        }
        std::fs::remove_dir_all(&dir).map_err(|err| io_failed(&dir, err))?;
        Ok(KillOutcome::Killed)
    }

    fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        let id = format!("sbx-{}", uuid::Uuid::now_v7().simple());
        let dir = self.dir(&id)?;
        let work = dir.join(WORK_DIR);
        std::fs::create_dir_all(&work).map_err(|err| io_failed(&work, err))?;
        let state = SandboxState {
            id: id.clone(),
            labels: spec.labels.clone(),
            created_at_ms: now_ms(),
            memory_mib: spec.memory_mib,
            cpu_secs: spec.cpu_secs,
            paused: false,
            groups: Vec::new(),
        };
        self.write_state(&state)?;
        Ok(info(&state))
    }

    /// Signals every live group of the sandbox; returns how many it reached.
    fn signal_groups(&self, state: &SandboxState, signal: i32) -> usize {
        let mut reached = 0;
        for group in &state.groups {
            if group_is_ours(group, &state.id) && killpg(group.pgid, signal) {
                reached += 1;
            }
        }
        reached
    }
}

fn io_failed(path: &Path, err: io::Error) -> ProviderError {
    ProviderError::Failed(format!("{}: {err}", path.display()))
}

fn killpg(pgid: i32, signal: i32) -> bool {
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe { libc::killpg(pgid, signal) == 0 }
}

/// Fields of /proc/<pid>/stat after the command name: (state, pgrp, starttime).
fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, pgrp, start))
}

fn has_marker(pid: i32, sandbox_id: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{ENV_MARKER}={sandbox_id}");
    environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// Live processes that satisfy `filter(pid, pgrp)` and, when `sandbox_id`
/// is given, carry its marker.
fn scan_proc(filter: impl Fn(i32, i32) -> bool, sandbox_id: Option<&str>) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| match proc_stat(*pid) {
            Some((state, pgrp, _)) => state != 'Z' && state != 'X' && filter(*pid, pgrp),
            None => false,
        })
        .filter(|pid| sandbox_id.is_none_or(|id| has_marker(*pid, id)))
        .collect()
}

/// Whether signalling `group.pgid` reaches this sandbox's processes and no
/// one else's: its leader is alive with the recorded start time, or, when the
/// leader is gone, some remaining member carries the sandbox's marker.
fn group_is_ours(group: &Group, sandbox_id: &str) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(-group.pgid, 0) } != 0 {
        return false; // an empty group: nothing to signal, no /proc scan
    }
    match proc_stat(group.pgid) {
        Some((_, pgrp, start)) if start == group.start_time && pgrp == group.pgid => true,
        _ => !scan_proc(|_, pgrp| pgrp == group.pgid, Some(sandbox_id)).is_empty(),
    }
}

/// Waits until no process of the group is left (zombies aside), up to `limit`.
fn wait_group_gone(pgid: i32, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(-pgid, 0) } == 0;
        if !alive {
            return;
        }
        let zombies_only = match proc_stat(pgid) {
            Some((state, _, _)) => state == 'Z',
            None => true,
        };
        if zombies_only && scan_proc(|_, pgrp| pgrp == pgid, None).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `program` as an absolute path, searched in `path` when it is a bare name.
fn resolve(program: &str, path: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return PathBuf::from(program);
    }
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        let executable = std::fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            return candidate;
        }
    }
    PathBuf::from(program)
}

fn apply_limits(pid: i32, memory_mib: u64, cpu_secs: u64) {
    let set = |resource, soft: u64, hard: u64| {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: prlimit reads `limit` and writes nothing (null old limit).
        let failed = unsafe { libc::prlimit(pid, resource, &limit, std::ptr::null_mut()) } != 0;
        if failed {
            tracing::warn!(pid, error = %io::Error::last_os_error(), "cannot set sandbox limit");
        }
    };
    if memory_mib > 0 {
        let bytes = memory_mib.saturating_mul(1024 * 1024);
        set(libc::RLIMIT_AS, bytes, bytes);
    }
    if cpu_secs > 0 {
        // SIGXCPU at the soft limit, SIGKILL at the hard one.
        set(libc::RLIMIT_CPU, cpu_secs, cpu_secs + 5);
    }
    set(libc::RLIMIT_CORE, 0, 0);
}

struct GroupControl {
    pgid: i32,
}

impl ExecControl for GroupControl {
    fn interrupt(&self) {
        killpg(self.pgid, libc::SIGTERM);
    }

    fn kill(&self) {
        killpg(self.pgid, libc::SIGKILL);
    }
}

fn pump<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    stream: OutputStream,
    tx: mpsc::Sender<OutputLine>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(4096, reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            if tx.send(OutputLine { stream, line }).await.is_err() {
                return;
            }
        }
    });
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        let spec = spec.clone();
        self.blocking(move |inner| inner.create(&spec)).await
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Execution, ProviderError> {
        let state = self.inner.read_state(sandbox_id)?;
        let Some(program) = spec.argv.first() else {
            return Err(ProviderError::Invalid("empty argv".into()));
        };
        let work = self.work_dir(sandbox_id);
        // An absolute program path lets std use posix_spawn (a changed PATH
        // with a bare name forces fork, which copies this whole process).
        let program = resolve(program, &self.inner.path_env);
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&spec.argv[1..])
            .current_dir(&work)
            .env_clear()
            .env("PATH", &self.inner.path_env)
            .env("HOME", &work)
            .env("LANG", "C.UTF-8")
            .envs(&spec.env)
            .env(ENV_MARKER, sandbox_id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A new process group, started with posix_spawn (no fork of this
        // large, multi-threaded process: that costs more than the agent).
        command.process_group(0);
        let mut child = command
            .spawn()
            .map_err(|err| ProviderError::Invalid(format!("cannot start {program:?}: {err}")))?;
        let pgid = child
            .id()
            .map(|pid| pid as i32)
            .ok_or_else(|| ProviderError::Failed("child exited before it had a pid".into()))?;
        // Limits are applied right after the spawn (posix_spawn cannot set
        // them): the agent runs unlimited for the few microseconds between
        // its exec and this call; children it forks later inherit them.
        apply_limits(pgid, state.memory_mib, state.cpu_secs);
        let group = Group {
            pgid,
            start_time: proc_stat(pgid).map(|(_, _, start)| start).unwrap_or(0),
        };
        if let Err(err) = self
            .inner
            .update_state(sandbox_id, |s| s.groups.push(group))
        {
            // The sandbox was killed while this command started: end it too.
            killpg(pgid, libc::SIGKILL);
            let _ = child.wait().await;
            return Err(err);
        }

        let (tx, rx) = mpsc::channel(256);
        if let Some(stdout) = child.stdout.take() {
            pump(stdout, OutputStream::Stdout, tx.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            pump(stderr, OutputStream::Stderr, tx);
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => ExitStatus::Code(code),
                        (None, Some(signal)) => ExitStatus::Signal(signal),
                        (None, None) => ExitStatus::Signal(libc::SIGKILL),
                    }
                }
                Err(err) => {
                    tracing::warn!(pgid, error = %err, "waiting for sandbox process failed");
                    ExitStatus::Signal(libc::SIGKILL)
                }
            };
            let _ = exit_tx.send(Some(status));
        });
        Ok(Execution {
            output: rx,
            process: Process::new(exit_rx, Box::new(GroupControl { pgid })).with_pid(pgid),
        })
    }

    async fn kill(&self, sandbox_id: &str) -> Result<KillOutcome, ProviderError> {
        let sandbox_id = sandbox_id.to_owned();
        self.blocking(move |inner| inner.kill(&sandbox_id)).await
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let state = self.inner.update_state(sandbox_id, |s| s.paused = true)?;
        self.inner.signal_groups(&state, libc::SIGSTOP);
        Ok(())
    }

    async fn resume(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let state = self.inner.update_state(sandbox_id, |s| s.paused = false)?;
        self.inner.signal_groups(&state, libc::SIGCONT);
        Ok(())
    }

    async fn probe(&self, sandbox_id: &str) -> Result<Health, ProviderError> {
        match self.inner.read_state(sandbox_id) {
            Ok(_) if self.work_dir(sandbox_id).is_dir() => Ok(Health::Healthy),
            Ok(_) => Ok(Health::Gone("sandbox directory is missing".into())),
            Err(ProviderError::NotFound(_)) => Ok(Health::Gone("sandbox does not exist".into())),
            Err(err) => Err(err),
        }
    }

    async fn list(&self, labels: &Labels) -> Result<Vec<SandboxInfo>, ProviderError> {
        let entries =
            std::fs::read_dir(&self.inner.root).map_err(|err| io_failed(&self.inner.root, err))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let state = match self.inner.read_state(&id) {
                Ok(state) => state,
                // Being created or killed right now.
                Err(ProviderError::NotFound(_)) => continue,
                Err(err) => {
                    tracing::warn!(sandbox_id = %id, error = %err, "unreadable local sandbox");
                    continue;
                }
            };
            if labels.iter().all(|(k, v)| state.labels.get(k) == Some(v)) {
                found.push(info(&state));
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }
}

fn info(state: &SandboxState) -> SandboxInfo {
    SandboxInfo {
        id: state.id.clone(),
        labels: state.labels.clone(),
        created_at_ms: state.created_at_ms,
        paused: state.paused,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn provider() -> (LocalProvider, PathBuf) {
        let home =
            std::env::temp_dir().join(format!("corral-local-{}", uuid::Uuid::now_v7().simple()));
        (LocalProvider::new(&home).expect("provider"), home)
    }

    fn spec(run_id: &str) -> CreateSpec {
        let mut labels = Labels::new();
        labels.insert(crate::LABEL_RUN_ID.into(), run_id.into());
        CreateSpec {
            run_id: run_id.into(),
            labels,
            memory_mib: 1024,
            cpu_secs: 60,
            ..Default::default()
        }
    }

    fn argv(args: &[&str]) -> ExecSpec {
        ExecSpec {
            argv: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn a_command_streams_its_lines_and_exit_code() {
        let (provider, home) = provider();
        let sandbox = provider.create(&spec("r1")).await.expect("create");
        let mut exec = provider
            .exec(
                &sandbox.id,
                &argv(&["sh", "-c", "echo one; echo two >&2; exit 3"]),
            )
            .await
            .expect("exec");
        let mut lines = Vec::new();
        while let Some(line) = exec.output.recv().await {
            lines.push(line);
        }
        assert_eq!(exec.process.wait().await, ExitStatus::Code(3));
        assert!(lines.contains(&OutputLine {
            stream: OutputStream::Stdout,
            line: "one".into()
        }));
        assert!(lines.contains(&OutputLine {
            stream: OutputStream::Stderr,
            line: "two".into()
        }));
        provider.kill(&sandbox.id).await.expect("kill");
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test]
    async fn the_environment_carries_the_run_id_and_nothing_of_the_parent() {
        let (provider, home) = provider();
        let sandbox = provider.create(&spec("r2")).await.expect("create");
        let mut env = BTreeMap::new();
        env.insert("CORRAL_RUN_ID".to_owned(), "r2".to_owned());
        let mut exec = provider
            .exec(
                &sandbox.id,
                &ExecSpec {
                    argv: vec!["env".into()],
                    env,
                },
            )
            .await
            .expect("exec");
        let mut names = Vec::new();
        while let Some(line) = exec.output.recv().await {
            names.push(line.line.split('=').next().unwrap_or_default().to_owned());
        }
        names.sort();
        assert_eq!(
            names,
            ["CORRAL_RUN_ID", "CORRAL_SANDBOX_ID", "HOME", "LANG", "PATH"]
        );
        provider.kill(&sandbox.id).await.expect("kill");
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test]
    async fn another_provider_instance_lists_and_kills_what_the_first_left() {
        let (first, home) = provider();
        let sandbox = first.create(&spec("r3")).await.expect("create");
        let exec = first
            .exec(&sandbox.id, &argv(&["sh", "-c", "sleep 300 & sleep 300"]))
            .await
            .expect("exec");
        // The first owner forgets the execution, as a crashed spawner would.
        std::mem::forget(exec);
        let deadline = Instant::now() + Duration::from_secs(5);
        while LocalProvider::live_processes(&sandbox.id).len() < 2 {
            assert!(Instant::now() < deadline, "both sleeps never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let second = LocalProvider::new(&home).expect("second provider");
        let listed = second.list(&Labels::new()).await.expect("list");
        assert_eq!(
            listed.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            std::slice::from_ref(&sandbox.id)
        );
        assert_eq!(
            second.kill(&sandbox.id).await.expect("kill"),
            KillOutcome::Killed
        );
        assert!(
            LocalProvider::live_processes(&sandbox.id).is_empty(),
            "processes survived the kill"
        );
        assert!(second.list(&Labels::new()).await.expect("list").is_empty());
        assert_eq!(
            second.kill(&sandbox.id).await.expect("kill again"),
            KillOutcome::AlreadyGone
        );
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test]
    async fn terminate_kills_an_agent_that_ignores_sigterm_after_the_grace() {
        let (provider, home) = provider();
        let sandbox = provider.create(&spec("r4")).await.expect("create");
        let mut exec = provider
            .exec(
                &sandbox.id,
                &argv(&[
                    "sh",
                    "-c",
                    "trap '' TERM; echo ready; while true; do sleep 1; done",
                ]),
            )
            .await
            .expect("exec");
        assert_eq!(
            exec.output.recv().await.map(|l| l.line),
            Some("ready".into())
        );
        let started = Instant::now();
        let (status, escalated) = exec.process.terminate(Duration::from_millis(300)).await;
        assert!(escalated, "SIGTERM should have been ignored");
        assert_eq!(status, ExitStatus::Signal(libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_millis(1300));
        provider.kill(&sandbox.id).await.expect("kill");
        assert!(LocalProvider::live_processes(&sandbox.id).is_empty());
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test]
    async fn a_missing_program_is_an_invalid_request() {
        let (provider, home) = provider();
        let sandbox = provider.create(&spec("r5")).await.expect("create");
        let err = provider
            .exec(&sandbox.id, &argv(&["/no/such/agent"]))
            .await
            .err()
            .expect("should fail");
        assert!(err.to_string().contains("/no/such/agent"), "{err}");
        provider.kill(&sandbox.id).await.expect("kill");
        std::fs::remove_dir_all(home).ok();
    }
}
