//! Where the binaries under test are.

use std::path::{Path, PathBuf};

/// `target/<profile>`: the directory of the running test or bench binary's parent
/// (`target/<profile>/deps/<name>-<hash>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test or bench binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A binary of the workspace (`sagad`, `saga-demo`, `sagactl`) that cargo built beside the
/// running test binary. Cargo defines `CARGO_BIN_EXE_*` only for a package's own binaries, and
/// only in the package's tests; `cargo test` at the root builds all three before any test runs
/// (sagad for the root package's tests, the other two for their own packages' tests).
pub fn built_bin(name: &str) -> PathBuf {
    let bin = profile_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --all-targets` at the repository root, or build it \
         with `cargo build --bin {name}`",
        bin.display()
    );
    bin
}

/// The repository's root (the root package's directory).
pub fn workspace_root() -> PathBuf {
    // This crate is crates/testkit.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit has two parents")
        .to_path_buf()
}

/// A directory for files tests keep after they run (`target/tmp`, cargo's
/// `CARGO_TARGET_TMPDIR`, which only tests and benches get at compile time).
pub fn target_tmp() -> PathBuf {
    let dir = profile_dir()
        .parent()
        .map(|target| target.join("tmp"))
        .expect("target/<profile> has a parent");
    std::fs::create_dir_all(&dir).expect("target/tmp can be created");
    dir
}
