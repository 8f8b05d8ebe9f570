//! `tandem replica`: replicate a disk chain to a recovery site and fail
//! over to a recovery point (the work is `tandem_replica`; protocol and
//! site layout in host-vmm/replica/README.md).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tandem_disk::Format;
use tandem_replica::failover::utc;
use tandem_replica::status::{human, ApiResponse};
use tandem_replica::{sender, ServeConfig, Server, Source, Status};

#[derive(Subcommand)]
pub enum ReplicaCmd {
    /// Run a recovery site: store the layers primaries ship into DIR.
    Serve {
        /// The site's directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:7411.
        #[arg(long)]
        listen: String,
        /// Drop a connection silent for this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        idle_timeout: Duration,
        /// Keep the last N recovery points (1 to 56); older ones are merged
        /// down as new ones arrive (points held by a failover stay).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=56))]
        keep: u64,
    },
    /// Replicate a disk to a recovery site: initial sync, then a sealed
    /// layer every interval. Runs until interrupted.
    Start {
        /// The top of a chain no VM is using.
        #[arg(required_unless_present = "disk")]
        path: Option<PathBuf>,
        /// A running VM's `if=vhost-blk` disk (disk0, ...): checkpoints go
        /// through its backend while the guest writes.
        #[arg(long, conflicts_with = "path")]
        disk: Option<String>,
        #[command(flatten)]
        target: crate::Target,
        /// The recovery site's address (host:port).
        #[arg(long)]
        to: String,
        /// How often a layer is sealed and shipped (e.g. 1s, 500ms, 5m).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Connect/read/write timeout: a cut network is noticed within it.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// JSON-lines API socket answering {"op":"status"}.
        #[arg(long)]
        api: Option<PathBuf>,
        /// Stop once the site holds this many recovery points.
        #[arg(long)]
        count: Option<u64>,
        /// Once N sealed layers are all on the site, merge all but the
        /// newest into the bottom one (3 to 56; 0: never merge, replication
        /// then stops after about 60 layers).
        #[arg(long, default_value_t = sender::MERGE_AT as u64,
              value_parser = |s: &str| -> Result<u64, String> {
                  match s.parse::<u64>() {
                      Ok(n) if n == 0 || (3..=56).contains(&n) => Ok(n),
                      _ => Err(format!("{s:?}: 0, or 3 to 56")),
                  }
              })]
        merge_at: u64,
    },
    /// List a site's recovery points with their times.
    Points {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Build a disk at exactly one recovery point.
    Failover {
        #[arg(long)]
        dir: PathBuf,
        /// The point's id (`tandem replica points`), or `last`.
        #[arg(long)]
        point: String,
        /// The disk to create: a new differencing layer on the point (the
        /// site's layers are never written), or with --flatten a single image.
        #[arg(long)]
        out: PathBuf,
        /// Write a single image of this format (raw, qcow2, vhdx) instead.
        #[arg(long, value_parser = parse_format)]
        flatten: Option<Format>,
    },
    /// Let the site merge a point a failover holds (once the failed-over
    /// disk no longer needs the site's layer: flattened or deleted).
    Release {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        point: u64,
    },
    /// Progress of a running `replica start` (through its --api socket), or
    /// the state of a site (--dir).
    Status {
        #[arg(long, required_unless_present = "dir")]
        api: Option<PathBuf>,
        #[arg(long, conflicts_with = "api")]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format {s:?} (raw, qcow2 or vhdx)"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (1s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn vhost_api(target: &crate::Target, disk: &str) -> Result<PathBuf> {
    let index: usize = disk
        .strip_prefix("disk")
        .unwrap_or(disk)
        .parse()
        .map_err(|_| {
            anyhow::anyhow!("bad disk id {disk:?} (disk0, disk1, ... as `tandem info` shows)")
        })?;
    let api = target.api_socket.clone().unwrap_or_else(|| {
        tandem_vmm::config::default_run_dir().join(format!("{}.sock", target.vm))
    });
    Ok(tandem_vmm::vhost::socket_paths(&api.with_extension("devices"), index).1)
}

pub fn replica(cmd: ReplicaCmd) -> Result<i32> {
    match cmd {
        ReplicaCmd::Serve {
            dir,
            listen,
            idle_timeout,
            keep,
        } => {
            let server = Server::bind(&ServeConfig {
                dir: dir.clone(),
                listen,
                idle_timeout,
                keep: Some(keep as usize),
            })
            .with_context(|| format!("starting the recovery site in {}", dir.display()))?;
            println!("ready {}", server.local_addr()?);
            server.run()?;
            Ok(0)
        }
        ReplicaCmd::Start {
            path,
            disk,
            target,
            to,
            interval,
            timeout,
            api,
            count,
            merge_at,
        } => {
            let source = match (path, disk) {
                (Some(p), _) => Source::File(p),
                (None, Some(d)) => Source::Vhost(vhost_api(&target, &d)?),
                (None, None) => bail!("name a disk: PATH, or --disk ID with --vm NAME"),
            };
            let status = Arc::new(Mutex::new(Status::default()));
            if let Some(api) = &api {
                tandem_replica::status::serve_api(api, status.clone())
                    .with_context(|| format!("API socket {}", api.display()))?;
            }
            let cfg = sender::SendConfig {
                source,
                to,
                interval,
                timeout,
                stop_after: count,
                print_progress: true,
                merge_at: merge_at as usize,
            };
            let result = sender::run(&cfg, &status, &AtomicBool::new(false));
            if let Some(api) = &api {
                let _ = std::fs::remove_file(api);
            }
            result.context("replication")?;
            let s = status.lock().unwrap_or_else(|p| p.into_inner());
            println!("{}", s.line());
            Ok(0)
        }
        ReplicaCmd::Points { dir, json } => {
            let points = tandem_replica::points(&dir)
                .with_context(|| format!("reading the site in {}", dir.display()))?;
            let held = tandem_replica::failover::held(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else if points.is_empty() {
                println!("no recovery points in {}", dir.display());
            } else {
                println!(
                    "{:>6}  {:<27}  {:>10}  file",
                    "point", "time (sealed)", "size"
                );
                for p in &points {
                    let mut notes = Vec::new();
                    if let Some(from) = p.merged_from {
                        notes.push(format!("points {from}..{} merged", p.seq));
                    }
                    if held.contains(&p.seq) {
                        notes.push("held by a failover".into());
                    }
                    println!(
                        "{:>6}  {:<27}  {:>10}  {}{}",
                        p.seq,
                        utc(p.sealed_at_ms),
                        human(p.file_len),
                        p.file,
                        if notes.is_empty() {
                            String::new()
                        } else {
                            format!("  ({})", notes.join(", "))
                        }
                    );
                }
            }
            Ok(0)
        }
        ReplicaCmd::Failover {
            dir,
            point,
            out,
            flatten,
        } => {
            let id = if point == "last" {
                tandem_replica::points(&dir)?
                    .last()
                    .map(|p| p.seq)
                    .ok_or_else(|| anyhow::anyhow!("no recovery points in {}", dir.display()))?
            } else {
                point
                    .parse()
                    .map_err(|_| anyhow::anyhow!("bad point {point:?} (a number, or last)"))?
            };
            let how = flatten.map_or(tandem_replica::Output::Chain, tandem_replica::Output::Flat);
            let layer = tandem_replica::failover(&dir, id, &out, how)
                .with_context(|| format!("failover to point {id}"))?;
            println!(
                "{} reads as recovery point {id} ({})",
                out.display(),
                layer.display()
            );
            Ok(0)
        }
        ReplicaCmd::Release { dir, point } => {
            if tandem_replica::failover::release(&dir, point)? {
                println!("point {point} is no longer held");
            } else {
                println!("point {point} was not held");
            }
            Ok(0)
        }
        ReplicaCmd::Status { api, dir, json } => {
            if let Some(dir) = dir {
                let m = tandem_replica::Manifest::load(&dir)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&m)?);
                } else {
                    println!("site:       {}", dir.display());
                    println!(
                        "chain:      {}",
                        m.chain_id.as_deref().unwrap_or("(none yet)")
                    );
                    println!("generation: {}", m.generation);
                    println!("points:     {}", m.points().count());
                    if let Some(l) = m.points().last() {
                        println!("newest:     {} sealed {}", l.seq, utc(l.sealed_at_ms));
                    }
                }
                return Ok(0);
            }
            let api = api.ok_or_else(|| anyhow::anyhow!("--api or --dir"))?;
            match tandem_replica::status::query(&api)
                .with_context(|| format!("asking {}", api.display()))?
            {
                ApiResponse::Status { status, rpo_ms } => {
                    if json {
                        let mut v = serde_json::to_value(&status)?;
                        v["rpo_ms"] = rpo_ms.into();
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        println!("state:  {}", status.state);
                        println!("disk:   {} -> {}", status.disk, status.target);
                        println!("{}", status.line());
                        match rpo_ms {
                            Some(ms) => println!("rpo now: {ms} ms"),
                            None => println!("rpo now: no recovery point yet"),
                        }
                        if status.layer_offset < status.layer_len {
                            println!(
                                "shipping layer {}: {} of {}",
                                status.points + 1,
                                human(status.layer_offset),
                                human(status.layer_len)
                            );
                        }
                        if let Some(e) = &status.last_error {
                            println!("last error: {e}");
                        }
                    }
                    Ok(0)
                }
                ApiResponse::Error { message } => bail!("{message}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("s").is_err());
    }
}
