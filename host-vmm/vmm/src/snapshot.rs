//! Saving a running VM to a file and restoring it (F1's save/restore).
//!
//! QEMU writes the machine state with its migration stream to `file:PATH`;
//! `PATH.json` beside it holds the machine's configuration (kernel,
//! command line, memory, vCPUs, disks, the control device), which the
//! restoring `tandem run --restore PATH` must reproduce exactly.
//!
//! QEMU neither saves nor refuses a vfio-user device: it would silently
//! lose the device's state. So an assigned function must leave first: one
//! that is the direct path of a guest volume is handed off (`handoff.rs`:
//! the guest moves its I/O to the synthetic path, then the function is
//! removed); any other is refused. Tandem also removes its own control
//! device before the transfer (the guest driver lets it go and
//! renegotiates with a new one afterwards). If the transfer fails, the
//! control device and the functions are plugged back, the guest moves I/O
//! back to its direct paths, and the VM keeps running.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_api::VmState;
use tandem_engine::DiskInterface;
use tracing::{info, warn};

use crate::config::VmConfig;
use crate::handoff::HandoffOptions;
use crate::vm::{Vm, VmError};

/// The longest a save or a restore may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the migration's progress is read.
const POLL: Duration = Duration::from_millis(200);
/// A transfer that moves no byte for this long is given up.
const STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM is {0}; only a running or paused VM can be saved")]
    State(VmState),
    #[error("the VM has assigned functions that are not the direct path of a guest volume ({0}): QEMU would neither save nor refuse their state, and nothing would carry their I/O. Make each the direct path of a volume (tandem device path ID direct) or detach it (tandem device detach)")]
    Assigned(String),
    #[error("handoff of the assigned functions: {0}")]
    Handoff(String),
    #[error("the VM has shared disks (vhost-user-scsi), whose backends cannot follow a save or migration yet")]
    Shared,
    #[error("disk {0} is a {1} image served by a vhost-user-blk backend: the backend here and the one that takes over (destination, restore) would both hold its metadata. Only raw files served by vhost-blk can leave: give a VM that must move a raw vhost-blk disk, or QEMU's if=virtio-blk")]
    VhostBlk(String, String),
    #[error("{0} exists; a snapshot never overwrites a file")]
    Exists(PathBuf),
    #[error("{0}: the snapshot file needs an absolute path")]
    Relative(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control device could not be removed: {0}")]
    Control(String),
    #[error("QEMU could not move the VM: {0} (the VM keeps running here)")]
    Failed(String),
    #[error("{0}: migrate to tcp:HOST:PORT (a `tandem run --incoming` there)")]
    Uri(String),
    #[error("a maximum downtime of {0} ms: give 1 to {MAX_DOWNTIME_MS} ms")]
    Downtime(u64),
}

/// The largest `--max-downtime` accepted (a minute: beyond it a "live"
/// migration is a save and restore).
pub const MAX_DOWNTIME_MS: u64 = 60_000;

/// QEMU's own default `downtime-limit`, set again for each transfer so
/// that one migration's limit does not stay for the next.
const QEMU_DOWNTIME_LIMIT_MS: u64 = 300;

/// Limits of one live migration's transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the bandwidth, MiB/s; `None`: unlimited.
    pub max_bandwidth_mib: Option<u64>,
    /// The longest the guest may be stopped for the switch-over, in ms
    /// (QEMU's `downtime-limit`: it keeps copying dirty memory until what
    /// is left fits in this time); `None`: QEMU's default, 300 ms.
    pub max_downtime_ms: Option<u64>,
}

/// What a save did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SaveReport {
    pub file: PathBuf,
    pub config: PathBuf,
    pub bytes: u64,
    pub total_ms: u64,
    /// How long the guest was stopped while QEMU wrote the last part.
    pub downtime_ms: Option<u64>,
    pub downtime_us: Option<u64>,
    pub handoff: Option<tandem_api::HandoffReport>,
}

/// The configuration file beside a snapshot.
pub fn config_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// Reads the machine configuration saved with a snapshot.
pub fn load_config(file: &Path) -> Result<VmConfig, String> {
    let p = config_path(file);
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Follows `query-migrate` until the transfer ends; `Ok` with the final
/// status object when it completed. An outgoing transfer that makes no
/// progress for [`STALL_LIMIT`] (a cut network does not close the TCP
/// connection) is cancelled; an incoming one waits for its sender as long
/// as it takes, then the same rule applies.
async fn follow(vm: &Vm, what: &str, outgoing: bool) -> Result<Value, String> {
    let mut begun: Option<Instant> = outgoing.then(Instant::now);
    let mut last_report = Instant::now();
    let mut last_bytes = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let st = vm
            .qmp()
            .execute("query-migrate", None)
            .await
            .map_err(|e| e.to_string())?;
        let status = st.get("status").and_then(Value::as_str).unwrap_or("");
        match status {
            "completed" => return Ok(st),
            "failed" | "cancelled" => {
                return Err(st
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("cancelled")
                    .to_owned())
            }
            _ => {}
        }
        let ram = &st["ram"];
        let bytes = ram["transferred"].as_u64().unwrap_or(0);
        if begun.is_none() && (status == "active" || bytes > 0) {
            begun = Some(Instant::now());
            last_progress = Instant::now();
        }
        if bytes > last_bytes {
            last_bytes = bytes;
            last_progress = Instant::now();
        }
        if let Some(b) = begun {
            if last_report.elapsed() > Duration::from_secs(2) {
                last_report = Instant::now();
                info!(
                    what,
                    status,
                    transferred = bytes,
                    remaining = %ram["remaining"],
                    dirty_pages_rate = %ram["dirty-pages-rate"],
                    expected_downtime_ms = %st["expected-downtime"],
                    "transfer in progress"
                );
            }
            if last_progress.elapsed() > STALL_LIMIT || b.elapsed() > TRANSFER_TIMEOUT {
                let why = if last_progress.elapsed() > STALL_LIMIT {
                    format!("no progress for {STALL_LIMIT:?} (network cut, or the other side gone)")
                } else {
                    format!("not finished after {TRANSFER_TIMEOUT:?}")
                };
                if outgoing {
                    let _ = vm.qmp().execute("migrate_cancel", None).await;
                }
                return Err(why);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks that the VM may leave (saved or migrated): its state, no
/// assigned function that is not a direct path, no vhost-user-blk disk
/// but raw ones (whose backend logs the guest pages it writes, so QEMU
/// can migrate it, and keeps no metadata a second backend on the same
/// file could contradict), no shared disks.
/// Returns the state and the direct paths to hand off.
fn may_leave(vm: &Vm) -> Result<(VmState, Vec<(tandem_api::AttachedDevice, u32)>), SnapshotError> {
    let state = vm.state();
    if !matches!(state, VmState::Running | VmState::Paused) {
        return Err(SnapshotError::State(state));
    }
    let paths = crate::handoff::direct_paths(vm)?;
    for (i, d) in vm.resolved().disks.iter().enumerate() {
        if d.interface != DiskInterface::VhostBlk {
            continue;
        }
        // The backend reads the format itself (VHDX included), so ask the
        // disk layer rather than the --disk format.
        match tandem_disk::probe(&d.path) {
            Ok(tandem_disk::Format::Raw) => {}
            Ok(f) => return Err(SnapshotError::VhostBlk(format!("disk{i}"), f.to_string())),
            Err(e) => {
                return Err(SnapshotError::VhostBlk(
                    format!("disk{i}"),
                    format!("unreadable ({e})"),
                ))
            }
        }
    }
    if !vm.resolved().shared_disks.is_empty() {
        return Err(SnapshotError::Shared);
    }
    Ok((state, paths))
}

/// Hands the direct paths off, runs `leave`, and on failure puts them back.
async fn leave_with_handoff(
    vm: &Arc<Vm>,
    uri: &str,
    state: VmState,
    paths: Vec<(tandem_api::AttachedDevice, u32)>,
    opts: HandoffOptions,
    limits: Limits,
) -> Result<(Value, u64, Option<tandem_api::HandoffReport>), SnapshotError> {
    let (handed, report) = if paths.is_empty() {
        (Vec::new(), None)
    } else {
        let (h, r) = crate::handoff::hand_off(vm, paths, opts).await?;
        (h, Some(r))
    };
    match leave(vm, uri, state, limits).await {
        Ok((st, ms)) => Ok((st, ms, report)),
        Err(e) => {
            if !handed.is_empty() {
                crate::handoff::hand_back(vm, handed).await;
            }
            Err(e)
        }
    }
}

/// Saves the VM to `file` and stops it. On failure the VM keeps running,
/// with its control device back.
pub async fn save(
    vm: &Arc<Vm>,
    file: &Path,
    opts: HandoffOptions,
) -> Result<SaveReport, SnapshotError> {
    let _one = vm.busy.lock().await;
    let (state, paths) = may_leave(vm)?;
    if !file.is_absolute() {
        return Err(SnapshotError::Relative(file.to_owned()));
    }
    let config = config_path(file);
    for p in [file, config.as_path()] {
        if p.exists() {
            return Err(SnapshotError::Exists(p.to_owned()));
        }
    }
    let text = serde_json::to_vec_pretty(&vm.resolved().machine_config())
        .map_err(|e| SnapshotError::Failed(e.to_string()))?;
    write_atomically(&config, &text).map_err(|source| SnapshotError::Write {
        path: config.clone(),
        source,
    })?;
    let uri = format!("file:{}", file.display());
    match leave_with_handoff(vm, &uri, state, paths, opts, Limits::default()).await {
        Ok((st, total_ms, handoff)) => Ok(SaveReport {
            file: file.to_owned(),
            config,
            bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
            total_ms,
            downtime_ms: st.get("downtime").and_then(Value::as_u64),
            downtime_us: checkpoint_downtime(vm),
            handoff,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(file);
            let _ = std::fs::remove_file(&config);
            Err(e)
        }
    }
}

/// What a live migration did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MigrateReport {
    pub to: String,
    pub bytes: u64,
    pub total_ms: u64,
    pub downtime_ms: Option<u64>,
    pub downtime_us: Option<u64>,
    pub handoff: Option<tandem_api::HandoffReport>,
}

/// Live-migrates the VM to a `tandem run --incoming` at `uri`
/// (`tcp:HOST:PORT`); this side stops once the destination has it. On
/// failure the VM keeps running here.
pub async fn migrate(
    vm: &Arc<Vm>,
    uri: &str,
    limits: Limits,
    opts: HandoffOptions,
) -> Result<MigrateReport, SnapshotError> {
    let _one = vm.busy.lock().await;
    if !uri.starts_with("tcp:") {
        return Err(SnapshotError::Uri(uri.to_owned()));
    }
    if let Some(ms) = limits.max_downtime_ms {
        if !(1..=MAX_DOWNTIME_MS).contains(&ms) {
            return Err(SnapshotError::Downtime(ms));
        }
    }
    let (state, paths) = may_leave(vm)?;
    let (st, total_ms, handoff) = leave_with_handoff(vm, uri, state, paths, opts, limits).await?;
    Ok(MigrateReport {
        to: uri.to_owned(),
        bytes: st["ram"]["transferred"].as_u64().unwrap_or(0),
        total_ms,
        downtime_ms: st.get("downtime").and_then(Value::as_u64),
        downtime_us: checkpoint_downtime(vm),
        handoff,
    })
}

/// The last downtime in QEMU's log, in microseconds (see
/// [`tandem_engine::qemu_log::downtime_us`]); none when the log cannot be
/// read.
fn checkpoint_downtime(vm: &Vm) -> Option<u64> {
    let log = tandem_engine::qemu_log::path_for(&vm.resolved().api_socket);
    match std::fs::read_to_string(&log) {
        Ok(text) => tandem_engine::qemu_log::downtime_us(&text),
        Err(e) => {
            warn!(log = %log.display(), error = %e, "cannot read QEMU's log for its downtime checkpoints");
            None
        }
    }
}

/// Removes the control device, sends the machine state to `uri`, and on
/// success stops QEMU; on failure brings the control device back and keeps
/// the VM running.
async fn leave(
    vm: &Arc<Vm>,
    uri: &str,
    state: VmState,
    limits: Limits,
) -> Result<(Value, u64), SnapshotError> {
    // 0 is unlimited for QEMU; a save to a file takes the defaults.
    let bw = limits
        .max_bandwidth_mib
        .map_or(0, |m| m.saturating_mul(1 << 20));
    let mut params = json!({"max-bandwidth": bw, "downtime-limit": QEMU_DOWNTIME_LIMIT_MS});
    if let Some(ms) = limits.max_downtime_ms {
        params["downtime-limit"] = json!(ms);
    }
    if let Err(e) = vm
        .qmp()
        .execute("migrate-set-parameters", Some(params.clone()))
        .await
    {
        // Without its limits the transfer would not be what was asked.
        return Err(SnapshotError::Failed(format!(
            "migrate-set-parameters {params}: {e}"
        )));
    }
    info!(%params, "transfer limits");
    let begun = Instant::now();
    if let Some(c) = vm.control() {
        if let Err(e) = crate::control::unplug(c, vm).await {
            // The device may be half gone: bring one back.
            let _ = crate::control::replug(c.clone(), vm.clone()).await;
            return Err(SnapshotError::Control(e));
        }
        info!("control device removed for the transfer");
    }
    let result = match vm.qmp().execute("migrate", Some(json!({"uri": uri}))).await {
        Ok(_) => follow(vm, "outgoing", true).await,
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(st) => {
            *vm.left_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(uri.to_owned());
            info!(uri, "VM sent; stopping QEMU here");
            // The guest is stopped here (post-migration); QEMU may go.
            let vm2 = vm.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = vm2.qmp().execute("quit", None).await;
            });
            Ok((
                st,
                u64::try_from(begun.elapsed().as_millis()).unwrap_or(u64::MAX),
            ))
        }
        Err(e) => {
            warn!(error = %e, "transfer failed; the VM keeps running here");
            // A failed migration leaves the guest running, unless it was
            // stopped before the failure.
            if state == VmState::Running {
                if let Ok(st) = vm.qmp().execute("query-status", None).await {
                    if st.get("running").and_then(Value::as_bool) == Some(false) {
                        let _ = vm.qmp().execute("cont", None).await;
                    }
                }
            }
            if let Some(c) = vm.control() {
                if let Err(r) = crate::control::replug(c.clone(), vm.clone()).await {
                    warn!(error = %r, "the control device could not be plugged back");
                }
            }
            Err(SnapshotError::Failed(e))
        }
    }
}

/// Restores the machine state of a VM QEMU started with `-incoming defer`.
pub(crate) async fn receive(vm: &Arc<Vm>, uri: &str) -> Result<(), VmError> {
    vm.qmp()
        .execute("migrate-incoming", Some(json!({"uri": uri})))
        .await
        .map_err(|e| VmError::Restore(format!("migrate-incoming {uri}: {e}")))?;
    let st = follow(vm, "incoming", false)
        .await
        .map_err(VmError::Restore)?;
    info!(uri, total_ms = %st["total-time"], "machine state restored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_sits_beside_the_snapshot() {
        assert_eq!(
            config_path(Path::new("/srv/web.state")),
            Path::new("/srv/web.state.json")
        );
    }
}
