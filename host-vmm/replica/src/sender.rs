//! The primary: `tandem replica start`. Connects to the recovery site,
//! learns what it already holds (resume without a full copy), ships the
//! sealed layers it lacks (the base first, on an initial sync), then each
//! interval seals the top layer (a checkpoint: through `tandem-disk` for a
//! chain no VM uses, through the vhost-blk backend's API for a running VM's
//! disk) and ships the new layer. A cut connection is retried with backoff;
//! a site that refuses who we are stops the sender.
//!
//! The primary's identity is a chain id (random, made once) and a
//! generation (one more at every start), kept in `.<disk>.replica.json`
//! next to the disk and synced before the first connection: a site refuses
//! a lower generation than it has seen, which fences off an old sender
//! still running, or a primary restored from an old copy.

use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_disk::{ops, probe, BlockDevice, Chain, ChainOptions, FaultHook, Guid};

use crate::manifest::write_atomic;
use crate::proto::{hex, unhex, LayerDigest, Message, RefuseCode, WireFormat, CHUNK, VERSION};
use crate::receiver::now_ms;
use crate::status::Status;
use crate::wire::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
    #[error("{0}")]
    Backend(String),
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the recovery site refused this primary ({code:?}): {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("the recovery site's chain has diverged from this primary's: {0}")]
    Diverged(String),
    #[error("unexpected {0} from the recovery site")]
    Unexpected(&'static str),
    #[error(transparent)]
    State(#[from] crate::manifest::ManifestError),
}

impl SendError {
    /// Errors a retry cannot fix.
    pub fn is_permanent(&self) -> bool {
        match self {
            SendError::Refused { code, .. } => code.is_permanent(),
            SendError::Diverged(_) | SendError::State(_) => true,
            _ => false,
        }
    }
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SendError + 'a {
    move |source| SendError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Where the primary's chain is and how to checkpoint it.
#[derive(Clone, Debug)]
pub enum Source {
    /// The top of a chain no VM is using.
    File(PathBuf),
    /// The API socket of the vhost-blk backend serving a running VM's disk.
    Vhost(PathBuf),
}

fn backend(
    api: &Path,
    req: &tandem_vhost_blk::api::Request,
) -> Result<tandem_vhost_blk::api::Response, SendError> {
    let berr = |e: std::io::Error| {
        SendError::Backend(format!("vhost-blk backend at {}: {e}", api.display()))
    };
    let mut conn = UnixStream::connect(api).map_err(berr)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(berr)?;
    let mut line = serde_json::to_string(req).map_err(|e| SendError::Backend(e.to_string()))?;
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(berr)?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer).map_err(berr)?;
    serde_json::from_str(&answer)
        .map_err(|e| SendError::Backend(format!("bad answer from the backend {answer:?}: {e}")))
}

impl Source {
    /// The top layer's path (and where the identity file lives).
    pub fn top(&self) -> Result<PathBuf, SendError> {
        match self {
            Source::File(p) => Ok(p.clone()),
            Source::Vhost(_) => Ok(PathBuf::from(
                &self
                    .vhost_info()?
                    .chain
                    .first()
                    .ok_or_else(|| SendError::Backend("the backend reports no layers".into()))?
                    .path,
            )),
        }
    }

    fn vhost_info(&self) -> Result<tandem_vhost_blk::api::Info, SendError> {
        let Source::Vhost(api) = self else {
            return Err(SendError::Backend("not a vhost-blk disk".into()));
        };
        match backend(api, &tandem_vhost_blk::api::Request::Info)? {
            tandem_vhost_blk::api::Response::Info(i) => Ok(*i),
            tandem_vhost_blk::api::Response::Error { message } => Err(SendError::Backend(message)),
            other => Err(SendError::Backend(format!("unexpected answer {other:?}"))),
        }
    }

    /// The sealed layers (all but the top), bottom first, and the disk's size.
    pub fn sealed_layers(&self) -> Result<(Vec<PathBuf>, u64), SendError> {
        match self {
            Source::File(top) => {
                let chain = Chain::open(top, ChainOptions::default()).map_err(|source| {
                    SendError::Disk {
                        path: top.clone(),
                        source,
                    }
                })?;
                let mut layers: Vec<PathBuf> = chain
                    .layers()
                    .iter()
                    .skip(1)
                    .map(|l| l.path().into())
                    .collect();
                layers.reverse();
                Ok((layers, chain.size()))
            }
            Source::Vhost(_) => {
                // The backend's own list can name layers a merge removed
                // (it reopens its chain at its next checkpoint): read the
                // sealed part from the files, from the newest sealed layer
                // down (the backend never writes it).
                let info = self.vhost_info()?;
                let Some(newest) = info.chain.get(1) else {
                    return Ok((Vec::new(), info.capacity_bytes));
                };
                let newest = PathBuf::from(&newest.path);
                let chain = Chain::open(&newest, ChainOptions::default()).map_err(|source| {
                    SendError::Disk {
                        path: newest.clone(),
                        source,
                    }
                })?;
                let mut layers: Vec<PathBuf> =
                    chain.layers().iter().map(|l| l.path().into()).collect();
                layers.reverse();
                Ok((layers, info.capacity_bytes))
            }
        }
    }

    /// Seals the top layer; returns the sealed layer's path.
    pub fn checkpoint(&self) -> Result<PathBuf, SendError> {
        match self {
            Source::File(top) => {
                ops::checkpoint(top, FaultHook::default()).map_err(|source| SendError::Disk {
                    path: top.clone(),
                    source,
                })
            }
            Source::Vhost(api) => {
                match backend(api, &tandem_vhost_blk::api::Request::Checkpoint)? {
                    tandem_vhost_blk::api::Response::Checkpoint { sealed, .. } => Ok(sealed.into()),
                    tandem_vhost_blk::api::Response::Error { message } => {
                        Err(SendError::Backend(format!("checkpoint: {message}")))
                    }
                    other => Err(SendError::Backend(format!("unexpected answer {other:?}"))),
                }
            }
        }
    }
}

/// The primary's persistent identity, and where its chain stands after
/// merges: its bottom sealed layer holds point `first_seq` (every older
/// point merged into it), the next one point `first_seq + 1`, and so on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub chain_id: String,
    pub generation: u64,
    /// The point the bottom sealed layer holds (absent or 0: 1, no merge yet).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_seq: u64,
    /// Layer digests of shipped points whose files changed since (merged
    /// into, or relinked to a merged parent), by point: what a site that
    /// resumes there is checked against.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub digests: std::collections::BTreeMap<u64, String>,
    /// A merge started and not yet recorded as done (finished at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merging: Option<PrimaryMerge>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A merge of sealed layers on the primary: `run` (bottom first) into
/// `target` (the bottom sealed layer), `child` relinked to it; afterwards the
/// bottom holds point `first_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryMerge {
    pub target: PathBuf,
    pub run: Vec<PathBuf>,
    pub child: PathBuf,
    pub first_seq: u64,
}

impl Identity {
    /// Where the identity of the chain whose top is `top` is kept.
    pub fn path(top: &Path) -> PathBuf {
        let name = top
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        top.with_file_name(format!(".{name}.replica.json"))
    }

    pub fn load(top: &Path) -> Result<Option<Identity>, SendError> {
        let path = Self::path(top);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| SendError::Backend(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, "read")(e)),
        }
    }

    /// Loads (or makes) the identity and takes the next generation, durably.
    pub fn next(top: &Path) -> Result<Identity, SendError> {
        let id = match Self::load(top)? {
            Some(mut id) => {
                id.generation += 1;
                id
            }
            None => Identity {
                chain_id: hex(&Guid::random().map_err(io(top, "random id"))?.0),
                generation: 1,
                first_seq: 0,
                digests: Default::default(),
                merging: None,
            },
        };
        id.save(top)?;
        Ok(id)
    }

    /// Replaces the file durably.
    pub fn save(&self, top: &Path) -> Result<(), SendError> {
        let mut text =
            serde_json::to_vec_pretty(self).map_err(|e| SendError::Backend(e.to_string()))?;
        text.push(b'\n');
        write_atomic(&Self::path(top), &text)?;
        Ok(())
    }

    /// The point the bottom sealed layer holds.
    pub fn first(&self) -> u64 {
        self.first_seq.max(1)
    }

    /// The digest point `seq` was shipped with; `layer` is its file.
    pub fn shipped_digest(&self, seq: u64, layer: &Path) -> Result<[u8; 32], SendError> {
        match self.digests.get(&seq) {
            Some(d) => unhex(d).ok_or_else(|| {
                SendError::Backend(format!("the digest recorded for point {seq} is not hex"))
            }),
            None => file_digest(layer),
        }
    }

    fn chain_id_bytes(&self) -> Result<[u8; 16], SendError> {
        unhex(&self.chain_id).ok_or_else(|| {
            SendError::Backend(format!("chain id {:?} is not 32 hex digits", self.chain_id))
        })
    }
}

/// Reads a file's chunks as the protocol sends them: in order, each
/// `min(CHUNK, rest)` long at a multiple of `CHUNK`, skipping chunks that
/// are all zeros (and holes, without reading them).
pub struct ChunkReader {
    path: PathBuf,
    file: fs::File,
    file_len: u64,
    offset: u64,
}

impl ChunkReader {
    pub fn open(path: &Path) -> Result<ChunkReader, SendError> {
        let file = fs::File::open(path).map_err(io(path, "open"))?;
        let file_len = file.metadata().map_err(io(path, "stat"))?.len();
        Ok(ChunkReader {
            path: path.to_path_buf(),
            file,
            file_len,
            offset: 0,
        })
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Reads the next chunk with data into `buf` (resized to its length);
    /// returns its offset, or `None` at the end of the file.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<u64>, SendError> {
        while self.offset < self.file_len {
            // Jump over a hole; a file system without SEEK_DATA reads everything.
            match nix::unistd::lseek(
                self.file.as_raw_fd(),
                self.offset as i64,
                nix::unistd::Whence::SeekData,
            ) {
                Ok(data) if data as u64 >= self.file_len => break,
                Ok(data) => self.offset = (data as u64 / CHUNK * CHUNK).max(self.offset),
                Err(nix::errno::Errno::ENXIO) => break,
                Err(_) => {}
            }
            let at = self.offset;
            let len = LayerDigest::chunk_len(self.file_len, at) as usize;
            buf.resize(len, 0);
            self.file
                .read_exact_at(buf, at)
                .map_err(io(&self.path, "read"))?;
            self.offset += len as u64;
            if !crate::proto::is_zero(buf) {
                return Ok(Some(at));
            }
        }
        self.offset = self.file_len;
        Ok(None)
    }
}

/// Calls `f` with each non-zero chunk of the file, in order, as the
/// protocol sends them.
pub fn for_each_chunk(
    path: &Path,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), SendError>,
) -> Result<u64, SendError> {
    let mut r = ChunkReader::open(path)?;
    let mut buf = Vec::with_capacity(CHUNK as usize);
    while let Some(at) = r.next_into(&mut buf)? {
        f(at, &buf)?;
    }
    Ok(r.file_len())
}

/// The layer digest of a file, as the receiver computes it.
pub fn file_digest(path: &Path) -> Result<[u8; 32], SendError> {
    let len = fs::metadata(path).map_err(io(path, "stat"))?.len();
    let mut d = LayerDigest::new(len);
    for_each_chunk(path, |off, data| {
        d.add(off, data)
            .map_err(|e| SendError::Backend(format!("{}: {e}", path.display())))
    })?;
    Ok(d.finish())
}

/// When the layer was sealed: its inode changed last when the checkpoint
/// linked it under its sealed name and renamed the new top over the old.
fn sealed_at_ms(meta: &fs::Metadata) -> u64 {
    (meta.ctime().max(0) as u64) * 1000 + (meta.ctime_nsec().max(0) as u64) / 1_000_000
}

/// Reopens a chain no VM uses after a crash: a checkpoint interrupted
/// before its last step left the new layer under a temporary name (the
/// chain itself is intact). Returns whether there was one.
pub fn recover(top: &Path) -> Result<bool, SendError> {
    let tmp = tandem_disk::checkpoint::temp_name(top);
    match fs::remove_file(&tmp) {
        Ok(()) => {
            tracing::info!(file = %tmp.display(), "removed the leftover of an interrupted checkpoint");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&tmp, "remove the leftover of a checkpoint")(e)),
    }
}

/// Most sealed layers a replicated chain may have: with its top it must
/// open (at most `MAX_DEPTH` layers), and so must the site's chain with a
/// failover layer on top of its newest point.
pub const MAX_SEALED: usize = tandem_disk::chain::MAX_DEPTH - 2;

/// Whether another layer may be sealed on a chain with `sealed` sealed layers.
pub fn may_seal(sealed: usize) -> bool {
    sealed < MAX_SEALED
}

/// Options of `tandem replica start`.
#[derive(Clone, Debug)]
pub struct SendConfig {
    pub source: Source,
    pub to: String,
    pub interval: Duration,
    /// Connect, read and write timeout (a cut network is noticed within it).
    pub timeout: Duration,
    /// Stop once this many recovery points are on the site (tests, benches).
    pub stop_after: Option<u64>,
    /// Print a line per point on stderr.
    pub print_progress: bool,
    /// Once this many sealed layers are all on the site, merge all but the
    /// newest into the bottom one (0: never; the chain then fills up).
    pub merge_at: usize,
}

/// Default of [`SendConfig::merge_at`]: the primary's chain stays at most
/// this deep plus its top (and a layer or two shipped meanwhile).
pub const MERGE_AT: usize = 8;

/// Merges the sealed layers of the primary, all shipped, but the newest
/// into the bottom one. The intent is recorded in the identity file first,
/// so a crash is finished by [`finish_merge`] at the next start.
fn merge_old_layers(
    top: &Path,
    identity: &mut Identity,
    layers: &[PathBuf],
) -> Result<(), SendError> {
    let [target, run @ .., child] = layers else {
        return Ok(());
    };
    if run.is_empty() {
        return Ok(());
    }
    // The merge changes the files of two shipped points: the target takes
    // the newest merged point, the child is relinked. Keep their digests.
    let first = identity.first();
    let (merged_seq, child_seq) = (first + run.len() as u64, first + run.len() as u64 + 1);
    let merged_digest = identity.shipped_digest(merged_seq, &run[run.len() - 1])?;
    let child_digest = identity.shipped_digest(child_seq, child)?;
    identity.digests.retain(|&seq, _| seq > merged_seq);
    identity.digests.insert(merged_seq, hex(&merged_digest));
    identity.digests.insert(child_seq, hex(&child_digest));
    identity.merging = Some(PrimaryMerge {
        target: target.clone(),
        run: run.to_vec(),
        child: child.clone(),
        first_seq: merged_seq,
    });
    identity.save(top)?;
    finish_merge(top, identity)
}

/// Finishes the merge the identity file records, if any (idempotent: see
/// `tandem_disk::ops::merge_link`).
pub fn finish_merge(top: &Path, identity: &mut Identity) -> Result<(), SendError> {
    let Some(pm) = identity.merging.clone() else {
        return Ok(());
    };
    let span = tracing::info_span!("merge", into = %pm.target.display(), layers = pm.run.len());
    let _g = span.enter();
    let started = Instant::now();
    let disk = |source| SendError::Disk {
        path: pm.target.clone(),
        source,
    };
    ops::merge_link(&pm.target, &pm.run, Some(&pm.child), &FaultHook::default()).map_err(disk)?;
    identity.first_seq = pm.first_seq;
    identity.merging = None;
    identity.save(top)?;
    ops::remove_layers(&pm.run, &FaultHook::default()).map_err(disk)?;
    tracing::info!(
        first_seq = pm.first_seq,
        ms = started.elapsed().as_millis() as u64,
        "merged shipped layers down"
    );
    Ok(())
}

/// The primary's sealed layer whose chain reads as recovery point `seq`
/// (`None` for a point older than the bottom one, merged away).
pub fn layer_of_point(source: &Source, seq: u64) -> Result<Option<PathBuf>, SendError> {
    let top = source.top()?;
    let first = Identity::load(&top)?.map_or(1, |i| i.first());
    let (layers, _) = source.sealed_layers()?;
    if seq < first {
        return Ok(None);
    }
    Ok(layers.get((seq - first) as usize).cloned())
}

/// Runs the sender until `stop` is set, `stop_after` points are shipped, or
/// a permanent error.
pub fn run(cfg: &SendConfig, status: &Mutex<Status>, stop: &AtomicBool) -> Result<(), SendError> {
    let top = cfg.source.top()?;
    if let Source::File(_) = cfg.source {
        recover(&top)?;
    }
    let mut identity = Identity::next(&top)?;
    finish_merge(&top, &mut identity)?;
    {
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        st.target = cfg.to.clone();
        st.disk = top.display().to_string();
        st.chain_id = identity.chain_id.clone();
        st.generation = identity.generation;
    }
    tracing::info!(disk = %top.display(), to = %cfg.to, chain = %identity.chain_id, generation = identity.generation, "replication starting");
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        set(status, |s| s.state = "connecting".into());
        let mut connected = false;
        match session(cfg, &top, &mut identity, status, stop, &mut connected) {
            Ok(()) => {
                set(status, |s| s.state = "stopped".into());
                return Ok(());
            }
            Err(e) if e.is_permanent() => {
                set(status, |s| {
                    s.state = "failed".into();
                    s.last_error = Some(crate::receiver::error_chain(&e));
                });
                return Err(e);
            }
            Err(e) => {
                let msg = crate::receiver::error_chain(&e);
                tracing::warn!(error = %msg, retry_in_ms = backoff.as_millis() as u64, "replication interrupted");
                if cfg.print_progress {
                    eprintln!("replica: interrupted ({msg}); retrying");
                }
                set(status, |s| {
                    s.state = "disconnected".into();
                    s.last_error = Some(msg);
                    s.reconnects += 1;
                });
                if connected {
                    backoff = Duration::from_millis(100);
                }
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn set(status: &Mutex<Status>, f: impl FnOnce(&mut Status)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, SendError> {
    let cerr = |source| SendError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut last = None;
    for a in addr.to_socket_addrs().map_err(cerr)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(cerr(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

fn session(
    cfg: &SendConfig,
    top: &Path,
    identity: &mut Identity,
    status: &Mutex<Status>,
    stop: &AtomicBool,
    connected: &mut bool,
) -> Result<(), SendError> {
    let (mut layers, disk_size) = cfg.source.sealed_layers()?;
    let conn = connect(&cfg.to, cfg.timeout)?;
    conn.set_read_timeout(Some(cfg.timeout))
        .and_then(|_| conn.set_write_timeout(Some(cfg.timeout)))
        .and_then(|_| conn.set_nodelay(true))
        .map_err(|source| SendError::Connect {
            addr: cfg.to.clone(),
            source,
        })?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|source| SendError::Connect {
        addr: cfg.to.clone(),
        source,
    })?);
    // Chunk frames (1 MiB) are larger than the buffer and go straight to
    // the socket; only the small messages are buffered.
    let mut writer = BufWriter::with_capacity(64 << 10, conn);
    wire::send(
        &mut writer,
        &Message::Hello {
            version: VERSION,
            chain_id: identity.chain_id_bytes()?,
            generation: identity.generation,
            disk_size,
        },
    )?;
    // What the site holds of the next layer, cut mid-transfer.
    let mut resume: Option<crate::proto::Partial>;
    let mut confirmed = match wire::recv(&mut reader)? {
        Some(Message::Welcome {
            last_seq,
            last_digest,
            partial,
            ..
        }) => {
            resume = partial;
            let first = identity.first();
            let n = first - 1 + layers.len() as u64;
            if last_seq > n {
                return Err(SendError::Diverged(format!(
                    "the site's newest point is {last_seq}, this chain holds points up to {n}"
                )));
            }
            if last_seq < first && (last_seq > 0 || first > 1) {
                return Err(SendError::Diverged(format!(
                    "the site's newest point is {last_seq}, but this primary merged points up \
                     to {first} after the site acknowledged them (a site restored from an old \
                     copy cannot catch up: replicate to a new directory)"
                )));
            }
            if last_seq > 0 {
                let ours =
                    identity.shipped_digest(last_seq, &layers[(last_seq - first) as usize])?;
                if ours != last_digest {
                    return Err(SendError::Diverged(format!(
                        "point {last_seq} is {} here and {} there",
                        hex(&ours),
                        hex(&last_digest)
                    )));
                }
            }
            last_seq
        }
        Some(Message::Refuse { code, reason }) => return Err(SendError::Refused { code, reason }),
        Some(other) => return Err(SendError::Unexpected(other.name())),
        None => return Err(SendError::Unexpected("end of connection")),
    };
    *connected = true;
    tracing::info!(resume_after = confirmed, sealed = layers.len(), "connected");
    set(status, |s| {
        s.state = "connected".into();
        s.points = confirmed;
    });
    let mut next_checkpoint = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let first = identity.first();
        let caught_up = confirmed >= first - 1 + layers.len() as u64;
        if caught_up && cfg.merge_at >= 3 && layers.len() >= cfg.merge_at {
            // Shipped layers are merged down while the interval runs
            // (never the newest sealed one: the layer above it may be the
            // live top, which only its writer touches).
            merge_old_layers(top, identity, &layers)?;
            layers = cfg.source.sealed_layers()?.0;
            set(status, |s| s.merges += 1);
            continue;
        }
        if cfg.stop_after.is_some_and(|n| confirmed >= n) {
            return Ok(());
        }
        if caught_up {
            // Seal the next layer when the interval is due.
            sleep_unless(
                stop,
                next_checkpoint.saturating_duration_since(Instant::now()),
            );
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if !may_seal(layers.len()) {
                // Another layer would make a chain too deep to open (here,
                // or at the site with a failover layer on top): stop sealing
                // rather than break the disk. Replication stalls; the RPO grows.
                set(status, |s| {
                    s.state = "chain-full".into();
                    s.last_error = Some(format!(
                        "the chain has {} sealed layers, the most it may have is {}: merge layers to go on",
                        layers.len(),
                        MAX_SEALED
                    ));
                });
                tracing::warn!(
                    sealed = layers.len(),
                    "chain too deep to seal another layer"
                );
                next_checkpoint = Instant::now() + cfg.interval;
                continue;
            }
            let sealed = cfg.source.checkpoint()?;
            next_checkpoint += cfg.interval;
            if next_checkpoint < Instant::now() {
                next_checkpoint = Instant::now() + cfg.interval;
            }
            layers = cfg.source.sealed_layers()?.0;
            if layers.last() != Some(&sealed) {
                return Err(SendError::Backend(format!(
                    "after sealing {}, the chain's newest sealed layer is {:?}",
                    sealed.display(),
                    layers.last()
                )));
            }
            continue;
        }
        let seq = confirmed + 1;
        let path = layers[(seq - first) as usize].clone();
        ship(
            &mut reader,
            &mut writer,
            &path,
            seq,
            resume.take(),
            status,
            cfg,
        )?;
        confirmed = seq;
    }
}

/// Chunks read ahead of the socket.
const PIPELINE: usize = 3;

/// Ships layer `seq`. With `partial` (what the site kept of it from a cut
/// session), chunks below its offset are hashed but not sent, if it is the
/// same layer (length and seal time; the digest checks the rest).
fn ship(
    reader: &mut impl std::io::Read,
    writer: &mut impl Write,
    path: &Path,
    seq: u64,
    partial: Option<crate::proto::Partial>,
    status: &Mutex<Status>,
    cfg: &SendConfig,
) -> Result<(), SendError> {
    let span = tracing::info_span!("ship layer", seq, path = %path.display());
    let _g = span.enter();
    let started = Instant::now();
    let meta = fs::metadata(path).map_err(io(path, "stat"))?;
    let format = probe(path).map_err(|source| SendError::Disk {
        path: path.into(),
        source,
    })?;
    let sealed_at = sealed_at_ms(&meta);
    let skip = partial
        .filter(|p| p.file_len == meta.len() && p.sealed_at_ms == sealed_at)
        .map_or(0, |p| p.offset);
    if skip > 0 {
        tracing::info!(
            seq,
            offset = skip,
            "the site holds the start of this layer: resuming"
        );
        set(status, |s| s.bytes_resumed += skip);
    }
    wire::queue(
        writer,
        &Message::LayerBegin {
            seq,
            format: WireFormat::from_disk(format),
            file_len: meta.len(),
            sealed_at_ms: sealed_at,
            has_parent: seq > 1,
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
    )?;
    // Reading and hashing run on a thread of their own, a few chunks ahead
    // of the socket (both ends may share two cores: neither waits idle).
    let mut chunks = ChunkReader::open(path)?;
    let file_len = chunks.file_len();
    let mut sent = 0u64;
    let mut last_line = Instant::now();
    let digest = std::thread::scope(|scope| -> Result<LayerDigest, SendError> {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(PIPELINE);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..=PIPELINE {
            let _ = empty_tx.send(Vec::with_capacity(CHUNK as usize));
        }
        let reader = scope.spawn(move || -> Result<LayerDigest, SendError> {
            let mut digest = LayerDigest::new(file_len);
            let mut spare = None;
            loop {
                let mut buf = match spare.take() {
                    Some(b) => b,
                    None => match empty_rx.recv() {
                        Ok(b) => b,
                        Err(_) => break,
                    },
                };
                let Some(offset) = chunks.next_into(&mut buf)? else {
                    break;
                };
                digest
                    .add(offset, &buf)
                    .map_err(|e| SendError::Backend(format!("{}: {e}", path.display())))?;
                if offset < skip {
                    // The site has it: hashed, not sent.
                    spare = Some(buf);
                    continue;
                }
                if full_tx.send((offset, buf)).is_err() {
                    break;
                }
            }
            Ok(digest)
        });
        let mut failed = None;
        while let Ok((offset, data)) = full_rx.recv() {
            let header = crate::proto::chunk_header(seq, offset, data.len());
            let crc = crate::proto::chunk_crc(&header, &data);
            // The data goes straight to the socket (it is larger than the
            // buffer); the small pieces around it are buffered.
            if let Err(e) = writer
                .write_all(&header)
                .and_then(|_| writer.write_all(&data))
                .and_then(|_| writer.write_all(&crc))
            {
                failed = Some(SendError::from(WireError::from(e)));
                break;
            }
            sent += data.len() as u64;
            set(status, |s| {
                s.bytes_sent += data.len() as u64;
                s.layer_offset = offset + data.len() as u64;
                s.layer_len = file_len;
            });
            // A big layer (the base) takes a while: say how far it got.
            if cfg.print_progress && last_line.elapsed() >= Duration::from_secs(2) {
                last_line = Instant::now();
                eprintln!(
                    "replica: layer {seq}: {} of {} ({}/s)",
                    crate::status::human(offset + data.len() as u64),
                    crate::status::human(file_len),
                    crate::status::human(
                        (sent as f64 / started.elapsed().as_secs_f64().max(1e-3)) as u64
                    )
                );
            }
            let _ = empty_tx.send(data);
        }
        drop(full_rx);
        drop(empty_tx);
        let digest = reader
            .join()
            .map_err(|_| SendError::Backend("the layer reader panicked".into()))??;
        match failed {
            Some(e) => Err(e),
            None => Ok(digest),
        }
    })?;
    let chunks = digest.chunks();
    let digest = digest.finish();
    wire::send(
        writer,
        &Message::LayerEnd {
            seq,
            chunks,
            digest,
        },
    )?;
    match wire::recv(reader)? {
        Some(Message::LayerAck { seq: s, digest: d }) if s == seq && d == digest => {}
        Some(Message::LayerAck { seq: s, .. }) => {
            return Err(SendError::Diverged(format!(
                "the site acknowledged layer {s} with another digest, expected layer {seq}"
            )))
        }
        Some(Message::Refuse { code, reason }) => return Err(SendError::Refused { code, reason }),
        Some(other) => return Err(SendError::Unexpected(other.name())),
        None => return Err(SendError::Unexpected("end of connection")),
    }
    let now = now_ms();
    let elapsed = started.elapsed();
    set(status, |s| {
        s.point_acked(seq, sealed_at, now, sent, elapsed)
    });
    if cfg.print_progress {
        let s = status.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!("{}", s.line());
    }
    tracing::info!(
        seq,
        bytes = sent,
        ms = elapsed.as_millis() as u64,
        "point acknowledged"
    );
    Ok(())
}
