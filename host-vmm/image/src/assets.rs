//! Files from the repository that the build needs, embedded in the binary
//! so that `tandem image build` works from anywhere and its cache keys are
//! known without the source tree.

/// A file and its repository-relative path.
#[derive(Clone, Copy, Debug)]
pub struct Asset {
    pub path: &'static str,
    pub text: &'static str,
}

macro_rules! asset {
    ($p:literal) => {
        Asset {
            path: $p,
            text: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $p)),
        }
    };
}

/// The build recipes; `lib.sh` is sourced by the others.
pub const SCRIPTS: &[Asset] = &[
    asset!("host-vmm/image/scripts/lib.sh"),
    asset!("host-vmm/image/scripts/bindgen.sh"),
    asset!("host-vmm/image/scripts/engine.sh"),
    asset!("host-vmm/image/scripts/kernel.sh"),
    asset!("host-vmm/image/scripts/module.sh"),
    asset!("host-vmm/image/scripts/initramfs.sh"),
];

/// Tandem's patches to the engine, applied after Debian's.
pub const QEMU_PATCHES: &[Asset] = &[
    asset!("host-vmm/image/patches/qemu/vfio-user-msix-unplug.patch"),
    asset!("host-vmm/image/patches/qemu/vfio-user-recv-error.patch"),
];

/// The guest kernel's config fragment.
pub const KERNEL_FRAGMENT: Asset = asset!("guest-linux/kconfig/tandem.config");

/// Everything Kbuild compiles into tandem.ko: the module and the shared-abi
/// files it includes. A test checks that no file of either is missing.
pub const MODULE_SOURCES: &[Asset] = &[
    asset!("guest-linux/Kbuild"),
    asset!("guest-linux/Makefile"),
    asset!("guest-linux/tandem.rs"),
    asset!("guest-linux/functions.rs"),
    asset!("guest-linux/multipath.rs"),
    asset!("shared-abi/src/lib.rs"),
    asset!("shared-abi/src/channel.rs"),
    asset!("shared-abi/src/faults.rs"),
    asset!("shared-abi/src/golden.rs"),
    asset!("shared-abi/src/handoff.rs"),
    asset!("shared-abi/src/msg.rs"),
    asset!("shared-abi/src/pci.rs"),
    asset!("shared-abi/src/regs.rs"),
    asset!("shared-abi/src/ring.rs"),
    asset!("shared-abi/src/version.rs"),
];

/// The guest's init files.
pub const ROOTFS: &[Asset] = &[
    asset!("guest-linux/initramfs/inittab"),
    asset!("guest-linux/initramfs/rc"),
    asset!("guest-linux/initramfs/acpi-power"),
];

/// Small C tools built static into the guest image.
pub const GUEST_TOOL_SOURCES: &[Asset] = &[
    asset!("guest-linux/tools/mmio-bench.c"),
    asset!("guest-linux/tools/nvme-hostile.c"),
    asset!("guest-linux/tools/ackwrite.c"),
];

/// Writes assets under `dir`, keeping their repository-relative paths.
pub fn write_all(assets: &[Asset], dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for a in assets {
        let p = dir.join(a.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, a.text)?;
        let mode = if a.path.ends_with(".sh") {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn repo() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    fn files_under(dir: &str, ext: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![repo().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)) {
                    let rel = p
                        .strip_prefix(repo())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    out.push(rel);
                }
            }
        }
        out
    }

    #[test]
    fn every_module_source_is_embedded() {
        let embedded: Vec<&str> = MODULE_SOURCES.iter().map(|a| a.path).collect();
        let mut wanted = files_under("shared-abi/src", Some("rs"));
        wanted.extend(["guest-linux/Kbuild", "guest-linux/Makefile"].map(String::from));
        wanted.extend(
            files_under("guest-linux", Some("rs"))
                .into_iter()
                .filter(|p| !p.contains("/target/")),
        );
        for w in wanted {
            assert!(
                embedded.contains(&w.as_str()),
                "{w} is not in MODULE_SOURCES"
            );
        }
    }

    #[test]
    fn every_script_and_rootfs_file_is_embedded() {
        let embedded: Vec<&str> = SCRIPTS.iter().chain(ROOTFS).map(|a| a.path).collect();
        let embedded: Vec<&str> = embedded
            .into_iter()
            .chain(QEMU_PATCHES.iter().map(|a| a.path))
            .chain(GUEST_TOOL_SOURCES.iter().map(|a| a.path))
            .collect();
        for w in files_under("host-vmm/image/scripts", None)
            .into_iter()
            .chain(files_under("guest-linux/initramfs", None))
            .chain(files_under("host-vmm/image/patches", None))
            .chain(files_under("guest-linux/tools", None))
        {
            assert!(embedded.contains(&w.as_str()), "{w} is not embedded");
        }
    }

    #[test]
    fn module_version_matches_the_workspace() {
        let module = MODULE_SOURCES
            .iter()
            .find(|a| a.path == "guest-linux/tandem.rs")
            .unwrap();
        let expected = format!("const VERSION: &str = \"{}\";", env!("CARGO_PKG_VERSION"));
        assert!(
            module.text.contains(&expected),
            "guest-linux/tandem.rs must declare {expected}"
        );
    }

    #[test]
    fn the_probe_marker_is_what_init_prints() {
        let rc = ROOTFS.iter().find(|a| a.path.ends_with("/rc")).unwrap();
        assert!(rc.text.contains(tandem_vmm::probe::PROBE_MARKER));
        assert!(rc.text.contains(tandem_vmm::probe::PROBE_PARAM));
    }
}
