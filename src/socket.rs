//! Binding a unix socket, shared by the policy server and the control
//! server.
//!
//! A file already at the path is removed only if it is a socket nobody
//! listens on (left by a daemon that crashed). A live socket means another
//! daemon runs there; anything that is not a socket (a typo pointing at a
//! configuration file, a directory) is an error naming the path, and is left
//! alone.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// Binds `path` with mode 0660 (its group may connect), replacing a stale
/// socket file.
///
/// # Errors
///
/// `AddrInUse` when a process answers on the socket; `AlreadyExists` when
/// the path is not a socket; any error binding or setting the mode.
pub async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    remove_stale(path).await?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Removes `path` if it is a socket nobody listens on.
async fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; it is left alone (choose another path)",
                path.display()
            ),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_stale_sockets_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let live = bind_unix(&path).await.unwrap();
        let e = bind_unix(&path).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(live); // the file stays: a stale socket
        bind_unix(&path).await.unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = bind_unix(&file).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        let e = bind_unix(dir.path()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }
}
