//! The real `sagactl` binary against an in-process sagad with authentication on. No participant
//! runs, so every saga waits at its first step until the test answers for a participant (via
//! ReportStepResult) or an operator repairs it; every assertion on an effect reads the saga back.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use saga::proto::v1 as pb;
use saga::proto::v1::admin_service_client::AdminServiceClient;
use saga::proto::v1::saga_service_client::SagaServiceClient;
use serde_json::{Value, json};

use crate::helpers::*;

const TOKEN: &str = "sagactl-test-operator-token-0123456789";

pub(crate) struct Harness {
    _env: TestEnv,
    _defs: tempfile::TempDir,
    app: TestApp,
    sagas: SagaServiceClient<AuthChannel>,
    admin: AdminServiceClient<AuthChannel>,
}

/// The repository's order_fulfillment, but with hour-long step timeouts: nothing times out or
/// retries by itself while a test looks at attempt counts.
fn patient_definition() -> String {
    let text = std::fs::read_to_string(repo_sagas().join("order_fulfillment.toml")).unwrap();
    let patient = text
        .replace("timeout = \"10s\"", "timeout = \"1h\"")
        .replace("timeout = \"15s\"", "timeout = \"1h\"");
    assert_eq!(patient.matches("\"1h\"").count(), 2, "the timeouts moved");
    patient
}

pub(crate) async fn harness() -> Harness {
    let env = TestEnv::new();
    let defs = definitions_dir(&[("order_fulfillment.toml", &patient_definition())]);
    let mut settings = env.settings(defs.path());
    settings.operator_token = Some(TOKEN.to_owned());
    let app = spawn_app(settings).await;
    let (sagas, admin) = clients(app.addr, Some(TOKEN)).await;
    Harness {
        _env: env,
        _defs: defs,
        sagas,
        admin,
        app,
    }
}

pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    /// stdout, after checking the command succeeded.
    pub(crate) fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "sagactl failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

fn sagactl_command(h: &Harness, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(saga_testkit::built_bin("sagactl"));
    cmd.env_remove("SAGA_SERVER")
        .env_remove("SAGA_TOKEN")
        .arg("--server")
        .arg(format!("http://{}", h.app.addr))
        .args(["--timeout", "30s"]);
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// Runs sagactl to its end on the blocking pool, so the in-process sagad keeps serving.
pub(crate) async fn sagactl_as(h: &Harness, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = sagactl_command(h, token, args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("sagactl runs"))
        .await
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

pub(crate) async fn sagactl(h: &Harness, args: &[&str]) -> Run {
    sagactl_as(h, Some(TOKEN), args).await
}

pub(crate) async fn start_sagas(h: &Harness, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let resp = h
            .sagas
            .clone()
            .start_saga(pb::StartSagaRequest {
                definition: "order_fulfillment".into(),
                input_json: json!({"order_id": format!("A-{i}")}).to_string(),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(resp.saga_id);
    }
    ids
}

async fn get(h: &Harness, id: &str) -> pb::Saga {
    h.sagas
        .clone()
        .get_saga(pb::GetSagaRequest {
            saga_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Answers the saga's pending command with success, as its participant would.
async fn succeed_current(h: &Harness, id: &str) {
    let saga = get(h, id).await;
    let pending = saga
        .attempts
        .iter()
        .rev()
        .find(|a| a.outcome == pb::Outcome::Unspecified as i32 && !a.superseded && !a.timed_out)
        .unwrap_or_else(|| panic!("saga {id} has no pending command: {saga:#?}"));
    let resp = h
        .sagas
        .clone()
        .report_step_result(pb::ReportStepResultRequest {
            command_id: pending.command_id.clone(),
            outcome: pb::Outcome::Success as i32,
            output_json: "{}".into(),
            reason: String::new(),
            retryable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.applied);
}

/// How many attempts of `step` the saga made.
fn attempts_of(saga: &pb::Saga, step: &str) -> usize {
    saga.attempts.iter().filter(|a| a.step == step).count()
}

fn ids_in(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().or_else(|| s["id"].as_str()).unwrap().to_owned())
        .collect()
}

/// The next line a running sagactl printed, `None` once its stdout closed; fails after 20s.
async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(20), lines.recv())
        .await
        .expect("a line (or the end of output) within 20s")
}

async fn run(h: &Harness, args: Vec<String>) -> Run {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sagactl(h, &args).await
}

/// Attempts per saga, in the order of `ids`.
async fn attempt_counts(h: &Harness, ids: &[String]) -> Vec<usize> {
    let mut counts = Vec::new();
    for id in ids {
        counts.push(get(h, id).await.attempts.len());
    }
    counts
}

async fn participant(h: &Harness, name: &str) -> pb::Participant {
    h.admin
        .clone()
        .list_participants(pb::ListParticipantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .participants
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no participant {name}"))
}

#[tokio::test]
async fn sagactl_lists_shows_retries_and_watches_with_auth() {
    let h = harness().await;
    // No participant runs: each saga waits for create_order's reply.
    let ids = start_sagas(&h, 3).await;
    let all: BTreeSet<String> = ids.iter().cloned().collect();

    // list, as a table and as JSON.
    let table = sagactl(&h, &["list"]).await;
    let text = table.ok();
    assert!(text.starts_with("ID"), "{text}");
    for id in &ids {
        let row = text
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} missing:\n{text}"));
        assert!(row.contains("order_fulfillment@1"), "{row}");
        assert!(
            row.contains("running") && row.contains("create_order"),
            "{row}"
        );
    }
    let listed = sagactl(&h, &["list", "--output", "json"]).await.json();
    assert_eq!(ids_in(&listed["sagas"]), all);
    assert!(
        listed["sagas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "running" && s["current_step"] == "create_order")
    );
    assert_eq!(listed["next_page_token"], Value::Null);

    // The new filters reach the server.
    let matching = |args: &'static [&'static str]| {
        let h = &h;
        async move {
            let mut full = vec!["list", "--output", "json"];
            full.extend_from_slice(args);
            ids_in(&sagactl(h, &full).await.json()["sagas"])
        }
    };
    assert_eq!(
        matching(&[
            "--step",
            "create_order",
            "--participant",
            "order",
            "--definition",
            "order_fulfillment",
            "--definition-version",
            "1",
            "--status",
            "running",
            "--created-after",
            "2000-01-01T00:00:00Z",
        ])
        .await,
        all
    );
    assert!(matching(&["--step", "authorize_payment"]).await.is_empty());
    assert!(matching(&["--participant", "payment"]).await.is_empty());
    assert!(
        matching(&[
            "--definition-version",
            "2",
            "--definition",
            "order_fulfillment"
        ])
        .await
        .is_empty()
    );
    assert!(matching(&["--stuck-for", "1h"]).await.is_empty());
    assert!(
        matching(&["--created-before", "2000-01-01T00:00:00Z"])
            .await
            .is_empty()
    );
    assert!(matching(&["--error", "declined"]).await.is_empty());
    assert!(matching(&["--status", "resolved"]).await.is_empty());

    // show
    let shown = sagactl(&h, &["show", &ids[0]]).await;
    let text = shown.ok();
    assert!(
        text.starts_with(&format!("id:              {}\n", ids[0])),
        "{text}"
    );
    let (graph, attempts) = text.split_once("step attempts:").unwrap();
    let step = graph
        .lines()
        .find(|l| l.starts_with("create_order"))
        .unwrap();
    assert!(step.contains("running") && step.contains("order"), "{step}");
    let row = attempts
        .lines()
        .find(|l| l.starts_with("create_order"))
        .unwrap();
    assert!(row.contains("pending") && row.contains("order"), "{row}");
    let shown = sagactl(&h, &["show", &ids[0], "--output", "json"])
        .await
        .json();
    assert_eq!(shown["id"], ids[0].as_str());
    assert_eq!(shown["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(shown["attempts"][0]["superseded"], false);

    // retry: a second attempt of create_order, the first superseded, the operator on record.
    let reason = "order service restarted";
    let retried = sagactl(&h, &["retry", &ids[0], "--reason", reason]).await;
    let text = retried.ok();
    assert!(
        text.starts_with(&format!("retried the current step (saga {})\n", ids[0])),
        "{text}"
    );
    let saga = get(&h, &ids[0]).await;
    assert_eq!(saga.status, pb::SagaStatus::Running as i32);
    assert_eq!(attempts_of(&saga, "create_order"), 2, "{saga:#?}");
    assert!(saga.attempts[0].superseded);
    assert_eq!(saga.attempts[1].attempt, 2);
    assert!(!saga.attempts[1].superseded);
    let actions = operator_actions(&saga);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["action"], "retry");
    assert_eq!(actions[0]["actor"], "operator");
    assert_eq!(actions[0]["reason"], reason);
    // The rendering printed by retry is the saga after the repair.
    let superseded = text
        .lines()
        .find(|l| l.starts_with("create_order") && l.contains("superseded"));
    assert!(superseded.is_some(), "{text}");
    // The other sagas were not touched.
    for id in &ids[1..] {
        let other = get(&h, id).await;
        assert_eq!(other.attempts.len(), 1);
        assert!(operator_actions(&other).is_empty());
    }

    // A wrong token, or none: one clear line, exit 1, the token never echoed, nothing done.
    let wrong = "wrong-token-but-long-enough-42";
    let denied = sagactl_as(&h, Some(wrong), &["retry", &ids[0], "--reason", "x"]).await;
    assert_eq!(denied.code, Some(1), "{}", denied.stderr);
    assert!(
        denied.stderr.starts_with("error: UNAUTHENTICATED"),
        "{}",
        denied.stderr
    );
    assert_eq!(denied.stderr.lines().count(), 1, "{}", denied.stderr);
    assert!(!denied.stderr.contains(wrong) && !denied.stdout.contains(wrong));
    assert!(denied.stdout.is_empty());
    assert_eq!(attempts_of(&get(&h, &ids[0]).await, "create_order"), 2);
    let anonymous = sagactl_as(&h, None, &["list"]).await;
    assert_eq!(anonymous.code, Some(1));
    assert!(
        anonymous.stderr.starts_with("error: UNAUTHENTICATED"),
        "{}",
        anonymous.stderr
    );
    assert!(!anonymous.stderr.contains(TOKEN));

    // counts and participants see the waiting sagas.
    let counts = sagactl(&h, &["counts", "--output", "json"]).await.json();
    assert_eq!(
        counts["by_status"],
        json!([{"status": "running", "count": 3}])
    );
    let at_create = counts["by_step"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["step"] == "create_order")
        .unwrap();
    assert_eq!(at_create["participant"], "order");
    assert_eq!(at_create["count"], 3);
    let text = sagactl(&h, &["counts"]).await.ok().to_owned();
    assert!(text.contains("unfinished sagas by step:"), "{text}");
    let text = sagactl(&h, &["participants"]).await.ok().to_owned();
    for p in ["order", "payment", "delivery"] {
        assert!(text.lines().any(|l| l.starts_with(p)), "{p}:\n{text}");
    }
    let paused = sagactl(
        &h,
        &["pause", "payment", "--reason", "provider maintenance"],
    )
    .await;
    assert!(
        paused
            .ok()
            .starts_with("participant payment is paused by operator: provider maintenance"),
        "{}",
        paused.stdout
    );
    let p = participant(&h, "payment").await;
    assert!(p.paused);
    assert_eq!(
        (p.paused_by.as_str(), p.paused_reason.as_str()),
        ("operator", "provider maintenance")
    );
    sagactl(&h, &["resume", "payment"]).await.ok();
    assert!(!participant(&h, "payment").await.paused);

    // watch: the recorded events come at once, new ones as they happen, and the stream (and
    // the command) ends with the saga.
    let watched = ids[1].clone();
    let mut child = sagactl_command(&h, Some(TOKEN), &["watch", &watched])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::task::spawn_blocking(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = next_line(&mut lines).await.expect("a first line");
    assert!(first.contains("saga_started"), "{first}");
    // Before anything else happens, the saga is still running and watch still runs.
    assert!(child.try_wait().unwrap().is_none());
    let mut seen = vec![first];
    for _step in 0..4 {
        succeed_current(&h, &watched).await;
    }
    while let Some(line) = next_line(&mut lines).await {
        seen.push(line);
    }
    reader.await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let saga = get(&h, &watched).await;
    assert_eq!(saga.status, pb::SagaStatus::Completed as i32);
    // One line per history event, in order, ending with the completion.
    assert_eq!(seen.len(), saga.history.len(), "{seen:#?}");
    for (line, event) in seen.iter().zip(&saga.history) {
        assert!(
            line.trim_start().starts_with(&format!("{}  ", event.seq))
                && line.contains(&event.kind),
            "{line} vs {event:?}"
        );
    }
    assert!(seen.last().unwrap().contains("saga_completed"));

    // On a finished saga, json mode replays what follows --after-seq and exits.
    let after = saga.history[1].seq;
    let replay = sagactl(
        &h,
        &[
            "watch",
            &watched,
            "--output",
            "json",
            "--after-seq",
            &after.to_string(),
        ],
    )
    .await;
    let events: Vec<Value> = replay
        .ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), saga.history.len() - 2);
    assert!(events.iter().all(|e| e["seq"].as_i64().unwrap() > after));
    assert_eq!(events.last().unwrap()["kind"], "saga_completed");

    h.app.stop().await;
}

#[tokio::test]
async fn sagactl_redrive_moves_exactly_the_matching_sagas() {
    let h = harness().await;
    let ids = start_sagas(&h, 5).await;
    // Two sagas move on to authorize_payment; three stay at create_order.
    for id in &ids[3..] {
        succeed_current(&h, id).await;
        assert_eq!(get(&h, id).await.current_step, "authorize_payment");
    }
    let waiting: BTreeSet<String> = ids[..3].iter().cloned().collect();
    let before = attempt_counts(&h, &ids).await;
    assert_eq!(before, [1, 1, 1, 2, 2]);
    let reason = "order service is back";
    let redrive = |extra: &[&str]| {
        let mut args = vec!["redrive", "--step", "create_order", "--reason", reason];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };

    // A dry run lists the three and moves nothing.
    let dry = run(&h, redrive(&["--dry-run"])).await;
    let text = dry.ok();
    assert!(text.starts_with("3 sagas match the filter:\n"), "{text}");
    for id in &ids[..3] {
        assert!(text.contains(&format!("  {id}\n")), "{text}");
    }
    for id in &ids[3..] {
        assert!(!text.contains(id.as_str()), "{text}");
    }
    assert!(text.ends_with("dry run: nothing was retried\n"), "{text}");
    let dry = run(&h, redrive(&["--dry-run", "--output", "json"]))
        .await
        .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 3);
    assert_eq!(ids_in(&dry["saga_ids"]), waiting);
    assert_eq!(attempt_counts(&h, &ids).await, before);

    // Without --yes and without a terminal to ask on, it refuses, and moves nothing.
    let refused = run(&h, redrive(&[])).await;
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.starts_with("error: 3 sagas match"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert_eq!(attempt_counts(&h, &ids).await, before);

    // With --yes, in batches of two: exactly the three waiting at create_order are retried.
    let done = run(&h, redrive(&["--yes", "--batch-size", "2"])).await;
    assert_eq!(done.ok(), "matched 3, retried 3, skipped 0\n");
    assert!(
        done.stderr.contains("3 sagas match the filter:"),
        "{}",
        done.stderr
    );
    assert_eq!(attempt_counts(&h, &ids).await, [2, 2, 2, 2, 2]);
    for id in &ids[..3] {
        let saga = get(&h, id).await;
        assert_eq!(attempts_of(&saga, "create_order"), 2);
        assert!(saga.attempts[0].superseded);
        let actions = operator_actions(&saga);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(actions[0]["actor"], "operator");
        assert_eq!(actions[0]["reason"], reason);
    }
    for id in &ids[3..] {
        let saga = get(&h, id).await;
        assert_eq!(attempts_of(&saga, "create_order"), 1);
        assert_eq!(attempts_of(&saga, "authorize_payment"), 1);
        assert!(operator_actions(&saga).is_empty());
    }

    // --limit bounds it; json mode reports the final progress.
    let one = run(&h, redrive(&["--yes", "--limit", "1", "--output", "json"]))
        .await
        .json();
    assert_eq!(
        (
            &one["matched"],
            &one["retried"],
            &one["skipped"],
            &one["dry_run"]
        ),
        (&json!(1), &json!(1), &json!(0), &json!(false))
    );
    let moved = ids_in(&one["saga_ids"]);
    assert_eq!(moved.len(), 1);
    assert!(moved.is_subset(&waiting));
    let after = attempt_counts(&h, &ids).await;
    for (id, count) in ids.iter().zip(after) {
        let expected = if moved.contains(id) { 3 } else { 2 };
        assert_eq!(count, expected, "{id}");
    }

    h.app.stop().await;
}
