//! The borrowing side: a volume on the far end of a socket, read and
//! written one request at a time.
//!
//! The volume is reached by its name (the socket path), and served by
//! whichever process lends it now: the VM disk's backend, which a restore,
//! a migration back to this host or a restart replaces by a new process
//! (F1's "new owner process"). Each request is placed by the very handoff
//! core the guest's multi-path volumes run (`shared_abi::handoff`), with
//! the two paths read this way:
//!
//! - the **direct** path is the connection to one lender process. It comes
//!   (a connection made) and goes (the lender closed the volume, was
//!   fenced, died, or broke the protocol or a timeout);
//! - the **synthetic** path is the volume by its name: a connection made
//!   when a request needs it, to whoever lends the volume by then, after
//!   waiting up to [`OWNER_WAIT`] for a lender to appear at all.
//!
//! So the core's rules are the client's: a request that was in flight on
//! a lost connection is re-issued exactly once, on the new one, before
//! anything that came after it; a flush after the move covers the writes
//! the old connection had answered (a barrier flush runs first); only when
//! the name itself fails (no lender, a different size, the lender's own
//! error status twice) does the caller see an error. Once a request went
//! through by name, its connection becomes the direct path again (a switch
//! back, with the core's drain). The requests are serialised here (one
//! caller at a time: the NVMe controller runs one command at a time), so
//! the holding queue holds the one request being moved.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shared_abi::handoff::{self, Action, Actions, Handoff, Outcome, Path as Route};
use tracing::{debug, info, warn};

use crate::proto::{
    Geometry, Op, ProtoError, Request, Response, Status, HELLO_LEN, MAX_TRANSFER, RESPONSE_LEN,
};

/// How long one request may take before the connection counts as broken.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a request that finds nobody lending the volume waits for a
/// lender to appear (a backend being replaced) before it fails.
pub const OWNER_WAIT: Duration = Duration::from_secs(3);

/// The client's requests outstanding at once (one: see the module's doc),
/// and the core's action list for that (the core's rule: N + 3).
type Core = Handoff<1>;
type Acts = Actions<4>;

/// The errno the core is told a failed request had (its value is not
/// interpreted; the caller gets the path's own error).
const EIO: i32 = -5;

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
    born: Instant,
    conn: Mutex<Conn>,
}

/// The two paths' connections, the core placing requests on them, and
/// the next request's tag and id.
struct Conn {
    /// The direct path: a connection to the process lending the volume.
    owner: Option<UnixStream>,
    /// The synthetic path's connection, made when a request is placed on
    /// it (or the direct one's, kept when only a request failed on it).
    by_name: Option<UnixStream>,
    core: Core,
    tag: u64,
    next_id: u64,
}

/// A request's data: none (flush), written (write) or read into (read).
enum Data<'a> {
    None,
    Out(&'a [u8]),
    In(&'a mut [u8]),
}

impl Data<'_> {
    fn len(&self) -> u32 {
        match self {
            Data::None => 0,
            Data::Out(b) => b.len() as u32,
            Data::In(b) => b.len() as u32,
        }
    }
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

/// Nobody listens (yet) on the path: worth waiting for a lender.
fn nobody_there(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { source, .. }
        if matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused))
}

impl RemoteVolume {
    pub fn connect(path: &Path) -> Result<RemoteVolume, ClientError> {
        let (s, geometry) = open(path)?;
        info!(socket = %path.display(), size = geometry.size, readonly = geometry.readonly, "volume connected");
        let v = RemoteVolume {
            path: path.to_path_buf(),
            geometry,
            born: Instant::now(),
            conn: Mutex::new(Conn {
                owner: None,
                by_name: Some(s),
                core: Core::new(),
                tag: 1,
                next_id: 1,
            }),
        };
        // The first connection becomes the direct path like any later one.
        let mut c = v.lock();
        v.adopt(&mut c);
        drop(c);
        Ok(v)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The handoff core's counters: connections lost, requests re-issued,
    /// switches, barriers, the longest a request was held.
    pub fn handoff_stats(&self) -> handoff::Stats {
        self.lock().core.stats
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
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

    /// One request, placed by the handoff core. Re-issuing a read or a
    /// write of whole blocks is harmless (and the caller has not been
    /// answered yet, so nothing it ordered after this can be in the way);
    /// the core makes sure it happens at most once per lost path.
    fn call(&self, op: Op, offset: u64, mut data: Data<'_>) -> io::Result<()> {
        let mut c = self.lock();
        let id = c.next_id;
        c.next_id += 1;
        let kind = match op {
            Op::Read => handoff::Op::Read,
            Op::Write => handoff::Op::Write,
            Op::Flush => handoff::Op::Flush,
        };
        let mut acts = Acts::new();
        let now = self.now_us();
        c.core.submit(id, kind, now, &mut acts).map_err(|e| {
            io::Error::other(format!(
                "volume {}: the handoff core refused the request: {e:?}",
                self.path.display()
            ))
        })?;
        let req = Pending {
            op,
            offset,
            data: &mut data,
        };
        let answer = self.drive(&mut c, &acts, Some(req));
        if c.owner.is_none() {
            self.adopt(&mut c);
        }
        answer.unwrap_or_else(|| {
            Err(io::Error::other(format!(
                "volume {}: the request was left unanswered",
                self.path.display()
            )))
        })
    }

    /// A connection made by name becomes the direct path: the core
    /// switches to it (draining and, if writes went by name since the
    /// last flush, flushing there first).
    fn adopt(&self, c: &mut Conn) {
        let Some(s) = c.by_name.as_ref() else { return };
        match s.try_clone() {
            Ok(clone) => c.owner = Some(clone),
            Err(e) => {
                warn!(socket = %self.path.display(), error = %e, "cannot keep the volume's connection");
                return;
            }
        }
        c.core.direct_added();
        let mut acts = Acts::new();
        if let Err(e) = c.core.switch_to(Route::Direct, self.now_us(), &mut acts) {
            warn!(socket = %self.path.display(), error = ?e, "the handoff core refused the switch");
            c.owner = None;
            return;
        }
        self.drive(c, &acts, None);
        if c.core.active() == Route::Direct {
            c.by_name = None;
        }
    }

    /// Carries out the core's actions (and those they lead to) until none
    /// is left; returns the application request's answer if it came.
    fn drive(
        &self,
        c: &mut Conn,
        first: &Acts,
        mut req: Option<Pending<'_, '_>>,
    ) -> Option<io::Result<()>> {
        let mut work: VecDeque<Action> = first.iter().collect();
        let mut answer = None;
        let mut failed: Option<io::Error> = None;
        while let Some(a) = work.pop_front() {
            let mut acts = Acts::new();
            match a {
                Action::Dispatch { id, path, issue } => {
                    let r = match req.as_mut() {
                        Some(p) => self.on_path(c, path, p.op, p.offset, p.data),
                        None => Err(io::Error::other("no request to dispatch")),
                    };
                    let outcome = self.outcome(r, path, &mut failed);
                    c.core
                        .complete(id, issue, outcome, self.now_us(), &mut acts);
                }
                Action::Barrier { path, issue } => {
                    let r = self.on_path(c, path, Op::Flush, 0, &mut Data::None);
                    let outcome = self.outcome(r, path, &mut failed);
                    c.core
                        .barrier_done(issue, outcome, self.now_us(), &mut acts);
                }
                Action::Complete { outcome, .. } => {
                    answer = Some(match outcome {
                        Outcome::Ok => Ok(()),
                        Outcome::Error(_) => Err(failed.take().unwrap_or_else(|| {
                            io::Error::other(format!("volume {}: failed", self.path.display()))
                        })),
                    });
                }
                Action::Switched {
                    from,
                    to,
                    parked,
                    reissued,
                    blackout_us,
                } => {
                    let msg = "volume requests moved";
                    if reissued > 0 {
                        info!(socket = %self.path.display(), from = from.name(), to = to.name(), parked, reissued, blackout_us, "{msg}");
                    } else {
                        debug!(socket = %self.path.display(), from = from.name(), to = to.name(), parked, blackout_us, "{msg}");
                    }
                }
            }
            work.extend(acts.iter());
        }
        answer
    }

    fn outcome(&self, r: io::Result<()>, path: Route, failed: &mut Option<io::Error>) -> Outcome {
        match r {
            Ok(()) => Outcome::Ok,
            Err(e) => {
                if path == Route::Direct {
                    debug!(socket = %self.path.display(), error = %e, "failed on the lender's connection; by name next");
                }
                *failed = Some(e);
                Outcome::Error(EIO)
            }
        }
    }

    /// Runs one request on a path. Any error on the direct path ends it
    /// for the core; the connection is kept (as the one by name) only if
    /// it is sound, i.e. the lender answered with an error of the storage.
    fn on_path(
        &self,
        c: &mut Conn,
        path: Route,
        op: Op,
        offset: u64,
        data: &mut Data<'_>,
    ) -> io::Result<()> {
        let slot = match path {
            Route::Direct => c.owner.take(),
            Route::Synthetic => match c.by_name.take() {
                Some(s) => Some(s),
                None => Some(self.reopen()?),
            },
        };
        let Some(mut s) = slot else {
            return Err(io::Error::other(format!(
                "volume {}: not connected",
                self.path.display()
            )));
        };
        let tag = c.tag;
        c.tag += 1;
        let req = Request {
            op,
            offset,
            len: data.len(),
            tag,
        };
        match exchange(&mut s, &req, data) {
            Ok(Status::Ok) => {
                match path {
                    Route::Direct => c.owner = Some(s),
                    Route::Synthetic => c.by_name = Some(s),
                }
                Ok(())
            }
            // This lender is done with the volume (its VM has gone, or it
            // is fenced); a new one (the VM restored or back here) may be
            // there by name.
            Ok(Status::Closed) => {
                info!(socket = %self.path.display(), path = path.name(), "the volume's lender closed it");
                Err(io::Error::other(format!(
                    "volume {}: {}",
                    self.path.display(),
                    Status::Closed
                )))
            }
            // The storage's own error, on a sound connection: on either
            // path, the core's next try goes by name, which may as well be
            // this connection.
            Ok(status) => {
                c.by_name = Some(s);
                Err(io::Error::other(format!(
                    "volume {}: {status}",
                    self.path.display()
                )))
            }
            Err(e) => {
                warn!(socket = %self.path.display(), path = path.name(), error = %e, "volume connection broken");
                Err(e)
            }
        }
    }

    /// A new connection by name, waiting up to [`OWNER_WAIT`] for a
    /// lender; the volume must still be the same size.
    fn reopen(&self) -> io::Result<UnixStream> {
        let t0 = Instant::now();
        loop {
            match open(&self.path) {
                Ok((s, g)) if g.size == self.geometry.size => {
                    info!(socket = %self.path.display(), waited_ms = t0.elapsed().as_millis() as u64, "volume reconnected");
                    return Ok(s);
                }
                Ok((_, g)) => {
                    return Err(io::Error::other(ClientError::Resized {
                        path: self.path.clone(),
                        was: self.geometry.size,
                        now: g.size,
                    }))
                }
                Err(e) if nobody_there(&e) && t0.elapsed() < OWNER_WAIT => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

/// The application request being placed.
struct Pending<'r, 'd> {
    op: Op,
    offset: u64,
    data: &'r mut Data<'d>,
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
            g.owner
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
            g.owner
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
