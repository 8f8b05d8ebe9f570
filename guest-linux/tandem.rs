// SPDX-License-Identifier: GPL-2.0 OR MIT

//! tandem.ko: the Linux guest side of Tandem.
//!
//! It owns the guest's half of the conversation with the Tandem host VMM.
//! For now it announces which build it is and which shared-ABI version it
//! speaks, and exposes both read-only in debugfs:
//!
//!   /sys/kernel/debug/tandem/version      the module version, e.g. "0.1.0"
//!   /sys/kernel/debug/tandem/abi_version  the ABI it speaks, e.g. "1.0"
//!
//! The wire definitions are not written here: they are the files of the
//! `shared-abi` crate, compiled into this module with `#[path]` (a kernel
//! module cannot depend on crates from crates.io, and this keeps one
//! definition for host and guest).

use kernel::{debugfs, prelude::*};

// The shared files are a library: not every item is used here, and their
// `pub` items are the crate API on the host side.
#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../shared-abi/src/lib.rs"]
mod abi;

use abi::version::{AbiVersion, ABI_VERSION};

/// The module's version; the host build checks that it equals the Tandem
/// workspace version, so the guest and host of one release agree.
const VERSION: &str = "0.1.0";

module! {
    type: Tandem,
    name: "tandem",
    authors: ["The Tandem developers"],
    description: "Tandem: virtualization-aware guest driver for assigned devices",
    license: "Dual MIT/GPL",
}

/// What the module exposes read-only.
#[derive(Clone, Copy)]
struct Identity {
    version: &'static str,
    abi: AbiVersion,
}

const IDENTITY: Identity = Identity {
    version: VERSION,
    abi: ABI_VERSION,
};

struct Tandem {
    // Files first: they are removed before the directory handle goes.
    _version: Pin<KBox<debugfs::File<Identity>>>,
    _abi_version: Pin<KBox<debugfs::File<Identity>>>,
    _dir: debugfs::Dir,
}

fn show_version(id: &Identity, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
    writeln!(f, "{}", id.version)
}

fn show_abi(id: &Identity, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
    writeln!(f, "{}", id.abi)
}

impl kernel::Module for Tandem {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        // The wire format compiled here must be the one the host tests:
        // refuse to load if the golden vectors do not come out identical.
        match abi::golden::check() {
            Ok(n) => pr_info!("tandem: {} golden ABI vectors match\n", n),
            Err(name) => {
                pr_err!("tandem: golden ABI vector '{}' does not match; not loading\n", name);
                return Err(EINVAL);
            }
        }
        let dir = debugfs::Dir::new(c"tandem");
        let version = KBox::pin_init(
            dir.read_callback_file(c"version", IDENTITY, &show_version),
            GFP_KERNEL,
        )?;
        let abi_version = KBox::pin_init(
            dir.read_callback_file(c"abi_version", IDENTITY, &show_abi),
            GFP_KERNEL,
        )?;
        pr_info!(
            "tandem {} loaded, speaks ABI {}.{}\n",
            VERSION,
            ABI_VERSION.major,
            ABI_VERSION.minor
        );
        Ok(Tandem {
            _version: version,
            _abi_version: abi_version,
            _dir: dir,
        })
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        pr_info!("tandem {} unloaded\n", VERSION);
    }
}
