//! The backend process: connects to the file server (refusing to start if
//! it cannot open the disk there), listens for QEMU's vhost-user
//! connection and on the API socket, prints `ready`, serves one QEMU
//! connection and exits when QEMU goes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_share::client::{Client, ClientConfig, ClientError};
use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{Counters, ScsiDevice};

/// The longest API request line accepted.
const MAX_LINE: u64 = 4096;
/// Default time commands wait for a file server that went away: under
/// Linux's 30 s SCSI command timeout, so the guest sees the failure
/// before its own error handling starts.
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(20);
/// A connection with a command unanswered this long is dropped and made
/// again.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where QEMU connects (vhost-user).
    pub socket: PathBuf,
    /// The file server, `host:port`.
    pub server: String,
    /// The disk's path on the file server.
    pub disk: String,
    /// This VM's initiator name (VM and host).
    pub initiator: String,
    pub api_socket: Option<PathBuf>,
    pub reconnect_for: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot reach the shared disk {disk} on {server}")]
    Connect {
        server: String,
        disk: String,
        #[source]
        source: ClientError,
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
}

/// What the API's `info` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub initiator: String,
    pub server: String,
    pub disk: String,
    pub server_epoch: u64,
    pub blocks: u64,
    pub in_flight: usize,
    pub counters: Counters,
    pub tunnel_commands: u64,
    pub reconnects: u64,
    pub resent: u64,
    pub replayed: u64,
    pub failed: u64,
    /// Round trips of the latest PERSISTENT RESERVE OUT commands (µs).
    pub prout_latencies_us: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Info(Box<Info>),
    Error { message: String },
}

pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    let client = Client::connect(ClientConfig {
        server: cfg.server.clone(),
        disk: cfg.disk.clone(),
        initiator: cfg.initiator.clone(),
        reconnect_for: cfg.reconnect_for,
        command_timeout: COMMAND_TIMEOUT,
    })
    .map_err(|source| ServerError::Connect {
        server: cfg.server.clone(),
        disk: cfg.disk.clone(),
        source,
    })?;
    let dev = Arc::new(ScsiDevice::new(
        client,
        cfg.reconnect_for + Duration::from_secs(5),
    ));

    let _ = std::fs::remove_file(&cfg.socket);
    let mut listener = Listener::new(&cfg.socket, true).map_err(|e| ServerError::VhostListen {
        path: cfg.socket.clone(),
        message: e.to_string(),
    })?;
    if let Some(path) = &cfg.api_socket {
        let _ = std::fs::remove_file(path);
        let api = UnixListener::bind(path).map_err(|source| ServerError::Listen {
            path: path.clone(),
            source,
        })?;
        let dev = dev.clone();
        let cfg2 = cfg.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in api.incoming().flatten() {
                    let dev = dev.clone();
                    let cfg = cfg2.clone();
                    std::thread::spawn(move || serve_api(conn, &dev, &cfg));
                }
            })
            .map_err(|e| ServerError::Daemon(e.to_string()))?;
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    info!(socket = %cfg.socket.display(), server = %cfg.server, disk = %cfg.disk, initiator = %cfg.initiator, "vhost-user-scsi backend ready");

    let mut daemon = VhostUserDaemon::new(
        "vhost-scsi".into(),
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
    for p in [Some(&cfg.socket), cfg.api_socket.as_ref()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(p);
    }
    served
}

pub fn info(dev: &ScsiDevice, cfg: &ServerConfig) -> Info {
    let c = dev.client();
    let s = c.stats();
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Info {
        initiator: cfg.initiator.clone(),
        server: cfg.server.clone(),
        disk: cfg.disk.clone(),
        server_epoch: c.server_epoch(),
        blocks: c.geometry().blocks,
        in_flight: dev.in_flight(),
        counters: dev.counters(),
        tunnel_commands: l(&s.commands),
        reconnects: l(&s.reconnects),
        resent: l(&s.resent),
        replayed: l(&s.replayed),
        failed: l(&s.failed),
        prout_latencies_us: dev.prout_latencies_us(),
    }
}

fn serve_api(conn: UnixStream, dev: &ScsiDevice, cfg: &ServerConfig) {
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
        let complete = line.ends_with('\n');
        let resp = if !complete {
            Response::Error {
                message: "request line too long".into(),
            }
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::Info) => Response::Info(Box::new(info(dev, cfg))),
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
            }
        };
        let Ok(mut s) = serde_json::to_string(&resp) else {
            return;
        };
        s.push('\n');
        if writer.write_all(s.as_bytes()).is_err() || !complete {
            return;
        }
    }
}
