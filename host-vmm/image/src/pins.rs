//! Pinned versions and options. Changing any of them changes a cache key,
//! so the next `tandem image build` rebuilds what depends on it.

/// bindgen-cli from crates.io; the kernel's Rust support needs >= 0.71.1.
pub const BINDGEN_VERSION: &str = "0.71.1";

/// The guest kernel: Debian's source package (trixie-backports).
pub const KERNEL_PACKAGE: &str = "linux-source-7.3";
pub const KERNEL_PACKAGE_VERSION: &str = "7.3.4-1~bpo13+1";
/// The LLVM toolchain suffix (`clang-19`, `make LLVM=-19`).
pub const LLVM_SUFFIX: &str = "-19";

/// QEMU: Debian's source package; 10.1+ has the vfio-user client.
pub const QEMU_SOURCE_VERSION: &str = "1:10.2.2+ds-1";
/// meson from PyPI (bookworm's is too old for QEMU 10).
pub const MESON_VERSION: &str = "1.9.0";
/// Debian suites the private apt list uses for the pinned sources.
pub const APT_SUITES: &str = "trixie-backports sid";

/// QEMU configure options: x86_64 system emulation only, and everything
/// Tandem does not use disabled (displays, audio, network back-ends,
/// foreign image formats, TLS, plugins, tools).
pub const QEMU_CONFIGURE: &[&str] = &[
    "--target-list=x86_64-softmmu",
    "--with-pkgversion=tandem",
    "--disable-docs",
    "--disable-werror",
    "--disable-download",
    "--disable-install-blobs",
    "--disable-tools",
    "--disable-guest-agent",
    "--disable-rust",
    "--enable-fdt=system",
    "--enable-kvm",
    "--enable-tcg",
    "--enable-vhost-user",
    "--disable-gtk",
    "--disable-sdl",
    "--disable-vnc",
    "--disable-spice",
    "--disable-opengl",
    "--disable-curses",
    "--disable-xen",
    "--disable-mshv",
    "--disable-slirp",
    "--disable-libusb",
    "--disable-usb-redir",
    "--disable-capstone",
    "--disable-gnutls",
    "--disable-keyring",
    "--disable-plugins",
    "--disable-qom-cast-debug",
    "--disable-tpm",
    "--disable-replication",
    "--disable-colo-proxy",
    "--disable-virtfs",
    "--disable-vhost-vdpa",
    "--disable-vhost-crypto",
    "--disable-vhost-net",
    "--disable-vhost-kernel",
    "--disable-vduse-blk-export",
    "--disable-libvduse",
    "--disable-bochs",
    "--disable-cloop",
    "--disable-dmg",
    "--disable-qcow1",
    "--disable-vdi",
    "--disable-vvfat",
    "--disable-qed",
    "--disable-parallels",
    "--disable-vpc",
    "--disable-vmdk",
    "--disable-vhdx",
];

/// The default guest's kernel command line.
pub const DEFAULT_APPEND: &str = "console=ttyS0 quiet";

/// Host binaries copied into the guest image, with their libraries.
pub const GUEST_TOOLS: &[&str] = &[
    "fio",
    "sg_persist",
    "sg_inq",
    "sg_readcap",
    "sg_turs",
    "sg_vpd",
    "sg_luns",
    "sg_raw",
    "sg_requests",
    "sg_sync",
    "sg_unmap",
    "sg_write_same",
    "sg_reset",
];

/// Debian packages whose versions go into the initramfs key (the tools
/// above come from them).
pub const GUEST_TOOL_PACKAGES: &[&str] = &["busybox-static", "fio", "sg3-utils"];
