//! VM configuration: a TOML file and command-line flags, merged and checked.
//!
//! Everything a user can get wrong is caught here, before QEMU starts, with
//! a message that names the offending value: a missing kernel, a disk that
//! cannot be opened, a memory size that does not parse.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared_abi::{AbiVersion, VersionRange};
use tandem_engine::{AccelRequest, DiskFormat, DiskInterface, DiskSpec, Serial};

/// A VM as the user describes it; every field optional so that a file and
/// flags can be layered. The file format is this struct in TOML.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel command line; replaces the image's default.
    pub append: Option<String>,
    /// Appended to the kernel command line (default or `append`).
    pub append_extra: Option<String>,
    /// Guest RAM: bytes, or with a K, M, G or T suffix.
    pub memory: Option<String>,
    pub cpus: Option<u32>,
    pub accel: Option<AccelRequest>,
    /// "stdio", "file:<path>", "unix:<path>" or "none".
    pub serial: Option<String>,
    pub api_socket: Option<PathBuf>,
    /// The QEMU binary; found automatically when absent.
    pub engine: Option<PathBuf>,
    /// Attach the Tandem control device (default true).
    pub control_device: Option<bool>,
    /// ABI versions the host side speaks, "MIN-MAX" (e.g. "1.0-1.0");
    /// default: all this build supports. For compatibility tests.
    pub host_abi: Option<String>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Disks on a file server, shared with other VMs (F7).
    #[serde(default, rename = "shared-disk")]
    pub shared_disks: Vec<SharedDisk>,
}

/// A shared disk: the guest sees a virtio-scsi disk whose commands a
/// vhost-user-scsi backend tunnels to `tandem share serve` at `server`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDisk {
    /// The file server, HOST:PORT.
    pub server: String,
    /// The disk's name (relative path) on the server.
    pub disk: String,
    /// This VM's SCSI initiator name; default `tandem.<vm>@<host name>`.
    pub initiator: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub format: Option<DiskFormat>,
    pub interface: Option<DiskInterface>,
    #[serde(default)]
    pub readonly: bool,
    /// Bypass the host page cache; default true.
    pub direct: Option<bool>,
    /// `if=vhost-blk`: where its backend lends the disk to a second path
    /// (an NVMe VF's namespace); default `vhost-disk<i>.volume` next to
    /// the API socket's other device sockets. A fixed path lets a device
    /// server outlive the VMs it serves (it reconnects).
    pub volume: Option<PathBuf>,
}

/// What the default guest image provides when the user names no kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDefaults {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// A checked configuration, ready to become a QEMU machine.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedVm {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelRequest,
    pub serial: Serial,
    pub api_socket: PathBuf,
    pub engine: Option<PathBuf>,
    pub disks: Vec<DiskSpec>,
    /// Shared disks, their initiator names filled in.
    pub shared_disks: Vec<SharedDisk>,
    /// `None`: no control device.
    pub control: Option<VersionRange>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("no kernel: pass --kernel, set `kernel` in the config file, or build the default image with `tandem image build`")]
    NoKernel,
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("disk {path}: {reason}")]
    Disk { path: PathBuf, reason: String },
    #[error("bad --shared-disk value {value:?}: {reason}")]
    SharedDiskSyntax { value: String, reason: String },
    #[error("bad --disk value {value:?}: {reason}")]
    DiskSyntax { value: String, reason: String },
    #[error("bad memory size {0:?} (examples: 512M, 2G; at least 64M)")]
    Memory(String),
    #[error("bad vCPU count {0} (1 to 255)")]
    Cpus(u32),
    #[error("bad VM name {0:?} (1 to 64 of A-Z a-z 0-9 . _ -)")]
    Name(String),
    #[error("bad serial {0:?} (stdio, file:<path>, unix:<path> or none)")]
    Serial(String),
    #[error("bad ABI range {0:?} (MIN-MAX, e.g. 1.0-1.2)")]
    AbiRange(String),
}

impl VmConfig {
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Layers `over` (command-line flags) on top of `self` (a file): set
    /// fields win, disks add up.
    pub fn merge(self, over: VmConfig) -> VmConfig {
        let mut disks = self.disks;
        disks.extend(over.disks);
        let mut shared_disks = self.shared_disks;
        shared_disks.extend(over.shared_disks);
        VmConfig {
            name: over.name.or(self.name),
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            append: over.append.or(self.append),
            append_extra: match (self.append_extra, over.append_extra) {
                (Some(a), Some(b)) => Some(format!("{a} {b}")),
                (a, b) => b.or(a),
            },
            memory: over.memory.or(self.memory),
            cpus: over.cpus.or(self.cpus),
            accel: over.accel.or(self.accel),
            serial: over.serial.or(self.serial),
            api_socket: over.api_socket.or(self.api_socket),
            engine: over.engine.or(self.engine),
            control_device: over.control_device.or(self.control_device),
            host_abi: over.host_abi.or(self.host_abi),
            disks,
            shared_disks,
        }
    }

    /// Checks everything and fills defaults. `defaults` is the default
    /// image, used only when no kernel is named; `run_dir` is where API
    /// sockets go by default.
    pub fn resolve(
        self,
        defaults: Option<&ImageDefaults>,
        run_dir: &Path,
    ) -> Result<ResolvedVm, ConfigError> {
        let name = self.name.unwrap_or_else(|| "vm0".into());
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            || name.starts_with('.')
        {
            return Err(ConfigError::Name(name));
        }
        let (kernel, initrd, default_append) = match (self.kernel, defaults) {
            (Some(k), _) => (k, self.initrd, "console=ttyS0".to_string()),
            (None, Some(d)) => (
                d.kernel.clone(),
                self.initrd.or_else(|| Some(d.initrd.clone())),
                d.append.clone(),
            ),
            (None, None) => return Err(ConfigError::NoKernel),
        };
        check_readable_file(&kernel).map_err(|reason| ConfigError::Kernel {
            path: kernel.clone(),
            reason,
        })?;
        if let Some(i) = &initrd {
            check_readable_file(i).map_err(|reason| ConfigError::Initrd {
                path: i.clone(),
                reason,
            })?;
        }
        let mut append = self.append.unwrap_or(default_append);
        if let Some(extra) = self.append_extra {
            if !append.is_empty() {
                append.push(' ');
            }
            append.push_str(&extra);
        }
        let memory = self.memory.unwrap_or_else(|| "512M".into());
        let memory_mib = parse_size_mib(&memory).ok_or(ConfigError::Memory(memory))?;
        let cpus = self.cpus.unwrap_or(1);
        if !(1..=255).contains(&cpus) {
            return Err(ConfigError::Cpus(cpus));
        }
        let serial = parse_serial(self.serial.as_deref().unwrap_or("stdio"))?;
        let api_socket = self
            .api_socket
            .unwrap_or_else(|| run_dir.join(format!("{name}.sock")));
        let disks = self
            .disks
            .into_iter()
            .map(check_disk)
            .collect::<Result<Vec<_>, _>>()?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let shared_disks = self
            .shared_disks
            .into_iter()
            .map(|d| {
                let bad = |reason: &str| ConfigError::SharedDiskSyntax {
                    value: format!("server={},disk={}", d.server, d.disk),
                    reason: reason.into(),
                };
                if d.server.is_empty() || !d.server.contains(':') {
                    return Err(bad("server= must be HOST:PORT"));
                }
                if d.disk.is_empty()
                    || d.disk.starts_with('/')
                    || d.disk.split('/').any(|c| c == "..")
                {
                    return Err(bad("disk= must be a relative path on the server"));
                }
                let initiator = d
                    .initiator
                    .clone()
                    .unwrap_or_else(|| format!("tandem.{name}@{host}"));
                if initiator.is_empty() || !initiator.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad("initiator= must be printable ASCII without spaces"));
                }
                Ok(SharedDisk {
                    initiator: Some(initiator),
                    ..d
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let control = if self.control_device.unwrap_or(true) {
            Some(match self.host_abi {
                Some(r) => parse_abi_range(&r).ok_or(ConfigError::AbiRange(r))?,
                None => shared_abi::SUPPORTED,
            })
        } else {
            None
        };
        Ok(ResolvedVm {
            name,
            kernel,
            initrd,
            append,
            memory_mib,
            cpus,
            accel: self.accel.unwrap_or_default(),
            serial,
            api_socket,
            engine: self.engine,
            disks,
            shared_disks,
            control,
        })
    }
}

impl ResolvedVm {
    /// What defines the machine (and must be identical where it is
    /// restored): kernel, command line, memory, vCPUs, disks, the control
    /// device. Not its name, console, API socket, engine or accelerator,
    /// which the restoring side chooses.
    pub fn machine_config(&self) -> VmConfig {
        VmConfig {
            name: Some(self.name.clone()),
            kernel: Some(self.kernel.clone()),
            initrd: self.initrd.clone(),
            append: Some(self.append.clone()),
            memory: Some(format!("{}M", self.memory_mib)),
            cpus: Some(self.cpus),
            control_device: Some(self.control.is_some()),
            host_abi: self.control.map(|r| format!("{}-{}", r.min, r.max)),
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    format: Some(d.format.clone()),
                    interface: Some(d.interface),
                    readonly: d.readonly,
                    direct: Some(d.direct),
                    volume: d.volume_socket.clone(),
                })
                .collect(),
            shared_disks: self.shared_disks.clone(),
            ..VmConfig::default()
        }
    }
}

/// Parses a `--shared-disk` flag: `server=HOST:PORT,disk=NAME[,initiator=NAME]`.
pub fn parse_shared_disk_flag(value: &str) -> Result<SharedDisk, ConfigError> {
    let err = |reason: &str| ConfigError::SharedDiskSyntax {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let mut d = SharedDisk::default();
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("server", v)) => d.server = v.into(),
            Some(("disk", v)) => d.disk = v.into(),
            Some(("initiator", v)) => d.initiator = Some(v.into()),
            _ => {
                return Err(err(&format!(
                    "{part:?}: expected server=, disk= or initiator="
                )))
            }
        }
    }
    if d.server.is_empty() || d.disk.is_empty() {
        return Err(err("server= and disk= are required"));
    }
    Ok(d)
}

/// Parses "1.0-1.3" (or a single "1.0").
pub fn parse_abi_range(s: &str) -> Option<VersionRange> {
    let one = |v: &str| -> Option<AbiVersion> {
        let (a, b) = v.trim().split_once('.')?;
        Some(AbiVersion {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => (one(s)?, one(s)?),
    };
    let r = VersionRange { min: lo, max: hi };
    r.is_valid().then_some(r)
}

fn check_readable_file(p: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    std::fs::File::open(p).map_err(|e| e.to_string())?;
    Ok(())
}

/// Parses "512M", "2G", "1048576" (bytes) into MiB; at least 64 MiB, at most 1 TiB.
pub fn parse_size_mib(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult): (&str, u64) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let bytes = num.parse::<u64>().ok()?.checked_mul(mult)?;
    if bytes % (1 << 20) != 0 {
        return None;
    }
    let mib = bytes >> 20;
    (64..=(1 << 20)).contains(&mib).then_some(mib)
}

pub fn parse_serial(s: &str) -> Result<Serial, ConfigError> {
    let bad = || ConfigError::Serial(s.to_owned());
    Ok(match s {
        "stdio" => Serial::Stdio,
        "none" => Serial::None,
        _ => match s.split_once(':') {
            Some(("file", p)) if !p.is_empty() => Serial::File(p.into()),
            Some(("unix", p)) if !p.is_empty() => Serial::Unix(p.into()),
            _ => return Err(bad()),
        },
    })
}

pub fn serial_to_string(s: &Serial) -> String {
    match s {
        Serial::Stdio => "stdio".into(),
        Serial::None => "none".into(),
        Serial::File(p) => format!("file:{}", p.display()),
        Serial::Unix(p) => format!("unix:{}", p.display()),
    }
}

/// Parses a `--disk` flag: `path=<file>[,format=raw|qcow2][,if=virtio-blk|nvme|vhost-blk][,readonly=on][,direct=off][,volume=<socket>]`,
/// or just a path. `if=vhost-blk` serves the disk (raw, qcow2 or VHDX, with
/// its backing chain) from Tandem's vhost-user-blk backend instead of QEMU;
/// that backend lends it to a second path on its volume socket.
pub fn parse_disk_flag(value: &str) -> Result<DiskConfig, ConfigError> {
    let err = |reason: &str| ConfigError::DiskSyntax {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    if !value.contains('=') {
        return Ok(DiskConfig {
            path: value.into(),
            ..Default::default()
        });
    }
    let mut disk = DiskConfig::default();
    let mut have_path = false;
    for part in value.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| err(&format!("{part:?} is not key=value")))?;
        let onoff = |v: &str| match v {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => Err(err(&format!("{k}={v}: expected on or off"))),
        };
        match k {
            "path" => {
                disk.path = v.into();
                have_path = !v.is_empty();
            }
            "format" => {
                disk.format = Some(match v {
                    "raw" => DiskFormat::Raw,
                    "qcow2" => DiskFormat::Qcow2,
                    _ => return Err(err(&format!("unknown format {v:?} (raw, qcow2)"))),
                })
            }
            "if" | "interface" => {
                disk.interface = Some(match v {
                    "virtio-blk" => DiskInterface::VirtioBlk,
                    "nvme" => DiskInterface::Nvme,
                    "vhost-blk" => DiskInterface::VhostBlk,
                    "virtio-scsi" => DiskInterface::VirtioScsi,
                    _ => {
                        return Err(err(&format!(
                            "unknown interface {v:?} (virtio-blk, nvme, vhost-blk, virtio-scsi)"
                        )))
                    }
                })
            }
            "readonly" => disk.readonly = onoff(v)?,
            "direct" => disk.direct = Some(onoff(v)?),
            "volume" => disk.volume = Some(v.into()),
            _ => return Err(err(&format!("unknown key {k:?}"))),
        }
    }
    if !have_path {
        return Err(err("path= is required"));
    }
    Ok(disk)
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

fn check_disk(d: DiskConfig) -> Result<DiskSpec, ConfigError> {
    let err = |reason: String| ConfigError::Disk {
        path: d.path.clone(),
        reason,
    };
    let interface = d.interface.unwrap_or(DiskInterface::VirtioBlk);
    if d.volume.is_some() && interface != DiskInterface::VhostBlk {
        return Err(err(
            "volume= needs if=vhost-blk (only Tandem's backend lends a disk)".into(),
        ));
    }
    let meta = std::fs::metadata(&d.path).map_err(|e| err(e.to_string()))?;
    if !(meta.is_file() || is_block_device(&meta)) {
        return Err(err("not a regular file or block device".into()));
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(!d.readonly)
        .open(&d.path)
        .map_err(|e| {
            err(format!(
                "cannot open for {}: {e}",
                if d.readonly { "reading" } else { "writing" }
            ))
        })?;
    let mut magic = [0u8; 4];
    let sniffed = match f.read_exact(&mut magic) {
        Ok(()) if &magic == QCOW2_MAGIC => DiskFormat::Qcow2,
        _ => DiskFormat::Raw,
    };
    let format = match d.format.clone() {
        Some(DiskFormat::Raw) if sniffed == DiskFormat::Qcow2 => {
            return Err(err(
                "looks like qcow2 but format=raw was given; refusing to let the guest overwrite the qcow2 header".into(),
            ))
        }
        Some(f) => f,
        None => sniffed,
    };
    Ok(DiskSpec {
        path: std::fs::canonicalize(&d.path).map_err(|e| err(e.to_string()))?,
        format,
        interface,
        readonly: d.readonly,
        direct: d.direct.unwrap_or(true),
        volume_socket: d.volume.clone(),
    })
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

/// Where API sockets go when the user names none.
pub fn default_run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_RUN_DIR") {
        return d.into();
    }
    if nix::unistd::geteuid().is_root() {
        return "/run/tandem".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("tandem"),
        None => std::env::temp_dir().join(format!("tandem-{}", nix::unistd::geteuid())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(dir: &Path) -> ImageDefaults {
        let kernel = dir.join("bzImage");
        let initrd = dir.join("initramfs");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        ImageDefaults {
            kernel,
            initrd,
            append: "console=ttyS0 quiet".into(),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512M"), Some(512));
        assert_eq!(parse_size_mib("2G"), Some(2048));
        assert_eq!(parse_size_mib("65536k"), Some(64));
        assert_eq!(parse_size_mib("134217728"), Some(128));
        for bad in [
            "",
            "M",
            "12",
            "1.5G",
            "-1G",
            "63M",
            "2T",
            "99999999999999999999G",
            "1000001K",
        ] {
            assert_eq!(parse_size_mib(bad), None, "{bad}");
        }
    }

    #[test]
    fn file_and_flags_merge() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.toml");
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        std::fs::write(
            &file,
            format!(
                "name = \"web\"\nmemory = \"1G\"\ncpus = 2\nappend_extra = \"a=1\"\n[[disk]]\npath = \"{}\"\ninterface = \"nvme\"\n",
                disk.display()
            ),
        )
        .unwrap();
        let from_file = VmConfig::from_file(&file).unwrap();
        let flags = VmConfig {
            cpus: Some(4),
            append_extra: Some("b=2".into()),
            serial: Some("file:/tmp/x.log".into()),
            ..Default::default()
        };
        let d = defaults(dir.path());
        let vm = from_file
            .merge(flags)
            .resolve(Some(&d), Path::new("/run/t"))
            .unwrap();
        assert_eq!(vm.name, "web");
        assert_eq!(vm.cpus, 4);
        assert_eq!(vm.memory_mib, 1024);
        assert_eq!(vm.append, "console=ttyS0 quiet a=1 b=2");
        assert_eq!(vm.kernel, d.kernel);
        assert_eq!(vm.initrd.as_deref(), Some(d.initrd.as_path()));
        assert_eq!(vm.api_socket, Path::new("/run/t/web.sock"));
        assert_eq!(vm.serial, Serial::File("/tmp/x.log".into()));
        assert_eq!(vm.disks.len(), 1);
        assert_eq!(vm.disks[0].interface, DiskInterface::Nvme);
        assert_eq!(vm.disks[0].format, DiskFormat::Raw);
        assert!(vm.disks[0].direct);
    }

    #[test]
    fn unknown_keys_in_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.toml");
        std::fs::write(&file, "memroy = \"1G\"\n").unwrap();
        let err = VmConfig::from_file(&file).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
        let err = VmConfig::from_file(&dir.path().join("nope.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }));
    }

    #[test]
    fn clear_errors_for_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let run = Path::new("/run/t");
        let err = VmConfig::default().resolve(None, run).unwrap_err();
        assert!(err.to_string().contains("tandem image build"), "{err}");

        let err = VmConfig {
            kernel: Some("/no/such/bzImage".into()),
            ..Default::default()
        }
        .resolve(None, run)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel /no/such/bzImage: No such file or directory (os error 2)"
        );

        let d = defaults(dir.path());
        let err = VmConfig {
            disks: vec![DiskConfig {
                path: "/no/disk.img".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .resolve(Some(&d), run)
        .unwrap_err();
        assert!(err.to_string().starts_with("disk /no/disk.img: "), "{err}");

        let err = VmConfig {
            disks: vec![DiskConfig {
                path: dir.path().to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .resolve(Some(&d), run)
        .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        for (cfg, needle) in [
            (
                VmConfig {
                    memory: Some("lots".into()),
                    ..Default::default()
                },
                "bad memory size",
            ),
            (
                VmConfig {
                    cpus: Some(0),
                    ..Default::default()
                },
                "bad vCPU count",
            ),
            (
                VmConfig {
                    name: Some("../etc".into()),
                    ..Default::default()
                },
                "bad VM name",
            ),
            (
                VmConfig {
                    serial: Some("tcp:1".into()),
                    ..Default::default()
                },
                "bad serial",
            ),
        ] {
            let err = cfg.resolve(Some(&d), run).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn qcow2_is_sniffed_and_raw_over_qcow2_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = defaults(dir.path());
        let q = dir.path().join("q.img");
        let mut bytes = QCOW2_MAGIC.to_vec();
        bytes.resize(4096, 0);
        std::fs::write(&q, bytes).unwrap();
        let vm = VmConfig {
            disks: vec![parse_disk_flag(&q.display().to_string()).unwrap()],
            ..Default::default()
        }
        .resolve(Some(&d), Path::new("/r"))
        .unwrap();
        assert_eq!(vm.disks[0].format, DiskFormat::Qcow2);
        let err = VmConfig {
            disks: vec![parse_disk_flag(&format!("path={},format=raw", q.display())).unwrap()],
            ..Default::default()
        }
        .resolve(Some(&d), Path::new("/r"))
        .unwrap_err();
        assert!(err.to_string().contains("looks like qcow2"), "{err}");
    }

    #[test]
    fn disk_flags() {
        let d = parse_disk_flag("path=/a.img,format=qcow2,if=nvme,readonly=on,direct=off").unwrap();
        assert_eq!(d.path, Path::new("/a.img"));
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        assert_eq!(d.interface, Some(DiskInterface::Nvme));
        assert!(d.readonly);
        assert_eq!(d.direct, Some(false));
        assert_eq!(
            parse_disk_flag("/plain.img").unwrap().path,
            Path::new("/plain.img")
        );
        assert_eq!(
            parse_disk_flag("path=/c.vhdx,if=vhost-blk,volume=/run/v.sock")
                .unwrap()
                .volume,
            Some(PathBuf::from("/run/v.sock"))
        );
        // Checked where flags and config files meet: a volume on a disk no
        // Tandem backend serves is refused.
        let e = check_disk(parse_disk_flag("path=/c.raw,volume=/run/v.sock").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("volume= needs if=vhost-blk"), "{e}");
        assert_eq!(
            parse_disk_flag("path=/c.vhdx,if=vhost-blk")
                .unwrap()
                .interface,
            Some(DiskInterface::VhostBlk)
        );
        let from_toml: DiskConfig =
            toml::from_str("path = \"/c.vhdx\"\ninterface = \"vhost-blk\"\n").unwrap();
        assert_eq!(from_toml.interface, Some(DiskInterface::VhostBlk));
        for bad in [
            "format=raw",
            "path=/a,format=vhd",
            "path=/a,if=ide",
            "path=/a,readonly=maybe",
            "path=/a,colour=red",
            "path=/a,junk",
        ] {
            assert!(parse_disk_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn abi_ranges() {
        let r = parse_abi_range("1.0-1.3").unwrap();
        assert_eq!((r.min.minor, r.max.minor), (0, 3));
        assert_eq!(
            parse_abi_range("2.1").unwrap().min,
            AbiVersion { major: 2, minor: 1 }
        );
        for bad in ["", "1", "1.3-1.0", "x.y", "1.0-"] {
            assert!(parse_abi_range(bad).is_none(), "{bad}");
        }
        let err = VmConfig {
            host_abi: Some("nope".into()),
            ..Default::default()
        }
        .resolve(
            Some(&defaults(tempfile::tempdir().unwrap().path())),
            Path::new("/r"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bad ABI range"), "{err}");
    }

    #[test]
    fn serial_forms() {
        assert_eq!(parse_serial("stdio").unwrap(), Serial::Stdio);
        assert_eq!(parse_serial("unix:/s").unwrap(), Serial::Unix("/s".into()));
        assert!(parse_serial("file:").is_err());
        assert_eq!(serial_to_string(&Serial::File("/x".into())), "file:/x");
    }

    #[test]
    fn shared_disks() {
        let d = parse_shared_disk_flag("server=10.0.0.1:3270,disk=c/q.raw").unwrap();
        assert_eq!(
            (d.server.as_str(), d.disk.as_str(), d.initiator.clone()),
            ("10.0.0.1:3270", "c/q.raw", None)
        );
        assert!(parse_shared_disk_flag("server=a:1").is_err());
        assert!(parse_shared_disk_flag("server=a:1,disk=x,bogus=1").is_err());
        let dir = tempfile::tempdir().unwrap();
        let vm = VmConfig {
            name: Some("web".into()),
            shared_disks: vec![d.clone()],
            ..Default::default()
        }
        .resolve(Some(&defaults(dir.path())), Path::new("/r"))
        .unwrap();
        let init = vm.shared_disks[0].initiator.clone().unwrap();
        assert!(init.starts_with("tandem.web@"), "{init}");
        assert_eq!(vm.machine_config().shared_disks, vm.shared_disks);
        let bad = VmConfig {
            shared_disks: vec![SharedDisk {
                disk: "../etc".into(),
                ..d
            }],
            ..Default::default()
        }
        .resolve(Some(&defaults(dir.path())), Path::new("/r"));
        assert!(bad.is_err());
        let t: VmConfig =
            toml::from_str("[[shared-disk]]\nserver = \"h:1\"\ndisk = \"d\"\n").unwrap();
        assert_eq!(t.shared_disks.len(), 1);
    }
}
