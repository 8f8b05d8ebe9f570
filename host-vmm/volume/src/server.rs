//! The lending side: serves a [`Volume`] on a Unix socket, one thread per
//! connection, requests executed in the order they arrive.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::proto::{Geometry, Op, Request, Response, Status, REQUEST_LEN};

/// What the lender offers. Errors carry the backend's own message; the
/// peer only learns the [`Status`].
pub trait Volume: Send + Sync + 'static {
    fn geometry(&self) -> Geometry;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError>;
    fn flush(&self) -> Result<(), VolumeError>;
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("the volume is closed")]
    Closed,
    #[error("{0}")]
    Io(String),
}

/// A volume being lent: withdraws its socket file when asked, unless
/// another lender has taken the path over since.
pub struct Lending {
    path: PathBuf,
    ino: u64,
}

impl Lending {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still this lender's (a later VM's
    /// backend may have taken the path over; its file must stay).
    pub fn withdraw(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` (owner-only) and serves `volume` on it from a background
/// thread for the rest of the process. A socket file nobody answers on is
/// stale and replaced; one a live lender answers on is refused, and so is
/// anything at `path` that is not a socket.
pub fn listen(path: &Path, volume: Arc<dyn Volume>) -> io::Result<Lending> {
    use std::os::unix::fs::MetadataExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process already lends a volume on {}",
                path.display()
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let lending = Lending {
        path: path.to_path_buf(),
        ino: std::fs::symlink_metadata(path)?.ino(),
    };
    let path: PathBuf = path.to_path_buf();
    info!(socket = %path.display(), "volume socket ready");
    std::thread::Builder::new()
        .name("volume".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(conn) => {
                        let volume = volume.clone();
                        let spawned = std::thread::Builder::new()
                            .name("volume-conn".into())
                            .spawn(move || serve(conn, &*volume));
                        if let Err(e) = spawned {
                            warn!(error = %e, "cannot start a volume connection's thread");
                        }
                    }
                    Err(e) => warn!(socket = %path.display(), error = %e, "accept failed"),
                }
            }
        })?;
    Ok(lending)
}

/// Serves one connection until the peer leaves or breaks the protocol.
pub fn serve<S: Read + Write>(mut conn: S, volume: &dyn Volume) {
    match serve_inner(&mut conn, volume) {
        Ok(served) => info!(served, "a volume client left"),
        Err(e) => warn!(error = %e, "a volume connection ended"),
    }
}

fn serve_inner<S: Read + Write>(conn: &mut S, volume: &dyn Volume) -> io::Result<u64> {
    let geometry = volume.geometry();
    conn.write_all(&geometry.encode())?;
    let mut buf = Vec::new();
    let mut served = 0u64;
    loop {
        let mut h = [0u8; REQUEST_LEN];
        match conn.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(e),
        }
        let req = Request::decode(&h)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")))?;
        buf.resize(req.len as usize, 0);
        if req.payload_len() > 0 {
            conn.read_exact(&mut buf)?;
        }
        let mut status = req.check(geometry);
        if status == Status::Ok {
            let done = match req.op {
                Op::Read => volume.read_at(&mut buf, req.offset),
                Op::Write => volume.write_at(&buf, req.offset),
                Op::Flush => volume.flush(),
            };
            if let Err(e) = done {
                debug!(?req, error = %e, "volume request failed");
                status = match e {
                    VolumeError::Closed => Status::Closed,
                    VolumeError::Io(_) => Status::IoError,
                };
            }
        }
        let len = if status == Status::Ok && req.op == Op::Read {
            req.len
        } else {
            0
        };
        let resp = Response {
            tag: req.tag,
            status,
            len,
        };
        conn.write_all(&resp.encode())?;
        if len > 0 {
            conn.write_all(&buf)?;
        }
        served += 1;
    }
}

/// A volume in memory, for tests and fuzzing: its bytes and flush count
/// are open to inspection, and writes at one offset may be made to fail.
/// It indexes its buffer directly, so a request the server let through
/// out of bounds panics.
pub struct Memory {
    pub data: std::sync::Mutex<Vec<u8>>,
    pub flushes: std::sync::atomic::AtomicU64,
    readonly: bool,
    failing: Option<u64>,
}

impl Memory {
    pub fn new(size: usize, readonly: bool) -> Memory {
        Memory {
            data: std::sync::Mutex::new(vec![0; size]),
            flushes: std::sync::atomic::AtomicU64::new(0),
            readonly,
            failing: None,
        }
    }

    /// Writes at `offset` fail with an I/O error.
    pub fn failing_writes_at(self, offset: u64) -> Memory {
        Memory {
            failing: Some(offset),
            ..self
        }
    }

    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Volume for Memory {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.bytes().len() as u64,
            readonly: self.readonly,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let at = offset as usize;
        buf.copy_from_slice(&self.bytes()[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
        if self.failing == Some(offset) {
            return Err(VolumeError::Io(format!("writes at {offset} fail")));
        }
        let at = offset as usize;
        self.bytes()[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), VolumeError> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
