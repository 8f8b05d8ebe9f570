//! The volume socket (issue 7, "two paths to the same storage"): the
//! process that owns a disk (the vhost-user-blk backend, with its chain,
//! its checkpoint gate and its counters) lends the disk's blocks over a
//! Unix socket to a second path in another process, the NVMe device
//! server's namespace. Both paths then write through one chain in one
//! process: qcow2 and VHDX volumes can be multi-path, a checkpoint covers
//! both paths, and killing the device server (the "hardware") leaves the
//! synthetic path and the disk untouched.
//!
//! It owns the wire format ([`proto`], pure, fuzzed, specified in the
//! crate's README), the serving side over any [`server::Volume`], and the
//! client ([`client::RemoteVolume`]). It knows nothing of virtio, NVMe or
//! disk formats.
//!
//! Why our own protocol and not NBD or vhost-user: the lender is a
//! vhost-user *backend* already (it cannot also be a vhost-user frontend's
//! peer for a second device), and an NBD server would add a network
//! protocol with negotiation, options and structured replies for what is
//! three operations on a local socket between two Tandem processes.
#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

pub use client::{ClientError, RemoteVolume};
pub use server::{listen, GateStats, Lending, Orphans, Volume};
/// The client's handoff counters (the core's own).
pub use shared_abi::handoff::Stats as HandoffStats;
