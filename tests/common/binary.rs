//! Running the built binary: configs in a temp dir, start, wait for
//! readiness from its own log line, signals.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ratelimit-policyd");

/// Writes a configuration whose files all live in `dir`; `limits` and `log`
/// are extra lines for those sections.
pub fn write_config(dir: &Path, limits: &str, log: &str) -> PathBuf {
    let path = dir.join("ratelimit-policyd.toml");
    let toml = format!(
        r#"listen = "127.0.0.1:0"
control_socket = "{dir}/control.sock"
[limits]
default_quota = 3
timezone = "UTC"
{limits}
[database]
url = "sqlite://{dir}/ratelimit.db"
[log]
file = "{dir}/ratelimit-policyd.log"
{log}
"#,
        dir = dir.display()
    );
    let toml = if log.contains("syslog") {
        toml
    } else {
        toml.replace("[log]\n", "[log]\nsyslog = false\n")
    };
    let toml = if limits.contains("default_quota") {
        toml.replace("default_quota = 3\n", "")
    } else {
        toml
    };
    std::fs::write(&path, toml).unwrap();
    path
}

pub struct Daemon {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    /// The daemon's stderr, line by line.
    lines: mpsc::Receiver<String>,
}

/// Starts `run --config config ARGS...` and waits for its "listening on" line.
pub fn spawn(config: &Path, args: &[&str]) -> Daemon {
    spawn_env(config, args, &[])
}

/// [`spawn`] with extra environment variables.
pub fn spawn_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
    spawn_limited(config, args, env, None)
}

/// [`spawn_env`] with RLIMIT_FSIZE set to `max_file_bytes` in the daemon.
pub fn spawn_limited(
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    max_file_bytes: Option<u64>,
) -> Daemon {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(BIN);
    if let Some(limit) = max_file_bytes {
        // SAFETY: only setrlimit(2), async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let rl = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command
        .args(["run", "--config"])
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut d = Daemon {
        child,
        addr: "0.0.0.0:0".parse().unwrap(),
        lines,
    };
    let line = d.wait_for("listening on ");
    let rest = line.split("listening on ").nth(1).unwrap();
    d.addr = rest.split_whitespace().next().unwrap().parse().unwrap();
    d
}

impl Daemon {
    /// Waits (at most 30 s) for a stderr line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {needle:?} from the daemon: {e}"),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.child
            .wait()
            .unwrap()
            .code()
            .expect("exited, not killed")
    }
}

impl Drop for Daemon {
    /// A test that fails before `terminate` must not leave its daemon running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary with `args` and `--config config`.
pub fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `(used, quota, persist)` of a row in the SQLite file.
pub fn db_row(db: &Path, sender: &str) -> (u32, u32, bool) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT used, quota, persist FROM ratelimit WHERE sender = ?1",
        [sender],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}
