//! The binary as users meet it before any server is involved. Being an integration test of this
//! package, it also makes `cargo test` build `saga-demo`, which the root package's fault suite
//! and the benchmark run as a process.
use std::process::Command;

#[test]
fn help_names_the_participants_and_failure_rules() {
    let out = Command::new(env!("CARGO_BIN_EXE_saga-demo"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // The default is every participant, so one process serves every shipped definition.
    assert!(help.contains(&saga_demo::PARTICIPANTS.join(",")), "{help}");
    assert!(help.contains("--fail <RULE>"), "{help}");
}

#[test]
fn a_bad_failure_rule_is_refused_before_connecting() {
    let out = Command::new(env!("CARGO_BIN_EXE_saga-demo"))
        .args(["--fail", "authorize_payment=2"])
        .env("SAGA_AMQP_URL", "amqp://127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--fail <RULE>"), "{err}");
}
