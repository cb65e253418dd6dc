//! Signals and the shutdown order.
//!
//! SIGTERM or SIGINT cancels one [`CancellationToken`]. The order that follows
//! is code, not sleeps (see [`crate::daemon`]):
//! 1. the listener stops accepting;
//! 2. each connection answers the requests it has read whole, then closes;
//! 3. the server waits for its connection tasks (bounded by
//!    [`crate::server::SHUTDOWN_GRACE`]);
//! 4. the flusher is stopped and does the final flush;
//! 5. the process exits 0, or [`crate::error::EXIT_COUNTS_LOST`] if the final
//!    flush could not save everything.

use std::io;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT.
///
/// # Errors
///
/// The signal handlers cannot be installed.
pub fn spawn_signal_handler(token: CancellationToken) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if token.is_cancelled() {
                log::warn!("{name} received again; still shutting down");
            } else {
                crate::notice!("{name} received; stopping");
                let _ = crate::systemd::notify("STOPPING=1");
                token.cancel();
            }
        }
    }))
}
