//! `e2e channel` and `bench channel`: the guest/host control channel with
//! the real guest driver.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::boot::{boot_tandem, tempdir, Booted};
use crate::guest::{tail, Console};
use crate::{median, tandem};

/// Faults both sides can send; each must be counted, none may hurt.
const FAULTS: &[&str] = &[
    "garbage",
    "oversized",
    "unknown_kind",
    "bad_flags",
    "bad_version",
    "short_payload",
    "unexpected_response",
];

async fn info(api: &str) -> Result<Value> {
    let (code, out, err) = tandem(&["channel", "info", "--json", "--api-socket", api]).await?;
    ensure!(code == 0, "tandem channel info: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Waits until the host sees the channel up with `session`.
async fn wait_up(api: &str, session: u64, limit: Duration) -> Result<Value> {
    let end = Instant::now() + limit;
    loop {
        let i = info(api).await?;
        let d = &i["device"];
        if d["channel_state"] == "up" && d["session"] == session {
            return Ok(i);
        }
        if Instant::now() > end {
            bail!("the channel did not come up with session {session} within {limit:?}: {i}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A field of the guest's `state` or `counters` file ("key: value" or "key value").
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix(key)?;
        Some(rest.trim_start_matches(':').trim())
    })
}

fn counter(text: &str, key: &str) -> u64 {
    field(text, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

async fn guest_file(c: &mut Console, name: &str) -> Result<String> {
    c.check(&format!("cat /sys/kernel/debug/tandem/0000:*/{name}"))
        .await
}

/// The control device's debugfs directory (the shell does not expand
/// patterns in redirections).
async fn guest_dir(c: &mut Console) -> Result<String> {
    let d = c.check("ls -d /sys/kernel/debug/tandem/0000:*").await?;
    ensure!(
        d.lines().count() == 1,
        "expected one control device, found:\n{d}"
    );
    Ok(d)
}

async fn host_ping(api: &str, count: u32, seed: u64, size: Option<usize>) -> Result<Value> {
    let count_s = count.to_string();
    let seed_s = seed.to_string();
    let size_s = size.map(|s| s.to_string());
    let mut args = vec![
        "channel",
        "ping",
        "--json",
        "--api-socket",
        api,
        "--count",
        &count_s,
        "--seed",
        &seed_s,
    ];
    if let Some(s) = &size_s {
        args.extend(["--size", s]);
    }
    let (_, out, err) = tandem(&args).await?;
    serde_json::from_str(&out).with_context(|| format!("tandem channel ping: {out}{err}"))
}

fn no_kernel_trouble(dmesg: &str) -> Result<()> {
    for bad in ["Oops", "BUG:", "WARNING:", "panic", "general protection"] {
        ensure!(
            !dmesg.contains(bad),
            "the guest kernel reported {bad:?}:\n{}",
            tail(dmesg, 40)
        );
    }
    Ok(())
}

pub async fn e2e() -> Result<()> {
    let dir = tempdir()?;
    let mut vm = boot_tandem(dir.path(), "e2e-chan", &[]).await?;
    let api = vm.api.display().to_string();
    println!("booted in {:.2}s", vm.boot_s);

    // 1. Negotiation, seen from both sides.
    let i = wait_up(&api, 1, Duration::from_secs(30)).await?;
    let d = &i["device"];
    let abi = shared_abi::ABI_VERSION.to_string();
    ensure!(
        d["version"] == abi.as_str(),
        "host: version {}",
        d["version"]
    );
    ensure!(
        d["capabilities"] == shared_abi::msg::caps::ALL,
        "host: capabilities {}",
        d["capabilities"]
    );
    ensure!(
        d["guest_driver"] == env!("CARGO_PKG_VERSION"),
        "host: guest driver {}",
        d["guest_driver"]
    );
    let st = guest_file(&mut vm.console, "state").await?;
    ensure!(field(&st, "state") == Some("up"), "guest state:\n{st}");
    ensure!(
        field(&st, "version") == Some(abi.as_str()),
        "guest version:\n{st}"
    );
    ensure!(field(&st, "session") == Some("1"), "guest session:\n{st}");
    println!("negotiated: ABI {abi} on both sides (capabilities 0x1f: ping, heartbeat, events, functions, paths), session 1");

    // 2. Heartbeats flow and the host sees the guest alive.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let i = info(&api).await?;
    let hb = i["device"]["counters"]["heartbeats_received"]
        .as_u64()
        .unwrap_or(0);
    ensure!(hb >= 2, "only {hb} heartbeats in 2.5 s");
    ensure!(
        i["device"]["guest_alive"] == true,
        "host thinks the guest is gone: {i}"
    );
    println!("heartbeats: {hb} received, guest alive");

    // 3. 1000 host-to-guest pings with random payloads, every answer checked,
    // with the device server killed and replaced in the middle.
    let mut ok = 0u64;
    let mut medians = Vec::new();
    let mut seed = 1;
    for _ in 0..2 {
        let r = host_ping(&api, 200, seed, None).await?;
        seed += 1;
        ensure!(r["mismatched"] == 0, "mismatched answers: {r}");
        ensure!(r["ok"] == 200, "not every ping answered: {r}");
        ok += 200;
        medians.push(r["rtt_us_median"].as_f64().unwrap_or(f64::NAN));
    }
    let pid = info(&api).await?["server"]["pid"]
        .as_u64()
        .context("server pid")?;
    let api2 = api.clone();
    // Long enough to be cut short by the kill below.
    let batch = tokio::spawn(async move { host_ping(&api2, 50_000, 99, None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .context("killing the device server")?;
    let killed_at = Instant::now();
    println!("killed the control device server (pid {pid}) with SIGKILL mid-stream");
    // The interrupted batch ends in an error or a partial report; what did
    // come back must still be right.
    match batch.await? {
        Ok(r) => {
            ensure!(
                r["mismatched"] == 0,
                "mismatched answers around the kill: {r}"
            );
            ok += r["ok"].as_u64().unwrap_or(0);
            ensure!(
                r["ok"] != r["sent"],
                "the kill did not interrupt the batch: {r}"
            );
            println!(
                "interrupted batch: {} of {} answered and verified, the rest failed cleanly",
                r["ok"], r["sent"]
            );
        }
        Err(e) => println!(
            "interrupted batch ended: {}",
            e.to_string().lines().next().unwrap_or("")
        ),
    }
    let i = wait_up(&api, 2, Duration::from_secs(60)).await?;
    let back = killed_at.elapsed();
    ensure!(
        i["server"]["restarts"] == 1,
        "restarts: {}",
        i["server"]["restarts"]
    );
    ensure!(
        i["server"]["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{i}"
    );
    let dm = vm.console.check("dmesg").await?;
    ensure!(
        dm.contains("control device released"),
        "the guest did not log the loss:\n{}",
        tail(&dm, 20)
    );
    ensure!(
        dm.contains("session 2"),
        "the guest did not renegotiate:\n{}",
        tail(&dm, 20)
    );
    let st = guest_file(&mut vm.console, "state").await?;
    ensure!(
        field(&st, "session") == Some("2") && field(&st, "state") == Some("up"),
        "guest after restart:\n{st}"
    );
    println!(
        "replaced and renegotiated in {:.2}s (session 2 on both sides)",
        back.as_secs_f64()
    );
    while ok < 1000 {
        let r = host_ping(&api, 200, seed, None).await?;
        seed += 1;
        ensure!(
            r["mismatched"] == 0 && r["ok"] == 200,
            "after the restart: {r}"
        );
        ok += 200;
        medians.push(r["rtt_us_median"].as_f64().unwrap_or(f64::NAN));
    }
    let rtt = median(&mut medians);
    println!("{ok} pings answered and verified, none mismatched; median rtt {rtt:.0} us");

    // 4. Guest-to-host pings.
    let gdir = guest_dir(&mut vm.console).await?;
    vm.console.check(&format!("echo 300 > {gdir}/ping")).await?;
    let ps = guest_file(&mut vm.console, "ping_stats").await?;
    ensure!(
        ps.contains("sent=300 ok=300 mismatched=0"),
        "guest pings: {ps}"
    );
    println!("guest-to-host: {ps}");

    // 5. Broken messages from the host: counted by the guest, never fatal.
    let before = guest_file(&mut vm.console, "counters").await?;
    for f in FAULTS {
        let (code, _, err) = tandem(&["channel", "inject", f, "--api-socket", &api]).await?;
        ensure!(code == 0, "inject {f}: {err}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = guest_file(&mut vm.console, "counters").await?;
    let grew = |k: &str| counter(&after, k).saturating_sub(counter(&before, k));
    ensure!(
        grew("malformed") >= 4,
        "guest malformed counter: {before} -> {after}"
    );
    ensure!(
        grew("error_replies") >= 2,
        "guest error replies: {before} -> {after}"
    );
    ensure!(
        grew("unexpected_responses") >= 1,
        "guest unexpected responses: {before} -> {after}"
    );
    let r = host_ping(&api, 20, 7, None).await?;
    ensure!(
        r["ok"] == 20,
        "the channel suffered from host-side faults: {r}"
    );
    println!(
        "host-to-guest faults: guest counted {} malformed, {} error replies, {} unexpected; channel fine",
        grew("malformed"),
        grew("error_replies"),
        grew("unexpected_responses")
    );

    // 6. Broken messages from the guest: counted by the host, never fatal.
    let hb = info(&api).await?["device"]["counters"].clone();
    for f in FAULTS {
        vm.console
            .check(&format!("echo {f} > {gdir}/inject"))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let i = info(&api).await?;
    let ha = &i["device"]["counters"];
    let hgrew = |k: &str| {
        ha[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(hb[k].as_u64().unwrap_or(0))
    };
    ensure!(hgrew("malformed") >= 4, "host malformed: {hb} -> {ha}");
    ensure!(
        hgrew("error_replies") >= 2,
        "host error replies: {hb} -> {ha}"
    );
    ensure!(
        hgrew("unexpected_responses") >= 1,
        "host unexpected: {hb} -> {ha}"
    );
    ensure!(i["device"]["channel_state"] == "up", "{i}");
    let r = host_ping(&api, 20, 8, None).await?;
    ensure!(
        r["ok"] == 20,
        "the channel suffered from guest-side faults: {r}"
    );
    println!(
        "guest-to-host faults: host counted {} malformed, {} error replies, {} unexpected; channel fine",
        hgrew("malformed"),
        hgrew("error_replies"),
        hgrew("unexpected_responses")
    );

    // 7. Version mismatch: a guest driver that speaks only 2.0 is refused,
    // and both sides say so; one that speaks 1.0..1.5 settles on the host's
    // highest; one that speaks only 1.0 gets 1.0 without 1.1's capabilities.
    let c = &mut vm.console;
    c.check("rmmod tandem").await?;
    c.check("insmod /lib/modules/tandem.ko abi_min=0x20000 abi_max=0x20000")
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = guest_file(c, "state").await?;
    ensure!(
        field(&st, "state") == Some("refused"),
        "guest with ABI 2.0:\n{st}"
    );
    ensure!(
        field(&st, "host_speaks") == Some(format!("1.0..{abi}").as_str()),
        "guest with ABI 2.0:\n{st}"
    );
    let err = guest_file(c, "last_error").await?;
    ensure!(
        err.contains(&format!(
            "no common ABI version: this driver speaks 2.0..2.0, the host 1.0..{abi}"
        )),
        "guest message: {err}"
    );
    let i = info(&api).await?;
    ensure!(
        i["device"]["channel_state"] == "refused",
        "host with a 2.0 guest: {i}"
    );
    ensure!(i["device"]["refused_guest_versions"] == "2.0..2.0", "{i}");
    let host_msg = i["device"]["last_error"].as_str().unwrap_or("").to_owned();
    ensure!(
        host_msg.contains(&format!("guest 2.0..2.0, host 1.0..{abi}")),
        "host message: {host_msg}"
    );
    println!("ABI 2.0-only guest: refused on both sides ({host_msg})");
    c.check("rmmod tandem").await?;
    c.check("insmod /lib/modules/tandem.ko abi_max=0x10005")
        .await?;
    let i = wait_up(&api, 2, Duration::from_secs(20)).await?;
    ensure!(i["device"]["version"] == abi.as_str(), "{i}");
    let st = guest_file(c, "state").await?;
    ensure!(
        field(&st, "offered") == Some("1.0..1.5") && field(&st, "version") == Some(abi.as_str()),
        "{st}"
    );
    println!("ABI 1.0..1.5 guest with a 1.0..{abi} host: settled on {abi} on both sides");
    c.check("rmmod tandem").await?;
    c.check("insmod /lib/modules/tandem.ko abi_max=0x10000")
        .await?;
    let i = wait_up(&api, 2, Duration::from_secs(20)).await?;
    ensure!(
        i["device"]["version"] == "1.0"
            && i["device"]["capabilities"] == shared_abi::msg::caps::ALL_V1_0,
        "{i}"
    );
    println!("ABI 1.0-only guest: negotiated 1.0 with 1.0's capabilities only (0x7)");

    // 8. Unload cleanly: the host hears goodbye; no kernel complaint.
    c.check("rmmod tandem").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let i = info(&api).await?;
    ensure!(
        i["device"]["channel_state"] == "down",
        "after rmmod the host still sees {i}"
    );
    let (_, st) = c
        .run("grep -q '^tandem ' /proc/modules", Duration::from_secs(10))
        .await?;
    ensure!(st != 0, "tandem still loaded after rmmod");
    let dm = c.check("dmesg").await?;
    no_kernel_trouble(&dm)?;
    ensure!(dm.contains("tandem 0.1.0 unloaded"), "no unload message");
    println!("unloaded cleanly; the host saw the goodbye");

    // 9. A host that speaks 1.0..1.4 and this guest settle on this build's
    // highest version.
    let (code, _, err) = tandem(&["shutdown", "--api-socket", &api, "--timeout", "30"]).await?;
    ensure!(code == 0, "shutdown: {err}");
    let _ = tokio::time::timeout(Duration::from_secs(30), vm.child.wait()).await;
    let vm2: Booted = boot_tandem(
        dir.path(),
        "e2e-chan2",
        &["--host-abi", "1.0-1.4", "--memory", "256M"],
    )
    .await?;
    let api2 = vm2.api.display().to_string();
    let i = wait_up(&api2, 1, Duration::from_secs(30)).await?;
    ensure!(
        i["device"]["version"] == abi.as_str() && i["device"]["host_versions"] == "1.0..1.4",
        "{i}"
    );
    println!("host 1.0..1.4 with a 1.0..{abi} guest: negotiated {abi}");
    let (code, _, err) = tandem(&["shutdown", "--api-socket", &api2, "--timeout", "30"]).await?;
    ensure!(code == 0, "shutdown: {err}");

    println!("PASS channel rtt_us={rtt:.0} restarts=1");
    Ok(())
}

pub async fn bench(runs: usize) -> Result<()> {
    let dir = tempdir()?;
    let mut vm = boot_tandem(dir.path(), "bench-chan", &[]).await?;
    let api = vm.api.display().to_string();
    wait_up(&api, 1, Duration::from_secs(30)).await?;
    let c = &mut vm.console;
    let mut guest_rtt = Vec::new();
    let mut host_rtt = Vec::new();
    let mut mmio_builtin = Vec::new();
    let mut mmio_ours = Vec::new();
    // The control device's PCI name, for the vfio-user MMIO figure.
    let gdir = guest_dir(c).await?;
    let ctl = gdir.rsplit('/').next().unwrap_or("").to_owned();
    for i in 0..runs.max(1) {
        c.check(&format!("echo '1000 64' > {gdir}/ping")).await?;
        let ps = guest_file(c, "ping_stats").await?;
        let g: f64 = ps
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rtt_us_median="))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("ping_stats: {ps}"))?;
        guest_rtt.push(g);
        let r = host_ping(&api, 1000, i as u64 + 1, Some(64)).await?;
        host_rtt.push(r["rtt_us_median"].as_f64().unwrap_or(f64::NAN));
        // A register of QEMU's own ICH9 AHCI controller (BAR5, CAP at 0).
        let out = c.check("tandem-mmio-bench 0000:00:1f.2 5 0 21 200").await?;
        mmio_builtin.push(parse_ns(&out)?);
        let out = c
            .check(&format!("tandem-mmio-bench {ctl} 0 0 21 50"))
            .await?;
        mmio_ours.push(parse_ns(&out)?);
        println!(
            "run {}: guest->host ping {:.1} us, host->guest ping {:.1} us, MMIO read built-in {:.2} us, control device {:.2} us",
            i + 1,
            g,
            host_rtt[i],
            mmio_builtin[i] / 1000.0,
            mmio_ours[i] / 1000.0
        );
    }
    let g = median(&mut guest_rtt);
    let h = median(&mut host_rtt);
    let m = median(&mut mmio_builtin) / 1000.0;
    let o = median(&mut mmio_ours) / 1000.0;
    let ratio = g / m;
    println!("channel round trip (64-byte ping), median of {runs} runs of 1000:");
    println!("  guest -> host -> guest:   {g:.1} us (measured in the guest)");
    println!("  host -> guest -> host:    {h:.1} us (measured in the device server)");
    println!("one MMIO read from the guest, same engine:");
    println!("  QEMU built-in ICH9 AHCI:  {m:.2} us");
    println!("  Tandem control device:    {o:.2} us (vfio-user round trip)");
    println!(
        "RESULT channel rtt_us={g:.1} mmio_builtin_us={m:.2} ratio={ratio:.1} goal<=2.0 {}",
        if ratio <= 2.0 { "met" } else { "MISSED" }
    );
    let _ = tandem(&["shutdown", "--api-socket", &api, "--timeout", "30"]).await?;
    Ok(())
}

fn parse_ns(out: &str) -> Result<f64> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("mmio_read_ns_median="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("tandem-mmio-bench said {out:?}"))
}
