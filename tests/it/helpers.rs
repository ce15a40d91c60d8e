//! The in-process half of the test harness: an in-process `sagad` on a free port, the demo
//! participants as tasks, clients and assertions. The database and vhost of each test, and the
//! binaries run as processes, come from the testkit (`crates/testkit`).

use std::path::Path;
use std::time::Duration;

use saga::app::Application;
use saga::config::Settings;
use saga::proto::v1 as pb;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

pub use saga_testkit::{PG, TestEnv, definitions_dir, repo_sagas};

/// sagad's settings on the test's database and vhost, with short polls, on free ports.
pub trait EnvSettings {
    fn settings(&self, definitions: &Path) -> Settings;
}

impl EnvSettings for TestEnv {
    fn settings(&self, definitions: &Path) -> Settings {
        let mut s = Settings::defaults();
        s.database_url = self.database_url();
        s.amqp_url = self.amqp_url();
        s.listen = "127.0.0.1:0".parse().unwrap();
        s.metrics_listen = "127.0.0.1:0".parse().unwrap();
        s.console_listen = "127.0.0.1:0".parse().unwrap();
        s.definitions = definitions.to_path_buf();
        s.db_max_connections = 8;
        s.timer_poll = Duration::from_millis(50);
        s.outbox_poll = Duration::from_millis(200);
        s
    }
}

pub struct TestApp {
    pub metrics_addr: std::net::SocketAddr,
    pub console_addr: std::net::SocketAddr,
    pub addr: std::net::SocketAddr,
    pub client: SagaServiceClient<Channel>,
    pub readiness: saga::supervisor::Readiness,
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
    spans();
    let shutdown = CancellationToken::new();
    let app = Application::build(settings, shutdown.clone())
        .await
        .expect("sagad starts");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let console_addr = app.console_addr();
    let readiness = app.readiness();
    let handle = tokio::spawn(app.run_until_stopped());
    let client = SagaServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    TestApp {
        addr,
        metrics_addr,
        console_addr,
        client,
        readiness,
        shutdown,
        handle: Some(handle),
    }
}

/// Every span the tests' processes (sagad, demo participants) finished, through the same
/// layers `sagad` installs; logs show up for failing tests only (the test writer is captured).
pub fn spans() -> &'static opentelemetry_sdk::trace::InMemorySpanExporter {
    static EXPORTER: std::sync::OnceLock<opentelemetry_sdk::trace::InMemorySpanExporter> =
        std::sync::OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = saga::telemetry::provider("sagad-test", Some(exporter.clone()), true);
        let _ =
            tracing::subscriber::set_global_default(saga::telemetry::test_subscriber(&provider));
        // Lives as long as the test process.
        std::mem::forget(provider);
        exporter
    })
}

/// GET `path` over plain HTTP/1.0; returns (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
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

/// Starts an order saga through any client (plain or with a token).
pub async fn start<C>(client: &mut SagaServiceClient<C>, input: serde_json::Value) -> String
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    start_definition(client, "order_fulfillment", input).await
}

/// Starts a saga of `definition` through any client; returns its id.
pub async fn start_definition<C>(
    client: &mut SagaServiceClient<C>,
    definition: &str,
    input: serde_json::Value,
) -> String
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    client
        .start_saga(pb::StartSagaRequest {
            definition: definition.into(),
            input_json: input.to_string(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id
}

/// The details of the saga's operator_action events.
pub fn operator_actions(saga: &pb::Saga) -> Vec<serde_json::Value> {
    saga.history
        .iter()
        .filter(|h| h.kind == "operator_action")
        .map(|h| serde_json::from_str(&h.detail_json).unwrap())
        .collect()
}

/// A connection and channel on the test's vhost, for playing a participant by hand.
pub async fn amqp_channel(env: &TestEnv) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&env.amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

pub async fn consume(ch: &lapin::Channel, queue: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        lapin::options::BasicConsumeOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
}

/// The next message of a consumer; fails the test if none comes within 10 s.
pub async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a message within 10s")
        .unwrap()
        .unwrap()
}

/// Publishes a reply as the contract describes (persistent JSON) and waits for the confirm.
pub async fn reply(ch: &lapin::Channel, to: &str, body: serde_json::Value) {
    ch.basic_publish(
        "".into(),
        to.into(),
        lapin::options::BasicPublishOptions::default(),
        body.to_string().as_bytes(),
        lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
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

pub fn spawn_demo(env: &TestEnv, tweak: impl FnOnce(&mut saga_demo::DemoConfig)) -> Demo {
    let mut config = saga_demo::DemoConfig {
        amqp_url: env.amqp_url(),
        database_url: env.database_url(),
        ..Default::default()
    };
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(saga_demo::run(config, shutdown.clone()));
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

/// Adds `authorization: Bearer <token>` to every call (or nothing, for `None`).
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

pub async fn clients(
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> (
    SagaServiceClient<AuthChannel>,
    saga::proto::v1::admin_service_client::AdminServiceClient<AuthChannel>,
) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(token.map(str::to_owned));
    (
        SagaServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        saga::proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
            channel, bearer,
        ),
    )
}
