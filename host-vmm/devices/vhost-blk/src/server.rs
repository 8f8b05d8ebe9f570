//! The backend process: opens the chain, listens for QEMU's vhost-user
//! connection and on the API socket, prints `ready`, serves one QEMU
//! connection, and on disconnect flushes and closes the chain cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_disk::{Chain, ChainOptions};
use tandem_volume::Lending;
use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use crate::device::GuestMemoryMmap;

use crate::api::{Info, LayerInfo, LendingInfo, Request, Response};
use crate::device::BlkDevice;

/// The longest API request line accepted.
const MAX_LINE: u64 = 4096;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where QEMU connects (vhost-user).
    pub socket: PathBuf,
    /// The top of the disk chain.
    pub disk: PathBuf,
    pub readonly: bool,
    pub api_socket: Option<PathBuf>,
    /// The `GET_ID` answer; default: `tandem-` and the disk's file stem.
    pub serial: Option<String>,
    /// Lends the disk to a second path (an NVMe function's namespace in
    /// the device server) on this socket (`tandem-volume`).
    pub volume_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {message}")]
    VhostListen { path: PathBuf, message: String },
    #[error("vhost-user: {0}")]
    Daemon(String),
    #[error("cannot flush and close the disk {path} after QEMU left")]
    Flush {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
}

pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    let chain = Chain::open(
        &cfg.disk,
        ChainOptions {
            writable: !cfg.readonly,
            ..Default::default()
        },
    )
    .map_err(|source| ServerError::Disk {
        path: cfg.disk.clone(),
        source,
    })?;
    let serial = cfg.serial.clone().unwrap_or_else(|| {
        let stem = cfg
            .disk
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("tandem-{stem}")
    });
    let dev = Arc::new(BlkDevice::new(Arc::new(chain), cfg.readonly, &serial));

    let _ = std::fs::remove_file(&cfg.socket);
    let mut listener = Listener::new(&cfg.socket, true).map_err(|e| ServerError::VhostListen {
        path: cfg.socket.clone(),
        message: e.to_string(),
    })?;
    let lending = match &cfg.volume_socket {
        Some(path) => Some(Arc::new(tandem_volume::listen(path, dev.clone()).map_err(
            |source| ServerError::Listen {
                path: path.clone(),
                source,
            },
        )?)),
        None => None,
    };
    if let Some(l) = &lending {
        dev.lend_through(l);
    }
    if let Some(path) = &cfg.api_socket {
        let _ = std::fs::remove_file(path);
        let api = UnixListener::bind(path).map_err(|source| ServerError::Listen {
            path: path.clone(),
            source,
        })?;
        let dev = dev.clone();
        let lending = lending.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in api.incoming().flatten() {
                    let dev = dev.clone();
                    let lending = lending.clone();
                    std::thread::spawn(move || serve_api(conn, &dev, lending.as_deref()));
                }
            })
            .map_err(|e| ServerError::Daemon(e.to_string()))?;
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    info!(socket = %cfg.socket.display(), disk = %cfg.disk.display(), "vhost-user-blk backend ready");

    let mut daemon = VhostUserDaemon::new(
        "vhost-blk".into(),
        dev.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| ServerError::Daemon(e.to_string()))?;
    let served = match daemon.start(&mut listener).and_then(|()| daemon.wait()) {
        // QEMU closing the connection is how a VM ends.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ServerError::Daemon(e.to_string())),
    };
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    match &served {
        Ok(()) => info!("QEMU disconnected; the backend stops"),
        Err(e) => warn!(error = %e, "the vhost-user connection failed"),
    }
    // Whatever happened, what the guest wrote is made durable and the
    // chain is closed cleanly.
    let flushed = dev.close().map_err(|source| ServerError::Flush {
        path: cfg.disk.clone(),
        source,
    });
    if let Some(l) = &lending {
        l.withdraw();
    }
    for p in [Some(&cfg.socket), cfg.api_socket.as_ref()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(p);
    }
    served.and(flushed)
}

/// The answer to one API request.
pub fn answer(dev: &BlkDevice, lending: Option<&Lending>, req: Request) -> Response {
    match req {
        Request::Info => {
            let g = dev.geometry();
            let chain = dev
                .layers()
                .into_iter()
                .enumerate()
                .map(|(i, (path, format))| LayerInfo {
                    path: path.display().to_string(),
                    format,
                    sealed: i > 0,
                })
                .collect();
            Response::Info(Box::new(Info {
                chain,
                capacity_bytes: g.sectors * crate::request::SECTOR_SIZE,
                blk_size: g.blk_size,
                readonly: g.readonly,
                counters: dev.counters(),
                last_error: dev.last_error(),
                lending: lending.map(|l| LendingInfo {
                    socket: l.path().display().to_string(),
                    stats: l.stats(),
                }),
            }))
        }
        Request::Fence { wait_ms } => match lending {
            None => lends_nothing(),
            Some(l) => match l.fence(Duration::from_millis(u64::from(wait_ms))) {
                Ok(f) => Response::Fenced {
                    closed: f.closed,
                    waited_us: f.waited_us,
                },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
        },
        Request::Unfence => match lending {
            None => lends_nothing(),
            Some(l) => {
                l.unfence();
                Response::Unfenced
            }
        },
        Request::Checkpoint => {
            let start = Instant::now();
            match dev.checkpoint() {
                Ok(sealed) => Response::Checkpoint {
                    sealed: sealed.display().to_string(),
                    elapsed_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                },
                Err(e) => Response::Error {
                    message: error_chain(&e),
                },
            }
        }
    }
}

fn lends_nothing() -> Response {
    Response::Error {
        message: "this backend lends no volume (no --volume-socket)".into(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn serve_api(conn: UnixStream, dev: &BlkDevice, lending: Option<&Lending>) {
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
        if !line.ends_with('\n') {
            let _ = respond(
                &mut writer,
                &Response::Error {
                    message: "request line too long".into(),
                },
            );
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(dev, lending, req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        if respond(&mut writer, &resp).is_err() {
            return;
        }
    }
}

fn respond(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_string(r).map_err(std::io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes())
}
