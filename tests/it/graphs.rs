//! Sagas as graphs on the real servers, with the participants played by hand so that the order
//! of every reply is the test's: parallel branches leave together, a join waits for all of
//! them, a false condition sends nothing, mapped inputs are exactly what the definition says, and
//! a failure in one branch waits for its sibling in flight before compensating in reverse graph
//! order.

use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::{Channel, Consumer};
use saga::proto::v1 as pb;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel as GrpcChannel;

use crate::helpers::*;

/// open -> (pay ∥ stock, when input.reserve) -> ship (pivot)
const BRANCHES: &str = r#"
name = "branches"
version = 1

[defaults]
timeout = "30s"
retry = { max_attempts = 2, initial_backoff = "100ms", max_backoff = "1s", multiplier = 2.0 }

[[steps]]
name = "open"
participant = "desk"
action = "open"
compensation = "close"

[[steps]]
name = "pay"
after = ["open"]
participant = "bank"
action = "charge"
compensation = "refund"
[steps.input]
ticket = "${steps.open.output.ticket}"
amount = "${input.amount}"
currency = "KRW"
[steps.compensation_input]
charge_id = "${steps.pay.output.charge_id}"

[[steps]]
name = "stock"
after = ["open"]
when = "input.reserve"
participant = "store"
action = "reserve"
compensation = "release"

[[steps]]
name = "ship"
after = ["pay", "stock"]
participant = "courier"
action = "ship"
pivot = true
"#;

struct Harness {
    app: TestApp,
    _dir: tempfile::TempDir,
    _conn: lapin::Connection,
    ch: Channel,
    desk: Consumer,
    bank: Consumer,
    store: Consumer,
    courier: Consumer,
}

async fn harness(env: &TestEnv) -> Harness {
    let dir = definitions_dir(&[("branches.toml", BRANCHES)]);
    let app = spawn_app(env.settings(dir.path())).await;
    let (conn, ch) = amqp_channel(env).await;
    Harness {
        desk: consume(&ch, "saga.participant.desk").await,
        bank: consume(&ch, "saga.participant.bank").await,
        store: consume(&ch, "saga.participant.store").await,
        courier: consume(&ch, "saga.participant.courier").await,
        app,
        _dir: dir,
        _conn: conn,
        ch,
    }
}

impl Harness {
    async fn start(&mut self, input: Value) -> String {
        self.app
            .client
            .start_saga(pb::StartSagaRequest {
                definition: "branches".into(),
                input_json: input.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .saga_id
    }

    /// Takes the desk's `open` command and answers it with `ticket`; returns the command.
    async fn open(&mut self, ticket: &str) -> Value {
        let open = command(&mut self.desk).await;
        self.answer(&open, success(json!({ "ticket": ticket })))
            .await;
        open
    }

    /// The two branches' commands, (pay, stock), neither answered.
    async fn branches(&mut self) -> (Value, Value) {
        (
            command(&mut self.bank).await,
            command(&mut self.store).await,
        )
    }

    async fn answer(&self, command: &Value, outcome: Value) {
        let mut reply_body = json!({"command_id": command["command_id"]});
        if let (Value::Object(r), Value::Object(o)) = (&mut reply_body, outcome) {
            r.extend(o);
        }
        reply(&self.ch, "saga.replies", reply_body).await;
    }
}

/// The next command on a participant's queue, acknowledged, as its JSON body.
async fn command(consumer: &mut Consumer) -> Value {
    let d = next(consumer).await;
    d.ack(BasicAckOptions::default()).await.unwrap();
    serde_json::from_slice(&d.data).unwrap()
}

fn success(output: Value) -> Value {
    json!({"outcome": "success", "output": output})
}

fn failure(reason: &str) -> Value {
    json!({"outcome": "failure", "reason": reason, "retryable": false})
}

/// GetSaga until `ready` holds; fails with the saga after 10 s.
async fn saga_when(
    client: &mut SagaServiceClient<GrpcChannel>,
    id: &str,
    ready: impl Fn(&pb::Saga) -> bool,
) -> pb::Saga {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let saga = client
            .get_saga(pb::GetSagaRequest {
                saga_id: id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        if ready(&saga) {
            return saga;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {id} never got there: {saga:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn state_of<'s>(saga: &'s pb::Saga, step: &str) -> &'s str {
    saga.steps
        .iter()
        .find(|s| s.name == step)
        .map_or("", |s| s.state.as_str())
}

fn states(saga: &pb::Saga) -> Vec<(&str, &str)> {
    saga.steps
        .iter()
        .map(|s| (s.name.as_str(), s.state.as_str()))
        .collect()
}

#[tokio::test]
async fn parallel_branches_leave_together_and_the_join_waits_for_all_of_them() {
    let env = TestEnv::new();
    let mut h = harness(&env).await;
    let input = json!({"amount": 4200, "reserve": true, "note": "leave at the door"});
    let id = h.start(input.clone()).await;

    // A step without a mapping gets the saga's input and the outputs so far.
    let open = h.open("T-1").await;
    assert_eq!((&open["input"], &open["outputs"]), (&input, &json!({})));

    // Both branches' commands arrive before either is answered.
    let (pay, stock) = h.branches().await;
    // A mapped input is exactly the mapping's result (numbers stay numbers), with no outputs.
    assert_eq!(
        pay["input"],
        json!({"ticket": "T-1", "amount": 4200, "currency": "KRW"})
    );
    assert_eq!(pay["outputs"], json!({}));
    assert_eq!(stock["input"], input);
    assert_eq!(stock["outputs"], json!({"open": {"ticket": "T-1"}}));
    let saga = saga_when(&mut h.app.client, &id, |s| {
        state_of(s, "pay") == "running" && state_of(s, "stock") == "running"
    })
    .await;
    assert_eq!(saga.current_steps, ["pay", "stock"]);
    // One transition sent both: they share its time.
    let sent = |step: &str| {
        saga.attempts
            .iter()
            .find(|a| a.step == step)
            .and_then(|a| a.sent_at)
    };
    assert_eq!(sent("pay"), sent("stock"));
    // The operator filters find the saga at either of its current steps.
    for (step, participant) in [("pay", ""), ("stock", ""), ("", "bank"), ("", "store")] {
        let found = h
            .app
            .client
            .list_sagas(pb::ListSagasRequest {
                step: step.into(),
                participant: participant.into(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sagas;
        assert_eq!(found.len(), 1, "{step}{participant}");
        assert_eq!(found[0].current_steps, ["pay", "stock"]);
    }

    // One branch done: the join still waits for the other, and sends nothing.
    h.answer(&pay, success(json!({"charge_id": "C-9"}))).await;
    let saga = saga_when(&mut h.app.client, &id, |s| {
        state_of(s, "pay") == "succeeded"
    })
    .await;
    assert_eq!(state_of(&saga, "ship"), "pending");
    assert!(saga.attempts.iter().all(|a| a.step != "ship"));
    assert_eq!(saga.current_steps, ["stock"]);

    h.answer(&stock, success(json!({"hold": "H-3"}))).await;
    let ship = command(&mut h.courier).await;
    assert_eq!(ship["step"], "ship");
    h.answer(&ship, success(json!({}))).await;
    let saga = wait_for_status(
        &mut h.app.client,
        &id,
        pb::SagaStatus::Completed,
        Duration::from_secs(10),
    )
    .await;
    assert!(saga.steps.iter().all(|s| s.state == "succeeded"));
    assert_eq!(
        saga.steps
            .iter()
            .find(|s| s.name == "ship")
            .map(|s| (s.after.clone(), s.pivot)),
        Some((vec!["pay".to_string(), "stock".to_string()], true))
    );
    h.app.stop().await;
}

#[tokio::test]
async fn a_false_condition_skips_its_step_and_sends_nothing_for_it() {
    let env = TestEnv::new();
    let mut h = harness(&env).await;
    let id = h.start(json!({"amount": 10, "reserve": false})).await;
    h.open("T-2").await;
    // Decided in the transition that sent the payment: skipped, never to be sent.
    let saga = saga_when(&mut h.app.client, &id, |s| state_of(s, "pay") == "running").await;
    assert_eq!(state_of(&saga, "stock"), "skipped");
    let skipped = saga
        .history
        .iter()
        .find(|e| e.kind == "step_skipped")
        .expect("the skip is in the history");
    assert_eq!(skipped.step, "stock");

    let pay = command(&mut h.bank).await;
    h.answer(&pay, success(json!({"charge_id": "C-1"}))).await;
    // The join counts a skipped step as done.
    let ship = command(&mut h.courier).await;
    h.answer(&ship, success(json!({}))).await;
    let saga = wait_for_status(
        &mut h.app.client,
        &id,
        pb::SagaStatus::Completed,
        Duration::from_secs(10),
    )
    .await;
    assert!(saga.attempts.iter().all(|a| a.step != "stock"));
    let outputs: Value = serde_json::from_str(&saga.outputs_json).unwrap();
    assert_eq!(outputs["stock"], Value::Null);
    assert!(outputs.as_object().unwrap().contains_key("stock"));
    h.app.stop().await;
}

#[tokio::test]
async fn a_failed_branch_waits_for_its_sibling_then_compensates_in_reverse_graph_order() {
    let env = TestEnv::new();
    let mut h = harness(&env).await;
    let id = h.start(json!({"amount": 4200, "reserve": true})).await;
    h.open("T-3").await;
    let (pay, stock) = h.branches().await;

    // The stock fails for good while the payment is still in flight: nothing is undone yet,
    // since the payment may still succeed and the order's cancellation must come after it.
    h.answer(&stock, failure("out of stock")).await;
    let saga = saga_when(&mut h.app.client, &id, |s| state_of(s, "stock") == "failed").await;
    assert_eq!(saga.status, pb::SagaStatus::Compensating as i32);
    assert_eq!(
        states(&saga),
        [
            ("open", "succeeded"),
            ("pay", "running"),
            ("stock", "failed"),
            ("ship", "pending")
        ]
    );
    assert!(saga.error.contains("out of stock"), "{}", saga.error);
    assert!(
        saga.attempts
            .iter()
            .all(|a| a.kind == pb::CommandKind::Action as i32)
    );

    // The payment succeeds after all: it is refunded, with its mapped compensation input, and
    // only then is the order closed.
    h.answer(&pay, success(json!({"charge_id": "C-7"}))).await;
    let refund = command(&mut h.bank).await;
    assert_eq!(
        (
            refund["command"].as_str(),
            &refund["input"],
            &refund["outputs"]
        ),
        (Some("refund"), &json!({"charge_id": "C-7"}), &json!({}))
    );
    let saga = saga_when(&mut h.app.client, &id, |s| {
        state_of(s, "pay") == "compensating"
    })
    .await;
    assert_eq!(state_of(&saga, "open"), "succeeded");
    h.answer(&refund, success(json!({}))).await;
    let close = command(&mut h.desk).await;
    assert_eq!(close["command"], "close");
    h.answer(&close, success(json!({}))).await;

    let saga = wait_for_status(
        &mut h.app.client,
        &id,
        pb::SagaStatus::Compensated,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        attempts(&saga),
        [
            ("open".into(), "action"),
            ("pay".into(), "action"),
            ("stock".into(), "action"),
            ("pay".into(), "compensation"),
            ("open".into(), "compensation"),
        ]
    );
    assert_eq!(
        states(&saga),
        [
            ("open", "compensated"),
            ("pay", "compensated"),
            ("stock", "failed"),
            ("ship", "pending")
        ]
    );
    h.app.stop().await;
}

#[tokio::test]
async fn a_repair_names_its_step_when_several_are_current() {
    let env = TestEnv::new();
    let mut h = harness(&env).await;
    let id = h.start(json!({"amount": 1, "reserve": true})).await;
    h.open("T-4").await;
    let (first, _stock) = h.branches().await;

    let (_, mut admin) = clients(h.app.addr, None).await;
    let retry = |step: &str| pb::RepairRequest {
        saga_id: id.clone(),
        reason: "payment gateway restarted".into(),
        step: step.into(),
    };
    let e = admin.retry_step(retry("")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("pay") && e.message().contains("stock"),
        "{}",
        e.message()
    );
    let e = admin.retry_step(retry("nope")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());

    let saga = admin
        .retry_step(retry("pay"))
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    let again = command(&mut h.bank).await;
    assert_eq!(again["attempt"], 2);
    assert_ne!(again["command_id"], first["command_id"]);
    let pay = saga.steps.iter().find(|s| s.name == "pay").unwrap();
    assert_eq!((pay.state.as_str(), pay.attempt), ("running", 2));
    let actions = operator_actions(&saga);
    assert_eq!(actions.len(), 1);
    h.app.stop().await;
}
