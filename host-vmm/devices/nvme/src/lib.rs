//! An emulated SR-IOV NVMe controller, served over vfio-user, that the
//! guest's own `nvme` driver cannot tell from hardware.
//!
//! It stands in for an assignable SR-IOV adapter on hosts without one: a
//! physical function with the SR-IOV capability, and virtual functions
//! created when NumVFs is set, each a separate PCI function a VM can be
//! given. Like hardware without an IOMMU fault handler, a function only
//! touches guest memory QEMU mapped for it (`DmaSpace`); anything else is a
//! counted DMA fault and an NVMe error, never a host access.
//!
//! Layout: [`cmd`] and [`prp`] parse what the guest wrote (pure);
//! [`ctrl`] is the controller state machine; [`function`] is the PCI
//! plumbing around it; [`server`] is the process. Config-space policy (F5)
//! is applied by the function, not here in the controller.
#![forbid(unsafe_code)]

pub mod backend;
pub mod cmd;
pub mod ctrl;
pub mod function;
pub mod prp;
pub mod server;
pub mod spec;

/// PCI vendor of Tandem's emulated devices (the same experimental range as
/// the control device; see shared-abi's README on identifiers).
pub const VENDOR_ID: u16 = 0x1af4;
/// Physical function device id.
pub const PF_DEVICE_ID: u16 = 0x10f1;
/// Virtual function device id.
pub const VF_DEVICE_ID: u16 = 0x10f2;
