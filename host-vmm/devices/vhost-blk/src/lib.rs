//! A vhost-user-blk backend: serves a guest's stock virtio-blk driver
//! (through QEMU's `vhost-user-blk-pci`) from a `tandem-disk` chain, and
//! checkpoints the chain while the guest writes. It owns the virtio-blk
//! request format ([`request`], pure, fuzzed), what the device offers
//! ([`config`]), the vhost-user backend and its quiesce gate ([`device`]),
//! and the process with its JSON-lines API ([`server`], [`api`]). It does
//! not own disk formats (`tandem-disk`) or how QEMU is started
//! (`tandem-vmm`).
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod device;
pub mod request;
pub mod server;

pub use device::{BlkDevice, Counters};
pub use server::{run, ServerConfig, ServerError};
