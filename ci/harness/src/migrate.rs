//! `e2e migrate`: live migration of a VM without assigned functions to a
//! second simulated host (a network namespace), with the faults F1 lists:
//! a destination that refuses, a network cut mid-migration; the refusal
//! to migrate a VM with an assigned function that is not a direct path;
//! then (`migrate_vf.rs`) a VM whose volume's direct path is an NVMe VF,
//! under fio with verify, migrated there and back, saved and restored.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::process::{Child, Command};

use crate::boot::{boot_tandem, tempdir, Booted};
use crate::guest::Console;
use crate::snapshot::{channel_up, plant_state, uptime};
use crate::{host, tandem, tandem_bin};

pub(crate) const SRC_IP: &str = "10.213.7.1";
pub(crate) const DST_IP: &str = "10.213.7.2";

async fn ip(args: &[&str]) -> Result<()> {
    host("ip", args).await.map(|_| ())
}

/// The destination host: a network namespace reached over a veth pair
/// from this one. Only its address is ever connected to. Removed on drop.
pub(crate) struct Host {
    pub(crate) ns: String,
    link: String,
}

impl Host {
    pub(crate) async fn create() -> Result<Host> {
        let id = std::process::id() % 100_000;
        let h = Host {
            ns: format!("tdm-mig-{id}"),
            link: format!("tdmg{id}"),
        };
        let peer = format!("tdmd{id}");
        ip(&["netns", "add", &h.ns]).await?;
        ip(&[
            "link", "add", &h.link, "type", "veth", "peer", "name", &peer,
        ])
        .await?;
        ip(&["link", "set", &peer, "netns", &h.ns]).await?;
        ip(&["addr", "add", &format!("{SRC_IP}/30"), "dev", &h.link]).await?;
        ip(&["link", "set", &h.link, "up"]).await?;
        ip(&[
            "-n",
            &h.ns,
            "addr",
            "add",
            &format!("{DST_IP}/30"),
            "dev",
            &peer,
        ])
        .await?;
        ip(&["-n", &h.ns, "link", "set", &peer, "up"]).await?;
        ip(&["-n", &h.ns, "link", "set", "lo", "up"]).await?;
        Ok(h)
    }

    pub(crate) async fn link(&self, up: bool) -> Result<()> {
        ip(&["link", "set", &self.link, if up { "up" } else { "down" }]).await
    }

    /// `tandem run --incoming` inside the namespace.
    pub(crate) async fn incoming(
        &self,
        w: &Path,
        tag: &str,
        port: u16,
        machine: &[&str],
    ) -> Result<Dest> {
        start_incoming(Some(&self.ns), DST_IP, w, tag, port, machine).await
    }
}

/// `tandem run --incoming tcp:IP:PORT`, in namespace `ns` or in this one.
pub(crate) async fn start_incoming(
    ns: Option<&str>,
    ip_addr: &str,
    w: &Path,
    tag: &str,
    port: u16,
    machine: &[&str],
) -> Result<Dest> {
    {
        let api = w.join(format!("{tag}.sock"));
        let serial = w.join(format!("{tag}.serial"));
        let log = w.join(format!("{tag}.log"));
        let uri = format!("tcp:{ip_addr}:{port}");
        let logf = std::fs::File::create(&log)?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tandem_bin()?);
                c
            }
            None => Command::new(tandem_bin()?),
        };
        let child = cmd
            .args(["run", "--incoming", &uri, "--name", tag])
            .arg("--serial")
            .arg(format!("unix:{}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(machine)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()?;
        let begun = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("waiting for the machine state") && api.exists() {
                break;
            }
            if begun.elapsed() > Duration::from_secs(60) {
                bail!("the destination did not start:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // QEMU listens once migrate-incoming is issued, just after.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Dest {
            child,
            api,
            serial,
            log,
            uri,
        })
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

pub(crate) struct Dest {
    pub(crate) child: Child,
    pub(crate) api: std::path::PathBuf,
    pub(crate) serial: std::path::PathBuf,
    pub(crate) log: std::path::PathBuf,
    pub(crate) uri: String,
}

pub async fn e2e() -> Result<()> {
    let work = tempdir()?;
    let w = work.path();
    let host = Host::create().await?;
    let disk = w.join("shared.raw");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let disk_arg = format!("path={},if=virtio-blk,format=raw", disk.display());
    let machine = ["--disk", disk_arg.as_str(), "--memory", "512M"];
    let mut vm = boot_tandem(w, "e2e-mig", &machine).await?;
    let api = vm.api.display().to_string();
    println!(
        "source booted in {:.2}s; destination host: namespace {} at {DST_IP}",
        vm.boot_s, host.ns
    );
    channel_up(&api, Duration::from_secs(30)).await?;
    let (ram, pattern) = plant_state(&mut vm.console).await?;

    // 1. A destination that cannot take this machine (other memory size).
    let mut bad = host
        .incoming(
            w,
            "dst-bad",
            4441,
            &["--disk", &disk_arg, "--memory", "256M"],
        )
        .await?;
    let (code, _, err) = tandem(&["migrate", "--to", &bad.uri, "--api-socket", &api]).await?;
    ensure!(
        code != 0 && err.contains("keeps running here"),
        "migration to a mismatched destination: exit {code}: {err}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(20), bad.child.wait()).await;
    let _ = bad.child.kill().await;
    ensure!(
        vm.console.check("cat /ram-marker").await? == ram,
        "the source VM changed"
    );
    channel_up(&api, Duration::from_secs(60)).await?;
    println!(
        "a destination with 256M refused the 512M machine: {}; the VM runs on at the source",
        err.lines().last().unwrap_or("").trim()
    );

    // 2. The network is cut mid-migration: the source gives up after 10 s
    //    without progress and the VM runs on there.
    let mut cut = host.incoming(w, "dst-cut", 4442, &machine).await?;
    let migrating = {
        let uri = cut.uri.clone();
        let api = api.clone();
        tokio::spawn(async move {
            tandem(&[
                "migrate",
                "--to",
                &uri,
                "--bandwidth",
                "8",
                "--api-socket",
                &api,
            ])
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    host.link(false).await?;
    let begun = Instant::now();
    let (code, _, err) = migrating.await??;
    host.link(true).await?;
    ensure!(
        code != 0 && err.contains("no progress") && err.contains("keeps running here"),
        "migration across a cut network: exit {code}: {err}"
    );
    let _ = cut.child.kill().await;
    ensure!(
        vm.console.check("cat /ram-marker").await? == ram,
        "the source VM changed"
    );
    channel_up(&api, Duration::from_secs(60)).await?;
    println!(
        "network cut 3 s into a migration: cancelled {:.1}s later (no progress), the VM runs on at the source",
        begun.elapsed().as_secs_f64()
    );

    // 3. A live migration that completes.
    let dst = host.incoming(w, "dst", 4443, &machine).await?;
    let up_before = uptime(&mut vm.console).await?;
    let (code, _, err) = tandem(&["migrate", "--to", &dst.uri, "--max-downtime", "0"]).await?;
    ensure!(
        code == 2 && err.contains("--max-downtime"),
        "a zero downtime limit was not refused: exit {code}: {err}"
    );
    let (code, out, err) = tandem(&[
        "migrate",
        "--to",
        &dst.uri,
        "--max-downtime",
        "100",
        "--api-socket",
        &api,
    ])
    .await?;
    ensure!(code == 0, "migration failed ({code}): {out}{err}");
    println!("{}", out.trim());
    let downtime_ms: u64 = out
        .split("downtime ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let status = tokio::time::timeout(Duration::from_secs(60), vm.child.wait())
        .await
        .context("the source did not stop after the migration")??;
    let log = std::fs::read_to_string(&vm.log)?;
    ensure!(
        status.success() && log.contains("migrated to"),
        "source after migrating: {status}\n{log}"
    );
    let mut console = Console::connect(&dst.serial, Duration::from_secs(60))
        .await
        .with_context(|| std::fs::read_to_string(&dst.log).unwrap_or_default())?;
    console.wait_for_shell(Duration::from_secs(60)).await?;
    let mut moved = Booted {
        child: dst.child,
        console,
        api: dst.api.clone(),
        log: dst.log.clone(),
        boot_s: 0.0,
    };
    let dapi = dst.api.display().to_string();
    let c = &mut moved.console;
    ensure!(
        c.check("cat /ram-marker").await? == ram,
        "RAM differs after the migration"
    );
    let d = c
        .check("dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum")
        .await?;
    ensure!(d == pattern, "disk differs after the migration");
    let up_after = uptime(c).await?;
    ensure!(up_after >= up_before, "uptime went back");
    let ch = channel_up(&dapi, Duration::from_secs(60)).await?;
    println!(
        "the guest runs at the destination: same RAM and disk, uptime {up_before:.1}s -> {up_after:.1}s, channel renegotiated (ABI {})",
        ch["device"]["version"]
    );

    // 4. With an assigned function, a migration is refused.
    let nvme_work = w.join("nvme");
    std::fs::create_dir_all(&nvme_work)?;
    let srv = crate::nvme::start_server(&nvme_work, &[nvme_work.join("vf1.raw")]).await?;
    let sdir = srv.dir.display().to_string();
    let (code, _, err) = tandem(&["nvme", "vfs", "1", "--dir", &sdir]).await?;
    ensure!(code == 0, "nvme vfs: {err}");
    let (ctrl, _) = crate::nvme::attach(&mut moved, &srv.dir, 1).await?;
    let (code, _, err) = tandem(&[
        "migrate",
        "--to",
        &format!("tcp:{SRC_IP}:4444"),
        "--api-socket",
        &dapi,
    ])
    .await?;
    ensure!(
        code != 0 && err.contains("not the direct path of a guest volume (nvme-vf1)"),
        "migration with an assigned VF that is no direct path: exit {code}: {err}"
    );
    let (_, st) = moved
        .console
        .run(
            &format!("dd if=/dev/{ctrl}n1 of=/dev/null bs=4k count=8 iflag=direct"),
            Duration::from_secs(30),
        )
        .await?;
    ensure!(
        st == 0,
        "the VF stopped working after the refused migration"
    );
    println!("with {ctrl} assigned (no direct path of a volume): the migration was refused; the VM and the VF run on");

    let (code, _, err) = tandem(&["shutdown", "--api-socket", &dapi, "--timeout", "30"]).await?;
    ensure!(code == 0, "shutdown: {err}");
    let _ = tokio::time::timeout(Duration::from_secs(30), moved.child.wait()).await;
    drop(srv);

    // 5. A VM whose volume has an NVMe VF as its direct path.
    let vf = crate::migrate_vf::run(w, &host).await?;
    println!(
        "PASS migrate downtime_ms={downtime_ms} blackout_ms_max={:.1} vf_downtime_ms={} vf_handoffs={}",
        vf.blackout_us as f64 / 1000.0,
        vf.downtime_ms,
        vf.handoffs
    );
    Ok(())
}
