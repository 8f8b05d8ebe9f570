//! The borrowing side: a volume on the far end of a socket, read and
//! written one request at a time. A broken connection, or a lender that
//! has closed the volume, is reopened once per request (the lender may
//! have been replaced: a VM restored, or migrated back to this host), and
//! the volume must still be the same size.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use crate::proto::{
    Geometry, Op, ProtoError, Request, Response, Status, HELLO_LEN, MAX_TRANSFER, RESPONSE_LEN,
};

/// How long one request may take before the connection counts as broken.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the volume socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the volume socket {path} did not greet")]
    Greeting {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the volume socket {path} speaks no volume protocol")]
    Protocol {
        path: PathBuf,
        #[source]
        source: ProtoError,
    },
    #[error("the volume at {path} is now {now} bytes, it was {was}")]
    Resized { path: PathBuf, was: u64, now: u64 },
}

pub struct RemoteVolume {
    path: PathBuf,
    geometry: Geometry,
    conn: Mutex<Conn>,
}

/// The connection (none after it broke) and the next request's tag.
struct Conn {
    stream: Option<UnixStream>,
    tag: u64,
}

/// A request's data: none (flush), written (write) or read into (read).
enum Data<'a> {
    None,
    Out(&'a [u8]),
    In(&'a mut [u8]),
}

fn open(path: &Path) -> Result<(UnixStream, Geometry), ClientError> {
    let mut s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let greet = |source| ClientError::Greeting {
        path: path.to_path_buf(),
        source,
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(greet)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(greet)?;
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(greet)?;
    let g = Geometry::decode(&hello).map_err(|source| ClientError::Protocol {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((s, g))
}

impl RemoteVolume {
    pub fn connect(path: &Path) -> Result<RemoteVolume, ClientError> {
        let (s, geometry) = open(path)?;
        info!(socket = %path.display(), size = geometry.size, readonly = geometry.readonly, "volume connected");
        Ok(RemoteVolume {
            path: path.to_path_buf(),
            geometry,
            conn: Mutex::new(Conn {
                stream: Some(s),
                tag: 1,
            }),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.each_chunk(buf.len(), offset, |start, off, len| {
            let chunk = &mut buf[start..start + len as usize];
            self.call(Op::Read, off, Data::In(chunk))
        })
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.each_chunk(buf.len(), offset, |start, off, len| {
            self.call(Op::Write, off, Data::Out(&buf[start..start + len as usize]))
        })
    }

    pub fn flush(&self) -> io::Result<()> {
        self.call(Op::Flush, 0, Data::None)
    }

    /// Splits a transfer into requests of at most `MAX_TRANSFER` bytes.
    fn each_chunk(
        &self,
        total: usize,
        offset: u64,
        mut f: impl FnMut(usize, u64, u32) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut start = 0usize;
        while start < total {
            let len = (total - start).min(MAX_TRANSFER as usize);
            f(start, offset + start as u64, len as u32)?;
            start += len;
        }
        Ok(())
    }

    /// One request; on a broken connection, reconnects and tries once more
    /// (reads and writes of whole blocks are idempotent; the guest has not
    /// been answered yet, so nothing it ordered after this can be in the
    /// way).
    fn call(&self, op: Op, offset: u64, mut data: Data<'_>) -> io::Result<()> {
        let len = match &data {
            Data::None => 0,
            Data::Out(b) => b.len() as u32,
            Data::In(b) => b.len() as u32,
        };
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = None;
        for attempt in 0..2 {
            if conn.stream.is_none() {
                match open(&self.path) {
                    Ok((s, g)) if g.size == self.geometry.size => {
                        info!(socket = %self.path.display(), "volume reconnected");
                        conn.stream = Some(s);
                    }
                    Ok((_, g)) => {
                        return Err(io::Error::other(ClientError::Resized {
                            path: self.path.clone(),
                            was: self.geometry.size,
                            now: g.size,
                        }))
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            let tag = conn.tag;
            conn.tag += 1;
            let Some(s) = conn.stream.as_mut() else { break };
            let req = Request {
                op,
                offset,
                len,
                tag,
            };
            match exchange(s, &req, &mut data) {
                Ok(Status::Ok) => return Ok(()),
                // This lender is done with the volume (its VM has gone);
                // a new one (the VM restored or back here) may be there.
                Ok(Status::Closed) => {
                    info!(socket = %self.path.display(), attempt, "the volume's lender closed it");
                    conn.stream = None;
                    last = Some(io::Error::other(format!(
                        "volume {}: {}",
                        self.path.display(),
                        Status::Closed
                    )));
                }
                Ok(status) => {
                    return Err(io::Error::other(format!(
                        "volume {}: {status}",
                        self.path.display()
                    )))
                }
                Err(e) => {
                    warn!(socket = %self.path.display(), attempt, error = %e, "volume connection broken");
                    conn.stream = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("volume connection lost")))
    }
}

/// Sends `req` and reads its answer; `Err` means the connection is broken.
fn exchange(s: &mut UnixStream, req: &Request, data: &mut Data<'_>) -> io::Result<Status> {
    s.write_all(&req.encode())?;
    if let Data::Out(b) = data {
        s.write_all(b)?;
    }
    let mut h = [0u8; RESPONSE_LEN];
    s.read_exact(&mut h)?;
    let resp = Response::decode(&h)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if resp.tag != req.tag {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answer to request {} for request {}", resp.tag, req.tag),
        ));
    }
    if resp.status == Status::Ok && req.op == Op::Read {
        if resp.len != req.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} bytes read for {} asked", resp.len, req.len),
            ));
        }
        if let Data::In(b) = data {
            s.read_exact(b)?;
        }
    }
    Ok(resp.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{listen, Memory};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    fn mem(size: usize, readonly: bool) -> Arc<Memory> {
        Arc::new(Memory::new(size, readonly))
    }

    #[test]
    fn reads_writes_and_flushes_reach_the_lender() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let m = Arc::new(Memory::new(8 << 20, false).failing_writes_at(0));
        listen(&sock, m.clone()).unwrap();
        let v = RemoteVolume::connect(&sock).unwrap();
        assert_eq!(v.geometry().size, 8 << 20);
        // Larger than one request: split.
        let data: Vec<u8> = (0..(5 << 20)).map(|i| (i % 251) as u8).collect();
        v.write_at(&data, 4096).unwrap();
        v.flush().unwrap();
        assert_eq!(m.flushes.load(Ordering::Relaxed), 1);
        let mut back = vec![0u8; data.len()];
        v.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        assert_eq!(&m.data.lock().unwrap()[4096..4096 + 16], &data[..16]);
        // The lender's errors and the volume's limits come back as errors;
        // the connection stays usable.
        let e = v.write_at(&[1; 512], 0).unwrap_err().to_string();
        assert!(e.contains("I/O error"), "{e}");
        let e = v.read_at(&mut [0; 512], 8 << 20).unwrap_err().to_string();
        assert!(e.contains("beyond the end"), "{e}");
        v.read_at(&mut back[..512], 4096).unwrap();
    }

    #[test]
    fn a_read_only_volume_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        listen(&sock, mem(1 << 20, true)).unwrap();
        let v = RemoteVolume::connect(&sock).unwrap();
        assert!(v.geometry().readonly);
        let e = v.write_at(&[1; 512], 512).unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        v.flush().unwrap();
    }

    #[test]
    fn a_restarted_lender_is_reconnected_and_a_resized_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let first = mem(1 << 20, false);
        listen(&sock, first.clone()).unwrap();
        let v = RemoteVolume::connect(&sock).unwrap();
        v.write_at(&[7; 512], 512).unwrap();
        // A second lender on a live one's path is refused.
        let e = listen(&sock, mem(1 << 20, false)).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        // The lender goes (its socket file replaced by a new one: here the
        // file is removed, its listener lives on in this test process), a
        // new lender of the same volume comes.
        std::fs::remove_file(&sock).unwrap();
        let second = mem(1 << 20, false);
        let second_lending = listen(&sock, second.clone()).unwrap();
        // The old connection still works (the old listener's thread lives
        // on in this test process); cut it by shutting the client's side.
        {
            let g = v.conn.lock().unwrap();
            g.stream
                .as_ref()
                .unwrap()
                .shutdown(std::net::Shutdown::Both)
                .unwrap();
        }
        v.write_at(&[9; 512], 1024).unwrap();
        assert_eq!(second.data.lock().unwrap()[1024], 9);
        // A different size is refused by name.
        std::fs::remove_file(&sock).unwrap();
        let third = listen(&sock, mem(2 << 20, false)).unwrap();
        // The second lender leaving does not take the third's file along.
        second_lending.withdraw();
        assert!(sock.exists());
        {
            let g = v.conn.lock().unwrap();
            g.stream
                .as_ref()
                .unwrap()
                .shutdown(std::net::Shutdown::Both)
                .unwrap();
        }
        let e = v.read_at(&mut [0; 512], 0).unwrap_err().to_string();
        assert!(e.contains("is now 2097152 bytes"), "{e}");
        // And no lender at all.
        third.withdraw();
        assert!(!sock.exists());
        let e = v.read_at(&mut [0; 512], 0).unwrap_err().to_string();
        assert!(e.contains("cannot connect"), "{e}");
    }

    #[test]
    fn a_file_in_the_way_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious.raw");
        std::fs::write(&path, b"data").unwrap();
        let e = listen(&path, mem(1 << 20, false)).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn a_stranger_on_the_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(&[b'x'; 32]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = RemoteVolume::connect(&sock).err().unwrap();
        assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
    }
}
