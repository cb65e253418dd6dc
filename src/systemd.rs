//! systemd readiness notification (`sd_notify`), without libsystemd.
//!
//! Under `Type=notify` systemd passes a datagram socket in `$NOTIFY_SOCKET`;
//! the daemon sends `READY=1` once it listens and has loaded its counters,
//! and `STOPPING=1` when it begins to shut down. Without the variable (not
//! under systemd) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`) to systemd. Returns `Ok(false)` when not
/// running under systemd's notify protocol.
///
/// # Errors
///
/// The socket exists but the message could not be sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (Linux).
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}
