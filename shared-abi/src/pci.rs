//! PCI identity of the Tandem control device.
//!
//! Tandem has no PCI-SIG vendor ID of its own. The control device uses
//! vendor 0x1af4 with a device ID from 0x10f0..=0x10ff, the range QEMU's
//! PCI ID registry (docs/specs/pci-ids.rst) leaves "available for
//! experimental usage without registration", which also says that an
//! official ID is needed before shipping. That is where Tandem stands: the
//! IDs below are experimental and must be replaced by registered ones for
//! a release. Nothing claims to be another vendor's product: the
//! subsystem IDs say "Tandem" only through this documentation, and
//! drivers match on vendor, device and class together.

pub const VENDOR_ID: u16 = 0x1af4;
/// The Tandem control device (experimental range, see above).
pub const CONTROL_DEVICE_ID: u16 = 0x10f0;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const SUBSYSTEM_ID: u16 = 0x10f0;
/// Class "other system peripheral" (0x08_80), programming interface 0.
pub const CLASS_CODE: u32 = 0x08_80_00;
pub const REVISION: u8 = 1;
