//! `e2e nvme` and `bench nvme`: the SR-IOV NVMe device served by
//! `tandem nvme serve`, its VFs hot-plugged into a real guest whose stock
//! `nvme` driver binds them; fio with verify, hot-remove and re-add, the
//! hostile-guest suite, and the device's counters and audit log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::boot::tempdir;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::boot::{boot_tandem, Booted};
use crate::guest::{tail, Console};
use crate::{spawn_tandem, tandem, tandem_ok};

pub(crate) const DISK_BYTES: u64 = 256 << 20;

/// The device server, running for the scenario's lifetime.
pub(crate) struct NvmeServer {
    child: tokio::process::Child,
    pub(crate) dir: PathBuf,
    #[allow(dead_code)] // kept for debugging a failed run (TANDEM_KEEP=1)
    pub(crate) log: PathBuf,
}

impl NvmeServer {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the server process to be gone (after a kill).
    pub(crate) async fn reap(&mut self) {
        let _ = self.child.wait().await;
    }
}

/// A namespace's disk, unless it exists: a qcow2 image (by `qemu-img`) for
/// a `.qcow2` path, else a sparse raw file.
pub(crate) fn create_disk(d: &Path) -> Result<()> {
    if d.exists() {
        return Ok(());
    }
    if d.extension().is_some_and(|e| e == "qcow2") {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(d)
            .arg(DISK_BYTES.to_string())
            .output()
            .context("qemu-img create")?;
        ensure!(
            out.status.success(),
            "qemu-img create {}: {}",
            d.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        std::fs::File::create(d)?.set_len(DISK_BYTES)?;
    }
    Ok(())
}

/// `qemu-img check` of a qcow2 image: its exit code and its report.
pub(crate) async fn qemu_img_check(image: &Path) -> Result<(Option<i32>, String)> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .await
        .context("qemu-img check")?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

pub(crate) async fn start_server(work: &Path, disks: &[PathBuf]) -> Result<NvmeServer> {
    start_server_with_pf(work, None, disks).await
}

/// As [`start_server`], with a namespace on the PF too.
async fn start_server_with_pf(
    work: &Path,
    pf_disk: Option<&Path>,
    disks: &[PathBuf],
) -> Result<NvmeServer> {
    let dir = work.join("nvme");
    let log = work.join("nvme-server.log");
    let mut args = vec![
        "nvme".to_string(),
        "serve".into(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    if let Some(d) = pf_disk {
        create_disk(d)?;
        args.push("--pf-disk".into());
        args.push(d.display().to_string());
    }
    for d in disks {
        create_disk(d)?;
        args.push("--vf-disk".into());
        args.push(d.display().to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let api = dir.join("api.sock");
    // A server killed earlier leaves its socket file behind.
    let _ = std::fs::remove_file(&api);
    let child = spawn_tandem(&argv, &log)?;
    let begun = Instant::now();
    while !api.exists() {
        if begun.elapsed() > Duration::from_secs(20) {
            bail!(
                "the NVMe device server did not come up:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(NvmeServer { child, dir, log })
}

pub(crate) async fn show(dir: &Path) -> Result<Value> {
    let out = tandem_ok(&[
        "nvme",
        "show",
        "--json",
        "--dir",
        &dir.display().to_string(),
    ])
    .await?;
    serde_json::from_str(&out).with_context(|| format!("bad JSON from tandem nvme show: {out}"))
}

/// Polls `tandem nvme show` for up to 10 s until `done` holds.
async fn show_until(dir: &Path, failure: &str, done: impl Fn(&Value) -> bool) -> Result<()> {
    let begun = Instant::now();
    loop {
        let info = show(dir).await?;
        if done(&info) {
            return Ok(());
        }
        ensure!(
            begun.elapsed() < Duration::from_secs(10),
            "{failure}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn vf_state(info: &Value, vf: u64) -> Result<&Value> {
    info["vfs"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["vf"] == vf))
        .map(|v| &v["function"])
        .with_context(|| format!("VF {vf} missing from {info}"))
}

/// Attaches VF `vf` and waits until the guest's nvme driver has a
/// namespace on it; returns (controller name, PCI address).
pub(crate) async fn attach(vm: &mut Booted, dir: &Path, vf: u16) -> Result<(String, String)> {
    attach_as(vm, &format!("nvme-vf{vf}"), dir, vf).await
}

/// As [`attach`], under the VM's device id `id` (`vf` 0 is the PF).
async fn attach_as(vm: &mut Booted, id: &str, dir: &Path, vf: u16) -> Result<(String, String)> {
    let api = vm.api.display().to_string();
    let before = vm
        .console
        .check("ls /sys/class/nvme 2>/dev/null; true")
        .await?;
    tandem_ok(&[
        "device",
        "attach",
        id,
        "--nvme-dir",
        &dir.display().to_string(),
        "--vf",
        &vf.to_string(),
        "--api-socket",
        &api,
    ])
    .await?;
    let begun = Instant::now();
    loop {
        let now = vm
            .console
            .check("ls /sys/class/nvme 2>/dev/null; true")
            .await?;
        let new: Vec<&str> = now
            .split_whitespace()
            .filter(|c| !before.split_whitespace().any(|b| b == *c))
            .collect();
        if let Some(ctrl) = new.first() {
            let ns = format!("/dev/{ctrl}n1");
            let (_, st) = vm
                .console
                .run(&format!("test -b {ns}"), Duration::from_secs(10))
                .await?;
            if st == 0 {
                let bdf = vm
                    .console
                    .check(&format!(
                        "basename $(readlink /sys/class/nvme/{ctrl}/device)"
                    ))
                    .await?;
                return Ok((ctrl.to_string(), bdf));
            }
        }
        if begun.elapsed() > Duration::from_secs(60) {
            let dmesg = vm.console.check("dmesg | tail -30").await?;
            bail!("VF {vf} attached but no nvme namespace appeared in the guest:\n{dmesg}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn detach(vm: &Booted, vf: u16) -> Result<()> {
    detach_id(vm, &format!("nvme-vf{vf}")).await
}

async fn detach_id(vm: &Booted, id: &str) -> Result<()> {
    tandem_ok(&[
        "device",
        "detach",
        id,
        "--api-socket",
        &vm.api.display().to_string(),
    ])
    .await?;
    Ok(())
}

/// Parses fio's "IOPS=12.3k," into a number.
pub(crate) fn fio_iops(out: &str, rw: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{rw}: IOPS=")))?;
    let v = line.split("IOPS=").nth(1)?.split(',').next()?;
    let (num, mult) = match v.strip_suffix('k') {
        Some(n) => (n, 1e3),
        None => match v.strip_suffix('M') {
            Some(n) => (n, 1e6),
            None => (v, 1.0),
        },
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// fio random writes with verification; fails on any error.
async fn fio_verify(c: &mut Console, dev: &str, qd: u32, secs: u32) -> Result<f64> {
    let cmd = format!(
        "fio --name=v --filename={dev} --rw=randwrite --bs=4k --size=128M --ioengine=libaio \
         --direct=1 --iodepth={qd} --time_based --runtime={secs} --verify=crc32c \
         --verify_backlog=256 --verify_fatal=1 --randrepeat=0 2>&1"
    );
    let (out, st) = c
        .run(&cmd, Duration::from_secs(u64::from(secs) + 240))
        .await?;
    ensure!(
        st == 0 && out.contains("err= 0"),
        "fio QD{qd} on {dev} failed (status {st}):\n{}",
        tail(&out, 30)
    );
    let iops = fio_iops(&out, "write").with_context(|| format!("no IOPS in fio output:\n{out}"))?;
    Ok(iops)
}

/// `tandem device <op> nvme-vf1 --json`: the guest driver stack's answer.
async fn guest_op(vm: &Booted, op: &str, extra: &[&str]) -> Result<Value> {
    let api = vm.api.display().to_string();
    let mut args = vec!["device", op, "nvme-vf1", "--json", "--api-socket", &api];
    args.extend_from_slice(extra);
    let (code, out, err) = tandem(&args).await?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("tandem device {op} ({code}): {out}{err}"))?;
    Ok(v)
}

/// `tandem device report nvme-vf1 --json`, for polling: the guest's
/// answer, or `Null` while it refuses (the function not there yet); and
/// the command's output, for an error message.
pub(crate) async fn vf1_report(vm: &Booted) -> Result<(Value, String)> {
    let api = vm.api.display().to_string();
    let (code, out, err) = tandem(&[
        "device",
        "report",
        "nvme-vf1",
        "--json",
        "--api-socket",
        &api,
    ])
    .await?;
    let v = if code == 0 {
        serde_json::from_str(&out).unwrap_or_default()
    } else {
        Value::Null
    };
    Ok((v, format!("{out}{err}")))
}

fn vf1_io(info: &Value) -> Result<u64> {
    let s = &vf_state(info, 1)?["controller"]["stats"];
    Ok(s["reads"].as_u64().unwrap_or(0) + s["writes"].as_u64().unwrap_or(0))
}

/// A device counter read from `tandem nvme show --json`.
type Counter<'a> = &'a dyn Fn(&Value) -> Result<u64>;

/// Reads 16 blocks of `dev` in the guest, bypassing its cache.
async fn reads(vm: &mut Booted, dev: &str, when: &str) -> Result<()> {
    let (_, st) = vm
        .console
        .run(
            &format!("dd if={dev} of=/dev/null bs=4k count=16 iflag=direct"),
            Duration::from_secs(60),
        )
        .await?;
    ensure!(st == 0, "reading {dev} {when} failed");
    Ok(())
}

/// F6 through the control channel: quiesce under fio (new I/O held in the
/// guest, nothing in flight, the device sees no command), resume (fio
/// finishes with verify and no error), a lease that ends by itself, and the
/// frozen policy refusing the guest's own function and controller resets.
async fn f6(vm: &mut Booted, dir: &Path, dev: &str, bdf: &str) -> Result<()> {
    let r = guest_op(vm, "report", &[]).await?;
    let g = &r["guest"];
    ensure!(
        g["status"] == "ok"
            && g["present"] == true
            && g["driver"] == "nvme"
            && g["enabled"] == true
            && g["bus_master"] == true
            && g["msix"] == true
            && g["disks"] == 1
            && g["power_state"] == "D0"
            && r["guest_address"] == bdf,
        "guest report of VF1: {r}"
    );
    println!(
        "F6 report: the guest sees {} bound to {}, enabled, bus master, MSI-X, D0, 1 disk",
        r["guest_address"], g["driver"]
    );
    vm.console
        .check(&format!(
            "{{ (fio --name=q --filename={dev} --rw=randwrite --bs=4k --size=64M --ioengine=libaio \
             --direct=1 --iodepth=16 --time_based --runtime=20 --verify=crc32c \
             --verify_backlog=256 --verify_fatal=1 --randrepeat=0; echo fio-exit=$?) \
             > /tmp/f6.log 2>&1 & }}"
        ))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The device server stops fetching VF1's I/O (host policy, enforced in
    // the device): the guest's requests stay in flight, the guest counts
    // them, and a quiesce cannot drain them in 500 ms ("timed out").
    let d = dir.display().to_string();
    tandem_ok(&["nvme", "policy", "--dir", &d, "--vf", "1", "--frozen"]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = guest_op(vm, "report", &[]).await?;
    let stuck = r["guest"]["in_flight"].as_u64().unwrap_or(0);
    let early = guest_op(vm, "quiesce", &["--drain-ms", "500", "--lease-ms", "60000"]).await;
    // Thaw first, whatever the guest said, so that its requests complete
    // long before the nvme driver's own timeout.
    tandem_ok(&["nvme", "policy", "--dir", &d, "--vf", "1"]).await?;
    let early = early?;
    ensure!(
        stuck > 0
            && early["guest"]["status"] == "timed out"
            && early["guest"]["quiesced"] == true
            && early["guest"]["in_flight"].as_u64().unwrap_or(0) > 0,
        "with the device frozen: report {r}, quiesce {early}"
    );
    // The device completes them; a second quiesce (a new lease) drains.
    let q = guest_op(
        vm,
        "quiesce",
        &["--drain-ms", "5000", "--lease-ms", "60000"],
    )
    .await?;
    let g = &q["guest"];
    ensure!(
        g["status"] == "ok" && g["quiesced"] == true && g["drained"] == true && g["in_flight"] == 0,
        "quiesce under fio: {q}"
    );
    let held_from = vf1_io(&show(dir).await?)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_to = vf1_io(&show(dir).await?)?;
    ensure!(
        held_from == held_to,
        "VF1 executed {} commands while quiesced",
        held_to - held_from
    );
    let r = guest_op(vm, "resume", &[]).await?;
    ensure!(
        r["guest"]["status"] == "ok" && r["guest"]["quiesced"] == false,
        "resume: {r}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let moving = vf1_io(&show(dir).await?)?;
    ensure!(moving > held_to, "no I/O reached VF1 after resume");
    println!(
        "F6 quiesce under fio QD16: with the device frozen {stuck} requests stayed in flight and the quiesce timed out; thawed, it drained in {} us (round trip {} us); no command reached the device for 2 s; resumed, I/O flows again",
        g["drain_us"], g["round_trip_us"]
    );
    let begun = Instant::now();
    let log = loop {
        let log = vm.console.check("cat /tmp/f6.log").await?;
        if log.contains("fio-exit=") {
            break log;
        }
        ensure!(
            begun.elapsed() < Duration::from_secs(180),
            "fio did not finish:\n{log}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    ensure!(
        log.contains("fio-exit=0") && log.contains("err= 0"),
        "fio across quiesce/resume failed:\n{}",
        tail(&log, 30)
    );
    println!("fio randwrite+verify across the quiesce: no errors");

    // A lease that runs out: the guest resumes by itself.
    let q = guest_op(vm, "quiesce", &["--drain-ms", "1000", "--lease-ms", "1500"]).await?;
    ensure!(q["guest"]["quiesced"] == true, "quiesce: {q}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = guest_op(vm, "report", &[]).await?;
    ensure!(
        r["guest"]["quiesced"] == false,
        "the lease did not end: {r}"
    );
    reads(vm, dev, "after the lease ended").await?;
    println!("F6 lease: a quiesce the host never resumed ended by itself after 1.5 s");

    // The frozen policy in the guest's filter: its own function reset and
    // a controller reset through sysfs are refused.
    let reset = format!("echo 1 > /sys/bus/pci/devices/{bdf}/reset");
    let ctrl = dev
        .trim_start_matches("/dev/")
        .trim_end_matches("n1")
        .to_owned();
    let ctrl_reset = format!("echo 1 > /sys/class/nvme/{ctrl}/reset_controller");
    let r = guest_op(vm, "guest-policy", &["--frozen"]).await?;
    ensure!(r["guest"]["frozen"] == true, "policy: {r}");
    let (out, st) = vm.console.run(&reset, Duration::from_secs(30)).await?;
    ensure!(st != 0, "a function reset went through while frozen: {out}");
    let resets = |v: &Value| {
        vf_state(v, 1).map(|f| {
            f["controller"]["stats"]["controller_resets"]
                .as_u64()
                .unwrap_or(0)
        })
    };
    let before = show(dir).await?;
    let (out, st) = vm.console.run(&ctrl_reset, Duration::from_secs(30)).await?;
    ensure!(
        st != 0 && resets(&show(dir).await?)? == resets(&before)?,
        "a controller reset went through while frozen: {out}"
    );
    let r = guest_op(vm, "guest-policy", &[]).await?;
    ensure!(r["guest"]["frozen"] == false, "policy: {r}");
    // Thawed, each reset reaches the device and the driver carries on.
    let flrs = |v: &Value| vf_state(v, 1).map(|f| f["function_resets"].as_u64().unwrap_or(0));
    let kinds: [(&str, &String, Counter); 2] = [
        ("controller reset", &ctrl_reset, &resets),
        ("function reset", &reset, &flrs),
    ];
    for (what, cmd, count) in kinds {
        let before = show(dir).await?;
        let (out, st) = vm.console.run(cmd, Duration::from_secs(60)).await?;
        ensure!(st == 0, "the {what} failed after the thaw: {out}");
        ensure!(
            count(&show(dir).await?)? > count(&before)?,
            "the {what} after the thaw did not reach the device"
        );
        reads(vm, dev, &format!("after its {what}")).await?;
    }
    println!("F6 policy: the guest refused its own function reset and controller reset of VF1 while frozen; after the thaw both reached the device (CC.EN toggled, FLR) and I/O works");
    Ok(())
}

pub async fn e2e() -> Result<()> {
    let work = tempdir()?;
    let w = work.path();
    // VF1's namespace is a qcow2 image (served through the disk layer),
    // VF2's a raw file.
    let disks = [w.join("vf1.qcow2"), w.join("vf2.raw")];
    let srv = start_server(w, &disks).await?;
    let dir = srv.dir.display().to_string();
    tandem_ok(&["nvme", "vfs", "2", "--dir", &dir]).await?;
    let info = show(&srv.dir).await?;
    ensure!(
        info["total_vfs"] == 2 && info["vfs"].as_array().map(Vec::len) == Some(2),
        "VFs not enabled: {info}"
    );
    ensure!(
        info["pf"]["sriov"] == serde_json::json!([true, 2]),
        "PF SR-IOV state: {}",
        info["pf"]["sriov"]
    );
    println!("device server up: PF with SR-IOV, 2 VFs enabled");

    let mut vm = boot_tandem(w, "e2e-nvme", &["--cpus", "2", "--memory", "1G"]).await?;
    println!("booted in {:.2}s", vm.boot_s);
    let (c1, bdf1) = attach(&mut vm, &srv.dir, 1).await?;
    let dev1 = format!("/dev/{c1}n1");
    let id = vm
        .console
        .check(&format!(
            "cat /sys/class/nvme/{c1}/model /sys/class/nvme/{c1}/serial"
        ))
        .await?;
    ensure!(
        id.contains("Tandem SR-IOV NVMe") && id.contains("-VF1"),
        "identify: {id}"
    );
    println!("VF1 hot-plugged at {bdf1}; the guest's nvme driver bound it as {c1} ({dev1})");

    // 1. fio with verify, QD1 then QD32.
    let qd1 = fio_verify(&mut vm.console, &dev1, 1, 30).await?;
    println!("fio randwrite+verify QD1 30 s: {qd1:.0} IOPS, no errors");
    let qd32 = fio_verify(&mut vm.console, &dev1, 32, 30).await?;
    println!("fio randwrite+verify QD32 30 s: {qd32:.0} IOPS, no errors");

    // 2. Hot-remove and re-add: the data written before is still there.
    let sum = vm
        .console
        .check(&format!("dd if={dev1} bs=1M count=16 2>/dev/null | md5sum"))
        .await?;
    vm.console.check("sync").await?;
    detach(&vm, 1).await?;
    let gone = vm
        .console
        .check(&format!(
            "test -e /sys/bus/pci/devices/{bdf1} && echo present || echo gone"
        ))
        .await?;
    ensure!(gone == "gone", "VF1 still in the guest after detach");
    let (c1, bdf1) = attach(&mut vm, &srv.dir, 1).await?;
    let dev1 = format!("/dev/{c1}n1");
    let again = vm
        .console
        .check(&format!("dd if={dev1} bs=1M count=16 2>/dev/null | md5sum"))
        .await?;
    ensure!(
        sum == again,
        "data changed across hot-remove/re-add: {sum} vs {again}"
    );
    println!(
        "VF1 hot-removed and re-added; first 16 MiB identical ({})",
        &sum[..sum.len().min(32)]
    );

    // 3. F6: the host acts on VF1's driver stack in the guest.
    f6(&mut vm, &srv.dir, &dev1, &bdf1).await?;

    // 4. The hostile suite on VF2 (unbound), doorbells on VF1 (in use).
    let (c2, bdf2) = attach(&mut vm, &srv.dir, 2).await?;
    vm.console
        .check(&format!("echo {bdf2} > /sys/bus/pci/drivers/nvme/unbind"))
        .await?;
    println!("VF2 at {bdf2} ({c2}) attached and unbound for the hostile suite");
    let before = show(&srv.dir).await?;
    let (out, st) = vm
        .console
        .run(
            &format!("tandem-nvme-hostile {bdf2} {bdf1}"),
            Duration::from_secs(120),
        )
        .await?;
    print!(
        "{}",
        out.lines()
            .filter(|l| l.starts_with("TEST "))
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    ensure!(st == 0, "hostile suite failed:\n{out}");
    let after = show(&srv.dir).await?;
    let v1 = vf_state(&after, 1)?;
    let v2 = vf_state(&after, 2)?;
    let stat = |v: &Value, k: &str| v["controller"]["stats"][k].as_u64().unwrap_or(0);
    let bad_doorbells =
        stat(v1, "invalid_doorbells") - stat(vf_state(&before, 1)?, "invalid_doorbells");
    ensure!(
        bad_doorbells >= 3,
        "VF1 counted {bad_doorbells} invalid doorbells, expected 3"
    );
    let faults = stat(v2, "dma_faults");
    ensure!(faults >= 1, "VF2 counted no DMA fault: {v2}");
    ensure!(
        after["pf"]["sriov"] == serde_json::json!([true, 2]),
        "the PF's SR-IOV state changed: {}",
        after["pf"]["sriov"]
    );
    let flrs = v2["function_resets"].as_u64().unwrap_or(0);
    let audit_out = tandem_ok(&["nvme", "audit", "--json", "--dir", &dir]).await?;
    let audit: Value = serde_json::from_str(&audit_out).context("tandem nvme audit --json")?;
    let records = audit["records"].as_array().cloned().unwrap_or_default();
    let mut by_register = std::collections::BTreeMap::<String, u64>::new();
    for r in &records {
        let key = format!(
            "{} {}.{} {}",
            r["action"].as_str().unwrap_or("?"),
            r["register"].as_str().unwrap_or("?"),
            r["field"].as_str().unwrap_or("?"),
            r["rule"].as_str().unwrap_or("?")
        );
        *by_register.entry(key).or_default() += 1;
    }
    println!("audit log: {} records", records.len());
    for (k, n) in &by_register {
        println!("  {n:>4} x {k}");
    }
    let denied = records
        .iter()
        .filter(|r| r["action"] != "translated")
        .count() as u64;
    let count = |pred: &dyn Fn(&Value) -> bool| records.iter().filter(|r| pred(r)).count();
    let vf2 = |r: &Value| {
        r["function"]["function"] == serde_json::json!({"vf": 2})
            || r["function"]["function"] == serde_json::json!({"Vf": 2})
    };
    let flr_denied = count(&|r| vf2(r) && r["rule"] == "flr" && r["action"] == "denied");
    ensure!(
        flr_denied >= 40,
        "the FLR storm was not rate-limited: {flr_denied} FLR writes denied\n{audit_out}"
    );
    let overlap = count(&|r| vf2(r) && r["rule"] == "bar-check" && r["action"] == "denied");
    ensure!(
        overlap >= 1,
        "the overlapping BAR was not denied\n{audit_out}"
    );
    let vf_enable = count(&|r| {
        vf2(r)
            && r["register"] == "unclaimed"
            && r["offset"]
                .as_u64()
                .is_some_and(|o| (0x100..0x140).contains(&o))
    });
    ensure!(
        vf_enable >= 2,
        "SR-IOV control written from a VF was not denied\n{audit_out}"
    );
    let identity = count(&|r| vf2(r) && r["register"] == "vendor-id");
    ensure!(
        identity >= 1,
        "the identity write was not audited\n{audit_out}"
    );
    // Enumeration sizes unimplemented BARs and the ROM with all-ones
    // writes; hardware ignores them silently, so the audit log must too.
    let enumeration = count(&|r| {
        let reg = r["register"].as_str().unwrap_or("");
        ["bar2", "bar3", "bar5", "expansion-rom"].contains(&reg)
    });
    ensure!(
        enumeration == 0,
        "enumeration writes were audited\n{audit_out}"
    );
    ensure!(
        v2["config_denied"].as_u64().unwrap_or(0) >= 40,
        "VF2's denial counter: {}",
        v2["config_denied"]
    );
    ensure!(
        v1["controller"]["shadow_doorbells"] == true,
        "the guest driver did not take shadow doorbells: {v1}"
    );
    println!("host side: VF1 invalid doorbells {bad_doorbells}, VF2 DMA faults {faults}, VF2 FLRs {flrs}, PF untouched");

    // 4. VF1's driver is unaffected: verify again.
    let post = fio_verify(&mut vm.console, &dev1, 8, 10).await?;
    println!("VF1 after the hostile suite: fio verify QD8 {post:.0} IOPS, no errors");
    let dmesg = vm.console.check("dmesg").await?;
    for bad in ["Oops", "BUG:", "WARNING:", "panic"] {
        ensure!(
            !dmesg.contains(bad),
            "guest kernel reported {bad}:\n{}",
            tail(&dmesg, 40)
        );
    }
    // 5. A guest that owns a PF enables VFs only as the host allows (on
    // VF2's root port: the VM has four).
    detach(&vm, 2).await?;
    guest_pf(&mut vm, w).await?;

    // 6. The device server killed mid-I/O: the guest sees the function go
    // (an error, not a hang), and every acknowledged write is on disk.
    let pid = srv.child.id().context("device server pid")?;
    vm.console
        .check(&format!(
            "(tandem-ackwrite write {dev1} 1000000 > /tmp/acks 2>&1 &)"
        ))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed = Instant::now();
    let mut srv = srv;
    let _ = srv.child.wait().await;
    println!("killed the NVMe device server (pid {pid}) with SIGKILL during synchronous writes");
    let last = loop {
        let out = vm.console.check("tail -n 1 /tmp/acks").await?;
        if out.starts_with("ERR") || out.starts_with("WROTE") {
            break out;
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "the guest writer neither failed nor finished 60 s after the kill: {out}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let failed_after = killed.elapsed();
    let acks = vm.console.check("grep -c ^ACK /tmp/acks").await?;
    let acked: u64 = acks.trim().parse().context("ACK count")?;
    ensure!(
        acked > 0 && last.starts_with("ERR"),
        "writer: {acked} acks, last line {last}"
    );
    // The host removes the function within half a second of the server's
    // death; the guest's ACPI eject and driver removal follow.
    let removed_by = Instant::now();
    loop {
        let present = vm
            .console
            .check(&format!(
                "test -e /sys/bus/pci/devices/{bdf1} && echo present || echo gone"
            ))
            .await?;
        if present == "gone" {
            break;
        }
        ensure!(
            removed_by.elapsed() < Duration::from_secs(30),
            "the guest still has VF1 30 s after its server died"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "guest writer failed cleanly {:.1} s after the kill ({last}); {acked} writes acknowledged; VF1 gone from the guest {:.1} s after the kill",
        failed_after.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    let srv = start_server(w, &disks).await?;
    tandem_ok(&["nvme", "vfs", "1", "--dir", &srv.dir.display().to_string()]).await?;
    let (c1, _) = attach(&mut vm, &srv.dir, 1).await?;
    let checked = vm
        .console
        .check(&format!("tandem-ackwrite check /dev/{c1}n1 {acked}"))
        .await?;
    ensure!(
        checked.contains(&format!("CHECKED {acked}")),
        "acknowledged writes lost: {checked}"
    );
    println!("server restarted, VF1 re-attached: all {acked} acknowledged blocks read back intact");
    detach(&vm, 1).await?;
    let mut srv = srv;
    if let Some(pid) = srv.pid() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
    }
    srv.reap().await;
    let (code, report) = qemu_img_check(&disks[0]).await?;
    // 3: leaked clusters only (the server was SIGKILLed once), no corruption.
    ensure!(
        matches!(code, Some(0 | 3)),
        "qemu-img check of VF1's qcow2 after the run: {code:?}\n{report}"
    );
    println!(
        "VF1's qcow2 image after the run (fio, hot-remove, SIGKILL, restart): qemu-img check exit {code:?}: {}",
        report.lines().last().unwrap_or("").trim()
    );

    println!("PASS nvme iops_qd32={qd32:.0} denied={denied} faults={faults}");
    drop(srv);
    Ok(())
}

/// Where the adapter's PF has its SR-IOV capability (`tandem-pci` places
/// the first extended capability at 0x100). QEMU's vfio leaves it out of
/// the chain the guest sees, so the guest tool is told.
const PF_SRIOV_AT: u16 = 0x100;

/// Runs `tandem-nvme-hostile pf-vfs` in the guest: (control, NumVFs) as
/// the PF's SR-IOV capability reads back afterwards.
async fn guest_enables_vfs(vm: &mut Booted, bdf: &str, count: u16) -> Result<(u64, u64)> {
    let out = vm
        .console
        .check(&format!(
            "tandem-nvme-hostile pf-vfs {bdf} {count} {PF_SRIOV_AT:#x}"
        ))
        .await?;
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|t| t.strip_prefix(k))
            .and_then(|v| {
                v.strip_prefix("0x")
                    .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
            })
    };
    match (field("control="), field("numvfs=")) {
        (Some(c), Some(n)) => Ok((c, n)),
        _ => bail!("pf-vfs printed: {out}"),
    }
}

/// A guest that owns a PF: its writes to the SR-IOV capability are denied
/// (and audited) until the host lets it manage VFs, then clamped to the
/// host's ceiling; a VF it enabled is a real function the host can hand
/// to a VM, and it goes when the guest disables it.
async fn guest_pf(vm: &mut Booted, w: &Path) -> Result<()> {
    let pw = w.join("pf-owner");
    std::fs::create_dir_all(&pw)?;
    let srv = start_server_with_pf(&pw, Some(&pw.join("pf.raw")), &[pw.join("vf1.raw")]).await?;
    let dir = srv.dir.display().to_string();
    let (pctrl, pbdf) = attach_as(vm, "nvme-pf", &srv.dir, 0).await?;
    let numvfs = vm
        .console
        .check(&format!(
            "test -e /sys/bus/pci/devices/{pbdf}/sriov_numvfs && echo listed || echo hidden"
        ))
        .await?;
    ensure!(
        numvfs == "hidden",
        "the guest's PCI core found the PF's SR-IOV capability; QEMU used to hide it"
    );
    println!("a second adapter's PF at {pbdf}: the guest's nvme driver bound it as {pctrl}; QEMU hides its SR-IOV capability (no sriov_numvfs)");

    // The host's default: the guest may not touch the SR-IOV control.
    let (ctl, num) = guest_enables_vfs(vm, &pbdf, 2).await?;
    let info = show(&srv.dir).await?;
    ensure!(
        ctl & 1 == 0 && num == 0 && info["vfs"].as_array().is_some_and(Vec::is_empty),
        "a PF owner enabled VFs without the host's leave: control {ctl:#x}, NumVFs {num}, {info}"
    );
    let audit_out = tandem_ok(&["nvme", "audit", "--json", "--dir", &dir]).await?;
    let audit: Value = serde_json::from_str(&audit_out).context("tandem nvme audit --json")?;
    let denied: Vec<&Value> = audit["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| {
                    r["register"]
                        .as_str()
                        .is_some_and(|g| g == "sriov.num-vfs" || g == "sriov.control")
                })
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        denied.len() >= 2,
        "the denied SR-IOV writes were not audited\n{audit_out}"
    );
    println!(
        "guest wrote NumVFs 2 and VF Enable on the PF it owns: denied (control {ctl:#x}, NumVFs {num}), {} audit records, no VF on the host",
        denied.len()
    );

    // Let it manage one VF: NumVFs 2 is clamped to 1, and the VF is real.
    tandem_ok(&[
        "nvme",
        "policy",
        "--dir",
        &dir,
        "--vf",
        "0",
        "--guest-vfs",
        "1",
    ])
    .await?;
    let (ctl, num) = guest_enables_vfs(vm, &pbdf, 2).await?;
    ensure!(
        ctl & 1 == 1 && num == 1,
        "with leave for 1 VF: control {ctl:#x}, NumVFs {num}"
    );
    show_until(
        &srv.dir,
        "the VF the guest enabled did not appear on the host",
        |i| {
            i["vfs"].as_array().map(Vec::len) == Some(1)
                && i["pf"]["sriov"] == serde_json::json!([true, 1])
        },
    )
    .await?;
    let (vctrl, vbdf) = attach_as(vm, "pf-vf1", &srv.dir, 1).await?;
    let (_, st) = vm
        .console
        .run(
            &format!("dd if=/dev/zero of=/dev/{vctrl}n1 bs=4k count=64 oflag=direct && dd if=/dev/{vctrl}n1 of=/dev/null bs=4k count=64 iflag=direct"),
            Duration::from_secs(60),
        )
        .await?;
    ensure!(st == 0, "I/O on the VF the guest enabled failed");
    println!("with leave for 1 VF: NumVFs 2 clamped to 1, VF Enable on (control {ctl:#x}); the host attached that VF at {vbdf} ({vctrl}) and I/O on it works");

    // The guest disables its VFs; the host's VF goes with them.
    detach_id(vm, "pf-vf1").await?;
    let (ctl, num) = guest_enables_vfs(vm, &pbdf, 0).await?;
    show_until(&srv.dir, "VF Enable off left the VF on the host", |i| {
        i["vfs"].as_array().is_some_and(Vec::is_empty)
    })
    .await?;
    detach_id(vm, "nvme-pf").await?;
    println!("the guest turned VF Enable off (control {ctl:#x}, NumVFs {num}): the VF is gone from the host; PF detached");
    drop(srv);
    Ok(())
}

/// One fio job; returns IOPS.
async fn fio_iops_of(c: &mut Console, dev: &str, rw: &str, qd: u32, secs: u32) -> Result<f64> {
    let cmd = format!(
        "fio --name=b --filename={dev} --rw={rw} --bs=4k --size=128M --ioengine=libaio \
         --direct=1 --iodepth={qd} --time_based --runtime={secs} --ramp_time=1 2>&1"
    );
    let (out, st) = c
        .run(&cmd, Duration::from_secs(u64::from(secs) + 120))
        .await?;
    ensure!(
        st == 0 && out.contains("err= 0"),
        "fio {rw} QD{qd} on {dev} failed:\n{}",
        tail(&out, 20)
    );
    let key = if rw.contains("read") { "read" } else { "write" };
    fio_iops(&out, key).with_context(|| format!("no IOPS in fio output:\n{out}"))
}

/// Finds the block device of the disk with serial `serial` (virtio-blk) or
/// model (nvme).
async fn find_dev(c: &mut Console, probe: &str) -> Result<String> {
    let out = c.check(probe).await?;
    let d = out.lines().last().unwrap_or("").trim().to_string();
    ensure!(!d.is_empty(), "no device from {probe:?}");
    Ok(d)
}

pub async fn bench(runs: usize) -> Result<()> {
    let work = tempdir()?;
    let w = work.path();
    let vf_disk = w.join("vf1.raw");
    let srv = start_server(w, std::slice::from_ref(&vf_disk)).await?;
    tandem_ok(&["nvme", "vfs", "1", "--dir", &srv.dir.display().to_string()]).await?;
    // Same kind of backing for all three: a sparse raw file of the same size
    // on the same filesystem, host page cache in use (QEMU: cache=writeback
    // is what `direct=off` gives).
    let qemu_nvme = w.join("qemu-nvme.raw");
    let virtio = w.join("virtio.raw");
    for p in [&qemu_nvme, &virtio] {
        std::fs::File::create(p)?.set_len(DISK_BYTES)?;
    }
    let d1 = format!("path={},if=nvme,direct=off", qemu_nvme.display());
    let d2 = format!("path={},if=virtio-blk,direct=off", virtio.display());
    let mut vm = boot_tandem(
        w,
        "bench-nvme",
        &[
            "--cpus", "2", "--memory", "1G", "--disk", &d1, "--disk", &d2,
        ],
    )
    .await?;
    let (ctrl, _) = attach(&mut vm, &srv.dir, 1).await?;
    let tandem_dev = format!("/dev/{ctrl}n1");
    let qemu_dev = find_dev(
        &mut vm.console,
        "for c in /sys/class/nvme/*; do if grep -q QEMU $c/model; then echo /dev/$(basename $c)n1; fi; done",
    )
    .await?;
    let virtio_dev = find_dev(&mut vm.console, "ls /dev/vd* | head -1").await?;
    println!("devices: tandem VF {tandem_dev}, QEMU nvme {qemu_dev}, virtio-blk {virtio_dev}");
    // Fill each once so reads hit allocated blocks everywhere.
    for d in [&tandem_dev, &qemu_dev, &virtio_dev] {
        vm.console
            .run(
                &format!("dd if=/dev/zero of={d} bs=1M count=128 oflag=direct 2>/dev/null"),
                Duration::from_secs(300),
            )
            .await?;
    }
    let secs = 8;
    println!("fio 4k, {secs} s per run, median of {runs}; IOPS");
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "workload", "tandem-vf", "qemu-nvme", "virtio-blk", "vs nvme", "vs virtio"
    );
    let mut ratios = Vec::new();
    for (rw, qd) in [
        ("randread", 1),
        ("randwrite", 1),
        ("randread", 32),
        ("randwrite", 32),
    ] {
        let mut fig = Vec::new();
        let mut all = Vec::new();
        for d in [&tandem_dev, &qemu_dev, &virtio_dev] {
            let mut v = Vec::new();
            for _ in 0..runs {
                v.push(fio_iops_of(&mut vm.console, d, rw, qd, secs).await?);
            }
            all.push(format!("{v:.0?}"));
            fig.push(crate::median(&mut v));
        }
        let (t, q, v) = (fig[0], fig[1], fig[2]);
        println!(
            "{:<14} {:>10.0} {:>10.0} {:>10.0} {:>8.2}x {:>8.2}x",
            format!("{rw} QD{qd}"),
            t,
            q,
            v,
            t / q,
            t / v
        );
        if runs > 1 {
            println!("  runs: {}", all.join(" "));
        }
        ratios.push(t / q);
    }
    let geo = ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64;
    println!(
        "tandem VF vs QEMU nvme, geometric mean: {:.2}x (goal >= 1.0x, aim 1.5x)",
        geo.exp()
    );
    // What to look at when a figure is far off: the VF's error and reset
    // counters, and what the guest's nvme driver complained about.
    let info = show(&srv.dir).await?;
    let stats = &vf_state(&info, 1)?["controller"]["stats"];
    println!(
        "tandem VF counters: {} controller resets, {} error completions, {} backend errors, {} DMA faults",
        stats["controller_resets"], stats["error_completions"], stats["backend_errors"], stats["dma_faults"]
    );
    let complaints = vm
        .console
        .check("dmesg | grep -iE 'nvme.*(timeout|abort|reset|error)' | tail -5; true")
        .await?;
    if !complaints.trim().is_empty() {
        println!("guest nvme messages:\n{complaints}");
    }
    Ok(())
}
