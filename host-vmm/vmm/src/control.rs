//! Supervising the control device server, a child partition.
//!
//! The control device is served by its own process (`tandem device-server
//! control`). When it dies, for whatever reason, the VM keeps running and
//! this supervisor replaces the device: QEMU's vfio-user client cannot
//! reconnect to a new server, so the old device is hot-removed (the guest
//! sees a surprise removal), a new server starts with the next session
//! number, and a new device is hot-added (the guest's driver probes it and
//! renegotiates).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use shared_abi::VersionRange;
use tandem_api::channel::ServerStatus;
use tandem_api::VmState;
use tandem_control_device::api::{Request, Response};
use tandem_engine::root_port_id;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::vm::Vm;

/// The QEMU id of the control device.
pub const CONTROL_ID: &str = "tandem-ctl";
/// How long a new server may take to say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the guest may take to release the old device.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts to replace a dead server before giving up.
const MAX_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot start the control device server")]
    Spawn(#[source] std::io::Error),
    #[error("the control device server did not become ready: {0}")]
    NotReady(String),
    #[error("the control device server does not answer")]
    Unreachable(#[source] std::io::Error),
    #[error("the control device server sent a bad answer: {0}")]
    BadAnswer(String),
}

pub struct ControlServer {
    exe: PathBuf,
    dir: PathBuf,
    range: VersionRange,
    status: Mutex<ServerStatus>,
    /// Removed on purpose (before a snapshot): do not replace it.
    parked: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ControlServer {
    /// `exe` is the tandem binary (it has the `device-server` command);
    /// `dir` holds the server's sockets.
    pub fn new(exe: PathBuf, dir: PathBuf, range: VersionRange) -> ControlServer {
        ControlServer {
            exe,
            dir,
            range,
            status: Mutex::new(ServerStatus {
                pid: None,
                session: 0,
                restarts: 0,
                state: "starting".into(),
                last_exit: None,
                last_error: None,
            }),
            parked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The ABI versions it speaks.
    pub fn range(&self) -> VersionRange {
        self.range
    }

    /// The device is being removed on purpose: its server's exit is not a
    /// death to repair.
    pub fn park(&self) {
        self.parked.store(true, std::sync::atomic::Ordering::SeqCst);
        self.set_state("parked");
    }

    pub fn is_parked(&self) -> bool {
        self.parked.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn vfio_socket(&self) -> PathBuf {
        self.dir.join("control.vfio")
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("control.api")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device as QEMU's `-device`/`device_add` JSON.
    pub fn device_json(&self) -> Value {
        json!({
            "driver": "vfio-user-pci",
            "id": CONTROL_ID,
            "bus": root_port_id(0),
            "socket": {"type": "unix", "path": self.vfio_socket().display().to_string()},
        })
    }

    pub fn status(&self) -> ServerStatus {
        lock(&self.status).clone()
    }

    fn set_state(&self, state: &str) {
        lock(&self.status).state = state.into();
    }

    /// Starts a server with the next session number and waits for `ready`.
    pub async fn spawn(&self) -> Result<Child, ControlError> {
        std::fs::create_dir_all(&self.dir).map_err(ControlError::Spawn)?;
        for p in [self.vfio_socket(), self.api_socket()] {
            let _ = std::fs::remove_file(p);
        }
        let session = {
            let mut s = lock(&self.status);
            s.session = s.session.wrapping_add(1);
            s.session
        };
        let mut cmd = Command::new(&self.exe);
        cmd.arg("device-server")
            .arg("control")
            .arg("--vfio-socket")
            .arg(self.vfio_socket())
            .arg("--api-socket")
            .arg(self.api_socket())
            .arg("--session")
            .arg(session.to_string())
            .arg("--abi")
            .arg(format!("{}-{}", self.range.min, self.range.max))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: runs in the child between fork and exec; prctl(2) is
        // async-signal-safe and touches no parent memory.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(ControlError::Spawn)?;
        let Some(out) = child.stdout.take() else {
            return Err(ControlError::NotReady("no stdout".into()));
        };
        let mut lines = BufReader::new(out).lines();
        let first = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
        match first {
            Ok(Ok(Some(l))) if l.trim() == "ready" => {}
            Ok(Ok(other)) => {
                let _ = child.start_kill();
                return Err(ControlError::NotReady(format!("it said {other:?}")));
            }
            Ok(Err(e)) => return Err(ControlError::NotReady(e.to_string())),
            Err(_) => {
                let _ = child.start_kill();
                return Err(ControlError::NotReady(format!(
                    "nothing within {READY_TIMEOUT:?}"
                )));
            }
        }
        let mut s = lock(&self.status);
        s.pid = child.id();
        s.state = "running".into();
        info!(pid = s.pid, session, "control device server running");
        Ok(child)
    }

    /// One request to the server's API.
    pub async fn request(
        &self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ControlError> {
        let run = async {
            let mut s = UnixStream::connect(self.api_socket())
                .await
                .map_err(ControlError::Unreachable)?;
            let mut line =
                serde_json::to_string(req).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
            line.push('\n');
            s.write_all(line.as_bytes())
                .await
                .map_err(ControlError::Unreachable)?;
            let mut answer = String::new();
            BufReader::new(s)
                .read_line(&mut answer)
                .await
                .map_err(ControlError::Unreachable)?;
            if answer.is_empty() {
                return Err(ControlError::Unreachable(std::io::Error::other(
                    "connection closed",
                )));
            }
            serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(e.to_string()))
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| {
            ControlError::Unreachable(std::io::Error::other(format!(
                "no answer within {timeout:?}"
            )))
        })?
    }
}

/// Keeps the control device alive until the VM stops.
pub async fn supervise(server: Arc<ControlServer>, vm: Arc<Vm>, mut child: Child) {
    let mut state = vm.watch_state();
    loop {
        let status = tokio::select! {
            s = child.wait() => s,
            _ = state.wait_for(|s| *s == VmState::Stopped) => return,
        };
        let exit = match &status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        if matches!(vm.state(), VmState::ShuttingDown | VmState::Stopped) {
            return;
        }
        if server.is_parked() {
            info!(exit, "the control device was removed on purpose");
            return;
        }
        warn!(
            exit,
            "the control device server died; the VM keeps running, replacing the device"
        );
        {
            let mut s = lock(&server.status);
            s.last_exit = Some(exit);
            s.pid = None;
            s.state = "replacing".into();
        }
        match replace(&server, &vm).await {
            Ok(c) => {
                child = c;
                let mut s = lock(&server.status);
                s.restarts += 1;
                s.last_error = None;
                info!(
                    restarts = s.restarts,
                    session = s.session,
                    "control device replaced"
                );
            }
            Err(e) => {
                warn!(error = %e, "cannot replace the control device; the VM runs without it");
                let mut s = lock(&server.status);
                s.state = "failed".into();
                s.last_error = Some(e);
                return;
            }
        }
    }
}

async fn replace(server: &ControlServer, vm: &Vm) -> Result<Child, String> {
    // 1. Remove the dead device; the guest sees it go.
    remove_device(vm).await?;
    // 2. A new server, 3. a new device.
    plug(server, vm).await
}

/// Hot-removes the control device and waits until the guest has let it go
/// (already gone counts as done).
async fn remove_device(vm: &Vm) -> Result<(), String> {
    let mut events = vm.qmp().subscribe();
    match vm
        .qmp()
        .execute("device_del", Some(json!({"id": CONTROL_ID})))
        .await
    {
        Ok(_) => {}
        // Already gone (for example an earlier attempt removed it).
        Err(e) if e.to_string().contains("not found") => return Ok(()),
        Err(e) => return Err(format!("device_del: {e}")),
    }
    let gone = tokio::time::timeout(UNPLUG_TIMEOUT, async {
        while let Ok(ev) = events.recv().await {
            if ev.name == "DEVICE_DELETED"
                && ev.data.get("device").and_then(Value::as_str) == Some(CONTROL_ID)
            {
                return true;
            }
        }
        false
    })
    .await;
    if matches!(gone, Ok(true)) {
        Ok(())
    } else {
        Err(format!(
            "the guest did not release the control device within {UNPLUG_TIMEOUT:?}"
        ))
    }
}

/// Starts a new server and hot-adds a new device for it, retrying.
async fn plug(server: &ControlServer, vm: &Vm) -> Result<Child, String> {
    let mut last = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if matches!(vm.state(), VmState::ShuttingDown | VmState::Stopped) {
            return Err("the VM is stopping".into());
        }
        match server.spawn().await {
            Ok(child) => match vm
                .qmp()
                .execute("device_add", Some(server.device_json()))
                .await
            {
                Ok(_) => return Ok(child),
                Err(e) => last = format!("device_add: {e}"),
            },
            Err(e) => last = e.to_string(),
        }
        warn!(attempt, error = %last, "plugging the control device failed; retrying");
        server.set_state("replacing");
        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
    }
    Err(last)
}

/// Removes the control device on purpose (the guest releases it) and lets
/// its server end; the supervisor does not replace it.
pub async fn unplug(server: &ControlServer, vm: &Vm) -> Result<(), String> {
    server.park();
    remove_device(vm).await
}

/// Plugs a fresh control device back in (a new server, a new session) and
/// supervises it again.
pub async fn replug(server: Arc<ControlServer>, vm: Arc<Vm>) -> Result<(), String> {
    server
        .parked
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let child = plug(&server, &vm).await?;
    server.set_state("running");
    tokio::spawn(supervise(server, vm, child));
    Ok(())
}
