//! The recovery site: `tandem replica serve`. Listens on TCP, runs a
//! [`Session`] per connection and stores each verified layer atomically:
//! written under a temporary name, synced, relinked to the site's copy of
//! its parent, opened as a chain (which checks the link), renamed into
//! place, the directory synced, and only then added to the manifest and
//! acknowledged. A crash at any point leaves the manifest's chain intact;
//! leftovers are removed when the site reopens.

use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tandem_disk::{ops, Chain, ChainOptions};

use crate::manifest::{
    fsync_dir, holds, DirLock, LayerRecord, Manifest, ManifestError, Merging, MANIFEST,
};
use crate::proto::{hex, Message, RefuseCode};
use crate::retention::{plan, Slot};
use crate::session::{Completed, Offer, Peer, Refusal, Session};
use crate::wire::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {seq}")]
    Disk {
        seq: u64,
        #[source]
        source: tandem_disk::DiskError,
    },
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Name of the file that stores layer `seq`.
pub fn layer_file(seq: u64, format: tandem_disk::Format) -> String {
    format!("layer-{seq:06}.{}", format.extension())
}

fn is_ours(name: &str) -> bool {
    name.starts_with("layer-")
        || name.starts_with(".incoming-")
        || name.starts_with(".partial-")
        || name == ".manifest.json.tmp"
}

/// The site's directory and manifest.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    /// Connections of accepted primaries: a newly accepted one cuts the
    /// others (after a network cut the old one would otherwise linger
    /// until its idle timeout).
    sessions: Vec<(u64, TcpStream)>,
    next_session: u64,
    /// Retention: how many recovery points to keep (`None`: all of them,
    /// until the chain is too deep to take another layer).
    keep: Option<usize>,
}

impl Store {
    /// Opens (creating the directory if needed) and removes what an
    /// interrupted store left: temporary files, layers not in the manifest.
    /// A merge that was interrupted is finished first.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            manifest: Manifest::load(dir)?,
            sessions: Vec::new(),
            next_session: 1,
            keep: None,
        };
        if store.manifest.merging.is_some() {
            tracing::info!("finishing an interrupted merge");
            store.finish_merge()?;
        }
        let next = store.manifest.layers.last().map_or(0, |l| l.seq) + 1;
        let partial = store.partial_path(next);
        let partial_names: Vec<String> = [partial.clone(), sidecar(&partial)]
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let manifest = &store.manifest;
        let mut keep: Vec<&str> = manifest.layers.iter().map(|l| l.file.as_str()).collect();
        keep.extend(partial_names.iter().map(String::as_str));
        for entry in fs::read_dir(dir).map_err(io(dir, "list"))? {
            let entry = entry.map_err(io(dir, "list"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_ours(&name) && !keep.contains(&name.as_str()) {
                tracing::info!(file = %name, "removing a leftover of an interrupted transfer");
                fs::remove_file(entry.path()).map_err(io(&entry.path(), "remove leftover"))?;
            }
        }
        Ok(store)
    }

    /// Sets the retention policy: keep the last `keep` points (at least 1).
    pub fn set_keep(&mut self, keep: Option<usize>) {
        self.keep = keep.map(|k| k.max(1));
    }

    /// Does the merge the manifest records as pending: copy and relink
    /// (idempotent, see `tandem_disk::ops::merge_link`), record the merged
    /// chain, then remove the merged files.
    fn finish_merge(&mut self) -> Result<(), StoreError> {
        let Some((target, merged, child)) = self.manifest.merge_files() else {
            let mut m = self.manifest.clone();
            m.merging = None;
            m.save(&self.dir)?;
            self.manifest = m;
            return Ok(());
        };
        let seq = self
            .manifest
            .merging
            .as_ref()
            .map_or(0, |m| self.manifest.layers[m.last].seq);
        let disk = |source| StoreError::Disk { seq, source };
        let target = self.dir.join(target);
        let merged: Vec<PathBuf> = merged.iter().map(|f| self.dir.join(f)).collect();
        let child = child.map(|f| self.dir.join(f));
        ops::merge_link(
            &target,
            &merged,
            child.as_deref(),
            &tandem_disk::FaultHook::default(),
        )
        .map_err(disk)?;
        let len = fs::metadata(&target).map_err(io(&target, "stat"))?.len();
        let m = self.manifest.merged(len);
        m.save(&self.dir)?;
        self.manifest = m;
        ops::remove_layers(&merged, &tandem_disk::FaultHook::default()).map_err(disk)?;
        Ok(())
    }

    /// Applies the retention policy: merges old points down (never a point
    /// a failover holds, never while a failover is reading the site).
    /// Returns how many merges it did.
    pub fn retain(&mut self) -> Result<usize, StoreError> {
        let Some(keep) = self.keep else {
            return Ok(0);
        };
        let Some(_lock) = DirLock::try_exclusive(&self.dir)? else {
            tracing::debug!("a failover holds the site: no merge this time");
            return Ok(0);
        };
        if self.manifest.merging.is_some() {
            self.finish_merge()?;
        }
        let held = holds(&self.dir)?;
        let mut done = 0;
        for _ in 0..self.manifest.layers.len() {
            let slots: Vec<Slot> = self
                .manifest
                .layers
                .iter()
                .map(|l| Slot {
                    held: held.contains(&l.seq),
                })
                .collect();
            let Some(run) = plan(&slots, keep) else {
                break;
            };
            let started = std::time::Instant::now();
            let mut m = self.manifest.clone();
            for l in &mut m.layers[run.target..run.last] {
                l.retired = true;
            }
            m.merging = Some(Merging {
                target: run.target,
                last: run.last,
            });
            m.save(&self.dir)?;
            self.manifest = m;
            self.finish_merge()?;
            done += 1;
            tracing::info!(
                into = %self.manifest.layers[run.target].file,
                points_dropped = run.last - run.target,
                ms = started.elapsed().as_millis() as u64,
                "merged old recovery points"
            );
        }
        Ok(done)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Records an accepted primary (its id on first contact, a higher generation).
    pub fn accept(&mut self, peer: &Peer) -> Result<(), StoreError> {
        let id = hex(&peer.chain_id);
        if self.manifest.chain_id.as_deref() == Some(id.as_str())
            && self.manifest.generation == peer.generation
            && self.manifest.disk_size == Some(peer.disk_size)
        {
            return Ok(());
        }
        let mut m = self.manifest.clone();
        m.chain_id = Some(id);
        m.generation = m.generation.max(peer.generation);
        m.disk_size = Some(peer.disk_size);
        m.save(&self.dir)?;
        self.manifest = m;
        Ok(())
    }

    /// Registers the connection of an accepted primary and cuts every
    /// other one; returns the session's id.
    pub fn register(&mut self, conn: Option<TcpStream>) -> u64 {
        // Each cut session unregisters itself once it has ended (having
        // kept what it received of a layer).
        for (id, old) in &self.sessions {
            tracing::info!(session = id, "a newer session of the primary cuts this one");
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        let id = self.next_session;
        self.next_session += 1;
        if let Some(c) = conn {
            self.sessions.push((id, c));
        }
        id
    }

    /// How many sessions other than `id` are registered.
    pub fn sessions_other_than(&self, id: u64) -> usize {
        self.sessions.iter().filter(|(i, _)| *i != id).count()
    }

    /// Where the part of layer `seq` a cut session received is kept.
    pub fn partial_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!(".partial-{seq:06}"))
    }

    /// The partial next layer, if a cut session left one.
    pub fn partial_offer(&self) -> Option<Offer> {
        let seq = self.manifest.layers.last().map_or(0, |l| l.seq) + 1;
        let path = self.partial_path(seq);
        let record: PartialRecord = serde_json::from_slice(&fs::read(sidecar(&path)).ok()?).ok()?;
        let len = fs::metadata(&path).ok()?.len();
        if record.seq != seq || len != record.file_len {
            return None;
        }
        Some(Offer {
            seq,
            format: crate::proto::WireFormat::from_u8(record.format).ok()?,
            file_len: record.file_len,
            sealed_at_ms: record.sealed_at_ms,
            name: record.name,
            offset: record.offset,
        })
    }

    pub fn unregister(&mut self, id: u64) {
        self.sessions.retain(|(i, _)| *i != id);
    }

    /// Temporary file for layer `seq` in session `session` (two sessions
    /// never share one).
    pub fn incoming_path(&self, seq: u64, generation: u64, session: u64) -> PathBuf {
        self.dir
            .join(format!(".incoming-{seq:06}-g{generation}-s{session}"))
    }

    /// Publishes a complete layer (its bytes in `tmp`) as the next recovery
    /// point, if `peer` is still the newest generation.
    pub fn commit(
        &mut self,
        peer: &Peer,
        layer: &Completed,
        tmp: &Path,
    ) -> Result<LayerRecord, CommitError> {
        if peer.generation < self.manifest.generation {
            return Err(CommitError::Refused(Refusal::new(
                RefuseCode::StaleGeneration,
                format!(
                    "stale primary: generation {} was superseded by {}",
                    peer.generation, self.manifest.generation
                ),
            )));
        }
        let last = self.manifest.layers.last().map_or(0, |l| l.seq);
        if layer.seq != last + 1 {
            return Err(CommitError::Refused(Refusal::new(
                RefuseCode::Protocol,
                format!("layer {} does not follow layer {last}", layer.seq),
            )));
        }
        let format = layer.format.to_disk();
        let file = layer_file(layer.seq, format);
        let path = self.dir.join(&file);
        let started = std::time::Instant::now();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(io(tmp, "open"))?;
        f.sync_all().map_err(io(tmp, "fsync"))?;
        drop(f);
        let synced = started.elapsed();
        let disk = |source| StoreError::Disk {
            seq: layer.seq,
            source,
        };
        if let Some(parent) = self.manifest.layers.last() {
            ops::relink(tmp, &parent.file).map_err(disk)?;
        }
        // Opening the chain checks the format, the parent link (VHDX: the
        // parent's identity) and the sizes before the layer is published.
        let chain = Chain::open(
            tmp,
            ChainOptions {
                format: Some(format),
                ..ChainOptions::default()
            },
        )
        .map_err(disk)?;
        let size = tandem_disk::BlockDevice::size(&chain);
        drop(chain);
        if Some(size) != self.manifest.disk_size {
            return Err(CommitError::Refused(Refusal::new(
                RefuseCode::Size,
                format!("layer {} has virtual size {size}", layer.seq),
            )));
        }
        fs::rename(tmp, &path).map_err(io(&path, "rename into place"))?;
        fsync_dir(&self.dir)?;
        let record = LayerRecord {
            seq: layer.seq,
            file,
            format: format.name().into(),
            file_len: layer.file_len,
            digest: hex(&layer.digest),
            sealed_at_ms: layer.sealed_at_ms,
            received_at_ms: now_ms(),
            primary_name: layer.name.clone(),
            merged_from: None,
            retired: false,
        };
        let mut m = self.manifest.clone();
        m.layers.push(record.clone());
        m.save(&self.dir)?;
        self.manifest = m;
        // A part of this layer a cut session kept is stale now.
        let partial = self.partial_path(layer.seq);
        let _ = fs::remove_file(sidecar(&partial));
        let _ = fs::remove_file(&partial);
        tracing::debug!(
            seq = layer.seq,
            fsync_ms = synced.as_millis() as u64,
            commit_ms = started.elapsed().as_millis() as u64,
            "layer committed"
        );
        Ok(record)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ManifestError> for CommitError {
    fn from(e: ManifestError) -> Self {
        CommitError::Store(e.into())
    }
}

/// Options of `tandem replica serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub dir: PathBuf,
    pub listen: String,
    /// A connection silent for this long is dropped.
    pub idle_timeout: Duration,
    /// Retention: keep the last N recovery points, merge older ones down
    /// (`None`: keep every point; the chain then fills up after about 60).
    pub keep: Option<usize>,
}

/// A running site: the listener and its store.
pub struct Server {
    listener: TcpListener,
    store: Arc<Mutex<Store>>,
    idle_timeout: Duration,
    stop: Arc<AtomicBool>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    pub fn bind(cfg: &ServeConfig) -> Result<Server, ServeError> {
        let mut store = Store::open(&cfg.dir)?;
        store.set_keep(cfg.keep);
        // A site restarted (perhaps with a smaller --keep) merges at once.
        store.retain()?;
        let listener = TcpListener::bind(&cfg.listen).map_err(|source| ServeError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
        Ok(Server {
            listener,
            store: Arc::new(Mutex::new(store)),
            idle_timeout: cfg.idle_timeout,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// A flag that makes [`Server::run`] return after the next connection attempt.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Accepts connections until stopped; each runs on its own thread.
    pub fn run(&self) -> Result<(), ServeError> {
        for conn in self.listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let store = self.store.clone();
            let timeout = self.idle_timeout;
            std::thread::spawn(move || {
                let peer = conn
                    .peer_addr()
                    .map_or_else(|_| "?".into(), |a| a.to_string());
                let span = tracing::info_span!("replica session", %peer);
                let _g = span.enter();
                match serve_connection(conn, &store, timeout) {
                    Ok(()) => tracing::info!("session ended"),
                    Err(e) => tracing::warn!(error = %e, "session ended"),
                }
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("refused the primary: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The temporary file of a layer being received. Chunks are written by
/// [`WRITERS`] threads of their own (the session's thread goes on reading
/// and hashing the next one), with O_DIRECT where the file system takes
/// it: the data goes from the frame buffer to the device while the
/// transfer runs, instead of being copied into the page cache (a third of
/// the site's CPU time, most of it faulting in fresh pages) and written
/// out by the fsync at the commit (a quarter of a 512 MiB initial sync,
/// with nothing else to do).
/// The file is still synced once, at the commit (metadata, the unaligned
/// tail, and the device's write cache). Syncing it in the background while
/// it is written through the page cache made the transfer of a 512 MiB
/// base twice as slow here (the writes wait on it).
struct IncomingFile {
    path: PathBuf,
    /// Chunk payloads to write: (file offset, payload).
    tx: Option<std::sync::mpsc::SyncSender<(u64, wire::ChunkBuf)>>,
    /// Payload buffers the writers are done with.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    writers: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Chunks written at once: one direct write of 1 MiB at a time leaves the
/// device idle between writes (fio here: 1.1 GB/s with one in flight,
/// 1.4 GB/s with two, no more with four).
const WRITERS: usize = 2;

/// Opens `path` again for writing with O_DIRECT, if the file system allows.
fn open_direct(path: &Path) -> Option<fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Writes `data` at `at`: its page-aligned part through `direct` (if any),
/// the rest through the page cache. A file system that refuses the direct
/// write (EINVAL: alignment it does not take) gets every later write
/// through the page cache.
fn write_chunk(
    file: &fs::File,
    direct: &mut Option<Arc<fs::File>>,
    data: &[u8],
    at: u64,
) -> std::io::Result<()> {
    let align = wire::DATA_ALIGN;
    let aligned = data.len() / align * align;
    let mut done = 0;
    if let Some(d) = direct.as_ref() {
        if aligned > 0
            && at.is_multiple_of(align as u64)
            && data.as_ptr().addr().is_multiple_of(align)
        {
            match d.write_all_at(&data[..aligned], at) {
                Ok(()) => done = aligned,
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    tracing::info!(error = %e, "O_DIRECT refused: writing through the page cache");
                    *direct = None;
                }
                Err(e) => return Err(e),
            }
        }
    }
    file.write_all_at(&data[done..], at + done as u64)
}

impl IncomingFile {
    fn new(path: PathBuf, file: fs::File) -> Result<IncomingFile, StoreError> {
        let file = Arc::new(file);
        let direct = open_direct(&path).map(Arc::new);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, wire::ChunkBuf)>(WRITERS);
        let rx = Arc::new(Mutex::new(rx));
        let (spare_tx, spare) = std::sync::mpsc::channel();
        let writers = (0..WRITERS)
            .map(|_| {
                let (file, mut direct) = (file.clone(), direct.clone());
                let (rx, spare_tx) = (rx.clone(), spare_tx.clone());
                std::thread::spawn(move || -> std::io::Result<()> {
                    loop {
                        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((at, chunk)) = next else {
                            return Ok(());
                        };
                        write_chunk(&file, &mut direct, chunk.data(), at)?;
                        let _ = spare_tx.send(chunk.into_buffer());
                    }
                })
            })
            .collect();
        Ok(IncomingFile {
            path,
            tx: Some(tx),
            spare,
            writers,
        })
    }

    /// A buffer for the next frame's payload (one the writer is done with).
    fn spare_buffer(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_default()
    }

    /// Queues the chunk's data to be written at `at`.
    fn write(&mut self, chunk: wire::ChunkBuf, at: u64) -> Result<(), StoreError> {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send((at, chunk)).is_ok());
        if sent {
            return Ok(());
        }
        // The writers stopped: their error says why.
        Err(match self.stop() {
            Err(e) => e,
            Ok(()) => io(&self.path, "write")(std::io::Error::other("the writers stopped")),
        })
    }

    /// Waits for the writers; the first error any of them met.
    fn stop(&mut self) -> Result<(), StoreError> {
        self.tx = None;
        let mut result = Ok(());
        for w in self.writers.drain(..) {
            let e = match w.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::other("the writer panicked"),
            };
            if result.is_ok() {
                result = Err(io(&self.path, "write")(e));
            }
        }
        result
    }

    /// Waits for every queued write; returns the path.
    fn finish(mut self) -> Result<PathBuf, StoreError> {
        self.stop()?;
        Ok(self.path.clone())
    }
}

impl Drop for IncomingFile {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Serves one connection to its end. Whatever happens, a partial layer's
/// temporary file is removed.
pub fn serve_connection(
    conn: TcpStream,
    store: &Mutex<Store>,
    idle_timeout: Duration,
) -> Result<(), String> {
    conn.set_read_timeout(Some(idle_timeout))
        .and_then(|_| conn.set_write_timeout(Some(idle_timeout)))
        .and_then(|_| conn.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    let mut reader =
        // Small: a chunk's payload (1 MiB) is read past it, straight into
        // the frame buffer.
        BufReader::with_capacity(64 << 10, conn.try_clone().map_err(|e| e.to_string())?);
    let mut writer = BufWriter::new(conn);
    let mut session = Session::new();
    let mut tmp: Option<IncomingFile> = None;
    let mut registered = None;
    let control = writer.get_ref().try_clone().ok();
    let result = session_loop(
        &mut session,
        &mut reader,
        &mut writer,
        store,
        &mut tmp,
        (control, &mut registered),
    );
    if let Some(t) = tmp {
        let cut = matches!(result, Ok(()) | Err(SessionError::Wire(WireError::Io(_))));
        let received = session.incoming().map(|i| (i.seq, i.received_up_to()));
        let path = t.path.clone();
        let kept = match (cut, received) {
            (true, Some((seq, offset))) if offset > 0 => match t.finish() {
                Ok(path) => keep_partial(store, &session, &path, seq, offset),
                Err(e) => Err(e),
            },
            _ => {
                drop(t);
                Ok(false)
            }
        };
        match kept {
            Ok(true) => {}
            Ok(false) => {
                let _ = fs::remove_file(&path);
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not keep the partial layer");
                let _ = fs::remove_file(&path);
            }
        }
    }
    if let Some(id) = registered {
        lock(store).unregister(id);
    }
    match result {
        Ok(()) => Ok(()),
        Err(SessionError::Refused(r)) => {
            let _ = wire::send(&mut writer, &r.message());
            Err(format!("refused the primary: {}", r.reason))
        }
        Err(SessionError::Store(e)) => {
            let r = Refusal::new(RefuseCode::Storage, error_chain(&e));
            let _ = wire::send(&mut writer, &r.message());
            Err(r.reason)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn remove_if_there(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path, "remove")(e)),
        _ => Ok(()),
    }
}

/// The description of a partial layer file.
fn sidecar(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// What a site keeps of a layer cut mid-transfer (`.partial-NNNNNN.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PartialRecord {
    seq: u64,
    format: u8,
    file_len: u64,
    sealed_at_ms: u64,
    name: String,
    /// Every chunk below is in the file, synced.
    offset: u64,
}

/// Keeps the part of a layer a cut session received, to be offered to the
/// next session: the file synced, renamed to `.partial-NNNNNN`, then its
/// description written (atomically). Returns whether it was kept.
fn keep_partial(
    store: &Mutex<Store>,
    session: &Session,
    tmp: &Path,
    seq: u64,
    offset: u64,
) -> Result<bool, StoreError> {
    let Some(i) = session.incoming() else {
        return Ok(false);
    };
    let st = lock(store);
    if st.manifest.layers.last().map_or(0, |l| l.seq) + 1 != seq {
        return Ok(false);
    }
    fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(tmp, "fsync"))?;
    let partial = st.partial_path(seq);
    fs::rename(tmp, &partial).map_err(io(&partial, "rename partial layer"))?;
    fsync_dir(&st.dir)?;
    let record = PartialRecord {
        seq,
        format: i.format as u8,
        file_len: i.file_len,
        sealed_at_ms: i.sealed_at_ms,
        name: i.name.clone(),
        offset,
    };
    let text = serde_json::to_vec(&record).map_err(|e| {
        io(&partial, "describe partial layer")(std::io::Error::other(e.to_string()))
    })?;
    crate::manifest::write_atomic(&sidecar(&partial), &text)?;
    tracing::info!(seq, offset, "kept a layer cut mid-transfer");
    Ok(true)
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn session_loop(
    session: &mut Session,
    reader: &mut impl std::io::Read,
    writer: &mut impl Write,
    store: &Mutex<Store>,
    tmp: &mut Option<IncomingFile>,
    (control, registered): (Option<TcpStream>, &mut Option<u64>),
) -> Result<(), SessionError> {
    let Some(first) = wire::recv(reader)? else {
        return Ok(());
    };
    let (peer, mut welcome) = {
        let mut st = lock(store);
        let (peer, welcome) = session
            .hello(&first, st.manifest())
            .map_err(SessionError::Refused)?;
        st.accept(&peer)?;
        *registered = Some(st.register(control));
        (peer, welcome)
    };
    // The sessions this one cut keep what they received of a layer: wait
    // (a little) for them to end, so it can be offered.
    let me = registered.unwrap_or_default();
    for _ in 0..150 {
        if lock(store).sessions_other_than(me) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    {
        let st = lock(store);
        let offer = st.partial_offer();
        if let Message::Welcome { partial, .. } = &mut welcome {
            *partial = session.set_offer(offer);
        }
        wire::send(writer, &welcome)?;
        tracing::info!(
            chain = %hex(&peer.chain_id),
            generation = peer.generation,
            resume_after = st.manifest().layers.last().map_or(0, |l| l.seq),
            partial = ?welcome,
            "primary accepted"
        );
    }
    let mut frames = wire::FrameReader::default();
    loop {
        let msg = match frames.next(reader)? {
            None => return Ok(()),
            Some(wire::Frame::Chunk { seq, offset, data }) => {
                let at = session
                    .chunk(seq, offset, data)
                    .map_err(SessionError::Refused)?;
                let file = tmp.as_mut().ok_or_else(|| {
                    SessionError::Refused(Refusal::new(
                        RefuseCode::Protocol,
                        "chunk outside a layer",
                    ))
                })?;
                // The payload goes to the writer thread; the next frame is
                // read into a buffer it is done with.
                let chunk = frames.take_chunk(file.spare_buffer());
                file.write(chunk, at)?;
                continue;
            }
            Some(wire::Frame::Other(m)) => m,
        };
        match msg {
            Message::LayerBegin { .. } => {
                let (seq, file_len, resume_from) = {
                    let i = session.begin(msg).map_err(SessionError::Refused)?;
                    (i.seq, i.file_len, i.resume_from)
                };
                let (path, partial) = {
                    let st = lock(store);
                    (
                        st.incoming_path(seq, peer.generation, me),
                        st.partial_path(seq),
                    )
                };
                if resume_from > 0 {
                    // The site's own part first: moved to this session's
                    // name, hashed again from the file (a chunk that reads
                    // as zeros was never sent).
                    fs::rename(&partial, &path).map_err(io(&partial, "rename partial layer"))?;
                    remove_if_there(&sidecar(&partial))?;
                    let mut r = crate::sender::ChunkReader::open(&path).map_err(|e| {
                        io(&path, "read partial layer")(std::io::Error::other(e.to_string()))
                    })?;
                    let mut buf = Vec::new();
                    while let Some(at) = r.next_into(&mut buf).map_err(|e| {
                        io(&path, "read partial layer")(std::io::Error::other(e.to_string()))
                    })? {
                        if at >= resume_from {
                            break;
                        }
                        session
                            .replay(seq, at, &buf)
                            .map_err(SessionError::Refused)?;
                    }
                    tracing::info!(
                        seq,
                        offset = resume_from,
                        "resuming a layer cut mid-transfer"
                    );
                } else {
                    remove_if_there(&partial)?;
                    remove_if_there(&sidecar(&partial))?;
                }
                let f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(resume_from == 0)
                    .open(&path)
                    .map_err(io(&path, "create"))?;
                f.set_len(file_len).map_err(io(&path, "size"))?;
                *tmp = Some(IncomingFile::new(path, f)?);
            }
            Message::LayerEnd { .. } => {
                let done = session.end(msg).map_err(SessionError::Refused)?;
                let path = tmp
                    .take()
                    .ok_or_else(|| {
                        SessionError::Refused(Refusal::new(
                            RefuseCode::Protocol,
                            "layer-end outside a layer",
                        ))
                    })?
                    .finish()?;
                let committed = lock(store).commit(&peer, &done, &path);
                let record = match committed {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = fs::remove_file(&path);
                        return Err(match e {
                            CommitError::Refused(r) => SessionError::Refused(r),
                            CommitError::Store(s) => SessionError::Store(s),
                        });
                    }
                };
                session.committed(done.seq);
                tracing::info!(
                    point = record.seq,
                    file = %record.file,
                    bytes = record.file_len,
                    "recovery point stored"
                );
                wire::send(
                    writer,
                    &Message::LayerAck {
                        seq: done.seq,
                        digest: done.digest,
                    },
                )?;
                // Old points are merged while the primary waits for its
                // next interval (a commit waits for the store meanwhile).
                if let Err(e) = lock(store).retain() {
                    tracing::warn!(error = %error_chain(&e), "merging old recovery points failed");
                }
            }
            Message::Refuse { code, reason } => {
                tracing::warn!(?code, %reason, "the primary ended the session");
                return Ok(());
            }
            other => {
                return Err(SessionError::Refused(Refusal::new(
                    RefuseCode::Protocol,
                    format!("unexpected {}", other.name()),
                )))
            }
        }
    }
}

/// Path of the manifest in `dir` (for tools that read it directly).
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(MANIFEST)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::WireFormat;

    /// Chunks reach the file whole whether their page-aligned part goes
    /// through O_DIRECT (where the file system takes it) or not: aligned
    /// chunks, a short tail, and a buffer that is not aligned.
    #[test]
    fn chunks_are_written_whole_with_or_without_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        let len = 2 * crate::proto::CHUNK + 1000;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        let content: Vec<u8> = (0..len).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        let chunk = |at: u64| {
            let end = (at + crate::proto::CHUNK).min(len);
            &content[at as usize..end as usize]
        };
        let mut direct = open_direct(&path).map(Arc::new);
        // Aligned (as the frame reader places it): direct if possible.
        let mut frames = wire::FrameReader::default();
        let mut stream = Vec::new();
        for at in [0, 2 * crate::proto::CHUNK] {
            wire::send(
                &mut stream,
                &Message::Chunk {
                    seq: 1,
                    offset: at,
                    data: chunk(at).to_vec(),
                },
            )
            .unwrap();
        }
        let mut r = &stream[..];
        for at in [0, 2 * crate::proto::CHUNK] {
            assert!(frames.next(&mut r).unwrap().is_some());
            let c = frames.take_chunk(Vec::new());
            write_chunk(&file, &mut direct, c.data(), at).unwrap();
        }
        // Unaligned in memory: through the page cache.
        let mut shifted = vec![0u8; crate::proto::CHUNK as usize + 1];
        shifted[1..].copy_from_slice(chunk(crate::proto::CHUNK));
        write_chunk(&file, &mut direct, &shifted[1..], crate::proto::CHUNK).unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), content);
    }

    /// A commit from a generation lower than the manifest's is refused
    /// before anything is written.
    #[test]
    fn a_commit_from_a_superseded_generation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = Store::open(dir.path()).unwrap();
        let peer = |generation| Peer {
            chain_id: [3; 16],
            generation,
            disk_size: 1 << 20,
        };
        st.accept(&peer(2)).unwrap();
        let done = Completed {
            seq: 1,
            format: WireFormat::Raw,
            file_len: 1 << 20,
            sealed_at_ms: 1,
            has_parent: false,
            name: "base.img".into(),
            digest: [0; 32],
        };
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, vec![1u8; 1 << 20]).unwrap();
        match st.commit(&peer(1), &done, &tmp) {
            Err(CommitError::Refused(r)) => assert_eq!(r.code, RefuseCode::StaleGeneration),
            other => panic!("{other:?}"),
        }
        assert!(st.manifest().layers.is_empty());
        let rec = st.commit(&peer(2), &done, &tmp).unwrap();
        assert_eq!(rec.seq, 1);
        assert_eq!(Store::open(dir.path()).unwrap().manifest().layers.len(), 1);
    }
}
