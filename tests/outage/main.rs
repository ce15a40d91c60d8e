//! Outages of the shared servers: RabbitMQ stopped, PostgreSQL restarted, mid-load.
//!
//! These tests stop servers that every other test needs, so they must never overlap another
//! test. Why they cannot:
//! - Across binaries: `cargo test` runs test binaries one after another, never two at once, and
//!   the other binaries (`it`, `fault`, unit tests) are separate binaries. So they live here,
//!   in their own binary, and not in `fault`.
//! - Within this binary: the test harness runs tests on parallel threads, so every test holds
//!   [`OUTAGE`] for its whole run, including the set-up of its database and vhost (which needs
//!   both servers) and the clean-up.
//!
//! A server is always started again, also when the test fails: [`ServerDown`]'s `Drop` starts
//! it and waits until it accepts connections. Each test still has its own database and vhost.
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;

use saga_testkit::fault::*;
use saga_testkit::{TestEnv, repo_sagas};

/// Held by each test of this binary for its whole run: one outage at a time.
static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
enum Server {
    RabbitMq,
    Postgres,
}

fn run(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("{program} {args:?}: {e}");
            false
        }
    }
}

/// `pg_ctlcluster ACTION` on the cluster that listens on 5432 (found with `pg_lsclusters`),
/// bypassing systemd as on a machine without it.
fn pg_ctlcluster(action: &str, extra: &[&str]) -> bool {
    let clusters = Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters runs");
    let listing = String::from_utf8_lossy(&clusters.stdout);
    let (version, cluster) = listing
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.get(2) == Some(&"5432"))
        .map(|cols| (cols[0].to_string(), cols[1].to_string()))
        .unwrap_or_else(|| panic!("no PostgreSQL cluster on port 5432 in:\n{listing}"));
    let mut args = vec!["--skip-systemctl-redirect", &version, &cluster, action];
    args.extend_from_slice(extra);
    run("pg_ctlcluster", &args)
}

impl Server {
    fn stop(self) {
        let ok = match self {
            Server::RabbitMq => run("rabbitmqctl", &["-q", "stop_app"]),
            Server::Postgres => pg_ctlcluster("stop", &["-m", "fast"]),
        };
        assert!(ok, "cannot stop {self:?}");
    }

    /// Starts the server and waits until it accepts connections (at most a minute).
    fn start(self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = match self {
                Server::RabbitMq => {
                    run("rabbitmqctl", &["-q", "start_app"])
                        && run("rabbitmqctl", &["-q", "await_startup"])
                        && TcpStream::connect("127.0.0.1:5672").is_ok()
                }
                Server::Postgres => {
                    // Starting a running cluster fails; what matters is that it answers.
                    let _ = pg_ctlcluster("start", &[]);
                    run("pg_isready", &["-q", "-h", "127.0.0.1", "-p", "5432"])
                        && run(
                            "psql",
                            &["-h", "127.0.0.1", "-U", "postgres", "-qAtc", "SELECT 1"],
                        )
                }
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{self:?} did not come back within a minute"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A stopped server, started again when this is dropped (whether the test passed or not).
struct ServerDown {
    server: Server,
    up: bool,
}

impl ServerDown {
    fn stop(server: Server) -> ServerDown {
        // The guard exists before the stop, so even a failed stop ends in a start.
        let guard = ServerDown { server, up: false };
        server.stop();
        guard
    }

    /// Starts the server again now, without blocking the other tasks of the test's runtime.
    fn start(&mut self) {
        tokio::task::block_in_place(|| self.server.start());
        self.up = true;
    }
}

impl Drop for ServerDown {
    fn drop(&mut self) {
        if !self.up {
            self.server.start();
        }
    }
}

/// Runs the load, stops `server` for `down` while sagas are in flight, starts it again, and
/// checks the invariants. While the server is down, the API must still answer (an error is
/// fine, waiting forever is not): a probe calls ListSagas with a long deadline.
async fn outage(server: Server, down: Duration, scenario: &str) {
    let _serial = OUTAGE.lock().await;
    let env = TestEnv::new();
    let pool = env.pool().await;
    let sagad = Sagad::spawn(&env, &repo_sagas(), "1").await;
    let _demo = DemoProcess::spawn(&env, "1", &[]);
    let endpoints = Endpoints::new(&[&sagad]);
    let load = Load::start(&endpoints, SAGAS);
    load.wait_in_flight(&pool, SAGAS / 3, 10).await;

    let mut stopped = tokio::task::block_in_place(|| ServerDown::stop(server));
    let mut probe = connect_with_timeout(&sagad.endpoint(), PROBE_DEADLINE)
        .await
        .unwrap();
    let asked = Instant::now();
    let answer = probe
        .list_sagas(saga::proto::v1::ListSagasRequest::default())
        .await;
    let answered_after = asked.elapsed();
    let health_when_down = health_of(&sagad.endpoint()).await;
    tokio::time::sleep(down.saturating_sub(asked.elapsed())).await;
    stopped.start();
    let fault_end = Instant::now();
    // Answered at all (not cut by the client's deadline), with data or "unavailable".
    match &answer {
        Ok(_) => {}
        Err(status) => assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "ListSagas during the outage: {status:?} after {answered_after:.2?}"
        ),
    }
    eprintln!(
        "[fault] {scenario}: ListSagas during the outage answered {} after {answered_after:.2?}",
        match &answer {
            Ok(_) => "OK".to_string(),
            Err(status) => format!("{:?}", status.code()),
        }
    );

    // Without its database the orchestrator can serve nothing: probes must see it.
    if matches!(server, Server::Postgres) {
        assert_eq!(
            health_when_down,
            ServingStatus::NotServing as i32,
            "gRPC health during the outage"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while health_of(&sagad.endpoint()).await != ServingStatus::Serving as i32 {
        assert!(
            Instant::now() < deadline,
            "gRPC health never came back to SERVING"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let m = load.finish_and_check(&pool, fault_end).await;
    m.print(scenario);
}

/// The gRPC health status of the saga service (what grpc_health_probe asks).
async fn health_of(endpoint: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: "saga.v1.SagaService".into(),
    };
    health.check(request).await.unwrap().into_inner().status
}

/// How long the probe waits for an answer during an outage before calling it a hang.
const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// Scenario c: RabbitMQ stopped for 5 s mid-load. `sagad`'s relay and reply consumer and the
/// participants lose their connections and must reconnect; commands wait in the outbox,
/// unacknowledged deliveries go back to their (durable) queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_mid_load() {
    outage(
        Server::RabbitMq,
        Duration::from_secs(5),
        "c: RabbitMQ stopped 5s",
    )
    .await;
}

/// Scenario d: PostgreSQL stopped for 4 s mid-load, then started. Every pooled connection,
/// the relay's LISTEN connection and transactions in flight are cut; StartSaga fails with
/// UNAVAILABLE (the load retries with the same idempotency key); replies are requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_mid_load() {
    outage(
        Server::Postgres,
        Duration::from_secs(4),
        "d: PostgreSQL stopped 4s and started",
    )
    .await;
}
