//! The fault harness, shared by the `fault` and `outage` test binaries: real `sagad` and
//! `saga-demo` processes, a load generator that survives the faults, a poll for "every saga
//! ended", and the invariants every scenario must keep ("nothing lost, nothing done twice").
//!
//! The database and vhost of each test come from [`TestEnv`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga_proto::v1 as pb;
use saga_proto::v1::saga_service_client::SagaServiceClient;
use serde_json::json;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::bins::{built_bin, target_tmp};
use crate::env::TestEnv;
use crate::process::{Proc, free_addr};

/// Sagas per scenario.
pub const SAGAS: usize = 300;
/// Pause between two StartSaga calls: the load lasts about `SAGAS * PACE`, so the fault lands
/// while sagas are being started as well as while others are half-way.
pub const PACE: Duration = Duration::from_millis(10);
/// Upper bound for every saga to end once the fault is over. Generous: the machine is small
/// and shared; a healthy run needs a fraction of it.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(60);
/// Latency of the demo participants, so sagas stay in flight long enough to be hit.
pub const DEMO_LATENCY: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Where the child processes of a test write their logs (kept after the run, for diagnosis).
pub fn log_dir(env: &TestEnv) -> PathBuf {
    let dir = target_tmp().join("fault-logs").join(&env.name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `sagad` process on the test's database and vhost.
pub struct Sagad {
    proc: Proc,
    pub addr: SocketAddr,
}

impl Sagad {
    /// Starts `sagad` and waits until its API answers (which needs the database too).
    pub async fn spawn(env: &TestEnv, definitions: &Path, label: &str) -> Sagad {
        Sagad::spawn_with(env, definitions, label, &[]).await
    }

    /// [`Sagad::spawn`] with more arguments (tokens, say): then any answer of the API, even
    /// UNAUTHENTICATED, means it serves.
    pub async fn spawn_with(
        env: &TestEnv,
        definitions: &Path,
        label: &str,
        args: &[&str],
    ) -> Sagad {
        let addr = free_addr();
        let mut cmd = Command::new(built_bin("sagad"));
        cmd.args(["--database-url", &env.database_url()])
            .args(["--amqp-url", &env.amqp_url()])
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("SAGA_CONSOLE_LISTEN", "127.0.0.1:0")
            .arg("--definitions")
            .arg(definitions)
            .args(["--db-max-connections", "8"])
            .args(["--timer-poll", "50ms"])
            .args(["--outbox-poll", "200ms"])
            .args([
                "--shutdown-grace",
                &format!("{}s", SHUTDOWN_GRACE.as_secs()),
            ])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,lapin=warn".into()),
            );
        let log = log_dir(env).join(format!("sagad-{label}.log"));
        let mut proc =
            Proc::spawn(cmd, format!("sagad {label}"), log).unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "sagad {label} exited at start-up ({status}):\n{}",
                    proc.log_tail()
                );
            }
            if let Ok(mut client) = connect(&format!("http://{addr}")).await {
                let probe = client
                    .list_sagas(pb::ListSagasRequest {
                        page_size: 1,
                        ..Default::default()
                    })
                    .await;
                // A status from sagad itself (not a transport error) means it serves.
                let served = match &probe {
                    Ok(_) => true,
                    Err(status) => matches!(
                        status.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ),
                };
                if served {
                    return Sagad { proc, addr };
                }
            }
            assert!(
                Instant::now() < deadline,
                "sagad {label} not serving within 30s:\n{}",
                proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub async fn sigterm(&mut self, within: Duration) -> ExitStatus {
        self.proc.sigterm(within).await
    }
}

/// How long `sagad` waits for in-flight work on shutdown (its `--shutdown-grace`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A `saga-demo` process (the participants) on the test's database and vhost, with
/// [`DEMO_LATENCY`]. A process rather than in-process tasks, so that it can be killed and so
/// that each test has the participants' log to itself.
pub struct DemoProcess {
    proc: Proc,
}

impl DemoProcess {
    pub fn spawn(env: &TestEnv, label: &str, args: &[&str]) -> DemoProcess {
        let mut cmd = Command::new(built_bin("saga-demo"));
        cmd.args(["--amqp-url", &env.amqp_url()])
            .args(["--database-url", &env.database_url()])
            .args(["--latency", &format!("{}ms", DEMO_LATENCY.as_millis())])
            .args(args)
            .env("RUST_LOG", "info,sqlx=warn,lapin=warn");
        let log = log_dir(env).join(format!("saga-demo-{label}.log"));
        DemoProcess {
            proc: Proc::spawn(cmd, format!("saga-demo {label}"), log)
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// One saga of the load: its idempotency key and the command the demo must fail, if any.
#[derive(Debug, Clone)]
pub struct Planned {
    pub key: String,
    pub fail_at: Option<&'static str>,
}

/// `n` sagas: two in five complete; the others fail (finally) at one of the steps up to the
/// pivot, so every compensation path runs.
pub fn plan(n: usize) -> Vec<Planned> {
    const CYCLE: [Option<&str>; 5] = [
        None,
        Some("authorize_payment"),
        None,
        Some("schedule_delivery"),
        Some("create_order"),
    ];
    (0..n)
        .map(|i| Planned {
            key: format!("order-{i:04}"),
            fail_at: CYCLE[i % CYCLE.len()],
        })
        .collect()
}

/// The `sagad` API addresses the load may use; the test changes them as processes come and go.
#[derive(Clone, Default)]
pub struct Endpoints(Arc<Mutex<Vec<String>>>);

impl Endpoints {
    pub fn new(list: &[&Sagad]) -> Endpoints {
        let e = Endpoints::default();
        e.set(list);
        e
    }

    pub fn set(&self, list: &[&Sagad]) {
        *self.0.lock().unwrap() = list.iter().map(|s| s.endpoint()).collect();
    }

    fn pick(&self, n: usize) -> Option<String> {
        let list = self.0.lock().unwrap();
        (!list.is_empty()).then(|| list[n % list.len()].clone())
    }
}

async fn connect(url: &str) -> Result<SagaServiceClient<Channel>, tonic::transport::Error> {
    connect_with_timeout(url, Duration::from_secs(3)).await
}

/// A client whose calls give up after `timeout`.
pub async fn connect_with_timeout(
    url: &str,
    timeout: Duration,
) -> Result<SagaServiceClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .connect()
        .await?;
    Ok(SagaServiceClient::new(channel))
}

/// What the load generator did.
#[derive(Debug, Default)]
pub struct Started {
    /// saga id -> what was planned for it.
    pub sagas: BTreeMap<Uuid, Planned>,
    /// StartSaga calls that failed (server killed, database down…) and were retried.
    pub failed_calls: usize,
    /// Retried calls answered "already started": the first call had committed, its answer was
    /// lost. The idempotency key kept them from starting a second saga.
    pub already_started: usize,
}

/// Starts the planned sagas one every [`PACE`], in the background, retrying each with its
/// idempotency key until it is accepted (whatever the fault), against whichever endpoints are
/// current. Started sagas are counted in `progress`.
pub fn start_load(
    endpoints: Endpoints,
    plan: Vec<Planned>,
    progress: Arc<std::sync::atomic::AtomicUsize>,
) -> JoinHandle<Started> {
    tokio::spawn(async move {
        let mut clients: HashMap<String, SagaServiceClient<Channel>> = HashMap::new();
        let mut started = Started::default();
        let mut ticker = tokio::time::interval(PACE);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut turn = 0usize;
        for planned in plan {
            ticker.tick().await;
            let mut input = json!({"order_id": planned.key, "amount_cents": 4200});
            if let Some(f) = planned.fail_at {
                input["fail_at"] = json!(f);
            }
            let deadline = Instant::now() + RECOVERY_BOUND;
            let mut retried = false;
            let id = loop {
                turn += 1;
                let mut last_error = String::from("no sagad endpoint");
                if let Some(url) = endpoints.pick(turn) {
                    let client = match clients.get(&url) {
                        Some(c) => Ok(c.clone()),
                        None => connect(&url).await.inspect(|c| {
                            clients.insert(url.clone(), c.clone());
                        }),
                    };
                    match client {
                        Ok(mut client) => {
                            let call = client
                                .start_saga(pb::StartSagaRequest {
                                    definition: "order_fulfillment".into(),
                                    input_json: input.to_string(),
                                    idempotency_key: planned.key.clone(),
                                })
                                .await;
                            match call {
                                Ok(r) => {
                                    let r = r.into_inner();
                                    if retried && !r.created {
                                        started.already_started += 1;
                                    }
                                    break r.saga_id.parse::<Uuid>().unwrap();
                                }
                                Err(status) => {
                                    last_error = status.to_string();
                                    clients.remove(&url);
                                }
                            }
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
                started.failed_calls += 1;
                retried = true;
                assert!(
                    Instant::now() < deadline,
                    "saga {} could not be started within {RECOVERY_BOUND:?}: {last_error}",
                    planned.key
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(
                started.sagas.insert(id, planned).is_none(),
                "two keys got saga {id}"
            );
            progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        started
    })
}

/// A load running in the background.
pub struct Load {
    handle: JoinHandle<Started>,
    progress: Arc<std::sync::atomic::AtomicUsize>,
}

impl Load {
    pub fn start(endpoints: &Endpoints, n: usize) -> Load {
        let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Load {
            handle: start_load(endpoints.clone(), plan(n), progress.clone()),
            progress,
        }
    }

    pub fn started_so_far(&self) -> usize {
        self.progress.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` sagas were started and `in_flight` of them are neither finished nor
    /// not-yet-begun: the moment to strike.
    pub async fn wait_in_flight(&self, pool: &PgPool, n: usize, in_flight: i64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sagas WHERE status IN ('running', 'compensating')",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if self.started_so_far() >= n && running >= in_flight {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "load did not get going: {} started, {running} in flight",
                self.started_so_far()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn finish(self) -> Started {
        self.handle.await.expect("the load generator panicked")
    }

    /// Waits for the load to end and every saga to finish, then checks the invariants.
    /// Recovery is measured from `since` (the end of the fault).
    pub async fn finish_and_check(self, pool: &PgPool, since: Instant) -> Measures {
        let started = self.finish().await;
        wait_all_terminal(pool, started.sagas.len(), RECOVERY_BOUND).await;
        let recovery = since.elapsed();
        let mut m = check_invariants(pool, &started).await;
        m.recovery = recovery;
        m
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for the end
// ---------------------------------------------------------------------------------------------

/// Polls until all `n` sagas are `completed` or `compensated` and the outbox is empty (every
/// command and lifecycle event went out). Fails after `within` showing what is stuck.
pub async fn wait_all_terminal(pool: &PgPool, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (total, ended, outbox): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM sagas), \
                    (SELECT count(*) FROM sagas WHERE status IN ('completed', 'compensated')), \
                    (SELECT count(*) FROM outbox)",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if total == n as i64 && ended == total && outbox == 0 {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "not every saga ended within {within:?}: {ended} of {total} ended ({n} expected), \
                 {outbox} outbox rows left\n{}",
                stuck_report(pool).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The statuses and up to ten unfinished sagas with where they are and their last history.
async fn stuck_report(pool: &PgPool) -> String {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM sagas GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut report = format!("statuses: {counts:?}\n");
    let stuck: Vec<String> = sqlx::query_scalar(
        "SELECT format('%s %s steps %s wake_at %s: ... %s', s.id, s.status, s.graph -> 'steps', \
                coalesce(s.wake_at::text, '-'), \
                (SELECT string_agg(kind || coalesce(':' || step, ''), ' > ' ORDER BY seq) \
                 FROM (SELECT * FROM saga_history h WHERE h.saga_id = s.id \
                       ORDER BY seq DESC LIMIT 6) last)) \
         FROM sagas s WHERE status NOT IN ('completed', 'compensated') ORDER BY id LIMIT 10",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for line in stuck {
        report += &format!("  {line}\n");
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------------

/// order_fulfillment's steps: (name, action, compensation).
const STEPS: [(&str, &str, Option<&str>); 4] = [
    ("create_order", "create_order", Some("cancel_order")),
    (
        "authorize_payment",
        "authorize_payment",
        Some("refund_payment"),
    ),
    (
        "schedule_delivery",
        "schedule_delivery",
        Some("cancel_delivery"),
    ),
    ("approve_order", "approve_order", None),
];

fn command_name(step: &str, kind: &str) -> Option<&'static str> {
    let (_, action, compensation) = STEPS.iter().find(|(s, _, _)| *s == step)?;
    match kind {
        "action" => Some(action),
        "compensation" => *compensation,
        _ => None,
    }
}

/// What a scenario measured, printed at its end.
#[derive(Debug, Default)]
pub struct Measures {
    pub sagas: usize,
    pub completed: usize,
    pub compensated: usize,
    /// Sagas planned to complete that compensated because a step timed out too often.
    pub compensated_by_timeout: usize,
    /// Commands sent (attempts).
    pub commands: usize,
    pub retries: usize,
    pub timeouts: usize,
    /// Timed-out attempts by "kind step".
    pub timeouts_by_step: BTreeMap<String, usize>,
    pub late_replies: usize,
    /// Commands the participants processed.
    pub processed: usize,
    /// Deliveries the participants recognised by command id as already processed.
    pub redeliveries: i64,
    /// Actions/compensations applied again by a new attempt after the orchestrator gave up
    /// waiting for an earlier one (the contract allows this; effects are keyed by saga).
    pub reapplied_after_timeout: usize,
    pub start_calls_failed: usize,
    pub start_calls_already_started: usize,
    pub recovery: Duration,
}

impl Measures {
    pub fn print(&self, scenario: &str) {
        eprintln!(
            "[fault] {scenario}: {} sagas ({} completed, {} compensated, {} of them by timeout); \
             recovery {:.2?} from fault end to all ended; participants: {} commands processed, \
             {} redeliveries recognised, {} re-applied after a timeout; orchestrator: {} commands, \
             {} retries, {} timeouts, {} late replies; StartSaga: {} failed calls retried, {} \
             answered already-started; timeouts by step: {:?}",
            self.sagas,
            self.completed,
            self.compensated,
            self.compensated_by_timeout,
            self.recovery,
            self.processed,
            self.redeliveries,
            self.reapplied_after_timeout,
            self.commands,
            self.retries,
            self.timeouts,
            self.late_replies,
            self.start_calls_failed,
            self.start_calls_already_started,
            self.timeouts_by_step,
        );
    }
}

struct Attempt {
    step: String,
    kind: String,
    attempt: i32,
    replied: bool,
    outcome: Option<String>,
    timed_out: bool,
    /// Abandoned in flight: the saga moved on without it (a late success of an earlier attempt
    /// of the same step completed the step).
    superseded: bool,
}

impl Attempt {
    /// The orchestrator stopped waiting for this attempt without its reply deciding the step.
    fn given_up(&self) -> bool {
        self.timed_out || self.superseded
    }
}

struct Processed {
    saga_id: Uuid,
    command: String,
    kind: String,
    attempt: i32,
    outcome: String,
    redeliveries: i32,
}

/// Checks, for every saga the load started, the invariants of the fault suite; panics listing
/// every violation. Also fills the measures that come from the database.
///
/// 1. It ended (`completed` or `compensated`) as planned: a saga with `fail_at` compensates;
///    one without completes, unless a step of it timed out until its retries ran out (then it
///    legitimately compensates; the history must show the timeout). Nothing else is in the
///    database: no saga was started twice.
/// 2. Nothing was done twice. `demo_processed_commands` has one row per command id by
///    construction (primary key), so the check is at the business level, per saga and command
///    name: the participants applied it successfully at most once, plus once more for each
///    attempt of that step the orchestrator gave up on (timed out or abandoned) — a retry is
///    a new command id by contract and the orchestrator cannot know whether the lost attempt
///    applied; the demo keys effects by saga so the effect is still single. On the orchestrator
///    side, each step and kind has attempts 1..n once each, every one of them ended, and at
///    most one accepted success. Every command a participant processed is one the orchestrator
///    sent (same saga, step kind, attempt and command name), and every reply the orchestrator
///    recorded is what the participant answered.
/// 3. A compensated saga leaves no live effect (only `cancelled` / `refunded`, or nothing); a
///    completed one has the order approved, the payment authorized and the delivery scheduled.
/// 4. The history agrees with the status: it starts with `saga_started`, ends with the one
///    `saga_completed` / `saga_compensated` matching `sagas.status`; a completed saga has one
///    `step_succeeded` per step and no compensation; a compensated one compensated each step at
///    most once and never needed an operator; one `command_sent` per attempt; the saga row
///    waits for nothing any more.
pub async fn check_invariants(pool: &PgPool, started: &Started) -> Measures {
    let mut violations: Vec<String> = Vec::new();
    let mut m = Measures {
        sagas: started.sagas.len(),
        start_calls_failed: started.failed_calls,
        start_calls_already_started: started.already_started,
        ..Measures::default()
    };

    let sagas: Vec<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, status, cardinality(command_ids) = 0 AND wake_at IS NULL FROM sagas ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut attempts: HashMap<Uuid, Vec<(Uuid, Attempt)>> = HashMap::new();
    for (saga_id, command_id, step, kind, attempt, replied, outcome, timed_out, superseded) in
        sqlx::query_as::<
            _,
            (
                Uuid,
                Uuid,
                String,
                String,
                i32,
                bool,
                Option<String>,
                bool,
                bool,
            ),
        >(
            "SELECT saga_id, command_id, step, kind, attempt, replied_at IS NOT NULL, outcome, \
             timed_out, superseded FROM step_attempts",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    {
        attempts.entry(saga_id).or_default().push((
            command_id,
            Attempt {
                step,
                kind,
                attempt,
                replied,
                outcome,
                timed_out,
                superseded,
            },
        ));
    }
    let mut history: HashMap<Uuid, Vec<(String, Option<String>)>> = HashMap::new();
    for (saga_id, kind, step) in sqlx::query_as::<_, (Uuid, String, Option<String>)>(
        "SELECT saga_id, kind, step FROM saga_history ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    {
        history.entry(saga_id).or_default().push((kind, step));
    }
    let mut processed: HashMap<Uuid, Processed> = HashMap::new();
    for (command_id, saga_id, command, kind, attempt, outcome, redeliveries) in
        sqlx::query_as::<_, (Uuid, Uuid, String, String, i32, String, i32)>(
            "SELECT command_id, saga_id, command, kind, attempt, reply->>'outcome', redeliveries \
             FROM demo_processed_commands",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    {
        processed.insert(
            command_id,
            Processed {
                saga_id,
                command,
                kind,
                attempt,
                outcome,
                redeliveries,
            },
        );
    }
    let mut effects: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for (saga_id, resource, state) in sqlx::query_as::<_, (Uuid, String, String)>(
        "SELECT saga_id, resource, state FROM demo_effects",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    {
        effects.entry(saga_id).or_default().insert(resource, state);
    }

    // (1) exactly the sagas that were started, no more.
    let in_db: BTreeSet<Uuid> = sagas.iter().map(|(id, _, _)| *id).collect();
    let planned: BTreeSet<Uuid> = started.sagas.keys().copied().collect();
    for id in in_db.difference(&planned) {
        violations.push(format!(
            "saga {id} is in the database but was never started"
        ));
    }
    for id in planned.difference(&in_db) {
        violations.push(format!("saga {id} was started but is not in the database"));
    }

    // Commands the participants processed, by saga.
    let mut processed_by_saga: HashMap<Uuid, Vec<(&Uuid, &Processed)>> = HashMap::new();
    for (command_id, p) in &processed {
        processed_by_saga
            .entry(p.saga_id)
            .or_default()
            .push((command_id, p));
        m.redeliveries += i64::from(p.redeliveries);
    }
    m.processed = processed.len();

    let no_attempts = Vec::new();
    let no_history = Vec::new();
    let no_effects = BTreeMap::new();
    for (id, status, idle) in &sagas {
        let Some(plan) = started.sagas.get(id) else {
            continue;
        };
        let mut bad = |what: String| violations.push(format!("saga {id} ({}): {what}", plan.key));
        let attempts = attempts.get(id).unwrap_or(&no_attempts);
        let history = history.get(id).unwrap_or(&no_history);
        let kinds: Vec<&str> = history.iter().map(|(k, _)| k.as_str()).collect();
        let count = |kind: &str, step: Option<&str>| {
            history
                .iter()
                .filter(|(k, s)| k == kind && (step.is_none() || s.as_deref() == step))
                .count()
        };
        m.commands += attempts.len();
        m.retries += attempts.iter().filter(|(_, a)| a.attempt > 1).count();
        for (_, a) in attempts.iter().filter(|(_, a)| a.timed_out) {
            m.timeouts += 1;
            *m.timeouts_by_step
                .entry(format!("{} {}", a.kind, a.step))
                .or_default() += 1;
        }
        m.late_replies += count("late_reply", None);
        // A late reply answers an attempt that timed out or was abandoned; a duplicate reply is
        // not one.
        let gave_up = attempts.iter().filter(|(_, a)| a.given_up()).count();
        if count("late_reply", None) > gave_up {
            bad(format!(
                "{} late replies for {gave_up} timed-out or abandoned attempts: {kinds:?}",
                count("late_reply", None)
            ));
        }

        // (1) ended, as planned.
        let timed_out = count("step_timed_out", None) > 0;
        match (status.as_str(), plan.fail_at) {
            ("completed", None) => m.completed += 1,
            ("compensated", Some(_)) => m.compensated += 1,
            ("compensated", None) if timed_out => {
                m.compensated += 1;
                m.compensated_by_timeout += 1;
            }
            (status, fail_at) => bad(format!(
                "ended {status}, planned fail_at {fail_at:?}; history {kinds:?}"
            )),
        }

        // (4) the history agrees with the status.
        let end = match status.as_str() {
            "completed" => "saga_completed",
            _ => "saga_compensated",
        };
        if kinds.first() != Some(&"saga_started") || count("saga_started", None) != 1 {
            bad(format!(
                "history does not start with one saga_started: {kinds:?}"
            ));
        }
        // Replies that arrive after the end are still recorded, as late replies.
        let last = kinds.iter().rev().find(|k| **k != "late_reply");
        if last != Some(&end)
            || count("saga_completed", None) + count("saga_compensated", None) != 1
        {
            bad(format!("status {status} but history {kinds:?}"));
        }
        if !idle {
            bad("ended but still waits for a reply or a timer".into());
        }
        if count("command_sent", None) != attempts.len() {
            bad(format!(
                "{} command_sent in the history for {} attempts",
                count("command_sent", None),
                attempts.len()
            ));
        }
        if count("needs_operator", None) != 0 {
            bad(format!("needed an operator: {kinds:?}"));
        }
        if status == "completed" {
            for (step, _, _) in STEPS {
                if count("step_succeeded", Some(step)) != 1 {
                    bad(format!(
                        "completed, but step {step} did not succeed exactly once"
                    ));
                }
            }
            if count("compensation_started", None) + count("step_compensated", None) != 0 {
                bad(format!("completed, yet compensated: {kinds:?}"));
            }
        } else {
            if count("compensation_started", None) != 1 {
                bad(format!(
                    "compensated without one compensation_started: {kinds:?}"
                ));
            }
            for (step, _, _) in STEPS {
                if count("step_compensated", Some(step)) > 1 {
                    bad(format!("step {step} compensated twice"));
                }
            }
        }

        // (2) orchestrator side: attempts 1..n once each per (step, kind), all ended, at most
        // one accepted success.
        let mut by_step: BTreeMap<(&str, &str), Vec<&Attempt>> = BTreeMap::new();
        for (_, a) in attempts {
            by_step.entry((&a.step, &a.kind)).or_default().push(a);
        }
        for ((step, kind), list) in &by_step {
            let mut numbers: Vec<i32> = list.iter().map(|a| a.attempt).collect();
            numbers.sort();
            if numbers != (1..=list.len() as i32).collect::<Vec<_>>() {
                bad(format!("{kind} {step}: attempts {numbers:?}"));
            }
            if list.iter().any(|a| !a.replied && !a.given_up()) {
                bad(format!("{kind} {step}: an attempt never ended"));
            }
            let accepted = list
                .iter()
                .filter(|a| a.outcome.as_deref() == Some("success") && !a.given_up())
                .count();
            if accepted > 1 {
                bad(format!("{kind} {step}: {accepted} accepted successes"));
            }
        }

        // (2) participant side against what the orchestrator sent and recorded.
        let sent: HashMap<&Uuid, &Attempt> = attempts.iter().map(|(c, a)| (c, a)).collect();
        let processed_here = processed_by_saga.get(id).map(Vec::as_slice).unwrap_or(&[]);
        for (command_id, p) in processed_here {
            match sent.get(command_id) {
                None => bad(format!("participant processed {command_id}, never sent")),
                Some(a) => {
                    if command_name(&a.step, &a.kind) != Some(p.command.as_str())
                        || a.kind != p.kind
                        || a.attempt != p.attempt
                    {
                        bad(format!(
                            "participant processed {command_id} as {} {} #{}, sent as {} {} #{}",
                            p.kind, p.command, p.attempt, a.kind, a.step, a.attempt
                        ));
                    }
                }
            }
        }
        for (command_id, a) in attempts {
            if !a.replied {
                continue;
            }
            match processed.get(command_id) {
                None => bad(format!(
                    "reply recorded for {command_id}, which no participant processed"
                )),
                Some(p) if Some(&p.outcome) != a.outcome.as_ref() => bad(format!(
                    "{command_id}: participant answered {}, orchestrator recorded {:?}",
                    p.outcome, a.outcome
                )),
                Some(_) => {}
            }
        }
        let mut applied: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (_, p) in processed_here {
            if p.outcome == "success" {
                *applied.entry((&p.command, &p.kind)).or_default() += 1;
            }
        }
        for ((command, kind), n) in applied {
            let step = STEPS
                .iter()
                .find(|(_, a, c)| *a == command || *c == Some(command))
                .map(|(s, _, _)| *s)
                .unwrap_or("?");
            let gave_up = by_step
                .get(&(step, kind))
                .map(|l| l.iter().filter(|a| a.given_up()).count())
                .unwrap_or(0);
            if n > 1 + gave_up {
                bad(format!(
                    "{command} applied {n} times, with only {gave_up} timed-out or abandoned attempts"
                ));
            }
            m.reapplied_after_timeout += n - 1;
        }

        // (3) net business effects.
        let fx = effects.get(id).unwrap_or(&no_effects);
        if status == "completed" {
            let want: BTreeMap<String, String> = [
                ("delivery", "scheduled"),
                ("order", "approved"),
                ("payment", "authorized"),
            ]
            .iter()
            .map(|(r, s)| (r.to_string(), s.to_string()))
            .collect();
            if fx != &want {
                bad(format!("completed with effects {fx:?}"));
            }
        } else if fx.values().any(|s| s != "cancelled" && s != "refunded") {
            bad(format!(
                "compensated with live effects {fx:?}; history {kinds:?}"
            ));
        }
    }

    if !violations.is_empty() {
        let shown: Vec<&String> = violations.iter().take(30).collect();
        panic!(
            "{} invariant violations (first {}):\n{}",
            violations.len(),
            shown.len(),
            shown
                .iter()
                .map(|v| format!("  {v}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    m
}
