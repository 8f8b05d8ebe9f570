//! The tunnel client a host's vhost-user-scsi backend runs: it numbers
//! each command, keeps it until its result arrives, and when the
//! connection breaks (the server restarted, the network failed) connects
//! again and sends every unacknowledged command once more under its
//! original number; the server runs each number at most once.
//!
//! One thread per client owns the connection's reading side and the
//! reconnects; `submit` writes from the caller's thread. A command whose
//! server stays unreachable for `reconnect_for` fails with
//! [`ClientError::Unreachable`] (so a guest sees an error before its own
//! command timeout, not a hang).

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use crate::proto::{self, Command, Message, Outcome, RefuseCode};
use crate::stream::{read_message, write_message, FrameReader, StreamError};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The reading side wakes up this often to check timeouts and stop.
const POLL: Duration = Duration::from_millis(500);
/// Pause between connection attempts.
const RETRY_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("the file server {server} did not answer for {secs} s")]
    Unreachable { server: String, secs: u64 },
    #[error("the file server refused {disk}: {reason} ({code:?})")]
    Refused {
        disk: String,
        code: RefuseCode,
        reason: String,
    },
    #[error("the file server answered with something else than a welcome")]
    Protocol,
    #[error("the client is closed")]
    Closed,
    #[error("connection to the file server")]
    Stream(#[from] StreamError),
    #[error("connection to the file server")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The file server, `host:port`.
    pub server: String,
    /// The disk's path under the server's directory.
    pub disk: String,
    /// This initiator's name: unique per VM and host.
    pub initiator: String,
    /// How long commands wait for a server that went away before failing.
    pub reconnect_for: Duration,
    /// A connection with a command unanswered this long is considered dead.
    pub command_timeout: Duration,
}

/// The disk as the server's welcome described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskGeometry {
    pub blocks: u64,
    pub block_size: u32,
    pub read_only: bool,
}

/// What a command's completion callback gets.
pub type Done = Box<dyn FnOnce(Result<Outcome, ClientError>) + Send>;

/// One command to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub lun: u16,
    pub task_attr: u8,
    pub data_in_len: u32,
    pub cdb: Vec<u8>,
    pub data_out: Vec<u8>,
}

struct Pending {
    req: Request,
    done: Done,
    sent: Instant,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    /// When the last connection was lost (None while connected).
    down_since: Option<Instant>,
}

impl State {
    fn acked(&self) -> u64 {
        match self.pending.keys().next() {
            Some(first) => first - 1,
            None => self.next_seq - 1,
        }
    }
}

/// Counters, for the backend's API and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub commands: AtomicU64,
    pub reconnects: AtomicU64,
    /// Commands sent again after a reconnect.
    pub resent: AtomicU64,
    /// Results the server marked as replayed (ran once, sent again).
    pub replayed: AtomicU64,
    pub failed: AtomicU64,
}

struct Inner {
    cfg: ClientConfig,
    addr: SocketAddr,
    incarnation: u64,
    state: Mutex<State>,
    writer: Mutex<Option<TcpStream>>,
    stopping: AtomicBool,
    epoch: AtomicU64,
    stats: Stats,
}

pub struct Client {
    inner: Arc<Inner>,
    geometry: DiskGeometry,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_incarnation() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ (u64::from(std::process::id()) << 40)).max(1)
}

impl Inner {
    /// Connects and says hello; the stream and the welcome's geometry.
    fn connect(&self) -> Result<(TcpStream, DiskGeometry, u64, bool), ClientError> {
        let mut s = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT * 3))?;
        write_message(
            &mut s,
            &Message::Hello {
                min_version: proto::MIN_VERSION,
                max_version: proto::VERSION,
                incarnation: self.incarnation,
                initiator: self.cfg.initiator.clone(),
                disk: self.cfg.disk.clone(),
            },
        )?;
        match read_message(&mut s)? {
            Some(Message::Welcome {
                server_epoch,
                resumed,
                blocks,
                block_size,
                read_only,
                ..
            }) => Ok((
                s,
                DiskGeometry {
                    blocks,
                    block_size,
                    read_only,
                },
                server_epoch,
                resumed,
            )),
            Some(Message::Refuse { code, reason }) => Err(ClientError::Refused {
                disk: self.cfg.disk.clone(),
                code,
                reason,
            }),
            _ => Err(ClientError::Protocol),
        }
    }

    fn frame(seq: u64, acked: u64, r: &Request) -> Message {
        Message::Command(Command {
            seq,
            acked,
            lun: r.lun,
            task_attr: r.task_attr,
            data_in_len: r.data_in_len,
            cdb: r.cdb.clone(),
            data_out: r.data_out.clone(),
        })
    }

    /// Installs a new connection's writing side and sends every pending
    /// command again, oldest first.
    fn resume(&self, stream: &TcpStream) -> io::Result<()> {
        let mut w = lock(&self.writer);
        let mut s = stream.try_clone()?;
        let frames: Vec<Message> = {
            let mut st = lock(&self.state);
            st.down_since = None;
            let acked = st.acked();
            let now = Instant::now();
            st.pending
                .iter_mut()
                .map(|(seq, p)| {
                    p.sent = now;
                    Self::frame(*seq, acked, &p.req)
                })
                .collect()
        };
        if !frames.is_empty() {
            info!(commands = frames.len(), "resending unacknowledged commands");
        }
        for f in &frames {
            s.write_all_frame(f)?;
            self.stats.resent.fetch_add(1, Ordering::Relaxed);
        }
        *w = Some(s);
        Ok(())
    }

    fn lost(&self) {
        if let Some(s) = lock(&self.writer).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let mut st = lock(&self.state);
        st.down_since.get_or_insert_with(Instant::now);
    }

    /// Fails every pending command if the server has been away too long.
    fn expire(&self) {
        let failed: Vec<Pending> = {
            let mut st = lock(&self.state);
            match st.down_since {
                Some(t) if t.elapsed() >= self.cfg.reconnect_for => {
                    std::mem::take(&mut st.pending).into_values().collect()
                }
                _ => return,
            }
        };
        if failed.is_empty() {
            return;
        }
        warn!(commands = failed.len(), server = %self.cfg.server, "the file server stays unreachable; failing commands");
        for p in failed {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            (p.done)(Err(ClientError::Unreachable {
                server: self.cfg.server.clone(),
                secs: self.cfg.reconnect_for.as_secs(),
            }));
        }
    }

    fn complete(&self, o: Outcome) {
        let p = lock(&self.state).pending.remove(&o.seq);
        match p {
            Some(p) => {
                if o.replayed {
                    self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                }
                (p.done)(Ok(o));
            }
            // A result sent twice (a replay raced the first answer).
            None => debug!(seq = o.seq, "result for a command no longer pending"),
        }
    }

    /// Reads results until the connection ends or looks dead.
    fn read_results(&self, mut s: TcpStream) {
        if s.set_read_timeout(Some(POLL)).is_err() {
            return;
        }
        let mut frames = FrameReader::default();
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            match frames.next(&mut s) {
                Ok(Some(Message::Outcome(o))) => self.complete(o),
                Ok(Some(other)) => {
                    warn!(?other, "unexpected message from the file server");
                    return;
                }
                Ok(None) => {
                    info!("the file server closed the connection");
                    return;
                }
                Err(StreamError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Nothing for a while (what arrived of a frame is kept).
                    let oldest = lock(&self.state).pending.values().map(|p| p.sent).min();
                    if oldest.is_some_and(|t| t.elapsed() > self.cfg.command_timeout) {
                        warn!("a command is unanswered too long; reconnecting");
                        return;
                    }
                }
                Err(e) => {
                    info!(error = %e, "the connection to the file server failed");
                    return;
                }
            }
        }
    }

    /// `first` is the connection `Client::connect` made and installed.
    fn run(self: &Arc<Self>, mut first: Option<TcpStream>) {
        let mut attempts: u64 = 0;
        while !self.stopping.load(Ordering::Relaxed) {
            if let Some(s) = first.take() {
                self.read_results(s);
                self.lost();
                continue;
            }
            let stream = match self.connect() {
                Ok((s, _, epoch, resumed)) => {
                    let old = self.epoch.swap(epoch, Ordering::Relaxed);
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!(server = %self.cfg.server, restarted = old != epoch, resumed, attempts, "reconnected to the file server");
                    attempts = 0;
                    s
                }
                Err(e) => {
                    attempts += 1;
                    if attempts == 1 || attempts.is_multiple_of(25) {
                        warn!(server = %self.cfg.server, error = %e, attempts, "cannot reach the file server");
                    }
                    self.expire();
                    std::thread::sleep(RETRY_EVERY);
                    continue;
                }
            };
            if let Err(e) = self.resume(&stream) {
                warn!(error = %e, "cannot resend commands");
                self.lost();
                continue;
            }
            let _ = stream.set_read_timeout(Some(POLL));
            self.read_results(stream);
            self.lost();
        }
    }
}

trait WriteFrame {
    fn write_all_frame(&mut self, m: &Message) -> io::Result<()>;
}

impl WriteFrame for TcpStream {
    fn write_all_frame(&mut self, m: &Message) -> io::Result<()> {
        write_message(self, m)
    }
}

impl Client {
    /// Connects (failing if the server cannot be reached or refuses) and
    /// starts the thread that reads results and reconnects.
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let addr = cfg
            .server
            .to_socket_addrs()
            .map_err(|_| ClientError::Resolve(cfg.server.clone()))?
            .next()
            .ok_or_else(|| ClientError::Resolve(cfg.server.clone()))?;
        let inner = Arc::new(Inner {
            cfg,
            addr,
            incarnation: new_incarnation(),
            state: Mutex::new(State {
                next_seq: 1,
                ..Default::default()
            }),
            writer: Mutex::new(None),
            stopping: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            stats: Stats::default(),
        });
        let (stream, geometry, epoch, _) = inner.connect()?;
        inner.epoch.store(epoch, Ordering::Relaxed);
        // Commands submitted from now on go straight out.
        inner.resume(&stream)?;
        info!(server = %inner.cfg.server, disk = %inner.cfg.disk, initiator = %inner.cfg.initiator, blocks = geometry.blocks, "connected to the file server");
        let runner = inner.clone();
        let reader = std::thread::Builder::new()
            .name("share-client".into())
            .spawn(move || runner.run(Some(stream)))?;
        Ok(Client {
            inner,
            geometry,
            reader: Some(reader),
        })
    }

    pub fn geometry(&self) -> DiskGeometry {
        self.geometry
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The server epoch of the current (or last) connection.
    pub fn server_epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Relaxed)
    }

    /// Commands waiting for their result.
    pub fn pending(&self) -> usize {
        lock(&self.inner.state).pending.len()
    }

    /// Sends a command; `done` runs (on the client's thread, or this one
    /// if the client is closed) with its result.
    pub fn submit(&self, req: Request, done: Done) {
        if self.inner.stopping.load(Ordering::Relaxed) {
            done(Err(ClientError::Closed));
            return;
        }
        self.inner.stats.commands.fetch_add(1, Ordering::Relaxed);
        let frame = {
            let mut st = lock(&self.inner.state);
            // Down for too long: fail at once rather than queue.
            if st
                .down_since
                .is_some_and(|t| t.elapsed() >= self.inner.cfg.reconnect_for)
            {
                drop(st);
                self.inner.stats.failed.fetch_add(1, Ordering::Relaxed);
                done(Err(ClientError::Unreachable {
                    server: self.inner.cfg.server.clone(),
                    secs: self.inner.cfg.reconnect_for.as_secs(),
                }));
                return;
            }
            // The acknowledgement covers commands before this one only.
            let acked = st.acked();
            let seq = st.next_seq;
            st.next_seq += 1;
            let frame = Inner::frame(seq, acked, &req);
            st.pending.insert(
                seq,
                Pending {
                    req,
                    done,
                    sent: Instant::now(),
                },
            );
            frame
        };
        let mut w = lock(&self.inner.writer);
        if let Some(s) = w.as_mut() {
            if let Err(e) = s.write_all_frame(&frame) {
                // The reader notices too; the command is resent on the
                // next connection.
                debug!(error = %e, "cannot send a command; it waits for the reconnect");
                let _ = s.shutdown(Shutdown::Both);
                *w = None;
            }
        }
    }

    /// Stops the client; pending commands fail with `Closed`.
    pub fn close(&mut self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        if let Some(s) = lock(&self.inner.writer).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        let pending = std::mem::take(&mut lock(&self.inner.state).pending);
        for p in pending.into_values() {
            (p.done)(Err(ClientError::Closed));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}
