//! F1 with assigned functions: moving a VM's direct paths out of the way of
//! a save or a live migration, and back (the host half of F4's handoff).
//!
//! QEMU neither migrates nor refuses a vfio-user device, so no assigned
//! function may be attached while the machine state moves. A function that
//! is the direct path of a guest volume (`tandem device path ID direct`)
//! can leave without the guest noticing:
//!
//! 1. **release**: the guest moves the volume's I/O to its synthetic path
//!    (virtio-blk on storage the destination sees too) and lets go of the
//!    function (ABI 1.2 `PATH_RELEASE`); the host waits for its answer;
//! 2. **detach**: the function is hot-removed;
//! 3. the machine state moves (`snapshot.rs`);
//! 4. on failure, **back**: the same function is plugged again, and once
//!    the guest's driver has its disk, the guest moves I/O back to it
//!    (`PATH_DIRECT`). At the destination (or on restore) `tandem run
//!    --direct` plugs the destination's function the same way.
//!
//! A guest that does not answer the release in time (its driver hung, or
//! unloaded) either aborts the transfer (the default: the functions stay
//! and the VM runs on) or, if the operator asked to force, has its
//! functions removed anyway: the removal makes the guest's block layer fail
//! over by itself (the volume re-issues what was in flight on the function
//! through the synthetic path).
//!
//! Assigned functions that are not the direct path of a volume are refused,
//! as before: nothing would carry their I/O.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_abi::msg::Status;
use tandem_api::channel::FunctionOp;
use tandem_api::{AttachedDevice, DeviceAttachRequest, DeviceGuestRequest};
use tracing::{info, warn};

use crate::snapshot::SnapshotError;

/// The guest's answer as the ABI's status; `None` when the number is not
/// one this host knows (or the answer has none).
fn guest_status(g: &tandem_api::DeviceGuestResponse) -> Option<Status> {
    g.guest.status_code.and_then(Status::from_u16)
}
use crate::vm::Vm;

/// How the guest is asked to let go.
#[derive(Clone, Copy, Debug)]
pub struct HandoffOptions {
    /// How long the guest gets to move a volume's I/O off its function.
    pub timeout_ms: u32,
    /// Remove the functions even if the guest does not answer in time.
    pub force: bool,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        HandoffOptions {
            timeout_ms: 5000,
            force: false,
        }
    }
}

/// A function handed off, for putting it back.
#[derive(Clone, Debug)]
pub(crate) struct Handed {
    dev: AttachedDevice,
    volume: u32,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The attached functions, each with the volume it is the direct path of;
/// refuses if one is not a direct path.
pub(crate) fn direct_paths(vm: &Vm) -> Result<Vec<(AttachedDevice, u32)>, SnapshotError> {
    let assigned = lock(&vm.assigned);
    let paths = lock(&vm.direct_paths);
    let mut out = Vec::new();
    let mut plain = Vec::new();
    for (id, dev) in assigned.iter() {
        match paths.get(id) {
            Some(v) => out.push((dev.clone(), *v)),
            None => plain.push(id.clone()),
        }
    }
    if !plain.is_empty() {
        return Err(SnapshotError::Assigned(plain.join(", ")));
    }
    Ok(out)
}

async fn path_op(
    vm: &Arc<Vm>,
    id: &str,
    op: FunctionOp,
    volume: u32,
    drain_ms: u32,
) -> Result<tandem_api::DeviceGuestResponse, String> {
    let control = vm
        .control()
        .ok_or("the VM has no control device to reach the guest driver")?;
    crate::devices::guest_op(
        vm,
        control,
        DeviceGuestRequest {
            id: id.to_owned(),
            op,
            drain_ms: Some(drain_ms),
            lease_ms: None,
            frozen: false,
            volume: Some(volume),
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// Steps 1 and 2. On an error nothing has moved: the functions the guest
/// had released are its direct paths again.
pub(crate) async fn hand_off(
    vm: &Arc<Vm>,
    paths: Vec<(AttachedDevice, u32)>,
    opts: HandoffOptions,
) -> Result<(Vec<Handed>, tandem_api::HandoffReport), SnapshotError> {
    let mut report = tandem_api::HandoffReport {
        functions: paths.iter().map(|(d, _)| d.id.clone()).collect(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut released: Vec<Handed> = Vec::new();
    let mut acked_all = true;
    for (dev, volume) in paths {
        let r = path_op(
            vm,
            &dev.id,
            FunctionOp::PathRelease,
            volume,
            opts.timeout_ms,
        )
        .await;
        let why = match &r {
            Ok(g) if guest_status(g) == Some(Status::Ok) => None,
            Ok(g) => Some(format!("the guest answered \"{}\"", g.guest.status)),
            Err(e) => Some(e.clone()),
        };
        let h = Handed { dev, volume };
        if let Some(why) = why {
            if !opts.force {
                warn!(id = %h.dev.id, %why, "the guest did not hand the function's I/O off; abort");
                released.push(h);
                redirect(vm, &released).await;
                return Err(SnapshotError::Handoff(format!(
                    "the guest did not move {}'s I/O to the synthetic path within {} ms ({why}); nothing was moved and the VM runs on here (force the removal with --force-handoff)",
                    released.last().map_or("", |h| h.dev.id.as_str()),
                    opts.timeout_ms
                )));
            }
            warn!(id = %h.dev.id, %why, "the guest did not hand the function's I/O off; removing it anyway");
            acked_all = false;
        } else {
            info!(id = %h.dev.id, volume, "the guest moved the volume's I/O to its synthetic path");
        }
        released.push(h);
    }
    report.release_ms = ms(t0.elapsed());
    report.acknowledged = acked_all;
    report.forced = !acked_all;
    let t1 = Instant::now();
    for (i, h) in released.iter().enumerate() {
        if let Err(e) = crate::devices::detach(vm, &h.dev.id, Duration::from_secs(15)).await {
            warn!(id = %h.dev.id, error = %e, "the function could not be removed; abort");
            // Put everything back: the ones removed, and this one's path.
            let (gone, still) = released.split_at(i);
            hand_back(vm, gone.to_vec()).await;
            redirect(vm, still).await;
            return Err(SnapshotError::Handoff(format!(
                "{} could not be removed ({e}); the VM runs on here with its functions",
                h.dev.id
            )));
        }
    }
    report.detach_ms = ms(t1.elapsed());
    info!(
        release_ms = report.release_ms,
        detach_ms = report.detach_ms,
        "functions handed off"
    );
    Ok((released, report))
}

/// An abort before the functions left: each released function, still
/// attached, is made its volume's direct path again (one request each; a
/// guest that does not answer kept its path, as it never released it).
async fn redirect(vm: &Arc<Vm>, released: &[Handed]) {
    for h in released {
        if let Err(e) = path_op(vm, &h.dev.id, FunctionOp::PathDirect, h.volume, 5000).await {
            warn!(id = %h.dev.id, error = %e, "the function could not be made the direct path again");
        }
    }
}

/// Step 4 after a failed transfer: each function plugged again and made
/// its volume's direct path. Failures are logged: the VM runs on on its
/// synthetic paths either way.
pub(crate) async fn hand_back(vm: &Arc<Vm>, handed: Vec<Handed>) {
    for h in handed {
        let req = DeviceAttachRequest {
            id: h.dev.id.clone(),
            socket: h.dev.socket.clone(),
            server_api: h.dev.server_api.clone(),
            vf: h.dev.vf,
        };
        match plug_direct(vm, req, h.volume).await {
            Ok(ms) => info!(id = %h.dev.id, ms, "function back as its volume's direct path"),
            Err(e) => {
                warn!(id = %h.dev.id, error = %e, "the function could not be put back; the volume stays on its synthetic path")
            }
        }
    }
}

/// Plugs a function and, once the guest's driver has its disk, makes it
/// the direct path of `volume`. Returns how long it took, in ms.
pub async fn plug_direct(
    vm: &Arc<Vm>,
    req: DeviceAttachRequest,
    volume: u32,
) -> Result<u64, String> {
    let t0 = Instant::now();
    let id = req.id.clone();
    crate::devices::attach(vm, req)
        .await
        .map_err(|e| e.to_string())?;
    // The guest enumerates the function and its driver probes it; the
    // control channel may also still be coming back after a transfer.
    let limit = Duration::from_secs(90);
    loop {
        let last = match path_op(vm, &id, FunctionOp::Report, volume, 0).await {
            Ok(g) if g.guest.disks > 0 => break,
            Ok(g) => format!("driver {:?}, {} disks", g.guest.driver, g.guest.disks),
            Err(e) => e,
        };
        if t0.elapsed() > limit {
            return Err(format!(
                "the guest has no disk on {id} after {limit:?} ({last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Answers that pass, each asked again within the same limit: "no such
    // function" (the disk is not openable yet), "busy" (a previous direct
    // path is still closing), "timed out" (the switch is still under way:
    // the path is the volume's, and asking again waits for the switch;
    // PATH_DIRECT is idempotent), and no answer from the channel.
    let passing = [Status::NoDevice, Status::Busy, Status::TimedOut];
    loop {
        let last = match path_op(vm, &id, FunctionOp::PathDirect, volume, 5000).await {
            Ok(g) if guest_status(&g) == Some(Status::Ok) => return Ok(ms(t0.elapsed())),
            Ok(g) if guest_status(&g).is_some_and(|s| passing.contains(&s)) => {
                format!("the guest answered \"{}\"", g.guest.status)
            }
            Ok(g) => {
                return Err(format!(
                    "the guest answered \"{}\" to PATH_DIRECT",
                    g.guest.status
                ))
            }
            Err(e) => e,
        };
        if t0.elapsed() > limit {
            return Err(format!(
                "{id} is not the direct path of volume {volume} after {limit:?} ({last})"
            ));
        }
        info!(%id, volume, %last, "PATH_DIRECT not taken yet; asking again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
