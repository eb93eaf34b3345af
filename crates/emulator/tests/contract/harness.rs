//! The harness of the provider contract: one [`Harness`] per test, holding
//! a provider behind `Arc<dyn Provider>` (local, or E2B or Daytona against
//! its emulator), what that provider can and cannot do
//! ([`Capabilities`]), and, for a remote provider, the emulator behind it
//! ([`Emulator`]) so that a test can inject faults and expire sandboxes.
//!
//! Each harness owns a fresh home directory; dropping it kills every
//! sandbox it still holds, so a test that fails half-way leaves no process
//! behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_emulator::{DaytonaEmulator, E2bEmulator, Faults};
use corral_provider::{
    CreateSpec, DaytonaConfig, DaytonaProvider, E2bConfig, E2bProvider, ExecSpec, ExitStatus,
    LABEL_CREATE, LABEL_DEPLOYMENT, LABEL_NODE, LABEL_RUN_ID, Labels, LocalConfig, LocalProvider,
    OutputLine, OutputStream, Provider, ProviderError,
};
use tempfile::TempDir;

pub const SIGKILL: i32 = libc::SIGKILL;

/// What a provider does where providers legitimately differ. A test that
/// depends on one of these asserts each variant exactly.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// Stderr arrives as [`OutputStream::Stderr`]. Daytona's session log
    /// does not tell the streams apart: everything is stdout.
    pub separates_stderr: bool,
    /// How a command whose program does not exist is reported.
    pub missing_program: MissingProgram,
    /// `terminate` sends the command SIGTERM and SIGKILL only after the
    /// grace. Daytona cannot signal one command: interrupting it deletes
    /// its session, which SIGKILLs it at once.
    pub delivers_sigterm: bool,
    /// Labels the provider adds to every sandbox besides the spec's.
    pub added_labels: &'static [&'static str],
}

/// How a missing program is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingProgram {
    /// The shell runs it and exits 127 with its complaint in the output
    /// (the remote APIs run commands through a shell).
    Exits127,
    /// `exec` refuses it as an invalid request naming the program (the
    /// local provider checks what the sandbox can see before it starts).
    RefusedAtExec,
}

/// What a remote provider's emulator lets a test do to it.
pub trait Emulator: Send + Sync {
    fn faults(&self) -> &Faults;
    /// As if the sandbox's timeout passed now.
    fn expire(&self, sandbox_id: &str);
    /// Ids of the live sandboxes.
    fn sandbox_ids(&self) -> Vec<String>;
    /// Creates that succeeded server-side, lost answers included.
    fn created(&self) -> usize;
    /// Caps the page size of the list endpoint.
    fn set_page_size(&self, n: usize);
}

impl Emulator for E2bEmulator {
    fn faults(&self) -> &Faults {
        E2bEmulator::faults(self)
    }
    fn expire(&self, sandbox_id: &str) {
        E2bEmulator::expire(self, sandbox_id)
    }
    fn sandbox_ids(&self) -> Vec<String> {
        E2bEmulator::sandbox_ids(self)
    }
    fn created(&self) -> usize {
        E2bEmulator::created(self)
    }
    fn set_page_size(&self, n: usize) {
        E2bEmulator::set_page_size(self, n)
    }
}

impl Emulator for DaytonaEmulator {
    fn faults(&self) -> &Faults {
        DaytonaEmulator::faults(self)
    }
    fn expire(&self, sandbox_id: &str) {
        DaytonaEmulator::expire(self, sandbox_id)
    }
    fn sandbox_ids(&self) -> Vec<String> {
        DaytonaEmulator::sandbox_ids(self)
    }
    fn created(&self) -> usize {
        DaytonaEmulator::created(self)
    }
    fn set_page_size(&self, n: usize) {
        DaytonaEmulator::set_page_size(self, n)
    }
}

enum Backend {
    Local(LocalBackend),
    E2b(E2bEmulator),
    Daytona(DaytonaEmulator),
}

/// The local provider's home and settings, to make a second instance.
struct LocalBackend {
    provider: LocalProvider,
    home: std::path::PathBuf,
    config: LocalConfig,
}

impl Drop for LocalBackend {
    /// Kills what the test left through the provider itself, on a runtime
    /// of its own (the test's may be unwinding, and a drop cannot await).
    fn drop(&mut self) {
        let provider = self.provider.clone();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a cleanup runtime should build");
                runtime.block_on(async {
                    for sandbox in provider.list(&Labels::new()).await.unwrap_or_default() {
                        if let Err(err) = provider.kill(&sandbox.id).await {
                            eprintln!("cleanup: kill {} failed: {err}", sandbox.id);
                        }
                    }
                });
                provider.release_control_groups();
            });
        });
    }
}

/// A provider under test. Fields drop in order: the backend (killing what
/// is left) before the home.
pub struct Harness {
    pub provider: Arc<dyn Provider>,
    pub caps: Capabilities,
    backend: Backend,
    _home: TempDir,
}

/// The local provider as deployed: namespaces (bubblewrap) and control
/// groups. It needs root and bubblewrap, as the spawner does.
pub async fn local_harness() -> Harness {
    let home = tempfile::tempdir().expect("temp home");
    let config = LocalConfig::default();
    let provider = LocalProvider::new(home.path(), &config).expect("local provider");
    Harness {
        provider: Arc::new(provider.clone()),
        caps: Capabilities {
            separates_stderr: true,
            missing_program: MissingProgram::RefusedAtExec,
            delivers_sigterm: true,
            added_labels: &[LABEL_NODE],
        },
        backend: Backend::Local(LocalBackend {
            provider,
            home: home.path().to_owned(),
            config,
        }),
        _home: home,
    }
}

pub async fn e2b_harness() -> Harness {
    let home = tempfile::tempdir().expect("temp home");
    let emulator = E2bEmulator::start(home.path())
        .await
        .expect("emulator starts");
    let provider = E2bProvider::new(e2b_config(&emulator)).expect("provider");
    Harness {
        provider: Arc::new(provider),
        caps: Capabilities {
            separates_stderr: true,
            missing_program: MissingProgram::Exits127,
            delivers_sigterm: true,
            added_labels: &[LABEL_CREATE],
        },
        backend: Backend::E2b(emulator),
        _home: home,
    }
}

pub async fn daytona_harness() -> Harness {
    let home = tempfile::tempdir().expect("temp home");
    let emulator = DaytonaEmulator::start(home.path())
        .await
        .expect("emulator starts");
    let provider = DaytonaProvider::new(daytona_config(&emulator)).expect("provider");
    Harness {
        provider: Arc::new(provider),
        caps: Capabilities {
            separates_stderr: false,
            missing_program: MissingProgram::Exits127,
            delivers_sigterm: false,
            added_labels: &[LABEL_CREATE],
        },
        backend: Backend::Daytona(emulator),
        _home: home,
    }
}

fn e2b_config(emulator: &E2bEmulator) -> E2bConfig {
    E2bConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        envd_url: emulator.envd_url(),
        ..E2bConfig::default()
    }
}

fn daytona_config(emulator: &DaytonaEmulator) -> DaytonaConfig {
    DaytonaConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        ..DaytonaConfig::default()
    }
}

impl Harness {
    /// A second, independent instance of the same provider reaching the
    /// same sandboxes (another spawner, a reaper).
    pub fn another_provider(&self) -> Arc<dyn Provider> {
        match &self.backend {
            Backend::Local(local) => Arc::new(
                LocalProvider::new(&local.home, &local.config).expect("second local provider"),
            ),
            Backend::E2b(emulator) => {
                Arc::new(E2bProvider::new(e2b_config(emulator)).expect("second provider"))
            }
            Backend::Daytona(emulator) => {
                Arc::new(DaytonaProvider::new(daytona_config(emulator)).expect("second provider"))
            }
        }
    }

    /// The emulator behind a remote provider; `None` for the local one.
    pub fn emulator(&self) -> Option<&dyn Emulator> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::E2b(emulator) => Some(emulator),
            Backend::Daytona(emulator) => Some(emulator),
        }
    }

    /// The emulator, for tests stamped out for remote providers only.
    pub fn remote(&self) -> &dyn Emulator {
        self.emulator()
            .expect("remote-only tests run against an emulator")
    }

    /// The same provider made without an API key.
    pub fn without_api_key(&self) -> Result<Arc<dyn Provider>, ProviderError> {
        match &self.backend {
            Backend::Local(_) => panic!("the local provider has no API key"),
            Backend::E2b(_) => Ok(Arc::new(E2bProvider::new(E2bConfig::default())?)),
            Backend::Daytona(_) => Ok(Arc::new(DaytonaProvider::new(DaytonaConfig::default())?)),
        }
    }

    /// Why a probe reports an expired sandbox gone, word for word.
    pub fn expired_reason(&self) -> &'static str {
        match &self.backend {
            Backend::Local(_) => panic!("local sandboxes do not expire"),
            Backend::E2b(_) => "e2b: sandbox not found (404)",
            Backend::Daytona(_) => "daytona: sandbox not found",
        }
    }

    /// Pids on this machine of the sandbox's live processes, read from
    /// /proc: the members of its PID namespace for the local provider,
    /// the processes carrying its marker for an emulated one.
    pub fn processes(&self, sandbox_id: &str) -> Vec<i32> {
        match &self.backend {
            Backend::Local(local) => local.provider.processes(sandbox_id),
            Backend::E2b(_) | Backend::Daytona(_) => LocalProvider::live_processes(sandbox_id),
        }
    }

    /// The sandbox's live processes whose command line is exactly `argv`.
    pub fn processes_running(&self, sandbox_id: &str, argv: &[&str]) -> Vec<i32> {
        let wanted: Vec<u8> = argv
            .iter()
            .flat_map(|word| [word.as_bytes(), b"\0"].concat())
            .collect();
        self.processes(sandbox_id)
            .into_iter()
            .filter(|pid| corral_provider::local::is_alive(*pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).ok() == Some(wanted.clone())
            })
            .collect()
    }

    /// Runs a command to its end: its lines and how it ended.
    pub async fn run(&self, sandbox_id: &str, spec: &ExecSpec) -> (Vec<OutputLine>, ExitStatus) {
        run_on(&*self.provider, sandbox_id, spec).await
    }
}

/// Runs a command to its end on `provider`: its lines and how it ended.
pub async fn run_on(
    provider: &dyn Provider,
    sandbox_id: &str,
    spec: &ExecSpec,
) -> (Vec<OutputLine>, ExitStatus) {
    let mut exec = provider.exec(sandbox_id, spec).await.expect("exec");
    let lines = tokio::time::timeout(Duration::from_secs(10), async {
        let mut lines = Vec::new();
        while let Some(line) = exec.output.recv().await {
            lines.push(line);
        }
        lines
    })
    .await
    .expect("the command's output never ended");
    let status = tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command never reported its exit");
    (lines, status)
}

/// Polls `done` until it holds, failing with `what` after 5 s.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn labels(run_id: &str) -> Labels {
    Labels::from([
        (LABEL_RUN_ID.to_owned(), run_id.to_owned()),
        (LABEL_DEPLOYMENT.to_owned(), "test".to_owned()),
    ])
}

pub fn spec(run_id: &str) -> CreateSpec {
    CreateSpec {
        run_id: run_id.into(),
        labels: labels(run_id),
        ..CreateSpec::default()
    }
}

pub fn argv(args: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
    }
}

pub fn line(stream: OutputStream, text: &str) -> OutputLine {
    OutputLine {
        stream,
        line: text.into(),
    }
}
