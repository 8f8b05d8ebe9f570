//! `e2e failover` and `bench failover` (F4): one disk file served to a
//! guest through two paths, virtio-blk on Tandem's vhost-user-blk backend
//! (synthetic) and an NVMe VF of the SR-IOV device server whose namespace
//! is the same file (direct). tandem.ko presents `/dev/tandem0` over both;
//! fio with verify runs on it while the host moves I/O between the paths
//! and kills the NVMe device server (a surprise removal of the VF).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::boot::{boot_tandem, tempdir, Booted};
use crate::guest::{tail, Console};
use crate::nvme::{attach, start_server, NvmeServer};
use crate::tandem;

/// `tandem device path <id> <role> --json`.
/// On failure, the guest's view of the volume and its kernel log's tail
/// are part of the error.
pub(crate) async fn path_op(vm: &mut Booted, id: &str, role: &str) -> Result<Value> {
    let api = vm.api.display().to_string();
    let args = [
        "device",
        "path",
        id,
        role,
        "--json",
        "--drain-ms",
        "5000",
        "--api-socket",
        &api,
    ];
    let (code, out, err) = tandem(&args).await?;
    let v: Result<Value> = serde_json::from_str(&out)
        .with_context(|| format!("tandem device path {id} {role} ({code}): {out}{err}"));
    if let Ok(v) = &v {
        if code == 0 && v["guest"]["status"] == "ok" {
            return Ok(v.clone());
        }
    }
    let vol = vm
        .console
        .check("cat /sys/kernel/debug/tandem/volumes; dmesg | tail -20")
        .await
        .unwrap_or_default();
    match v {
        Ok(v) => anyhow::bail!("tandem device path {id} {role}: {v}\nguest:\n{vol}"),
        Err(e) => Err(e.context(format!("guest:\n{vol}"))),
    }
}

/// A field of the guest's `volumes` line for tandem0.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

pub(crate) async fn volume(c: &mut Console) -> Result<String> {
    let out = c.check("cat /sys/kernel/debug/tandem/volumes").await?;
    out.lines()
        .find(|l| l.starts_with("tandem0 "))
        .map(str::to_owned)
        .with_context(|| format!("no tandem0 in the guest's volumes: {out:?}"))
}

fn num(line: &str, key: &str) -> Result<u64> {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line:?}"))
}

/// The pieces of one scenario: a VM with `disk` as a vhost-blk disk, a
/// device server whose VF1's namespace is that disk as the VM's backend
/// lends it (its volume socket), `/dev/tandem0` over both paths.
struct Rig {
    vm: Booted,
    srv: NvmeServer,
    disk: std::path::PathBuf,
    /// The backend's volume socket: the VF's namespace.
    volume: std::path::PathBuf,
    work: std::path::PathBuf,
}

/// `disk_name`: a `.qcow2` name makes a qcow2 volume (multi-path through
/// the one backend), anything else a raw file.
async fn rig(w: &Path, name: &str, disk_name: &str) -> Result<Rig> {
    let disk = w.join(disk_name);
    crate::nvme::create_disk(&disk)?;
    let lent_on = w.join("disk0.volume");
    let spec = format!(
        "path={},if=vhost-blk,volume={}",
        disk.display(),
        lent_on.display()
    );
    let mut vm = boot_tandem(w, name, &["--disk", &spec, "--cpus", "2", "--memory", "1G"]).await?;
    println!(
        "booted in {:.2}s with {} as virtio-blk (vhost-user-blk backend, lending it on {})",
        vm.boot_s,
        disk.display(),
        lent_on.display()
    );
    let srv = start_server(w, std::slice::from_ref(&lent_on)).await?;
    crate::tandem_ok(&["nvme", "vfs", "1", "--dir", &srv.dir.display().to_string()]).await?;
    path_op(&mut vm, "disk0", "synthetic").await?;
    let (out, st) = vm
        .console
        .run("test -b /dev/tandem0", Duration::from_secs(10))
        .await?;
    ensure!(st == 0, "no /dev/tandem0 after path synthetic: {out}");
    let (ctrl, bdf) = attach(&mut vm, &srv.dir, 1).await?;
    println!("VF1 hot-plugged at {bdf} ({ctrl}), its namespace the same disk through the backend's volume socket");
    let v = path_op(&mut vm, "nvme-vf1", "direct").await?;
    ensure!(
        v["guest"]["active_path"] == true,
        "VF1 not the active path: {v}"
    );
    let line = volume(&mut vm.console).await?;
    ensure!(field(&line, "active") == Some("direct"), "volume: {line}");
    println!("/dev/tandem0: synthetic vda + direct {ctrl}n1, I/O on the direct path");
    Ok(Rig {
        vm,
        srv,
        disk,
        volume: lent_on,
        work: w.to_path_buf(),
    })
}

impl Rig {
    /// Kills the device server (a surprise removal for the guest), waits
    /// for the volume to lose the path, restarts the server and puts the VF
    /// back as the direct path. Returns the seconds until the loss.
    async fn surprise(&mut self) -> Result<f64> {
        let losses = num(&volume(&mut self.vm.console).await?, "losses")?;
        let pid = self.srv.pid().context("device server pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let killed = Instant::now();
        self.srv.reap().await;
        let lost = loop {
            let line = volume(&mut self.vm.console).await?;
            if num(&line, "losses")? > losses && field(&line, "active") == Some("synthetic") {
                break killed.elapsed().as_secs_f64();
            }
            ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "the volume did not lose its direct path 60 s after the device server was killed: {line}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // The VF must be gone from the guest before it can come back.
        let begun = Instant::now();
        loop {
            let n = self
                .vm
                .console
                .check("ls /sys/class/nvme 2>/dev/null | wc -l")
                .await?;
            if n.trim() == "0" {
                break;
            }
            ensure!(
                begun.elapsed() < Duration::from_secs(30),
                "VF still in the guest 30 s after the kill"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.srv = start_server(&self.work, std::slice::from_ref(&self.volume)).await?;
        crate::tandem_ok(&[
            "nvme",
            "vfs",
            "1",
            "--dir",
            &self.srv.dir.display().to_string(),
        ])
        .await?;
        // Back as an operator would put it: attached, and made the direct
        // path as soon as the guest's PCI core has the function, its nvme
        // driver perhaps still probing (PATH_DIRECT waits for the disk).
        let dir = self.srv.dir.display().to_string();
        let api = self.vm.api.display().to_string();
        crate::tandem_ok(&[
            "device",
            "attach",
            "nvme-vf1",
            "--nvme-dir",
            &dir,
            "--vf",
            "1",
            "--api-socket",
            &api,
        ])
        .await?;
        let begun = Instant::now();
        let seen = loop {
            let (v, out) = crate::nvme::vf1_report(&self.vm).await?;
            if v["guest"]["present"] == true {
                break v;
            }
            ensure!(
                begun.elapsed() < Duration::from_secs(60),
                "the guest does not see VF1 60 s after its attach: {out}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let v = path_op(&mut self.vm, "nvme-vf1", "direct").await?;
        ensure!(
            v["guest"]["active_path"] == true,
            "VF1 not the active path after PATH_DIRECT: {v}"
        );
        println!(
            "VF1 re-attached; PATH_DIRECT sent when the guest first saw it (driver {}, {} disks then): direct again",
            seen["guest"]["driver"], seen["guest"]["disks"]
        );
        Ok(lost)
    }
}

const FIO_SECS: u32 = 75;

/// Starts fio with verify on /dev/tandem0 in the background.
pub(crate) async fn start_fio(c: &mut Console, secs: u32, qd: u32) -> Result<()> {
    c.check(&format!(
        "rm -f /tmp/fio.rc; ( (fio --name=v --filename=/dev/tandem0 --rw=randwrite --bs=4k \
         --size=128M --ioengine=libaio --direct=1 --iodepth={qd} --time_based --runtime={secs} \
         --verify=crc32c --verify_backlog=256 --verify_fatal=1 --randrepeat=0; \
         echo $? > /tmp/fio.rc) > /tmp/fio.out 2>&1 & )"
    ))
    .await?;
    Ok(())
}

/// Waits for the background fio; fails on any error it reported.
pub(crate) async fn finish_fio(c: &mut Console, limit: Duration) -> Result<String> {
    let begun = Instant::now();
    loop {
        let rc = c.check("cat /tmp/fio.rc 2>/dev/null; true").await?;
        if !rc.trim().is_empty() {
            let out = c.check("cat /tmp/fio.out").await?;
            ensure!(
                rc.trim() == "0" && out.contains("err= 0"),
                "fio on /dev/tandem0 failed (exit {rc}):\n{}",
                tail(&out, 30)
            );
            return Ok(out);
        }
        ensure!(
            begun.elapsed() < limit,
            "fio did not finish within {limit:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// fio's largest completion latency in ms ("clat (usec): min=.., max=..").
fn clat_max_ms(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with("clat ("))?;
    let unit = if line.contains("(nsec)") {
        1e-6
    } else if line.contains("(usec)") {
        1e-3
    } else if line.contains("(msec)") {
        1.0
    } else {
        1e3
    };
    let max = line.split("max=").nth(1)?;
    let v: String = max
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut n: f64 = v.parse().ok()?;
    if max[v.len()..].starts_with('k') {
        n *= 1e3;
    }
    Some(n * unit)
}

async fn guest_clean(c: &mut Console) -> Result<()> {
    let dmesg = c.check("dmesg").await?;
    for bad in ["Oops", "BUG:", "WARNING:", "panic", "job queue full"] {
        ensure!(
            !dmesg.contains(bad),
            "guest kernel reported {bad}:\n{}",
            tail(&dmesg, 40)
        );
    }
    Ok(())
}

pub async fn e2e() -> Result<()> {
    let work = tempdir()?;
    // qcow2: a layered image can be multi-path, since both paths go
    // through the VM's one backend.
    let mut r = rig(work.path(), "e2e-failover", "shared.qcow2").await?;
    start_fio(&mut r.vm.console, FIO_SECS, 8).await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 20 host-driven switches (10 to synthetic, 10 back to direct) and two
    // surprise removals, spread over fio's run.
    let mut switches = 0u32;
    let mut surprises = Vec::new();
    for i in 0..10 {
        let v = path_op(&mut r.vm, "nvme-vf1", "release").await?;
        ensure!(
            v["guest"]["path"] == false,
            "VF1 still a path after release: {v}"
        );
        let off_us = v["guest"]["drain_us"].clone();
        switches += 1;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let v = path_op(&mut r.vm, "nvme-vf1", "direct").await?;
        ensure!(
            v["guest"]["active_path"] == true,
            "VF1 not active after direct: {v}"
        );
        switches += 1;
        println!(
            "switches {}-{switches}: to synthetic and back to direct (I/O held {off_us} us and {} us)",
            switches - 1,
            v["guest"]["drain_us"]
        );
        if i == 3 || i == 7 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let s = r.surprise().await?;
            println!("surprise removal {}: device server killed under fio; the volume fell back {s:.1} s later; VF back as the direct path", surprises.len() + 1);
            surprises.push(s);
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let elapsed = started.elapsed();
    ensure!(
        elapsed < Duration::from_secs(u64::from(FIO_SECS)),
        "the switches took {elapsed:?}, longer than fio's {FIO_SECS} s run"
    );
    let out = finish_fio(
        &mut r.vm.console,
        Duration::from_secs(u64::from(FIO_SECS) + 300),
    )
    .await?;
    let line = volume(&mut r.vm.console).await?;
    println!("guest volume: {line}");
    ensure!(
        num(&line, "errors_to_app")? == 0,
        "errors reached the application: {line}"
    );
    ensure!(
        num(&line, "losses")? == surprises.len() as u64,
        "the guest counted other losses than the {} surprise removals: {line}",
        surprises.len()
    );
    let guest_switches = num(&line, "switches")?;
    ensure!(
        guest_switches >= 22,
        "the guest counted {guest_switches} switches: {line}"
    );
    let blackout_us = num(&line, "max_blackout_us")?;
    let gap_us = num(&line, "max_switch_gap_us")?;
    let clat = clat_max_ms(&out).unwrap_or(f64::NAN);
    guest_clean(&mut r.vm.console).await?;
    volume_lifecycle(&mut r.vm).await?;
    let backend = crate::vhost::backend_info(&crate::vhost::backend_api(&r.vm)).await?;
    let c = &backend["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    ensure!(
        n("lent_writes") > 0 && n("writes") > 0 && n("errors") == 0 && n("lent_errors") == 0,
        "both paths should have written through the one backend, without error: {backend}"
    );
    println!(
        "the VM's one backend served {} virtio-blk writes (synthetic path) and {} of the VF's namespace (direct path, through the volume socket), no error",
        n("writes"),
        n("lent_writes")
    );
    // Each surprise removal fenced the volume before the guest could see
    // the VF gone (so nothing the killed server sent lands after the
    // guest's re-issue); each new VF lifted the fence.
    let lending = &backend["lending"];
    let fences = lending["fences"].as_u64().unwrap_or(0);
    ensure!(
        fences >= surprises.len() as u64 && lending["fenced"] == false,
        "the volume should have been fenced at each of the {} surprise removals and be open to the VF now: {backend}",
        surprises.len()
    );
    println!(
        "the volume socket was fenced {fences} times (each removal of the VF, before the guest saw it); {} lent requests dropped unrun",
        lending["dropped"].as_u64().unwrap_or(0)
    );
    let api = r.vm.api.display().to_string();
    let (code, _, err) = tandem(&["shutdown", "--api-socket", &api, "--timeout", "60"]).await?;
    ensure!(code == 0, "shutdown: {err}");
    let _ = tokio::time::timeout(Duration::from_secs(60), r.vm.child.wait()).await;
    let (code, report) = crate::nvme::qemu_img_check(&r.disk).await?;
    ensure!(
        code == Some(0),
        "qemu-img check of the multi-path qcow2 volume after the run: {code:?}\n{report}"
    );
    println!(
        "the qcow2 volume after fio, 20 switches and 2 surprise removals: qemu-img check exit 0 ({})",
        report.lines().last().unwrap_or("").trim()
    );
    println!(
        "fio randwrite QD8 with verify for {FIO_SECS} s on /dev/tandem0: no error; largest I/O latency {clat:.0} ms (includes the surprise removals: the killed server's I/O waits for the VF's removal); {} re-issued",
        num(&line, "reissued")?
    );
    println!(
        "PASS failover switches={guest_switches} blackout_ms_max={:.1} switch_gap_ms_max={:.1} surprises={} clat_max_ms={clat:.0}",
        blackout_us as f64 / 1000.0,
        gap_us as f64 / 1000.0,
        surprises.len()
    );
    Ok(())
}

/// The guest's answer to `tandem device path ID ROLE` ("ok", "busy", ...).
async fn path_status(vm: &Booted, id: &str, role: &str) -> Result<String> {
    let api = vm.api.display().to_string();
    let args = ["device", "path", id, role, "--json", "--api-socket", &api];
    let (code, out, err) = tandem(&args).await?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("tandem device path {id} {role} ({code}): {out}{err}"))?;
    Ok(v["guest"]["status"].as_str().unwrap_or("").to_owned())
}

/// A volume is deleted by releasing its synthetic path, only when unused,
/// and comes back with its data by naming the path again.
async fn volume_lifecycle(vm: &mut Booted) -> Result<()> {
    let c = &mut vm.console;
    c.check("test -b /dev/tandem0").await?;
    let sum = "dd if=/dev/tandem0 bs=1M count=8 iflag=direct 2>/dev/null | md5sum";
    let before = c.check(sum).await?;
    path_op(vm, "nvme-vf1", "direct").await?;
    let st = path_status(vm, "disk0", "release").await?;
    ensure!(st == "busy", "deleting a volume with a direct path: {st}");
    path_op(vm, "nvme-vf1", "release").await?;
    let c = &mut vm.console;
    c.check("exec 9</dev/tandem0").await?;
    let st = path_status(vm, "disk0", "release").await?;
    ensure!(st == "busy", "deleting an open volume: {st}");
    let c = &mut vm.console;
    c.check("exec 9<&-").await?;
    path_op(vm, "disk0", "release").await?;
    let c = &mut vm.console;
    c.check("test ! -e /dev/tandem0").await?;
    path_op(vm, "disk0", "synthetic").await?;
    let c = &mut vm.console;
    c.check("udevadm settle 2>/dev/null; for i in $(seq 50); do test -b /dev/tandem0 && break; sleep 0.1; done; test -b /dev/tandem0").await?;
    let after = c.check(sum).await?;
    ensure!(
        before == after,
        "the volume came back with other data: {before} vs {after}"
    );
    println!("volume deleted by releasing its synthetic path (refused while it had a direct path, and while open), then back over disk0 with the same data");
    Ok(())
}

/// fio's write IOPS ("write: IOPS=1234," or "IOPS=1.2k,").
fn write_iops(out: &str) -> Option<f64> {
    crate::nvme::fio_iops(out, "write")
}

/// The switch time measured by the guest's handoff (how long new I/O was
/// held), and fio's worst completion latency with switches against the
/// same fio run without them, on the same VM (median of `runs` switches in
/// each direction).
pub async fn bench(runs: usize) -> Result<()> {
    let work = tempdir()?;
    let mut r = rig(work.path(), "bench-failover", "shared.raw").await?;
    let n = runs.max(5);
    let secs = u32::try_from(n * 2 + 10).unwrap_or(60);
    // Baseline: the same fio on the direct path, no switch.
    start_fio(&mut r.vm.console, secs, 16).await?;
    let base = finish_fio(
        &mut r.vm.console,
        Duration::from_secs(u64::from(secs) + 300),
    )
    .await?;
    start_fio(&mut r.vm.console, secs, 16).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut to_syn = Vec::new();
    let mut to_dir = Vec::new();
    for _ in 0..n {
        let v = path_op(&mut r.vm, "nvme-vf1", "release").await?;
        to_syn.push(v["guest"]["drain_us"].as_u64().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let v = path_op(&mut r.vm, "nvme-vf1", "direct").await?;
        to_dir.push(v["guest"]["drain_us"].as_u64().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let with = finish_fio(
        &mut r.vm.console,
        Duration::from_secs(u64::from(secs) + 300),
    )
    .await?;
    let line = volume(&mut r.vm.console).await?;
    let gap_ms = num(&line, "max_switch_gap_us")? as f64 / 1000.0;
    let steady_ms = num(&line, "max_gap_us")? as f64 / 1000.0;
    let med = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let max = to_syn.iter().chain(&to_dir).copied().max().unwrap_or(0);
    let (c0, c1) = (
        clat_max_ms(&base).unwrap_or(f64::NAN),
        clat_max_ms(&with).unwrap_or(f64::NAN),
    );
    let (i0, i1) = (
        write_iops(&base).unwrap_or(f64::NAN),
        write_iops(&with).unwrap_or(f64::NAN),
    );
    println!(
        "handoff hold per switch under fio randwrite QD16 with verify: to synthetic median {} us, to direct median {} us, largest {} us (goal < 10000 us)",
        med(&mut to_syn),
        med(&mut to_dir),
        max
    );
    println!(
        "fio worst completion latency: {c1:.1} ms with {} switches vs {c0:.1} ms without ({:.2}x); IOPS {i1:.0} vs {i0:.0} ({:.2}x)",
        2 * n,
        c1 / c0,
        i1 / i0
    );
    println!(
        "largest gap between application completions during a switch: {gap_ms:.1} ms (goal < 10 ms); outside switches, in the same runs: {steady_ms:.1} ms"
    );
    let mut per_switch: Vec<u64> = line
        .split("switch_gaps_us=")
        .nth(1)
        .unwrap_or("")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if !per_switch.is_empty() {
        let all = per_switch
            .iter()
            .map(|us| format!("{:.1}", *us as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(", ");
        let under = per_switch.iter().filter(|&&us| us < 10_000).count();
        println!(
            "each switch's largest gap (ms, in order): [{all}]; median {:.1} ms; {under} of {} below 10 ms",
            med(&mut per_switch) as f64 / 1000.0,
            per_switch.len()
        );
    }
    println!("guest volume: {line}");
    println!(
        "RESULT failover switch_gap_ms_max={gap_ms:.1} steady_gap_ms_max={steady_ms:.1} blackout_ms_max={:.2} clat_max_ms={c1:.1} baseline_clat_max_ms={c0:.1} switches={}",
        max as f64 / 1000.0,
        2 * n
    );
    drop(r);
    // The other half of F4/F1's figures: QEMU's downtime with and without
    // the assigned function, in the same run.
    crate::migrate_vf::bench(runs).await
}
