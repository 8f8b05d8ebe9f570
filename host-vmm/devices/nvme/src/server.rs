//! The NVMe device server process: the physical function and its virtual
//! functions, each on its own vfio-user socket, and a JSON-lines API.
//!
//! This process plays the SR-IOV adapter: it lives as long as the host
//! wants the device, independent of any VM. Enabling VFs (through the PF's
//! SR-IOV capability, from the API or from a guest that owns the PF)
//! creates a socket per VF that `tandem device attach` hot-plugs into a
//! VM; disabling them makes the VFs vanish (reads return all-ones, as a
//! removed function does). A socket serves one QEMU connection at a time
//! and is offered again when that connection ends (hot-remove, VM exit).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tandem_pci::sriov;
use tandem_vfio_server::{DmaSpace, Listener, PciFunction};
use tracing::{info, warn};

use crate::backend::{BlockBackend, OpenError};
use crate::ctrl::{Controller, HostPolicy, Params};
use crate::function::{
    config_space, description, ConfigPolicy, FunctionInfo, Notice, NvmeFunction, PolicyError, Role,
    MAX_IO_QUEUES, MSIX_VECTORS,
};
use tandem_cfgpolicy::{AuditLog, AuditRecord, Description};

/// Audit records kept (the oldest go first; the API reports how many).
const AUDIT_CAPACITY: usize = 4096;

const MAX_LINE: u64 = 64 * 1024;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the sockets go: `pf.sock`, `vf<N>.sock`, `api.sock`.
    pub dir: PathBuf,
    /// The PF's namespace (optional: a PF may carry none).
    pub pf_disk: Option<PathBuf>,
    /// One disk per VF; their number is TotalVFs.
    pub vf_disks: Vec<PathBuf>,
    /// Serial number prefix; functions append `-PF` / `-VF<n>`.
    pub serial: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Disk(#[from] OpenError),
    #[error("at most {max} VFs (got {got} --vf-disk)")]
    TooManyVfs { max: usize, got: usize },
    #[error("cannot create socket directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad PCI layout: {0}")]
    Layout(#[from] tandem_pci::BuildError),
    #[error("config-space policy: {0}")]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Vfio(#[from] tandem_vfio_server::ServeError),
}

/// Requests on `api.sock`, one JSON object per line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Info,
    /// Sets NumVFs and VF Enable in the PF's SR-IOV capability (0 disables).
    SetVfs {
        count: u16,
    },
    /// The host policy of one function (`vf` 0 is the PF).
    SetPolicy {
        vf: u16,
        policy: HostPolicy,
    },
    /// Config-space audit records with a sequence number above `since`.
    Audit {
        #[serde(default)]
        since: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditReport {
    pub records: Vec<AuditRecord>,
    /// Records lost because the log was full.
    pub dropped: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub total_vfs: u16,
    pub pf_socket: PathBuf,
    pub pf: serde_json::Value,
    /// Enabled VFs: number, socket, state.
    pub vfs: Vec<VfInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VfInfo {
    pub vf: u16,
    pub socket: PathBuf,
    /// A VM has mapped its memory for this VF (it is attached).
    pub connected: bool,
    pub function: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Info(Box<DeviceInfo>),
    Audit(Box<AuditReport>),
    Ok,
    Error { message: String },
}

type Shared = Arc<Mutex<NvmeFunction>>;

fn lock(m: &Mutex<NvmeFunction>) -> std::sync::MutexGuard<'_, NvmeFunction> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Vf {
    func: Shared,
    socket: PathBuf,
    enabled: Arc<AtomicBool>,
    dma: Arc<DmaSpace>,
}

struct Device {
    cfg: ServerConfig,
    pf: Shared,
    vf_description: Arc<Description>,
    audit: Arc<Mutex<AuditLog>>,
    vf_disks: Vec<Arc<dyn BlockBackend>>,
    vfs: BTreeMap<u16, Vf>,
}

pub fn pf_socket(dir: &Path) -> PathBuf {
    dir.join("pf.sock")
}
pub fn vf_socket(dir: &Path, vf: u16) -> PathBuf {
    dir.join(format!("vf{vf}.sock"))
}
pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

fn params(cfg: &ServerConfig, role: Role) -> Params {
    let (id, suffix) = match role {
        Role::Pf => (1, "PF".to_string()),
        Role::Vf(n) => (1 + n, format!("VF{n}")),
    };
    Params {
        controller_id: id,
        serial: format!("{}-{suffix}", cfg.serial),
        model: "Tandem SR-IOV NVMe".into(),
        firmware: env!("CARGO_PKG_VERSION").into(),
        max_io_queues: MAX_IO_QUEUES,
        msix_vectors: MSIX_VECTORS,
    }
}

/// Serves `func` on `socket`, one QEMU connection after another, while
/// `enabled` holds.
fn serve_loop(func: Shared, socket: PathBuf, dma: Arc<DmaSpace>, enabled: Arc<AtomicBool>) {
    while enabled.load(Ordering::SeqCst) {
        let _ = std::fs::remove_file(&socket);
        let listener = match Listener::bind(&socket, func.clone(), dma.clone()) {
            Ok(l) => l,
            Err(e) => {
                warn!(socket = %socket.display(), error = %e, "cannot offer the function");
                return;
            }
        };
        info!(socket = %socket.display(), "function offered");
        let r = listener.serve();
        // The connection ended (hot-remove, VM exit, or a dead client):
        // the function is reset as the bus would reset it.
        lock(&func).reset();
        dma.clear();
        match r {
            Ok(()) => info!(socket = %socket.display(), "client disconnected"),
            Err(e) => info!(socket = %socket.display(), error = %e, "connection ended"),
        }
    }
    let _ = std::fs::remove_file(&socket);
}

impl Device {
    fn set_vfs(&mut self, enable: bool, count: u16) {
        let total = self.vf_disks.len() as u16;
        let want = if enable { count.min(total) } else { 0 };
        // Remove VFs above the new count.
        let gone: Vec<u16> = self.vfs.keys().copied().filter(|n| *n > want).collect();
        for n in gone {
            if let Some(vf) = self.vfs.remove(&n) {
                vf.enabled.store(false, Ordering::SeqCst);
                lock(&vf.func).remove();
                // Wake a listener waiting for a client so its thread ends
                // (with a client connected, this connection just waits in
                // the backlog and goes away with the socket).
                let _ = UnixStream::connect(&vf.socket);
                let _ = std::fs::remove_file(&vf.socket);
                info!(vf = n, "VF disabled");
            }
        }
        for n in 1..=want {
            if self.vfs.contains_key(&n) {
                continue;
            }
            let role = Role::Vf(n);
            let config = match config_space(role, 0) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "VF layout");
                    continue;
                }
            };
            let policy = match ConfigPolicy::bind(
                self.vf_description.clone(),
                &config,
                &self.device_name(),
                role,
                self.audit.clone(),
            ) {
                Ok(p) => p,
                Err(e) => {
                    warn!(vf = n, error = %e, "VF config-space policy");
                    continue;
                }
            };
            let dma = Arc::new(DmaSpace::new());
            let disk = self.vf_disks[usize::from(n - 1)].clone();
            let ctrl = Controller::new(params(&self.cfg, role), vec![disk]);
            let mut f = NvmeFunction::new(role, config, dma.clone(), ctrl, None);
            f.set_config_policy(policy);
            let func = Arc::new(Mutex::new(f));
            let socket = vf_socket(&self.cfg.dir, n);
            let enabled = Arc::new(AtomicBool::new(true));
            {
                let (f, s, e, d) = (func.clone(), socket.clone(), enabled.clone(), dma.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("vf{n}"))
                    .spawn(move || serve_loop(f, s, d, e));
                if let Err(e) = spawned {
                    warn!(vf = n, error = %e, "cannot start the VF thread");
                    continue;
                }
            }
            info!(vf = n, socket = %socket.display(), "VF enabled");
            self.vfs.insert(
                n,
                Vf {
                    func,
                    socket,
                    enabled,
                    dma,
                },
            );
        }
    }

    fn device_name(&self) -> String {
        self.cfg
            .dir
            .file_name()
            .map_or_else(|| "nvme".into(), |n| n.to_string_lossy().into_owned())
    }

    fn info(&self) -> DeviceInfo {
        let to_json = |i: FunctionInfo| serde_json::to_value(i).unwrap_or_default();
        DeviceInfo {
            total_vfs: self.vf_disks.len() as u16,
            pf_socket: pf_socket(&self.cfg.dir),
            pf: to_json(lock(&self.pf).info()),
            vfs: self
                .vfs
                .iter()
                .map(|(n, vf)| VfInfo {
                    vf: *n,
                    socket: vf.socket.clone(),
                    connected: vf.dma.memory().is_some(),
                    function: to_json(lock(&vf.func).info()),
                })
                .collect(),
        }
    }
}

fn dev_lock(m: &Mutex<Device>) -> std::sync::MutexGuard<'_, Device> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the device server until killed. Prints `ready` once the PF and API
/// sockets listen.
pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    const MAX_VFS: usize = 64;
    if cfg.vf_disks.len() > MAX_VFS {
        return Err(ServerError::TooManyVfs {
            max: MAX_VFS,
            got: cfg.vf_disks.len(),
        });
    }
    std::fs::create_dir_all(&cfg.dir).map_err(|source| ServerError::Dir {
        path: cfg.dir.clone(),
        source,
    })?;
    let open = |p: &PathBuf| -> Result<Arc<dyn BlockBackend>, ServerError> {
        Ok(crate::backend::open(p)?)
    };
    let pf_ns = cfg
        .pf_disk
        .iter()
        .map(open)
        .collect::<Result<Vec<_>, _>>()?;
    let vf_disks = cfg
        .vf_disks
        .iter()
        .map(open)
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx): (Sender<Notice>, Receiver<Notice>) = channel();
    let pf_dma = Arc::new(DmaSpace::new());
    // The descriptions are checked against the real layouts before any
    // socket is offered: a bad description stops the server, naming the
    // register.
    let audit = Arc::new(Mutex::new(AuditLog::new(AUDIT_CAPACITY)));
    let pf_config = config_space(Role::Pf, vf_disks.len() as u16)?;
    let device_name = cfg
        .dir
        .file_name()
        .map_or_else(|| "nvme".into(), |n| n.to_string_lossy().into_owned());
    let pf_policy = ConfigPolicy::bind(
        description(Role::Pf)?,
        &pf_config,
        &device_name,
        Role::Pf,
        audit.clone(),
    )?;
    let vf_description = description(Role::Vf(1))?;
    ConfigPolicy::bind(
        vf_description.clone(),
        &config_space(Role::Vf(1), 0)?,
        &device_name,
        Role::Vf(1),
        audit.clone(),
    )?;
    let mut pf_func = NvmeFunction::new(
        Role::Pf,
        pf_config,
        pf_dma.clone(),
        Controller::new(params(&cfg, Role::Pf), pf_ns),
        Some(tx),
    );
    pf_func.set_config_policy(pf_policy);
    let pf = Arc::new(Mutex::new(pf_func));
    let api_path = api_socket(&cfg.dir);
    let _ = std::fs::remove_file(&api_path);
    let api = UnixListener::bind(&api_path).map_err(|source| ServerError::Listen {
        path: api_path.clone(),
        source,
    })?;
    let dev = Arc::new(Mutex::new(Device {
        cfg: cfg.clone(),
        pf: pf.clone(),
        vf_description,
        audit,
        vf_disks,
        vfs: BTreeMap::new(),
    }));
    {
        let dev = dev.clone();
        std::thread::Builder::new()
            .name("sriov".into())
            .spawn(move || {
                for n in rx {
                    let Notice::Sriov { vf_enable, num_vfs } = n;
                    dev_lock(&dev).set_vfs(vf_enable, num_vfs);
                }
            })
            .map_err(|source| ServerError::Listen {
                path: api_path.clone(),
                source,
            })?;
    }
    {
        let dev = dev.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in api.incoming().flatten() {
                    let dev = dev.clone();
                    std::thread::spawn(move || serve_api(conn, &dev));
                }
            })
            .map_err(|source| ServerError::Listen {
                path: api_path.clone(),
                source,
            })?;
    }
    let pf_path = pf_socket(&cfg.dir);
    let enabled = Arc::new(AtomicBool::new(true));
    println!("ready");
    let _ = std::io::stdout().flush();
    info!(dir = %cfg.dir.display(), total_vfs = cfg.vf_disks.len(), "NVMe device server ready");
    serve_loop(pf, pf_path, pf_dma, enabled);
    Ok(())
}

fn serve_api(conn: UnixStream, dev: &Mutex<Device>) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(Request::Info) => Response::Info(Box::new(dev_lock(dev).info())),
            Ok(Request::SetVfs { count }) => set_vfs(dev, count),
            Ok(Request::Audit { since }) => {
                let audit = dev_lock(dev).audit.clone();
                let log = audit.lock().unwrap_or_else(|p| p.into_inner());
                Response::Audit(Box::new(AuditReport {
                    records: log.since(since),
                    dropped: log.dropped(),
                }))
            }
            Ok(Request::SetPolicy { vf, policy }) => {
                let d = dev_lock(dev);
                let f = if vf == 0 {
                    Some(d.pf.clone())
                } else {
                    d.vfs.get(&vf).map(|v| v.func.clone())
                };
                drop(d);
                match f {
                    Some(f) => {
                        lock(&f).set_policy(policy);
                        Response::Ok
                    }
                    None => Response::Error {
                        message: format!("VF {vf} is not enabled"),
                    },
                }
            }
        };
        let mut s = serde_json::to_string(&resp).unwrap_or_default();
        s.push('\n');
        if writer.write_all(s.as_bytes()).is_err() {
            return;
        }
    }
}

/// The host programs the PF's SR-IOV capability the way a PF driver would.
fn set_vfs(dev: &Mutex<Device>, count: u16) -> Response {
    let (pf, total) = {
        let d = dev_lock(dev);
        (d.pf.clone(), d.vf_disks.len() as u16)
    };
    if count > total {
        return Response::Error {
            message: format!("{count} VFs asked; this device has {total} (one per --vf-disk)"),
        };
    }
    let mut f = lock(&pf);
    let Some(at) = f.config().sriov_cap() else {
        return Response::Error {
            message: "this device has no VFs (start it with --vf-disk)".into(),
        };
    };
    // VF Enable must be clear while NumVFs changes. The host is the PF's
    // driver here: its writes are not the guest's, no policy applies.
    f.host_config_write(at + sriov::CONTROL, &0u16.to_le_bytes());
    if count > 0 {
        f.host_config_write(at + sriov::NUM_VFS, &count.to_le_bytes());
        let ctl = sriov::CTL_VF_ENABLE | sriov::CTL_VF_MSE;
        f.host_config_write(at + sriov::CONTROL, &ctl.to_le_bytes());
    }
    drop(f);
    // The notice is handled on the sriov thread; wait until it is seen.
    for _ in 0..200 {
        if dev_lock(dev).vfs.len() == usize::from(count) {
            return Response::Ok;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Response::Error {
        message: "VFs did not come up in time".into(),
    }
}
