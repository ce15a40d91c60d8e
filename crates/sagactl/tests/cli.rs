//! The binary as users meet it before any server is involved. Being an integration test of this
//! package, it also makes `cargo test` build `sagactl`, which the root package's suites run
//! against a real sagad.
use std::process::{Command, Output};

fn sagactl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .env_remove("SAGA_SERVER")
        .env_remove("SAGA_TOKEN")
        .env_remove("SAGA_CA_CERT")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_lists_the_subcommands() {
    let out = sagactl(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "start",
        "show",
        "list",
        "watch",
        "redrive",
        "participants",
        "counts",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn a_bad_server_url_is_reported_before_connecting() {
    let out = sagactl(&["--server", "ftp://127.0.0.1:1", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: invalid --server URL \"ftp://127.0.0.1:1\""),
        "{err}"
    );
}
