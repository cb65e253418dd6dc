//! `ratelimit-policyd`: parses the command line, loads the configuration,
//! starts logging, wires the parts together and turns the result into an exit
//! code. Everything else lives in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use ratelimit_policyd::cli::{Cli, Command, Overrides};
use ratelimit_policyd::clock::SystemClock;
use ratelimit_policyd::config::{
    mask_password, Config, ConfigSource, DatabaseUrl, DEFAULT_CONFIG_PATH,
};
use ratelimit_policyd::control::{self, ControlListener};
use ratelimit_policyd::daemon::{self, Listeners};
use ratelimit_policyd::error::{Error, EXIT_COUNTS_LOST};
use ratelimit_policyd::logging::{self, Outputs};
use ratelimit_policyd::persist::mysql::MysqlBackend;
use ratelimit_policyd::persist::sqlite::SqliteBackend;
use ratelimit_policyd::persist::Backend;
use ratelimit_policyd::server::Listener;
use ratelimit_policyd::{notice, signals, systemd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // `status | head -1`: the reader went away; nothing to say.
        Err(e)
            if matches!(
                e.downcast_ref::<control::ClientError>(),
                Some(control::ClientError::OutputClosed)
            ) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match (
                e.downcast_ref::<Error>(),
                e.downcast_ref::<control::ClientError>(),
            ) {
                (Some(e), _) => e.exit_code(),
                (_, Some(e)) => e.exit_code(),
                _ => 1,
            };
            eprintln!("ratelimit-policyd: error: {}", describe_error(&e));
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, each said once: a cause whose text the message
/// already contains (our errors include their source) is not repeated.
fn describe_error(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// How long `flush` and `reload` wait for the daemon's answer.
const LONG_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = cli.overrides();
    let source = ConfigSource {
        path: cli
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        required: cli.config.is_some(),
        use_env: true,
        overrides: overrides.pairs(),
    };
    let (raw, config) = source.load().map_err(Error::Config)?;
    let socket = config.control_socket.clone();
    let command = match cli.command.unwrap_or(Command::Run {
        overrides: Overrides::default(),
    }) {
        Command::Run { .. } => {
            let password = config.read_password().map_err(Error::Config)?;
            return run_daemon(&overrides, config, source, password);
        }
        Command::CheckConfig { .. } => {
            config.read_password().map_err(Error::Config)?;
            print!("{}", raw.to_toml_masked());
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Status {
            json,
            top,
            over,
            keys,
        } => {
            let mut client = control::Client::connect(&socket)?;
            let reply = client.send(control::Command::Status { keys, top, over })?;
            let header = reply.status.context("the daemon sent no status header")?;
            let mut out = std::io::stdout().lock();
            if json {
                control::print_status_json(&mut client, &header, &mut out)?;
            } else {
                control::print_status(&mut client, &header, top.is_some(), &mut out)?;
            }
            out.flush().map_err(control::ClientError::from_output)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::SetQuota {
            key,
            quota,
            persist,
        } => control::Command::SetQuota {
            key,
            quota,
            persist,
        },
        Command::Reset { key } => control::Command::Reset { key },
        Command::Flush => control::Command::Flush,
        Command::Reload => control::Command::Reload,
    };
    let mut client = control::Client::connect(&socket)?;
    if matches!(command, control::Command::Flush | control::Command::Reload) {
        // A flush writes every batch, a reload reads every row: both may
        // take a while with a slow database.
        client.set_timeout(LONG_COMMAND_TIMEOUT);
    }
    let reply = client.send(command)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", reply.message.unwrap_or_default())
        .and_then(|()| out.flush())
        .map_err(control::ClientError::from_output)?;
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(
    overrides: &Overrides,
    config: Config,
    source: ConfigSource,
    password: Option<String>,
) -> anyhow::Result<ExitCode> {
    // A file that reaches RLIMIT_FSIZE (a full quota, a small limit) must make
    // the write fail with EFBIG, which the flusher retries without losing
    // counts, instead of killing the daemon (SIGXFSZ's default action).
    // SAFETY: setting a signal to SIG_IGN before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let outputs = Outputs {
        // Under systemd with syslog on, stderr would log every line twice.
        stderr: !(overrides.quiet
            || (config.log.syslog && std::env::var_os("JOURNAL_STREAM").is_some())),
        syslog_socket: overrides.syslog_socket.clone(),
    };
    logging::init(&config.log, &outputs).context("cannot start logging")?;
    for w in &config.warnings {
        log::warn!("{w}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ratelimit-policyd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, source, password))
}

async fn serve(
    config: Config,
    source: ConfigSource,
    password: Option<String>,
) -> anyhow::Result<ExitCode> {
    let db = &config.database;
    match &db.url {
        DatabaseUrl::Sqlite(path) => {
            let backend = SqliteBackend::open_table(path, &db.table).map_err(Error::Database)?;
            serve_with(config, source, backend).await
        }
        DatabaseUrl::Mysql(url) => {
            let backend = MysqlBackend::new(url, password, &db.table.name)
                .map_err(Error::Database)?
                .with_table(&db.table)
                .with_timeout(db.timeout);
            serve_with(config, source, backend).await
        }
    }
}

async fn serve_with<B: Backend>(
    config: Config,
    source: ConfigSource,
    backend: B,
) -> anyhow::Result<ExitCode> {
    let policy = Listener::bind(&config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let control = ControlListener::bind(&config.control_socket)
        .await
        .map_err(|source| Error::Bind {
            addr: format!("control socket {}", config.control_socket.display()),
            source,
        })?;
    let token = CancellationToken::new();
    // Before the load: a SIGHUP or SIGUSR1 during it must not kill us.
    let signals = signals::install(token.clone()).context("cannot install signal handlers")?;
    let listeners = Listeners {
        policy,
        control: Some(control),
    };
    let running = daemon::start(
        &config,
        Some(source),
        Arc::new(backend),
        Arc::new(SystemClock),
        listeners,
        token,
    )
    .await?;
    signals.serve(running.reload.clone());
    notice!(
        "listening on {} (control {}, database {}, {} counters)",
        running.local_addr,
        config.control_socket.display(),
        describe(&config.database.url),
        running.store.len()
    );
    if let Err(e) = systemd::notify(&format!(
        "READY=1\nSTATUS=listening on {}",
        running.local_addr
    )) {
        log::warn!("cannot notify systemd: {e}");
    }
    let report = running.wait().await?;
    if report.error.is_some() {
        return Ok(ExitCode::from(EXIT_COUNTS_LOST));
    }
    notice!("stopped; final flush wrote {} rows", report.rows);
    Ok(ExitCode::SUCCESS)
}

fn describe(url: &DatabaseUrl) -> String {
    match url {
        DatabaseUrl::Sqlite(p) => format!("sqlite {}", p.display()),
        DatabaseUrl::Mysql(u) => mask_password(u),
    }
}
