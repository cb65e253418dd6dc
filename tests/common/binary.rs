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
    /// The daemon's pid: the child's, or with a wrapper its child's.
    pub pid: i32,
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
    Spawn {
        args,
        env,
        max_file_bytes,
        ..Spawn::default()
    }
    .start(config)
}

/// The pid of the one child of `wrapper` (the daemon it runs).
fn wrapped_pid(wrapper: i32) -> i32 {
    for _ in 0..1000 {
        let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the wrapper {wrapper} started no daemon");
}

/// How to start the binary, for the tests that need more than [`spawn`].
#[derive(Default)]
pub struct Spawn<'a> {
    /// Arguments after `run --config PATH`.
    pub args: &'a [&'a str],
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// RLIMIT_FSIZE in the daemon.
    pub max_file_bytes: Option<u64>,
    /// A command the daemon runs under (e.g. `strace -f -o FILE`).
    pub wrapper: &'a [&'a str],
    /// The stderr line that says it is up; "listening on " when empty.
    pub ready: &'a str,
}

impl Spawn<'_> {
    /// Starts the daemon and waits for its `ready` line; `addr` is set once
    /// the "listening on" line was seen.
    pub fn start(self, config: &Path) -> Daemon {
        use std::os::unix::process::CommandExt;
        let mut command = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        if let Some(limit) = self.max_file_bytes {
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
            .args(self.args)
            .envs(self.env.iter().copied())
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
        let pid = child.id() as i32;
        let mut d = Daemon {
            child,
            pid,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
        };
        if !self.wrapper.is_empty() {
            d.pid = wrapped_pid(pid);
        }
        if self.ready.is_empty() {
            d.wait_listening();
        } else {
            d.wait_for(self.ready);
        }
        d
    }
}

impl Daemon {
    /// Waits for the "listening on ADDR" line and notes the address.
    pub fn wait_listening(&mut self) {
        let line = self.wait_for("listening on ");
        let rest = line.split("listening on ").nth(1).unwrap();
        self.addr = rest.split_whitespace().next().unwrap().parse().unwrap();
    }

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
        // SAFETY: plain kill(2) on our own child (or its child).
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(rc, 0);
    }

    /// SIGTERM, then the exit code.
    /// A daemon that has not exited 60 s after SIGTERM fails the test.
    pub fn terminate(mut self) -> i32 {
        self.signal(libc::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("exited, not killed");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not exit within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    /// A test that fails before `terminate` must not leave its daemon running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child (or its child, under a wrapper).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
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

/// [`cli`], but gives up (killing it) after `secs` seconds: `None` then.
pub fn cli_within(config: &Path, args: &[&str], secs: u64) -> Option<Output> {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Points a configuration written by [`write_config`] at `url` (MySQL).
pub fn use_database(config: &Path, url: &str) {
    let toml = std::fs::read_to_string(config).unwrap();
    let toml = toml
        .lines()
        .map(|l| {
            if l.starts_with("url = ") {
                format!("url = \"{url}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(config, toml + "\n").unwrap();
}
