//! Commands in an E2B sandbox through its envd daemon: `process.Process/Start`
//! (a server stream of Connect envelopes, decoded here into [`Event`]s and
//! pumped into an [`Execution`]), signals to the command's process group
//! ([`SignalControl`]) and what envd wants of each request ([`EnvdAccess`]:
//! the access token, and a user named before 0.4.0).

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::{E2B, E2bProvider, proxy_lost_sandbox};
use crate::connect::{ConnectError, EndStream, Envelope, Envelopes, envelope};
use crate::remote::{self, Opened, Reply};
use crate::{
    ExecControl, ExecSpec, Execution, ExitStatus, OutputLine, OutputStream, Process, ProviderError,
};

/// envd older than 0.4.0 picks the user a command runs as from Basic auth:
/// `user:` (no password), as the SDK names it; newer envd runs commands as
/// the template's default user and is sent no user, as the SDK does.
const ENVD_USER_AUTH: &str = "Basic dXNlcjo=";
/// The first envd version with a default user.
const ENVD_DEFAULT_USER: (u64, u64, u64) = (0, 4, 0);
/// Runs the command as the lead of a session and process group of its own
/// (`setsid` without a fork: envd's children lead no group), so that
/// interrupt and kill can signal the whole group; envd's `SendSignal`
/// reaches only the one pid. Without `setsid` in the template the command
/// runs as before and only its own pid can be signalled.
const GROUP_WRAPPER: &str = r#"command -v setsid >/dev/null 2>&1 && exec setsid "$@"; exec "$@""#;
/// Asks envd for a keepalive message this often (seconds), so idle proxies
/// keep a quiet command's stream open.
const KEEPALIVE_SECS: u64 = 50;
/// A stream silent for this long (three missed keepalives) is dead.
const STREAM_IDLE: Duration = Duration::from_secs(3 * KEEPALIVE_SECS);

impl E2bProvider {
    fn envd_url(&self, sandbox_id: &str, rpc: &str) -> String {
        let base = self.config.envd_url.replace("{sandbox_id}", sandbox_id);
        format!("{}/process.Process/{rpc}", base.trim_end_matches('/'))
    }

    /// Starts the command and waits for envd's start event, so that a
    /// command that cannot start fails here, as the local provider's does.
    pub(super) async fn start(
        &self,
        sandbox_id: &str,
        spec: &ExecSpec,
    ) -> Result<Execution, ProviderError> {
        if spec.argv.is_empty() {
            return Err(ProviderError::Invalid("empty argv".into()));
        }
        let envd = self.envd_access(sandbox_id).await?;
        let mut envs = spec.env.clone();
        envs.entry("CORRAL_SANDBOX_ID".into())
            .or_insert_with(|| sandbox_id.to_owned());
        // stdin: envd keeps a command's stdin open unless told not to, and
        // a command that reads it would wait for ever.
        let mut args = vec![
            "-c".to_owned(),
            GROUP_WRAPPER.to_owned(),
            "corral".to_owned(),
        ];
        args.extend(spec.argv.iter().cloned());
        let message = json!({
            "process": { "cmd": "/bin/sh", "args": args, "envs": envs },
            "stdin": false,
        });
        let body = envelope(0, &message);
        let url = self.envd_url(sandbox_id, "Start");
        let request = || {
            let request = self
                .http
                .post(&url)
                .header("Content-Type", "application/connect+json")
                .header("Connect-Protocol-Version", "1")
                .header("Keepalive-Ping-Interval", KEEPALIVE_SECS.to_string())
                .body(body.clone());
            envd.authorize(request)
        };
        let response = match remote::open_stream(E2B, "exec", request, proxy_lost_sandbox).await? {
            Opened::Stream(response) => response,
            Opened::Refused(reply) => {
                if reply.status == StatusCode::UNAUTHORIZED {
                    // The token may have changed (a resume elsewhere): ask
                    // the API again next time.
                    self.forget_envd(sandbox_id);
                }
                return Err(refused_exec(sandbox_id, &reply));
            }
        };
        let mut envelopes = Envelopes::new(response, STREAM_IDLE);
        let (tx, output) = mpsc::channel(256);
        let (exit_tx, exit) = watch::channel(None);
        let mut pump = Pump::new(tx, exit_tx);
        let pid = loop {
            match envelopes.next().await? {
                Some(envelope) => match decode(envelope)? {
                    Event::Start(pid) => break pid,
                    Event::Finished(result) => {
                        result?;
                        return Err(ProviderError::Failed(
                            "e2b exec: envd ended the stream before the process started".into(),
                        ));
                    }
                    event => pump.handle(event).await,
                },
                None => {
                    return Err(ProviderError::Failed(
                        "e2b exec: the stream ended before the process started".into(),
                    ));
                }
            }
        };
        tokio::spawn(pump.run(envelopes, sandbox_id.to_owned(), pid));
        let control = SignalControl {
            http: self.http.clone(),
            start_url: self.envd_url(sandbox_id, "Start"),
            signal_url: self.envd_url(sandbox_id, "SendSignal"),
            envd,
            pid,
            runtime: tokio::runtime::Handle::current(),
        };
        Ok(Execution {
            output,
            process: Process::new(exit, Box::new(control)),
        })
    }
}

fn refused_exec(sandbox_id: &str, reply: &Reply) -> ProviderError {
    if proxy_lost_sandbox(reply) || reply.status == StatusCode::NOT_FOUND {
        return ProviderError::NotFound(sandbox_id.to_owned());
    }
    // A Connect error before the stream started: {"code", "message"}.
    match serde_json::from_slice::<ConnectError>(&reply.body) {
        Ok(err) if !err.code.is_empty() => err.into_provider_error("exec"),
        _ => reply.error(E2B, "exec"),
    }
}
/// What envd wants of a request: the sandbox's access token (a `secure`
/// sandbox's), and a user named for envd before 0.4.0.
#[derive(Clone)]
pub(super) struct EnvdAccess {
    token: Option<String>,
    names_user: bool,
}

impl EnvdAccess {
    pub(super) fn new(token: Option<String>, version: Option<&str>) -> EnvdAccess {
        EnvdAccess {
            token,
            names_user: envd_wants_user(version),
        }
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = if self.names_user {
            request.header("Authorization", ENVD_USER_AUTH)
        } else {
            request
        };
        match &self.token {
            Some(token) => request.header("X-Access-Token", token),
            None => request,
        }
    }
}

/// Whether envd of this version needs the user named, as the SDK decides
/// (`envdVersion < 0.4.0`). A version that cannot be read is taken as old:
/// naming the user works on every envd.
fn envd_wants_user(version: Option<&str>) -> bool {
    let Some(version) = version else {
        return true;
    };
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<Option<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    match parts[..] {
        [Some(major), Some(minor), Some(patch)] => (major, minor, patch) < ENVD_DEFAULT_USER,
        _ => true,
    }
}

/// What one envelope of the Start stream says.
enum Event {
    Start(u32),
    Output(OutputStream, Vec<u8>),
    End(ExitStatus),
    /// The end-stream envelope: clean, or with the RPC's error.
    Finished(Result<(), ProviderError>),
    /// Keepalives and anything newer than this client.
    Other,
}

#[derive(Deserialize)]
struct StartResponse {
    #[serde(default)]
    event: Option<ProcessEvent>,
}

#[derive(Deserialize)]
struct ProcessEvent {
    #[serde(default)]
    start: Option<StartEvent>,
    #[serde(default)]
    data: Option<DataEvent>,
    #[serde(default)]
    end: Option<EndEvent>,
}

#[derive(Deserialize)]
struct StartEvent {
    #[serde(default)]
    pid: u32,
}

#[derive(Deserialize)]
struct DataEvent {
    #[serde(default)]
    stdout: Option<String>,
    #[serde(default)]
    stderr: Option<String>,
}

/// Protobuf JSON leaves out defaults: an exit code of 0 arrives as no field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndEvent {
    #[serde(default)]
    exit_code: i32,
    #[serde(default)]
    exited: bool,
    #[serde(default)]
    status: String,
}

fn decode(envelope: Envelope) -> Result<Event, ProviderError> {
    let malformed = |err: serde_json::Error| {
        ProviderError::Failed(format!(
            "e2b exec: malformed envd message ({err}): {}",
            String::from_utf8_lossy(&envelope.data)
        ))
    };
    if envelope.end_stream {
        let end: EndStream = serde_json::from_slice(&envelope.data).map_err(malformed)?;
        return Ok(Event::Finished(match end.error {
            Some(err) => Err(err.into_provider_error("exec")),
            None => Ok(()),
        }));
    }
    let message: StartResponse = serde_json::from_slice(&envelope.data).map_err(malformed)?;
    let Some(event) = message.event else {
        return Ok(Event::Other);
    };
    if let Some(start) = event.start {
        return Ok(Event::Start(start.pid));
    }
    if let Some(end) = event.end {
        return Ok(Event::End(exit_status(&end)));
    }
    if let Some(data) = event.data {
        let (stream, text) = match (data.stdout, data.stderr) {
            (Some(text), _) => (OutputStream::Stdout, text),
            (None, Some(text)) => (OutputStream::Stderr, text),
            (None, None) => return Ok(Event::Other),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|err| ProviderError::Failed(format!("e2b exec: bad output chunk: {err}")))?;
        return Ok(Event::Output(stream, bytes));
    }
    Ok(Event::Other)
}

/// envd reports Go's process state: `exited` with a code, or a status such
/// as "signal: killed".
fn exit_status(end: &EndEvent) -> ExitStatus {
    if end.exited {
        return ExitStatus::Code(end.exit_code);
    }
    match end.status.strip_prefix("signal: ") {
        Some(name) => ExitStatus::Signal(signal_number(name)),
        None if end.exit_code >= 0 && !end.status.is_empty() => ExitStatus::Code(end.exit_code),
        None => ExitStatus::Signal(libc::SIGKILL),
    }
}

/// Go's names for signals (`syscall.Signal.String`).
fn signal_number(name: &str) -> i32 {
    match name {
        "hangup" => libc::SIGHUP,
        "interrupt" => libc::SIGINT,
        "quit" => libc::SIGQUIT,
        "aborted" => libc::SIGABRT,
        "segmentation fault" => libc::SIGSEGV,
        "broken pipe" => libc::SIGPIPE,
        "alarm clock" => libc::SIGALRM,
        "terminated" => libc::SIGTERM,
        "user defined signal 1" => libc::SIGUSR1,
        "user defined signal 2" => libc::SIGUSR2,
        "CPU time limit exceeded" => libc::SIGXCPU,
        _ => libc::SIGKILL,
    }
}

/// Moves the Start stream into an [`Execution`]'s output and exit.
struct Pump {
    tx: mpsc::Sender<OutputLine>,
    exit: watch::Sender<Option<ExitStatus>>,
    stdout: remote::Lines,
    stderr: remote::Lines,
}

impl Pump {
    fn new(tx: mpsc::Sender<OutputLine>, exit: watch::Sender<Option<ExitStatus>>) -> Pump {
        Pump {
            tx,
            exit,
            stdout: remote::Lines::default(),
            stderr: remote::Lines::default(),
        }
    }

    async fn send(&self, stream: OutputStream, line: String) {
        // A reader that went away still needs the exit: keep draining.
        let _ = self.tx.send(OutputLine { stream, line }).await;
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Output(stream, bytes) => {
                let lines = match stream {
                    OutputStream::Stdout => self.stdout.push(&bytes),
                    OutputStream::Stderr => self.stderr.push(&bytes),
                };
                for line in lines {
                    self.send(stream, line).await;
                }
            }
            Event::End(status) => {
                // The process is gone: its last unfinished lines are complete.
                self.flush().await;
                let _ = self.exit.send(Some(status));
            }
            Event::Start(_) | Event::Finished(_) | Event::Other => {}
        }
    }

    async fn flush(&mut self) {
        if let Some(line) = self.stdout.finish() {
            self.send(OutputStream::Stdout, line).await;
        }
        if let Some(line) = self.stderr.finish() {
            self.send(OutputStream::Stderr, line).await;
        }
    }

    /// Runs to the end of the stream. A stream that ends without the end
    /// event leaves the exit unset, which [`Process::wait`] reports as
    /// SIGKILL: the command can no longer be watched.
    async fn run(mut self, mut envelopes: Envelopes, sandbox_id: String, pid: u32) {
        loop {
            let event = match envelopes.next().await {
                Ok(Some(envelope)) => decode(envelope),
                Ok(None) => break,
                Err(err) => Err(err),
            };
            match event {
                Ok(Event::Finished(Ok(()))) => break,
                Ok(Event::Finished(Err(err))) | Err(err) => {
                    tracing::warn!(sandbox_id, pid, error = %err, "e2b command stream failed");
                    break;
                }
                Ok(event) => self.handle(event).await,
            }
        }
        self.flush().await;
        if self.exit.borrow().is_none() {
            tracing::warn!(
                sandbox_id,
                pid,
                "e2b command stream ended without an exit status"
            );
        }
    }
}

/// Signals a command's whole process group: a second command, `kill` of
/// the group ([`GROUP_WRAPPER`] made the command lead one), then envd's
/// unary `SendSignal` to the command's own pid where the group could not be
/// signalled (a template without `setsid`) or the signal is SIGKILL. envd's
/// `SendSignal` reaches that one pid only, and after SIGTERM or SIGKILL
/// envd forwards no more of its output; the group signal leaves the output
/// flowing while the command winds down. The trait is sync, so each signal
/// is a task on the runtime that started the command.
struct SignalControl {
    http: reqwest::Client,
    start_url: String,
    signal_url: String,
    envd: EnvdAccess,
    pid: u32,
    runtime: tokio::runtime::Handle,
}

/// Ends a group signal command that has not answered.
const GROUP_SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

impl SignalControl {
    fn send(&self, signal: Signal) {
        let group = GroupSignal {
            http: self.http.clone(),
            start_url: self.start_url.clone(),
            signal_url: self.signal_url.clone(),
            envd: self.envd.clone(),
            pid: self.pid,
        };
        self.runtime.spawn(async move {
            let grouped = match tokio::time::timeout(GROUP_SIGNAL_TIMEOUT, group.kill_group(signal))
                .await
            {
                Ok(Ok(())) => true,
                Ok(Err(err)) => {
                    tracing::warn!(pid = group.pid, signal = signal.name(), error = %err, "e2b group signal failed: signalling the command alone");
                    false
                }
                Err(_) => {
                    tracing::warn!(pid = group.pid, signal = signal.name(), "e2b group signal timed out: signalling the command alone");
                    false
                }
            };
            if !grouped || signal == Signal::Kill {
                group.signal_pid(signal).await;
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        }
    }
}

struct GroupSignal {
    http: reqwest::Client,
    start_url: String,
    signal_url: String,
    envd: EnvdAccess,
    pid: u32,
}

impl GroupSignal {
    /// `kill -s SIG -- -PID` through envd, waited for: `Ok` once it exits 0.
    async fn kill_group(&self, signal: Signal) -> Result<(), ProviderError> {
        let script = format!("kill -s {} -- -{}", signal.name(), self.pid);
        let message = json!({
            "process": { "cmd": "/bin/sh", "args": ["-c", script] },
            "stdin": false,
        });
        let body = envelope(0, &message);
        let request = || {
            let request = self
                .http
                .post(&self.start_url)
                .header("Content-Type", "application/connect+json")
                .header("Connect-Protocol-Version", "1")
                .body(body.clone());
            self.envd.authorize(request)
        };
        let response =
            match remote::open_stream(E2B, "signal group", request, proxy_lost_sandbox).await? {
                Opened::Stream(response) => response,
                Opened::Refused(reply) => return Err(reply.error(E2B, "signal group")),
            };
        let mut envelopes = Envelopes::new(response, STREAM_IDLE);
        while let Some(envelope) = envelopes.next().await? {
            match decode(envelope)? {
                Event::End(ExitStatus::Code(0)) => return Ok(()),
                Event::End(status) => {
                    return Err(ProviderError::Failed(format!(
                        "e2b signal group: kill ended {status:?} (no such group?)"
                    )));
                }
                Event::Finished(result) => {
                    result?;
                    break;
                }
                _ => {}
            }
        }
        Err(ProviderError::Failed(
            "e2b signal group: the stream ended without an exit".into(),
        ))
    }

    /// envd's `SendSignal` to the command's own pid.
    async fn signal_pid(&self, signal: Signal) {
        let pid = self.pid;
        let name = match signal {
            Signal::Term => "SIGNAL_SIGTERM",
            Signal::Kill => "SIGNAL_SIGKILL",
        };
        let body = json!({ "process": { "pid": pid }, "signal": name });
        let request = || {
            let request = self
                .http
                .post(&self.signal_url)
                .header("Connect-Protocol-Version", "1")
                .json(&body);
            self.envd.authorize(request)
        };
        match remote::call(E2B, "signal command", request, |_| false).await {
            Ok(reply) if reply.status.is_success() => {}
            // The command ended first: nothing left to signal.
            Ok(reply) if reply.status == StatusCode::NOT_FOUND => {
                tracing::debug!(pid, signal = name, "e2b command already ended");
            }
            Ok(reply) => {
                let err = reply.error(E2B, "signal command");
                tracing::warn!(pid, signal = name, error = %err, "e2b signal refused");
            }
            Err(err) => tracing::warn!(pid, signal = name, error = %err, "e2b signal failed"),
        }
    }
}

impl ExecControl for SignalControl {
    fn interrupt(&self) {
        self.send(Signal::Term);
    }

    fn kill(&self) {
        self.send(Signal::Kill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(json: serde_json::Value) -> ExitStatus {
        exit_status(&serde_json::from_value(json).expect("end event"))
    }

    #[test]
    fn exit_codes_and_signals_are_read_from_the_end_event() {
        assert_eq!(
            end(json!({"exited": true, "status": "exit status 0"})),
            ExitStatus::Code(0)
        );
        assert_eq!(
            end(json!({"exitCode": 3, "exited": true, "status": "exit status 3"})),
            ExitStatus::Code(3)
        );
        assert_eq!(
            end(json!({"exitCode": -1, "status": "signal: killed"})),
            ExitStatus::Signal(libc::SIGKILL)
        );
        assert_eq!(
            end(json!({"exitCode": -1, "status": "signal: terminated"})),
            ExitStatus::Signal(libc::SIGTERM)
        );
    }

    #[test]
    fn a_user_is_named_only_to_envd_before_0_4() {
        assert!(envd_wants_user(Some("0.3.9")));
        assert!(envd_wants_user(None));
        assert!(envd_wants_user(Some("unknown")));
        assert!(!envd_wants_user(Some("0.4.0")));
        assert!(!envd_wants_user(Some("0.5.1-beta.2")));
        assert!(!envd_wants_user(Some("1.0.0")));
    }
}
