//! A PostgreSQL database and a RabbitMQ vhost per test, on the real servers, and the `psql` and
//! `rabbitmqctl` calls that make and remove them.

use std::path::PathBuf;
use std::process::Command;

use uuid::Uuid;

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";

/// Runs `program` to its end; its stderr is the error when it fails.
fn run_tool(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// One SQL statement as the `postgres` superuser, outside any database of a test.
pub fn psql(sql: &str) -> Result<(), String> {
    run_tool(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
    )
}

pub fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-q"];
    all.extend_from_slice(args);
    run_tool("rabbitmqctl", &all)
}

/// An isolated database and vhost (both named [`TestEnv::name`]), removed when dropped, also
/// when the test fails.
pub struct TestEnv {
    pub name: String,
    databases: Vec<String>,
    vhost: bool,
    keep: bool,
}

/// What [`TestEnv::create`] makes besides the database and vhost named after the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// Create the database as a copy of this one.
    pub template: Option<&'a str>,
    /// Also create `<name>_demo`, for demo participants that keep their records apart.
    pub demo_database: bool,
    /// Leave everything in place on drop (to look at it afterwards).
    pub keep: bool,
}

impl TestEnv {
    /// A fresh database and vhost named `saga_t_<random>`.
    // Not `Default`: it creates things on two servers.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestEnv {
        let name = format!("saga_t_{}", Uuid::new_v4().simple());
        TestEnv::create(&name, Options::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Vhost `name` (with all rights for `guest`), database `name` and what `options` add.
    pub fn create(name: &str, options: Options<'_>) -> Result<TestEnv, String> {
        rabbitmqctl(&["add_vhost", name])?;
        // From here on the guard exists, so a failure below still cleans up.
        let mut env = TestEnv {
            name: name.to_string(),
            databases: Vec::new(),
            vhost: true,
            keep: options.keep,
        };
        rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])?;
        match options.template {
            // FILE_COPY: a checkpoint and a file copy, much faster than WAL-logging gigabytes.
            Some(t) => psql(&format!(
                "CREATE DATABASE {name} TEMPLATE {t} STRATEGY FILE_COPY"
            ))?,
            None => psql(&format!("CREATE DATABASE {name}"))?,
        }
        env.databases.push(name.to_string());
        if options.demo_database {
            psql(&format!("CREATE DATABASE {name}_demo"))?;
            env.databases.push(format!("{name}_demo"));
        }
        Ok(env)
    }

    /// One database and no vhost (a template to copy).
    pub fn database_only(name: &str) -> Result<TestEnv, String> {
        psql(&format!("CREATE DATABASE {name}"))?;
        Ok(TestEnv {
            name: name.to_string(),
            databases: vec![name.to_string()],
            vhost: false,
            keep: false,
        })
    }

    pub fn database_url(&self) -> String {
        format!("{PG}/{}", self.name)
    }

    /// The `<name>_demo` database of [`Options::demo_database`].
    pub fn demo_database_url(&self) -> String {
        format!("{PG}/{}_demo", self.name)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.database_url()).await.unwrap()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "  kept: databases {:?}, vhost {}",
                self.databases,
                if self.vhost { &self.name } else { "-" }
            );
            return;
        }
        for db in self.databases.iter().rev() {
            if let Err(e) = psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")) {
                eprintln!("warning: {e}");
            }
        }
        if self.vhost
            && let Err(e) = rabbitmqctl(&["delete_vhost", &self.name])
        {
            eprintln!("warning: {e}");
        }
    }
}

/// The repository's `sagas/` directory.
pub fn repo_sagas() -> PathBuf {
    crate::bins::workspace_root().join("sagas")
}

/// A directory holding the given definition files.
pub fn definitions_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}
