//! One running VM: its configuration, lifecycle, QEMU process and control
//! API.
//!
//! This crate owns what happens between `tandem run` and the VM's end:
//! checking the configuration ([`config`]), the lifecycle rules
//! ([`lifecycle`], pure), starting and following QEMU over QMP ([`vm`]),
//! serving the control socket ([`api`], [`socket`]) and probing whether KVM
//! can boot a guest ([`probe`]). It does not build images or pick engines:
//! the `tandem` binary hands it a checked configuration and an engine.

pub mod api;
pub mod config;
pub mod control;
pub mod devices;
pub mod handoff;
pub mod lifecycle;
pub mod probe;
pub mod snapshot;
pub mod socket;
pub mod vhost;
pub mod vm;

pub use config::{ImageDefaults, ResolvedVm, VmConfig};
pub use lifecycle::Ending;
pub use vm::{Running, Vm, VmError};
