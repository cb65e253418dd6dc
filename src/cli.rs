//! Command-line types (clap derive). No logic.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Postfix policy service that limits how many recipients each authenticated
/// sender may send per period.
#[derive(Debug, Parser)]
#[command(name = "ratelimit-policyd", version, about)]
pub struct Cli {
    /// Configuration file [default: /etc/ratelimit-policyd/ratelimit-policyd.toml;
    /// built-in defaults if that file does not exist]
    #[arg(long, short = 'c', global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Overrides of common configuration keys.
    #[command(flatten)]
    pub overrides: Overrides,

    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run,
    /// Validate the configuration and print the effective values.
    CheckConfig,
    /// Show the daemon's state and its cached counters.
    Status {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the N counters with the highest usage.
        #[arg(long, value_name = "N")]
        top: Option<usize>,
        /// Only these keys.
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Set a sender's quota now (written to the database at the next flush).
    SetQuota {
        /// The key (sasl_username, or domain with key_type = "domain").
        key: String,
        /// The new quota.
        quota: u32,
        /// Keep this quota when the window resets (else it lasts this window).
        #[arg(long)]
        persist: bool,
    },
    /// Reset a sender's usage to 0 now.
    Reset {
        /// The key.
        key: String,
    },
    /// Write pending counts to the database now, and report the result.
    Flush,
    /// Reload the configuration and re-read quotas (as SIGHUP does).
    Reload,
}

/// Command-line overrides; they win over the file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// Overrides `listen` ("IP:PORT" or "unix:/path").
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Overrides `database.url`.
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Overrides `log.level`.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Overrides `log.file`.
    #[arg(long, global = true, value_name = "PATH")]
    pub log_file: Option<String>,
    /// Do not log to syslog (overrides `log.syslog`).
    #[arg(long, global = true)]
    pub no_syslog: bool,
    /// Do not log to stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// The syslog socket (default /dev/log); for tests.
    #[arg(long, global = true, value_name = "PATH", hide = true)]
    pub syslog_socket: Option<PathBuf>,
}

impl Overrides {
    /// The overrides as `(key, value)` pairs for [`crate::config::Sources`].
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, value) in [
            ("listen", &self.listen),
            ("database.url", &self.database_url),
            ("log.level", &self.log_level),
            ("log.file", &self.log_file),
        ] {
            if let Some(v) = value {
                out.push((key.to_owned(), v.clone()));
            }
        }
        if self.no_syslog {
            out.push(("log.syslog".into(), "false".into()));
        }
        out
    }
}
