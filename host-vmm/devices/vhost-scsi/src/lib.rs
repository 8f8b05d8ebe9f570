//! A vhost-user-scsi backend: serves a guest's stock virtio-scsi driver
//! (through QEMU's `vhost-user-scsi-pci`) with one shared disk that lives
//! on a file server, every command carried there by the SCSI tunnel
//! (`tandem-share`'s client) under this VM's initiator name. It owns the
//! virtio-scsi request format ([`request`], pure, fuzzed), the vhost-user
//! backend ([`device`]) and the process with its JSON-lines API
//! ([`server`]). It does not execute SCSI commands (the file server's
//! `tandem-scsi` engine does) or start QEMU (`tandem-vmm`).
#![forbid(unsafe_code)]

pub mod device;
pub mod request;
pub mod server;

pub use device::{Counters, ScsiDevice};
pub use server::{run, ServerConfig, ServerError};
