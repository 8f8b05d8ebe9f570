//! `e2e snapshot`: save a running VM to a file and restore it (F1's
//! save/restore without assigned functions), a save that fails half-way
//! (the VM keeps running), and the refusal to save a VM with an assigned
//! function.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::boot::{boot_tandem, tempdir, Booted};
use crate::guest::Console;
use crate::{spawn_tandem, tandem};

/// Waits until `tandem channel info` says the channel is up.
pub(crate) async fn channel_up(api: &str, limit: Duration) -> Result<Value> {
    let end = Instant::now() + limit;
    loop {
        let (code, out, _) = tandem(&["channel", "info", "--json", "--api-socket", api]).await?;
        if code == 0 {
            if let Ok(v) = serde_json::from_str::<Value>(&out) {
                if v["device"]["channel_state"] == "up" {
                    return Ok(v);
                }
            }
        }
        ensure!(Instant::now() < end, "the channel did not come up: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Leaves state to find again: a random marker in RAM (the initramfs is
/// RAM) and a random MiB at the start of `/dev/vda`. Returns their digests.
pub(crate) async fn plant_state(c: &mut Console) -> Result<(String, String)> {
    c.check("head -c 24 /dev/urandom | md5sum > /ram-marker")
        .await?;
    let ram = c.check("cat /ram-marker").await?;
    c.check("head -c 1048576 /dev/urandom > /pattern").await?;
    c.check("dd if=/pattern of=/dev/vda bs=1M count=1 oflag=direct 2>/dev/null")
        .await?;
    let pattern = c.check("md5sum < /pattern").await?;
    Ok((ram, pattern))
}

/// The guest's uptime in seconds.
pub(crate) async fn uptime(c: &mut Console) -> Result<f64> {
    let u = c.check("cut -d' ' -f1 /proc/uptime").await?;
    u.trim().parse().with_context(|| format!("uptime {u:?}"))
}

pub async fn e2e() -> Result<()> {
    let work = tempdir()?;
    let w = work.path();
    let disk = w.join("data.raw");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let disk_arg = format!("path={},if=virtio-blk,format=raw", disk.display());
    let mut vm = boot_tandem(w, "e2e-snap", &["--disk", &disk_arg, "--memory", "512M"]).await?;
    let api = vm.api.display().to_string();
    println!("booted in {:.2}s", vm.boot_s);
    channel_up(&api, Duration::from_secs(30)).await?;

    // State in RAM (the initramfs is RAM) and on the disk.
    let c = &mut vm.console;
    let (ram, pattern) = plant_state(c).await?;
    let up_before = uptime(c).await?;

    // 1. A save that fails half-way (the state does not fit where it is
    //    written): an error, and the VM keeps running with its channel.
    let small = w.join("small");
    std::fs::create_dir_all(&small)?;
    let (code, _, err) = tokio::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2M", "tmpfs"])
        .arg(&small)
        .output()
        .await
        .map(|o| {
            (
                o.status.code().unwrap_or(-1),
                String::new(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })?;
    ensure!(code == 0, "cannot mount a small tmpfs: {err}");
    let failing = small.join("vm.state");
    let (code, _, err) = tandem(&[
        "snapshot",
        &failing.display().to_string(),
        "--api-socket",
        &api,
    ])
    .await?;
    let _ = tokio::process::Command::new("umount")
        .arg(&small)
        .status()
        .await;
    ensure!(
        code != 0 && err.contains("could not move the VM") && err.contains("keeps running"),
        "a save into 2 MiB: exit {code}: {err}"
    );
    let again = vm.console.check("cat /ram-marker").await?;
    ensure!(again == ram, "the VM changed after a failed save");
    let ch = channel_up(&api, Duration::from_secs(60)).await?;
    println!(
        "a save that ran out of space failed cleanly ({}); the VM runs on, its control device is back (session {})",
        err.lines().last().unwrap_or("").trim(),
        ch["server"]["session"]
    );

    // 2. Save.
    let state = w.join("vm.state");
    let state_s = state.display().to_string();
    let (code, out, err) = tandem(&["snapshot", &state_s, "--api-socket", &api]).await?;
    ensure!(code == 0, "snapshot failed ({code}): {out}{err}");
    println!("{}", out.trim());
    let bytes = std::fs::metadata(&state)?.len();
    let total_ms: u64 = out
        .split(" in ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64);
    let status = tokio::time::timeout(Duration::from_secs(60), vm.child.wait())
        .await
        .context("tandem run did not end after the save")??;
    let log = std::fs::read_to_string(&vm.log)?;
    ensure!(
        status.success() && log.contains("saved to"),
        "tandem run after the save: {status}\n{log}"
    );

    // 3. Restore, on a new console and API socket.
    let api2 = w.join("restored.sock");
    let serial2 = w.join("restored.serial");
    let log2 = w.join("restored.log");
    let api2_s = api2.display().to_string();
    let serial_arg = format!("unix:{}", serial2.display());
    let begun = Instant::now();
    let child = spawn_tandem(
        &[
            "run",
            "--restore",
            &state_s,
            "--serial",
            &serial_arg,
            "--api-socket",
            &api2_s,
        ],
        &log2,
    )?;
    let mut console = Console::connect(&serial2, Duration::from_secs(120))
        .await
        .with_context(|| std::fs::read_to_string(&log2).unwrap_or_default())?;
    // The restored shell sits at its prompt; the first bytes may meet a
    // half-set-up line, so first make sure it answers.
    console.wait_for_shell(Duration::from_secs(120)).await?;
    let mut vm2 = Booted {
        child,
        console,
        api: api2.clone(),
        log: log2.clone(),
        boot_s: 0.0,
    };
    let c = &mut vm2.console;
    let ram2 = c.check("cat /ram-marker").await?;
    ensure!(ram2 == ram, "RAM after the restore: {ram2} vs {ram}");
    let disk2 = c
        .check("dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum")
        .await?;
    ensure!(
        disk2 == pattern,
        "disk after the restore: {disk2} vs {pattern}"
    );
    let up_after = uptime(c).await?;
    ensure!(
        up_after >= up_before,
        "the guest's uptime went back: {up_before} -> {up_after}"
    );
    let restore_s = begun.elapsed().as_secs_f64();
    let ch = channel_up(&api2_s, Duration::from_secs(60)).await?;
    let st = c
        .check("cat /sys/kernel/debug/tandem/*/state | grep -E '^(state|session)'")
        .await?;
    println!(
        "restored in {restore_s:.2}s: the same RAM (marker {}), disk and running kernel (uptime {up_before:.1}s -> {up_after:.1}s); the guest renegotiated with a new control device (ABI {}; {})",
        &ram[..ram.len().min(8)],
        ch["device"]["version"],
        st.replace('\n', ", ")
    );

    // 4. With an assigned function, a save is refused and nothing changes.
    let nvme_work = w.join("nvme");
    std::fs::create_dir_all(&nvme_work)?;
    let srv = crate::nvme::start_server(&nvme_work, &[nvme_work.join("vf1.raw")]).await?;
    let dir = srv.dir.display().to_string();
    let (code, _, err) = tandem(&["nvme", "vfs", "1", "--dir", &dir]).await?;
    ensure!(code == 0, "nvme vfs: {err}");
    let (ctrl, _) = crate::nvme::attach(&mut vm2, &srv.dir, 1).await?;
    let refused = w.join("refused.state");
    let (code, _, err) = tandem(&[
        "snapshot",
        &refused.display().to_string(),
        "--api-socket",
        &api2_s,
    ])
    .await?;
    ensure!(
        code != 0 && err.contains("not the direct path of a guest volume (nvme-vf1)"),
        "a save with an assigned VF: exit {code}: {err}"
    );
    ensure!(
        !refused.exists(),
        "a refused save left {}",
        refused.display()
    );
    let c = &mut vm2.console;
    let (_, st) = c
        .run(
            &format!("dd if=/dev/{ctrl}n1 of=/dev/null bs=4k count=8 iflag=direct"),
            Duration::from_secs(30),
        )
        .await?;
    ensure!(st == 0, "the VF stopped working after the refused save");
    println!(
        "with {ctrl} assigned: the save was refused ({}); the VM and the VF run on",
        err.lines().last().unwrap_or("").trim()
    );

    let (code, _, err) = tandem(&["shutdown", "--api-socket", &api2_s, "--timeout", "30"]).await?;
    ensure!(code == 0, "shutdown: {err}");
    let _ = tokio::time::timeout(Duration::from_secs(30), vm2.child.wait()).await;
    println!(
        "PASS snapshot bytes={bytes} save_ms={total_ms} restore_ms={:.0}",
        restore_s * 1000.0
    );
    Ok(())
}
