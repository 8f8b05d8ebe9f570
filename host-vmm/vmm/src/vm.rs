//! One running VM: the QEMU process, its QMP connection and the lifecycle.
//!
//! QEMU is started stopped (`-S`) with QMP on a socket pair (no path to
//! race for or leak), Tandem connects, checks, then `cont`s. The guest RAM
//! is a shared memfd so that device servers can map it. QEMU dies with
//! Tandem (parent-death signal): only Tandem holds its QMP socket, so an
//! orphan QEMU could never be managed again.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use tandem_api::{DiskInfo, EngineInfo, VmInfo, VmState};
use tandem_engine::{AccelChoice, DiskFormat, DiskInterface, Engine, MachineSpec, Serial};
use tandem_qmp::{Qmp, QmpError};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{serial_to_string, ResolvedVm};
use crate::control::ControlServer;
use crate::lifecycle::{self, Action, Ending, Lifecycle, LifecycleError, Observed};
use crate::vhost::VhostBackend;

/// The file descriptor number QEMU sees its QMP socket as.
const QMP_FD: i32 = 3;
/// How long QEMU may take to greet on QMP.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of QEMU's stderr kept for error reports.
const STDERR_TAIL: usize = 20;
/// Hot-plug root ports every machine gets.
pub(crate) const ROOT_PORTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start QEMU ({path})")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({status}):\n{stderr}")]
    EarlyExit { status: String, stderr: String },
    #[error("QEMU did not answer on QMP")]
    Qmp(#[source] QmpError),
    #[error("cannot set up the QMP socket")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("QEMU refused {command}")]
    Command {
        command: &'static str,
        #[source]
        source: QmpError,
    },
    #[error(transparent)]
    VhostBlk(#[from] crate::vhost::VhostError),
    #[error("restoring the machine state failed: {0}")]
    Restore(String),
}

/// What the API and the signal handlers share with the VM.
pub struct Vm {
    resolved: ResolvedVm,
    engine: Engine,
    accel: AccelChoice,
    pid: Option<u32>,
    started: Instant,
    qmp: Qmp,
    life: Mutex<Lifecycle>,
    state_tx: watch::Sender<VmState>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    control: Option<Arc<ControlServer>>,
    /// Functions hot-plugged through the API, by id.
    pub(crate) assigned: Mutex<std::collections::BTreeMap<String, tandem_api::AttachedDevice>>,
    /// Of those, the direct paths of guest volumes (F4), by id: the volume.
    pub(crate) direct_paths: Mutex<std::collections::BTreeMap<String, u32>>,
    /// Of the assigned functions, those whose namespace is one of this
    /// VM's disks through its volume socket, by id: the API sockets of
    /// those disks' backends (fenced before the function leaves).
    pub(crate) lenders: Mutex<std::collections::BTreeMap<String, Vec<std::path::PathBuf>>>,
    /// Set when the VM left by a snapshot or a migration (QEMU then
    /// quits): the migration URI (`file:PATH`, `tcp:HOST:PORT`).
    pub(crate) left_for: Mutex<Option<String>>,
    /// Serializes snapshots (and other whole-VM operations).
    pub(crate) busy: tokio::sync::Mutex<()>,
}

/// A started VM and the handle to wait for its end.
pub struct Running {
    pub vm: Arc<Vm>,
    child: Child,
    /// vhost-user-blk backends; stopped after QEMU.
    backends: Vec<VhostBackend>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The lifecycle is updated by whole-value transitions; a panic elsewhere
    // while holding the lock cannot leave it half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    /// Starts QEMU, negotiates QMP and lets the guest run.
    pub async fn start(
        resolved: ResolvedVm,
        engine: Engine,
        accel: AccelChoice,
        control: Option<Arc<ControlServer>>,
    ) -> Result<Running, VmError> {
        Self::start_from(resolved, engine, accel, control, None).await
    }

    /// Starts QEMU; with `incoming` (a migration URI, e.g. `file:PATH` of a
    /// snapshot) it restores the machine state from there instead of
    /// booting, then plugs the control device in (a saved VM has none:
    /// Tandem removes it before saving, QEMU cannot carry it).
    pub async fn start_from(
        resolved: ResolvedVm,
        engine: Engine,
        accel: AccelChoice,
        control: Option<Arc<ControlServer>>,
        incoming: Option<String>,
    ) -> Result<Running, VmError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(VmError::Socket)?;
        // vhost-user backends listen before QEMU starts: it connects while
        // it creates the devices.
        let backends = crate::vhost::start_all(
            &resolved.api_socket.with_extension("devices"),
            &resolved.disks,
            &resolved.shared_disks,
        )
        .await?;
        let spec = MachineSpec {
            name: resolved.name.clone(),
            accel: accel.accel,
            cpus: resolved.cpus,
            memory_mib: resolved.memory_mib,
            kernel: resolved.kernel.clone(),
            initrd: resolved.initrd.clone(),
            append: resolved.append.clone(),
            disks: resolved.disks.clone(),
            serial: resolved.serial.clone(),
            firmware_dirs: engine.firmware_dirs.clone(),
            qmp_fd: QMP_FD,
            // Port 0 holds the control device; the others are free for
            // hot-plugged functions.
            root_ports: ROOT_PORTS,
            devices: control
                .iter()
                .filter(|_| incoming.is_none())
                .map(|c| c.device_json())
                .chain(backends.iter().map(|b| b.device_json()))
                .collect(),
            chardevs: backends.iter().map(|b| b.chardev()).collect(),
            incoming: incoming.is_some(),
            log: Some(tandem_engine::qemu_log::path_for(&resolved.api_socket)),
        };
        if let Serial::Unix(p) = &resolved.serial {
            crate::socket::prepare(p).map_err(|e| VmError::Socket(std::io::Error::other(e)))?;
        }
        let args = spec.to_args();
        debug!(engine = %engine.path.display(), ?args, "starting QEMU");
        let mut cmd = Command::new(&engine.path);
        cmd.args(&args).stderr(Stdio::piped()).kill_on_drop(true);
        if resolved.serial == Serial::Stdio {
            cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
        } else {
            // Its own process group: a Ctrl-C at Tandem's terminal reaches
            // Tandem, which shuts the guest down properly.
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .process_group(0);
        }
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: OwnedFd::from(theirs),
            child_fd: QMP_FD,
        }])
        .map_err(|e| VmError::Socket(std::io::Error::other(e.to_string())))?;
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe; it touches no
        // memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
            path: engine.path.display().to_string(),
            source,
        })?;
        let pid = child.id();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    warn!(target: "qemu", "{line}");
                    let mut t = lock(&tail);
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }

        ours.set_nonblocking(true).map_err(VmError::Socket)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(VmError::Socket)?;
        let qmp = tokio::select! {
            r = Qmp::connect(stream, QMP_TIMEOUT) => r,
            status = child.wait() => {
                return Err(early_exit(status, &stderr_tail).await);
            }
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                // QEMU may have exited and closed the socket: report that.
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(early_exit(Ok(status), &stderr_tail).await);
                }
                return Err(VmError::Qmp(e));
            }
        };
        info!(version = %qmp.greeting().version, pid, "QEMU is up");

        let (state_tx, _) = watch::channel(VmState::Starting);
        let vm = Arc::new(Vm {
            resolved,
            engine,
            accel,
            pid,
            started: Instant::now(),
            qmp,
            life: Mutex::new(Lifecycle::new()),
            state_tx,
            stderr_tail,
            control,
            assigned: Mutex::new(Default::default()),
            direct_paths: Mutex::new(Default::default()),
            lenders: Mutex::new(Default::default()),
            left_for: Mutex::new(None),
            busy: tokio::sync::Mutex::new(()),
        });
        if let Some(uri) = &incoming {
            crate::snapshot::receive(&vm, uri).await?;
        }
        if let Err(source) = vm.qmp.execute("cont", None).await {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(early_exit(Ok(status), &vm.stderr_tail).await);
            }
            return Err(VmError::Command {
                command: "cont",
                source,
            });
        }
        vm.observe(Observed::Started).await;
        if let (Some(_), Some(c)) = (&incoming, &vm.control) {
            if let Err(source) = vm.qmp.execute("device_add", Some(c.device_json())).await {
                warn!(error = %source, "the restored VM runs without its control device");
            }
        }
        Ok(Running {
            vm,
            child,
            backends,
        })
    }

    pub fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn state(&self) -> VmState {
        lock(&self.life).state()
    }

    /// Watch the state change (the shutdown API waits on it).
    pub fn watch_state(&self) -> watch::Receiver<VmState> {
        self.state_tx.subscribe()
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The control device's supervisor, when the VM has one.
    pub fn control(&self) -> Option<&Arc<ControlServer>> {
        self.control.as_ref()
    }

    /// Applies an operator command and carries out its actions.
    pub async fn command(self: &Arc<Self>, cmd: lifecycle::Command) -> Result<(), VmError> {
        let actions = {
            let mut life = lock(&self.life);
            let a = life.command(cmd)?;
            let _ = self.state_tx.send(life.state());
            a
        };
        self.run_actions(actions).await?;
        // The STOP/RESUME events also arrive, but the caller wants the new
        // state in its answer, so record the command's effect now.
        match cmd {
            lifecycle::Command::Pause => self.observe(Observed::Stopped).await,
            lifecycle::Command::Resume => self.observe(Observed::Resumed).await,
            lifecycle::Command::Shutdown { .. } => {}
        }
        Ok(())
    }

    async fn observe(self: &Arc<Self>, what: Observed) {
        let actions = {
            let mut life = lock(&self.life);
            let a = life.observe(what);
            let _ = self.state_tx.send(life.state());
            a
        };
        if let Err(e) = self.run_actions(actions).await {
            warn!(error = %e, "lifecycle action failed");
        }
    }

    async fn run_actions(self: &Arc<Self>, actions: Vec<Action>) -> Result<(), VmError> {
        for action in actions {
            match action {
                Action::Qmp(command) => match self.qmp.execute(command, None).await {
                    Ok(_) => {}
                    // After `quit`, or once QEMU is gone, a closed socket is
                    // the expected answer.
                    Err(QmpError::Closed) if command == "quit" || self.qmp.is_closed() => {}
                    Err(source) => return Err(VmError::Command { command, source }),
                },
                Action::ArmShutdownTimer(after) => {
                    let vm = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        // Not through `observe`: that would make this future
                        // recursive. A timeout only ever leads to QMP commands.
                        let actions = {
                            let mut life = lock(&vm.life);
                            let a = life.observe(Observed::ShutdownTimeout);
                            let _ = vm.state_tx.send(life.state());
                            a
                        };
                        for action in actions {
                            if let Action::Qmp(command) = action {
                                warn!(command, "the guest ignored the power button; stopping it");
                                let _ = vm.qmp.execute(command, None).await;
                            }
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Where the VM went (a snapshot's `file:PATH`, a migration's
    /// `tcp:HOST:PORT`), if it left.
    pub fn left_for(&self) -> Option<String> {
        lock(&self.left_for).clone()
    }

    /// The configuration it runs.
    pub fn resolved(&self) -> &ResolvedVm {
        &self.resolved
    }

    pub fn graceful(&self) -> bool {
        lock(&self.life).graceful()
    }

    pub fn info(&self) -> VmInfo {
        let r = &self.resolved;
        VmInfo {
            name: r.name.clone(),
            state: self.state(),
            accel: self.accel.accel,
            accel_reason: self.accel.reason.clone(),
            engine: EngineInfo {
                path: self.engine.path.display().to_string(),
                version: self.engine.version,
                package: self.engine.package.clone(),
                origin: self.engine.origin.clone(),
                pid: self.pid,
            },
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            kernel: r.kernel.display().to_string(),
            initrd: r.initrd.as_ref().map(|p| p.display().to_string()),
            append: r.append.clone(),
            disks: r
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskInfo {
                    id: format!("disk{i}"),
                    path: d.path.display().to_string(),
                    format: match d.format {
                        DiskFormat::Raw => "raw",
                        DiskFormat::Qcow2 => "qcow2",
                    }
                    .into(),
                    interface: match d.interface {
                        DiskInterface::VirtioBlk => "virtio-blk",
                        DiskInterface::Nvme => "nvme",
                        DiskInterface::VhostBlk => "vhost-blk",
                        DiskInterface::VirtioScsi => "virtio-scsi",
                    }
                    .into(),
                    readonly: d.readonly,
                    volume_socket: (d.interface == DiskInterface::VhostBlk).then(|| {
                        crate::vhost::volume_socket(&r.api_socket.with_extension("devices"), i, d)
                            .display()
                            .to_string()
                    }),
                })
                .collect(),
            serial: serial_to_string(&r.serial),
            api_socket: r.api_socket.display().to_string(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            tandem_version: env!("CARGO_PKG_VERSION").into(),
            abi_version: shared_abi::ABI_VERSION.to_string(),
        }
    }

    /// The API socket of the backend of this VM's disk that lends a volume
    /// on `volume_socket`, if one does.
    pub fn lender_api(&self, volume_socket: &std::path::Path) -> Option<std::path::PathBuf> {
        let r = &self.resolved;
        let dir = r.api_socket.with_extension("devices");
        let same = |a: &std::path::Path| {
            a == volume_socket
                || matches!(
                    (a.canonicalize(), volume_socket.canonicalize()),
                    (Ok(x), Ok(y)) if x == y
                )
        };
        r.disks.iter().enumerate().find_map(|(i, d)| {
            (d.interface == DiskInterface::VhostBlk
                && same(&crate::vhost::volume_socket(&dir, i, d)))
            .then(|| crate::vhost::socket_paths(&dir, i).1)
        })
    }

    /// The last lines QEMU wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        lock(&self.stderr_tail)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn early_exit(
    status: std::io::Result<std::process::ExitStatus>,
    tail: &Arc<Mutex<VecDeque<String>>>,
) -> VmError {
    // Give the stderr reader a moment to drain QEMU's last words.
    tokio::time::sleep(Duration::from_millis(100)).await;
    VmError::EarlyExit {
        status: match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        },
        stderr: lock(tail).iter().cloned().collect::<Vec<_>>().join("\n"),
    }
}

impl Running {
    /// Follows QMP events until QEMU exits, and says how the VM ended.
    /// `stop` resolves when the operator (a signal) wants the VM stopped;
    /// a second `stop` forces it.
    pub async fn wait(mut self, mut stop: tokio::sync::mpsc::Receiver<bool>) -> Ending {
        let mut events = self.vm.qmp.subscribe();
        let status = loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let observed = match ev.name.as_str() {
                            "STOP" => Some(Observed::Stopped),
                            "RESUME" => Some(Observed::Resumed),
                            "SHUTDOWN" => Some(Observed::Shutdown {
                                reason: ev.data.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown").to_owned(),
                            }),
                            _ => None,
                        };
                        if let Some(o) = observed {
                            self.vm.observe(o).await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "QMP events lost; re-reading the status");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        // QMP is gone; QEMU is exiting. Wait for the process.
                        break self.child.wait().await;
                    }
                },
                force = stop.recv() => {
                    let force = force.unwrap_or(true);
                    let cmd = lifecycle::Command::Shutdown { force, timeout: Duration::from_secs(30) };
                    match self.vm.command(cmd).await {
                        Ok(()) => info!(force, "shutting the VM down"),
                        Err(VmError::Lifecycle(LifecycleError::AlreadyStopping(_))) => {
                            info!("stopping the VM now");
                            let _ = self.vm.qmp.execute("quit", None).await;
                        }
                        Err(e) => warn!(error = %e, "shutdown failed"),
                    }
                },
                status = self.child.wait() => break status,
            }
        };
        match &status {
            Ok(s) => info!(status = %s, "QEMU exited"),
            Err(e) => warn!(error = %e, "cannot wait for QEMU"),
        }
        for b in self.backends.drain(..) {
            b.stop().await;
        }
        self.vm.observe(Observed::Exited).await;
        let ending = lock(&self.vm.life).ending();
        ending
    }
}
