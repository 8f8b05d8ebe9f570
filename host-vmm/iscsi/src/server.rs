//! The TCP plumbing: a thread per connection reading and writing PDUs for
//! a [`Connection`], and the reservation state files (APTPL) written with
//! a temporary file, fsync and rename before the PERSISTENT RESERVE OUT
//! status goes out.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_disk::{BlockDevice, Chain, ChainOptions};
use tandem_scsi::pr::{SavedPr, SAVED_PR_VERSION};
use tandem_scsi::{LogicalUnit, LuConfig, PrState, Target};
use tracing::{debug, error, info, warn};

use crate::conn::{Connection, Output, TargetInfo};
use crate::pdu::{Digests, Pdu, PduError, BHS_LEN};
use crate::text::OUR_MAX_RECV;

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a new connection has to finish its login.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot open disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
    #[error("reservation state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("LUN {0} given twice")]
    DuplicateLun(u16),
    #[error("accept failed")]
    Accept(#[source] io::Error),
}

/// One LUN to serve from a disk file (a tandem-disk chain top).
#[derive(Debug, Clone)]
pub struct LunSpec {
    pub lun: u16,
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub iqn: String,
    pub luns: Vec<LunSpec>,
    /// Where each LUN's reservation state file lives.
    pub state_dir: PathBuf,
}

/// A logical unit with the file its reservation state is saved to.
pub struct Lun {
    pub lu: Arc<LogicalUnit>,
    pub state_file: Option<PathBuf>,
    save: Mutex<()>,
}

impl Lun {
    pub fn new(lu: Arc<LogicalUnit>, state_file: Option<PathBuf>) -> Lun {
        Lun {
            lu,
            state_file,
            save: Mutex::new(()),
        }
    }

    /// Saves the current state (not the one the command saw: a later
    /// change may already be in, and the newest state is what must last).
    fn save(&self) -> io::Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let _g = self.save.lock().unwrap_or_else(|e| e.into_inner());
        let saved = SavedPr {
            version: SAVED_PR_VERSION,
            state: self.lu.pr_state(),
        };
        write_atomic(
            path,
            &serde_json::to_vec_pretty(&saved).map_err(io::Error::other)?,
        )
    }
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

/// Reads a saved state file; a missing file is a fresh unit.
pub fn load_state(path: &Path) -> Result<PrState, ServerError> {
    let err = |source| ServerError::State {
        path: path.to_path_buf(),
        source,
    };
    match fs::read(path) {
        Ok(b) => {
            let saved: SavedPr =
                serde_json::from_slice(&b).map_err(|e| err(io::Error::other(e)))?;
            saved.restore().map_err(|e| err(io::Error::other(e)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PrState::default()),
        Err(e) => Err(err(e)),
    }
}

pub struct Server {
    listener: TcpListener,
    info: Arc<TargetInfo>,
    target: Arc<Target>,
    luns: Arc<HashMap<u16, Lun>>,
}

impl Server {
    /// Opens the disks, restores their reservation state and listens.
    pub fn open(cfg: &ServerConfig) -> Result<Server, ServerError> {
        fs::create_dir_all(&cfg.state_dir).map_err(|source| ServerError::State {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let mut luns = Vec::new();
        for spec in &cfg.luns {
            if luns.iter().any(|(n, _): &(u16, Lun)| *n == spec.lun) {
                return Err(ServerError::DuplicateLun(spec.lun));
            }
            let chain = Chain::open(
                &spec.path,
                ChainOptions {
                    writable: !spec.read_only,
                    ..Default::default()
                },
            )
            .map_err(|source| ServerError::Disk {
                path: spec.path.clone(),
                source,
            })?;
            let disk: Arc<dyn BlockDevice> = Arc::new(chain);
            let state_file = cfg.state_dir.join(format!("lun{}.pr.json", spec.lun));
            let state = load_state(&state_file)?;
            if !state.registrations.is_empty() {
                info!(
                    lun = spec.lun,
                    registrations = state.registrations.len(),
                    "restored persistent reservations"
                );
            }
            let stem = spec
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let lu = LogicalUnit::new(
                disk,
                LuConfig {
                    serial: format!("{}-{}", stem.chars().take(24).collect::<String>(), spec.lun),
                    read_only: spec.read_only,
                    unmap: !spec.read_only,
                },
                state,
            );
            luns.push((spec.lun, Lun::new(Arc::new(lu), Some(state_file))));
        }
        let listener = TcpListener::bind(cfg.listen).map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
        Ok(Server::new(listener, &cfg.iqn, luns))
    }

    /// A server over ready-made logical units (tests use in-memory disks).
    pub fn new(listener: TcpListener, iqn: &str, luns: Vec<(u16, Lun)>) -> Server {
        let portal = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut target = Target::new();
        for (n, l) in &luns {
            target.add_lun(*n, l.lu.clone());
        }
        Server {
            listener,
            info: Arc::new(TargetInfo {
                iqn: iqn.to_string(),
                portal,
                tpgt: 1,
            }),
            target: Arc::new(target),
            luns: Arc::new(luns.into_iter().collect()),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the listener fails.
    pub fn run(self) -> Result<(), ServerError> {
        info!(iqn = %self.info.iqn, portal = %self.info.portal, luns = self.luns.len(), "iscsi target listening");
        let active = Arc::new(AtomicUsize::new(0));
        loop {
            let (stream, peer) = self.listener.accept().map_err(ServerError::Accept)?;
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                warn!(%peer, "too many connections; closing the new one");
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let conn = Connection::new(self.info.clone(), self.target.clone());
            let luns = self.luns.clone();
            let count = active.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("iscsi {peer}"))
                .spawn(move || {
                    debug!(%peer, "connection");
                    if let Err(e) = serve(stream, conn, &luns) {
                        debug!(%peer, error = %e, "connection ended");
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::SeqCst);
            }
            if let Err(e) = spawned {
                error!(error = %e, "cannot start a connection thread");
            }
        }
    }
}

fn send(w: &mut impl Write, out: &Output, d: Digests) -> io::Result<()> {
    for p in &out.pdus {
        w.write_all(&p.encode(d))?;
    }
    w.flush()
}

/// Runs one connection to its end.
pub fn serve(stream: TcpStream, mut conn: Connection, luns: &HashMap<u16, Lun>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // A peer that never finishes its login does not keep a thread.
    stream.set_read_timeout(Some(LOGIN_TIMEOUT))?;
    let mut r = stream.try_clone()?;
    let mut w = BufWriter::new(stream);
    let mut buf = Vec::new();
    loop {
        let mut bhs = [0u8; BHS_LEN];
        match r.read_exact(&mut bhs) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let d = conn.digests();
        let (_, dsl) = Pdu::rest_len(&bhs);
        if dsl > OUR_MAX_RECV as usize {
            warn!(dsl, "data segment longer than declared; closing");
            return Ok(());
        }
        let total = Pdu::frame_len(&bhs, d);
        buf.clear();
        buf.extend_from_slice(&bhs);
        buf.resize(total, 0);
        r.read_exact(&mut buf[BHS_LEN..])?;
        let was_logged_in = conn.logged_in();
        let out = match Pdu::decode(&buf, d, OUR_MAX_RECV as usize) {
            Ok((pdu, _)) => conn.handle(pdu),
            Err(PduError::DataDigest) => conn.data_digest_error(bhs),
            Err(e) => {
                warn!(error = %e, "bad PDU; closing the connection");
                return Ok(());
            }
        };
        for n in &out.persist {
            if let Some(l) = luns.get(n) {
                if let Err(e) = l.save() {
                    // The status must not claim a persistence that failed.
                    error!(lun = n, error = %e, "cannot save reservation state; closing");
                    return Err(e);
                }
            }
        }
        send(&mut w, &out, d)?;
        if out.close {
            return Ok(());
        }
        if !was_logged_in && conn.logged_in() {
            // Logged in: idle sessions are the initiator's business.
            r.set_read_timeout(None)?;
        }
    }
}
