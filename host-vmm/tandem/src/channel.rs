//! `tandem channel ...` and the hidden `tandem device-server ...`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tandem_api::channel::{ChannelStatus, Fault, InjectRequest, PingReport, PingRequest};
use tandem_api::routes;

use crate::Target;

#[derive(Subcommand)]
pub enum ChannelCmd {
    /// Negotiated version, capabilities, liveness, counters, last error.
    Info {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Send pings to the guest and check every answer.
    Ping {
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Payload bytes (default: random sizes up to the ring's maximum).
        #[arg(long)]
        size: Option<usize>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Send the guest a deliberately broken message (robustness tests).
    Inject {
        #[arg(value_enum)]
        fault: FaultArg,
        #[command(flatten)]
        target: Target,
    },
}

/// Faults `tandem channel inject` can send.
#[derive(Clone, Copy, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum FaultArg {
    Garbage,
    Oversized,
    UnknownKind,
    BadVersion,
    ShortPayload,
    UnexpectedResponse,
    BadFlags,
}

impl From<FaultArg> for Fault {
    fn from(f: FaultArg) -> Fault {
        match f {
            FaultArg::Garbage => Fault::Garbage,
            FaultArg::Oversized => Fault::Oversized,
            FaultArg::UnknownKind => Fault::UnknownKind,
            FaultArg::BadVersion => Fault::BadVersion,
            FaultArg::ShortPayload => Fault::ShortPayload,
            FaultArg::UnexpectedResponse => Fault::UnexpectedResponse,
            FaultArg::BadFlags => Fault::BadFlags,
        }
    }
}

#[derive(Subcommand)]
pub enum DeviceServerCmd {
    /// The Tandem control device over vfio-user.
    Control {
        #[arg(long)]
        vfio_socket: PathBuf,
        #[arg(long)]
        api_socket: PathBuf,
        #[arg(long, default_value_t = 1)]
        session: u32,
        /// ABI range, MIN-MAX.
        #[arg(long)]
        abi: Option<String>,
    },
    /// A vhost-user-blk backend serving a disk chain (see `vhost.rs`).
    VhostBlk(crate::vhost::VhostBlkArgs),
    /// A vhost-user-scsi backend tunnelling a shared disk (see `share.rs`).
    VhostScsi(crate::share::VhostScsiArgs),
}

pub async fn channel(cmd: ChannelCmd) -> Result<i32> {
    match cmd {
        ChannelCmd::Info { json, target } => {
            let s: ChannelStatus = target.client().get(routes::CHANNEL_INFO).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(0);
            }
            let srv = &s.server;
            println!(
                "server:       {} (pid {}, session {}, restarts {})",
                srv.state,
                srv.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                srv.session,
                srv.restarts
            );
            if let Some(e) = &srv.last_exit {
                println!("last exit:    {e}");
            }
            let Some(d) = s.device else {
                println!("device:       unreachable");
                return Ok(1);
            };
            println!(
                "device:       {}{}",
                d.device_state,
                d.device_error
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            println!(
                "channel:      {}{}",
                d.channel_state,
                d.version.map(|v| format!(", ABI {v}")).unwrap_or_default()
            );
            if let Some(r) = d.refused_guest_versions {
                println!("refused:      guest speaks {r}, host {}", d.host_versions);
            }
            if let Some(c) = d.capabilities {
                println!("capabilities: {c:#x}");
            }
            if let Some(g) = d.guest_driver {
                println!("guest driver: tandem {g}");
            }
            match (d.guest_alive, d.guest_silence_ms) {
                (Some(a), Some(ms)) => println!("guest alive:  {a} (last heard {ms} ms ago)"),
                _ => println!("guest alive:  unknown"),
            }
            let c = d.counters;
            println!(
                "counters:     rx {} tx {} pings {} heartbeats {} malformed {} errors {} timeouts {} interrupts {} doorbells {}",
                c.rx_messages,
                c.tx_messages,
                c.pings_answered,
                c.heartbeats_received,
                c.malformed,
                c.error_replies,
                c.timeouts,
                c.interrupts,
                c.doorbells
            );
            println!("last error:   {}", d.last_error);
        }
        ChannelCmd::Ping {
            count,
            size,
            timeout_ms,
            seed,
            json,
            target,
        } => {
            let req = PingRequest {
                count,
                size,
                timeout_ms,
                seed,
            };
            let budget = Duration::from_millis(u64::from(count) * (u64::from(timeout_ms) + 1000))
                + Duration::from_secs(30);
            let r: PingReport = target
                .client()
                .with_timeout(budget)
                .put(routes::CHANNEL_PING, &req)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let us =
                    |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
                println!(
                    "{} sent, {} answered and verified, {} mismatched, {} timed out, {} failed; rtt us min {} median {} p99 {} max {}",
                    r.sent,
                    r.ok,
                    r.mismatched,
                    r.timeouts,
                    r.failed,
                    us(r.rtt_us_min),
                    us(r.rtt_us_median),
                    us(r.rtt_us_p99),
                    us(r.rtt_us_max)
                );
                if let Some(e) = &r.first_error {
                    println!("first error: {e}");
                }
            }
            if r.ok != r.sent {
                return Ok(1);
            }
        }
        ChannelCmd::Inject { fault, target } => {
            let req = InjectRequest {
                fault: fault.into(),
            };
            let _: serde_json::Value = target.client().put(routes::CHANNEL_INJECT, &req).await?;
            println!("sent");
        }
    }
    Ok(0)
}

pub fn device_server(cmd: DeviceServerCmd) -> Result<i32> {
    match cmd {
        DeviceServerCmd::Control {
            vfio_socket,
            api_socket,
            session,
            abi,
        } => {
            let range = match abi {
                Some(s) => match tandem_vmm::config::parse_abi_range(&s) {
                    Some(r) => r,
                    None => bail!("bad --abi {s:?} (MIN-MAX, e.g. 1.0-1.0)"),
                },
                None => shared_abi::SUPPORTED,
            };
            tandem_control_device::server::run(tandem_control_device::server::ServerConfig {
                vfio_socket,
                api_socket,
                session,
                range,
            })
            .context("control device server")?;
            Ok(0)
        }
        DeviceServerCmd::VhostBlk(args) => crate::vhost::device_server(args),
        DeviceServerCmd::VhostScsi(args) => crate::share::vhost_scsi(args),
    }
}
