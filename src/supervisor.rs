//! Supervision of the long-lived tasks (relays, reply consumer, timer sweeper, start writer,
//! listeners): a task that panics or ends while the process is not stopping is logged with its
//! cause and started again with capped back-off, and readiness names it while it is down or
//! crash-looping. An orchestrator that keeps answering health checks while one of its loops is
//! dead is worse than one that is plainly down: nothing would route around it.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// When a failing task is restarted and when it counts as crash-looping.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// First restart delay; doubled on each failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// A task that failed `crash_loop_failures` times within `window` is crash-looping: not
    /// ready until it has run `window` without failing. The back-off starts over then too.
    pub window: Duration,
    pub crash_loop_failures: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            window: Duration::from_secs(60),
            crash_loop_failures: 3,
        }
    }
}

/// How a task run ended, when it was not by a panic.
pub trait TaskExit {
    /// `Err` with the cause when the task ended because something went wrong.
    fn into_result(self) -> Result<(), String>;
}

impl TaskExit for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Display> TaskExit for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// One task's health, as readiness reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// Failed; waiting for its restart.
    Down {
        cause: String,
    },
    /// Restarted, but failed too often lately.
    CrashLooping {
        cause: String,
    },
}

#[derive(Debug)]
struct Task {
    state: TaskState,
    restarts: u64,
    failures: VecDeque<Instant>,
    /// Armed faults still to fire (tests only: see [`Readiness::inject_fault`]).
    faults: u32,
    fault: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Registry {
    tasks: BTreeMap<String, Task>,
}

/// The shared view of every supervised task, read by `/readyz` and the gRPC health service.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Mutex<Registry>>,
}

impl Readiness {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The lock is never held across code that can panic; a poisoned one still holds
        // consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every task that is not running normally, with why.
    pub fn problems(&self) -> Vec<(String, TaskState)> {
        self.lock()
            .tasks
            .iter()
            .filter(|(_, t)| t.state != TaskState::Running)
            .map(|(name, t)| (name.clone(), t.state.clone()))
            .collect()
    }

    /// Every task with its state and how often it was restarted.
    pub fn tasks(&self) -> Vec<(String, TaskState, u64)> {
        self.lock()
            .tasks
            .iter()
            .map(|(name, t)| (name.clone(), t.state.clone(), t.restarts))
            .collect()
    }

    /// Makes the named task panic `times` times in a row, now and at its next restarts: the
    /// fault hook the supervision tests use to prove a dead task is noticed and restarted. False
    /// if there is no such task.
    #[doc(hidden)]
    pub fn inject_fault(&self, task: &str, times: u32) -> bool {
        let mut reg = self.lock();
        let Some(t) = reg.tasks.get_mut(task) else {
            return false;
        };
        t.faults += times;
        t.fault.notify_one();
        true
    }

    fn register(&self, name: &str) -> Arc<Notify> {
        let fault = Arc::new(Notify::new());
        self.lock().tasks.insert(
            name.to_owned(),
            Task {
                state: TaskState::Running,
                restarts: 0,
                failures: VecDeque::new(),
                faults: 0,
                fault: fault.clone(),
            },
        );
        fault
    }

    /// Takes one armed fault, if any.
    fn take_fault(&self, name: &str) -> bool {
        let mut reg = self.lock();
        match reg.tasks.get_mut(name) {
            Some(t) if t.faults > 0 => {
                t.faults -= 1;
                true
            }
            _ => false,
        }
    }

    /// Records a failure; returns whether the task is now crash-looping.
    fn failed(&self, name: &str, cause: &str, policy: &Policy, now: Instant) -> bool {
        let mut reg = self.lock();
        let Some(t) = reg.tasks.get_mut(name) else {
            return false;
        };
        t.failures.push_back(now);
        while t
            .failures
            .front()
            .is_some_and(|f| now.duration_since(*f) > policy.window)
        {
            t.failures.pop_front();
        }
        t.state = TaskState::Down {
            cause: cause.to_owned(),
        };
        t.failures.len() >= policy.crash_loop_failures
    }

    fn restarted(&self, name: &str, crash_looping: bool) {
        let mut reg = self.lock();
        if let Some(t) = reg.tasks.get_mut(name) {
            t.restarts += 1;
            t.state = match (&t.state, crash_looping) {
                (TaskState::Down { cause }, true) => TaskState::CrashLooping {
                    cause: cause.clone(),
                },
                _ => TaskState::Running,
            };
        }
    }

    /// Called once the task has run a whole window since its last failure.
    fn stable(&self, name: &str) {
        let mut reg = self.lock();
        if let Some(t) = reg.tasks.get_mut(name) {
            t.failures.clear();
            if matches!(t.state, TaskState::CrashLooping { .. }) {
                t.state = TaskState::Running;
            }
        }
    }
}

/// Runs the long-lived tasks of one process.
pub struct Supervisor {
    readiness: Readiness,
    policy: Policy,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Supervisor {
    pub fn new(policy: Policy, shutdown: CancellationToken) -> Supervisor {
        Supervisor {
            readiness: Readiness::default(),
            policy,
            shutdown,
            tasks: JoinSet::new(),
        }
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Runs `make()` as the task `name`, and again after each panic or premature end, until
    /// shutdown. Each run is a tokio task of its own, so a panic unwinds only that run.
    pub fn spawn<F, Fut>(&mut self, name: &str, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: TaskExit + Send + 'static,
    {
        let name = name.to_owned();
        let readiness = self.readiness.clone();
        let fault = readiness.register(&name);
        let policy = self.policy;
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut backoff = policy.min_backoff;
            loop {
                let run = make();
                let (fault, readiness_, name_) = (fault.clone(), readiness.clone(), name.clone());
                let started = Instant::now();
                // The fault hook's whole point is a real panic inside the task.
                #[allow(clippy::panic)]
                let handle = tokio::spawn(async move {
                    tokio::select! {
                        exit = run => exit.into_result(),
                        () = armed_fault(&readiness_, &name_, &fault) => {
                            panic!("fault injected into {name_}")
                        }
                    }
                });
                // Once the task has run a whole window without failing, it is healthy again
                // and its next failure restarts it quickly.
                let mut handle = std::pin::pin!(handle);
                let joined = tokio::select! {
                    joined = &mut handle => joined,
                    () = tokio::time::sleep(policy.window) => {
                        readiness.stable(&name);
                        backoff = policy.min_backoff;
                        handle.await
                    }
                };
                let cause = match joined {
                    Ok(Ok(())) if shutdown.is_cancelled() => return,
                    Ok(Ok(())) => "ended while the process was not stopping".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                    Err(e) => format!("was cancelled: {e}"),
                };
                if shutdown.is_cancelled() {
                    return;
                }
                let now = Instant::now();
                if now.duration_since(started) >= policy.window {
                    backoff = policy.min_backoff;
                }
                let crash_looping = readiness.failed(&name, &cause, &policy, now);
                error!(task = %name, %cause, restart_in = ?backoff, crash_looping, "task failed; restarting it");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(policy.max_backoff);
                readiness.restarted(&name, crash_looping);
                info!(task = %name, "task restarted");
            }
        });
    }

    /// Waits for every task to end (they end at shutdown).
    pub async fn join_all(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}

/// Resolves when a fault is armed for `name` (at once if one is armed already).
async fn armed_fault(readiness: &Readiness, name: &str, fault: &Notify) {
    loop {
        if readiness.take_fault(name) {
            return;
        }
        fault.notified().await;
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> Policy {
        Policy {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            window: Duration::from_secs(60),
            crash_loop_failures: 3,
        }
    }

    /// Lets the paused clock run until `cond` holds, failing after two minutes of virtual time.
    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..120_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_reported_while_down() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(policy(), shutdown.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let stop = shutdown.clone();
        sup.spawn("worker", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                if n == 0 {
                    panic!("bad input");
                }
                stop.cancelled().await
            }
        });
        let readiness = sup.readiness();
        until(|| !readiness.problems().is_empty()).await;
        let problems = readiness.problems();
        assert_eq!(problems[0].0, "worker");
        assert!(
            matches!(&problems[0].1, TaskState::Down { cause } if cause.contains("bad input")),
            "{problems:?}"
        );
        until(|| readiness.problems().is_empty()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(readiness.tasks()[0].2, 1, "one restart");
        shutdown.cancel();
        sup.join_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_exit_or_an_early_end_counts_as_a_failure() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(policy(), shutdown.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let stop = shutdown.clone();
        sup.spawn("erring", move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                match n {
                    0 => Err("the queue is gone".to_owned()),
                    1 => Ok(()),
                    _ => {
                        stop.cancelled().await;
                        Ok(())
                    }
                }
            }
        });
        let readiness = sup.readiness();
        until(|| runs.load(Ordering::SeqCst) == 3).await;
        assert_eq!(readiness.tasks()[0].2, 2);
        shutdown.cancel();
        sup.join_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_looping_task_stays_not_ready_until_it_ran_a_whole_window() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(policy(), shutdown.clone());
        let stop = shutdown.clone();
        sup.spawn("looping", move || stop.clone().cancelled_owned());
        let readiness = sup.readiness();
        assert!(readiness.inject_fault("looping", 3));
        until(|| {
            matches!(
                readiness.problems().first(),
                Some((_, TaskState::CrashLooping { .. }))
            )
        })
        .await;
        let since = Instant::now();
        until(|| readiness.problems().is_empty()).await;
        assert!(
            Instant::now().duration_since(since) >= Duration::from_secs(59),
            "ready again only after a quiet window"
        );
        assert_eq!(readiness.tasks()[0].2, 3);
        assert!(!readiness.inject_fault("no such task", 1));
        shutdown.cancel();
        sup.join_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_doubles_and_is_capped() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(
            Policy {
                max_backoff: Duration::from_millis(400),
                ..policy()
            },
            shutdown.clone(),
        );
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s = starts.clone();
        sup.spawn("failing", move || {
            s.lock().unwrap().push(Instant::now());
            async { Err::<(), _>("always") }
        });
        until(|| starts.lock().unwrap().len() == 6).await;
        let starts = starts.lock().unwrap().clone();
        let gaps: Vec<u128> = starts
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).as_millis())
            .collect();
        assert_eq!(gaps, vec![100, 200, 400, 400, 400]);
        shutdown.cancel();
        sup.join_all().await;
    }
}
