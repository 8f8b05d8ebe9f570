//! The end-to-end harness: boots real guests through `tandem` and checks
//! them from the inside (over the serial console) and the outside (the
//! control API and CLI). Benchmarks measure against a baseline taken in the
//! same run. Called by `ci/e2e` and `ci/bench`.

mod boot;
mod channel;
mod failover;
mod guest;
mod migrate;
mod migrate_vf;
mod nvme;
mod replica;
mod shared;
mod snapshot;
mod vhost;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "Tandem end-to-end scenarios and benchmarks")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Run an end-to-end scenario; prints `PASS <scenario> ...` on success.
    E2e { scenario: String },
    /// Run a benchmark; prints the figures and their ratio to the baseline.
    Bench {
        scenario: String,
        /// Runs per configuration (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("FAIL cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        match cli.what {
            What::E2e { scenario } => match scenario.as_str() {
                "boot" => boot::e2e().await,
                "channel" => channel::e2e().await,
                "nvme" => nvme::e2e().await,
                "vhost-blk" => vhost::e2e().await,
                "replica" => replica::e2e().await,
                "snapshot" => snapshot::e2e().await,
                "migrate" => migrate::e2e().await,
                "shared-disk" => shared::e2e().await,
                "failover" => failover::e2e().await,
                other => bail!(
                    "unknown scenario {other:?} (known: boot, channel, nvme, vhost-blk, replica, snapshot, migrate, failover, shared-disk)"
                ),
            },
            What::Bench { scenario, runs } => match scenario.as_str() {
                "boot" => boot::bench(runs).await,
                "channel" => channel::bench(runs).await,
                "nvme" => nvme::bench(runs).await,
                "replica" => replica::bench(runs).await,
                "shared-disk" => shared::bench(runs).await,
                "failover" => failover::bench(runs).await,
                "migrate" => migrate_vf::bench(runs).await,
                other => bail!("unknown benchmark {other:?} (known: boot, channel, nvme, replica, failover, migrate, shared-disk)"),
            },
        }
    });
    if let Err(e) = result {
        eprintln!("FAIL {e:#}");
        std::process::exit(1);
    }
}

/// The `tandem` binary next to this harness (both come from one
/// `cargo build`), or `$TANDEM_BIN`.
pub fn tandem_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_BIN") {
        return Ok(p.into());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("tandem");
    if !p.is_file() {
        bail!(
            "no tandem binary at {} (build the workspace first)",
            p.display()
        );
    }
    Ok(p)
}

/// Runs `tandem <args>` to completion; returns (status, stdout, stderr).
pub async fn tandem(args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        Command::new(tandem_bin()?)
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .with_context(|| format!("tandem {} did not finish", args.join(" ")))??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `tandem <args>`; its stdout, or an error with everything it said.
pub async fn tandem_ok(args: &[&str]) -> Result<String> {
    let (code, out, err) = tandem(args).await?;
    anyhow::ensure!(
        code == 0,
        "tandem {} failed ({code}):\n{out}{err}",
        args.join(" ")
    );
    Ok(out)
}

/// Runs a host command to completion; its output, or an error with it.
pub async fn host(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {cmd}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd} {} failed:\n{text}", args.join(" "));
    }
    Ok(text)
}

/// Starts `tandem run <args>` in the background.
pub fn spawn_tandem(args: &[&str], log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    Ok(Command::new(tandem_bin()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
