//! Sagas in flight when sagad is upgraded from the corridor shape (one cursor per saga) to step
//! states: the migration converts them exactly as the engine's `GraphState::from_linear` does,
//! and they finish on the new build.

use std::time::Duration;

use saga::definition::{self, Definition};
use saga::engine::{Kind, SagaState, Status, Waiting};
use saga::graph::{GraphState, StepState};
use saga::proto::v1 as pb;
use serde_json::{Value, json};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::helpers::*;

/// The last migration of the corridor shape.
const BEFORE_STEP_STATES: i64 = 20261202000001;

fn order_fulfillment() -> Definition {
    definition::load_dir(&repo_sagas())
        .unwrap()
        .into_iter()
        .find(|d| d.name == "order_fulfillment")
        .unwrap()
}

/// A database as the previous build left it, with `def` stored.
async fn old_database(env: &TestEnv, def: &Definition) -> PgPool {
    let pool = env.pool().await;
    sqlx::migrate!("./migrations")
        .run_to(BEFORE_STEP_STATES, &pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO saga_definitions (name, version, body) VALUES ($1, $2, $3)")
        .bind(&def.name)
        .bind(def.version as i32)
        .bind(serde_json::to_value(def).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    pool
}

/// Writes a saga row on the corridor shape, as the previous build's transition statement did.
async fn insert_old(pool: &PgPool, def: &Definition, state: &SagaState, outputs: Value) -> Uuid {
    let id = Uuid::now_v7();
    let (command_id, wake_at) = match state.waiting {
        Waiting::Nothing => (None, None),
        Waiting::Reply {
            command_id,
            deadline,
        } => (Some(command_id), Some(deadline)),
        Waiting::Retry { at } => (None, Some(at)),
    };
    let step = (!state.status.is_terminal()).then(|| &def.steps[state.step]);
    sqlx::query(
        "INSERT INTO sagas (id, definition, definition_version, status, step, kind, attempt, command_id, \
         wake_at, input, outputs, error, created_at, updated_at, current_step, current_participant) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, now(), now(), $13, $14)",
    )
    .bind(id)
    .bind(&def.name)
    .bind(def.version as i32)
    .bind(state.status.as_str())
    .bind(state.step as i32)
    .bind(state.kind.as_str())
    .bind(state.attempt as i32)
    .bind(command_id)
    .bind(wake_at)
    .bind(json!({"order_id": "U-1"}))
    .bind(outputs)
    .bind(&state.error)
    .bind(step.map(|s| s.name.clone()))
    .bind(step.map(|s| s.participant.clone()))
    .execute(pool)
    .await
    .unwrap();
    id
}

/// A command the previous build sent for `saga`, answered with `output` or still awaited.
async fn insert_attempt(
    pool: &PgPool,
    saga: Uuid,
    def: &Definition,
    step: usize,
    command_id: Uuid,
    output: Option<Value>,
) {
    let s = &def.steps[step];
    sqlx::query(
        "INSERT INTO step_attempts (command_id, saga_id, step_index, step, participant, kind, attempt, \
         sent_at, deadline, replied_at, outcome, output) \
         VALUES ($1, $2, $3, $4, $5, 'action', 1, now(), now() + interval '1 minute', \
                 CASE WHEN $6::jsonb IS NULL THEN NULL ELSE now() END, \
                 CASE WHEN $6::jsonb IS NULL THEN NULL ELSE 'success' END, $6)",
    )
    .bind(command_id)
    .bind(saga)
    .bind(step as i32)
    .bind(&s.name)
    .bind(&s.participant)
    .bind(output)
    .execute(pool)
    .await
    .unwrap();
}

fn state(status: Status, step: usize, kind: Kind, attempt: u32, waiting: Waiting) -> SagaState {
    SagaState {
        status,
        step,
        kind,
        attempt,
        waiting,
        error: matches!(status, Status::Compensating | Status::NeedsOperator)
            .then(|| "authorize_payment failed: card declined".to_string()),
    }
}

#[tokio::test]
async fn the_migration_converts_sagas_in_flight_as_the_engine_does() {
    let env = TestEnv::new();
    let def = order_fulfillment();
    let pool = old_database(&env, &def).await;
    // Microseconds: what PostgreSQL keeps of a time.
    let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
        + time::Duration::microseconds(123_456);
    let reply = |c: u128| Waiting::Reply {
        command_id: Uuid::from_u128(c),
        deadline: at,
    };
    let retry = Waiting::Retry { at };
    use Kind::{Action, Compensation};
    use Status::{Compensating, NeedsOperator, Running};
    let cases = [
        state(Running, 0, Action, 0, Waiting::Nothing),
        state(Running, 0, Action, 1, reply(1)),
        state(Running, 1, Action, 2, retry),
        state(Running, 2, Action, 1, reply(2)),
        state(Running, 3, Action, 7, retry),
        state(Running, 1, Action, 1, Waiting::Nothing),
        state(Compensating, 1, Compensation, 1, reply(3)),
        state(Compensating, 0, Compensation, 4, retry),
        state(Compensating, 2, Compensation, 2, reply(4)),
        state(NeedsOperator, 1, Compensation, 10, Waiting::Nothing),
    ];
    let mut ids = Vec::new();
    for s in &cases {
        ids.push(insert_old(&pool, &def, s, json!({})).await);
    }
    let ended = insert_old(
        &pool,
        &def,
        &state(Status::Completed, 3, Action, 1, Waiting::Nothing),
        json!({}),
    )
    .await;

    sqlx::migrate!("./migrations").run(&pool).await.unwrap();

    for (id, old) in ids.iter().zip(&cases) {
        let expected = GraphState::from_linear(&def, old);
        let (graph, error, current, participants, commands): (
            Value,
            Option<String>,
            Vec<String>,
            Vec<String>,
            Vec<Uuid>,
        ) = sqlx::query_as(
            "SELECT graph, error, current_steps, current_participants, command_ids FROM sagas WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        let steps: Vec<StepState> = serde_json::from_value(graph["steps"].clone()).unwrap();
        assert_eq!(steps, expected.steps, "{old:?}");
        assert_eq!(graph["started"], json!(expected.started), "{old:?}");
        assert_eq!(graph["turned"], json!(expected.turned), "{old:?}");
        assert_eq!(error, expected.error, "{old:?}");
        let names: Vec<String> = expected
            .current()
            .map(|i| def.steps[i].name.clone())
            .collect();
        assert_eq!(current, names, "{old:?}");
        let on: Vec<String> = expected
            .current()
            .map(|i| def.steps[i].participant.clone())
            .collect();
        assert_eq!(participants, on, "{old:?}");
        let awaited: Vec<Uuid> = expected
            .steps
            .iter()
            .filter_map(StepState::command_id)
            .collect();
        assert_eq!(commands, awaited, "{old:?}");
    }
    // Ended sagas keep their status and no step states.
    let (status, graph): (String, Option<Value>) =
        sqlx::query_as("SELECT status, graph FROM sagas WHERE id = $1")
            .bind(ended)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), graph), ("completed", None));
}

#[tokio::test]
async fn sagas_in_flight_before_the_upgrade_finish_after_it() {
    let env = TestEnv::new();
    let def = order_fulfillment();
    let pool = old_database(&env, &def).await;
    let now = OffsetDateTime::now_utc();
    let created = json!({"create_order": {"order_ref": "ord-old"}});

    // Waiting for the payment's reply, which arrives after the upgrade.
    let awaited = Uuid::now_v7();
    let waiting = insert_old(
        &pool,
        &def,
        &state(
            Status::Running,
            1,
            Kind::Action,
            1,
            Waiting::Reply {
                command_id: awaited,
                deadline: now + Duration::from_secs(60),
            },
        ),
        created.clone(),
    )
    .await;
    insert_attempt(
        &pool,
        waiting,
        &def,
        0,
        Uuid::now_v7(),
        Some(json!({"order_ref": "ord-old"})),
    )
    .await;
    insert_attempt(&pool, waiting, &def, 1, awaited, None).await;
    // Backing off before the delivery's second attempt, due now.
    let retrying = insert_old(
        &pool,
        &def,
        &state(
            Status::Running,
            2,
            Kind::Action,
            1,
            Waiting::Retry {
                at: now - Duration::from_secs(1),
            },
        ),
        json!({"create_order": {}, "authorize_payment": {}}),
    )
    .await;
    // Compensating: the order's cancellation is due again.
    let compensating = insert_old(
        &pool,
        &def,
        &state(
            Status::Compensating,
            0,
            Kind::Compensation,
            1,
            Waiting::Retry {
                at: now - Duration::from_secs(1),
            },
        ),
        created,
    )
    .await;

    // The new build: migrations run at start-up.
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let demo = spawn_demo(&env, |_| {});
    let mut client = app.client.clone();
    client
        .report_step_result(pb::ReportStepResultRequest {
            command_id: awaited.to_string(),
            outcome: pb::Outcome::Success as i32,
            output_json: json!({"authorization": "auth-old"}).to_string(),
            reason: String::new(),
            retryable: false,
        })
        .await
        .unwrap();

    let within = Duration::from_secs(30);
    for (id, status) in [
        (waiting, pb::SagaStatus::Completed),
        (retrying, pb::SagaStatus::Completed),
        (compensating, pb::SagaStatus::Compensated),
    ] {
        let saga = wait_for_status(&mut client, &id.to_string(), status, within).await;
        let states: Vec<&str> = saga.steps.iter().map(|s| s.state.as_str()).collect();
        match status {
            pb::SagaStatus::Completed => assert_eq!(states, ["succeeded"; 4]),
            _ => assert_eq!(
                states,
                ["compensated", "compensated", "compensated", "pending"]
            ),
        }
    }
    // The reply given after the upgrade is the one the saga carried on with.
    let saga = wait_for_status(
        &mut client,
        &waiting.to_string(),
        pb::SagaStatus::Completed,
        within,
    )
    .await;
    let outputs: Value = serde_json::from_str(&saga.outputs_json).unwrap();
    assert_eq!(
        outputs["authorize_payment"],
        json!({"authorization": "auth-old"})
    );
    assert_eq!(
        effects(&pool, &waiting.to_string()).await["delivery"],
        "scheduled"
    );
    demo.stop().await;
    app.stop().await;
}
