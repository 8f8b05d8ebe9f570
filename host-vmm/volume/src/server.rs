//! The lending side: serves a [`Volume`] on a Unix socket, one thread per
//! connection, requests executed in the order they arrive.
//!
//! A lender can be **fenced** ([`Lending::fence`]): its connections are
//! cut, new requests are refused with [`Status::Closed`] until
//! [`Lending::unfence`], and the fence returns only once no lent request
//! is executing. The host fences the lender of a function's namespace
//! before the guest can see that function removed, so that a write the
//! function had already sent can never land after the guest re-issued it
//! (and perhaps newer data over it) on its synthetic path. For the same
//! reason a request whose sender is gone by the time it would run (a
//! killed device server leaves its last request in the socket) is
//! dropped, not executed: nobody can be answered, so nobody was told it
//! was done, and the guest will re-issue it. And a request whose sender
//! hung up while it ran (a borrower that gave up on it after its timeout,
//! and will send it again) is an orphan: no lent request starts until it
//! has finished, so it cannot land after the request sent again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
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

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("{executing} lent request(s) still executing after {after:?}; the fence is up, but they may still land")]
    Busy { executing: u32, after: Duration },
}

/// What a fence did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fenced {
    /// Connections cut.
    pub closed: u32,
    /// How long it waited for executing requests, in microseconds.
    pub waited_us: u64,
}

/// The lender's counters and fence state (also the vhost-user-blk
/// backend's API answer, under its `lending` object).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateStats {
    pub fenced: bool,
    pub fences: u64,
    /// Requests not run: their sender was gone, or the lender fenced.
    pub dropped: u64,
    pub connections: u32,
    /// Lent requests running now.
    #[serde(default)]
    pub executing: u32,
}

/// Admission of lent requests: the fence, its epoch and what executes.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    idle: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Bumped by each fence: a connection from an older epoch is cut.
    epoch: u64,
    fenced: bool,
    /// The connections with a request executing (one each at most: a
    /// connection's requests run in order, so their number is the number
    /// of lent requests executing).
    busy: BTreeSet<u64>,
    next_id: u64,
    /// Open connections (a clone of each, to cut them), by id.
    conns: BTreeMap<u64, UnixStream>,
    fences: u64,
    dropped: u64,
}

/// Whether a request read from a connection may run.
enum Admit<'a> {
    Run(Option<Running<'a>>),
    Fenced,
    SenderGone,
}

/// A request executing on a connection; the fence, and requests waiting
/// for an orphan, wait for it.
struct Running<'a>(&'a Gate, u64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.busy.remove(&self.1);
        self.0.idle.notify_all();
    }
}

/// How often a request waiting for an orphan looks again (a borrower
/// hanging up wakes nobody).
const ORPHAN_RECHECK: Duration = Duration::from_millis(50);

impl GateState {
    /// Lent requests executing now.
    fn executing(&self) -> u32 {
        self.busy.len() as u32
    }

    /// A connection (other than `except`) whose request runs although its
    /// borrower hung up on it.
    fn orphan(&self, except: Option<u64>) -> Option<u64> {
        self.busy
            .iter()
            .find(|b| Some(**b) != except && self.conns.get(b).is_none_or(sender_gone))
            .copied()
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while an orphan runs; returns how long it waited.
    fn wait_for_orphans(&self) -> Duration {
        let start = Instant::now();
        let mut g = self.lock();
        if g.orphan(None).is_none() {
            return Duration::ZERO;
        }
        while g.orphan(None).is_some() {
            g = self.recheck(g);
        }
        start.elapsed()
    }

    /// Sleeps until a request finishes or [`ORPHAN_RECHECK`] has passed
    /// (a borrower hanging up wakes nobody).
    fn recheck<'g>(&self, g: MutexGuard<'g, GateState>) -> MutexGuard<'g, GateState> {
        self.idle
            .wait_timeout(g, ORPHAN_RECHECK)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    fn register(&self, conn: &UnixStream) -> (u64, u64) {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        if let Ok(c) = conn.try_clone() {
            g.conns.insert(id, c);
        }
        (id, g.epoch)
    }

    fn leave(&self, id: u64) {
        self.lock().conns.remove(&id);
    }

    /// Whether connection `id`'s next request may run, and if so, marks
    /// it running. It waits while an **orphan** runs: a request whose
    /// borrower hung up on it (a borrower that gave up on a slow request
    /// re-sends it on a new connection, and the old one must not land
    /// after the new one, or after what the borrower wrote next).
    fn admit(&self, id: u64, epoch: u64, conn: &UnixStream) -> Admit<'_> {
        let mut g = self.lock();
        loop {
            if g.fenced || g.epoch != epoch {
                g.dropped += 1;
                return Admit::Fenced;
            }
            if sender_gone(conn) {
                g.dropped += 1;
                return Admit::SenderGone;
            }
            let Some(orphan) = g.orphan(Some(id)) else {
                break;
            };
            debug!(conn = id, orphan, "waiting for an orphaned lent request");
            g = self.recheck(g);
        }
        g.busy.insert(id);
        Admit::Run(Some(Running(self, id)))
    }
}

/// The peer closed its end (it exited or was killed): whatever it left
/// in the socket will never be answered. The lender asks this once per
/// lent request; public so that its cost can be measured
/// (`examples/lend_cost.rs`).
pub fn sender_gone(conn: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

/// A volume being lent: withdraws its socket file when asked, unless
/// another lender has taken the path over since; fences its borrowers.
pub struct Lending {
    path: PathBuf,
    ino: u64,
    gate: Arc<Gate>,
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

    /// Cuts every borrower, refuses new requests until [`Self::unfence`],
    /// and waits up to `wait` for the requests already executing. The
    /// fence is up even when the wait fails.
    pub fn fence(&self, wait: Duration) -> Result<Fenced, FenceError> {
        let start = Instant::now();
        let mut g = self.gate.lock();
        g.fenced = true;
        g.epoch += 1;
        g.fences += 1;
        let closed = g.conns.len() as u32;
        for c in g.conns.values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let (g, _) = self
            .gate
            .idle
            .wait_timeout_while(g, wait, |g| g.executing() > 0)
            .unwrap_or_else(|p| p.into_inner());
        if g.executing() > 0 {
            warn!(socket = %self.path.display(), executing = g.executing(), "fence: lent requests still executing");
            return Err(FenceError::Busy {
                executing: g.executing(),
                after: wait,
            });
        }
        let waited_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        info!(socket = %self.path.display(), closed, waited_us, "volume fenced");
        Ok(Fenced { closed, waited_us })
    }

    /// Lets borrowers in again (a new function is about to use it).
    pub fn unfence(&self) {
        let mut g = self.gate.lock();
        if g.fenced {
            info!(socket = %self.path.display(), "volume unfenced");
        }
        g.fenced = false;
    }

    /// The lender's orphans, for the disk's other path (see [`Orphans`]).
    pub fn orphans(&self) -> Orphans {
        Orphans(self.gate.clone())
    }

    pub fn stats(&self) -> GateStats {
        let g = self.gate.lock();
        GateStats {
            fenced: g.fenced,
            fences: g.fences,
            dropped: g.dropped,
            connections: g.conns.len() as u32,
            executing: g.executing(),
        }
    }
}

/// For the disk's own path (the guest's virtio requests, served by the
/// same process): a request re-issued there by a guest that gave up on a
/// function must not run while the write it replaces may still land, so
/// each waits while a lent request runs whose borrower hung up on it (or
/// that a fence cut off). With no lent request running, it costs one
/// uncontended lock.
#[derive(Clone)]
pub struct Orphans(Arc<Gate>);

impl Orphans {
    /// Waits while an orphaned lent request runs; returns how long.
    pub fn wait(&self) -> Duration {
        let waited = self.0.wait_for_orphans();
        if !waited.is_zero() {
            info!(
                waited_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
                "a request on the disk's own path waited for an orphaned lent request"
            );
        }
        waited
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
    let gate = Arc::new(Gate::default());
    let lending = Lending {
        path: path.to_path_buf(),
        ino: std::fs::symlink_metadata(path)?.ino(),
        gate: gate.clone(),
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
                        let gate = gate.clone();
                        let spawned = std::thread::Builder::new()
                            .name("volume-conn".into())
                            .spawn(move || serve_lent(conn, &*volume, &gate));
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
/// No fence: for a connection that is not a lender's (tests, fuzzing).
pub fn serve<S: Read + Write>(mut conn: S, volume: &dyn Volume) {
    let done = greet(&mut conn, volume)
        .and_then(|()| serve_requests(&mut conn, volume, &mut || Admit::Run(None)));
    report(done);
}

/// Serves one of a lender's connections, admitting each request through
/// its gate.
fn serve_lent(mut conn: UnixStream, volume: &dyn Volume, gate: &Gate) {
    let (id, epoch) = gate.register(&conn);
    let done = greet(&mut conn, volume).and_then(|()| {
        let probe = conn.try_clone()?;
        serve_requests(&mut conn, volume, &mut || gate.admit(id, epoch, &probe))
    });
    gate.leave(id);
    report(done);
}

fn report(done: io::Result<u64>) {
    match done {
        Ok(served) => info!(served, "a volume client left"),
        Err(e) => warn!(error = %e, "a volume connection ended"),
    }
}

fn greet<S: Write>(conn: &mut S, volume: &dyn Volume) -> io::Result<()> {
    conn.write_all(&volume.geometry().encode())
}

fn serve_requests<'g, S: Read + Write>(
    conn: &mut S,
    volume: &dyn Volume,
    admit: &mut dyn FnMut() -> Admit<'g>,
) -> io::Result<u64> {
    let geometry = volume.geometry();
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
            let running = match admit() {
                Admit::Run(r) => r,
                Admit::SenderGone => {
                    warn!(
                        ?req,
                        "the borrower is gone; its last request is dropped, not run"
                    );
                    return Ok(served);
                }
                Admit::Fenced => {
                    debug!(?req, "fenced: request refused");
                    let resp = Response {
                        tag: req.tag,
                        status: Status::Closed,
                        len: 0,
                    };
                    conn.write_all(&resp.encode())?;
                    return Ok(served);
                }
            };
            let done = match req.op {
                Op::Read => volume.read_at(&mut buf, req.offset),
                Op::Write => volume.write_at(&buf, req.offset),
                Op::Flush => volume.flush(),
            };
            drop(running);
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
    /// Writes that landed.
    pub writes: std::sync::atomic::AtomicU64,
    readonly: bool,
    failing: Option<u64>,
}

impl Memory {
    pub fn new(size: usize, readonly: bool) -> Memory {
        Memory {
            data: std::sync::Mutex::new(vec![0; size]),
            flushes: std::sync::atomic::AtomicU64::new(0),
            writes: std::sync::atomic::AtomicU64::new(0),
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
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn flush(&self) -> Result<(), VolumeError> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RemoteVolume;
    use std::sync::mpsc;

    fn write_request(offset: u64, byte: u8) -> Vec<u8> {
        let mut v = Request {
            tag: 7,
            op: Op::Write,
            offset,
            len: 512,
        }
        .encode()
        .to_vec();
        v.extend([byte; 512]);
        v
    }

    /// A killed device server leaves its last request in the socket: the
    /// lender must not run it, since nobody can be told it ran and the
    /// guest will re-issue it (perhaps with newer data after it). A peer
    /// that only stopped sending is still there and is served.
    #[test]
    fn a_request_whose_sender_is_gone_is_dropped_not_run() {
        for sender_alive in [false, true] {
            let m = Memory::new(4096, false);
            let gate = Gate::default();
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let (id, epoch) = gate.register(&a);
            greet(&mut a, &m).unwrap();
            let mut hello = [0u8; crate::proto::HELLO_LEN];
            b.read_exact(&mut hello).unwrap();
            b.write_all(&write_request(0, 0xab)).unwrap();
            if sender_alive {
                b.shutdown(std::net::Shutdown::Write).unwrap();
            } else {
                drop(b);
            }
            let probe = a.try_clone().unwrap();
            let served = serve_requests(&mut a, &m, &mut || gate.admit(id, epoch, &probe)).unwrap();
            let first = m.data.lock().unwrap()[0];
            if sender_alive {
                assert_eq!((served, first, gate.lock().dropped), (1, 0xab, 0));
            } else {
                assert_eq!((served, first, gate.lock().dropped), (0, 0, 1));
            }
        }
    }

    /// Writes at offset 0 wait until released.
    struct Held {
        mem: Memory,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl Volume for Held {
        fn geometry(&self) -> Geometry {
            self.mem.geometry()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
            if offset == 0 {
                let _ = self.release.lock().unwrap().recv();
            }
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> Result<(), VolumeError> {
            self.mem.flush()
        }
    }

    /// A lender at `sock` whose writes at offset 0 wait for a message on
    /// the returned sender.
    fn held_lender(sock: &Path) -> (Arc<Held>, Lending, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel();
        let held = Arc::new(Held {
            mem: Memory::new(64 << 10, false),
            release: Mutex::new(rx),
        });
        let lending = listen(sock, held.clone()).unwrap();
        (held, lending, tx)
    }

    /// Waits until a lent request executes.
    fn until_executing(lending: &Lending) {
        let t0 = Instant::now();
        while lending.stats().executing == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the write never ran");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_fence_waits_for_what_runs_cuts_borrowers_and_refuses_until_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let (held, lending, tx) = held_lender(&sock);
        let lending = Arc::new(lending);
        let v = Arc::new(RemoteVolume::connect(&sock).unwrap());
        let writer = {
            let v = v.clone();
            std::thread::spawn(move || v.write_at(&[1; 512], 0))
        };
        until_executing(&lending);
        // A request that does not finish: the fence says so, and stays up.
        match lending.fence(Duration::from_millis(50)) {
            Err(FenceError::Busy { executing: 1, .. }) => {}
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(lending.stats().fenced);
        let fencer = {
            let l = lending.clone();
            std::thread::spawn(move || l.fence(Duration::from_secs(5)))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !fencer.is_finished(),
            "the fence returned while a write ran"
        );
        tx.send(()).unwrap();
        let f = fencer.join().unwrap().unwrap();
        assert!(f.waited_us >= 90_000, "{f:?}");
        // The held write ran (the fence waited for it), but its answer was
        // cut: the borrower reports an error, never a success it cannot prove.
        assert!(writer.join().unwrap().is_err());
        assert_eq!(held.mem.data.lock().unwrap()[0], 1);
        // Fenced: refused, even on a new connection; nothing lands.
        assert!(v.write_at(&[2; 512], 4096).is_err());
        assert_eq!(held.mem.data.lock().unwrap()[4096], 0);
        let s = lending.stats();
        assert!(s.fenced && s.fences == 2 && s.dropped >= 1, "{s:?}");
        // Lifted: the same borrower reconnects and is served.
        lending.unfence();
        v.write_at(&[3; 512], 4096).unwrap();
        assert_eq!(held.mem.data.lock().unwrap()[4096], 3);
    }

    /// F1 on the borrower's side: the process lending the volume is
    /// replaced while a write is in flight on it (the old one cut off,
    /// its socket file gone, the new one there 200 ms later). The handoff
    /// core re-issues the write exactly once, on the new lender, after
    /// waiting for it; a barrier flush there covers what the old one had
    /// answered; the caller sees no error; the new connection carries on.
    #[test]
    fn a_write_cut_off_by_a_lender_change_lands_once_on_the_next_lender() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let (_old, old_lending, tx) = held_lender(&sock);
        let v = Arc::new(RemoteVolume::connect(&sock).unwrap());
        v.write_at(&[5; 512], 4096).unwrap();
        let writer = {
            let v = v.clone();
            std::thread::spawn(move || v.write_at(&[1; 512], 0))
        };
        until_executing(&old_lending);
        // The old lender leaves: its file goes, its borrowers are cut (it
        // still holds the write: the fence says so).
        old_lending.withdraw();
        assert!(old_lending.fence(Duration::from_millis(10)).is_err());
        std::thread::sleep(Duration::from_millis(200));
        let new = Arc::new(Memory::new(64 << 10, false));
        let _new_lending = listen(&sock, new.clone()).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(new.data.lock().unwrap()[0], 1);
        assert_eq!(new.writes.load(Relaxed), 1, "re-issued more than once");
        // The old lender's answered write is covered by a flush on the new
        // one before any flush of the caller's.
        assert!(new.flushes.load(Relaxed) >= 1);
        let st = v.handoff_stats();
        assert_eq!(
            (st.losses, st.reissued, st.errors_to_app),
            (1, 1, 0),
            "{st:?}"
        );
        // Back on a direct connection: the next requests go there.
        v.write_at(&[2; 512], 512).unwrap();
        v.flush().unwrap();
        assert_eq!(new.writes.load(Relaxed), 2);
        assert_eq!(v.handoff_stats().losses, 1);
        tx.send(()).unwrap();
    }

    /// A borrower that gives up on a slow request (its 20 s timeout) hangs
    /// up and sends it again on a new connection. The new request, and
    /// anything after it, waits until the old one has finished, so the old
    /// data can never land over the new. A slow request of a borrower that
    /// is still there holds up nobody else.
    #[test]
    fn a_request_waits_while_one_its_borrower_hung_up_on_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let (held, lending, tx) = held_lender(&sock);
        let mut old = UnixStream::connect(&sock).unwrap();
        old.read_exact(&mut [0u8; crate::proto::HELLO_LEN]).unwrap();
        old.write_all(&write_request(0, 0xaa)).unwrap();
        until_executing(&lending);
        let v = Arc::new(RemoteVolume::connect(&sock).unwrap());
        // Its borrower is still there: others go on.
        v.write_at(&[0xcc; 512], 4096).unwrap();
        drop(old);
        // Anything sent after the hang-up waits for the orphan (here a
        // write elsewhere: writes at 0 are held by this volume).
        let after = {
            let v = v.clone();
            std::thread::spawn(move || v.write_at(&[0xbb; 512], 8192))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !after.is_finished(),
            "a request ran beside the orphaned one"
        );
        assert_eq!(held.mem.data.lock().unwrap()[8192], 0);
        // The disk's own path (the guest's virtio requests) waits too.
        let own = {
            let o = lending.orphans();
            std::thread::spawn(move || o.wait())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!own.is_finished(), "the own path ran beside the orphan");
        tx.send(()).unwrap();
        after.join().unwrap().unwrap();
        assert!(own.join().unwrap() >= Duration::from_millis(90));
        assert!(lending.orphans().wait().is_zero());
        assert_eq!(held.mem.data.lock().unwrap()[0], 0xaa);
        assert_eq!(held.mem.data.lock().unwrap()[8192], 0xbb);
        assert_eq!(held.mem.data.lock().unwrap()[4096], 0xcc);
    }
}
