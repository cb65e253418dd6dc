//! MariaDB for tests: a database of its own per test (from schema.sql,
//! dropped on Drop even when the test fails), and a private server the
//! outage tests can stop, freeze and restart.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use mysql_async::prelude::Queryable;

/// The shared server of the machine (SPEC: root, empty password).
pub fn admin_url() -> String {
    std::env::var("RATELIMIT_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A database created for one test.
pub struct TestDb {
    pub name: String,
    server: String,
}

impl TestDb {
    /// Creates `rl_<tag>_<pid>_<n>` on the server at `admin` (a URL with any
    /// database) and loads schema.sql into it.
    pub async fn create(admin: &str, tag: &str) -> TestDb {
        let db = TestDb::create_empty(admin, tag).await;
        let schema =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.sql")).unwrap();
        let pool = mysql_async::Pool::new(db.url().as_str());
        let mut conn = pool.get_conn().await.unwrap();
        for statement in schema_statements(&schema) {
            conn.query_drop(statement)
                .await
                .unwrap_or_else(|e| panic!("schema.sql: {e}"));
        }
        drop(conn);
        pool.disconnect().await.unwrap();
        db
    }

    /// Creates `rl_<tag>_<pid>_<n>`, empty.
    pub async fn create_empty(admin: &str, tag: &str) -> TestDb {
        let name = format!(
            "rl_{tag}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let server = admin
            .rsplit_once('/')
            .expect("URL with a database")
            .0
            .to_string();
        let pool = mysql_async::Pool::new(admin);
        let mut conn = pool
            .get_conn()
            .await
            .expect("MariaDB is running (see .ci/run)");
        conn.query_drop(format!("CREATE DATABASE {name} CHARACTER SET utf8"))
            .await
            .unwrap();
        drop(conn);
        pool.disconnect().await.unwrap();
        TestDb { name, server }
    }

    /// The URL of this database.
    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    /// Runs statements.
    pub async fn exec(&self, sql: &str) {
        let pool = mysql_async::Pool::new(self.url().as_str());
        pool.get_conn()
            .await
            .unwrap()
            .query_drop(sql)
            .await
            .unwrap();
        pool.disconnect().await.unwrap();
    }

    /// `(quota, used, expiry, persist)` of one sender, if there is a row.
    pub async fn row(&self, sender: &str) -> Option<(u32, u32, i64, bool)> {
        let pool = mysql_async::Pool::new(self.url().as_str());
        let mut conn = pool.get_conn().await.unwrap();
        let row: Option<(u32, u32, i64, bool)> = conn
            .exec_first(
                "SELECT quota, used, expiry, persist FROM ratelimit WHERE sender = ?",
                (sender,),
            )
            .await
            .unwrap();
        drop(conn);
        pool.disconnect().await.unwrap();
        row
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = format!("{}/mysql", self.server);
        let name = self.name.clone();
        // Drop may run inside a runtime; do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let pool = mysql_async::Pool::new(admin.as_str());
                if let Ok(mut conn) = pool.get_conn().await {
                    let _ = conn
                        .query_drop(format!("DROP DATABASE IF EXISTS {name}"))
                        .await;
                    // A test may have made a login named after its database.
                    let _ = conn
                        .query_drop(format!("DROP USER IF EXISTS '{name}'@'127.0.0.1'"))
                        .await;
                }
                let _ = pool.disconnect().await;
            });
        })
        .join();
    }
}

/// The statements of schema.sql (comment lines dropped, split at `;`).
pub fn schema_statements(schema: &str) -> Vec<String> {
    let code: String = schema
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// A mariadbd of the test's own, in a temp directory, on a free port.
pub struct PrivateServer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl PrivateServer {
    /// Creates a data directory and starts the server.
    pub fn start() -> PrivateServer {
        let dir = tempfile::tempdir().unwrap();
        // Each server gets its own temp dir: concurrent bootstraps sharing
        // /tmp remove each other's temporary tables.
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let out = Command::new("mariadb-install-db")
            .env("TMPDIR", dir.path().join("tmp"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("mariadb-install-db (package mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = PrivateServer {
            dir,
            port,
            child: None,
        };
        server.resume_from_stopped();
        server
    }

    /// The admin URL (root, database `mysql`).
    pub fn admin_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }

    /// Starts mariadbd and waits for "ready for connections".
    pub fn resume_from_stopped(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let mut child = Command::new("mariadbd")
            .env("TMPDIR", d.join("tmp"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mariadbd");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("ready for connections") => break,
                Ok(_) => {}
                Err(e) => panic!("mariadbd did not become ready: {e}"),
            }
        }
        self.child = Some(child);
    }

    /// Stops the server (SIGTERM) and waits until it has exited.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        child.wait().unwrap();
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn freeze(&self) {
        signal(self.child.as_ref().expect("running"), libc::SIGSTOP);
    }

    /// Lets a frozen server go on.
    pub fn thaw(&self) {
        signal(self.child.as_ref().expect("running"), libc::SIGCONT);
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
