//! `sagad check`: the definitions are parsed, then every order of replies, failures and timeouts
//! is explored with the real engine, no server involved.

use std::path::Path;
use std::process::Command;

use crate::helpers::definitions_dir;

fn check(dir: &Path, explain: bool) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagad"));
    cmd.arg("--definitions").arg(dir).arg("check");
    if explain {
        cmd.arg("--explain");
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn repo(dir: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

/// The row of the explain table whose first column is `failure` and, when given, whose
/// conditions column is `conditions`; its cells trimmed.
fn row(out: &str, failure: &str, conditions: Option<&str>) -> Vec<String> {
    out.lines()
        .map(|l| {
            l.split('|')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .find(|cells| {
            cells.first().is_some_and(|c| c == failure)
                && conditions.is_none_or(|w| cells.get(1).is_some_and(|c| c == w))
        })
        .unwrap_or_else(|| panic!("no row {failure:?} {conditions:?} in:\n{out}"))
}

#[test]
fn check_proves_the_shipped_corridor_and_explains_each_failure() {
    // On its own, so that its explain table is the only one in the output.
    let text = std::fs::read_to_string(repo("sagas/order_fulfillment.toml")).unwrap();
    let dir = definitions_dir(&[("order_fulfillment.toml", &text)]);
    let (ok, out) = check(dir.path(), false);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "order_fulfillment v1: 4 steps, pivot schedule_delivery: every failure ends consistent"
        ),
        "{out}"
    );
    assert!(!out.contains("compensations, in order"), "{out}");

    let (ok, out) = check(dir.path(), true);
    assert!(ok, "{out}");
    assert_eq!(
        row(&out, "authorize_payment fails", None)[2..],
        ["create_order", "compensated"]
    );
    // An action that timed out may have been applied: it is undone too, before its ancestors.
    assert_eq!(
        row(&out, "schedule_delivery times out", None)[2..],
        [
            "schedule_delivery → authorize_payment → create_order",
            "compensated"
        ]
    );
    assert_eq!(
        row(
            &out,
            "schedule_delivery times out, compensation of authorize_payment fails",
            None
        )[3],
        "needs_operator"
    );
}

#[test]
fn check_proves_the_shipped_graph_and_explains_its_branches() {
    let (ok, out) = check(&repo("sagas"), true);
    for verdict in [
        "food_delivery v1: 6 steps, pivot dispatch_rider: every failure ends consistent",
        "order_fulfillment v1: 4 steps, pivot schedule_delivery: every failure ends consistent",
    ] {
        assert!(out.contains(verdict), "{out}");
    }
    // Parallel branches compensate together, and before the step they all depend on.
    assert_eq!(
        row(&out, "authorize_payment fails", Some("redeem_coupon=true"))[2..],
        ["shop_accepts ∥ redeem_coupon → create_order", "compensated"]
    );
    // A skipped coupon step is never compensated.
    assert_eq!(
        row(&out, "authorize_payment fails", Some("redeem_coupon=false"))[2..],
        ["shop_accepts → create_order", "compensated"]
    );
    // Steps after the pivot only go forwards: an input that cannot be built waits for a person.
    assert_eq!(
        row(
            &out,
            "input of notify_customer cannot be built",
            Some("redeem_coupon=true")
        )[3],
        "needs_operator"
    );
    assert!(ok, "{out}");
}
