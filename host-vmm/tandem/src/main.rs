//! `tandem`, the host command line.
//!
//! Thin by design: it parses arguments, resolves the engine, accelerator
//! and default image, and hands over to the library crates (`tandem-vmm`
//! runs VMs, `tandem-api` talks to them, `tandem-image` builds images).

mod channel;
mod device;
mod disk;
mod host;
mod replica;
mod run;
mod share;
mod vhost;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tandem_api::{routes, Client, Ping, ShutdownRequest, ShutdownResponse, VmInfo};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: VMs that keep migration, snapshots and overcommit with assigned devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a VM and stay in the foreground until it stops.
    Run(Box<run::RunArgs>),
    /// Show a running VM's state, engine and accelerator.
    Info {
        #[command(flatten)]
        target: Target,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause a running VM.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused VM.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Shut a VM down: the ACPI power button, then a hard stop after the timeout.
    Shutdown {
        #[command(flatten)]
        target: Target,
        /// Stop at once without asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest has to power off before a hard stop.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Save a VM to a file and stop it; `tandem run --restore FILE` brings
    /// it back where it was. Assigned functions that are direct paths of
    /// guest volumes are handed off first (the guest moves their I/O to the
    /// synthetic path, then they are removed); any other is refused.
    Snapshot {
        /// Where to save it (must not exist; `FILE.json` gets the machine's
        /// configuration).
        file: PathBuf,
        #[command(flatten)]
        handoff: HandoffArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Live-migrate a VM to a `tandem run --incoming tcp:ADDR:PORT` on
    /// another host (same machine flags, disks on shared storage). Direct
    /// paths are handed off first, as for `snapshot`; on failure the VM
    /// keeps running here with its functions back.
    Migrate {
        /// tcp:ADDR:PORT of the destination.
        #[arg(long)]
        to: String,
        /// Cap the transfer at this many MiB/s.
        #[arg(long)]
        bandwidth: Option<u64>,
        /// The downtime to aim for at the switch-over, in ms (QEMU copies
        /// dirty memory until the rest fits in it; default 300; device
        /// state comes on top). A guest that dirties memory faster than the link
        /// can carry then never converges, and the migration is cancelled.
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
        max_downtime: Option<u64>,
        #[command(flatten)]
        handoff: HandoffArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Check that a VM's control socket answers.
    Ping {
        #[command(flatten)]
        target: Target,
    },
    /// List the VMs whose sockets are in the run directory.
    List,
    /// The engine and accelerator this host would use, and why.
    Host(host::HostArgs),
    /// Build or inspect the engine and the default guest image.
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// The guest/host control channel: state, and pings to the guest.
    Channel {
        #[command(subcommand)]
        command: channel::ChannelCmd,
    },
    /// Functions assigned to a VM: attach, detach, show (host proxy view).
    Device {
        #[command(subcommand)]
        command: device::DeviceCmd,
    },
    /// The SR-IOV NVMe device server: serve, enable VFs, show, policy.
    Nvme {
        #[command(subcommand)]
        command: device::NvmeCmd,
    },
    /// Disk images and chains: create, info, check, checkpoint, commit, convert, compare.
    Disk {
        #[command(subcommand)]
        command: disk::DiskCmd,
    },
    /// Serve disks to other hosts: `tandem share iscsi`.
    Share {
        #[command(subcommand)]
        command: share::ShareCmd,
    },
    /// Replicate a disk to a recovery site; list recovery points; fail over.
    Replica {
        #[command(subcommand)]
        command: replica::ReplicaCmd,
    },
    /// Run a device server (started by `tandem run`, not by hand).
    #[command(hide = true)]
    DeviceServer {
        #[command(subcommand)]
        kind: channel::DeviceServerCmd,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build the pinned engine (unless a system QEMU will do) and the
    /// default guest image (kernel, tandem.ko, initramfs) into the cache.
    Build {
        /// Use a system QEMU that is new enough instead of building the
        /// pinned, patched one (see README: hot-replacing devices needs
        /// Tandem's QEMU fix).
        #[arg(long)]
        system_engine: bool,
    },
    /// Show the default image and where the cache is.
    Info {
        #[arg(long)]
        json: bool,
    },
}

/// Which VM a control command talks to.
#[derive(Args, Clone)]
pub(crate) struct Target {
    /// The VM's name (its socket is <run dir>/<name>.sock).
    #[arg(long, default_value = "vm0")]
    vm: String,
    /// The VM's API socket; overrides --vm.
    #[arg(long, env = "TANDEM_API_SOCKET")]
    api_socket: Option<PathBuf>,
}

impl Target {
    pub(crate) fn client(&self) -> Client {
        let socket = self.api_socket.clone().unwrap_or_else(|| {
            tandem_vmm::config::default_run_dir().join(format!("{}.sock", self.vm))
        });
        Client::new(socket)
    }
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,tandem_vmm=info,tandem_control_device=info,tandem_nvme_device=info",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let code = match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            1
        }
    };
    std::process::exit(code);
}

fn real_main(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Image { command } => image(command),
        Cmd::Host(args) => runtime()?.block_on(host::host(args)),
        Cmd::Run(args) => runtime()?.block_on(run::run(*args)),
        Cmd::Channel { command } => runtime()?.block_on(channel::channel(command)),
        Cmd::DeviceServer { kind } => channel::device_server(kind),
        Cmd::Disk { command } => disk::disk(command),
        Cmd::Replica { command } => replica::replica(command),
        Cmd::Device { command } => runtime()?.block_on(device::device(command)),
        Cmd::Nvme { command } => device::nvme(command),
        Cmd::Share { command } => share::share(command),
        other => runtime()?.block_on(control(other)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print_info(info: &VmInfo) {
    println!("name:        {}", info.name);
    println!("state:       {}", info.state);
    println!("accelerator: {} ({})", info.accel, info.accel_reason);
    println!(
        "engine:      QEMU {} [{}] {} pid {}",
        info.engine.version,
        info.engine.origin,
        info.engine.path,
        info.engine
            .pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!("vcpus:       {}", info.cpus);
    println!("memory:      {} MiB", info.memory_mib);
    println!("kernel:      {}", info.kernel);
    if let Some(i) = &info.initrd {
        println!("initrd:      {i}");
    }
    println!("append:      {}", info.append);
    for d in &info.disks {
        println!(
            "disk:        {} {} {} {}{}",
            d.id,
            d.interface,
            d.format,
            d.path,
            if d.readonly { " (read-only)" } else { "" }
        );
        if let Some(v) = &d.volume_socket {
            println!("             lent to a second path at {v}");
        }
    }
    println!("serial:      {}", info.serial);
    println!("api socket:  {}", info.api_socket);
    println!("uptime:      {:.1}s", info.uptime_ms as f64 / 1000.0);
    println!(
        "versions:    tandem {}, ABI {}",
        info.tandem_version, info.abi_version
    );
}

async fn control(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Info { target, json } => {
            let info: VmInfo = target.client().get(routes::VM_INFO).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
        }
        Cmd::Pause { target } => {
            let info: VmInfo = target.client().put(routes::VM_PAUSE, &()).await?;
            println!("{}: {}", info.name, info.state);
        }
        Cmd::Resume { target } => {
            let info: VmInfo = target.client().put(routes::VM_RESUME, &()).await?;
            println!("{}: {}", info.name, info.state);
        }
        Cmd::Shutdown {
            target,
            force,
            timeout,
        } => {
            let req = ShutdownRequest {
                timeout_s: Some(timeout),
                force,
            };
            let client = target
                .client()
                .with_timeout(Duration::from_secs(timeout + 60));
            let r: ShutdownResponse = client.put(routes::VM_SHUTDOWN, &req).await?;
            println!(
                "stopped in {:.2}s ({})",
                r.elapsed_ms as f64 / 1000.0,
                if r.graceful {
                    "the guest powered off"
                } else {
                    "hard stop"
                }
            );
        }
        Cmd::Migrate {
            to,
            bandwidth,
            max_downtime,
            handoff,
            target,
        } => {
            let req = tandem_api::MigrateRequest {
                to,
                max_bandwidth_mib: bandwidth,
                max_downtime_ms: max_downtime,
                handoff_timeout_ms: Some(handoff.handoff_ms),
                force_handoff: handoff.force_handoff,
            };
            let client = target.client().with_timeout(Duration::from_secs(660));
            let r: tandem_api::MigrateResponse = client.put(routes::VM_MIGRATE, &req).await?;
            println!(
                "migrated to {} ({} MiB in {:.2}s{}); the VM runs there now",
                r.to,
                r.bytes / (1024 * 1024),
                r.total_ms as f64 / 1000.0,
                r.downtime_ms
                    .map(|d| format!(", downtime {d} ms"))
                    .unwrap_or_default()
                    + &r.downtime_us
                        .map(|us| format!(" ({us} us by QEMU's downtime checkpoints)"))
                        .unwrap_or_default()
            );
            print_handoff(r.handoff.as_ref());
        }
        Cmd::Snapshot {
            file,
            handoff,
            target,
        } => {
            let file = std::path::absolute(&file)
                .with_context(|| format!("{}: bad path", file.display()))?;
            let req = tandem_api::SnapshotRequest {
                file: file.display().to_string(),
                handoff_timeout_ms: Some(handoff.handoff_ms),
                force_handoff: handoff.force_handoff,
            };
            let client = target.client().with_timeout(Duration::from_secs(660));
            let r: tandem_api::SnapshotResponse = client.put(routes::VM_SNAPSHOT, &req).await?;
            println!(
                "saved to {} ({} MiB in {:.2}s{}); configuration in {}; the VM stops. Restore with: tandem run --restore {}",
                r.file,
                r.bytes / (1024 * 1024),
                r.total_ms as f64 / 1000.0,
                r.downtime_ms
                    .map(|d| format!(", guest stopped {d} ms"))
                    .unwrap_or_default()
                    + &r.downtime_us
                        .map(|us| format!(" ({us} us by QEMU's downtime checkpoints)"))
                        .unwrap_or_default(),
                r.config,
                r.file
            );
            print_handoff(r.handoff.as_ref());
        }
        Cmd::Ping { target } => {
            let p: Ping = target.client().get(routes::PING).await?;
            println!(
                "tandem {} (ABI {}) pid {} answers on {}",
                p.tandem_version,
                p.abi_version,
                p.pid,
                target.client().socket().display()
            );
        }
        Cmd::List => {
            let dir = tandem_vmm::config::default_run_dir();
            let mut found = 0;
            if let Ok(entries) = std::fs::read_dir(&dir) {
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    .collect();
                paths.sort();
                for p in paths {
                    let c = Client::new(&p).with_timeout(Duration::from_secs(2));
                    match c.get::<VmInfo>(routes::VM_INFO).await {
                        Ok(i) => {
                            found += 1;
                            println!(
                                "{:<16} {:<13} {} {} MiB {} vCPU  {}",
                                i.name,
                                i.state.to_string(),
                                i.accel,
                                i.memory_mib,
                                i.cpus,
                                p.display()
                            );
                        }
                        Err(_) => println!("{:<16} {:<13} {}", "?", "stale socket", p.display()),
                    }
                }
            }
            if found == 0 {
                eprintln!("no running VMs in {}", dir.display());
            }
        }
        Cmd::Run(_)
        | Cmd::Host(_)
        | Cmd::Image { .. }
        | Cmd::Channel { .. }
        | Cmd::DeviceServer { .. }
        | Cmd::Disk { .. }
        | Cmd::Replica { .. }
        | Cmd::Device { .. }
        | Cmd::Nvme { .. }
        | Cmd::Share { .. } => {
            unreachable!("dispatched in real_main")
        }
    }
    Ok(0)
}

fn image(cmd: ImageCmd) -> Result<i32> {
    let cache = tandem_image::Cache::default_location();
    match cmd {
        ImageCmd::Build { system_engine } => {
            eprintln!("building into {}", cache.root().display());
            let report =
                tandem_image::Builder::new(cache, tandem_image::BuildOptions { system_engine })
                    .build()?;
            println!("engine:  {}", report.engine.display());
            println!(
                "kernel:  {} ({})",
                report.image.kernel.display(),
                report.image.kernel_release
            );
            println!("initrd:  {}", report.image.initrd.display());
            println!(
                "module:  {} (tandem {}, ABI {})",
                report.image.module.display(),
                report.image.module_version,
                report.image.abi_version
            );
            println!("ready: `tandem run` boots this image by default");
        }
        ImageCmd::Info { json } => {
            let image = cache.default_image();
            let engine = cache.engine_binary();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "cache": cache.root(),
                        "image_key": tandem_image::cache::image_key(),
                        "image": image,
                        "engine": engine,
                    }))?
                );
            } else {
                println!("cache:   {}", cache.root().display());
                match engine {
                    Some(e) => println!("engine:  {}", e.display()),
                    None => println!(
                        "engine:  not built (a system QEMU >= {} is used if present)",
                        tandem_engine::MIN_ENGINE_VERSION
                    ),
                }
                match image {
                    Some(m) => {
                        println!("kernel:  {} ({})", m.kernel.display(), m.kernel_release);
                        println!("initrd:  {}", m.initrd.display());
                        println!("module:  tandem {} ABI {}", m.module_version, m.abi_version);
                        println!("append:  {}", m.append);
                    }
                    None => {
                        println!("image:   not built for this version of tandem (run `tandem image build`)");
                        return Ok(1);
                    }
                }
            }
        }
    }
    Ok(0)
}

/// How assigned functions leave before a save or a migration.
#[derive(Args)]
struct HandoffArgs {
    /// How long the guest gets to move each direct path's I/O to its
    /// synthetic path.
    #[arg(long, default_value_t = 5000)]
    handoff_ms: u32,
    /// If the guest does not answer in time, remove the functions anyway
    /// (the guest's volumes then fail over by themselves) instead of
    /// aborting.
    #[arg(long)]
    force_handoff: bool,
}

fn print_handoff(h: Option<&tandem_api::HandoffReport>) {
    if let Some(h) = h {
        println!(
            "handed off {} first: the guest moved their I/O in {} ms{}, removed in {} ms",
            h.functions.join(", "),
            h.release_ms,
            if h.forced {
                " (not acknowledged: removed by force)"
            } else {
                ""
            },
            h.detach_ms
        );
    }
}
