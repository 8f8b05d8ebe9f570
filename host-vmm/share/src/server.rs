//! The file server (`tandem share serve`): disks are files under one
//! directory, opened by path when a client asks for them (through
//! `tandem-disk`: raw, qcow2 or VHDX chain tops); each disk is one
//! `tandem-scsi` logical unit whose reservations every initiator on every
//! host shares. A thread per connection reads commands; a small pool runs
//! them; a result goes to the connection the initiator has at that moment
//! (a reconnected client gets the results of commands it sent before).
//!
//! After every PERSISTENT RESERVE OUT the disk's state file is rewritten
//! (temporary file, fsync, rename, fsync of the directory) before the
//! result goes out: the reservation state (restored on start if APTPL was
//! set) and, per initiator, the last PERSISTENT RESERVE OUT's sequence
//! number and result, so a client replaying it after a server restart gets
//! that result instead of a second execution.
//!
//! Every command with side effects is also written to the disk's
//! executed-command record (`journal_file`): its intent before it runs,
//! its result before the result goes out. A restarted server answers a
//! replay from it and never runs a command that may have run already
//! (see `journal` for which case gets which answer).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tandem_disk::{BlockDevice, Chain, ChainOptions};
use tandem_scsi::pr::{SavedPr, SAVED_PR_VERSION};
use tandem_scsi::sense::{self, Sense, Status};
use tandem_scsi::{ItNexus, LogicalUnit, LuConfig, PrState, Target, BLOCK_SIZE};
use tracing::{debug, error, info, warn};

use crate::api::{self, DiskInfo, InitiatorInfo, RegistrationInfo, ReservationInfo};
use crate::journal::Restored;
use crate::journal_file::{JournalFile, JournalFileError};
use crate::proto::{self, Command, Message, Outcome, RefuseCode, NO_LUN};
use crate::session::{has_side_effects, Admit, Earlier, Session};
use crate::stream::{read_message, write_message, StreamError};

/// Connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a new connection has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads running commands.
pub const WORKERS: usize = 4;
/// Longest initiator name (an iSCSI name's limit).
pub const MAX_INITIATOR: usize = 223;
/// The nexus the operator's clear runs as.
pub const OPERATOR: &str = "tandem-operator";
/// Version of the per-disk state file.
pub const SAVED_DISK_VERSION: u32 = 1;
/// Longest operator API request line.
const MAX_API_LINE: u64 = 4096;
/// INTERNAL TARGET FAILURE: the state could not be saved.
const INTERNAL_TARGET_FAILURE: Sense = Sense::new(sense::key::HARDWARE_ERROR, 0x44, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on the API socket {path}")]
    Api {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("served directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
    #[error("state file {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalFileError),
    #[error("accept failed")]
    Accept(#[source] io::Error),
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Disks are files under this directory.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the per-disk state files live (default `<dir>/.tandem-share`).
    pub state_dir: Option<PathBuf>,
    /// The operator API (JSON lines); default `<state dir>/api.sock`.
    pub api_socket: Option<PathBuf>,
}

/// The last PERSISTENT RESERVE OUT of one initiator, saved for a replay
/// after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrRecord {
    pub initiator: String,
    pub incarnation: u64,
    pub seq: u64,
    pub status: u8,
    pub sense: Vec<u8>,
}

/// The saved state of one disk (a format: versioned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub version: u32,
    pub pr: SavedPr,
    pub records: Vec<PrRecord>,
}

/// One initiator's slot on a disk.
struct Slot {
    session: Session,
    /// The connection its results go to, with that connection's id.
    writer: Option<(u64, Arc<Mutex<TcpStream>>)>,
    commands: u64,
    replayed: u64,
}

struct Disk {
    name: String,
    lu: Arc<LogicalUnit>,
    target: Target,
    state_file: PathBuf,
    journal: JournalFile,
    read_only: bool,
    slots: Mutex<BTreeMap<String, Slot>>,
    records: Mutex<BTreeMap<String, PrRecord>>,
    save: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The executed-command record beside a disk's state file
/// (`<disk>.pr.json` -> `<disk>.cmds.jsonl`).
pub fn journal_path(state_file: &Path) -> PathBuf {
    let name = state_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = name.strip_suffix(".pr.json").unwrap_or(&name);
    state_file.with_file_name(format!("{base}.cmds.jsonl"))
}

/// temp file, fsync, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reads a disk's state file: the reservation state to restore (only what
/// APTPL kept) and the saved records. A missing file is a fresh disk.
pub fn load_state(path: &Path) -> Result<(PrState, Vec<PrRecord>), ServerError> {
    let err = |source| ServerError::State {
        path: path.to_path_buf(),
        source,
    };
    match fs::read(path) {
        Ok(b) => {
            let saved: SavedDisk =
                serde_json::from_slice(&b).map_err(|e| err(io::Error::other(e)))?;
            if saved.version != SAVED_DISK_VERSION {
                return Err(err(io::Error::other(format!(
                    "version {} (this build reads {SAVED_DISK_VERSION})",
                    saved.version
                ))));
            }
            let pr = saved.pr.restore().map_err(|e| err(io::Error::other(e)))?;
            Ok((pr, saved.records))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((PrState::default(), Vec::new())),
        Err(e) => Err(err(e)),
    }
}

impl Disk {
    fn open(name: &str, path: &Path, state_file: PathBuf) -> Result<Disk, ServerError> {
        let writable = fs::metadata(path)
            .map(|m| !m.permissions().readonly())
            .unwrap_or(true);
        let chain = Chain::open(
            path,
            ChainOptions {
                writable,
                ..Default::default()
            },
        )
        .map_err(|source| ServerError::Disk {
            path: path.to_path_buf(),
            source,
        })?;
        let read_only = !chain.writable();
        let disk: Arc<dyn BlockDevice> = Arc::new(chain);
        let (pr, records) = load_state(&state_file)?;
        if !pr.registrations.is_empty() {
            info!(
                disk = name,
                registrations = pr.registrations.len(),
                reserved = pr.reservation.is_some(),
                "restored persistent reservations"
            );
        }
        let lu = Arc::new(LogicalUnit::new(
            disk,
            LuConfig {
                serial: name
                    .chars()
                    .rev()
                    .take(24)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect(),
                read_only,
                unmap: !read_only,
            },
            pr,
        ));
        let mut target = Target::new();
        target.add_lun(0, lu.clone());
        let (journal, restored) = JournalFile::open(&journal_path(&state_file))?;
        let mut known: BTreeMap<String, Restored> = restored
            .into_iter()
            .map(|r| (r.initiator.clone(), r))
            .collect();
        // A saved PERSISTENT RESERVE OUT result was fsynced with the
        // reservation state: it answers its replay even where the command
        // record only knows the intent, or is not trusted.
        for r in &records {
            let k = known
                .entry(r.initiator.clone())
                .or_insert_with(|| Restored {
                    initiator: r.initiator.clone(),
                    incarnation: r.incarnation,
                    acked: 0,
                    earlier: BTreeMap::new(),
                });
            if k.incarnation == r.incarnation && r.seq > k.acked {
                k.earlier.insert(
                    r.seq,
                    Earlier::Finished(Outcome {
                        seq: r.seq,
                        status: r.status,
                        replayed: true,
                        sense: r.sense.clone(),
                        data: Vec::new(),
                    }),
                );
            }
        }
        let slots = known
            .into_iter()
            .map(|(name, r)| {
                (
                    name,
                    Slot {
                        session: r.session(),
                        writer: None,
                        commands: 0,
                        replayed: 0,
                    },
                )
            })
            .collect();
        Ok(Disk {
            name: name.to_string(),
            lu,
            target,
            state_file,
            journal,
            read_only,
            slots: Mutex::new(slots),
            records: Mutex::new(
                records
                    .into_iter()
                    .map(|r| (r.initiator.clone(), r))
                    .collect(),
            ),
            save: Mutex::new(()),
        })
    }

    /// Saves the current reservation state and records.
    fn save(&self) -> io::Result<()> {
        let _g = lock(&self.save);
        let saved = SavedDisk {
            version: SAVED_DISK_VERSION,
            pr: SavedPr {
                version: SAVED_PR_VERSION,
                state: self.lu.pr_state(),
            },
            records: lock(&self.records).values().cloned().collect(),
        };
        write_atomic(
            &self.state_file,
            &serde_json::to_vec_pretty(&saved).map_err(io::Error::other)?,
        )
    }

    /// Runs one command for `initiator`: its intent reaches the command
    /// record first, its result after.
    fn execute(&self, initiator: &str, incarnation: u64, cmd: &Command) -> Outcome {
        let failed = |out: &mut Outcome| {
            out.status = Status::CheckCondition as u8;
            out.sense = INTERNAL_TARGET_FAILURE.to_fixed().to_vec();
            out.data.clear();
        };
        if let Err(e) = self
            .journal
            .intent(initiator, incarnation, cmd.seq, &cmd.cdb)
        {
            // Not run: unrecorded, a replay after a restart could run it
            // a second time.
            error!(disk = %self.name, error = %e, "cannot write the command record; the command does not run");
            let mut out = Outcome {
                seq: cmd.seq,
                status: 0,
                replayed: false,
                sense: Vec::new(),
                data: Vec::new(),
            };
            failed(&mut out);
            return out;
        }
        let nexus = ItNexus::new(initiator, 1);
        let lun = (cmd.lun != NO_LUN).then_some(cmd.lun);
        let resp = self.target.execute(&nexus, lun, &cmd.cdb, &cmd.data_out);
        let mut out = Outcome {
            seq: cmd.seq,
            status: resp.status as u8,
            replayed: false,
            sense: resp
                .sense
                .map(|s| s.to_fixed().to_vec())
                .unwrap_or_default(),
            data: resp.data,
        };
        out.data.truncate(cmd.data_in_len as usize);
        if cmd.cdb.first() == Some(&0x5f) {
            lock(&self.records).insert(
                initiator.to_string(),
                PrRecord {
                    initiator: initiator.to_string(),
                    incarnation,
                    seq: cmd.seq,
                    status: out.status,
                    sense: out.sense.clone(),
                },
            );
            if let Err(e) = self.save() {
                // The status must not claim a persistence that failed.
                error!(disk = %self.name, error = %e, "cannot save the reservation state");
                failed(&mut out);
            }
        }
        // SYNCHRONIZE CACHE makes the record durable with the data: a
        // command recorded before it is never run again, even after a host
        // crash (it is then answered as unknown).
        if matches!(cmd.cdb.first(), Some(0x35 | 0x91)) && out.status == 0 {
            if let Err(e) = self.journal.sync() {
                error!(disk = %self.name, error = %e, "cannot make the command record durable");
                failed(&mut out);
            }
        }
        if let Err(e) = self.journal.done(initiator, incarnation, &out) {
            // A replay after a restart then fails as unknown: still never
            // twice.
            warn!(disk = %self.name, error = %e, "cannot record a command's result");
        }
        out
    }

    fn info(&self) -> DiskInfo {
        let pr = self.lu.pr_state();
        let slots = lock(&self.slots);
        DiskInfo {
            disk: self.name.clone(),
            blocks: self.lu.blocks(),
            read_only: self.read_only,
            generation: pr.generation,
            aptpl: pr.aptpl,
            registrations: pr
                .registrations
                .iter()
                .map(|r| RegistrationInfo {
                    initiator: r.nexus.initiator.clone(),
                    key: format!("{:#018x}", r.key),
                })
                .collect(),
            reservation: pr.reservation.as_ref().map(|r| ReservationInfo {
                holder: r.holder.initiator.clone(),
                kind: format!("{:?}", r.kind),
                code: r.kind.code(),
            }),
            initiators: slots
                .iter()
                .map(|(name, s)| InitiatorInfo {
                    name: name.clone(),
                    connected: s.writer.is_some(),
                    incarnation: s.session.incarnation(),
                    last_seq: s.session.last_seq(),
                    running: s.session.running(),
                    kept: s.session.kept(),
                    commands: s.commands,
                    replayed: s.replayed,
                })
                .collect(),
        }
    }

    /// The operator's clear: registers the operator's nexus (ignoring any
    /// key it had), then PERSISTENT RESERVE OUT CLEAR with that key.
    /// Returns the registrations removed (the operator's own excluded).
    fn clear(&self) -> Result<usize, String> {
        let before = self.lu.pr_state();
        let had = before.registrations.len();
        let key: u64 = 0x7464_6d6f_7065_7221;
        let op = ItNexus::new(OPERATOR, 1);
        let prout = |sa: u8, res_key: u64, sa_key: u64, aptpl: bool| {
            let cdb = [0x5f, sa, 0, 0, 0, 0, 0, 0, 24, 0];
            let mut p = [0u8; 24];
            p[0..8].copy_from_slice(&res_key.to_be_bytes());
            p[8..16].copy_from_slice(&sa_key.to_be_bytes());
            p[20] = u8::from(aptpl);
            self.lu.execute(&op, &cdb, &p)
        };
        // A pending unit attention of the operator's nexus is consumed
        // first (it answers any other command).
        for _ in 0..17 {
            let r = prout(6, 0, key, before.aptpl);
            if r.status == Status::Good {
                break;
            }
            if r.sense.map(|s| s.key) != Some(sense::key::UNIT_ATTENTION) {
                return Err(format!("cannot register the operator: {r:?}"));
            }
        }
        let r = prout(3, key, 0, false);
        if r.status != Status::Good {
            return Err(format!("CLEAR failed: {r:?}"));
        }
        self.save()
            .map_err(|e| format!("cannot save the state: {e}"))?;
        let left = self.lu.pr_state();
        info!(disk = %self.name, removed = had, generation = left.generation, "reservations cleared by the operator");
        Ok(had
            - usize::from(
                before
                    .registrations
                    .iter()
                    .any(|r| r.nexus.initiator == OPERATOR),
            ))
    }
}

struct Job {
    disk: Arc<Disk>,
    initiator: String,
    incarnation: u64,
    cmd: Command,
}

struct Shared {
    dir: PathBuf,
    state_dir: PathBuf,
    epoch: u64,
    disks: Mutex<HashMap<String, Arc<Disk>>>,
    jobs: Mutex<mpsc::Sender<Job>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn disk(&self, name: &str) -> Result<Arc<Disk>, ServerError> {
        let mut disks = lock(&self.disks);
        if let Some(d) = disks.get(name) {
            return Ok(d.clone());
        }
        let state_file = self
            .state_dir
            .join(format!("{}.pr.json", name.replace('/', "%2F")));
        let d = Arc::new(Disk::open(name, &self.dir.join(name), state_file)?);
        info!(
            disk = name,
            blocks = d.lu.blocks(),
            read_only = d.read_only,
            "disk opened"
        );
        disks.insert(name.to_string(), d.clone());
        Ok(d)
    }

    fn list(&self) -> Vec<DiskInfo> {
        let disks: Vec<Arc<Disk>> = lock(&self.disks).values().cloned().collect();
        let mut v: Vec<DiskInfo> = disks.iter().map(|d| d.info()).collect();
        v.sort_by(|a, b| a.disk.cmp(&b.disk));
        v
    }

    fn answer(&self, req: api::Request) -> api::Response {
        match req {
            api::Request::List => api::Response::List {
                epoch: self.epoch,
                disks: self.list(),
            },
            api::Request::Clear { disk } => {
                if !proto::valid_disk_path(&disk) {
                    return api::Response::Error {
                        message: format!("bad disk path {disk:?}"),
                    };
                }
                match self.disk(&disk) {
                    Ok(d) => match d.clear() {
                        Ok(removed) => api::Response::Cleared { disk, removed },
                        Err(message) => api::Response::Error { message },
                    },
                    Err(e) => api::Response::Error {
                        message: error_chain(&e),
                    },
                }
            }
        }
    }
}

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

pub struct Server {
    listener: TcpListener,
    api: Option<(PathBuf, UnixListener)>,
    shared: Arc<Shared>,
    jobs: Option<mpsc::Receiver<Job>>,
}

/// A new server epoch: the time in nanoseconds, mixed with the process id.
fn new_epoch() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    t ^ (u64::from(std::process::id()) << 48)
}

impl Server {
    pub fn open(cfg: &ServeConfig) -> Result<Server, ServerError> {
        let dir = fs::canonicalize(&cfg.dir).map_err(|source| ServerError::Dir {
            path: cfg.dir.clone(),
            source,
        })?;
        let state_dir = cfg
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.join(".tandem-share"));
        fs::create_dir_all(&state_dir).map_err(|source| ServerError::State {
            path: state_dir.clone(),
            source,
        })?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let api_path = cfg
            .api_socket
            .clone()
            .unwrap_or_else(|| state_dir.join("api.sock"));
        let _ = fs::remove_file(&api_path);
        let api = UnixListener::bind(&api_path).map_err(|source| ServerError::Api {
            path: api_path.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            dir,
            state_dir,
            epoch: new_epoch(),
            disks: Mutex::new(HashMap::new()),
            jobs: Mutex::new(tx),
            next_conn: AtomicU64::new(1),
        });
        // Disks with saved state are opened now: their reservations hold
        // from the start, and the operator sees them.
        if let Ok(entries) = fs::read_dir(&shared.state_dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(name) = n.strip_suffix(".pr.json") {
                    let name = name.replace("%2F", "/");
                    if proto::valid_disk_path(&name) {
                        if let Err(e) = shared.disk(&name) {
                            warn!(disk = name, error = %error_chain(&e), "cannot reopen a disk with saved state");
                        }
                    }
                }
            }
        }
        Ok(Server {
            listener,
            api: Some((api_path, api)),
            shared,
            jobs: Some(rx),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn api_socket(&self) -> Option<&Path> {
        self.api.as_ref().map(|(p, _)| p.as_path())
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// Serves until the listener fails.
    pub fn run(mut self) -> Result<(), ServerError> {
        if let Some(rx) = self.jobs.take() {
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..WORKERS {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("share-worker{i}"))
                    .spawn(move || worker(&rx))
                    .map_err(ServerError::Accept)?;
            }
        }
        if let Some((_, api)) = self.api.take() {
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name("share-api".into())
                .spawn(move || {
                    for conn in api.incoming().flatten() {
                        let shared = shared.clone();
                        let _ = std::thread::Builder::new()
                            .name("share-api-conn".into())
                            .spawn(move || serve_api(conn, &shared));
                    }
                })
                .map_err(ServerError::Accept)?;
        }
        info!(dir = %self.shared.dir.display(), listen = ?self.listener.local_addr().ok(), epoch = self.shared.epoch, "share server listening");
        let active = Arc::new(AtomicUsize::new(0));
        loop {
            let (stream, peer) = self.listener.accept().map_err(ServerError::Accept)?;
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                warn!(%peer, "too many connections; refusing the new one");
                let mut s = stream;
                let _ = write_message(
                    &mut s,
                    &Message::Refuse {
                        code: RefuseCode::Busy,
                        reason: "too many connections".into(),
                    },
                );
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let shared = self.shared.clone();
            let count = active.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("share {peer}"))
                .spawn(move || {
                    if let Err(e) = serve_conn(&shared, stream) {
                        debug!(%peer, error = %error_chain(&e), "connection ended");
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                active.fetch_sub(1, Ordering::SeqCst);
                error!(error = %e, "cannot start a connection thread");
            }
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match lock(rx).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let out = job.disk.execute(&job.initiator, job.incarnation, &job.cmd);
        let side_effects = has_side_effects(&job.cmd.cdb);
        let writer = {
            let mut slots = lock(&job.disk.slots);
            match slots.get_mut(&job.initiator) {
                Some(s) if s.session.incarnation() == job.incarnation => {
                    s.session.finish(&out, side_effects);
                    s.writer.as_ref().map(|(_, w)| w.clone())
                }
                _ => None,
            }
        };
        // No connection now: the client replays the command when it is
        // back and gets this result from the session.
        if let Some(w) = writer {
            let mut w = lock(&w);
            if let Err(e) = write_message(&mut *w, &Message::Outcome(out)) {
                debug!(error = %e, "cannot send a result; the client will replay");
                let _ = w.shutdown(Shutdown::Both);
            }
        }
    }
}

fn valid_initiator(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_INITIATOR
        && s.bytes().all(|b| b.is_ascii_graphic())
        && s != OPERATOR
}

fn refuse(stream: &mut TcpStream, code: RefuseCode, reason: String) -> Result<(), StreamError> {
    warn!(?code, %reason, "refusing a client");
    write_message(stream, &Message::Refuse { code, reason })?;
    Ok(())
}

/// Runs one client connection to its end.
fn serve_conn(shared: &Shared, mut stream: TcpStream) -> Result<(), StreamError> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let hello = read_message(&mut stream)?;
    let Some(Message::Hello {
        min_version,
        max_version,
        incarnation,
        initiator,
        disk,
    }) = hello
    else {
        return refuse(&mut stream, RefuseCode::Protocol, "expected a hello".into());
    };
    let Some(version) = proto::negotiate(min_version, max_version) else {
        return refuse(
            &mut stream,
            RefuseCode::Version,
            format!(
                "versions {min_version}-{max_version}; this server speaks {}-{}",
                proto::MIN_VERSION,
                proto::VERSION
            ),
        );
    };
    if !valid_initiator(&initiator) {
        return refuse(
            &mut stream,
            RefuseCode::BadInitiator,
            format!("initiator {initiator:?}"),
        );
    }
    if !proto::valid_disk_path(&disk) {
        return refuse(
            &mut stream,
            RefuseCode::BadPath,
            format!("disk path {disk:?}"),
        );
    }
    let d = match shared.disk(&disk) {
        Ok(d) => d,
        Err(e) => return refuse(&mut stream, RefuseCode::NoDisk, error_chain(&e)),
    };
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let (resumed, last_seq) = {
        let mut slots = lock(&d.slots);
        let known = slots.contains_key(&initiator);
        let slot = slots.entry(initiator.clone()).or_insert_with(|| Slot {
            session: Session::new(incarnation),
            writer: None,
            commands: 0,
            replayed: 0,
        });
        let resumed = known && slot.session.incarnation() == incarnation;
        if !resumed {
            // Recorded before any command of it runs; without the record
            // its commands could run twice across a restart.
            if let Err(e) = d.journal.begin(&initiator, incarnation) {
                drop(slots);
                return refuse(
                    &mut stream,
                    RefuseCode::NoDisk,
                    format!("cannot write the command record: {e}"),
                );
            }
        }
        if slot.session.incarnation() != incarnation {
            slot.session = Session::new(incarnation);
        }
        // The newest connection of an initiator takes over (the old one is
        // a client that has already reconnected).
        if let Some((_, old)) = slot.writer.replace((conn_id, writer.clone())) {
            let _ = lock(&old).shutdown(Shutdown::Both);
        }
        (resumed, slot.session.last_seq())
    };
    info!(%initiator, disk = %disk, incarnation, resumed, last_seq, "client connected");
    write_message(
        &mut *lock(&writer),
        &Message::Welcome {
            version,
            server_epoch: shared.epoch,
            resumed,
            last_seq,
            blocks: d.lu.blocks(),
            block_size: BLOCK_SIZE,
            read_only: d.read_only,
        },
    )?;
    stream.set_read_timeout(None)?;
    let ended = commands(shared, &d, &initiator, incarnation, &writer, &mut stream);
    {
        let mut slots = lock(&d.slots);
        if let Some(s) = slots.get_mut(&initiator) {
            if s.writer.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                s.writer = None;
            }
        }
    }
    info!(%initiator, disk = %disk, "client disconnected");
    ended
}

fn commands(
    shared: &Shared,
    d: &Arc<Disk>,
    initiator: &str,
    incarnation: u64,
    writer: &Mutex<TcpStream>,
    stream: &mut TcpStream,
) -> Result<(), StreamError> {
    loop {
        let cmd = match read_message(stream)? {
            None => return Ok(()),
            Some(Message::Command(c)) => c,
            Some(other) => {
                warn!(%initiator, ?other, "unexpected message; closing");
                return Ok(());
            }
        };
        let admit = {
            let mut slots = lock(&d.slots);
            let Some(slot) = slots.get_mut(initiator) else {
                return Ok(());
            };
            if slot.session.incarnation() != incarnation {
                // A newer incarnation took the slot over.
                return Ok(());
            }
            slot.commands += 1;
            d.journal.ack(initiator, incarnation, cmd.acked);
            let a = slot.session.admit(cmd.seq, cmd.acked);
            if matches!(a, Ok(Admit::Replay(_))) {
                slot.replayed += 1;
            }
            a
        };
        match admit {
            Ok(Admit::Run) => {
                let job = Job {
                    disk: d.clone(),
                    initiator: initiator.to_string(),
                    incarnation,
                    cmd,
                };
                if lock(&shared.jobs).send(job).is_err() {
                    return Ok(());
                }
            }
            Ok(Admit::Replay(o)) => {
                debug!(%initiator, seq = o.seq, "replayed result");
                write_message(&mut *lock(writer), &Message::Outcome(o))?;
            }
            Ok(Admit::Running | Admit::Stale) => {}
            Err(e) => {
                warn!(%initiator, error = %e, "closing");
                return Ok(());
            }
        }
    }
}

fn serve_api(conn: UnixStream, shared: &Shared) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_API_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = if !line.ends_with('\n') {
            api::Response::Error {
                message: "request line too long".into(),
            }
        } else {
            match serde_json::from_str::<api::Request>(&line) {
                Ok(req) => shared.answer(req),
                Err(e) => api::Response::Error {
                    message: format!("bad request: {e}"),
                },
            }
        };
        let Ok(mut s) = serde_json::to_string(&resp) else {
            return;
        };
        s.push('\n');
        if writer.write_all(s.as_bytes()).is_err() || !line.ends_with('\n') {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cmd(seq: u64, cdb: &[u8], data_out: Vec<u8>) -> Command {
        Command {
            seq,
            acked: 0,
            lun: 0,
            task_attr: 0,
            data_in_len: 4096,
            cdb: cdb.to_vec(),
            data_out,
        }
    }

    fn register(seq: u64, key: u64, aptpl: bool) -> Command {
        let mut p = vec![0u8; 24];
        p[8..16].copy_from_slice(&key.to_be_bytes());
        p[20] = u8::from(aptpl);
        cmd(seq, &[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0], p)
    }

    /// A disk opened again from its state file is what a server restart
    /// sees: with APTPL the registrations and reservation are back, and
    /// each initiator's last PERSISTENT RESERVE OUT is answered from the
    /// record instead of running again.
    #[test]
    fn a_restart_keeps_aptpl_state_and_the_last_reservation_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let state = dir.path().join("d.raw.pr.json");
        let d = Disk::open("d.raw", &path, state.clone()).unwrap();
        assert_eq!(d.execute("a", 7, &register(1, 0xa, true)).status, 0);
        assert_eq!(d.execute("b", 8, &register(1, 0xb, true)).status, 0);
        // a reserves Write Exclusive (type 1).
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&0xau64.to_be_bytes());
        let reserve = cmd(2, &[0x5f, 1, 1, 0, 0, 0, 0, 0, 24, 0], p);
        assert_eq!(d.execute("a", 7, &reserve).status, 0);
        drop(d);

        let d = Disk::open("d.raw", &path, state).unwrap();
        let pr = d.lu.pr_state();
        assert!(pr.aptpl);
        assert_eq!(pr.registrations.len(), 2);
        assert_eq!(pr.reservation.map(|r| r.holder.initiator), Some("a".into()));
        // b's write conflicts with a's reservation, restored.
        let w = cmd(2, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], vec![1; 512]);
        assert_eq!(d.execute("b", 8, &w).status, 0x18);
        let mut slots = lock(&d.slots);
        let a = slots.get_mut("a").unwrap();
        assert_eq!(a.session.incarnation(), 7);
        // The RESERVE replayed after the restart is not run again (a
        // second one would succeed too, but a REGISTER with a changed
        // key would not): its saved outcome comes back.
        match a.session.admit(2, 1) {
            Ok(Admit::Replay(o)) => assert!(o.replayed && o.status == 0),
            other => panic!("{other:?}"),
        }
        // b's last PERSISTENT RESERVE OUT was its REGISTER (seq 1).
        assert!(matches!(
            slots.get_mut("b").unwrap().session.admit(1, 0),
            Ok(Admit::Replay(_))
        ));
    }

    #[test]
    fn without_aptpl_a_restart_clears_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let state = dir.path().join("d.raw.pr.json");
        let d = Disk::open("d.raw", &path, state.clone()).unwrap();
        assert_eq!(d.execute("a", 7, &register(1, 0xa, false)).status, 0);
        drop(d);
        let d = Disk::open("d.raw", &path, state).unwrap();
        assert!(d.lu.pr_state().registrations.is_empty());
        // The record of a's REGISTER is still there for a replay.
        let mut slots = lock(&d.slots);
        assert!(matches!(
            slots.get_mut("a").unwrap().session.admit(1, 0),
            Ok(Admit::Replay(_))
        ));
    }

    #[test]
    fn the_operator_clears_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let d = Disk::open("d.raw", &path, dir.path().join("s.json")).unwrap();
        assert_eq!(d.execute("a", 7, &register(1, 0xa, true)).status, 0);
        assert_eq!(d.execute("b", 8, &register(1, 0xb, true)).status, 0);
        assert_eq!(d.clear(), Ok(2));
        let pr = d.lu.pr_state();
        assert!(pr.registrations.is_empty() && pr.reservation.is_none());
        assert!(d.info().registrations.is_empty());
        // a's next command reports what happened to its registration.
        let tur = cmd(2, &[0, 0, 0, 0, 0, 0], vec![]);
        let o = d.execute("a", 7, &tur);
        assert_eq!((o.status, o.sense.get(12).copied()), (2, Some(0x2a)));
    }
}
