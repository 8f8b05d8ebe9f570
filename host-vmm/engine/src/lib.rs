//! The execution engine: QEMU.
//!
//! Tandem does not run vCPUs; QEMU does, with KVM where the host can really
//! boot a guest with it and TCG elsewhere. This crate finds a QEMU that is
//! new enough and has the devices Tandem needs ([`discover`]), decides the
//! accelerator from facts about the host ([`accel`]), and lowers a machine
//! description into QEMU's command line ([`cmdline`]). It starts nothing and
//! talks no QMP: the VMM does that.
#![forbid(unsafe_code)]

pub mod accel;
pub mod cmdline;
pub mod discover;
pub mod qemu_log;

pub use accel::{Accel, AccelChoice, AccelFacts, AccelRequest, DevKvm};
pub use cmdline::{root_port_id, DiskFormat, DiskInterface, DiskSpec, MachineSpec, Serial};
pub use discover::{Engine, EngineError, EngineVersion, MIN_ENGINE_VERSION, REQUIRED_DEVICES};
