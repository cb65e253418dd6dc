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

    /// Overrides of common configuration keys (for `run` and
    /// `check-config`, which is what runs when no subcommand is given).
    #[command(flatten)]
    pub overrides: Overrides,

    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The overrides in force: those given before the subcommand (when it
    /// is `run`, `check-config` or none) and those given after it.
    pub fn overrides(&self) -> Overrides {
        let after = match &self.command {
            Some(Command::Run { overrides } | Command::CheckConfig { overrides }) => {
                Some(overrides)
            }
            _ => None,
        };
        match after {
            Some(after) => self.overrides.clone().or(after),
            None => self.overrides.clone(),
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run {
        /// Overrides of common configuration keys.
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Validate the configuration and print the effective values.
    CheckConfig {
        /// Overrides of common configuration keys.
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Show the daemon's state and its cached counters.
    Status {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the N counters with the highest usage.
        #[arg(long, value_name = "N")]
        top: Option<usize>,
        /// Only the counters over their quota.
        #[arg(long)]
        over: bool,
        /// Only these keys.
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Set a sender's quota now (written to the database at the next flush).
    SetQuota {
        /// The key (sasl_username, or domain with key_type = "domain").
        key: String,
        /// The new quota (0 blocks the sender).
        #[arg(allow_negative_numbers = true, value_parser = parse_quota)]
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
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Overrides `database.url`.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Overrides `log.level`.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Overrides `log.file`.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<String>,
    /// Do not log to syslog (overrides `log.syslog`).
    #[arg(long)]
    pub no_syslog: bool,
    /// Do not log to stderr.
    #[arg(long)]
    pub quiet: bool,
    /// The syslog socket (default /dev/log); for tests.
    #[arg(long, value_name = "PATH", hide = true)]
    pub syslog_socket: Option<PathBuf>,
}

/// A quota on the command line: 0 to 4294967295.
fn parse_quota(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .map_err(|_| format!("must be a whole number from 0 to {}, not {s:?}", u32::MAX))
}

impl Overrides {
    /// These overrides, each filled in from `other` where not given here.
    pub fn or(self, other: &Overrides) -> Overrides {
        Overrides {
            listen: other.listen.clone().or(self.listen),
            database_url: other.database_url.clone().or(self.database_url),
            log_level: other.log_level.clone().or(self.log_level),
            log_file: other.log_file.clone().or(self.log_file),
            no_syslog: self.no_syslog || other.no_syslog,
            quiet: self.quiet || other.quiet,
            syslog_socket: other.syslog_socket.clone().or(self.syslog_socket),
        }
    }

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
