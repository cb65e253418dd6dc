//! The log backend: stderr (in the foreground), a log file, and syslog
//! (facility mail, ident `ratelimit-policyd`). Nothing else sets up logging.
//!
//! The crate logs through the `log` facade. syslog has a `notice` priority
//! that `log` lacks; a line logged at `info` with target [`NOTICE`] is a
//! notice (the Perl daemon logs new senders at notice). Use
//! [`crate::notice!`].
//!
//! Values that come from clients are written through
//! [`crate::protocol::Escaped`], and every message is formatted by Rust's
//! `format_args!`, never by a printf-style function: a `%` or a newline in a
//! client's value cannot change a log line.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::config::{FileFormat, LogConfig};

/// Log target that marks an `info` line as a syslog notice.
pub const NOTICE: &str = "notice";

/// Logs at notice priority: `notice!("...")`.
#[macro_export]
macro_rules! notice {
    ($($arg:tt)+) => { ::log::info!(target: $crate::logging::NOTICE, $($arg)+) };
}

/// Severity, most severe first (syslog's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something is wrong or about to be (a sender over quota, a lost database).
    Warning,
    /// Normal but significant (a new sender, start, stop).
    Notice,
    /// One line per charged request.
    Info,
    /// For developers.
    Debug,
    /// Very verbose.
    Trace,
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Level, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "error" | "err" => Level::Error,
            "warning" | "warn" => Level::Warning,
            "notice" => Level::Notice,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            other => {
                return Err(format!(
                    "expected error, warning, notice, info, debug or trace, not {other:?}"
                ))
            }
        })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Notice => "notice",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        })
    }
}

impl Level {
    fn of(record: &log::Metadata<'_>) -> Level {
        match record.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warning,
            log::Level::Info if record.target() == NOTICE => Level::Notice,
            log::Level::Info => Level::Info,
            log::Level::Debug => Level::Debug,
            log::Level::Trace => Level::Trace,
        }
    }

    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Error,
            1 => Level::Warning,
            2 => Level::Notice,
            3 => Level::Info,
            4 => Level::Debug,
            _ => Level::Trace,
        }
    }
}

type Syslog = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

/// Where log lines go, and at which level.
pub struct Logger {
    level: AtomicU8,
    /// The file's lines begin as the Perl daemon's did.
    perl_file_format: AtomicBool,
    stderr: bool,
    syslog_socket: Option<PathBuf>,
    file: Mutex<Option<(PathBuf, File)>>,
    syslog: Mutex<Option<Syslog>>,
}

impl fmt::Debug for Logger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logger")
            .field("level", &self.level())
            .field("stderr", &self.stderr)
            .finish_non_exhaustive()
    }
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Where the daemon's output goes besides what [`LogConfig`] says.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// Also write to stderr (the daemon runs in the foreground).
    pub stderr: bool,
    /// The syslog socket; `None` for the system's (`/dev/log`).
    pub syslog_socket: Option<PathBuf>,
}

/// Installs the process-wide logger.
///
/// # Errors
///
/// The log file cannot be opened. A missing syslog socket is not an error: it
/// is reported on stderr and syslog is left out.
pub fn init(cfg: &LogConfig, outputs: &Outputs) -> io::Result<&'static Logger> {
    let file = match &cfg.file {
        Some(path) => Some((path.clone(), open_log(path)?)),
        None => None,
    };
    let syslog = if cfg.syslog {
        match connect_syslog(outputs.syslog_socket.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!(
                    "ratelimit-policyd: warning: syslog unavailable, logging without it: {e}"
                );
                None
            }
        }
    } else {
        None
    };
    let logger = Logger {
        level: AtomicU8::new(cfg.level as u8),
        perl_file_format: AtomicBool::new(cfg.file_format == FileFormat::Perl),
        stderr: outputs.stderr,
        syslog_socket: outputs.syslog_socket.clone(),
        file: Mutex::new(file),
        syslog: Mutex::new(syslog),
    };
    let logger = LOGGER.get_or_init(|| logger);
    // Fails only if a logger is already installed; keep the first one.
    let _ = log::set_logger(logger);
    logger.set_level(cfg.level);
    Ok(logger)
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open log file {}: {e}", path.display()),
            )
        })
}

fn connect_syslog(socket: Option<&Path>) -> Result<Syslog, syslog::Error> {
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_MAIL,
        hostname: None,
        process: "ratelimit-policyd".into(),
        pid: std::process::id(),
    };
    match socket {
        Some(path) => syslog::unix_custom(formatter, path),
        None => syslog::unix(formatter),
    }
}

/// Applies changed log settings to the installed logger (reload): level,
/// file, syslog on or off. Does nothing when no logger is installed (tests).
///
/// # Errors
///
/// A new log file cannot be opened (the old settings for the file stay).
pub fn reconfigure(cfg: &LogConfig) -> io::Result<()> {
    let Some(logger) = LOGGER.get() else {
        return Ok(());
    };
    logger.set_level(cfg.level);
    logger
        .perl_file_format
        .store(cfg.file_format == FileFormat::Perl, Ordering::Relaxed);
    // Nothing is logged while one of the logger's locks is held: logging
    // takes them too, and they are not reentrant.
    let want_syslog = cfg.syslog && logger.syslog.lock().is_none();
    if !cfg.syslog {
        *logger.syslog.lock() = None;
    } else if want_syslog {
        // Connecting (a socket call) happens outside the lock as well.
        match connect_syslog(logger.syslog_socket.as_deref()) {
            Ok(s) => *logger.syslog.lock() = Some(s),
            Err(e) => log::warn!("syslog unavailable, logging without it: {e}"),
        }
    }
    let current = logger.file.lock().as_ref().map(|(p, _)| p.clone());
    if current != cfg.file {
        let opened = match &cfg.file {
            Some(path) => Some((path.clone(), open_log(path)?)),
            None => None,
        };
        *logger.file.lock() = opened;
    }
    Ok(())
}

/// Reopens the log file of the installed logger (SIGUSR1, after logrotate).
///
/// # Errors
///
/// The file cannot be opened; logging goes on to the old one.
pub fn reopen() -> io::Result<()> {
    LOGGER.get().map_or(Ok(()), Logger::reopen)
}

impl Logger {
    /// The current level.
    pub fn level(&self) -> Level {
        Level::from_u8(self.level.load(Ordering::Relaxed))
    }

    /// Changes the level (reload). The `log` facade's own filter follows,
    /// so a line below the level costs one comparison at the call site.
    pub fn set_level(&self, level: Level) {
        self.level.store(level as u8, Ordering::Relaxed);
        log::set_max_level(match level {
            Level::Error => log::LevelFilter::Error,
            Level::Warning => log::LevelFilter::Warn,
            // Notice lines are `info` records with the notice target.
            Level::Notice | Level::Info => log::LevelFilter::Info,
            Level::Debug => log::LevelFilter::Debug,
            Level::Trace => log::LevelFilter::Trace,
        });
    }

    /// Reopens the log file at its path (after logrotate moved it).
    ///
    /// # Errors
    ///
    /// The file cannot be opened; the old one is kept.
    pub fn reopen(&self) -> io::Result<()> {
        let mut guard = self.file.lock();
        if let Some((path, file)) = guard.as_mut() {
            *file = open_log(path)?;
        }
        Ok(())
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        Level::of(metadata) <= self.level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = Level::of(record.metadata());
        let message = record.args();
        if self.stderr || self.file.lock().is_some() {
            let now = chrono::Local::now();
            let line = format!(
                "{} ratelimit-policyd[{}]: {level}: {message}\n",
                now.format("%Y-%m-%dT%H:%M:%S%.3f%:z"),
                std::process::id()
            );
            if self.stderr {
                let _ = io::stderr().write_all(line.as_bytes());
            }
            if let Some((_, file)) = self.file.lock().as_mut() {
                // One write per line: appends from several threads never interleave.
                let _ = if self.perl_file_format.load(Ordering::Relaxed) {
                    // Perl's scalar localtime: "Mon Nov  3 04:37:58 2026".
                    let perl = format!("{} {message}\n", now.format("%a %b %e %H:%M:%S %Y"));
                    file.write_all(perl.as_bytes())
                } else {
                    file.write_all(line.as_bytes())
                };
            }
        }
        if let Some(s) = self.syslog.lock().as_mut() {
            let text = message.to_string();
            let _ = match level {
                Level::Error => s.err(text),
                Level::Warning => s.warning(text),
                Level::Notice => s.notice(text),
                Level::Info => s.info(text),
                Level::Debug | Level::Trace => s.debug(text),
            };
        }
    }

    fn flush(&self) {
        let _ = io::stderr().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!("WARN".parse::<Level>(), Ok(Level::Warning));
        assert_eq!("notice".parse::<Level>(), Ok(Level::Notice));
        assert!("loud".parse::<Level>().is_err());
        assert!(Level::Notice < Level::Info);
        for l in [
            Level::Error,
            Level::Warning,
            Level::Notice,
            Level::Info,
            Level::Debug,
            Level::Trace,
        ] {
            assert_eq!(Level::from_u8(l as u8), l);
        }
    }

    #[test]
    fn notice_target_maps_to_notice() {
        let m = log::Metadata::builder()
            .level(log::Level::Info)
            .target(NOTICE)
            .build();
        assert_eq!(Level::of(&m), Level::Notice);
        let m = log::Metadata::builder()
            .level(log::Level::Info)
            .target("x")
            .build();
        assert_eq!(Level::of(&m), Level::Info);
    }
}
