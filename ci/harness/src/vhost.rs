//! `e2e vhost-blk`: a guest's stock virtio-blk driver on Tandem's
//! vhost-user-blk backend (`--disk ...,if=vhost-blk`), fio with verify
//! while the harness checkpoints the disk chain through the backend's API
//! again and again; then, with the guest gone, `qemu-img check` on every
//! layer and the chain compared with what the guest last read.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::boot::{boot_tandem, tempdir};
use crate::guest::tail;
use crate::{host, tandem, tandem_ok};

const DISK: &str = "128M";
const FIO_SECS: u64 = 30;
const MIN_CHECKPOINTS: usize = 5;
const RO_BYTES: usize = 8 << 20;
/// md5 of 1 MiB of zeros.
const ZERO_MIB_MD5: &str = "b6d81b360a5672d80c27430f39153e2c";

/// One request to the backend's JSON-lines API.
async fn api(socket: &Path, req: &Value) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .await
        .with_context(|| format!("backend API {}", socket.display()))?;
    s.write_all(format!("{req}\n").as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        BufReader::new(s).read_line(&mut line),
    )
    .await
    .context("the backend API did not answer within 60 s")??;
    serde_json::from_str(&line).with_context(|| format!("bad answer {line:?}"))
}

/// The API socket of the vhost-blk backend serving `vm`'s disk0.
pub(crate) fn backend_api(vm: &crate::boot::Booted) -> std::path::PathBuf {
    vm.api.with_extension("devices").join("vhost-disk0.api")
}

/// The backend's `info` answer (chain, counters).
pub(crate) async fn backend_info(socket: &Path) -> Result<Value> {
    let v = api(socket, &json!({"op": "info"})).await?;
    ensure!(v["result"] == "info", "backend info: {v}");
    Ok(v)
}

/// Checkpoints every `every` until `count` are done, the last one with
/// `tandem disk checkpoint --disk disk0` against the VM at `vm_api`, the
/// others through the backend's API socket; returns the sealed layers and
/// the longest pause.
async fn checkpoints(
    socket: &Path,
    vm_api: &Path,
    count: usize,
    every: Duration,
) -> Result<(Vec<String>, Duration)> {
    let mut sealed = Vec::new();
    let mut longest = Duration::ZERO;
    for i in 0..count {
        tokio::time::sleep(every).await;
        if i + 1 == count {
            let out = tandem_ok(&[
                "disk",
                "checkpoint",
                "--disk",
                "disk0",
                "--api-socket",
                &vm_api.display().to_string(),
            ])
            .await?;
            let path = out
                .strip_prefix("sealed the previous top as ")
                .and_then(|r| r.split(';').next())
                .with_context(|| format!("tandem disk checkpoint said {out:?}"))?;
            sealed.push(path.to_owned());
            continue;
        }
        let r = api(socket, &json!({"op": "checkpoint"})).await?;
        ensure!(r["result"] == "checkpoint", "checkpoint failed: {r}");
        let us = r["elapsed_us"].as_u64().unwrap_or(0);
        longest = longest.max(Duration::from_micros(us));
        sealed.push(r["sealed"].as_str().unwrap_or_default().to_owned());
    }
    Ok((sealed, longest))
}

/// One run on a disk of `format`; returns the checkpoints taken.
async fn run(w: &Path, format: &str) -> Result<usize> {
    let disk = w.join(format!("disk-{format}.{format}"));
    let disk_s = disk.display().to_string();
    tandem_ok(&[
        "disk", "create", &disk_s, "--format", format, "--size", DISK,
    ])
    .await?;
    // A second, read-only disk with a known pattern.
    let ro = w.join(format!("ro-{format}.raw"));
    let pattern: Vec<u8> = (0..RO_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&ro, &pattern)?;
    let ro_sum = host("md5sum", &[&ro.display().to_string()]).await?;
    let ro_sum = ro_sum.split_whitespace().next().unwrap_or("").to_owned();
    let name = format!("e2e-vhost-{format}");
    let spec = format!("path={disk_s},if=vhost-blk");
    let ro_spec = format!("path={},if=vhost-blk,readonly=on", ro.display());
    let mut vm = boot_tandem(
        w,
        &name,
        &["--disk", &spec, "--disk", &ro_spec, "--memory", "512M"],
    )
    .await?;
    let backend_api = backend_api(&vm);
    let vm_api = vm.api.clone();
    println!("[{format}] booted in {:.2}s", vm.boot_s);
    let c = &mut vm.console;
    let serial = c.check("cat /sys/block/vda/serial").await?;
    ensure!(serial == "tandem-disk0", "virtio-blk serial {serial:?}");
    let sectors = c.check("cat /sys/block/vda/size").await?;
    ensure!(
        sectors == (128u64 << 11).to_string(),
        "capacity {sectors} sectors"
    );
    println!("[{format}] the guest's virtio-blk sees vda: {sectors} sectors, serial {serial}");
    let ro_serial = c
        .check("cat /sys/block/vdb/serial; echo; cat /sys/block/vdb/ro")
        .await?;
    ensure!(
        ro_serial.split_whitespace().collect::<Vec<_>>() == ["tandem-disk1", "1"],
        "read-only disk: serial and ro flag {ro_serial:?}"
    );
    let got = c
        .check("dd if=/dev/vdb bs=1M iflag=direct 2>/dev/null | md5sum")
        .await?;
    ensure!(
        got.starts_with(&ro_sum),
        "vdb reads {got}, the file is {ro_sum}"
    );
    let (out, st) = c
        .run(
            "dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct",
            Duration::from_secs(30),
        )
        .await?;
    ensure!(st != 0, "a write to the read-only disk succeeded: {out}");
    println!("[{format}] read-only vdb: ro flag set, reads the file's bytes, writes refused");

    // Only raw vhost-blk disks may leave (save, migrate): two backends
    // would hold this chain's metadata.
    let state = w.join(format!("{name}.state"));
    let (code, out, err) = crate::tandem(&[
        "snapshot",
        &state.display().to_string(),
        "--api-socket",
        &vm_api.display().to_string(),
    ])
    .await?;
    let why = format!("{out}{err}");
    ensure!(
        code != 0
            && why.contains(&format!(
                "is a {format} image served by a vhost-user-blk backend"
            )),
        "a save of a VM with a {format} vhost-blk disk ({code}): {why}"
    );
    ensure!(!state.exists(), "the refused save left {}", state.display());
    println!(
        "[{format}] a save is refused: {}",
        why.trim().lines().last().unwrap_or("")
    );

    // fio with verify while the chain is checkpointed underneath it.
    let fio = format!(
        "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=64M --ioengine=libaio \
         --direct=1 --iodepth=8 --time_based --runtime={FIO_SECS} --verify=crc32c \
         --verify_backlog=256 --verify_fatal=1 --randrepeat=0 --end_fsync=1 2>&1"
    );
    let every = Duration::from_secs(FIO_SECS) / (MIN_CHECKPOINTS as u32 + 2);
    let begun = Instant::now();
    let (fio_result, ckpt_result) = tokio::join!(
        c.run(&fio, Duration::from_secs(FIO_SECS + 300)),
        checkpoints(&backend_api, &vm_api, MIN_CHECKPOINTS + 1, every)
    );
    let (out, st) = fio_result?;
    let (sealed, longest) = ckpt_result?;
    ensure!(
        st == 0 && out.contains("err= 0"),
        "fio failed (status {st}):\n{}",
        tail(&out, 30)
    );
    ensure!(
        begun.elapsed() >= Duration::from_secs(FIO_SECS),
        "fio ended early"
    );
    println!(
        "[{format}] fio randwrite+verify QD8 {FIO_SECS}s: err=0; {} checkpoints meanwhile (longest {:.1} ms)",
        sealed.len(),
        longest.as_secs_f64() * 1e3
    );
    let info = api(&backend_api, &json!({"op": "info"})).await?;
    let counters = &info["counters"];
    let counter = |k: &str| counters[k].as_u64().unwrap_or(0);
    ensure!(
        info["result"] == "info"
            && counter("errors") == 0
            && counter("writes") > 0
            && counter("flushes") > 0,
        "backend info: {info}"
    );
    let layers = info["chain"].as_array().map_or(0, Vec::len);
    ensure!(
        layers == sealed.len() + 1,
        "the chain has {layers} layers after {} checkpoints: {info}",
        sealed.len()
    );
    println!(
        "[{format}] backend: {} reads, {} writes, {} flushes, 0 errors; chain of {layers} layers",
        counter("reads"),
        counter("writes"),
        counter("flushes")
    );

    // Discard: the guest sees the limits, and a discarded range reads as zeros.
    let max = c
        .check("cat /sys/block/vda/queue/discard_max_bytes")
        .await?;
    ensure!(
        max.parse::<u64>().unwrap_or(0) > 0,
        "no discard on vda ({max})"
    );
    let before = c
        .check("dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5sum")
        .await?;
    ensure!(
        !before.starts_with(ZERO_MIB_MD5),
        "fio left the second MiB zero: nothing to discard"
    );
    c.check(
        "if command -v blkdiscard >/dev/null; then blkdiscard -o 1048576 -l 1048576 /dev/vda; \
         else fio --name=t --filename=/dev/vda --rw=trim --bs=64k --offset=1M --size=1M \
         --direct=1 >/dev/null; fi",
    )
    .await?;
    let zeros = c
        .check("dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5sum")
        .await?;
    ensure!(
        zeros.starts_with(ZERO_MIB_MD5),
        "a discarded MiB reads {zeros}"
    );
    let info = api(&backend_api, &json!({"op": "info"})).await?;
    ensure!(
        info["counters"]["discards"].as_u64().unwrap_or(0) > 0,
        "the backend counted no discard: {info}"
    );
    println!("[{format}] discard: limit {max} bytes, a discarded MiB reads as zeros");

    // Pause and resume (QEMU stops and restarts the vhost-user device):
    // the disk still writes and reads back.
    let api_s = vm.api.display().to_string();
    tandem_ok(&["pause", "--api-socket", &api_s]).await?;
    tandem_ok(&["resume", "--api-socket", &api_s]).await?;
    let c = &mut vm.console;
    let same = c
        .check(
            "dd if=/dev/urandom of=/tmp/blk bs=4k count=16 2>/dev/null && \
             dd if=/tmp/blk of=/dev/vda bs=4k seek=4096 oflag=direct conv=fsync 2>/dev/null && \
             a=$(md5sum < /tmp/blk) && \
             b=$(dd if=/dev/vda bs=4k skip=4096 count=16 iflag=direct 2>/dev/null | md5sum) && \
             [ \"$a\" = \"$b\" ] && echo same",
        )
        .await?;
    ensure!(same == "same", "after pause/resume: {same}");
    println!("[{format}] paused and resumed: vda writes and reads back");

    // What the guest reads now, to compare with the chain once it is gone.
    c.check("sync").await?;
    let guest_sum = c
        .check("dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum")
        .await?;
    let guest_sum = guest_sum.split_whitespace().next().unwrap_or("").to_owned();
    ensure!(guest_sum.len() == 32, "guest md5sum: {guest_sum:?}");

    let (code, out, err) = tandem(&["shutdown", "--api-socket", &api_s, "--timeout", "60"]).await?;
    ensure!(
        code == 0 && out.contains("the guest powered off"),
        "shutdown: {out}{err}"
    );
    let status = tokio::time::timeout(Duration::from_secs(60), vm.child.wait())
        .await
        .context("tandem run did not exit after shutdown")??;
    ensure!(status.success(), "tandem run exited with {status}");
    let log = std::fs::read_to_string(&vm.log)?;
    ensure!(
        !log.contains("backend failed") && !log.contains("did not exit"),
        "the backend did not stop cleanly:\n{log}"
    );

    // Every layer is sound, to qemu-img where it can open the layer (its
    // VHDX driver has no differencing disks: only the VHDX base), and to
    // `tandem disk check` for the whole chain.
    let mut files: Vec<PathBuf> = sealed.iter().map(PathBuf::from).collect();
    files.push(disk.clone());
    let foreign: &[PathBuf] = if format == "vhdx" {
        &files[..1]
    } else {
        &files
    };
    for f in foreign {
        host(
            "qemu-img",
            &["check", "-f", format, &f.display().to_string()],
        )
        .await?;
    }
    tandem_ok(&["disk", "check", &disk_s]).await?;
    let flat = w.join(format!("flat-{format}.raw"));
    let flat_s = flat.display().to_string();
    tandem_ok(&["disk", "convert", &disk_s, &flat_s, "--format", "raw"]).await?;
    let how = if format == "qcow2" {
        // qemu-img follows the chain itself.
        let chain = host(
            "qemu-img",
            &["info", "--backing-chain", "--output=json", &disk_s],
        )
        .await?;
        let chain: Value = serde_json::from_str(&chain).context("qemu-img info JSON")?;
        ensure!(
            chain.as_array().map(Vec::len) == Some(files.len()),
            "qemu-img sees a chain of {:?} images, expected {}",
            chain.as_array().map(Vec::len),
            files.len()
        );
        host(
            "qemu-img",
            &["compare", "-f", format, "-F", "raw", &disk_s, &flat_s],
        )
        .await?;
        "qemu-img compare: chain = flattened copy"
    } else {
        tandem_ok(&["disk", "compare", &disk_s, &flat_s]).await?;
        "tandem disk compare: chain = flattened copy"
    };
    let host_sum = host("md5sum", &[&flat_s]).await?;
    let host_sum = host_sum.split_whitespace().next().unwrap_or("");
    ensure!(
        host_sum == guest_sum,
        "the chain reads {host_sum}, the guest read {guest_sum}"
    );
    println!(
        "[{format}] after shutdown: qemu-img check clean on {} of {} layers, tandem disk check clean, \
         {how}, chain = guest's last read (md5 {guest_sum})",
        foreign.len(),
        files.len()
    );
    Ok(sealed.len())
}

pub async fn e2e() -> Result<()> {
    let work = tempdir()?;
    let mut total = 0;
    for format in ["qcow2", "vhdx"] {
        total += run(work.path(), format).await?;
    }
    println!("PASS vhost-blk checkpoints={total}");
    Ok(())
}
