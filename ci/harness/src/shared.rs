//! `e2e shared-disk` and `bench shared-disk`: one disk file shared by VMs
//! through the SCSI tunnel (F7). The file server (`tandem share serve`)
//! runs in this namespace; each guest runs on its own simulated host (a
//! network namespace reached over a veth pair) with `--shared-disk`, and
//! drives the disk with its stock virtio-scsi driver and sg3-utils:
//! registrations with APTPL, a Write Exclusive - Registrants Only
//! reservation, fencing by PREEMPT, RESERVATION CONFLICT on the fenced
//! side, a file server killed and restarted with a write in flight, data
//! written by each owner in turn verified by the other, the operator's
//! clear.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::boot::{boot_tandem, tempdir, Booted};
use crate::guest::{tail, Console};
use crate::nvme::fio_iops;
use crate::{host, tandem_bin, tandem_ok};

const SERVER_IP: &str = "10.213.9.1";
const PORT: u16 = 3270;
const DISK: &str = "cluster/quorum.raw";
const DISK_BYTES: u64 = 64 << 20;
const KEY_A: &str = "0xa1";
const KEY_B: &str = "0xb1";
const KEY_B2: &str = "0xb2";

async fn ip(args: &[&str]) -> Result<()> {
    host("ip", args).await.map(|_| ())
}

/// A simulated host: a network namespace with a veth pair to this one,
/// `10.213.9.<4n+2>` inside, `10.213.9.<4n+1>` here; the file server's
/// address (`SERVER_IP`, on the first pair) is reached through it.
/// Removed on drop.
struct Host {
    ns: String,
    link: String,
}

impl Host {
    async fn create(n: u8) -> Result<Host> {
        let id = std::process::id() % 100_000;
        let h = Host {
            ns: format!("tdm-sd{n}-{id}"),
            link: format!("tdms{n}{id}"),
        };
        let peer = format!("tdmp{n}{id}");
        let here = format!("10.213.9.{}", 4 * n + 1);
        let there = format!("10.213.9.{}", 4 * n + 2);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &h.ns])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &h.ns]).await?;
        ip(&[
            "link", "add", &h.link, "type", "veth", "peer", "name", &peer,
        ])
        .await?;
        ip(&["link", "set", &peer, "netns", &h.ns]).await?;
        ip(&["addr", "add", &format!("{here}/30"), "dev", &h.link]).await?;
        ip(&["link", "set", &h.link, "up"]).await?;
        ip(&[
            "-n",
            &h.ns,
            "addr",
            "add",
            &format!("{there}/30"),
            "dev",
            &peer,
        ])
        .await?;
        ip(&["-n", &h.ns, "link", "set", &peer, "up"]).await?;
        ip(&["-n", &h.ns, "link", "set", "lo", "up"]).await?;
        if here != SERVER_IP {
            ip(&[
                "-n",
                &h.ns,
                "route",
                "add",
                &format!("{SERVER_IP}/32"),
                "via",
                &here,
            ])
            .await?;
        }
        Ok(h)
    }

    /// `tandem run` inside the namespace, with the console on a socket.
    async fn boot(&self, w: &Path, name: &str, extra: &[&str]) -> Result<Booted> {
        let api = w.join(format!("{name}.sock"));
        let serial = w.join(format!("{name}.serial"));
        let log = w.join(format!("{name}.log"));
        let logf = std::fs::File::create(&log)?;
        let begun = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(tandem_bin()?)
            .args(["run", "--name", name])
            .arg("--serial")
            .arg(format!("unix:{}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()?;
        let console = match Console::connect(&serial, Duration::from_secs(60)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill().await;
                bail!(
                    "{e:#}\ntandem's output:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let mut b = Booted {
            child,
            console,
            api,
            log,
            boot_s: 0.0,
        };
        b.console.wait_for_shell(Duration::from_secs(180)).await?;
        b.boot_s = begun.elapsed().as_secs_f64();
        Ok(b)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// `tandem share serve` in this namespace.
struct FileServer {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl FileServer {
    async fn start(w: &Path, dir: &Path, listen: &str, tag: &str) -> Result<FileServer> {
        let log = w.join(format!("fileserver-{tag}.log"));
        let logf = std::fs::File::create(&log)?;
        let child = Command::new(tandem_bin()?)
            .args(["share", "serve", "--dir"])
            .arg(dir)
            .args(["--listen", listen])
            .env("TANDEM_LOG", "warn,tandem_share=info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()?;
        let api = dir.join(".tandem-share/api.sock");
        let begun = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("tandem share serve:") && api.exists() {
                break;
            }
            if begun.elapsed() > Duration::from_secs(20) {
                bail!("the file server did not start:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(FileServer {
            child,
            dir: dir.to_path_buf(),
            log,
        })
    }

    /// SIGKILL: no clean shutdown of anything.
    async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }

    async fn list(&self) -> Result<Value> {
        let out = tandem_ok(&[
            "share",
            "list",
            "--json",
            "--dir",
            &self.dir.display().to_string(),
        ])
        .await?;
        serde_json::from_str(&out).with_context(|| format!("tandem share list: {out}"))
    }
}

/// The guest's SCSI disk of vendor `vendor` (e.g. /dev/sda).
async fn scsi_disk(c: &mut Console, vendor: &str) -> Result<String> {
    let cmd = format!(
        "for d in /sys/block/sd*; do if grep -q '{vendor}' $d/device/vendor; then echo /dev/$(basename $d); fi; done"
    );
    let begun = Instant::now();
    loop {
        let out = c.check(&cmd).await?;
        if let Some(d) = out.lines().find(|l| l.starts_with("/dev/sd")) {
            return Ok(d.trim().to_owned());
        }
        if begun.elapsed() > Duration::from_secs(60) {
            bail!(
                "no SCSI disk from {vendor}; the guest has: {}",
                c.check("ls /sys/block; dmesg | grep -i scsi | tail -5")
                    .await?
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs sg_persist with `args` on `dev`; its output, failing on error.
async fn prout(c: &mut Console, dev: &str, args: &str) -> Result<String> {
    // A unit attention (our registration was preempted, the reservation
    // changed) answers the first command after it: clear it first.
    drain_ua(c, dev).await?;
    c.check(&format!("sg_persist -n {args} {dev} 2>&1")).await
}

/// TEST UNIT READY until one passes: each failure reports one unit attention.
async fn drain_ua(c: &mut Console, dev: &str) -> Result<()> {
    c.check(&format!(
        "for i in 1 2 3 4 5 6 7 8; do sg_turs {dev} >/dev/null 2>&1 && break; done; true"
    ))
    .await
    .map(|_| ())
}

/// WRITE(10) of one 512-byte block at `lba` with sg_raw: whether the
/// target answered RESERVATION CONFLICT (any other failure is an error).
async fn write_conflicts(c: &mut Console, dev: &str, lba: u32) -> Result<bool> {
    drain_ua(c, dev).await?;
    let b = lba.to_be_bytes();
    let cmd = format!(
        "dd if=/dev/urandom of=/tmp/blk bs=512 count=1 2>/dev/null; \
         sg_raw -s 512 -i /tmp/blk {dev} 2a 00 {:02x} {:02x} {:02x} {:02x} 00 00 01 00 2>&1",
        b[0], b[1], b[2], b[3]
    );
    let (out, st) = c.run(&cmd, Duration::from_secs(60)).await?;
    if out.to_lowercase().contains("reservation conflict") {
        return Ok(true);
    }
    ensure!(
        st == 0,
        "sg_raw WRITE failed otherwise (status {st}):\n{out}"
    );
    Ok(false)
}

/// Writes `mib` MiB of fresh random data at MiB `at` through the block
/// layer; returns its md5.
async fn write_pattern(c: &mut Console, dev: &str, at: u32, mib: u32) -> Result<String> {
    let out = c
        .check(&format!(
            "dd if=/dev/urandom of=/tmp/pat bs=1M count={mib} 2>/dev/null && \
             dd if=/tmp/pat of={dev} bs=1M seek={at} oflag=direct conv=fsync 2>&1 >/dev/null && \
             md5sum < /tmp/pat"
        ))
        .await?;
    md5_of(&out)
}

fn md5_of(out: &str) -> Result<String> {
    let s = out
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default();
    ensure!(s.len() == 32, "no md5 in {out:?}");
    Ok(s.to_owned())
}

async fn read_md5(c: &mut Console, dev: &str, at: u32, mib: u32) -> Result<String> {
    let out = c
        .check(&format!(
            "dd if={dev} bs=1M skip={at} count={mib} iflag=direct 2>/dev/null | md5sum"
        ))
        .await?;
    md5_of(&out)
}

fn registrations(list: &Value) -> Vec<(String, String)> {
    list[0]["registrations"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["initiator"].as_str().unwrap_or("").to_owned(),
                        r["key"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub async fn e2e() -> Result<()> {
    let work = tempdir()?;
    let w = work.path();
    let dir = w.join("served");
    std::fs::create_dir_all(&dir)?;
    let dir_s = dir.display().to_string();
    let out = tandem_ok(&["share", "create", "--dir", &dir_s, DISK, "--size", "64M"]).await?;
    ensure!(out.contains("created shared disk"), "share create: {out}");
    let host_a = Host::create(0).await?;
    let host_b = Host::create(1).await?;
    let listen = format!("{SERVER_IP}:{PORT}");
    let mut server = FileServer::start(w, &dir, &listen, "1").await?;
    println!(
        "file server on {listen} serving {dir_s}; hosts: namespaces {} and {}",
        host_a.ns, host_b.ns
    );
    let shared = format!("server={listen},disk={DISK}");
    let machine = ["--shared-disk", shared.as_str(), "--memory", "512M"];
    let mut a = host_a.boot(w, "sd-a", &machine).await?;
    let mut b = host_b.boot(w, "sd-b", &machine).await?;
    println!("guests booted in {:.1}s and {:.1}s", a.boot_s, b.boot_s);
    let da = scsi_disk(&mut a.console, "TANDEM").await?;
    let db = scsi_disk(&mut b.console, "TANDEM").await?;
    let sectors = a
        .console
        .check(&format!("cat /sys/block/{}/size", &da[5..]))
        .await?;
    ensure!(
        sectors == (DISK_BYTES / 512).to_string(),
        "the shared disk has {sectors} sectors"
    );
    println!("each guest's virtio-scsi sees the shared disk: A {da}, B {db}, {sectors} sectors");

    let mut conflicts = 0;
    let mut preempts = 0;
    // Both register, with APTPL; A reserves Write Exclusive - Registrants Only.
    prout(
        &mut a.console,
        &da,
        &format!("--out --register --param-sark={KEY_A} --param-aptpl"),
    )
    .await?;
    prout(
        &mut b.console,
        &db,
        &format!("--out --register --param-sark={KEY_B} --param-aptpl"),
    )
    .await?;
    prout(
        &mut a.console,
        &da,
        &format!("--out --reserve --param-rk={KEY_A} --prout-type=5"),
    )
    .await?;
    let keys = prout(&mut b.console, &db, "--in --read-keys").await?;
    ensure!(
        keys.contains(KEY_A) && keys.contains(KEY_B),
        "B reads the keys: {keys}"
    );
    let res = prout(&mut b.console, &db, "--in --read-reservation").await?;
    ensure!(
        res.contains(KEY_A)
            && res
                .to_lowercase()
                .contains("write exclusive, registrants only"),
        "B reads the reservation: {res}"
    );
    println!("A and B registered (APTPL), A holds Write Exclusive - Registrants Only");
    let a1 = write_pattern(&mut a.console, &da, 1, 4).await?;
    println!("A (holder) wrote 4 MiB at 1 MiB: md5 {a1}");

    // The file server is killed with a write of A in flight; it comes back.
    server.kill().await?;
    let (written, restarted) = tokio::join!(write_pattern(&mut a.console, &da, 5, 2), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        FileServer::start(w, &dir, &listen, "2").await
    });
    server = restarted?;
    let a2 = written.context("A's write across the file server restart")?;
    println!("file server killed (SIGKILL) and restarted; A's write in flight meanwhile completed");
    let list = server.list().await?;
    let regs = registrations(&list);
    ensure!(
        regs.len() == 2 && list[0]["reservation"]["code"] == 5 && list[0]["aptpl"] == true,
        "after the restart the server has: {list}"
    );
    let res = prout(&mut b.console, &db, "--in --read-reservation").await?;
    ensure!(res.contains(KEY_A), "after the restart B reads: {res}");
    println!(
        "after the restart: {} registrations and A's reservation restored (APTPL)",
        regs.len()
    );
    ensure!(
        read_md5(&mut b.console, &db, 5, 2).await? == a2,
        "B does not read what A wrote across the restart"
    );

    // A fences B: B's writes fail with RESERVATION CONFLICT.
    prout(
        &mut a.console,
        &da,
        &format!("--out --preempt --param-rk={KEY_A} --param-sark={KEY_B} --prout-type=5"),
    )
    .await?;
    preempts += 1;
    ensure!(
        write_conflicts(&mut b.console, &db, 100).await?,
        "B's write after being preempted did not conflict"
    );
    conflicts += 1;
    let (out, st) = b
        .console
        .run(
            &format!("dd if=/dev/zero of={db} bs=4k count=1 seek=300 oflag=direct 2>&1"),
            Duration::from_secs(60),
        )
        .await?;
    ensure!(
        st != 0,
        "B's block-layer write succeeded while fenced: {out}"
    );
    ensure!(
        !write_conflicts(&mut a.console, &da, 100).await?,
        "the holder's write conflicted"
    );
    println!("A preempted B: B's WRITE gets RESERVATION CONFLICT (and its dd fails); A writes");

    // B comes back and preempts A: now A's writes fail.
    prout(
        &mut b.console,
        &db,
        &format!("--out --register --param-sark={KEY_B2} --param-aptpl"),
    )
    .await?;
    prout(
        &mut b.console,
        &db,
        &format!("--out --preempt --param-rk={KEY_B2} --param-sark={KEY_A} --prout-type=5"),
    )
    .await?;
    preempts += 1;
    ensure!(
        write_conflicts(&mut a.console, &da, 200).await?,
        "A's write after being preempted did not conflict"
    );
    conflicts += 1;
    let res = prout(&mut a.console, &da, "--in --read-reservation").await?;
    ensure!(res.contains(KEY_B2), "A reads the reservation: {res}");
    println!("B registered again and preempted A: A's WRITE gets RESERVATION CONFLICT");

    // The new owner verifies the old owner's data and writes its own, with
    // fio verify; the old owner (who may still read) verifies B's data.
    ensure!(
        read_md5(&mut b.console, &db, 1, 4).await? == a1,
        "B does not read what A wrote as owner"
    );
    let fio = format!(
        "fio --name=v --filename={db} --rw=randwrite --bs=4k --offset=16M --size=16M \
         --ioengine=libaio --direct=1 --iodepth=8 --time_based --runtime=10 --verify=crc32c \
         --verify_backlog=256 --verify_fatal=1 --randrepeat=0 2>&1"
    );
    let (out, st) = b.console.run(&fio, Duration::from_secs(240)).await?;
    ensure!(
        st == 0 && out.contains("err= 0"),
        "fio on B failed (status {st}):\n{}",
        tail(&out, 20)
    );
    let b1 = write_pattern(&mut b.console, &db, 40, 4).await?;
    ensure!(
        read_md5(&mut a.console, &da, 40, 4).await? == b1,
        "A does not read what B wrote as owner"
    );
    println!(
        "data verifies: B reads A's 4 MiB, fio randwrite+verify on B err=0, A reads B's 4 MiB"
    );

    // The operator clears the reservations: A may write again.
    let out = tandem_ok(&["share", "clear", "--dir", &dir_s, "--disk", DISK]).await?;
    ensure!(out.contains("cleared"), "share clear: {out}");
    let list = server.list().await?;
    ensure!(
        registrations(&list).is_empty() && list[0]["reservation"].is_null(),
        "after the clear: {list}"
    );
    ensure!(
        !write_conflicts(&mut a.console, &da, 200).await?,
        "A's write after the operator's clear conflicted"
    );
    let human = tandem_ok(&["share", "list", "--dir", &dir_s]).await?;
    ensure!(
        human.contains("tandem.sd-a@") && human.contains("tandem.sd-b@"),
        "tandem share list names the initiators:\n{human}"
    );
    println!("operator: tandem share clear removed every registration; A writes again");

    // Nothing ran twice: the backends' view of the tunnel.
    for (vm, name) in [(&a, "A"), (&b, "B")] {
        let api = vm.api.with_extension("devices").join("vhost-shared0.api");
        let out = backend_info(&api).await?;
        let info: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("backend info {out}"))?;
        ensure!(
            info["failed"] == 0 && info["reconnects"].as_u64().unwrap_or(0) >= 1,
            "{name}'s backend: {info}"
        );
        println!(
            "{name}'s backend: {} commands, {} reconnect(s), {} resent, {} answered from the replay cache, 0 failed",
            info["tunnel_commands"], info["reconnects"], info["resent"], info["replayed"]
        );
    }
    for vm in [&mut a, &mut b] {
        let api = vm.api.display().to_string();
        tandem_ok(&["shutdown", "--api-socket", &api, "--timeout", "60"]).await?;
        let st = tokio::time::timeout(Duration::from_secs(60), vm.child.wait())
            .await
            .context("tandem run did not exit")??;
        ensure!(st.success(), "tandem run exited with {st}");
    }
    server.kill().await?;
    let _ = std::fs::read_to_string(&server.log);
    println!("PASS shared-disk conflicts={conflicts} preempts={preempts}");
    Ok(())
}

/// `{"op":"info"}` to a vhost-scsi backend's API socket.
async fn backend_info(api: &Path) -> Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::UnixStream::connect(api)
        .await
        .with_context(|| format!("backend API {}", api.display()))?;
    s.write_all(b"{\"op\":\"info\"}\n").await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(s).read_line(&mut line),
    )
    .await
    .context("the backend API did not answer")??;
    Ok(line)
}

/// fio IOPS of one run.
async fn fio_iops_of(c: &mut Console, dev: &str, rw: &str, qd: u32, secs: u32) -> Result<f64> {
    let cmd = format!(
        "fio --name=b --filename={dev} --rw={rw} --bs=4k --size=48M --ioengine=libaio \
         --direct=1 --iodepth={qd} --time_based --runtime={secs} --randrepeat=0 2>&1"
    );
    let (out, st) = c
        .run(&cmd, Duration::from_secs(u64::from(secs) + 120))
        .await?;
    ensure!(st == 0, "fio failed on {dev}:\n{}", tail(&out, 15));
    fio_iops(&out, rw.trim_start_matches("rand")).with_context(|| format!("no IOPS in:\n{out}"))
}

/// Runs `cmd` `n` times in the guest; the mean wall time per run (ms,
/// guest clock at 10 ms resolution: the process start is included).
async fn mean_ms(c: &mut Console, cmd: &str, n: u32) -> Result<f64> {
    let out = c
        .check(&format!(
            "a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {n} ]; do {cmd} >/dev/null 2>&1 || echo FAIL; \
             i=$((i+1)); done; b=$(cut -d' ' -f1 /proc/uptime); echo span $a $b"
        ))
        .await?;
    ensure!(!out.contains("FAIL"), "{cmd} failed:\n{out}");
    let span = out
        .lines()
        .find_map(|l| l.strip_prefix("span "))
        .with_context(|| format!("no span in {out}"))?;
    let v: Vec<f64> = span
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(v.len() == 2, "span {span:?}");
    Ok((v[1] - v[0]) * 1000.0 / f64::from(n))
}

pub async fn bench(runs: usize) -> Result<()> {
    let work = tempdir()?;
    let w = work.path();
    let dir = w.join("served");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("bench.raw");
    std::fs::File::create(&file)?.set_len(DISK_BYTES)?;
    let listen = format!("127.0.0.1:{}", PORT + 1);
    let _server = FileServer::start(w, &dir, &listen, "bench").await?;
    // The same file twice: QEMU's own virtio-scsi (host page cache, like
    // the file server's) and the tunnel.
    let local = format!(
        "path={},if=virtio-scsi,format=raw,direct=off",
        file.display()
    );
    let shared = format!("server={listen},disk=bench.raw");
    let mut vm = boot_tandem(
        w,
        "bench-shared",
        &[
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--disk",
            &local,
            "--shared-disk",
            &shared,
        ],
    )
    .await?;
    let c = &mut vm.console;
    let tunnel = scsi_disk(c, "TANDEM").await?;
    let qemu = scsi_disk(c, "QEMU").await?;
    println!("devices: tunnel {tunnel}, QEMU virtio-scsi {qemu} (same file)");
    c.run(
        &format!("dd if=/dev/zero of={qemu} bs=1M count=48 oflag=direct 2>/dev/null"),
        Duration::from_secs(300),
    )
    .await?;
    let secs = 8;
    println!("fio 4k, {secs} s per run, median of {runs}; IOPS");
    println!(
        "{:<14} {:>10} {:>12} {:>8}",
        "workload", "tunnel", "virtio-scsi", "ratio"
    );
    let mut ratios = Vec::new();
    for (rw, qd) in [
        ("randread", 1),
        ("randwrite", 1),
        ("randread", 16),
        ("randwrite", 16),
    ] {
        let mut fig = Vec::new();
        for d in [&tunnel, &qemu] {
            let mut v = Vec::new();
            for _ in 0..runs {
                v.push(fio_iops_of(c, d, rw, qd, secs).await?);
            }
            fig.push(crate::median(&mut v));
        }
        println!(
            "{:<14} {:>10.0} {:>12.0} {:>7.2}x",
            format!("{rw} QD{qd}"),
            fig[0],
            fig[1],
            fig[0] / fig[1]
        );
        ratios.push(fig[0] / fig[1]);
    }
    let geo = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    println!("tunnel vs local virtio-scsi, geometric mean: {geo:.2}x (goal >= 0.8x)");

    // PERSISTENT RESERVE OUT through the tunnel (REGISTER AND IGNORE
    // EXISTING KEY: saved to the state file each time), next to TEST UNIT
    // READY on both disks (the same process start-up cost in the guest).
    let n = 40;
    let pr_cmd =
        format!("sg_persist -n --out --register-ignore --param-sark=0x1234 --param-aptpl {tunnel}");
    let pr_wall = mean_ms(c, &pr_cmd, n).await?;
    let tur_t = mean_ms(c, &format!("sg_turs {tunnel}"), n).await?;
    let tur_q = mean_ms(c, &format!("sg_turs {qemu}"), n).await?;
    let api = vm.api.with_extension("devices").join("vhost-shared0.api");
    let info: Value = serde_json::from_str(backend_info(&api).await?.trim())?;
    let mut lat: Vec<f64> = info["prout_latencies_us"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    ensure!(
        lat.len() >= n as usize,
        "the backend recorded {} PR OUT latencies",
        lat.len()
    );
    let got = lat.len();
    let median = crate::median(&mut lat);
    println!(
        "PERSISTENT RESERVE OUT (REGISTER AND IGNORE EXISTING KEY, APTPL: the server saves the state with fsync) \
         through the tunnel: median {:.2} ms over {got} (backend round trip); in the guest {:.1} ms per sg_persist run \
         with its process start (sg_turs: tunnel {:.1} ms, local virtio-scsi {:.1} ms)",
        median / 1000.0,
        pr_wall,
        tur_t,
        tur_q
    );
    Ok(())
}
