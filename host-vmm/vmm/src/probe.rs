//! The KVM boot probe: can this host's KVM really boot a guest?
//!
//! `/dev/kvm` answering ioctls proves little (a software KVM may accept a
//! VM and then fail to boot a standard kernel), so the probe boots the real
//! guest kernel and initramfs under the accelerator with `tandem.probe` on
//! the command line; the guest's init prints [`PROBE_MARKER`] and powers
//! off. Anything else within the time limit is a failure, with the reason.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tandem_engine::{Accel, Engine};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// What the guest's init prints when booted with `tandem.probe`.
pub const PROBE_MARKER: &str = "tandem-probe: init reached";
/// The kernel parameter that asks init for the probe.
pub const PROBE_PARAM: &str = "tandem.probe";

/// Boots `kernel` + `initrd` under `accel` and waits for the marker.
/// Returns how long the guest took to reach init.
pub async fn boot_probe(
    engine: &Engine,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    limit: Duration,
) -> Result<Duration, String> {
    let mut cmd = Command::new(&engine.path);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    for d in &engine.firmware_dirs {
        cmd.arg("-L").arg(d);
    }
    cmd.args([
        "-machine",
        &format!("q35,accel={accel}"),
        "-cpu",
        if accel == Accel::Kvm { "host" } else { "max" },
        "-m",
        "256M",
        "-serial",
        "stdio",
    ]);
    cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
    cmd.args(["-append", &format!("console=ttyS0 panic=-1 {PROBE_PARAM}")]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let begun = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", engine.path.display()))?;
    let Some(out) = child.stdout.take() else {
        return Err("no stdout from QEMU".into());
    };
    let mut lines = BufReader::new(out).lines();
    let mut last = String::new();
    let found = tokio::time::timeout(limit, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(PROBE_MARKER) {
                return true;
            }
            if !line.trim().is_empty() {
                last = line;
            }
        }
        false
    })
    .await;
    let elapsed = begun.elapsed();
    let _ = child.start_kill();
    let status = child.wait().await.ok();
    match found {
        Ok(true) => Ok(elapsed),
        Ok(false) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            Err(format!(
                "QEMU exited ({}) before the guest reached init; last console line {:?}; {}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                last,
                err.lines().last().unwrap_or("")
            ))
        }
        Err(_) => Err(format!(
            "the guest did not reach init within {limit:?} (last console line {last:?})"
        )),
    }
}
