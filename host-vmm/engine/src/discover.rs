//! Finding a QEMU that can run Tandem's machines.
//!
//! Tandem needs the vfio-user client (QEMU 10.1 and later) for its device
//! servers. An explicit path always wins and is never silently replaced;
//! then the engine `tandem image build` put in the cache (it carries
//! Tandem's fix for hot-unplugging vfio-user devices with MSI-X, which
//! QEMU 10.2.2 lacks); then a system QEMU that is new enough.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The oldest QEMU with the vfio-user PCI client.
pub const MIN_ENGINE_VERSION: EngineVersion = EngineVersion {
    major: 10,
    minor: 1,
    micro: 0,
};

/// Devices an engine must offer (`-device help`).
pub const REQUIRED_DEVICES: &[&str] = &["vfio-user-pci", "vhost-user-blk-pci", "nvme"];

/// Where a system QEMU's firmware may live on Debian. A QEMU built by
/// `tandem image build` ships no firmware (Debian strips the blobs from its
/// source), so it is pointed at the system's SeaBIOS and option ROMs.
pub const SYSTEM_FIRMWARE_DIRS: &[&str] = &["/usr/share/seabios", "/usr/share/qemu"];

/// Files a q35 guest booted with `-kernel` needs from the firmware dirs.
pub const REQUIRED_FIRMWARE: &[&str] = &["bios-256k.bin", "linuxboot_dma.bin"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EngineVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for EngineVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// A usable QEMU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engine {
    pub path: PathBuf,
    pub version: EngineVersion,
    /// The package string QEMU reports, e.g. "Debian 1:10.2.2+ds-1".
    pub package: String,
    /// Extra firmware directories to pass with `-L`, in order.
    pub firmware_dirs: Vec<PathBuf>,
    /// Where it came from: "explicit", "system" or "cache".
    pub origin: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no usable QEMU found; tried:\n{tried}\nrun `tandem image build` to build the pinned engine")]
    NotFound { tried: String },
    #[error("{path}: cannot run it")]
    CannotRun {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse the version from {output:?}")]
    BadVersion { path: PathBuf, output: String },
    #[error("{path}: QEMU {found} is too old (Tandem needs {MIN_ENGINE_VERSION} or later for the vfio-user client)")]
    TooOld { path: PathBuf, found: EngineVersion },
    #[error("{path}: QEMU lacks the device {device}")]
    MissingDevice { path: PathBuf, device: String },
    #[error("firmware {file} not found in {dirs} (install Debian's seabios and qemu-system-data)")]
    MissingFirmware { file: String, dirs: String },
}

/// Parses the first line of `qemu-system-x86_64 --version`.
pub fn parse_version(output: &str) -> Option<(EngineVersion, String)> {
    let line = output.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    let (num, package) = match rest.split_once(' ') {
        Some((n, p)) => (n, p.trim().trim_start_matches('(').trim_end_matches(')')),
        None => (rest, ""),
    };
    let mut parts = num.split('.').map(|p| {
        // "10.2.2" or "10.2.50" or "9.0.0-rc1"
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let micro = parts.next().flatten().unwrap_or(0);
    Some((
        EngineVersion {
            major,
            minor,
            micro,
        },
        package.to_owned(),
    ))
}

/// Runs `path args` and collects its output. An executable that was just
/// written (a fresh build, or a test's fake engine) can still be open for
/// writing in a child forked by another thread at that moment, and `execve`
/// then fails with ETXTBSY until that child execs; that is transient, so it
/// is retried for up to two seconds before it counts as an error.
fn run_retrying_busy(path: &Path, args: &[&str]) -> std::io::Result<std::process::Output> {
    const ETXTBSY: i32 = 26;
    let mut delay = std::time::Duration::from_millis(5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match Command::new(path).args(args).output() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && std::time::Instant::now() < deadline => {
                tracing::debug!(path = %path.display(), "executable busy, retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

impl Engine {
    /// Runs `path` to learn its version and devices, and checks them.
    pub fn inspect(path: &Path, origin: &str) -> Result<Engine, EngineError> {
        let run = |args: &[&str]| -> Result<String, EngineError> {
            let out = run_retrying_busy(path, args).map_err(|source| EngineError::CannotRun {
                path: path.to_owned(),
                source,
            })?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let text = run(&["--version"])?;
        let (version, package) = parse_version(&text).ok_or_else(|| EngineError::BadVersion {
            path: path.to_owned(),
            output: text.clone(),
        })?;
        if version < MIN_ENGINE_VERSION {
            return Err(EngineError::TooOld {
                path: path.to_owned(),
                found: version,
            });
        }
        let devices = run(&["-machine", "none", "-device", "help"])?;
        check_devices(path, &devices)?;
        let firmware_dirs = if origin == "system" {
            Vec::new()
        } else {
            let dirs: Vec<PathBuf> = path
                .parent()
                .and_then(Path::parent)
                .map(|prefix| prefix.join("share/qemu"))
                .into_iter()
                .chain(SYSTEM_FIRMWARE_DIRS.iter().map(PathBuf::from))
                .filter(|d| d.is_dir())
                .collect();
            check_firmware(&dirs)?;
            dirs
        };
        Ok(Engine {
            path: path.to_owned(),
            version,
            package,
            firmware_dirs,
            origin: origin.to_owned(),
        })
    }

    /// Tries the candidates in order and returns the first usable one.
    /// An explicit candidate that fails is an error of its own: the user
    /// named it, so it is not replaced behind their back.
    pub fn find(
        explicit: Option<&Path>,
        cached: Option<&Path>,
        path_env: Option<&std::ffi::OsStr>,
    ) -> Result<Engine, EngineError> {
        if let Some(p) = explicit {
            return Engine::inspect(p, "explicit");
        }
        let mut tried = Vec::new();
        match cached {
            Some(p) if p.is_file() => match Engine::inspect(p, "cache") {
                Ok(e) => return Ok(e),
                Err(e) => tried.push(format!("  cache: {}", with_causes(&e))),
            },
            Some(p) => tried.push(format!("  cache: {} is not built", p.display())),
            None => tried.push("  cache: no engine has been built".into()),
        }
        let system = path_env
            .into_iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file());
        match system {
            Some(p) => match Engine::inspect(&p, "system") {
                Ok(e) => return Ok(e),
                Err(e) => tried.push(format!("  system: {}", with_causes(&e))),
            },
            None => tried.push("  system: no qemu-system-x86_64 in PATH".into()),
        }
        Err(EngineError::NotFound {
            tried: tried.join("\n"),
        })
    }
}

/// `e` and its causes on one line, for the list of engines tried.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn check_devices(path: &Path, help: &str) -> Result<(), EngineError> {
    for device in REQUIRED_DEVICES {
        let quoted = format!("name \"{device}\"");
        if !help.contains(&quoted) {
            return Err(EngineError::MissingDevice {
                path: path.to_owned(),
                device: (*device).to_owned(),
            });
        }
    }
    Ok(())
}

fn check_firmware(dirs: &[PathBuf]) -> Result<(), EngineError> {
    for file in REQUIRED_FIRMWARE {
        if !dirs.iter().any(|d| d.join(file).is_file()) {
            return Err(EngineError::MissingFirmware {
                file: (*file).to_owned(),
                dirs: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_versions() {
        let (v, p) =
            parse_version("QEMU emulator version 10.2.2 (Debian 1:10.2.2+ds-1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n").unwrap();
        assert_eq!(
            v,
            EngineVersion {
                major: 10,
                minor: 2,
                micro: 2
            }
        );
        assert_eq!(p, "Debian 1:10.2.2+ds-1");
        let (v, p) = parse_version("QEMU emulator version 9.0.90\n").unwrap();
        assert_eq!(v.to_string(), "9.0.90");
        assert_eq!(p, "");
        let (v, _) = parse_version("QEMU emulator version 11.0.0-rc1 (v11.0.0-rc1)").unwrap();
        assert_eq!(v.to_string(), "11.0.0");
        assert!(parse_version("bash: qemu: command not found").is_none());
        assert!(parse_version("").is_none());
    }

    /// A fake QEMU: a shell script printing what we tell it to.
    fn fake_qemu(dir: &Path, version: &str, devices: &[&str]) -> PathBuf {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let path = bin.join("qemu-system-x86_64");
        let devs: String = devices
            .iter()
            .map(|d| format!("echo 'name \"{d}\", bus PCI'\n"))
            .collect();
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version {version} (test)'; exit 0; fi\n{devs}"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let fw = dir.join("share/qemu");
        std::fs::create_dir_all(&fw).unwrap();
        for f in REQUIRED_FIRMWARE {
            std::fs::write(fw.join(f), b"rom").unwrap();
        }
        path
    }

    #[test]
    fn inspects_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let good = fake_qemu(dir.path(), "10.2.2", REQUIRED_DEVICES);
        let e = Engine::inspect(&good, "cache").unwrap();
        assert_eq!(e.version.to_string(), "10.2.2");
        assert_eq!(e.package, "test");
        assert_eq!(e.firmware_dirs[0], dir.path().join("share/qemu"));

        let old_dir = tempfile::tempdir().unwrap();
        let old = fake_qemu(old_dir.path(), "7.2.0", REQUIRED_DEVICES);
        let err = Engine::inspect(&old, "system").unwrap_err();
        assert!(matches!(err, EngineError::TooOld { .. }));
        assert!(err.to_string().contains("7.2.0 is too old"), "{err}");

        let nodev_dir = tempfile::tempdir().unwrap();
        let nodev = fake_qemu(nodev_dir.path(), "10.2.2", &["nvme"]);
        let err = Engine::inspect(&nodev, "system").unwrap_err();
        assert!(err.to_string().contains("vfio-user-pci"), "{err}");

        let err = Engine::inspect(Path::new("/nonexistent/qemu"), "explicit").unwrap_err();
        assert!(matches!(err, EngineError::CannotRun { .. }));
    }

    #[test]
    fn find_prefers_cache_then_system_and_reports_every_attempt() {
        let sys_dir = tempfile::tempdir().unwrap();
        let old = fake_qemu(sys_dir.path(), "7.2.0", REQUIRED_DEVICES);
        let cache_dir = tempfile::tempdir().unwrap();
        let cached = fake_qemu(cache_dir.path(), "10.2.2", REQUIRED_DEVICES);
        let path_env = std::ffi::OsString::from(old.parent().unwrap());

        let e = Engine::find(None, Some(&cached), Some(&path_env)).unwrap();
        assert_eq!(e.origin, "cache");

        let new_sys = tempfile::tempdir().unwrap();
        let newer = fake_qemu(new_sys.path(), "11.1.3", REQUIRED_DEVICES);
        let path_env2 = std::ffi::OsString::from(newer.parent().unwrap());
        let e = Engine::find(None, Some(&cached), Some(&path_env2)).unwrap();
        assert_eq!(
            e.origin, "cache",
            "the patched engine wins over a system one"
        );
        let e = Engine::find(None, None, Some(&path_env2)).unwrap();
        assert_eq!(e.origin, "system");
        assert!(e.firmware_dirs.is_empty());

        let err = Engine::find(None, None, Some(&path_env)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("7.2.0 is too old"), "{msg}");
        assert!(msg.contains("tandem image build"), "{msg}");

        // An explicit engine that is too old is an error even if others work.
        assert!(Engine::find(Some(&old), Some(&cached), Some(&path_env2)).is_err());
    }
}
