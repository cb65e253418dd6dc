//! `ratelimit-policyd`: parses the command line, loads the configuration,
//! starts logging, wires the parts together and turns the result into an exit
//! code. Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use ratelimit_policyd::cli::{Cli, Command};
use ratelimit_policyd::clock::SystemClock;
use ratelimit_policyd::config::{Config, DatabaseUrl, RawConfig, Sources, DEFAULT_CONFIG_PATH};
use ratelimit_policyd::error::{Error, EXIT_COUNTS_LOST};
use ratelimit_policyd::logging::{self, Outputs};
use ratelimit_policyd::persist::sqlite::SqliteBackend;
use ratelimit_policyd::server::Listener;
use ratelimit_policyd::{daemon, notice, shutdown};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = e.downcast_ref::<Error>().map_or(1, Error::exit_code);
            eprintln!("ratelimit-policyd: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (raw, config) = load_config(&cli)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", raw.to_toml_masked());
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let outputs = Outputs {
                // Under systemd with syslog on, stderr would log every line twice.
                stderr: !(cli.overrides.quiet
                    || (config.log.syslog && std::env::var_os("JOURNAL_STREAM").is_some())),
                syslog_socket: None,
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
            runtime.block_on(serve(config))
        }
    }
}

fn load_config(cli: &Cli) -> Result<(RawConfig, Config), Error> {
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let mut sources = Sources::from_file(&path, required)?;
    sources.env = std::env::vars().collect();
    sources.overrides = cli.overrides.pairs();
    let raw = sources.merge()?.resolved();
    let config = raw.validate()?;
    Ok((raw, config))
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let backend = match &config.database.url {
        DatabaseUrl::Sqlite(path) => open_sqlite(path, &config.database.table)?,
        DatabaseUrl::Mysql(_) => {
            unreachable!("config validation rejects mysql URLs in this version")
        }
    };
    let listener = Listener::bind(&config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let token = CancellationToken::new();
    shutdown::spawn_signal_handler(token.clone()).context("cannot install signal handlers")?;
    let running = daemon::start(
        &config,
        Arc::new(backend),
        Arc::new(SystemClock),
        listener,
        token,
    )
    .await?;
    notice!(
        "listening on {} (database {}, {} counters)",
        running.local_addr,
        describe(&config.database.url),
        running.store.len()
    );
    let report = running.wait().await?;
    if report.error.is_some() {
        return Ok(ExitCode::from(EXIT_COUNTS_LOST));
    }
    notice!("stopped; final flush wrote {} rows", report.rows);
    Ok(ExitCode::SUCCESS)
}

fn open_sqlite(path: &Path, table: &str) -> Result<SqliteBackend, Error> {
    SqliteBackend::open(path, table).map_err(Error::Database)
}

fn describe(url: &DatabaseUrl) -> String {
    match url {
        DatabaseUrl::Sqlite(p) => format!("sqlite {}", p.display()),
        DatabaseUrl::Mysql(u) => ratelimit_policyd::config::mask_password(u),
    }
}
