//! Request and response bodies.

use serde::{Deserialize, Serialize};
use tandem_engine::{Accel, EngineVersion};

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU is starting; the guest has not run yet.
    Starting,
    Running,
    Paused,
    /// A shutdown was asked for and the guest has not stopped yet.
    ShuttingDown,
    Stopped,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Stopped => "stopped",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    pub path: String,
    pub version: EngineVersion,
    pub package: String,
    /// "explicit", "system" or "cache".
    pub origin: String,
    pub pid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: String,
    pub path: String,
    pub format: String,
    pub interface: String,
    pub readonly: bool,
    /// Where the disk's vhost-user-blk backend lends it to a second path
    /// (`tandem nvme serve --vf-disk <this>`): vhost-blk disks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_socket: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    pub accel: Accel,
    /// Why this accelerator was chosen.
    pub accel_reason: String,
    pub engine: EngineInfo,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub append: String,
    pub disks: Vec<DiskInfo>,
    /// "stdio", "file:<path>", "unix:<path>" or "none".
    pub serial: String,
    pub api_socket: String,
    pub uptime_ms: u64,
    pub tandem_version: String,
    pub abi_version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub tandem_version: String,
    pub abi_version: String,
    pub pid: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds to wait for the guest to power off after the ACPI power
    /// button before stopping the VM hard. Default 30.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Stop at once, without asking the guest.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownResponse {
    /// True when the guest powered off by itself within the timeout.
    pub graceful: bool,
    pub elapsed_ms: u64,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// Attach a PCI function served over vfio-user (for example an NVMe VF
/// from `tandem device-server nvme`) to a free hot-plug root port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAttachRequest {
    /// QEMU device id; must be unique in the VM.
    pub id: String,
    /// The function's vfio-user socket.
    pub socket: String,
    /// The device server's own API socket, if it has one: `device show`
    /// asks it for the function's state (the host proxy view).
    #[serde(default)]
    pub server_api: Option<String>,
    /// The VF number on that server (0: the PF).
    #[serde(default)]
    pub vf: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDetachRequest {
    pub id: String,
    /// How long the guest gets to release the function.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// A function attached to the VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttachedDevice {
    pub id: String,
    pub socket: String,
    pub port: String,
    pub server_api: Option<String>,
    pub vf: u16,
    /// Milliseconds since the VM started when it was attached.
    pub attached_at_ms: u64,
    /// The device server's view of the function (enabled, queues, power
    /// state, in-flight commands); absent when it cannot be asked.
    #[serde(default)]
    pub state: Option<serde_json::Value>,
    /// Why `state` is absent.
    #[serde(default)]
    pub state_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<AttachedDevice>,
    /// Hot-plug root ports not in use.
    pub free_ports: Vec<String>,
}

/// `device.guest`: an operation of the guest driver stack on an attached
/// function, carried over the control channel (ABI 1.1 `FUNCTION`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGuestRequest {
    pub id: String,
    pub op: crate::channel::FunctionOp,
    /// `quiesce`: how long the guest waits for I/O in flight (default 5000).
    #[serde(default)]
    pub drain_ms: Option<u32>,
    /// `quiesce`: the guest resumes by itself after this long without a
    /// `resume` (default one minute).
    #[serde(default)]
    pub lease_ms: Option<u32>,
    /// `policy`: the host holds the function frozen.
    #[serde(default)]
    pub frozen: bool,
    /// `path_*`: the multi-path volume (default 0, `/dev/tandem0`).
    #[serde(default)]
    pub volume: Option<u32>,
}

/// `device.guest`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGuestResponse {
    pub id: String,
    /// The function's address in the guest, `SSSS:BB:DD.F`.
    pub guest_address: String,
    pub guest: crate::channel::GuestFunction,
}

/// `vm.snapshot`: where to save the VM (an absolute path that does not
/// exist; the machine configuration goes to `<file>.json` beside it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub file: String,
    /// How long the guest gets to move each direct path's I/O to its
    /// synthetic path (default 5000 ms).
    #[serde(default)]
    pub handoff_timeout_ms: Option<u32>,
    /// Remove the assigned functions even if the guest does not answer.
    #[serde(default)]
    pub force_handoff: bool,
}

/// What the handoff of assigned functions did before a save or migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReport {
    /// The functions removed (each a volume's direct path).
    pub functions: Vec<String>,
    /// The guest answered every release in time.
    pub acknowledged: bool,
    /// Removed without the guest's answer (`force_handoff`).
    pub forced: bool,
    /// Time for the guest to move I/O to the synthetic paths.
    pub release_ms: u64,
    /// Time to hot-remove the functions.
    pub detach_ms: u64,
}

/// `vm.snapshot`'s answer; the VM stops right after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResponse {
    pub file: String,
    pub config: String,
    pub bytes: u64,
    pub total_ms: u64,
    /// How long the guest was stopped while QEMU wrote the last part.
    pub downtime_ms: Option<u64>,
    /// The same, in microseconds, from QEMU's downtime checkpoints
    /// (`src-downtime-start` to `src-downtime-end` in its log).
    #[serde(default)]
    pub downtime_us: Option<u64>,
    /// The assigned functions handed off first, if any.
    #[serde(default)]
    pub handoff: Option<HandoffReport>,
}

/// `vm.migrate`: where the destination (`tandem run --incoming URI`) listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT`.
    pub to: String,
    /// Cap on the migration's bandwidth, MiB/s (default: QEMU's).
    #[serde(default)]
    pub max_bandwidth_mib: Option<u64>,
    /// The longest the guest may be stopped for the switch-over, ms
    /// (1 to 60000; default: QEMU's, 300). QEMU copies dirty memory until
    /// the rest fits in this time.
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// As in [`SnapshotRequest`].
    #[serde(default)]
    pub handoff_timeout_ms: Option<u32>,
    #[serde(default)]
    pub force_handoff: bool,
}

/// `vm.migrate`'s answer; the VM stops here right after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateResponse {
    pub to: String,
    pub bytes: u64,
    pub total_ms: u64,
    /// How long the guest was stopped for the switch-over.
    pub downtime_ms: Option<u64>,
    /// The same, in microseconds, from QEMU's downtime checkpoints
    /// (`src-downtime-start` to `src-downtime-end` in its log).
    #[serde(default)]
    pub downtime_us: Option<u64>,
    /// The assigned functions handed off first, if any.
    #[serde(default)]
    pub handoff: Option<HandoffReport>,
}
