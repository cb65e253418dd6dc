//! Configuration: one TOML file, `RATELIMIT_POLICYD_*` environment overrides
//! and CLI overrides, validated into types that rule out bad values.
//!
//! Loading happens in two steps (ripgrep's low/high args):
//! 1. the sources are merged by the `config` crate and deserialized into
//!    [`RawConfig`], whose fields carry SPEC §9's defaults; keys nobody knows
//!    are collected with their full path;
//! 2. [`RawConfig::validate`] turns it into a [`Config`], collecting every
//!    error with its key before failing.
//!
//! Environment variables name a key by its path, upper-case, sections joined
//! by a double underscore: `RATELIMIT_POLICYD_LISTEN`,
//! `RATELIMIT_POLICYD_LIMITS__DEFAULT_QUOTA`,
//! `RATELIMIT_POLICYD_DATABASE__URL`. Lists take commas:
//! `RATELIMIT_POLICYD_LIMITS__EXEMPT=a@x,b@y`.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Weekday;
use chrono_tz::Tz;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::logging::Level;
use crate::persist::{Columns, Table};
use crate::policy::{validate_action, ActionTemplate, CountMode, KeyType, Policy, Stage};
use crate::store::window::{parse_duration_ms, Calendar, Period};
use crate::store::{Limit, Rules};

/// Where the configuration file is when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ratelimit-policyd/ratelimit-policyd.toml";

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "RATELIMIT_POLICYD";

/// The configuration as written, with defaults filled in. Its key names are
/// the contract of SPEC §9.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // The fields are the documented configuration keys (README).
pub struct RawConfig {
    pub listen: String,
    pub allowed_clients: Vec<String>,
    pub max_connections: u64,
    pub max_counters: u64,
    pub idle_timeout: String,
    pub control_socket: String,
    pub limits: RawLimits,
    pub database: RawDatabase,
    pub log: RawLog,
}

/// The `[limits]` section as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct RawLimits {
    pub key_type: String,
    pub period: String,
    pub timezone: String,
    pub week_start: String,
    pub default_quota: i64,
    pub count: String,
    pub charge_stage: String,
    pub count_rejected: bool,
    pub over_quota_action: String,
    pub unauthenticated_action: String,
    pub key_too_long_action: String,
    pub counters_full_action: String,
    pub exempt: Vec<String>,
}

/// The `[database]` section as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct RawDatabase {
    pub url: String,
    pub password_file: String,
    pub table: String,
    pub flush_interval: String,
    pub refresh_interval: String,
    pub reconcile_interval: String,
    pub timeout: String,
    pub columns: RawColumns,
}

/// `[database.columns]` as written: the names of the table's columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct RawColumns {
    pub sender: String,
    pub quota: String,
    pub used: String,
    pub updated: String,
    pub expiry: String,
    pub persist: String,
}

impl Default for RawColumns {
    fn default() -> Self {
        let c = Columns::default();
        RawColumns {
            sender: c.sender,
            quota: c.quota,
            used: c.used,
            updated: c.updated,
            expiry: c.expiry,
            persist: c.persist,
        }
    }
}

/// The `[log]` section as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct RawLog {
    pub syslog: bool,
    pub file: String,
    pub level: String,
    pub file_format: String,
}

/// The default `limits.key_too_long_action`: a temporary refusal (no real
/// login is longer than 255 bytes; a forged one must not pass unlimited).
pub const DEFAULT_KEY_TOO_LONG_ACTION: &str =
    "DEFER_IF_PERMIT 4.7.1 sender login too long for the rate limit";

/// The default `over_quota_action` (SPEC §5).
pub const DEFAULT_OVER_QUOTA_ACTION: &str =
    "DEFER_IF_PERMIT 4.7.1 {period} sender quota exceeded ({used}/{quota}), resets {reset}";

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "127.0.0.1:10032".into(),
            allowed_clients: vec!["127.0.0.1/32".into(), "::1/128".into()],
            max_connections: 1024,
            max_counters: 5_000_000,
            idle_timeout: "600s".into(),
            control_socket: "/run/ratelimit-policyd/control.sock".into(),
            limits: RawLimits::default(),
            database: RawDatabase::default(),
            log: RawLog::default(),
        }
    }
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            key_type: "email".into(),
            period: "daily".into(),
            timezone: String::new(),
            week_start: "monday".into(),
            default_quota: 1000,
            count: "recipients".into(),
            charge_stage: "RCPT".into(),
            count_rejected: true,
            over_quota_action: DEFAULT_OVER_QUOTA_ACTION.into(),
            unauthenticated_action: "DUNNO".into(),
            key_too_long_action: DEFAULT_KEY_TOO_LONG_ACTION.into(),
            counters_full_action: "DUNNO".into(),
            exempt: Vec::new(),
        }
    }
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: "sqlite:///var/lib/ratelimit-policyd/ratelimit.db".into(),
            password_file: String::new(),
            table: "ratelimit".into(),
            flush_interval: "5s".into(),
            refresh_interval: "30s".into(),
            reconcile_interval: "5m".into(),
            timeout: "10s".into(),
            columns: RawColumns::default(),
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            syslog: true,
            file: String::new(),
            level: "info".into(),
            file_format: "standard".into(),
        }
    }
}

/// Where the policy service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (IPv4 or IPv6).
    Tcp(SocketAddr),
    /// A unix stream socket path (`unix:/path`).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which database holds the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An SQLite file (the embedded default).
    Sqlite(PathBuf),
    /// A MySQL/MariaDB URL.
    Mysql(String),
}

/// The validated `[database]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// The backend and where it is.
    pub url: DatabaseUrl,
    /// A file holding the database password, so the main file can stay world-readable.
    pub password_file: Option<PathBuf>,
    /// The table and its column names; plain identifiers.
    pub table: Table,
    /// How often changed counters are written.
    pub flush_interval: Duration,
    /// How often rows changed in the database are pulled.
    pub refresh_interval: Duration,
    /// How often every row is read again (edits that left `updated` alone,
    /// deleted rows).
    pub reconcile_interval: Duration,
    /// Deadline of each database operation, and of the whole final flush at
    /// shutdown.
    pub timeout: Duration,
}

/// The validated `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Log to syslog (facility mail).
    pub syslog: bool,
    /// Also append to this file.
    pub file: Option<PathBuf>,
    /// The least severe level written.
    pub level: Level,
    /// How lines in `file` begin.
    pub file_format: FileFormat,
}

/// How the lines of the log file begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileFormat {
    /// `2026-11-23T04:37:58.123+01:00 ratelimit-policyd[PID]: info: ...`
    #[default]
    Standard,
    /// The Perl daemon's: `Mon Nov 23 04:37:58 2026 ...` (local time, no
    /// level, no pid), for tools that parse its file.
    Perl,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the policy service listens.
    pub listen: ListenAddr,
    /// Peers allowed to connect over TCP; others are closed without a reply.
    pub allowed_clients: Vec<IpNet>,
    /// Connections served at once; past it the daemon waits for a free slot.
    pub max_connections: NonZeroUsize,
    /// Most counters held in memory; past it, senders without a counter get
    /// `limits.counters_full_action`.
    pub max_counters: NonZeroUsize,
    /// Time a connection may take to send its next whole request.
    pub idle_timeout: Duration,
    /// The unix socket of the control commands.
    pub control_socket: PathBuf,
    /// What is limited and how.
    pub policy: Policy,
    /// Where the counters are stored.
    pub database: DatabaseConfig,
    /// Where logs go.
    pub log: LogConfig,
    /// Things that are valid but probably not meant (printed by `check-config`
    /// and logged at start).
    pub warnings: Vec<String>,
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// `(key, message)` pairs; the key is empty for problems of the whole file.
    pub errors: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, msg)) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if key.is_empty() {
                write!(f, "{msg}")?;
            } else {
                write!(f, "{key}: {msg}")?;
            }
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(key: &str, msg: impl Into<String>) -> Self {
        ConfigError {
            errors: vec![(key.into(), msg.into())],
        }
    }
}

/// The sources of one configuration.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The file's path, for messages (`None` when built from a string).
    pub path: Option<PathBuf>,
    /// The TOML text (empty when no file exists).
    pub toml: String,
    /// Environment variables, normally `std::env::vars()`; only those with
    /// the `RATELIMIT_POLICYD_` prefix are used.
    pub env: Vec<(String, String)>,
    /// `(key, value)` overrides from the command line, e.g. `("listen", "...")`.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// Reads the file at `path`. When `required` is false a missing file
    /// counts as empty (the built-in defaults).
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn from_file(path: &Path, required: bool) -> Result<Sources, ConfigError> {
        let toml = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ConfigError::one(
                    "",
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        };
        Ok(Sources {
            path: Some(path.to_owned()),
            toml,
            ..Sources::default()
        })
    }

    /// Merges the sources into a [`RawConfig`].
    ///
    /// # Errors
    ///
    /// TOML syntax errors, values of the wrong type and unknown keys, all named.
    pub fn merge(&self) -> Result<RawConfig, ConfigError> {
        match self.merge_collecting()? {
            (raw, errors) if errors.is_empty() => Ok(raw),
            (_, errors) => Err(ConfigError { errors }),
        }
    }

    /// Merges the sources and validates the result, reporting every problem
    /// in one pass: unknown keys and invalid values together.
    ///
    /// # Errors
    ///
    /// Every problem, each with its key.
    pub fn config(&self) -> Result<(RawConfig, Config), ConfigError> {
        let (raw, mut errors) = self.merge_collecting()?;
        let raw = raw.resolved();
        match raw.validate() {
            Ok(config) if errors.is_empty() => Ok((raw, config)),
            Ok(_) => Err(ConfigError { errors }),
            Err(invalid) => {
                errors.extend(invalid.errors);
                Err(ConfigError { errors })
            }
        }
    }

    /// The merged configuration with its unknown keys as errors beside it
    /// (the known keys are read anyway, so their values can be checked too).
    ///
    /// # Errors
    ///
    /// TOML syntax errors and values of the wrong type (which stop the
    /// reading), with any unknown keys found.
    fn merge_collecting(&self) -> Result<(RawConfig, Vec<(String, String)>), ConfigError> {
        use config::{Environment, File, FileFormat};
        let env: config::Map<String, String> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
            .cloned()
            .collect();
        let mut builder = config::Config::builder()
            .add_source(File::from_str(&self.toml, FileFormat::Toml))
            .add_source(
                Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("allowed_clients")
                    .with_list_parse_key("limits.exempt")
                    .source(Some(env)),
            );
        for (key, value) in &self.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| ConfigError::one(key, e.to_string()))?;
        }
        let origin = match &self.path {
            Some(p) => p.display().to_string(),
            None => "configuration".into(),
        };
        let merged = builder
            .build()
            .map_err(|e| ConfigError::one("", format!("{origin}: {e}")))?;
        let mut unknown = Vec::new();
        let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let de = serde_ignored::Deserializer::new(merged, &mut note_unknown);
        let raw: Result<RawConfig, _> = serde_path_to_error::deserialize(de);
        let mut errors: Vec<(String, String)> = unknown
            .into_iter()
            .map(|k| (k, "unknown key".to_string()))
            .collect();
        match raw {
            Ok(raw) => Ok((raw, errors)),
            Err(e) => {
                errors.push((e.path().to_string(), e.into_inner().to_string()));
                Err(ConfigError { errors })
            }
        }
    }
}

/// Where a configuration comes from, kept so that a reload reads it again
/// the same way.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file.
    pub path: PathBuf,
    /// Whether a missing file is an error (`--config` given) or means the
    /// built-in defaults.
    pub required: bool,
    /// Whether `RATELIMIT_POLICYD_*` variables apply.
    pub use_env: bool,
    /// Command-line overrides.
    pub overrides: Vec<(String, String)>,
}

impl ConfigSource {
    /// Reads, merges and validates the configuration.
    ///
    /// # Errors
    ///
    /// Every problem, each with its key.
    pub fn load(&self) -> Result<(RawConfig, Config), ConfigError> {
        let mut sources = Sources::from_file(&self.path, self.required)?;
        if self.use_env {
            sources.env = std::env::vars().collect();
        }
        sources.overrides = self.overrides.clone();
        let (raw, mut config) = sources.config()?;
        // A relative control socket is the file's neighbour, wherever the
        // daemon or a control command was started from.
        if config.control_socket.is_relative() {
            if let Some(dir) = self.path.parent() {
                config.control_socket = dir.join(&config.control_socket);
            }
        }
        Ok((raw, config))
    }
}

impl Config {
    /// The database password: the first line of `database.password_file`,
    /// if one is set (read by `run` and `check-config`, not by the control
    /// commands, whose users need not be able to read it).
    ///
    /// # Errors
    ///
    /// The file cannot be read, named under `database.password_file`.
    pub fn read_password(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.database.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one(
                "database.password_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Ok(Some(text.lines().next().unwrap_or("").to_owned()))
    }

    /// Parses and validates a TOML string, without environment or overrides.
    ///
    /// # Errors
    ///
    /// Every problem, each with its key.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        Sources {
            toml: toml.into(),
            ..Sources::default()
        }
        .config()
        .map(|(_, config)| config)
    }
}

impl RawConfig {
    /// Resolves what the defaults leave open (the system time zone), so that
    /// printing shows what will actually be used.
    pub fn resolved(mut self) -> RawConfig {
        if self.limits.timezone.trim().is_empty() {
            self.limits.timezone = system_timezone().unwrap_or_else(|| "UTC".into());
        }
        self
    }

    /// The configuration as TOML, with any password in the database URL masked.
    pub fn to_toml_masked(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = mask_password(&shown.database.url);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// Checks every value and builds the [`Config`].
    ///
    /// # Errors
    ///
    /// Every invalid value, each with its key.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut errors: Vec<(String, String)> = Vec::new();
        let mut warnings = Vec::new();
        macro_rules! check {
            ($key:expr, $result:expr) => {
                match $result {
                    Ok(v) => Some(v),
                    Err(msg) => {
                        errors.push(($key.to_string(), msg));
                        None
                    }
                }
            };
        }
        let l = &self.limits;
        let d = &self.database;

        let listen = check!("listen", parse_listen(&self.listen));
        let allowed_clients = check!(
            "allowed_clients",
            self.allowed_clients
                .iter()
                .map(|c| parse_cidr(c))
                .collect::<Result<Vec<_>, _>>()
        );
        let max_connections = check!(
            "max_connections",
            usize::try_from(self.max_connections)
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
                .and_then(NonZeroUsize::new)
                .ok_or_else(|| format!(
                    "must be between 1 and 1000000, not {}",
                    self.max_connections
                ))
        );
        let max_counters = check!(
            "max_counters",
            usize::try_from(self.max_counters)
                .ok()
                .filter(|n| (1_000..=1_000_000_000).contains(n))
                .and_then(NonZeroUsize::new)
                .ok_or_else(|| format!(
                    "must be between 1000 and 1000000000, not {}",
                    self.max_counters
                ))
        );
        let idle_timeout = check!("idle_timeout", positive_duration(&self.idle_timeout));
        let control_socket = check!("control_socket", non_empty_path(&self.control_socket));

        let key_type = check!(
            "limits.key_type",
            match l.key_type.trim().to_ascii_lowercase().as_str() {
                "email" => Ok(KeyType::Email),
                "domain" => Ok(KeyType::Domain),
                other => Err(format!("expected \"email\" or \"domain\", not {other:?}")),
            }
        );
        let period = check!("limits.period", Period::parse(&l.period));
        let tz = check!(
            "limits.timezone",
            parse_timezone(&l.timezone, &mut warnings)
        );
        let week_start = check!("limits.week_start", parse_weekday(&l.week_start));
        let default_quota = check!(
            "limits.default_quota",
            u32::try_from(l.default_quota).map_err(|_| format!(
                "must be between 0 and {}, not {}",
                u32::MAX,
                l.default_quota
            ))
        );
        let count = check!(
            "limits.count",
            match l.count.trim().to_ascii_lowercase().as_str() {
                "recipients" => Ok(CountMode::Recipients),
                "messages" => Ok(CountMode::Messages),
                other => Err(format!(
                    "expected \"recipients\" or \"messages\", not {other:?}"
                )),
            }
        );
        let charge_stage = check!(
            "limits.charge_stage",
            Stage::parse(l.charge_stage.trim()).ok_or_else(|| format!(
                "expected RCPT, MAIL, DATA or END-OF-MESSAGE, not {:?}",
                l.charge_stage
            ))
        );
        let over_quota_action = check!(
            "limits.over_quota_action",
            ActionTemplate::parse(&l.over_quota_action)
        );
        let plain_action =
            |key: &str, action: &String, errors: &mut Vec<(String, String)>| match validate_action(
                action,
            ) {
                Ok(()) => Some(action.trim().to_owned()),
                Err(msg) => {
                    errors.push((key.to_string(), msg));
                    None
                }
            };
        let unauthenticated_action = plain_action(
            "limits.unauthenticated_action",
            &l.unauthenticated_action,
            &mut errors,
        );
        let key_too_long_action = plain_action(
            "limits.key_too_long_action",
            &l.key_too_long_action,
            &mut errors,
        );
        let counters_full_action = plain_action(
            "limits.counters_full_action",
            &l.counters_full_action,
            &mut errors,
        );
        for (key, action) in [
            ("limits.over_quota_action", &l.over_quota_action),
            ("limits.unauthenticated_action", &l.unauthenticated_action),
            ("limits.key_too_long_action", &l.key_too_long_action),
            ("limits.counters_full_action", &l.counters_full_action),
        ] {
            if action.trim_start().to_ascii_uppercase().starts_with("OK") {
                warnings.push(format!(
                    "{key}: {action:?} answers OK; in the wrong restriction list that makes an open relay"
                ));
            }
        }
        let exempt: HashSet<Box<str>> = l
            .exempt
            .iter()
            .map(|k| k.trim().to_lowercase().into_boxed_str())
            .filter(|k| !k.is_empty())
            .collect();

        let url = check!("database.url", parse_database_url(&d.url));
        let password_file =
            (!d.password_file.trim().is_empty()).then(|| PathBuf::from(d.password_file.trim()));
        let table = check!("database.table", identifier(&d.table));
        let c = &d.columns;
        let mut column =
            |name: &str, value: &str| check!(format!("database.columns.{name}"), identifier(value));
        let columns = (
            column("sender", &c.sender),
            column("quota", &c.quota),
            column("used", &c.used),
            column("updated", &c.updated),
            column("expiry", &c.expiry),
            column("persist", &c.persist),
        );
        let flush_interval = check!(
            "database.flush_interval",
            positive_duration(&d.flush_interval)
        );
        let refresh_interval = check!(
            "database.refresh_interval",
            positive_duration(&d.refresh_interval)
        );
        let reconcile_interval = check!(
            "database.reconcile_interval",
            positive_duration(&d.reconcile_interval)
        );
        let timeout = check!("database.timeout", positive_duration(&d.timeout));

        let level = check!("log.level", self.log.level.parse::<Level>());
        let file_format = check!(
            "log.file_format",
            match self.log.file_format.trim().to_ascii_lowercase().as_str() {
                "standard" => Ok(FileFormat::Standard),
                "perl" => Ok(FileFormat::Perl),
                other => Err(format!("expected \"standard\" or \"perl\", not {other:?}")),
            }
        );
        let log_file =
            (!self.log.file.trim().is_empty()).then(|| PathBuf::from(self.log.file.trim()));

        if !errors.is_empty() {
            return Err(ConfigError { errors });
        }
        // Every `check!` above pushed an error when it returned None, so all
        // are Some here.
        let missing = || ConfigError::one("", "internal error: a value was not validated");
        let limit = Limit {
            calendar: Calendar {
                period: period.ok_or_else(missing)?,
                tz: tz.ok_or_else(missing)?,
                week_start: week_start.ok_or_else(missing)?,
            },
            rules: Rules {
                default_quota: default_quota.ok_or_else(missing)?,
                count_rejected: l.count_rejected,
            },
        };
        Ok(Config {
            listen: listen.ok_or_else(missing)?,
            allowed_clients: allowed_clients.ok_or_else(missing)?,
            max_connections: max_connections.ok_or_else(missing)?,
            max_counters: max_counters.ok_or_else(missing)?,
            idle_timeout: idle_timeout.ok_or_else(missing)?,
            control_socket: control_socket.ok_or_else(missing)?,
            policy: Policy {
                key_type: key_type.ok_or_else(missing)?,
                count: count.ok_or_else(missing)?,
                charge_stage: charge_stage.ok_or_else(missing)?,
                limit,
                over_quota_action: over_quota_action.ok_or_else(missing)?,
                unauthenticated_action: unauthenticated_action.ok_or_else(missing)?,
                key_too_long_action: key_too_long_action.ok_or_else(missing)?,
                counters_full_action: counters_full_action.ok_or_else(missing)?,
                exempt,
            },
            database: DatabaseConfig {
                url: url.ok_or_else(missing)?,
                password_file,
                table: Table {
                    name: table.ok_or_else(missing)?,
                    columns: Columns {
                        sender: columns.0.ok_or_else(missing)?,
                        quota: columns.1.ok_or_else(missing)?,
                        used: columns.2.ok_or_else(missing)?,
                        updated: columns.3.ok_or_else(missing)?,
                        expiry: columns.4.ok_or_else(missing)?,
                        persist: columns.5.ok_or_else(missing)?,
                    },
                },
                flush_interval: flush_interval.ok_or_else(missing)?,
                refresh_interval: refresh_interval.ok_or_else(missing)?,
                reconcile_interval: reconcile_interval.ok_or_else(missing)?,
                timeout: timeout.ok_or_else(missing)?,
            },
            log: LogConfig {
                syslog: self.log.syslog,
                file: log_file,
                level: level.ok_or_else(missing)?,
                file_format: file_format.ok_or_else(missing)?,
            },
            warnings,
        })
    }
}

/// A table or column name: letters, digits and `_`, at most 64 (MySQL's
/// limit), so it can be put into SQL text as it is.
fn identifier(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "must be a plain identifier (letters, digits, _), not {s:?}"
        ))
    }
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    let s = s.trim();
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(
                "unix: needs a path, e.g. \"unix:/var/spool/postfix/private/ratelimit\"".into(),
            );
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        format!(
            "{s:?} is neither IP:PORT (\"127.0.0.1:10032\", \"[::1]:10032\") nor \"unix:/path\""
        )
    })
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| {
        format!("{s:?} is not an address or CIDR block like \"127.0.0.1/32\" or \"::1/128\"")
    })
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration_ms(s)? {
        0 => Err("must be longer than zero".into()),
        ms => Ok(Duration::from_millis(ms)),
    }
}

fn non_empty_path(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(PathBuf::from(s.trim()))
    }
}

fn parse_weekday(s: &str) -> Result<Weekday, String> {
    s.trim().parse::<Weekday>().map_err(|_| {
        format!("expected a day of the week such as \"monday\" or \"sunday\", not {s:?}")
    })
}

fn parse_timezone(s: &str, warnings: &mut Vec<String>) -> Result<Tz, String> {
    let name = s.trim();
    if name.is_empty() {
        return Ok(match system_timezone().and_then(|n| n.parse::<Tz>().ok()) {
            Some(tz) => tz,
            None => {
                warnings
                    .push("limits.timezone: the system's time zone is unknown; using UTC".into());
                Tz::UTC
            }
        });
    }
    name.parse::<Tz>().map_err(|_| {
        format!("{name:?} is not an IANA time zone name such as \"Europe/Zurich\" or \"UTC\"")
    })
}

/// The system's IANA time zone name, if it can be found.
pub fn system_timezone() -> Option<String> {
    if let Ok(tz) = std::env::var("TZ") {
        let tz = tz.trim_start_matches(':');
        if tz.parse::<Tz>().is_ok() {
            return Some(tz.to_owned());
        }
    }
    iana_time_zone::get_timezone()
        .ok()
        .filter(|n| n.parse::<Tz>().is_ok())
}

fn parse_database_url(s: &str) -> Result<DatabaseUrl, String> {
    let s = s.trim();
    if let Some(rest) = s
        .strip_prefix("sqlite://")
        .or_else(|| s.strip_prefix("sqlite:"))
    {
        if rest.is_empty() {
            return Err(
                "sqlite: needs a file, e.g. \"sqlite:///var/lib/ratelimit-policyd/ratelimit.db\""
                    .into(),
            );
        }
        return Ok(DatabaseUrl::Sqlite(PathBuf::from(rest)));
    }
    if s.starts_with("mysql://") || s.starts_with("mariadb://") {
        let names_database = s
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .is_some_and(|(_, db)| !db.is_empty() && !db.starts_with('?'));
        if !names_database {
            return Err(format!(
                "{:?} names no database: use \"mysql://user@host:3306/policyd\"",
                mask_password(s)
            ));
        }
        return Ok(DatabaseUrl::Mysql(s.to_owned()));
    }
    Err(format!(
        "{:?} is not a database URL: use \"sqlite:///path/to/file.db\" or \"mysql://user@host:port/db\"",
        mask_password(s)
    ))
}

/// Replaces the password of `scheme://user:password@host` with `****`.
pub fn mask_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:****@{host}");
            }
        }
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_perl_daemons() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(
            c.listen,
            ListenAddr::Tcp("127.0.0.1:10032".parse().unwrap())
        );
        assert_eq!(c.allowed_clients.len(), 2);
        assert_eq!(c.max_connections.get(), 1024);
        assert_eq!(c.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.policy.limit.rules.default_quota, 1000);
        assert_eq!(c.policy.limit.calendar.period, Period::Daily);
        assert_eq!(c.policy.charge_stage, Stage::Rcpt);
        assert_eq!(
            c.policy.over_quota_action.as_str(),
            DEFAULT_OVER_QUOTA_ACTION
        );
        assert_eq!(
            c.database.url,
            DatabaseUrl::Sqlite("/var/lib/ratelimit-policyd/ratelimit.db".into())
        );
        assert_eq!(c.database.flush_interval, Duration::from_secs(5));
        assert_eq!(c.database.refresh_interval, Duration::from_secs(30));
        assert_eq!(c.database.reconcile_interval, Duration::from_secs(300));
        assert_eq!(c.database.timeout, Duration::from_secs(10));
        assert_eq!(c.log.level, Level::Info);
    }

    #[test]
    fn full_example_parses() {
        let c = Config::from_toml_str(
            r#"
            listen = "unix:/var/spool/postfix/private/ratelimit"
            allowed_clients = ["10.0.0.0/8", "2001:db8::1"]
            idle_timeout = "300s"
            [limits]
            key_type = "domain"
            period = "15m"
            timezone = "America/New_York"
            week_start = "sunday"
            default_quota = 0
            count = "messages"
            charge_stage = "END-OF-MESSAGE"
            count_rejected = false
            exempt = [" Boss@Example.com "]
            [database]
            url = "sqlite://./ratelimit.db"
            [log]
            syslog = false
            file = "/tmp/x.log"
            level = "debug"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.listen,
            ListenAddr::Unix("/var/spool/postfix/private/ratelimit".into())
        );
        assert_eq!(c.allowed_clients[1].to_string(), "2001:db8::1/128");
        assert_eq!(c.policy.key_type, KeyType::Domain);
        assert_eq!(c.policy.limit.calendar.week_start, Weekday::Sun);
        assert_eq!(c.policy.count, CountMode::Messages);
        assert_eq!(c.policy.charge_stage, Stage::EndOfMessage);
        assert!(!c.policy.limit.rules.count_rejected);
        assert!(c.policy.exempt.contains("boss@example.com"));
        assert_eq!(c.database.url, DatabaseUrl::Sqlite("./ratelimit.db".into()));
        assert_eq!(c.log.file.as_deref(), Some(Path::new("/tmp/x.log")));
    }

    #[test]
    fn unknown_keys_are_errors_with_their_path() {
        let e =
            Config::from_toml_str("lisen = \"x\"\n[limits]\ndefault_qouta = 5\n[extra]\na = 1\n")
                .unwrap_err();
        let keys: Vec<_> = e.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"lisen"), "{e}");
        assert!(keys.contains(&"limits.default_qouta"), "{e}");
        assert!(keys.contains(&"extra"), "{e}");
    }

    #[test]
    fn every_invalid_value_is_reported_with_its_key() {
        let e = Config::from_toml_str(
            r#"
            listen = "localhost"
            max_connections = 0
            idle_timeout = "0s"
            [limits]
            period = "fortnightly"
            timezone = "Mars/Olympus"
            default_quota = -1
            charge_stage = "HELO"
            over_quota_action = "REJECT {user}"
            [database]
            url = "postgres://x"
            table = "rate limit; drop"
            [log]
            level = "chatty"
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = e.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "max_connections",
                "idle_timeout",
                "limits.period",
                "limits.timezone",
                "limits.default_quota",
                "limits.charge_stage",
                "limits.over_quota_action",
                "database.url",
                "database.table",
                "log.level"
            ],
            "{e}"
        );
    }

    #[test]
    fn renamed_columns_and_the_perl_log_format() {
        let c = Config::from_toml_str(
            "[database.columns]\nused = \"tally\"\nsender = \"email\"\n[log]\nfile_format = \"perl\"\n",
        )
        .unwrap();
        assert_eq!(c.database.table.name, "ratelimit");
        assert_eq!(c.database.table.columns.used, "tally");
        assert_eq!(c.database.table.columns.sender, "email");
        assert_eq!(c.database.table.columns.quota, "quota");
        assert_eq!(c.log.file_format, FileFormat::Perl);
        let e = Config::from_toml_str(
            "[database.columns]\nused = \"used; DROP\"\nexpiry = \"\"\n[log]\nfile_format = \"xml\"\n",
        )
        .unwrap_err();
        let keys: Vec<_> = e.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "database.columns.used",
                "database.columns.expiry",
                "log.file_format"
            ],
            "{e}"
        );
    }

    #[test]
    fn mysql_urls_need_a_database() {
        let c = Config::from_toml_str(
            "[database]\nurl = \"mysql://policyd:pw@127.0.0.1:3306/policyd\"\n",
        )
        .unwrap();
        assert_eq!(
            c.database.url,
            DatabaseUrl::Mysql("mysql://policyd:pw@127.0.0.1:3306/policyd".into())
        );
        let e = Config::from_toml_str("[database]\nurl = \"mysql://policyd:pw@127.0.0.1:3306\"\n")
            .unwrap_err();
        assert_eq!(e.errors[0].0, "database.url");
        assert!(!e.to_string().contains("pw@"), "{e}");
    }

    #[test]
    fn unknown_keys_and_invalid_values_are_reported_together() {
        let e = Config::from_toml_str(
            "lisen = \"x\"\nmax_connections = 0\n[limits]\nperiod = \"never\"\n",
        )
        .unwrap_err();
        let keys: Vec<_> = e.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["lisen", "max_connections", "limits.period"], "{e}");
    }

    #[test]
    fn wrong_types_name_their_key() {
        let e = Config::from_toml_str("[limits]\nexempt = 5\n").unwrap_err();
        assert_eq!(e.errors[0].0, "limits.exempt", "{e}");
        let e = Config::from_toml_str("listen = [").unwrap_err();
        assert!(e.to_string().contains("TOML"), "{e}");
    }

    #[test]
    fn environment_and_overrides_win() {
        let sources = Sources {
            toml: "[limits]\ndefault_quota = 5\n".into(),
            env: vec![
                ("RATELIMIT_POLICYD_LIMITS__DEFAULT_QUOTA".into(), "7".into()),
                ("RATELIMIT_POLICYD_LIMITS__EXEMPT".into(), "a@x,b@y".into()),
                (
                    "RATELIMIT_POLICYD_DATABASE__FLUSH_INTERVAL".into(),
                    "2s".into(),
                ),
                ("UNRELATED".into(), "1".into()),
            ],
            overrides: vec![("listen".into(), "[::1]:10099".into())],
            ..Sources::default()
        };
        let c = sources.merge().unwrap().validate().unwrap();
        assert_eq!(c.policy.limit.rules.default_quota, 7);
        assert_eq!(c.policy.exempt.len(), 2);
        assert_eq!(c.database.flush_interval, Duration::from_secs(2));
        assert_eq!(c.listen, ListenAddr::Tcp("[::1]:10099".parse().unwrap()));
        let typo = Sources {
            env: vec![("RATELIMIT_POLICYD_LIMIT__DEFAULT_QUOTA".into(), "7".into())],
            ..Sources::default()
        };
        assert_eq!(typo.merge().unwrap_err().errors[0].0, "limit");
    }

    #[test]
    fn ok_actions_draw_a_warning_and_passwords_are_masked() {
        let c = Config::from_toml_str("[limits]\nunauthenticated_action = \"OK\"\n").unwrap();
        assert!(c.warnings[0].contains("open relay"));
        assert_eq!(
            mask_password("mysql://u:secret@h:3306/db"),
            "mysql://u:****@h:3306/db"
        );
        assert_eq!(mask_password("mysql://u@h/db"), "mysql://u@h/db");
        let mut raw = RawConfig::default();
        raw.database.url = "mysql://u:secret@h/db".into();
        assert!(!raw.to_toml_masked().contains("secret"));
    }

    #[test]
    fn printed_configuration_reads_back_the_same() {
        let raw = Sources {
            toml: "[limits]\ndefault_quota = 9\n".into(),
            ..Sources::default()
        }
        .merge()
        .unwrap()
        .resolved();
        let again = Sources {
            toml: raw.to_toml_masked(),
            ..Sources::default()
        }
        .merge()
        .unwrap();
        assert_eq!(raw, again);
    }
}
