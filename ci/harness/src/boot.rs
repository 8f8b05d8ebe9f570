//! `e2e boot` and `bench boot`: the default guest, booted through tandem.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::process::Command;

use crate::guest::{tail, Console};
use crate::{median, spawn_tandem, tandem};

const BOOT_LIMIT: Duration = Duration::from_secs(120);

struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    append: String,
}

async fn image() -> Result<Image> {
    let (code, out, err) = tandem(&["image", "info", "--json"]).await?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("tandem image info: {err}"))?;
    let img = &v["image"];
    if code != 0 || img.is_null() {
        bail!("the default image is not built (run `tandem image build`): {out}{err}");
    }
    let s = |k: &str| img[k].as_str().map(str::to_owned).context(k.to_owned());
    Ok(Image {
        kernel: s("kernel")?.into(),
        initrd: s("initrd")?.into(),
        append: s("append")?,
    })
}

/// A VM started through `tandem run` with its serial on a socket.
pub(crate) struct Booted {
    pub(crate) child: tokio::process::Child,
    pub(crate) console: Console,
    pub(crate) api: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) boot_s: f64,
}

pub(crate) async fn boot_tandem(dir: &Path, name: &str, extra: &[&str]) -> Result<Booted> {
    let api = dir.join(format!("{name}.sock"));
    let serial = dir.join(format!("{name}.serial"));
    let log = dir.join(format!("{name}.log"));
    let serial_arg = format!("unix:{}", serial.display());
    let api_arg = api.display().to_string();
    let mut args = vec![
        "run",
        "--name",
        name,
        "--serial",
        &serial_arg,
        "--api-socket",
        &api_arg,
    ];
    args.extend_from_slice(extra);
    let begun = Instant::now();
    let mut child = spawn_tandem(&args, &log)?;
    let console = match Console::connect(&serial, Duration::from_secs(30)).await {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill().await;
            bail!(
                "{e:#}\ntandem's output:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    let mut booted = Booted {
        child,
        console,
        api,
        log,
        boot_s: 0.0,
    };
    booted.console.wait_for_shell(BOOT_LIMIT).await?;
    booted.boot_s = begun.elapsed().as_secs_f64();
    Ok(booted)
}

fn info_of(out: &str) -> Result<Value> {
    serde_json::from_str(out).with_context(|| format!("bad JSON from tandem info: {out}"))
}

pub async fn e2e() -> Result<()> {
    let dir = tempdir()?;
    let d = dir.path();
    let version = env!("CARGO_PKG_VERSION");
    let abi = shared_abi::ABI_VERSION.to_string();

    // 1. Boot the default guest: no image arguments at all.
    let mut vm = boot_tandem(d, "e2e-boot", &[]).await?;
    let api = vm.api.display().to_string();
    println!("booted to a shell in {:.2}s", vm.boot_s);
    let log = std::fs::read_to_string(&vm.log)?;
    ensure!(
        log.contains("under TCG") || log.contains("under KVM"),
        "tandem did not say which accelerator it chose:\n{log}"
    );

    // 2. Inside the guest: the module is loaded and reports our versions.
    let c = &mut vm.console;
    ensure!(
        c.transcript()
            .contains(&format!("tandem.ko loaded: version {version} abi {abi}")),
        "init did not report the module:\n{}",
        tail(&c.transcript(), 30)
    );
    let lsmod = c.check("cat /proc/modules").await?;
    ensure!(
        lsmod.lines().any(|l| l.starts_with("tandem ")),
        "tandem is not in /proc/modules:\n{lsmod}"
    );
    let got = c.check("cat /sys/kernel/debug/tandem/version").await?;
    ensure!(
        got == version,
        "debugfs version {got:?}, expected {version:?}"
    );
    let got = c.check("cat /sys/kernel/debug/tandem/abi_version").await?;
    ensure!(got == abi, "debugfs abi_version {got:?}, expected {abi:?}");
    let (_, st) = c
        .run(
            "echo x > /sys/kernel/debug/tandem/version",
            Duration::from_secs(20),
        )
        .await?;
    ensure!(st != 0, "debugfs version is writable");
    let dmesg = c.check("dmesg").await?;
    ensure!(
        dmesg.contains(&format!("tandem {version} loaded, speaks ABI {abi}")),
        "the module's load message is missing from dmesg"
    );
    // Unload cleanly, and load again.
    c.check("rmmod tandem").await?;
    let (_, st) = c
        .run("test -e /sys/kernel/debug/tandem", Duration::from_secs(20))
        .await?;
    ensure!(st != 0, "debugfs entries survived rmmod");
    let dmesg = c.check("dmesg").await?;
    ensure!(
        dmesg.contains(&format!("tandem {version} unloaded")),
        "no unload message"
    );
    ensure!(
        !dmesg.contains("Oops") && !dmesg.contains("BUG:"),
        "kernel trouble:\n{dmesg}"
    );
    c.check("insmod /lib/modules/tandem.ko").await?;
    let got = c.check("cat /sys/kernel/debug/tandem/version").await?;
    ensure!(got == version, "after reload: {got:?}");
    println!("module: loaded, version {version}, ABI {abi}, unloads and reloads cleanly");
    // The guest tools later scenarios use run (their libraries came along).
    let fio = c.check("fio --version").await?;
    ensure!(fio.starts_with("fio-"), "fio --version said {fio:?}");
    let sg = c.check("sg_persist --version").await?;
    ensure!(!sg.is_empty(), "sg_persist printed nothing");
    println!(
        "guest tools: {fio}, sg_persist {}",
        sg.lines().next().unwrap_or("")
    );

    // 3. The control socket and the CLI.
    let (code, out, err) = tandem(&["info", "--json", "--api-socket", &api]).await?;
    ensure!(code == 0, "tandem info failed: {err}");
    let info = info_of(&out)?;
    ensure!(info["state"] == "running", "state {}", info["state"]);
    ensure!(
        info["tandem_version"] == version && info["abi_version"] == abi.as_str(),
        "versions in info: {info}"
    );
    let accel = info["accel"].as_str().unwrap_or("?").to_owned();
    let reason = info["accel_reason"].as_str().unwrap_or("").to_owned();
    ensure!(!reason.is_empty(), "no accelerator reason");
    println!("accelerator: {accel} ({reason})");
    let (code, out, _) = tandem(&["info", "--api-socket", &api]).await?;
    ensure!(
        code == 0 && out.contains("state:       running"),
        "human info:\n{out}"
    );

    let (code, out, err) = tandem(&["pause", "--api-socket", &api]).await?;
    ensure!(code == 0 && out.contains("paused"), "pause: {out}{err}");
    // A paused guest does not answer.
    c.send("echo tandem-paused-$((2*3))\n").await?;
    ensure!(
        !c.sees("tandem-paused-6", Duration::from_secs(2)).await,
        "the guest ran while paused"
    );
    let (code, out, err) = tandem(&["pause", "--api-socket", &api]).await?;
    ensure!(
        code != 0 && err.contains("not running"),
        "second pause should be refused: {out}{err}"
    );
    let (code, out, err) = tandem(&["resume", "--api-socket", &api]).await?;
    ensure!(code == 0 && out.contains("running"), "resume: {out}{err}");
    ensure!(
        c.sees("tandem-paused-6", Duration::from_secs(10)).await,
        "the guest did not run after resume"
    );
    println!("pause/resume: the guest stops and runs again");

    // 4. A socket in use is refused, and the running VM is untouched.
    let (code, _, err) = tandem(&[
        "run",
        "--name",
        "clash",
        "--api-socket",
        &api,
        "--serial",
        "none",
    ])
    .await?;
    ensure!(
        code != 0 && err.contains("in use"),
        "a second VM on a busy socket: {err}"
    );
    let (code, _, _) = tandem(&["ping", "--api-socket", &api]).await?;
    ensure!(code == 0, "the first VM stopped answering after the clash");

    // 5. Shutdown through the control socket: the guest sees the power button.
    let (code, out, err) = tandem(&["shutdown", "--api-socket", &api, "--timeout", "60"]).await?;
    ensure!(code == 0, "shutdown failed: {out}{err}");
    ensure!(
        out.contains("the guest powered off"),
        "shutdown was not graceful: {out}"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), vm.child.wait())
        .await
        .context("tandem run did not exit after shutdown")??;
    ensure!(status.success(), "tandem run exited with {status}");
    let log = std::fs::read_to_string(&vm.log)?;
    ensure!(
        log.contains("stopped: the guest powered off"),
        "tandem run's last words:\n{log}"
    );
    ensure!(!vm.api.exists(), "the API socket was left behind");
    println!("shutdown: graceful, tandem run exited 0, socket removed");

    // 6. A guest that ignores the power button is stopped after the timeout.
    let mut deaf = boot_tandem(
        d,
        "e2e-deaf",
        &["--append-extra", "tandem.nomodule", "--memory", "256M"],
    )
    .await?;
    let (_, st) = deaf
        .console
        .run("grep -q tandem /proc/modules", Duration::from_secs(20))
        .await?;
    ensure!(st != 0, "tandem.nomodule did not keep the module out");
    deaf.console.check("killall acpid").await?;
    let deaf_api = deaf.api.display().to_string();
    let (code, out, err) =
        tandem(&["shutdown", "--api-socket", &deaf_api, "--timeout", "2"]).await?;
    ensure!(
        code == 0 && out.contains("hard stop"),
        "forced shutdown: {out}{err}"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), deaf.child.wait())
        .await
        .context("tandem run did not exit after a forced shutdown")??;
    ensure!(
        status.success(),
        "tandem run exited with {status} after a forced shutdown"
    );
    println!("shutdown of a guest that ignores the button: hard stop after the timeout");

    // 7. Clear errors for bad input; nothing starts.
    error_paths(d).await?;

    // 8. The accelerator choice agrees with what really boots: the boot
    // probe runs the image under KVM and under TCG.
    accel_agrees_with_probe().await?;

    println!("PASS boot boot_s={:.2}", vm.boot_s);
    Ok(())
}

async fn error_paths(d: &Path) -> Result<()> {
    let expect = |what: &str, code: i32, err: &str, needle: &str| -> Result<()> {
        ensure!(code != 0, "{what}: tandem run succeeded");
        ensure!(
            err.contains(needle),
            "{what}: the error does not say {needle:?}:\n{err}"
        );
        Ok(())
    };
    let (c, _, e) = tandem(&[
        "run",
        "--kernel",
        "/nonexistent/bzImage",
        "--serial",
        "none",
    ])
    .await?;
    expect(
        "missing kernel",
        c,
        &e,
        "kernel /nonexistent/bzImage: No such file",
    )?;
    let (c, _, e) = tandem(&[
        "run",
        "--disk",
        "path=/nonexistent/disk.img",
        "--serial",
        "none",
    ])
    .await?;
    expect(
        "bad disk",
        c,
        &e,
        "disk /nonexistent/disk.img: No such file",
    )?;
    let (c, _, e) = tandem(&["run", "--engine", "/nonexistent/qemu", "--serial", "none"]).await?;
    expect("missing engine", c, &e, "/nonexistent/qemu: cannot run it")?;
    // An engine that is too old: a stand-in that reports QEMU 7.2.
    let old = d.join("old-qemu");
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7)'\n",
    )?;
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let old_s = old.display().to_string();
    let (c, _, e) = tandem(&["run", "--engine", &old_s, "--serial", "none"]).await?;
    expect("old engine", c, &e, "QEMU 7.2.0 is too old")?;
    let (c, _, e) = tandem(&["run", "--memory", "lots", "--serial", "none"]).await?;
    expect("bad memory", c, &e, "bad memory size")?;
    println!("errors: missing kernel, bad disk, missing and too-old engine, bad memory, busy socket: all refused clearly");
    Ok(())
}

async fn accel_agrees_with_probe() -> Result<()> {
    let (code, out, err) = tandem(&["host", "--probe", "--json"]).await?;
    ensure!(code == 0, "tandem host --probe: {err}");
    let v: Value = serde_json::from_str(&out)?;
    let chosen = v["choice"]["accel"].as_str().unwrap_or("?").to_owned();
    let mut kvm_boots = None;
    for p in v["probes"].as_array().into_iter().flatten() {
        let ok = p["result"].get("Ok").is_some();
        match p["accel"].as_str() {
            Some("tcg") => ensure!(
                ok,
                "the guest does not even boot under TCG: {}",
                p["result"]
            ),
            Some("kvm") => kvm_boots = Some(ok),
            _ => {}
        }
    }
    let kvm_boots = kvm_boots.context("no KVM probe result")?;
    let expected = if kvm_boots { "kvm" } else { "tcg" };
    ensure!(
        chosen == expected,
        "tandem chose {chosen}, but the guest {} under KVM",
        if kvm_boots { "boots" } else { "does not boot" }
    );
    println!(
        "accelerator: {chosen}; boot probe: KVM {}, TCG boots",
        if kvm_boots { "boots" } else { "does not boot" }
    );
    Ok(())
}

/// Boots with plain QEMU, as a user would type it, and times the shell.
async fn boot_plain_qemu(dir: &Path, engine: &Value, img: &Image, n: usize) -> Result<f64> {
    let serial = dir.join(format!("plain-{n}.serial"));
    let mut cmd = Command::new(engine["path"].as_str().context("engine path")?);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    for d in engine["firmware_dirs"].as_array().into_iter().flatten() {
        cmd.arg("-L").arg(d.as_str().unwrap_or(""));
    }
    cmd.args([
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "512M",
    ]);
    cmd.arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd);
    cmd.args(["-append", &img.append]);
    cmd.args([
        "-chardev",
        &format!("socket,id=s0,path={},server=on,wait=off", serial.display()),
        "-serial",
        "chardev:s0",
    ]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let begun = Instant::now();
    let mut child = cmd.spawn()?;
    let mut console = Console::connect(&serial, Duration::from_secs(30)).await?;
    console.wait_for_shell(BOOT_LIMIT).await?;
    let t = begun.elapsed().as_secs_f64();
    console.send("poweroff\n").await?;
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(t)
}

pub async fn bench(runs: usize) -> Result<()> {
    ensure!(runs >= 1, "--runs must be at least 1");
    let dir = tempdir()?;
    let img = image().await?;
    let (code, out, err) = tandem(&["host", "--json"]).await?;
    ensure!(code == 0, "tandem host: {err}");
    let host: Value = serde_json::from_str(&out)?;
    let accel = host["choice"]["accel"].as_str().unwrap_or("?").to_owned();
    ensure!(
        accel == "tcg",
        "this benchmark's baseline command uses TCG; tandem chose {accel} here (run it on a TCG host or extend the baseline)"
    );
    let engine = &host["engine"];
    println!(
        "engine: QEMU {}.{}.{} ({}), accelerator {accel}",
        engine["version"]["major"],
        engine["version"]["minor"],
        engine["version"]["micro"],
        engine["origin"]
    );
    let mut t_tandem = Vec::new();
    let mut t_plain = Vec::new();
    // Interleaved, so drift in the machine's load hits both alike.
    for i in 0..runs {
        let name = format!("bench-{i}");
        let mut vm = boot_tandem(dir.path(), &name, &[]).await?;
        t_tandem.push(vm.boot_s);
        let api = vm.api.display().to_string();
        let (code, _, err) = tandem(&["shutdown", "--api-socket", &api, "--timeout", "30"]).await?;
        ensure!(code == 0, "shutdown: {err}");
        let _ = tokio::time::timeout(Duration::from_secs(30), vm.child.wait()).await;
        let p = boot_plain_qemu(dir.path(), engine, &img, i).await?;
        t_plain.push(p);
        println!(
            "run {}: tandem {:.2}s, plain QEMU {:.2}s",
            i + 1,
            vm.boot_s,
            p
        );
    }
    let mt = median(&mut t_tandem);
    let mp = median(&mut t_plain);
    let ratio = mt / mp;
    println!("boot to guest shell with tandem.ko loaded, median of {runs}:");
    println!("  tandem run:  {mt:.2}s");
    println!("  plain QEMU:  {mp:.2}s (same engine, kernel and initramfs, started by hand)");
    println!(
        "RESULT boot tandem_s={mt:.2} qemu_s={mp:.2} ratio={ratio:.3} goal<=1.10 {}",
        if ratio <= 1.10 { "met" } else { "MISSED" }
    );
    Ok(())
}

/// A temporary directory under /tmp with a short path (Unix socket paths
/// are limited to 107 bytes).
pub(crate) fn tempdir() -> Result<TempDir> {
    let p = std::env::temp_dir().join(format!("tandem-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

pub(crate) struct TempDir(PathBuf);
impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    // Keep the logs of a failed run: TANDEM_KEEP=1.
    fn drop(&mut self) {
        if std::env::var_os("TANDEM_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
