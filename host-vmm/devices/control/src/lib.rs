//! The Tandem control device.
//!
//! A PCI function (vendor 0x1af4, device 0x10f0, see `shared_abi::pci`)
//! that carries the guest/host channel defined in `shared-abi`: registers
//! in BAR0, MSI-X in BAR2, and two message rings in guest memory that the
//! guest driver allocates. It runs in its own process (a child partition,
//! see [`server`]) so that it can die and be replaced without touching the
//! VM. This crate owns the device's behaviour ([`device`]) and the small
//! JSON-lines API the VMM uses to reach it ([`api`]); the protocol rules
//! themselves are `shared_abi::channel`, shared with the guest drivers.
#![forbid(unsafe_code)]

pub mod api;
pub mod device;
pub mod server;

pub use device::ControlDevice;
