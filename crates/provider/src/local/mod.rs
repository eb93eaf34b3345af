//! The local provider: sandboxes on this machine, each a directory under
//! `<home>/sandboxes/<id>/` (state in `sandbox.json`, the agent's files in
//! `work/`).
//!
//! With `isolation: namespaces` (the default) a sandbox is a set of Linux
//! namespaces made by bubblewrap ([`namespaces`]) and control groups
//! ([`cgroup`]): the agent sees its work directory (at `/work`), a private
//! `/tmp`, the system directories read-only and its own processes, nothing
//! of `CORRAL_HOME`, other sandboxes or the control plane. Killing it kills
//! the namespace's PID 1, so the kernel ends every process in it, however it
//! detached; pausing it freezes its control group. What kill relies on (the
//! state file, the init's pid pinned by its start time and PID-namespace
//! inode, the control-group paths) lives outside anything the agent can see
//! or write.
//!
//! With `isolation: none` a sandbox is plain process groups, found again by
//! the `CORRAL_SANDBOX_ID` marker in their environment, with rlimits: what
//! corral had before namespaces, kept for machines that cannot create them
//! (and for the API emulators). Every sandbox made so logs a warning.
//!
//! Either way it is node-local: the state on disk lets any process on this
//! machine (a restarted spawner, the reaper) list and kill what another
//! left, and no process on another machine can. Every sandbox carries the
//! [`LABEL_NODE`] label, and its id ends with the node id
//! ([`node_of_sandbox`]), so a reaper elsewhere knows whom to ask.

mod cgroup;
pub mod config;
mod namespaces;
mod procfs;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

pub use config::{Isolation, LocalConfig, Network};
pub use namespaces::SANDBOX_WORK;

use crate::{
    CreateSpec, ExecControl, ExecSpec, Execution, ExitStatus, Health, KillOutcome, LABEL_ISOLATION,
    LABEL_NODE, Labels, OutputLine, OutputStream, Process, Provider, ProviderError, SandboxInfo,
};
use cgroup::{Cgroups, SandboxGroups};
use config::Bind;

const STATE_FILE: &str = "sandbox.json";
const WORK_DIR: &str = "work";
/// Output lines longer than this are split.
const MAX_LINE: usize = 64 * 1024;
const ENV_MARKER: &str = "CORRAL_SANDBOX_ID";
/// `PATH` of an isolated agent: the system directories it can see.
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SANDBOX_ID_PREFIX: &str = "sbx-";
/// `sbx-` and 32 hex digits, then `-<node>`.
const NODE_OFFSET: usize = SANDBOX_ID_PREFIX.len() + 32 + 1;

/// Whether the process (a pid on this machine) is paused: stopped by a
/// signal (`T`) or frozen by its sandbox's control group. For tests and
/// benchmarks that check what pause did.
pub fn is_paused(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.state == 'T' || s.state == 't') || cgroup::frozen(pid)
}

/// Whether the process is alive (not gone, not a zombie).
pub fn is_alive(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.alive())
}

/// Live processes on this machine whose command line contains `needle`,
/// read from /proc (not from any bookkeeping of corral's). For tests and
/// diagnostics that check what is really running.
pub fn processes_with_cmdline(needle: &str) -> Vec<i32> {
    procfs::pids()
        .into_iter()
        .filter(|pid| is_alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    String::from_utf8_lossy(&raw)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The node a local sandbox id names (`sbx-<uuid>-<node>`), if any.
pub fn node_of_sandbox(sandbox_id: &str) -> Option<&str> {
    sandbox_id
        .strip_prefix(SANDBOX_ID_PREFIX)?
        .get(32..)?
        .strip_prefix('-')
        .filter(|node| !node.is_empty())
        .filter(|_| sandbox_id.len() > NODE_OFFSET)
}

/// Sandboxes on this machine. Cheap to clone.
#[derive(Clone)]
pub struct LocalProvider {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    config: LocalConfig,
    node: String,
    binds: Vec<Bind>,
    cgroups: Cgroups,
    /// This process is root: isolated agents run as `agent_uid`.
    as_root: bool,
    /// `PATH` of unisolated agents (this process's).
    host_path: String,
    /// The `corral-enter` helper every command of an isolated sandbox
    /// starts through (found at start: beside this program, else on `PATH`).
    enter: Option<PathBuf>,
    /// bubblewrap, by its full path (so it is started without a fork).
    bwrap: PathBuf,
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
    /// The process groups of the commands started in it.
    groups: Vec<Group>,
    /// Isolated: the namespace's PID 1, once it runs.
    #[serde(default)]
    init: Option<Init>,
    #[serde(default)]
    cgroups: SandboxGroups,
    #[serde(default)]
    isolated: bool,
    #[serde(default)]
    network: Network,
}

/// A process group and its leader's start time (clock ticks since boot),
/// which tells a live leader from a later process that reused its pid.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Group {
    pgid: i32,
    start_time: u64,
}

/// The PID 1 of an isolated sandbox, pinned three ways: a kill never
/// reaches a process that merely reused the number.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Init {
    pid: i32,
    start_time: u64,
    pid_namespace: u64,
}

impl Init {
    fn alive(&self) -> bool {
        procfs::is_same_process(self.pid, self.start_time)
            && procfs::pid_namespace(self.pid) == Some(self.pid_namespace)
    }
}

impl LocalProvider {
    /// A provider keeping its sandboxes under `<home>/sandboxes`. With
    /// `isolation: namespaces` it checks, once, that this machine can make
    /// them, and refuses with an error naming `local.isolation` otherwise.
    pub fn new(home: &Path, config: &LocalConfig) -> Result<LocalProvider, ProviderError> {
        let root = home.join("sandboxes");
        std::fs::create_dir_all(&root).map_err(|err| {
            ProviderError::Invalid(format!(
                "cannot use sandbox directory {}: {err}",
                root.display()
            ))
        })?;
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let tag = tag_of(&root);
        let host_path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned());
        let inner = Inner {
            root,
            node: config.node_id(),
            binds: config.parsed_binds()?,
            cgroups: match config.isolation {
                Isolation::Namespaces => Cgroups::detect(&tag),
                Isolation::None => Cgroups::Unavailable("isolation: none".into()),
            },
            config: config.clone(),
            as_root,
            host_path: host_path.clone(),
            enter: find_enter(&host_path),
            bwrap: resolve("bwrap", SANDBOX_PATH),
            state_lock: Mutex::new(()),
            blocking_slots: tokio::sync::Semaphore::new(4),
        };
        if let Some(missing) = inner.binds.iter().find(|b| !b.host.exists()) {
            return Err(ProviderError::Invalid(format!(
                "local.binds: {} does not exist",
                missing.host.display()
            )));
        }
        if config.isolation == Isolation::Namespaces {
            inner.check_isolation()?;
            if let Cgroups::Unavailable(why) = &inner.cgroups {
                tracing::warn!(reason = %why, "no control groups: sandbox limits are rlimits only and pause stops processes one by one");
            }
        } else {
            tracing::warn!(
                "local sandboxes are not isolated (local.isolation: none): agents can see this machine and the control plane"
            );
        }
        Ok(LocalProvider {
            inner: Arc::new(inner),
        })
    }

    /// The sandbox's working directory on this machine (`/work` inside an
    /// isolated sandbox; the agent's `HOME` and cwd).
    pub fn work_dir(&self, sandbox_id: &str) -> PathBuf {
        self.inner.work_dir(sandbox_id)
    }

    /// Kills every sandbox under this directory and then releases its
    /// control groups: for tests and benches that give the directory up.
    /// Returns how many sandboxes there were and the kills that failed.
    pub async fn kill_all(&self) -> Result<(usize, Vec<(String, ProviderError)>), ProviderError> {
        let left = self.list(&Labels::new()).await?;
        let mut failed = Vec::new();
        for sandbox in &left {
            if let Err(err) = self.kill(&sandbox.id).await {
                failed.push((sandbox.id.clone(), err));
            }
        }
        self.release_control_groups();
        Ok((left.len(), failed))
    }

    /// Removes what this sandbox directory left in the control-group
    /// hierarchy once it holds no sandbox (its empty parent groups): for
    /// tests and uninstalls that give the directory up.
    pub fn release_control_groups(&self) {
        let root = self.inner.root.clone();
        self.inner.cgroups.collect(|id| root.join(id).exists());
        self.inner.cgroups.remove_parents();
    }

    /// Process ids (on this machine) of every live process of an
    /// unisolated sandbox, found by its environment marker. For tests and
    /// diagnostics: it scans /proc.
    pub fn live_processes(sandbox_id: &str) -> Vec<i32> {
        marked(sandbox_id)
    }

    /// Process ids (on this machine) of every live process of the sandbox:
    /// the members of its PID namespace when isolated (its init included,
    /// not the `corral-enter` waiting outside for a command), its marked
    /// processes otherwise. For tests and diagnostics.
    pub fn processes(&self, sandbox_id: &str) -> Vec<i32> {
        let Ok(state) = self.inner.read_state(sandbox_id) else {
            return marked(sandbox_id);
        };
        if !state.isolated {
            return marked(sandbox_id);
        }
        match state.init.filter(Init::alive) {
            Some(init) => procfs::in_namespace(init.pid_namespace),
            None => state.cgroups.members(),
        }
    }

    /// How often a process of the sandbox failed to fork because the
    /// sandbox reached `local.pids_max` (the kernel's count); `None` without
    /// a `pids` control group. For tests and diagnostics.
    pub fn pids_limit_hits(&self, sandbox_id: &str) -> Option<u64> {
        self.inner
            .read_state(sandbox_id)
            .ok()?
            .cgroups
            .pids_limit_hits()
    }

    /// The pid on this machine of the sandbox's process whose pid inside
    /// the sandbox is `inner_pid` (what `$!` gave the agent).
    pub fn host_pid(&self, sandbox_id: &str, inner_pid: i32) -> Option<i32> {
        let state = self.inner.read_state(sandbox_id).ok()?;
        if !state.isolated {
            return Some(inner_pid);
        }
        let init = state.init?;
        procfs::in_namespace(init.pid_namespace)
            .into_iter()
            .find(|pid| procfs::ns_pid(*pid) == Some(inner_pid))
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

    /// Starts the namespace's PID 1 of an isolated sandbox and records it.
    async fn start_init(&self, state: &SandboxState) -> Result<Init, ProviderError> {
        let inner = &self.inner;
        let work = inner.work_dir(&state.id);
        let args = namespaces::init_args(&namespaces::InitSpec {
            sandbox_id: &state.id,
            work: &work,
            binds: &inner.binds,
            network: state.network,
            tmp_size_mib: inner.config.tmp_size_mib,
            as_root: inner.as_root,
        });
        // bubblewrap reads its options from stdin before it makes anything:
        // moved into the sandbox's groups before they are written, all it
        // forks is inside them (and no helper exec is spent on joining).
        let mut command = tokio::process::Command::new(&inner.bwrap);
        command
            .args(namespaces::INIT_ARGS)
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|err| ProviderError::Failed(format!("cannot start bwrap: {err}")))?;
        let failed = |why: String| ProviderError::Failed(format!("sandbox namespace: {why}"));
        let outer = pid_of(&child)?;
        if let Err(err) = state.cgroups.admit(outer) {
            let _ = child.start_kill();
            return Err(failed(format!("cannot join its control groups: {err}")));
        }
        // A failed write means bwrap already exited: what it printed says
        // why, below.
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&args).await;
        }
        let mut stdout = child.stdout.take().expect("stdout should be piped");
        let mut stderr = child.stderr.take().expect("stderr should be piped");
        let info = tokio::time::timeout(Duration::from_secs(10), read_info(&mut stdout)).await;
        let child_pid = match info {
            Ok(Some(pid)) => pid,
            outcome => {
                let _ = child.start_kill();
                let mut text = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut text))
                        .await;
                let why = if outcome.is_err() {
                    "bwrap did not report its namespace within 10 s".to_owned()
                } else {
                    // bwrap's own complaint is its first line.
                    text.lines().next().unwrap_or("bwrap failed").to_owned()
                };
                return Err(failed(why));
            }
        };
        // The outer bwrap waits for the namespace; a task of its own reaps
        // it when it ends (through its pidfd: a dropped handle would join
        // tokio's orphan queue, which every SIGCHLD walks with one waitpid
        // per live sandbox, and a burst of stops then costs the square of
        // the sandboxes). It is not part of the sandbox: out of its groups,
        // so that, left unreaped after a crash of this process, it never
        // keeps them from being removed.
        state.cgroups.release(outer);
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        // bwrap reports the pid before the namespace's mounts are done; the
        // sandbox is ready once PID 2 runs `sleep` (a command entered
        // earlier could find an unfinished root).
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while !procfs::children(child_pid)
                .into_iter()
                .any(procfs::is_init_sleep)
            {
                if procfs::stat(child_pid).is_none() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            true
        })
        .await;
        if ready != Ok(true) {
            procfs::signal(child_pid, libc::SIGKILL);
            return Err(failed("the namespace was not ready within 10 s".into()));
        }
        let stat = procfs::stat(child_pid).ok_or_else(|| failed("init exited at once".into()))?;
        let pid_namespace = procfs::pid_namespace(child_pid)
            .ok_or_else(|| failed("init's PID namespace is unreadable".into()))?;
        let own = procfs::pid_namespace(std::process::id() as i32);
        if own == Some(pid_namespace) {
            return Err(failed("init is not in a PID namespace of its own".into()));
        }
        Ok(Init {
            pid: child_pid,
            start_time: stat.start_time,
            pid_namespace,
        })
    }

    async fn exec_isolated(
        &self,
        state: &SandboxState,
        spec: &ExecSpec,
    ) -> Result<(tokio::process::Child, Box<dyn ExecControl>, i32), ProviderError> {
        let inner = &self.inner;
        let Some(init) = state.init.filter(Init::alive) else {
            return Err(ProviderError::NotFound(state.id.clone()));
        };
        let program = &spec.argv[0];
        if !inner.visible_program(&state.id, program) {
            return Err(ProviderError::Invalid(format!(
                "cannot start {program:?}: no such program in the sandbox (it sees {SANDBOX_PATH}, \
                 {SANDBOX_WORK} and the configured local.binds)"
            )));
        }
        let rlimits =
            namespaces::rlimits(state.memory_mib, state.cpu_secs, inner.config.file_size_mib);
        let user = inner
            .as_root
            .then_some((inner.config.agent_uid, inner.config.agent_gid));
        let mut command = tokio::process::Command::new(inner.enter()?);
        command
            .args(namespaces::join(&state.cgroups.procs_files()))
            .args(namespaces::enter(&namespaces::EnterSpec {
                init_pid: init.pid,
                network: state.network,
                user,
                rlimits: &rlimits,
                argv: &spec.argv,
            }))
            .current_dir("/");
        agent_environment(
            &mut command,
            SANDBOX_PATH,
            Path::new(SANDBOX_WORK),
            spec,
            &state.id,
        );
        let child = command
            .spawn()
            .map_err(|err| ProviderError::Failed(format!("cannot enter the sandbox: {err}")))?;
        let pgid = pid_of(&child)?;
        Ok((child, Box::new(SessionControl { wrapper: pgid }), pgid))
    }

    fn exec_unisolated(
        &self,
        state: &SandboxState,
        spec: &ExecSpec,
    ) -> Result<(tokio::process::Child, Box<dyn ExecControl>, i32), ProviderError> {
        let inner = &self.inner;
        let work = inner.work_dir(&state.id);
        // An absolute program path lets std use posix_spawn (a changed PATH
        // with a bare name forces fork, which copies this whole process).
        let program = resolve(&spec.argv[0], &inner.host_path);
        let mut command = tokio::process::Command::new(&program);
        command.args(&spec.argv[1..]).current_dir(&work);
        agent_environment(&mut command, &inner.host_path, &work, spec, &state.id);
        let child = command
            .spawn()
            .map_err(|err| ProviderError::Invalid(format!("cannot start {program:?}: {err}")))?;
        let pgid = pid_of(&child)?;
        // Limits are applied right after the spawn (posix_spawn cannot set
        // them): the agent runs unlimited for the few microseconds between
        // its exec and this call; children it forks later inherit them.
        apply_limits(
            pgid,
            state.memory_mib,
            state.cpu_secs,
            inner.config.file_size_mib,
        );
        Ok((child, Box::new(GroupControl { pgid }), pgid))
    }
}

/// What every agent command gets: only the run's environment, the
/// `CORRAL_*` variables, `PATH`, `HOME` and `LANG`; no stdin; its output
/// piped; a process group of its own (started with posix_spawn: no fork of
/// this large, multi-threaded process).
fn agent_environment(
    command: &mut tokio::process::Command,
    path: &str,
    home: &Path,
    spec: &ExecSpec,
    sandbox_id: &str,
) {
    command
        .env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .envs(&spec.env)
        .env(ENV_MARKER, sandbox_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
}

fn pid_of(child: &tokio::process::Child) -> Result<i32, ProviderError> {
    child
        .id()
        .map(|pid| pid as i32)
        .ok_or_else(|| ProviderError::Failed("child exited before it had a pid".into()))
}

/// Reads bwrap's `--info-fd` JSON up to its closing brace; the pid of the
/// namespace's PID 1 as this machine sees it.
async fn read_info(stdout: &mut tokio::process::ChildStdout) -> Option<i32> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(rename = "child-pid")]
        child_pid: i32,
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stdout.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(info) = serde_json::from_slice::<Info>(&buf) {
            return Some(info.child_pid);
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    }
}

impl Inner {
    fn enter(&self) -> Result<&Path, ProviderError> {
        self.enter.as_deref().ok_or_else(|| {
            ProviderError::Failed(format!("{} was not found at start", namespaces::ENTER))
        })
    }

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

    /// Whether `program` (a bare name searched in the sandbox's `PATH`, a
    /// path relative to its work directory, or an absolute path) names an
    /// executable the sandbox can see: the host path behind it is checked,
    /// so a missing program is an invalid request, not exit 127.
    fn visible_program(&self, sandbox_id: &str, program: &str) -> bool {
        if !program.contains('/') {
            return namespaces::on_path(program, SANDBOX_PATH);
        }
        let path = Path::new(program);
        let work = self.work_dir(sandbox_id);
        if path.is_relative() {
            return namespaces::executable(&work.join(path));
        }
        if let Ok(rest) = path.strip_prefix(SANDBOX_WORK) {
            return namespaces::executable(&work.join(rest));
        }
        for bind in &self.binds {
            if let Ok(rest) = path.strip_prefix(&bind.sandbox) {
                return namespaces::executable(&bind.host.join(rest));
            }
        }
        let system = [
            "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
        ];
        system.iter().any(|dir| path.starts_with(dir)) && namespaces::executable(path)
    }

    /// Makes one throwaway namespace the way sandboxes are made, so a
    /// machine that cannot is found at start, not at the first run.
    fn check_isolation(&self) -> Result<(), ProviderError> {
        let refuse = |why: String| {
            ProviderError::Invalid(format!(
                "local sandboxes cannot be isolated on this machine: {why}. Install bubblewrap \
                 (Debian: apt-get install bubblewrap) and run as root, or set local.isolation: none \
                 (CORRAL_LOCAL__ISOLATION=none) to accept that agents see this machine"
            ))
        };
        if !self.as_root {
            return Err(refuse(
                "namespaces with an unprivileged agent user need root".into(),
            ));
        }
        for tool in namespaces::TOOLS {
            if !namespaces::on_path(tool, SANDBOX_PATH) {
                return Err(refuse(format!("{tool} is not installed")));
            }
        }
        if self.enter.is_none() {
            return Err(refuse(format!(
                "{} (built with the spawner: cargo build --bins) is neither beside this program \
                 nor on PATH",
                namespaces::ENTER
            )));
        }
        let output = std::process::Command::new("bwrap")
            .args([
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--cap-drop",
                "ALL",
                "--proc",
                "/proc",
            ])
            .args(namespaces::system())
            .args(["--", "true"])
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .stdin(Stdio::null())
            .output()
            .map_err(|err| refuse(format!("bwrap: {err}")))?;
        if !output.status.success() {
            return Err(refuse(format!(
                "bwrap failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
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
                // No state file: gone, or a create that crashed before
                // writing it (then nothing of an isolated sandbox ran yet:
                // its state is written before its init starts).
                let strays = marked(sandbox_id);
                kill_marked(sandbox_id);
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
        if state.isolated {
            // The namespace's PID 1 takes every process of the namespace
            // with it; the control groups catch what was entered but not
            // yet inside (a command starting right now).
            if let Some(init) = state.init.filter(Init::alive) {
                procfs::signal(init.pid, libc::SIGKILL);
            }
            self.signal_groups(&state, libc::SIGKILL);
            let _ = state.cgroups.freeze(false);
            let emptied = state.cgroups.kill_all(Duration::from_secs(2));
            if let Some(init) = state.init {
                procfs::wait_until(Duration::from_secs(2), || !init.alive());
            }
            if !emptied {
                tracing::warn!(
                    sandbox_id,
                    "sandbox control group still has members after SIGKILL"
                );
            }
            // A straggler not yet reaped (its parent frozen or gone) keeps a
            // group busy: what is left is collected by a later `list`.
            state.cgroups.remove(Duration::from_millis(20));
        } else {
            self.signal_groups(&state, libc::SIGKILL);
            // A paused group must be continued for SIGKILL to finish it promptly.
            self.signal_groups(&state, libc::SIGCONT);
            for group in &state.groups {
                wait_group_gone(group.pgid, Duration::from_secs(1));
            }
            // What left the groups (setsid, a double fork) but kept the
            // marker; a process that dropped its environment is lost to an
            // unisolated sandbox.
            kill_marked(sandbox_id);
        }
        std::fs::remove_dir_all(&dir).map_err(|err| io_failed(&dir, err))?;
        Ok(KillOutcome::Killed)
    }

    /// Makes the directories, the control groups and the state of a new
    /// sandbox (not yet its namespace: see `LocalProvider::start_init`).
    fn create(&self, spec: &CreateSpec) -> Result<SandboxState, ProviderError> {
        let id = format!(
            "{SANDBOX_ID_PREFIX}{}-{}",
            uuid::Uuid::now_v7().simple(),
            self.node
        );
        let dir = self.dir(&id)?;
        let work = dir.join(WORK_DIR);
        std::fs::create_dir_all(&work).map_err(|err| io_failed(&work, err))?;
        let isolated = self.config.isolation == Isolation::Namespaces;
        if isolated && self.as_root {
            let (uid, gid) = (self.config.agent_uid, self.config.agent_gid);
            std::os::unix::fs::chown(&work, Some(uid), Some(gid))
                .map_err(|err| io_failed(&work, err))?;
        }
        let cgroups = if isolated {
            let limits = cgroup::Limits {
                memory_bytes: spec.memory_mib.saturating_mul(1 << 20),
                pids: self.config.pids_max,
                cpu_millis: self.config.cpu_millis,
            };
            self.cgroups.create(&id, limits).map_err(|err| {
                let _ = std::fs::remove_dir_all(&dir);
                ProviderError::Failed(format!("sandbox control group: {err}"))
            })?
        } else {
            SandboxGroups::default()
        };
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_NODE.into(), self.node.clone());
        if !isolated {
            labels.insert(LABEL_ISOLATION.into(), "none".into());
        }
        let state = SandboxState {
            id,
            labels,
            created_at_ms: procfs::now_ms(),
            memory_mib: spec.memory_mib,
            cpu_secs: spec.cpu_secs,
            paused: false,
            groups: Vec::new(),
            init: None,
            cgroups,
            isolated,
            network: spec.network.unwrap_or(self.config.network),
        };
        if let Err(err) = self.write_state(&state) {
            state.cgroups.remove(Duration::ZERO);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
        Ok(state)
    }

    /// Signals every live group of the sandbox; returns how many it reached.
    fn signal_groups(&self, state: &SandboxState, signal: i32) -> usize {
        let mut reached = 0;
        for group in &state.groups {
            if group_is_ours(group, &state.id) && procfs::killpg(group.pgid, signal) {
                reached += 1;
            }
        }
        reached
    }

    /// Stops or continues every process of the sandbox: its control group's
    /// freezer when there is one (a frozen process cannot tell), else
    /// SIGSTOP/SIGCONT to every process of its PID namespace and to the
    /// commands' wrappers (which would otherwise stop themselves when their
    /// child does, and stay stopped).
    fn freeze(&self, state: &SandboxState, frozen: bool) -> Result<(), ProviderError> {
        if state.isolated {
            let froze = state
                .cgroups
                .freeze(frozen)
                .map_err(|err| ProviderError::Failed(format!("sandbox freezer: {err}")))?;
            if froze {
                return Ok(());
            }
        }
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        if let Some(init) = state.init.filter(Init::alive) {
            for pid in procfs::in_namespace(init.pid_namespace) {
                procfs::signal(pid, signal);
            }
        }
        self.signal_groups(state, signal);
        if !state.isolated {
            // What left the groups but kept the marker.
            for pid in marked(&state.id) {
                procfs::signal(pid, signal);
            }
        }
        Ok(())
    }
}

/// A short, stable tag of a sandbox directory (FNV-1a of its path), naming
/// its control groups' parent.
fn tag_of(root: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in root.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", hash as u32)
}

fn io_failed(path: &Path, err: io::Error) -> ProviderError {
    ProviderError::Failed(format!("{}: {err}", path.display()))
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

/// Live processes carrying the sandbox's marker (unisolated sandboxes).
fn marked(sandbox_id: &str) -> Vec<i32> {
    procfs::pids()
        .into_iter()
        .filter(|pid| procfs::stat(*pid).is_some_and(|s| s.alive()))
        .filter(|pid| has_marker(*pid, sandbox_id))
        .collect()
}

/// SIGKILLs every live process carrying the sandbox's marker, again while
/// any is left (a fork racing the scan), for a second at most.
fn kill_marked(sandbox_id: &str) {
    procfs::wait_until(Duration::from_secs(1), || {
        let pids = marked(sandbox_id);
        for pid in &pids {
            procfs::signal(*pid, libc::SIGKILL);
        }
        pids.is_empty()
    });
}

/// Whether signalling `group.pgid` reaches this sandbox's processes and no
/// one else's: its leader is alive with the recorded start time, or, when the
/// leader is gone, some remaining member carries the sandbox's marker.
fn group_is_ours(group: &Group, sandbox_id: &str) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(-group.pgid, 0) } != 0 {
        return false; // an empty group: nothing to signal, no /proc scan
    }
    match procfs::stat(group.pgid) {
        Some(stat) if stat.start_time == group.start_time && stat.pgrp == group.pgid => true,
        _ => procfs::in_group(group.pgid)
            .into_iter()
            .any(|pid| has_marker(pid, sandbox_id)),
    }
}

/// Waits until no process of the group is left (zombies aside), up to `limit`.
fn wait_group_gone(pgid: i32, limit: Duration) {
    procfs::wait_until(limit, || {
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(-pgid, 0) } == 0;
        !alive || procfs::in_group(pgid).is_empty()
    });
}

/// The `corral-enter` helper: beside this program (or, for a test binary
/// under `deps/`, one directory up), else on `path`.
fn find_enter(path: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let beside = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(namespaces::ENTER))
        .find(|candidate| namespaces::executable(candidate));
    beside.or_else(|| {
        let found = resolve(namespaces::ENTER, path);
        namespaces::executable(&found).then_some(found)
    })
}

/// `program` as an absolute path, searched in `path` when it is a bare name.
fn resolve(program: &str, path: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| namespaces::executable(candidate))
        .unwrap_or_else(|| PathBuf::from(program))
}

fn apply_limits(pid: i32, memory_mib: u64, cpu_secs: u64, file_size_mib: u64) {
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
    if file_size_mib > 0 {
        let bytes = file_size_mib.saturating_mul(1024 * 1024);
        set(libc::RLIMIT_FSIZE, bytes, bytes);
    }
    set(libc::RLIMIT_CORE, 0, 0);
}

/// Signals an unisolated command: its process group.
struct GroupControl {
    pgid: i32,
}

impl ExecControl for GroupControl {
    fn interrupt(&self) {
        procfs::killpg(self.pgid, libc::SIGTERM);
    }

    fn kill(&self) {
        procfs::killpg(self.pgid, libc::SIGKILL);
    }
}

/// Signals an isolated command. The wrapper (`corral-enter`) stays
/// outside the sandbox's PID namespace waiting for the command, which it
/// made a session and process group of its own: SIGTERM goes to that group
/// only (a dying wrapper would report the command ended while it still
/// handles the signal); SIGKILL to both.
struct SessionControl {
    wrapper: i32,
}

impl SessionControl {
    fn command_group(&self) -> Option<i32> {
        procfs::children(self.wrapper).into_iter().next()
    }
}

impl ExecControl for SessionControl {
    fn interrupt(&self) {
        match self.command_group() {
            Some(pgid) => procfs::killpg(pgid, libc::SIGTERM),
            None => procfs::killpg(self.wrapper, libc::SIGTERM),
        };
    }

    fn kill(&self) {
        if let Some(pgid) = self.command_group() {
            procfs::killpg(pgid, libc::SIGKILL);
        }
        procfs::killpg(self.wrapper, libc::SIGKILL);
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

    fn node(&self) -> Option<&str> {
        Some(&self.inner.node)
    }

    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        let spec = spec.clone();
        let state = self.blocking(move |inner| inner.create(&spec)).await?;
        if !state.isolated {
            // Labelled `corral.isolation=none`: the spawner warns for the
            // run and records it.
            return Ok(info(&state));
        }
        match self.start_init(&state).await {
            Ok(init) => {
                let recorded = self.inner.update_state(&state.id, |s| s.init = Some(init));
                if let Err(err) = recorded {
                    procfs::signal(init.pid, libc::SIGKILL);
                    return Err(err);
                }
                Ok(info(&state))
            }
            Err(err) => {
                let id = state.id.clone();
                let _ = self.blocking(move |inner| inner.kill(&id)).await;
                Err(err)
            }
        }
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Execution, ProviderError> {
        let state = self.inner.read_state(sandbox_id)?;
        if spec.argv.is_empty() {
            return Err(ProviderError::Invalid("empty argv".into()));
        }
        let (mut child, control, pgid) = if state.isolated {
            self.exec_isolated(&state, spec).await?
        } else {
            self.exec_unisolated(&state, spec)?
        };
        let group = Group {
            pgid,
            start_time: procfs::stat(pgid).map(|s| s.start_time).unwrap_or(0),
        };
        if let Err(err) = self
            .inner
            .update_state(sandbox_id, |s| s.groups.push(group))
        {
            // The sandbox was killed while this command started: end it too.
            control.kill();
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
            process: Process::new(exit_rx, control).with_pid(pgid),
        })
    }

    async fn kill(&self, sandbox_id: &str) -> Result<KillOutcome, ProviderError> {
        let sandbox_id = sandbox_id.to_owned();
        self.blocking(move |inner| inner.kill(&sandbox_id)).await
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let sandbox_id = sandbox_id.to_owned();
        self.blocking(move |inner| {
            let state = inner.update_state(&sandbox_id, |s| s.paused = true)?;
            inner.freeze(&state, true)
        })
        .await
    }

    async fn resume(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let sandbox_id = sandbox_id.to_owned();
        self.blocking(move |inner| {
            let state = inner.update_state(&sandbox_id, |s| s.paused = false)?;
            inner.freeze(&state, false)
        })
        .await
    }

    async fn probe(&self, sandbox_id: &str) -> Result<Health, ProviderError> {
        match self.inner.read_state(sandbox_id) {
            Ok(_) if !self.work_dir(sandbox_id).is_dir() => {
                Ok(Health::Gone("sandbox directory is missing".into()))
            }
            Ok(state) if state.isolated && !state.init.is_some_and(|i| i.alive()) => Ok(
                Health::Gone("the sandbox's namespace is gone (its PID 1 died)".into()),
            ),
            Ok(_) => Ok(Health::Healthy),
            Err(ProviderError::NotFound(_)) => Ok(Health::Gone("sandbox does not exist".into())),
            Err(err) => Err(err),
        }
    }

    async fn list(&self, labels: &Labels) -> Result<Vec<SandboxInfo>, ProviderError> {
        let root = self.inner.root.clone();
        self.inner.cgroups.collect(|id| root.join(id).exists());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn provider() -> (LocalProvider, PathBuf) {
        let home =
            std::env::temp_dir().join(format!("corral-local-{}", uuid::Uuid::now_v7().simple()));
        let provider = LocalProvider::new(&home, &LocalConfig::default()).expect("provider");
        (provider, home)
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
        provider.release_control_groups();
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
        provider.release_control_groups();
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test]
    async fn another_provider_instance_lists_and_kills_what_the_first_left() {
        let (first, home) = provider();
        let sandbox = first.create(&spec("r3")).await.expect("create");
        let exec = first
            .exec(
                &sandbox.id,
                &argv(&["sh", "-c", "setsid sleep 3031 & sleep 3031"]),
            )
            .await
            .expect("exec");
        // The first owner forgets the execution, as a crashed spawner would.
        std::mem::forget(exec);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Its init, the init's sleep, the agent's shell and its two sleeps.
        while first.processes(&sandbox.id).len() < 5 {
            assert!(Instant::now() < deadline, "both sleeps never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let second = LocalProvider::new(&home, &LocalConfig::default()).expect("second provider");
        let listed = second.list(&Labels::new()).await.expect("list");
        assert_eq!(
            listed.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            std::slice::from_ref(&sandbox.id)
        );
        assert_eq!(
            second.kill(&sandbox.id).await.expect("kill"),
            KillOutcome::Killed
        );
        assert_eq!(
            processes_with_cmdline("sleep 3031"),
            Vec::<i32>::new(),
            "processes survived the kill"
        );
        assert!(second.list(&Labels::new()).await.expect("list").is_empty());
        assert_eq!(
            second.kill(&sandbox.id).await.expect("kill again"),
            KillOutcome::AlreadyGone
        );
        second.release_control_groups();
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
        provider.release_control_groups();
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sandboxes_created_at_once_all_start() {
        let (provider, home) = provider();
        let creates = (0..16).map(|i| {
            let provider = provider.clone();
            async move { provider.create(&spec(&format!("c{i}"))).await }
        });
        let results = futures::future::join_all(creates).await;
        for result in &results {
            if let Err(err) = result {
                panic!("create failed: {err}");
            }
        }
        for sandbox in results.into_iter().flatten() {
            provider.kill(&sandbox.id).await.expect("kill");
        }
        provider.release_control_groups();
        std::fs::remove_dir_all(home).ok();
    }

    #[tokio::test]
    async fn the_init_and_what_it_forks_are_in_the_sandbox_groups_and_the_outer_bwrap_is_not() {
        let (provider, home) = provider();
        let sandbox = provider.create(&spec("g1")).await.expect("create");
        let state = provider.inner.read_state(&sandbox.id).expect("state");
        if state.cgroups.procs_files().is_empty() {
            eprintln!("no control groups on this machine: nothing to check");
        } else {
            let init = state.init.expect("an init").pid;
            let members = state.cgroups.members();
            assert!(members.contains(&init), "init {init} in {members:?}");
            let sleep = procfs::children(init)
                .into_iter()
                .find(|pid| procfs::is_init_sleep(*pid))
                .expect("the init's sleep");
            assert!(members.contains(&sleep), "sleep {sleep} in {members:?}");
            let status = std::fs::read_to_string(format!("/proc/{init}/status")).expect("status");
            let outer: i32 = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|p| p.trim().parse().ok())
                .expect("init's parent");
            assert!(!members.contains(&outer), "outer bwrap {outer} left them");
        }
        provider.kill(&sandbox.id).await.expect("kill");
        provider.release_control_groups();
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
        provider.release_control_groups();
        std::fs::remove_dir_all(home).ok();
    }
}
