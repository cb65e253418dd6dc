//! The control socket: `status`, `set-quota`, `reset`, `flush` and `reload`,
//! and the client the CLI subcommands use.
//!
//! Protocol: the client sends one JSON object on one line, with a `version`
//! ([`PROTOCOL_VERSION`]) and a `command`; the server answers with JSON
//! lines and closes the connection. The first line is a [`Reply`]. For
//! `status` it is followed by one [`StatusRow`] per counter and an
//! [`End`] line; rows are written as they are produced, so a client can print
//! a million of them without the daemon building one huge answer.
//!
//! The socket has mode 0660 (the daemon's group may steer it). At most
//! [`MAX_CLIENTS`] control connections are served at once; a request line is
//! at most [`MAX_REQUEST_LEN`] bytes and must arrive within
//! [`REQUEST_TIMEOUT`].

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::daemon::ReloadHandle;
use crate::persist::FlushHandle;
use crate::policy::DecisionKind;
use crate::server::Shared;
use crate::stats::{DbState, Stats};
use crate::store::{normalize_key, Calendar, Counter};

/// The version of the control protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;
/// Control connections served at once.
pub const MAX_CLIENTS: usize = 8;
/// Longest request line.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Time allowed to send the request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`] of the client.
    pub version: u32,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// The header and the counters: those of `keys` if any are given, else
    /// the `top` by `used` if given, else all.
    Status {
        /// Only these keys.
        #[serde(default)]
        keys: Vec<String>,
        /// Only the N highest by `used`.
        #[serde(default)]
        top: Option<usize>,
        /// Only the counters over their quota in the current window.
        #[serde(default)]
        over: bool,
    },
    /// Sets a key's quota now (and in the database at the next flush).
    SetQuota {
        /// The key.
        key: String,
        /// The new quota.
        quota: u32,
        /// Keep it across window resets.
        #[serde(default)]
        persist: bool,
    },
    /// Sets a key's `used` to 0 now (and in the database at the next flush).
    Reset {
        /// The key.
        key: String,
    },
    /// Flushes now and answers when done.
    Flush,
    /// Reloads the configuration (as SIGHUP does).
    Reload,
}

/// The first (for most commands the only) line of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The server's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Whether the command worked.
    pub ok: bool,
    /// What was done, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status header, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusHeader>,
}

impl Reply {
    fn ok(message: String) -> Reply {
        Reply {
            version: PROTOCOL_VERSION,
            ok: true,
            message: Some(message),
            error: None,
            status: None,
        }
    }

    fn err(error: String) -> Reply {
        Reply {
            version: PROTOCOL_VERSION,
            ok: false,
            message: None,
            error: Some(error),
            status: None,
        }
    }
}

/// The daemon-wide part of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusHeader {
    /// The daemon's version.
    pub daemon_version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Policy connections open now.
    pub connections_open: u64,
    /// Policy connections accepted since start.
    pub connections_total: u64,
    /// Requests answered since start.
    pub requests: u64,
    /// Requests by decision (accepted, over_quota, ...).
    pub decisions: BTreeMap<String, u64>,
    /// The last flush.
    pub last_flush: LastFlush,
    /// Counters with usage not yet in the database.
    pub pending_rows: usize,
    /// Units not yet in the database.
    pub pending_units: u64,
    /// Counters in memory.
    pub counters: usize,
    /// The backend (`sqlite`, ...).
    pub database: String,
    /// `up` (the last operation of every kind worked), `down` (some kind
    /// keeps failing) or `unknown` (nothing reached the database yet).
    pub database_state: String,
    /// Unix seconds since when it is down; 0 unless down.
    #[serde(default)]
    pub database_down_since: i64,
    /// Local time of `database_down_since`.
    #[serde(default)]
    pub database_down_since_local: String,
    /// The last database error (`reads:`/`writes:` and the message), if any.
    #[serde(default)]
    pub database_error: Option<String>,
    /// Local time of the last database error.
    #[serde(default)]
    pub database_error_local: String,
    /// Whether every row has been loaded (false while the start-up load
    /// waits for a database that was away).
    #[serde(default)]
    pub loaded: bool,
    /// The configured period and time zone, for reading expiries.
    pub period: String,
    /// IANA time zone of the windows.
    pub timezone: String,
}

/// The last flush, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastFlush {
    /// Unix seconds; 0 = none yet.
    pub at: i64,
    /// Local time of `at`.
    pub at_local: String,
    /// Rows written (or tried).
    pub rows: usize,
    /// `ok`, or the error.
    pub result: String,
}

/// One counter in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    /// The key.
    pub key: String,
    /// Units allowed in this window.
    pub quota: u32,
    /// Units used in this window.
    pub used: u32,
    /// `quota - used`, at least 0.
    pub remaining: u32,
    /// End of the window, unix seconds (0: none yet, a row without one).
    pub expiry: i64,
    /// End of the window, local time, or `expired`.
    pub expiry_local: String,
    /// The window is over: the sender's next request starts a new one
    /// (`used` is shown as 0 then, `remaining` as the quota).
    #[serde(default)]
    pub expired: bool,
    /// Quota kept across resets.
    pub persist: bool,
    /// Units not yet written to the database.
    pub pending: u32,
}

/// The last line of a `status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Always true; marks the end.
    pub end: bool,
    /// Rows sent.
    pub rows: usize,
    /// Keys asked for that have no counter in memory.
    #[serde(default)]
    pub not_cached: Vec<String>,
}

/// What the control server works with.
pub struct ControlContext {
    /// Counters, stats and settings.
    pub shared: Arc<Shared>,
    /// To flush now.
    pub flush: FlushHandle,
    /// To reload.
    pub reload: ReloadHandle,
    /// The backend's name.
    pub backend: &'static str,
}

/// A bound control socket.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Binds `path` with mode 0660, replacing a stale socket file.
    ///
    /// # Errors
    ///
    /// `AddrInUse` when another daemon answers there; any error binding.
    pub async fn bind(path: &Path) -> io::Result<ControlListener> {
        let listener = crate::socket::bind_unix(path).await?;
        Ok(ControlListener {
            listener,
            path: path.to_owned(),
        })
    }
}

/// Serves control requests until `shutdown`; removes the socket file then.
pub async fn serve(
    listener: ControlListener,
    ctx: Arc<ControlContext>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &ctx).await {
                        log::debug!("control connection failed: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                log::error!("control socket accept failed: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    let _ = std::fs::remove_file(&listener.path);
}

async fn handle(stream: UnixStream, ctx: &ControlContext) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST_LEN as u64 + 1));
    let n = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    if n > MAX_REQUEST_LEN {
        return send(
            &mut write,
            &Reply::err(format!("request longer than {MAX_REQUEST_LEN} bytes")),
        )
        .await;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return send(&mut write, &Reply::err(format!("malformed request: {e}"))).await,
    };
    if request.version != PROTOCOL_VERSION {
        let msg = format!(
            "control protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
            request.version
        );
        return send(&mut write, &Reply::err(msg)).await;
    }
    let shared = &ctx.shared;
    let now = shared.clock.now();
    match request.command {
        Command::Status { keys, top, over } => status(&mut write, ctx, &keys, top, over).await,
        Command::SetQuota {
            key,
            quota,
            persist,
        } => {
            let key = normalize_key(&key).into_owned();
            let settings = shared.settings.load();
            let c = shared
                .store
                .set_quota(&key, quota, persist, now, &settings.policy.limit);
            crate::notice!(
                "control: set-quota {} {quota}{} (used {})",
                crate::protocol::Escaped(&key),
                if persist { " persist" } else { "" },
                c.used
            );
            let msg = format!(
                "{key}: quota {quota}, persist {}, used {}",
                yes_no(persist),
                c.used
            );
            send(&mut write, &Reply::ok(msg)).await
        }
        Command::Reset { key } => {
            let key = normalize_key(&key).into_owned();
            let reply = match shared.store.reset(&key) {
                Some(_) => {
                    crate::notice!("control: reset {}", crate::protocol::Escaped(&key));
                    Reply::ok(format!("{key}: used reset to 0"))
                }
                None => Reply::err(format!("{key}: no such counter")),
            };
            send(&mut write, &reply).await
        }
        Command::Flush => {
            let reply = match ctx.flush.flush().await {
                Ok(rows) => Reply::ok(format!("flushed {}", plural(rows as u64, "row"))),
                Err(e) => Reply::err(format!(
                    "flush failed, the counts are kept for the next try: {e}"
                )),
            };
            send(&mut write, &reply).await
        }
        Command::Reload => {
            let reply = match ctx.reload.reload().await {
                Ok(msg) => Reply::ok(msg),
                Err(msg) => Reply::err(msg),
            };
            send(&mut write, &reply).await
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn status<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    ctx: &ControlContext,
    keys: &[String],
    top: Option<usize>,
    over: bool,
) -> io::Result<()> {
    let shared = &ctx.shared;
    let store = &shared.store;
    let calendar = shared.settings.load().policy.limit.calendar;
    let now = shared.clock.now();
    let header = header(ctx, &calendar);
    let reply = Reply {
        status: Some(header),
        ..Reply::ok(String::new())
    };
    send(
        w,
        &Reply {
            message: None,
            ..reply
        },
    )
    .await?;
    let is_over = |c: &Counter| c.expiry > now && c.used > c.quota;
    let mut not_cached = Vec::new();
    let rows: Vec<(Box<str>, Counter)> = if !keys.is_empty() {
        let mut rows = Vec::new();
        for k in keys {
            let k = normalize_key(k);
            match store.get(&k) {
                Some(c) => rows.push((Box::from(&*k), c)),
                None => not_cached.push(k.into_owned()),
            }
        }
        rows
    } else if let Some(n) = top {
        store.top(n)
    } else if over {
        store.select(is_over)
    } else {
        store.snapshot()
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut sent = 0;
    for (key, c) in &rows {
        if over && !is_over(c) {
            continue;
        }
        // A finished window counts for nothing any more: the sender's next
        // request starts a new one.
        let expired = now >= c.expiry;
        let row = StatusRow {
            key: key.to_string(),
            quota: c.quota,
            used: if expired { 0 } else { c.used },
            remaining: if expired { c.quota } else { c.remaining() },
            expiry: c.expiry,
            expiry_local: if expired {
                "expired".into()
            } else {
                calendar.format_local(c.expiry)
            },
            expired,
            persist: c.persist,
            pending: c.pending,
        };
        serde_json::to_writer(&mut buf, &row).map_err(io::Error::other)?;
        buf.push(b'\n');
        sent += 1;
        if buf.len() >= 60 * 1024 {
            w.write_all(&buf).await?;
            buf.clear();
        }
    }
    serde_json::to_writer(
        &mut buf,
        &End {
            end: true,
            rows: sent,
            not_cached,
        },
    )
    .map_err(io::Error::other)?;
    buf.push(b'\n');
    w.write_all(&buf).await?;
    w.flush().await
}

fn header(ctx: &ControlContext, calendar: &Calendar) -> StatusHeader {
    let shared = &ctx.shared;
    let stats: &Stats = &shared.stats;
    let (pending_units, pending_rows) = shared.store.pending();
    let last = stats.last_flush.lock().clone();
    let health = stats.database.lock().clone();
    let (database_state, down_since) = match health.state() {
        DbState::Unknown => ("unknown", 0),
        DbState::Up => ("up", 0),
        DbState::Down { since } => ("down", since),
    };
    let last_error = health.last_error();
    let local = |at: i64| {
        if at == 0 {
            String::new()
        } else {
            calendar.format_local(at)
        }
    };
    StatusHeader {
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: stats.started.elapsed().as_secs(),
        connections_open: Stats::get(&stats.connections_open),
        connections_total: Stats::get(&stats.connections_total),
        requests: stats.requests(),
        decisions: DecisionKind::ALL
            .iter()
            .map(|k| (k.as_str().to_string(), stats.decisions(*k)))
            .collect(),
        last_flush: LastFlush {
            at: last.at,
            at_local: if last.at == 0 {
                "never".into()
            } else {
                calendar.format_local_seconds(last.at)
            },
            rows: last.rows,
            result: last.error.unwrap_or_else(|| "ok".into()),
        },
        pending_rows: pending_rows + Stats::get(&stats.unconfirmed_rows) as usize,
        pending_units: pending_units + Stats::get(&stats.unconfirmed_units),
        counters: shared.store.len(),
        database: ctx.backend.to_string(),
        database_state: database_state.into(),
        database_down_since: down_since,
        database_down_since_local: local(down_since),
        database_error: last_error.map(|(op, _, e)| format!("{}: {e}", op.as_str())),
        database_error_local: local(last_error.map_or(0, |(_, at, _)| at)),
        loaded: health.loaded,
        period: calendar.period.to_string(),
        timezone: calendar.tz.name().to_string(),
    }
}

/// Why a control command could not be carried out; each has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers on the socket.
    #[error("daemon not running ({0})")]
    NotRunning(String),
    /// The socket exists but cannot be used (permissions, ...).
    #[error("cannot reach the daemon at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The answer could not be read.
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon did not answer in time (wedged, or overloaded).
    #[error("daemon not answering (no answer within {0:?})")]
    NotAnswering(Duration),
    /// Where the answer was to be written is gone (`status | head -1`).
    #[error("output closed")]
    OutputClosed,
    /// The answer could not be written out.
    #[error("cannot write: {0}")]
    Output(io::Error),
}

impl ClientError {
    /// Exit code: 3 not running (as LSB `status` wants), 4 cannot connect
    /// or no answer in time (LSB: "status unknown"), 1 the daemon refused,
    /// 5 bad answer, 0 when the reader of the output went away, 1 when the
    /// output cannot be written.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotRunning(_) => 3,
            ClientError::Connect { .. } | ClientError::NotAnswering(_) => 4,
            ClientError::Refused(_) | ClientError::Output(_) => 1,
            ClientError::Protocol(_) => 5,
            ClientError::OutputClosed => 0,
        }
    }

    /// A failed write of the output: [`ClientError::OutputClosed`] when the
    /// reader went away (a broken pipe), [`ClientError::Output`] otherwise.
    pub fn from_output(e: io::Error) -> ClientError {
        if e.kind() == io::ErrorKind::BrokenPipe {
            ClientError::OutputClosed
        } else {
            ClientError::Output(e)
        }
    }
}

/// How long the client waits for an answer (each read) by default.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the control socket; one request per connection.
pub struct Client {
    reader: BufReader<std::os::unix::net::UnixStream>,
    /// How long each read and write may wait ([`CLIENT_TIMEOUT`] unless
    /// set).
    timeout: Duration,
    /// The end line of a `status` answer.
    end: Option<End>,
}

impl Client {
    /// Connects to the daemon at `path`.
    ///
    /// # Errors
    ///
    /// [`ClientError::NotRunning`] when there is no socket or nobody listens
    /// on it; [`ClientError::Connect`] otherwise.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => {
                let mut client = Client {
                    reader: BufReader::new(stream),
                    timeout: CLIENT_TIMEOUT,
                    end: None,
                };
                client.set_timeout(CLIENT_TIMEOUT);
                Ok(client)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ClientError::NotRunning(format!(
                "no socket at {}",
                path.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ClientError::NotRunning(
                format!("stale socket at {}", path.display()),
            )),
            Err(source) => Err(ClientError::Connect {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Sets how long each read and write may wait (a flush or a reload may
    /// take longer than a status).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let stream = self.reader.get_ref();
        let _ = stream.set_read_timeout(Some(timeout));
        let _ = stream.set_write_timeout(Some(timeout));
    }

    /// Sends `command` and reads the first answer line.
    ///
    /// # Errors
    ///
    /// The daemon refused the command or the answer was unreadable.
    pub fn send(&mut self, command: Command) -> Result<Reply, ClientError> {
        let request = Request {
            version: PROTOCOL_VERSION,
            command,
        };
        let mut line =
            serde_json::to_vec(&request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&line)
            .map_err(|e| self.io_error(e, "cannot send"))?;
        let reply: Reply = self
            .read_line()?
            .ok_or_else(|| ClientError::Protocol("no answer".into()))?;
        if !reply.ok {
            return Err(ClientError::Refused(
                reply.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(reply)
    }

    /// Reads the next `status` row; `None` after the last (the end line is
    /// kept: [`Client::end`]).
    ///
    /// # Errors
    ///
    /// An unreadable or truncated answer.
    pub fn next_row(&mut self) -> Result<Option<StatusRow>, ClientError> {
        let value: serde_json::Value = self
            .read_line()?
            .ok_or_else(|| ClientError::Protocol("answer ended early".into()))?;
        if value.get("end").is_some() {
            self.end = Some(
                serde_json::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))?,
            );
            return Ok(None);
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The end line of a `status` answer, once every row was read.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    fn io_error(&self, e: io::Error, what: &str) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::NotAnswering(self.timeout)
            }
            _ => ClientError::Protocol(format!("{what}: {e}")),
        }
    }

    fn read_line<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| self.io_error(e, "cannot read"))?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// Prints `status` for a human: the header, then the rows sorted (by key, or
/// by `used` with `top`) in aligned columns. The rows are collected to sort
/// and align them; for very many counters use `--top` or `--json`.
///
/// # Errors
///
/// See [`Client`]; writing to `out` failing is a [`ClientError::Protocol`].
pub fn print_status(
    client: &mut Client,
    header: &StatusHeader,
    top: bool,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    let io = ClientError::from_output;
    let h = header;
    let decisions: Vec<String> = h
        .decisions
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let database = match h.database_state.as_str() {
        "down" => format!("{} down since {}", h.database, h.database_down_since_local),
        "unknown" => format!("{} not reached yet", h.database),
        state => format!("{} {state}", h.database),
    };
    writeln!(
        out,
        "ratelimit-policyd {}, up {}, {database} ({} period, {})",
        h.daemon_version,
        format_uptime(h.uptime_secs),
        h.period,
        h.timezone
    )
    .map_err(io)?;
    if !h.loaded {
        writeln!(
            out,
            "counters not loaded yet: every sender started from 0 with the default quota"
        )
        .map_err(io)?;
    }
    if let Some(e) = &h.database_error {
        writeln!(out, "last database error ({}): {e}", h.database_error_local).map_err(io)?;
    }
    writeln!(
        out,
        "connections: {} open, {} since start",
        h.connections_open, h.connections_total
    )
    .map_err(io)?;
    writeln!(out, "requests: {} ({})", h.requests, decisions.join(", ")).map_err(io)?;
    writeln!(
        out,
        "  (duplicate: a repeat of the previous query, answered alike; exempt: in `exempt`; \
         ignored: not a request the daemon limits, such as CONNECT or HELO, answered DUNNO)"
    )
    .map_err(io)?;
    let last_flush = if h.last_flush.at == 0 {
        "never".to_string()
    } else {
        format!(
            "{}, {}, {}",
            h.last_flush.at_local,
            plural(h.last_flush.rows as u64, "row"),
            h.last_flush.result
        )
    };
    writeln!(
        out,
        "last flush: {last_flush}; pending: {}, {}; counters cached: {}",
        plural(h.pending_rows as u64, "row"),
        plural(h.pending_units, "unit"),
        h.counters
    )
    .map_err(io)?;
    let mut rows = Vec::new();
    while let Some(row) = client.next_row()? {
        rows.push(row);
    }
    if !top {
        rows.sort_by(|a, b| a.key.cmp(&b.key));
    }
    let titles = [
        "KEY",
        "QUOTA",
        "USED",
        "REMAINING",
        "EXPIRY",
        "PERSIST",
        "PENDING",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                crate::protocol::Escaped(&r.key).to_string(),
                r.quota.to_string(),
                r.used.to_string(),
                r.remaining.to_string(),
                r.expiry_local.clone(),
                yes_no(r.persist).to_string(),
                r.pending.to_string(),
            ]
        })
        .collect();
    let mut widths = titles.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    writeln!(out).map_err(io)?;
    let line = |cells: [&str; 7]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Text left-aligned, numbers right-aligned.
            let text = matches!(i, 0 | 4 | 5);
            let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
            if i > 0 {
                s.push_str("  ");
            }
            if text {
                s.push_str(cell);
                s.push_str(&pad);
            } else {
                s.push_str(&pad);
                s.push_str(cell);
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(titles)).map_err(io)?;
    for row in &cells {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str))).map_err(io)?;
    }
    for key in client
        .end()
        .map(|e| e.not_cached.as_slice())
        .unwrap_or_default()
    {
        writeln!(
            out,
            "{}: not cached (no request since the start or since its window ended; its row, if \
             any, is in the database)",
            crate::protocol::Escaped(key)
        )
        .map_err(io)?;
    }
    Ok(())
}

/// Streams `status` as one JSON document: `{"header": ..., "counters": [...]}`.
///
/// # Errors
///
/// See [`print_status`].
pub fn print_status_json(
    client: &mut Client,
    header: &StatusHeader,
    out: &mut impl Write,
) -> Result<(), ClientError> {
    let io = ClientError::from_output;
    let header = serde_json::to_string(header).map_err(|e| ClientError::Protocol(e.to_string()))?;
    write!(out, "{{\"header\":{header},\"counters\":[").map_err(io)?;
    let mut first = true;
    while let Some(row) = client.next_row()? {
        let row = serde_json::to_string(&row).map_err(|e| ClientError::Protocol(e.to_string()))?;
        write!(out, "{}\n{row}", if first { "" } else { "," }).map_err(io)?;
        first = false;
    }
    let not_cached = client
        .end()
        .map(|e| e.not_cached.clone())
        .unwrap_or_default();
    let not_cached =
        serde_json::to_string(&not_cached).map_err(|e| ClientError::Protocol(e.to_string()))?;
    writeln!(out, "],\"not_cached\":{not_cached}}}").map_err(io)
}

/// `1 row`, `2 rows`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn format_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_a_version_and_a_command() {
        let r = Request {
            version: 1,
            command: Command::SetQuota {
                key: "a@b".into(),
                quota: 5,
                persist: true,
            },
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"command":"set-quota","key":"a@b","quota":5,"persist":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
        let s: Request = serde_json::from_str(r#"{"version":1,"command":"status"}"#).unwrap();
        assert_eq!(
            s.command,
            Command::Status {
                keys: vec![],
                top: None,
                over: false
            }
        );
    }

    #[test]
    fn uptime_reads_well() {
        assert_eq!(format_uptime(59), "0m 59s");
        assert_eq!(format_uptime(3 * 3600 + 61), "3h 1m 1s");
        assert_eq!(format_uptime(2 * 86_400 + 3600), "2d 1h 0m");
    }
}
