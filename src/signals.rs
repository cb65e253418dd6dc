//! Signals: SIGTERM/SIGINT stop the daemon, SIGHUP reloads, SIGUSR1
//! reopens the log file.
//!
//! [`install`] sets up every handler at once, before the start-up load (which
//! can take seconds, or wait for a database that is away): a SIGHUP or a
//! SIGUSR1 that arrives meanwhile (logrotate sends SIGUSR1 whenever it runs)
//! must not kill the daemon with the default action. Such a signal waits and
//! is handled once the daemon runs ([`Signals::serve`]).
//!
//! The shutdown order that SIGTERM starts is code, not sleeps (see
//! [`crate::daemon`]): the listener stops accepting; each connection answers
//! the requests it has read whole, then closes; the flusher does the final
//! flush within `database.timeout`; the process exits 0, or
//! [`crate::error::EXIT_COUNTS_LOST`] if the final flush could not save
//! everything.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::daemon::ReloadHandle;

/// SIGHUP and SIGUSR1, installed and waiting for [`Signals::serve`].
#[derive(Debug)]
pub struct Signals {
    hup: Signal,
    usr1: Signal,
}

/// Installs every handler: the first SIGTERM or SIGINT cancels `shutdown`
/// from now on; SIGHUP and SIGUSR1 wait for [`Signals::serve`].
///
/// # Errors
///
/// A handler cannot be installed.
pub fn install(shutdown: CancellationToken) -> io::Result<Signals> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let signals = Signals {
        hup: signal(SignalKind::hangup())?,
        usr1: signal(SignalKind::user_defined1())?,
    };
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if shutdown.is_cancelled() {
                log::warn!("{name} received again; still shutting down");
            } else {
                crate::notice!("{name} received; stopping");
                let _ = crate::systemd::notify("STOPPING=1");
                shutdown.cancel();
            }
        }
    });
    Ok(signals)
}

impl Signals {
    /// Handles SIGHUP (reload through `reload`) and SIGUSR1 (reopen the log
    /// file) from now on, those that arrived earlier first.
    pub fn serve(mut self, reload: ReloadHandle) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = self.hup.recv() => {
                        crate::notice!("SIGHUP received; reloading");
                        // The reload task logs its result.
                        let _ = reload.reload().await;
                    }
                    Some(()) = self.usr1.recv() => match crate::logging::reopen() {
                        Ok(()) => crate::notice!("SIGUSR1 received; log file reopened"),
                        Err(e) => log::error!("SIGUSR1: cannot reopen the log file: {e}"),
                    },
                }
            }
        });
    }
}
