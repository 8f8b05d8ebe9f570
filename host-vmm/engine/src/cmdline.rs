//! From a machine description to QEMU's command line. Pure.
//!
//! Every machine Tandem starts has the same shape: q35, no default devices,
//! guest RAM in a shared memfd (so that device servers can map it), QMP on
//! a socket Tandem passes in, the guest stopped until Tandem says `cont`,
//! and no reboot (a guest reboot or panic ends the VM; Tandem reports it).
//! Values go through QEMU's JSON syntax where QEMU accepts it, so paths
//! with commas or quotes cannot break the command line.

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::accel::Accel;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskInterface {
    /// QEMU's own virtio-blk-pci.
    VirtioBlk,
    /// QEMU's own NVMe controller (a baseline for Tandem's).
    Nvme,
    /// The guest's virtio-blk served by Tandem's vhost-user-blk backend
    /// (`tandem device-server vhost-blk`). QEMU does not open the file:
    /// [`MachineSpec::to_args`] skips these disks, and the VMM adds the
    /// backend's socket to `chardevs` and its `vhost-user-blk-pci` to `devices`.
    VhostBlk,
    /// QEMU's own virtio-scsi-pci controller with one `scsi-hd` (a
    /// baseline for shared disks served through Tandem's SCSI tunnel).
    VirtioScsi,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub interface: DiskInterface,
    pub readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// `if=vhost-blk` only: where the backend lends the disk to a second
    /// path (default: next to its other sockets; see `tandem-vmm`'s
    /// `vhost` module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_socket: Option<PathBuf>,
}

/// Where the guest's first serial port goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "path", rename_all = "lowercase")]
pub enum Serial {
    /// The terminal Tandem runs in.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// A listening Unix socket (connect to it to talk to the console).
    Unix(PathBuf),
    None,
}

/// Everything QEMU needs to start one machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub disks: Vec<DiskSpec>,
    pub serial: Serial,
    pub firmware_dirs: Vec<PathBuf>,
    /// The file descriptor number, in QEMU, of the connected QMP socket.
    pub qmp_fd: i32,
    /// PCIe root ports for hot-plug, named `tandem-rp0`, `tandem-rp1`...
    pub root_ports: u32,
    /// More devices, in QEMU's JSON `-device` form.
    pub devices: Vec<serde_json::Value>,
    /// Unix sockets QEMU connects to as a client (vhost-user backends);
    /// `devices` refer to them by id.
    #[serde(default)]
    pub chardevs: Vec<SocketChardev>,
    /// Start waiting for an incoming migration (`-incoming defer`; the
    /// caller then sends `migrate-incoming`) instead of booting.
    #[serde(default)]
    pub incoming: bool,
    /// QEMU's log file (`-D`), with microsecond timestamps: it carries
    /// QEMU's downtime checkpoints (trace event
    /// `vmstate_downtime_checkpoint`), which time a migration's stop and
    /// switch-over finer than the milliseconds `query-migrate` reports.
    #[serde(default)]
    pub log: Option<PathBuf>,
}

/// `-chardev socket,id=...,path=...`: QEMU connects to a listening socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketChardev {
    pub id: String,
    pub path: PathBuf,
}

/// The id of the `n`th hot-plug root port.
pub fn root_port_id(n: u32) -> String {
    format!("tandem-rp{n}")
}

/// Escapes a value for QEMU's `key=value,...` option syntax (commas double).
pub fn opt_escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

impl MachineSpec {
    /// The arguments after the program name.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &format!("guest={},debug-threads=on", opt_escape(&self.name)),
        ]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-S",
        ]);
        for dir in &self.firmware_dirs {
            push(&["-L", &path_str(dir)]);
        }
        if let Some(log) = &self.log {
            push(&[
                "-msg",
                "timestamp=on",
                "-D",
                &path_str(log),
                "-trace",
                "vmstate_downtime_checkpoint",
            ]);
        }
        push(&[
            "-machine",
            &format!("q35,accel={},memory-backend=ram0", self.accel),
        ]);
        // ACPI hot-plug on root ports: a removal completes in milliseconds
        // (native PCIe hot-plug waits out a 5 s attention-button delay).
        push(&[
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on",
        ]);
        push(&[
            "-cpu",
            match self.accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            },
        ]);
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&[
            "-object",
            &json!({
                "qom-type": "memory-backend-memfd",
                "id": "ram0",
                "size": self.memory_mib * 1024 * 1024,
                "share": true,
            })
            .to_string(),
        ]);
        push(&["-kernel", &path_str(&self.kernel)]);
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", &path_str(initrd)]);
        }
        if !self.append.is_empty() {
            push(&["-append", &self.append]);
        }
        push(&[
            "-chardev",
            &format!("socket,id=qmp,fd={}", self.qmp_fd),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
        match &self.serial {
            Serial::None => {}
            Serial::Stdio => push(&["-chardev", "stdio,id=serial0,signal=on"]),
            Serial::File(p) => push(&[
                "-chardev",
                &format!(
                    "file,id=serial0,path={},append=on",
                    opt_escape(&path_str(p))
                ),
            ]),
            Serial::Unix(p) => push(&[
                "-chardev",
                &format!(
                    "socket,id=serial0,path={},server=on,wait=off",
                    opt_escape(&path_str(p))
                ),
            ]),
        }
        if self.serial != Serial::None {
            push(&["-serial", "chardev:serial0"]);
        }
        for c in &self.chardevs {
            push(&[
                "-chardev",
                &format!(
                    "socket,id={},path={}",
                    opt_escape(&c.id),
                    opt_escape(&path_str(&c.path))
                ),
            ]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.interface == DiskInterface::VhostBlk {
                // Served by a backend process; see `DiskInterface::VhostBlk`.
                continue;
            }
            let file = format!("disk{i}-file");
            let node = format!("disk{i}");
            push(&[
                "-blockdev",
                &json!({
                    "driver": "file",
                    "node-name": file,
                    "filename": path_str(&d.path),
                    "read-only": d.readonly,
                    "cache": {"direct": d.direct, "no-flush": false},
                })
                .to_string(),
                "-blockdev",
                &json!({
                    "driver": match d.format { DiskFormat::Raw => "raw", DiskFormat::Qcow2 => "qcow2" },
                    "node-name": node,
                    "file": file,
                    "read-only": d.readonly,
                })
                .to_string(),
            ]);
            let device = match d.interface {
                DiskInterface::VirtioBlk => json!({
                    "driver": "virtio-blk-pci", "drive": node, "id": node,
                }),
                DiskInterface::Nvme => json!({
                    "driver": "nvme", "drive": node, "id": node, "serial": format!("tandem-{i}"),
                }),
                DiskInterface::VhostBlk => continue,
                DiskInterface::VirtioScsi => {
                    let ctrl = format!("scsi{i}");
                    push(&[
                        "-device",
                        &json!({"driver": "virtio-scsi-pci", "id": ctrl, "num_queues": 1})
                            .to_string(),
                    ]);
                    json!({
                        "driver": "scsi-hd", "drive": node, "id": node, "bus": format!("{ctrl}.0"),
                    })
                }
            };
            push(&["-device", &device.to_string()]);
        }
        for n in 0..self.root_ports {
            push(&[
                "-device",
                &json!({
                    "driver": "pcie-root-port",
                    "id": root_port_id(n),
                    "chassis": n + 1,
                    "slot": n + 1,
                })
                .to_string(),
            ]);
        }
        for d in &self.devices {
            push(&["-device", &d.to_string()]);
        }
        a.into_iter().map(OsString::from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            name: "vm0".into(),
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 512,
            kernel: "/k/bzImage".into(),
            initrd: Some("/k/initramfs".into()),
            append: "console=ttyS0".into(),
            disks: vec![],
            serial: Serial::File("/tmp/a,b.log".into()),
            firmware_dirs: vec!["/usr/share/seabios".into()],
            qmp_fd: 3,
            root_ports: 2,
            devices: vec![json!({"driver": "vfio-user-pci", "id": "x", "bus": "tandem-rp0"})],
            chardevs: vec![],
            incoming: false,
            log: None,
        }
    }

    #[test]
    fn incoming_waits_for_a_migration() {
        assert!(value_after(&args(&spec()), "-incoming").is_empty());
        let s = MachineSpec {
            incoming: true,
            log: None,
            ..spec()
        };
        assert_eq!(value_after(&args(&s), "-incoming"), ["defer"]);
    }

    fn args(s: &MachineSpec) -> Vec<String> {
        s.to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_log_file_carries_timestamped_downtime_checkpoints() {
        assert!(value_after(&args(&spec()), "-D").is_empty());
        let mut sp = spec();
        sp.log = Some("/run/t/web.qemu.log".into());
        let a = args(&sp);
        assert_eq!(value_after(&a, "-D"), ["/run/t/web.qemu.log"]);
        assert_eq!(value_after(&a, "-msg"), ["timestamp=on"]);
        assert_eq!(value_after(&a, "-trace"), ["vmstate_downtime_checkpoint"]);
    }

    #[test]
    fn machine_shape() {
        let a = args(&spec());
        for f in ["-nodefaults", "-no-user-config", "-no-reboot", "-S"] {
            assert!(a.iter().any(|x| x == f), "missing {f}");
        }
        assert_eq!(
            value_after(&a, "-machine"),
            ["q35,accel=tcg,memory-backend=ram0"]
        );
        assert_eq!(value_after(&a, "-cpu"), ["max"]);
        assert_eq!(value_after(&a, "-m"), ["512M"]);
        let mem: serde_json::Value = serde_json::from_str(value_after(&a, "-object")[0]).unwrap();
        assert_eq!(mem["qom-type"], "memory-backend-memfd");
        assert_eq!(mem["share"], true);
        assert_eq!(mem["size"], 512u64 * 1024 * 1024);
        assert!(value_after(&a, "-chardev").contains(&"socket,id=qmp,fd=3"));
        // The comma in the serial path is escaped.
        assert!(
            value_after(&a, "-chardev").contains(&"file,id=serial0,path=/tmp/a,,b.log,append=on")
        );
        assert_eq!(value_after(&a, "-L"), ["/usr/share/seabios"]);
        assert!(value_after(&a, "-global")
            .contains(&"ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on"));
        let devs: Vec<serde_json::Value> = value_after(&a, "-device")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        assert_eq!(devs[0]["id"], "tandem-rp0");
        assert_eq!(devs[1]["chassis"], 2);
        assert_eq!(
            devs[2]["driver"], "vfio-user-pci",
            "extra devices come after their ports"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        let a = args(&s);
        assert_eq!(value_after(&a, "-cpu"), ["host"]);
        assert_eq!(
            value_after(&a, "-machine"),
            ["q35,accel=kvm,memory-backend=ram0"]
        );
    }

    #[test]
    fn disks_use_json_so_odd_paths_survive() {
        let mut s = spec();
        s.serial = Serial::None;
        s.disks = vec![
            DiskSpec {
                path: "/d/we,ird\"name.img".into(),
                format: DiskFormat::Raw,
                interface: DiskInterface::VirtioBlk,
                readonly: false,
                direct: true,
                volume_socket: None,
            },
            DiskSpec {
                path: "/d/b.qcow2".into(),
                format: DiskFormat::Qcow2,
                interface: DiskInterface::Nvme,
                readonly: true,
                direct: false,
                volume_socket: None,
            },
        ];
        let a = args(&s);
        assert!(!a.iter().any(|x| x == "-serial"));
        let bd: Vec<serde_json::Value> = value_after(&a, "-blockdev")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        assert_eq!(bd.len(), 4);
        assert_eq!(bd[0]["filename"], "/d/we,ird\"name.img");
        assert_eq!(bd[0]["cache"]["direct"], true);
        assert_eq!(bd[3]["driver"], "qcow2");
        assert_eq!(bd[3]["read-only"], true);
        let dev: Vec<serde_json::Value> = value_after(&a, "-device")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .filter(|d: &serde_json::Value| {
                d["driver"] != "pcie-root-port" && d["driver"] != "vfio-user-pci"
            })
            .collect();
        assert_eq!(dev[0]["driver"], "virtio-blk-pci");
        assert_eq!(dev[1]["driver"], "nvme");
        assert_eq!(dev[1]["drive"], "disk1");
    }

    #[test]
    fn a_virtio_scsi_disk_gets_its_own_controller() {
        let mut s = spec();
        s.disks = vec![DiskSpec {
            path: "/d/same.raw".into(),
            format: DiskFormat::Raw,
            interface: DiskInterface::VirtioScsi,
            readonly: false,
            direct: false,
            volume_socket: None,
        }];
        let a = args(&s);
        let dev: Vec<serde_json::Value> = value_after(&a, "-device")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .filter(|d: &serde_json::Value| {
                d["driver"] != "pcie-root-port" && d["driver"] != "vfio-user-pci"
            })
            .collect();
        assert_eq!(dev[0]["driver"], "virtio-scsi-pci");
        assert_eq!(dev[0]["id"], "scsi0");
        assert_eq!(dev[1]["driver"], "scsi-hd");
        assert_eq!(
            (&dev[1]["bus"], &dev[1]["drive"]),
            (&json!("scsi0.0"), &json!("disk0"))
        );
    }

    #[test]
    fn vhost_blk_disks_become_a_chardev_and_no_blockdev() {
        let mut s = spec();
        s.disks = vec![
            DiskSpec {
                path: "/d/served.qcow2".into(),
                format: DiskFormat::Qcow2,
                interface: DiskInterface::VhostBlk,
                readonly: false,
                direct: true,
                volume_socket: None,
            },
            DiskSpec {
                path: "/d/plain.img".into(),
                format: DiskFormat::Raw,
                interface: DiskInterface::VirtioBlk,
                readonly: false,
                direct: true,
                volume_socket: None,
            },
        ];
        s.chardevs = vec![SocketChardev {
            id: "vhost-disk0".into(),
            path: "/run/a,b/disk0.sock".into(),
        }];
        s.devices
            .push(json!({"driver": "vhost-user-blk-pci", "chardev": "vhost-disk0", "id": "disk0"}));
        let a = args(&s);
        assert!(value_after(&a, "-chardev")
            .contains(&"socket,id=vhost-disk0,path=/run/a,,b/disk0.sock"));
        let bd: Vec<serde_json::Value> = value_after(&a, "-blockdev")
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        // Only the QEMU-served disk, still named after its index.
        assert_eq!(bd.len(), 2);
        assert_eq!(bd[0]["filename"], "/d/plain.img");
        assert_eq!(bd[1]["node-name"], "disk1");
        let drivers: Vec<String> = value_after(&a, "-device")
            .iter()
            .map(|j| serde_json::from_str::<serde_json::Value>(j).unwrap()["driver"].to_string())
            .collect();
        assert_eq!(
            drivers
                .iter()
                .filter(|d| d.contains("vhost-user-blk-pci"))
                .count(),
            1
        );
        assert_eq!(
            drivers
                .iter()
                .filter(|d| d.contains("\"virtio-blk-pci"))
                .count(),
            1
        );
    }
}
