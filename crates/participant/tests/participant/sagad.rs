//! The order, payment and delivery services of sagas/order_fulfillment.toml written on the SDK,
//! against the real sagad binary: sagas complete and compensate, and a participant that answers
//! over gRPC (`ReportStepResult`) instead of the broker takes part like the others.

use std::time::Duration;

use saga_participant::{Command, GrpcReplies, Outcome, Participant};
use saga_proto::v1 as pb;
use saga_proto::v1::saga_service_client::SagaServiceClient;
use saga_testkit::env::Options;
use saga_testkit::{TestEnv, repo_sagas};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tonic::metadata::AsciiMetadataValue;
use uuid::Uuid;

use crate::{Running, init_tracing, poll};

const SCHEMA: &str = "
CREATE TABLE orders (saga_id uuid PRIMARY KEY, order_id text, state text NOT NULL);
CREATE TABLE payments (saga_id uuid PRIMARY KEY, amount_cents bigint, state text NOT NULL);
CREATE TABLE deliveries (saga_id uuid PRIMARY KEY, state text NOT NULL);
-- Every effect applied, one row each: the tests count them.
CREATE TABLE effect_log (id bigserial PRIMARY KEY, saga_id uuid NOT NULL, command text NOT NULL);
";

const CHECKOUT_TOKEN: &str = "checkout-token-0123456789";
const PAYMENT_TOKEN: &str = "payment-token-0123456789";

/// The input asks this command to fail for good (`fail_at`), or to panic on its first attempt
/// (`panic_once`: a transient failure, then the retry succeeds).
fn refused(cmd: &Command) -> Option<Outcome> {
    let wants = |key: &str| cmd.input.get(key).and_then(|v| v.as_str()) == Some(&cmd.command);
    if wants("panic_once") && cmd.attempt == 1 {
        panic!("{} is having a bad day", cmd.command);
    }
    wants("fail_at").then(|| Outcome::failure(format!("injected failure at {}", cmd.command)))
}

/// Sets the saga's row of `table` to `state` (inserting it for an action) and logs the effect.
async fn apply(
    conn: &mut PgConnection,
    cmd: &Command,
    table: &str,
    state: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (saga_id, state) VALUES ($1, $2) \
         ON CONFLICT (saga_id) DO UPDATE SET state = EXCLUDED.state"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(cmd.saga_id)
        .bind(state)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO effect_log (saga_id, command) VALUES ($1, $2)")
        .bind(cmd.saga_id)
        .bind(&cmd.command)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn short(cmd: &Command) -> String {
    cmd.saga_id.simple().to_string()[..8].to_string()
}

fn shop(env: &TestEnv) -> Vec<Participant> {
    let order = Participant::new("order")
        .amqp_url(env.amqp_url())
        .action("create_order", |cmd, conn| {
            Box::pin(async move {
                if let Some(no) = refused(cmd) {
                    return Ok(no);
                }
                apply(conn, cmd, "orders", "created").await?;
                sqlx::query("UPDATE orders SET order_id = $2 WHERE saga_id = $1")
                    .bind(cmd.saga_id)
                    .bind(cmd.input["order_id"].as_str())
                    .execute(&mut *conn)
                    .await?;
                Ok(Outcome::success(
                    json!({"order_ref": format!("ord-{}", short(cmd))}),
                ))
            })
        })
        .action("approve_order", |cmd, conn| {
            Box::pin(async move {
                apply(conn, cmd, "orders", "approved").await?;
                // An earlier step's output, as the orchestrator passed it on.
                let order_ref = cmd.outputs["create_order"]["order_ref"].clone();
                Ok(Outcome::success(json!({"approved_ref": order_ref})))
            })
        })
        .compensation("cancel_order", |cmd, conn| {
            Box::pin(async move {
                apply(conn, cmd, "orders", "cancelled").await?;
                Ok(Outcome::done())
            })
        });
    let payment = Participant::new("payment")
        .amqp_url(env.amqp_url())
        .action("authorize_payment", |cmd, conn| {
            Box::pin(async move {
                if let Some(no) = refused(cmd) {
                    return Ok(no);
                }
                apply(conn, cmd, "payments", "authorized").await?;
                sqlx::query("UPDATE payments SET amount_cents = $2 WHERE saga_id = $1")
                    .bind(cmd.saga_id)
                    .bind(cmd.input["amount_cents"].as_i64())
                    .execute(&mut *conn)
                    .await?;
                Ok(Outcome::success(
                    json!({"authorization": format!("auth-{}", short(cmd))}),
                ))
            })
        })
        .compensation("refund_payment", |cmd, conn| {
            Box::pin(async move {
                apply(conn, cmd, "payments", "refunded").await?;
                Ok(Outcome::done())
            })
        });
    let delivery = Participant::new("delivery")
        .amqp_url(env.amqp_url())
        .action("schedule_delivery", |cmd, conn| {
            Box::pin(async move {
                if let Some(no) = refused(cmd) {
                    return Ok(no);
                }
                apply(conn, cmd, "deliveries", "scheduled").await?;
                Ok(Outcome::success(
                    json!({"tracking": format!("trk-{}", short(cmd))}),
                ))
            })
        })
        .compensation("cancel_delivery", |cmd, conn| {
            Box::pin(async move {
                apply(conn, cmd, "deliveries", "cancelled").await?;
                Ok(Outcome::done())
            })
        });
    vec![order, payment, delivery]
}

/// The real sagad on the test's database and vhost, with `args` added.
struct Sagad {
    _proc: saga_testkit::fault::Sagad,
    addr: std::net::SocketAddr,
    client: SagaServiceClient<tonic::transport::Channel>,
    token: Option<AsciiMetadataValue>,
}

impl Sagad {
    async fn spawn(env: &TestEnv, args: &[&str], token: Option<&str>) -> Sagad {
        let proc =
            saga_testkit::fault::Sagad::spawn_with(env, &repo_sagas(), &env.name, args).await;
        let addr = proc.addr;
        let client = SagaServiceClient::connect(proc.endpoint()).await.unwrap();
        let token = token.map(|t| format!("Bearer {t}").parse().unwrap());
        Sagad {
            _proc: proc,
            addr,
            client,
            token,
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    async fn start(&self, input: serde_json::Value) -> String {
        let request = self.request(pb::StartSagaRequest {
            definition: "order_fulfillment".into(),
            input_json: input.to_string(),
            idempotency_key: String::new(),
        });
        self.client
            .clone()
            .start_saga(request)
            .await
            .unwrap()
            .into_inner()
            .saga_id
    }

    async fn wait_status(&self, saga_id: &str, status: pb::SagaStatus) -> pb::Saga {
        poll(
            &format!("saga {saga_id} to be {status:?}"),
            Duration::from_secs(60),
            || async {
                let request = self.request(pb::GetSagaRequest {
                    saga_id: saga_id.to_string(),
                });
                let saga = self
                    .client
                    .clone()
                    .get_saga(request)
                    .await
                    .ok()?
                    .into_inner();
                (saga.status == status as i32).then_some(saga)
            },
        )
        .await
    }
}

async fn start_shop(
    env: &TestEnv,
    payment: Option<(GrpcReplies, String)>,
) -> (PgPool, Vec<Running>) {
    let pool = PgPool::connect(&env.demo_database_url()).await.unwrap();
    sqlx::raw_sql(SCHEMA).execute(&pool).await.unwrap();
    let mut running = Vec::new();
    for mut participant in shop(env) {
        if let Some((grpc, amqp_url)) = &payment
            && participant_is(&participant, "payment")
        {
            participant = participant
                .reply_via_grpc(grpc.clone())
                .amqp_url(amqp_url.clone())
                .declare_topology(false);
        }
        running.push(Running::start(participant, pool.clone()).await);
    }
    (pool, running)
}

fn participant_is(participant: &Participant, name: &str) -> bool {
    participant.name() == name
}

/// A RabbitMQ user that may consume the payment queue of one vhost and do nothing else: not
/// publish (not even to the default exchange), not declare. Deleted on drop.
struct ConsumeOnlyUser {
    name: String,
}

impl ConsumeOnlyUser {
    fn create(env: &TestEnv) -> ConsumeOnlyUser {
        let name = format!("{}_payment", env.name);
        saga_testkit::rabbitmqctl(&["add_user", &name, "consume-only"]).unwrap();
        let user = ConsumeOnlyUser { name };
        saga_testkit::rabbitmqctl(&[
            "set_permissions",
            "-p",
            &env.name,
            &user.name,
            "^$",
            "^$",
            "^saga\\.participant\\.payment$",
        ])
        .unwrap();
        user
    }

    fn amqp_url(&self, env: &TestEnv) -> String {
        format!(
            "amqp://{}:consume-only@127.0.0.1:5672/{}",
            self.name, env.name
        )
    }
}

impl Drop for ConsumeOnlyUser {
    fn drop(&mut self) {
        if let Err(e) = saga_testkit::rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

async fn effects(pool: &PgPool, saga_id: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT command, count(*) FROM effect_log WHERE saga_id = $1::uuid \
         GROUP BY command ORDER BY command",
    )
    .bind(saga_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn state(pool: &PgPool, table: &str, saga_id: &str) -> Option<String> {
    let sql = format!("SELECT state FROM {table} WHERE saga_id = $1::uuid");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(saga_id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

fn attempts<'a>(saga: &'a pb::Saga, step: &str) -> Vec<&'a pb::StepAttempt> {
    saga.attempts
        .iter()
        .filter(|a| a.step == step && a.kind == pb::CommandKind::Action as i32)
        .collect()
}

fn env() -> TestEnv {
    let name = format!("saga_t_{}", Uuid::new_v4().simple());
    let options = Options {
        demo_database: true,
        ..Options::default()
    };
    TestEnv::create(&name, options).unwrap()
}

/// The same sagas for both ways of replying: one completes (its payment panics once first), one
/// fails at the pivot and compensates.
async fn complete_and_compensate(sagad: &Sagad, pool: &PgPool) {
    let ok = sagad
        .start(json!({"order_id": "A-1", "amount_cents": 4200, "panic_once": "authorize_payment"}))
        .await;
    let failed = sagad
        .start(json!({"order_id": "A-2", "amount_cents": 10, "fail_at": "schedule_delivery"}))
        .await;

    let saga = sagad.wait_status(&ok, pb::SagaStatus::Completed).await;
    let pay = attempts(&saga, "authorize_payment");
    assert_eq!(pay.len(), 2, "{pay:?}");
    assert!(
        pay[0].reason.contains("panicked") && pay[0].reason.contains("bad day"),
        "{pay:?}"
    );
    assert_eq!(pay[1].outcome, pb::Outcome::Success as i32);
    let short = &ok.replace('-', "")[..8];
    let output: serde_json::Value = serde_json::from_str(&pay[1].output_json).unwrap();
    assert_eq!(output, json!({"authorization": format!("auth-{short}")}));
    let approve = attempts(&saga, "approve_order");
    let output: serde_json::Value = serde_json::from_str(&approve[0].output_json).unwrap();
    assert_eq!(output, json!({"approved_ref": format!("ord-{short}")}));
    assert_eq!(
        state(pool, "orders", &ok).await.as_deref(),
        Some("approved")
    );
    assert_eq!(
        state(pool, "payments", &ok).await.as_deref(),
        Some("authorized")
    );
    assert_eq!(
        state(pool, "deliveries", &ok).await.as_deref(),
        Some("scheduled")
    );
    // The attempt that panicked applied nothing: one effect per step.
    let once = |c: &str| (c.to_string(), 1);
    assert_eq!(
        effects(pool, &ok).await,
        [
            once("approve_order"),
            once("authorize_payment"),
            once("create_order"),
            once("schedule_delivery")
        ]
    );

    sagad
        .wait_status(&failed, pb::SagaStatus::Compensated)
        .await;
    assert_eq!(
        state(pool, "orders", &failed).await.as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        state(pool, "payments", &failed).await.as_deref(),
        Some("refunded")
    );
    assert_eq!(state(pool, "deliveries", &failed).await, None);
    assert_eq!(
        effects(pool, &failed).await,
        [
            once("authorize_payment"),
            once("cancel_order"),
            once("create_order"),
            once("refund_payment")
        ]
    );
}

#[tokio::test]
async fn sagas_complete_and_compensate_with_sdk_participants() {
    init_tracing();
    let env = env();
    let sagad = Sagad::spawn(&env, &[], None).await;
    let (pool, running) = start_shop(&env, None).await;
    complete_and_compensate(&sagad, &pool).await;
    for r in running {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_participant_that_replies_over_grpc_takes_part_like_the_others() {
    init_tracing();
    let env = env();
    let tokens = saga_testkit::definitions_dir(&[(
        "tokens.toml",
        &format!(
            "[[token]]\nname = \"checkout\"\nscope = \"participant\"\ntoken = \"{CHECKOUT_TOKEN}\"\n\n\
             [[token]]\nname = \"payment-service\"\nscope = \"participant\"\ntoken = \"{PAYMENT_TOKEN}\"\n\
             participants = [\"payment\"]\n"
        ),
    )]);
    let tokens_file = tokens.path().join("tokens.toml");
    let sagad = Sagad::spawn(
        &env,
        &["--tokens-file", tokens_file.to_str().unwrap()],
        Some(CHECKOUT_TOKEN),
    )
    .await;
    let endpoint = format!("http://{}", sagad.addr);
    let grpc = GrpcReplies::new(endpoint).token(PAYMENT_TOKEN);
    // The payment service may not publish at all: a reply sent to the broker would close its
    // channel (ACCESS_REFUSED) and no payment step would ever complete.
    let user = ConsumeOnlyUser::create(&env);
    let (pool, running) = start_shop(&env, Some((grpc, user.amqp_url(&env)))).await;
    complete_and_compensate(&sagad, &pool).await;
    for r in running {
        r.stop().await;
    }
}
