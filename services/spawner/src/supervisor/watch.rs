//! Watching one execution: its output published, its exit, a stop on the
//! run's stop subject, the run's deadline, its inactivity window and the
//! spawner's shutdown; whatever ends it first ends the process group.

use std::time::Duration;

use corral_proto::v1::{AgentEvent, StopCommand, agent_event};
use corral_provider::Process;
use futures::StreamExt;
use prost::Message;
use tokio::time::Instant;

use super::output::Publisher;
use super::{Ending, Supervisor, describe};

impl Supervisor {
    /// Runs one execution to its end: publishes output, resets the
    /// inactivity timer on output, notes the session id the agent reports,
    /// and ends the process group on a stop (when `stoppable`), a timeout or
    /// shutdown. When the agent exits, what it left running dies with it
    /// unless `keep` (a kept sandbox keeps its background processes).
    pub(super) async fn watch(
        &self,
        execution: corral_provider::Execution,
        stops: &mut async_nats::Subscriber,
        stoppable: bool,
        keep: bool,
    ) -> Ending {
        let corral_provider::Execution {
            mut output,
            process,
        } = execution;
        // Events the agent (or a trusted service) publishes for this run:
        // progress resets the inactivity window, heartbeats do not.
        let events_subject = self.spawner.subjects().events_of_run(&self.run_id);
        let kind_offset = events_subject.len() - 1;
        let mut events = self
            .spawner
            .client
            .nats()
            .subscribe(events_subject)
            .await
            .ok();
        let mut publisher = Publisher::new(
            self.spawner.client.jetstream().clone(),
            self.spawner.subjects(),
            &self.run_id,
            self.run.turn,
            self.seq.load(std::sync::atomic::Ordering::Relaxed),
        );
        let mut timers = Timers::new(
            self.run.deadline_at_ms,
            self.run.idle_timeout_secs,
            corral_common::now_ms(),
            Instant::now(),
        );
        let mut output_open = true;
        let ending = loop {
            tokio::select! {
                biased;
                stop = stops.next() => {
                    let Some(message) = stop else { continue };
                    let stop = StopCommand::decode(message.payload).unwrap_or_default();
                    if stoppable {
                        break Ending::Stopped(stop);
                    }
                    tracing::info!(reason = %stop.reason, "stop during finalize: finalize already in progress");
                }
                timeout = timers.expired() => break Ending::TimedOut(timeout),
                _ = self.spawner.end_runs.cancelled() => break Ending::Shutdown,
                line = output.recv(), if output_open => match line {
                    Some(line) => {
                        timers.activity(Instant::now());
                        self.spawner.note_activity(&self.run_id);
                        publisher.publish(line);
                    }
                    None => output_open = false,
                },
                Some(event) = next_event(&mut events) => {
                    let kind = event.subject.get(kind_offset..).unwrap_or("");
                    if kind != "agent.output" && corral_proto::kinds::is_progress(kind) {
                        timers.activity(Instant::now());
                        self.spawner.note_activity(&self.run_id);
                    }
                    if let Some(session) = session_of(kind, &event.payload)
                        && let Ok(mut current) = self.session_id.lock()
                    {
                        *current = Some(session);
                    }
                }
                status = process.wait() => break Ending::Exited(status),
            }
        };
        let grace = Duration::from_millis(self.spawner.config.kill_grace_ms);
        end_process(&process, &ending, keep, grace).await;
        // The rest of the output, bounded: a process outside the group could
        // hold the pipe open.
        if output_open {
            let drain = async {
                while let Some(line) = output.recv().await {
                    publisher.publish(line);
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        let seq = publisher.flush().await;
        self.seq.store(seq, std::sync::atomic::Ordering::Relaxed);
        ending
    }
}

/// The next message of an optional subscription (never, without one).
async fn next_event(events: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// The session id an `agent.started` or `agent.completed` event reports.
fn session_of(kind: &str, payload: &[u8]) -> Option<String> {
    if kind != "agent.started" && kind != "agent.completed" {
        return None;
    }
    let session = match AgentEvent::decode(payload).ok()?.payload? {
        agent_event::Payload::Started(started) => started.session_id,
        agent_event::Payload::Completed(completed) => completed.session_id,
        _ => return None,
    };
    (!session.is_empty()).then_some(session)
}

/// Ends what an execution left running once `ending` ended the watch: a
/// stop, a timeout or shutdown ends the process group with SIGTERM and,
/// if it is still there after `grace`, SIGKILL; an exited agent's
/// stragglers get SIGKILL at once, unless `keep` (a kept sandbox keeps
/// what the agent left running).
async fn end_process(process: &Process, ending: &Ending, keep: bool, grace: Duration) {
    match ending {
        // A kept sandbox keeps what the agent left running.
        Ending::Exited(_) if keep => {}
        // Stragglers of an exited agent go with it.
        Ending::Exited(_) => {
            process.kill().await;
        }
        _ => {
            let started = std::time::Instant::now();
            let (status, escalated) = process.terminate(grace).await;
            let how = if escalated { "sigkill" } else { "sigterm" };
            metrics::counter!("corral_agent_terminations_total", "how" => how).increment(1);
            metrics::histogram!("corral_cancellation_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(
                status = %describe(status),
                escalated,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "agent ended"
            );
        }
    }
}

/// Which of an execution's timers ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Timeout {
    /// The run's deadline passed.
    Deadline,
    /// The agent was silent for its whole inactivity window.
    Inactivity,
}

impl Timeout {
    /// The reason the run's end records.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Timeout::Deadline => "deadline",
            Timeout::Inactivity => "inactivity",
        }
    }
}

/// An execution's deadline and inactivity window, on the monotonic clock.
/// Pure but for [`Timers::expired`], which sleeps until the next one fires.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timers {
    /// When the run's deadline passes; `None`: the run has none.
    deadline: Option<Instant>,
    /// How long the agent may go without activity.
    idle: Duration,
    /// When the inactivity window closes, unless activity moves it.
    idle_at: Instant,
}

impl Timers {
    /// The timers of an execution starting at `now` (when the wall clock
    /// reads `now_ms`): the run's deadline at `deadline_at_ms` (Unix ms;
    /// 0 or less: none; already past: fires at once) and an inactivity
    /// window of `idle_timeout_secs` (at least one second).
    pub(super) fn new(
        deadline_at_ms: i64,
        idle_timeout_secs: i32,
        now_ms: i64,
        now: Instant,
    ) -> Timers {
        let deadline = (deadline_at_ms > 0)
            .then(|| now + Duration::from_millis((deadline_at_ms - now_ms).max(0) as u64));
        let idle = Duration::from_secs(idle_timeout_secs.max(1) as u64);
        Timers {
            deadline,
            idle,
            idle_at: now + idle,
        }
    }

    /// The agent showed activity at `now`: its inactivity window starts
    /// again. The deadline does not move.
    pub(super) fn activity(&mut self, now: Instant) {
        self.idle_at = now + self.idle;
    }

    /// When the next timer fires (unless activity moves it).
    pub(super) fn next_wakeup(&self) -> Instant {
        match self.deadline {
            Some(deadline) => deadline.min(self.idle_at),
            None => self.idle_at,
        }
    }

    /// The timer that has fired by `now`, if any; the deadline wins when
    /// both have.
    pub(super) fn fired(&self, now: Instant) -> Option<Timeout> {
        if self.deadline.is_some_and(|deadline| deadline <= now) {
            return Some(Timeout::Deadline);
        }
        (self.idle_at <= now).then_some(Timeout::Inactivity)
    }

    /// Waits until a timer fires (as they stand now: a copy, so activity
    /// noted meanwhile is seen by the next call) and says which.
    pub(super) async fn expired(self) -> Timeout {
        loop {
            tokio::time::sleep_until(self.next_wakeup()).await;
            if let Some(timeout) = self.fired(Instant::now()) {
                return timeout;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use corral_proto::v1::StopCommand;
    use corral_provider::{ExecControl, ExitStatus};
    use futures::FutureExt;
    use tokio::time::advance;

    use super::*;

    /// What the wall clock reads when an execution starts (Unix ms).
    const NOW_MS: i64 = 1_700_000_000_000;
    /// The inactivity window of the tests, in seconds.
    const WINDOW: i32 = 60;

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// `expired` of `timers` as they stand, to poll as time moves.
    fn expiry(timers: Timers) -> std::pin::Pin<Box<impl Future<Output = Timeout>>> {
        Box::pin(timers.expired())
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_fires_at_the_deadline_and_not_before() {
        let start = Instant::now();
        let timers = Timers::new(NOW_MS + 10_000, WINDOW, NOW_MS, start);
        let mut expired = expiry(timers);
        assert_eq!(timers.next_wakeup(), start + secs(10));

        advance(ms(9_999)).await;
        assert_eq!(timers.fired(Instant::now()), None);
        assert_eq!(
            (&mut expired).now_or_never(),
            None,
            "fired before the deadline"
        );

        advance(ms(1)).await;
        assert_eq!(timers.fired(Instant::now()), Some(Timeout::Deadline));
        assert_eq!((&mut expired).now_or_never(), Some(Timeout::Deadline));
        assert_eq!(start.elapsed(), secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn inactivity_fires_after_the_window_without_activity() {
        let start = Instant::now();
        let timers = Timers::new(NOW_MS + 3_600_000, WINDOW, NOW_MS, start);
        let mut expired = expiry(timers);

        advance(secs(59)).await;
        assert_eq!(
            (&mut expired).now_or_never(),
            None,
            "fired within the window"
        );

        advance(secs(1)).await;
        assert_eq!((&mut expired).now_or_never(), Some(Timeout::Inactivity));
        assert_eq!(start.elapsed(), secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_starts_the_inactivity_window_again() {
        let start = Instant::now();
        let mut timers = Timers::new(0, WINDOW, NOW_MS, start);

        advance(secs(50)).await;
        timers.activity(Instant::now());
        assert_eq!(timers.next_wakeup(), start + secs(110));
        // As the watch loop does: the next wait sees the moved window.
        let mut expired = expiry(timers);

        advance(secs(59)).await;
        assert_eq!(
            (&mut expired).now_or_never(),
            None,
            "fired a window after the start, not after the activity"
        );

        advance(secs(1)).await;
        assert_eq!((&mut expired).now_or_never(), Some(Timeout::Inactivity));
        assert_eq!(start.elapsed(), secs(110));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_does_not_move_the_deadline() {
        let start = Instant::now();
        let mut timers = Timers::new(NOW_MS + 90_000, WINDOW, NOW_MS, start);
        for _ in 0..5 {
            advance(secs(30)).await;
            if timers.fired(Instant::now()).is_some() {
                break;
            }
            timers.activity(Instant::now());
        }
        assert_eq!(timers.fired(Instant::now()), Some(Timeout::Deadline));
        assert_eq!(start.elapsed(), secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_of_zero_or_less_means_none() {
        for deadline_at_ms in [0, -1] {
            let start = Instant::now();
            let mut timers = Timers::new(deadline_at_ms, WINDOW, NOW_MS, start);
            // A busy agent runs far past any deadline it could have had.
            for _ in 0..24 * 60 {
                advance(secs(59)).await;
                assert_eq!(timers.fired(Instant::now()), None);
                timers.activity(Instant::now());
            }
            assert_eq!(timers.next_wakeup(), Instant::now() + secs(60));
            // Only its silence ends it.
            assert_eq!(expiry(timers).await, Timeout::Inactivity);
            assert_eq!(start.elapsed(), secs(24 * 60 * 59 + 60));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_past_fires_at_once() {
        let start = Instant::now();
        let timers = Timers::new(NOW_MS - 5_000, WINDOW, NOW_MS, start);
        assert_eq!(timers.fired(start), Some(Timeout::Deadline));
        assert_eq!(expiry(timers).now_or_never(), Some(Timeout::Deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_wins_when_both_fire_at_once() {
        let start = Instant::now();
        let timers = Timers::new(NOW_MS + 60_000, WINDOW, NOW_MS, start);
        assert_eq!(expiry(timers).await, Timeout::Deadline);
        assert_eq!(start.elapsed(), secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn an_inactivity_window_of_zero_is_one_second() {
        let start = Instant::now();
        let timers = Timers::new(0, 0, NOW_MS, start);
        assert_eq!(expiry(timers).await, Timeout::Inactivity);
        assert_eq!(start.elapsed(), secs(1));
    }

    #[test]
    fn the_reasons_a_timeout_records() {
        assert_eq!(Timeout::Deadline.reason(), "deadline");
        assert_eq!(Timeout::Inactivity.reason(), "inactivity");
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Signal {
        Term,
        Kill,
    }

    /// The signals an agent got, with when (time since the test started).
    type Received = Arc<Mutex<Vec<(Signal, Duration)>>>;

    /// An agent's process group that ends on SIGKILL and, if it obeys it,
    /// on SIGTERM.
    struct FakeAgent {
        exit: tokio::sync::watch::Sender<Option<ExitStatus>>,
        obeys_sigterm: bool,
        received: Received,
        start: Instant,
    }

    impl FakeAgent {
        fn got(&self, signal: Signal) {
            let at = self.start.elapsed();
            self.received
                .lock()
                .expect("not poisoned")
                .push((signal, at));
        }
    }

    impl ExecControl for FakeAgent {
        fn interrupt(&self) {
            self.got(Signal::Term);
            if self.obeys_sigterm {
                self.exit
                    .send_replace(Some(ExitStatus::Signal(libc::SIGTERM)));
            }
        }

        fn kill(&self) {
            self.got(Signal::Kill);
            self.exit
                .send_replace(Some(ExitStatus::Signal(libc::SIGKILL)));
        }
    }

    fn agent(obeys_sigterm: bool) -> (Process, Received) {
        let (exit, exited) = tokio::sync::watch::channel(None);
        let received = Received::default();
        let control = FakeAgent {
            exit,
            obeys_sigterm,
            received: received.clone(),
            start: Instant::now(),
        };
        (Process::new(exited, Box::new(control)), received)
    }

    fn received(received: &Received) -> Vec<(Signal, Duration)> {
        received.lock().expect("not poisoned").clone()
    }

    /// Every ending that ends the agent rather than follows its exit.
    fn interruptions() -> Vec<Ending> {
        vec![
            Ending::Stopped(StopCommand::default()),
            Ending::TimedOut(Timeout::Deadline),
            Ending::TimedOut(Timeout::Inactivity),
            Ending::Shutdown,
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_stop_or_timeout_the_grace_elapses_before_sigkill() {
        let grace = secs(5);
        for ending in interruptions() {
            let (process, signals) = agent(false);
            let start = Instant::now();
            let mut ended = Box::pin(async move {
                end_process(&process, &ending, false, grace).await;
                process.status()
            });
            assert_eq!((&mut ended).now_or_never(), None);
            assert_eq!(received(&signals), [(Signal::Term, Duration::ZERO)]);

            advance(grace - ms(1)).await;
            assert_eq!((&mut ended).now_or_never(), None);
            assert_eq!(
                received(&signals),
                [(Signal::Term, Duration::ZERO)],
                "killed within the grace"
            );

            advance(ms(1)).await;
            let status = (&mut ended).now_or_never();
            assert_eq!(status, Some(Some(ExitStatus::Signal(libc::SIGKILL))));
            assert_eq!(
                received(&signals),
                [(Signal::Term, Duration::ZERO), (Signal::Kill, grace)]
            );
            assert_eq!(start.elapsed(), grace);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_obeys_sigterm_is_not_killed() {
        for ending in interruptions() {
            let (process, signals) = agent(true);
            let start = Instant::now();
            end_process(&process, &ending, false, secs(5)).await;
            assert_eq!(process.status(), Some(ExitStatus::Signal(libc::SIGTERM)));
            assert_eq!(received(&signals), [(Signal::Term, Duration::ZERO)]);
            assert_eq!(start.elapsed(), Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exited_agents_stragglers_die_at_once_unless_the_sandbox_is_kept() {
        for status in [ExitStatus::Code(0), ExitStatus::Code(1)] {
            let (process, signals) = agent(false);
            end_process(&process, &Ending::Exited(status), false, secs(5)).await;
            assert_eq!(received(&signals), [(Signal::Kill, Duration::ZERO)]);

            let (process, signals) = agent(false);
            end_process(&process, &Ending::Exited(status), true, secs(5)).await;
            assert_eq!(received(&signals), []);
        }
    }
}
