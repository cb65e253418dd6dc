//! SPEC §11 packaging: install.sh into a temp DESTDIR, and the init script
//! driving the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::binary::{stderr, stdout, BIN};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn install(destdir: &Path, args: &[&str]) -> Output {
    let out = Command::new("sh")
        .arg(repo().join("install.sh"))
        .args(["--binary", BIN])
        .args(args)
        .env("DESTDIR", destdir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every file below `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.push(format!("{}/", p.strip_prefix(root).unwrap().display()));
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_sh_stages_every_file_with_its_mode_and_is_idempotent() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let out = install(d, &["--init", "systemd"]);
    assert!(
        stdout(&out).contains("schema.sql"),
        "next steps name the MySQL schema"
    );

    let bin = d.join("usr/local/sbin/ratelimit-policyd");
    let config = d.join("etc/ratelimit-policyd/ratelimit-policyd.toml");
    let unit = d.join("etc/systemd/system/ratelimit-policyd.service");
    let rotate = d.join("etc/logrotate.d/ratelimit-policyd");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&config), 0o644);
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(mode(&rotate), 0o644);
    for sql in ["schema.sql", "schema-migrate.sql"] {
        assert_eq!(
            mode(&d.join("usr/local/share/doc/ratelimit-policyd").join(sql)),
            0o644,
            "{sql}"
        );
    }
    assert_eq!(mode(&d.join("var/lib/ratelimit-policyd")), 0o750);
    // The policy socket's directory: setgid, so the socket is group postfix.
    assert_eq!(mode(&d.join("var/spool/postfix/ratelimit")), 0o2750);
    let installed = std::fs::read_to_string(&config).unwrap();
    assert!(
        installed.contains("listen = \"unix:/var/spool/postfix/ratelimit/policy\""),
        "{installed}"
    );
    assert!(stdout(&out)
        .contains("check_policy_service { unix:ratelimit/policy, default_action=DUNNO }"));
    assert_eq!(mode(&d.join("var/log/ratelimit-policyd")), 0o750);
    assert!(
        !d.join("etc/init.d/ratelimit-policyd").exists(),
        "one init system"
    );

    let unit_text = std::fs::read_to_string(&unit).unwrap();
    for placeholder in ["@SBINDIR@", "@SYSCONFDIR@", "@DOCDIR@"] {
        assert!(
            !unit_text.contains(placeholder),
            "{placeholder} left in: {unit_text}"
        );
    }
    assert!(unit_text.contains("ExecStart=/usr/local/sbin/ratelimit-policyd run --config /etc/ratelimit-policyd/ratelimit-policyd.toml"));
    assert!(unit_text.contains("ExecReload=/bin/kill -HUP $MAINPID"));

    // The installed configuration is valid and has the installed defaults.
    let check = Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    let effective: toml::Value = toml::from_str(&stdout(&check)).unwrap();
    assert_eq!(
        effective["control_socket"].as_str(),
        Some("/run/ratelimit-policyd/control.sock")
    );
    assert_eq!(
        effective["database"]["url"].as_str(),
        Some("sqlite:///var/lib/ratelimit-policyd/ratelimit.db")
    );
    assert_eq!(effective["log"]["syslog"].as_bool(), Some(true));

    // Again: nothing changes, and an edited configuration is kept.
    let before = files(d);
    std::fs::write(&config, "# edited by the admin\n").unwrap();
    let out = install(d, &["--init", "systemd"]);
    assert!(
        stdout(&out).contains("kept the existing /etc/ratelimit-policyd/ratelimit-policyd.toml")
    );
    assert_eq!(files(d), before);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# edited by the admin\n"
    );

    // Uninstall removes the program, keeps configuration and counters.
    install(d, &["--init", "systemd", "--uninstall"]);
    assert!(!bin.exists() && !unit.exists() && !rotate.exists());
    assert!(config.exists() && d.join("var/lib/ratelimit-policyd").exists());
}

#[test]
fn install_sh_honours_prefix_and_installs_the_init_script_for_sysv() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    install(d, &["--init", "sysv", "--prefix", "/opt/rl"]);
    let script = d.join("etc/init.d/ratelimit-policyd");
    assert_eq!(mode(&script), 0o755);
    assert!(d.join("opt/rl/sbin/ratelimit-policyd").exists());
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        text.contains("DAEMON=${DAEMON:-/opt/rl/sbin/ratelimit-policyd}"),
        "{text}"
    );
    assert!(!d
        .join("etc/systemd/system/ratelimit-policyd.service")
        .exists());
}

fn init_script(dest: &Path, state: &Path, config: &Path, action: &str) -> Output {
    Command::new("sh")
        .arg(dest.join("etc/init.d/ratelimit-policyd"))
        .arg(action)
        .env("DAEMON", dest.join("usr/local/sbin/ratelimit-policyd"))
        .env("CONFIG", config)
        .env(
            "DAEMON_USER",
            String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
                .unwrap()
                .trim(),
        )
        .env("RUNDIR", state.join("run"))
        .env("STATEDIR", state.join("lib"))
        .env("LOGDIR", state.join("log"))
        .env("SPOOLDIR", state.join("spool/ratelimit"))
        .output()
        .unwrap()
}

/// The init script as an administrator uses it: start, status, reload, stop
/// (which waits for the exit), status again.
#[tokio::test]
async fn the_init_script_starts_reports_reloads_and_stops_the_daemon() {
    let dest = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    install(dest.path(), &["--init", "sysv"]);
    let s = state.path();
    let config = s.join("ratelimit-policyd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ncontrol_socket = \"{run}/control.sock\"\n[database]\nurl = \"sqlite://{lib}/r.db\"\n\
             [log]\nsyslog = false\nfile = \"{log}/ratelimit-policyd.log\"\n",
            run = s.join("run").display(),
            lib = s.join("lib").display(),
            log = s.join("log").display()
        ),
    )
    .unwrap();
    let out = init_script(dest.path(), s, &config, "start");
    assert!(
        out.status.success(),
        "start: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let pid: i32 = std::fs::read_to_string(s.join("run/ratelimit-policyd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let out = init_script(dest.path(), s, &config, "status");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("connections: 0 open"),
        "{}",
        stdout(&out)
    );

    let out = init_script(dest.path(), s, &config, "reload");
    assert!(out.status.success(), "{}", stderr(&out));

    let out = init_script(dest.path(), s, &config, "stop");
    assert!(out.status.success(), "{}", stderr(&out));
    // stop waited for the exit: the process is gone now (or a zombie waiting
    // for this container's init to reap it).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = match state.rsplit_once(')') {
        Some((_, rest)) => !rest.trim_start().starts_with('Z'),
        None => false, // no such process
    };
    assert!(!running, "the daemon still runs after stop: {state}");
    let out = init_script(dest.path(), s, &config, "status");
    assert_eq!(out.status.code(), Some(3), "LSB: not running");
    let log = std::fs::read_to_string(s.join("log/ratelimit-policyd.log")).unwrap();
    assert!(
        log.contains("SIGHUP received") && log.contains("stopped; final flush"),
        "{log}"
    );
}

/// Over a Perl ratelimit-policyd, install.sh changes nothing: its init
/// script has the same name (replacing it would leave the Perl daemon with
/// nothing to stop it), and a running Perl daemon must be stopped first.
#[test]
fn install_sh_refuses_to_replace_a_perl_install() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    // The Perl daemon's init script, as its install.sh links it.
    std::fs::create_dir_all(d.join("etc/init.d")).unwrap();
    let perl_script = d.join("etc/init.d/ratelimit-policyd");
    std::fs::write(
        &perl_script,
        "#!/bin/sh\nDAEMON=/opt/ratelimit-policyd/daemon.pl\ncase \"$1\" in status) $DAEMON printshm ;; esac\n",
    )
    .unwrap();
    let refuse = |why: &str| {
        let out = Command::new("sh")
            .arg(repo().join("install.sh"))
            .args(["--binary", BIN, "--init", "sysv"])
            .env("DESTDIR", d)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{why}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains("Perl ratelimit-policyd") && err.contains("stop"),
            "{why}: {err}"
        );
        assert!(
            !d.join("usr/local/sbin/ratelimit-policyd").exists(),
            "{why}: nothing installed"
        );
        err
    };
    let err = refuse("init script");
    assert!(
        err.contains("/etc/init.d/ratelimit-policyd is its init script"),
        "{err}"
    );
    assert!(std::fs::read_to_string(&perl_script)
        .unwrap()
        .contains("daemon.pl"));

    // The script moved aside, but the Perl daemon still running.
    std::fs::rename(&perl_script, d.join("etc/init.d/ratelimit-policyd.perl")).unwrap();
    let mut perl = Command::new("bash")
        .args(["-c", "exec -a /opt/ratelimit-policyd/daemon.pl sleep 60"])
        .spawn()
        .unwrap();
    std::fs::create_dir_all(d.join("var/run")).unwrap();
    std::fs::write(
        d.join("var/run/ratelimit-policyd.pid"),
        format!("{}\n", perl.id()),
    )
    .unwrap();
    let err = refuse("running daemon");
    assert!(
        err.contains(&format!("running (pid {})", perl.id())),
        "{err}"
    );
    perl.kill().unwrap();
    perl.wait().unwrap();

    // Stopped and moved aside: the install goes ahead.
    install(d, &["--init", "sysv"]);
    assert!(std::fs::read_to_string(&perl_script)
        .unwrap()
        .contains("ratelimit-policyd status"));
}

/// A start that fails says why, even without syslog or a log file: the init
/// script prints the daemon's own error.
#[test]
fn a_failed_start_through_the_init_script_says_why() {
    let dest = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    install(dest.path(), &["--init", "sysv"]);
    let s = state.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = s.join("ratelimit-policyd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ncontrol_socket = \"{run}/control.sock\"\n\
             [database]\nurl = \"sqlite://{lib}/r.db\"\n[log]\nsyslog = false\n",
            run = s.join("run").display(),
            lib = s.join("lib").display(),
        ),
    )
    .unwrap();
    let out = init_script(dest.path(), s, &config, "start");
    assert!(!out.status.success());
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "the cause, not a pointer to an empty log: {said}"
    );
}
