//! The definitions sagad knows, as operators read them: ListDefinitions and GetDefinition
//! (versions, retired ones, unfinished sagas per version, refusals), and `sagactl definitions` /
//! `sagactl definition`, and a graph's edges, condition and mappings as GetDefinition returns
//! them for the operator console to draw.

use saga::proto::v1 as pb;
use saga::proto::v1::admin_service_client::AdminServiceClient;
use serde_json::json;
use tonic::Code;

use crate::admin::{OPERATOR, PARTICIPANT, settings_with_auth};
use crate::helpers::*;
use crate::sagactl::{harness, sagactl, sagactl_as, start_sagas};

/// One step on participant `p`, which nobody consumes: its sagas wait until repaired.
fn one_step(name: &str, version: u32) -> String {
    format!(
        "name = \"{name}\"\nversion = {version}\n\n[[steps]]\nname = \"only\"\n\
         participant = \"p\"\naction = \"do_it\"\ncompensation = \"undo_it\"\n"
    )
}

async fn list(admin: &mut AdminServiceClient<AuthChannel>, name: &str) -> Vec<pb::Definition> {
    admin
        .list_definitions(pb::ListDefinitionsRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .definitions
}

async fn get(
    admin: &mut AdminServiceClient<AuthChannel>,
    name: &str,
    version: u32,
) -> Result<pb::Definition, tonic::Status> {
    admin
        .get_definition(pb::GetDefinitionRequest {
            name: name.into(),
            version,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// (name, version, current, retired, active sagas, steps) of each listed definition.
fn rows(defs: &[pb::Definition]) -> Vec<(&str, u32, bool, bool, u64, usize)> {
    defs.iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.version,
                d.current,
                d.retired,
                d.active_sagas,
                d.steps.len(),
            )
        })
        .collect()
}

/// Ships v1 and v2, then only v1, then neither: the listing follows which versions are current,
/// superseded and retired, and counts only the unfinished sagas of each version.
#[tokio::test]
async fn definitions_list_every_version_with_its_unfinished_sagas_and_get_picks_one() {
    let env = TestEnv::new();
    let v1 = one_step("versioned", 1);
    // v2 has a second step, written without `after`: it waits for the previous one.
    let v2 = one_step("versioned", 2)
        + "\n[[steps]]\nname = \"second\"\nparticipant = \"p\"\naction = \"do_second\"\n";
    let both = definitions_dir(&[("v1.toml", &v1), ("v2.toml", &v2)]);
    let app = spawn_app(settings_with_auth(&env, both.path())).await;
    let (mut sagas, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    // A superseded version whose file is still shipped is not retired.
    assert_eq!(
        rows(&list(&mut admin, "").await),
        [
            ("versioned", 2, true, false, 0, 2),
            ("versioned", 1, false, false, 0, 1)
        ]
    );
    start_definition(&mut sagas, "versioned", json!({})).await;
    app.stop().await;

    let only_v1 = definitions_dir(&[("v1.toml", &v1), ("order_fulfillment.toml", &order_text())]);
    let app = spawn_app(settings_with_auth(&env, only_v1.path())).await;
    let (mut sagas, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    start_definition(&mut sagas, "versioned", json!({})).await;
    let done = start_definition(&mut sagas, "versioned", json!({})).await;
    let repaired = admin
        .skip_step(pb::SkipStepRequest {
            saga_id: done.clone(),
            reason: "done by hand".into(),
            output_json: String::new(),
            step: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert_eq!(repaired.status, pb::SagaStatus::Completed as i32);
    // Sorted by name, newest version first; the finished saga is not counted.
    let all = list(&mut admin, "").await;
    assert_eq!(
        rows(&all),
        [
            ("order_fulfillment", 1, true, false, 0, 4),
            ("versioned", 2, false, true, 1, 2),
            ("versioned", 1, true, false, 1, 1)
        ]
    );
    assert_eq!(
        rows(&list(&mut admin, " versioned ").await),
        rows(&all[1..])
    );
    assert!(list(&mut admin, "nope").await.is_empty());

    // Version 0: the version new sagas start on, though a retired one is newer.
    let current = get(&mut admin, "versioned", 0).await.unwrap();
    assert_eq!(current, all[2]);
    let retired = get(&mut admin, "versioned", 2).await.unwrap();
    assert_eq!(retired, all[1]);
    let second = &retired.steps[1];
    assert_eq!(
        (second.name.as_str(), second.after.as_slice()),
        ("second", ["only".to_owned()].as_slice())
    );
    assert_eq!(retired.pivot_step, "second");
    assert!(retired.steps[0].after.is_empty() && second.pivot && !retired.steps[0].pivot);
    let order = get(&mut admin, "order_fulfillment", 1).await.unwrap();
    assert_eq!(
        order
            .steps
            .iter()
            .map(|s| s.after.clone())
            .collect::<Vec<_>>(),
        [
            vec![],
            vec!["create_order".to_owned()],
            vec!["authorize_payment".to_owned()],
            vec!["schedule_delivery".to_owned()]
        ]
    );
    assert_eq!(
        (order.steps[1].timeout, order.steps[3].after_pivot),
        (
            Some(prost_types::Duration {
                seconds: 15,
                nanos: 0
            }),
            true
        )
    );

    // Refusals say what is missing and what there is.
    let e = get(&mut admin, "versioned", 9).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .ends_with("has no version 9; known versions: 2, 1"),
        "{e:?}"
    );
    let e = get(&mut admin, "nope", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .ends_with("does not exist; known: order_fulfillment, versioned"),
        "{e:?}"
    );
    let e = get(&mut admin, " ", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Operators only, as every AdminService call.
    let (_, mut as_participant) = clients(app.addr, Some(PARTICIPANT)).await;
    let (_, mut anonymous) = clients(app.addr, None).await;
    for (client, code) in [
        (&mut as_participant, Code::PermissionDenied),
        (&mut anonymous, Code::Unauthenticated),
    ] {
        let e = client
            .list_definitions(pb::ListDefinitionsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), code);
        assert_eq!(get(client, "versioned", 0).await.unwrap_err().code(), code);
    }
    app.stop().await;

    // No file of it at all: every version retired, and version 0 is the newest of them.
    let neither = definitions_dir(&[("order_fulfillment.toml", &order_text())]);
    let app = spawn_app(settings_with_auth(&env, neither.path())).await;
    let (_, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    let newest = get(&mut admin, "versioned", 0).await.unwrap();
    assert_eq!(
        (
            newest.version,
            newest.retired,
            newest.current,
            newest.active_sagas
        ),
        (2, true, false, 1)
    );
    assert_eq!(
        rows(&list(&mut admin, "versioned").await),
        [
            ("versioned", 2, false, true, 1, 2),
            ("versioned", 1, false, true, 1, 1)
        ]
    );
    app.stop().await;
}

fn order_text() -> String {
    std::fs::read_to_string(repo_sagas().join("order_fulfillment.toml")).unwrap()
}

#[tokio::test]
async fn sagactl_lists_definitions_and_draws_one() {
    let h = harness().await;
    start_sagas(&h, 2).await;

    let table = sagactl(&h, &["definitions"]).await;
    let lines: Vec<Vec<&str>> = table
        .ok()
        .lines()
        .map(|l| l.split_whitespace().take(7).collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec![
                "NAME", "VERSION", "STEPS", "ACTIVE", "SAGAS", "RETIRED", "CURRENT"
            ],
            vec!["order_fulfillment", "1", "4", "2", "no", "yes", "Create"],
        ]
    );
    let v = sagactl(&h, &["--output", "json", "definitions"])
        .await
        .json();
    let def = &v["definitions"][0];
    assert_eq!(
        (&def["name"], &def["active_sagas"], &def["pivot_step"]),
        (
            &json!("order_fulfillment"),
            &json!(2),
            &json!("schedule_delivery")
        )
    );
    assert_eq!(def["steps"][1]["after"], json!(["create_order"]));
    assert_eq!(def["steps"][1]["timeout_ms"], json!(3_600_000));

    let shown = sagactl(&h, &["definition", "order_fulfillment"]).await;
    assert_eq!(
        shown.ok(),
        "definition:    order_fulfillment@1\n\
         description:   Create an order, take payment, schedule delivery, approve the order\n\
         state:         current: new sagas start on it\n\
         pivot:         schedule_delivery\n\
         compensation:  an operator is needed after 10 failed attempts\n\
         active sagas:  2\n\
         \n\
         steps:\n\
         create_order  order: create_order, undo: cancel_order\n\
         │   timeout 1h; 3 attempts, back-off 200ms to 30s ×2\n\
         authorize_payment  payment: authorize_payment, undo: refund_payment\n\
         │   timeout 1h; 3 attempts, back-off 200ms to 30s ×2\n\
         schedule_delivery (pivot)  delivery: schedule_delivery, undo: cancel_delivery\n\
         │   timeout 1h; 3 attempts, back-off 200ms to 30s ×2\n\
         approve_order  order: approve_order\n    \
         timeout 1h; retried until it succeeds, back-off 200ms to 30s ×2\n"
    );
    let same = sagactl(&h, &["definition", "order_fulfillment", "--version", "1"]).await;
    assert_eq!(same.ok(), shown.ok());
    let v = sagactl(&h, &["definition", "order_fulfillment", "--output", "json"])
        .await
        .json();
    assert_eq!(v["steps"][2]["pivot"], json!(true));
    assert_eq!(v["steps"][3]["after_pivot"], json!(true));
    assert_eq!(v["steps"][3]["compensation"], json!(null));

    for (args, expected) in [
        (
            &["definition", "order_fulfillment", "--version", "2"][..],
            "error: NOT_FOUND: saga definition \"order_fulfillment\" has no version 2; known versions: 1\n",
        ),
        (
            &["definition", "nope"][..],
            "error: NOT_FOUND: saga definition \"nope\" does not exist; known: order_fulfillment\n",
        ),
    ] {
        let run = sagactl(&h, args).await;
        assert_eq!((run.code, run.stderr.as_str()), (Some(1), expected));
        assert!(run.stdout.is_empty());
    }
    let anonymous = sagactl_as(&h, None, &["definitions"]).await;
    assert_eq!(anonymous.code, Some(1));
    assert!(
        anonymous.stderr.starts_with("error: UNAUTHENTICATED"),
        "{}",
        anonymous.stderr
    );
}

#[tokio::test]
async fn get_definition_returns_a_graph_with_its_edges_condition_and_mappings() {
    let env = TestEnv::new();
    let app = spawn_app(settings_with_auth(&env, &repo_sagas())).await;
    let (_, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    let def = get(&mut admin, "food_delivery", 0).await.unwrap();
    let step = |name: &str| def.steps.iter().find(|s| s.name == name).unwrap();
    assert_eq!(step("create_order").after, Vec::<String>::new());
    for branch in ["authorize_payment", "shop_accepts", "redeem_coupon"] {
        assert_eq!(step(branch).after, ["create_order"], "{branch}");
    }
    assert_eq!(
        step("dispatch_rider").after,
        ["authorize_payment", "shop_accepts", "redeem_coupon"]
    );
    assert!(step("dispatch_rider").pivot);
    assert!(step("notify_customer").after_pivot);
    assert_eq!(def.pivot_step, "dispatch_rider");
    assert!(step("redeem_coupon").when.contains("input.coupon"));
    let input: serde_json::Value =
        serde_json::from_str(&step("authorize_payment").input_json).unwrap();
    assert_eq!(input["order_id"], "${steps.create_order.output.order_id}");
    assert_eq!(input["currency"], "KRW");
    assert!(step("shop_accepts").compensation_input_json.is_empty());
    app.stop().await;
}
