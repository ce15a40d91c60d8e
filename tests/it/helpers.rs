//! Test harness: each test gets its own PostgreSQL database and RabbitMQ vhost on the real
//! servers, an in-process `sagad` on a free port, and optionally the demo participants.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use saga::app::Application;
use saga::config::Settings;
use saga::proto::v1 as pb;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";

/// An isolated database and vhost, removed when dropped (also when the test fails).
pub struct TestEnv {
    pub name: String,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let name = format!("saga_t_{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        // From here on the guard exists, so a failure below still cleans up.
        let env = TestEnv { name };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &env.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        psql(&format!("CREATE DATABASE {}", env.name));
        env
    }

    pub fn database_url(&self) -> String {
        format!("{PG}/{}", self.name)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    pub fn settings(&self, definitions: &Path) -> Settings {
        let mut s = Settings::defaults();
        s.database_url = self.database_url();
        s.amqp_url = self.amqp_url();
        s.listen = "127.0.0.1:0".parse().unwrap();
        s.definitions = definitions.to_path_buf();
        s.db_max_connections = 8;
        s.timer_poll = Duration::from_millis(50);
        s.outbox_poll = Duration::from_millis(200);
        s
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.database_url()).await.unwrap()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn repo_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas")
}

/// A directory holding the given definition files.
pub fn definitions_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub client: SagaServiceClient<Channel>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl TestApp {
    /// Stops the orchestrator gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    // Logs show up for failing tests only (the test writer is captured).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,lapin=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let shutdown = CancellationToken::new();
    let app = Application::build(settings, shutdown.clone())
        .await
        .expect("sagad starts");
    let addr = app.local_addr();
    let handle = tokio::spawn(app.run_until_stopped());
    let client = SagaServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    TestApp {
        addr,
        client,
        shutdown,
        handle: Some(handle),
    }
}

/// Polls GetSaga until the saga reaches `status`; fails with the saga's state after `within`.
pub async fn wait_for_status(
    client: &mut SagaServiceClient<Channel>,
    id: &str,
    status: pb::SagaStatus,
    within: Duration,
) -> pb::Saga {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let saga = client
            .get_saga(pb::GetSagaRequest {
                saga_id: id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        if saga.status == status as i32 {
            return saga;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("saga {id} did not reach {status:?} within {within:?}: {saga:#?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn start(client: &mut SagaServiceClient<Channel>, input: serde_json::Value) -> String {
    client
        .start_saga(pb::StartSagaRequest {
            definition: "order_fulfillment".into(),
            input_json: input.to_string(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id
}

/// The (step, kind) of each attempt, in the order sent, e.g. ("authorize_payment", "compensation").
pub fn attempts(saga: &pb::Saga) -> Vec<(String, &'static str)> {
    saga.attempts
        .iter()
        .map(|a| {
            let kind = if a.kind == pb::CommandKind::Compensation as i32 {
                "compensation"
            } else {
                "action"
            };
            (a.step.clone(), kind)
        })
        .collect()
}

pub fn history_kinds(saga: &pb::Saga) -> Vec<String> {
    saga.history.iter().map(|h| h.kind.clone()).collect()
}

/// The demo participants, in-process, on the test's vhost and database.
pub struct Demo {
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Demo {
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn spawn_demo(env: &TestEnv, tweak: impl FnOnce(&mut saga::demo::DemoConfig)) -> Demo {
    let mut config = saga::demo::DemoConfig {
        amqp_url: env.amqp_url(),
        database_url: env.database_url(),
        ..Default::default()
    };
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(saga::demo::run(config, shutdown.clone()));
    Demo {
        shutdown,
        handle: Some(handle),
    }
}

/// The demo participants' record of a saga's business effects: resource -> state.
pub async fn effects(
    pool: &sqlx::PgPool,
    saga_id: &str,
) -> std::collections::BTreeMap<String, String> {
    let id: Uuid = saga_id.parse().unwrap();
    sqlx::query_as::<_, (String, String)>(
        "SELECT resource, state FROM demo_effects WHERE saga_id = $1",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}
