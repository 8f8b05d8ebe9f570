//! Virtual disks for Tandem: one interface ([`BlockDevice`], over a
//! [`Chain`] of [`Layer`]s) with raw, qcow2 and VHDX backends, differencing
//! chains, checkpoints, and the operations behind `tandem disk`. It owns the
//! on-disk formats and their crash safety; it does not own replication,
//! device emulation or how a VM is configured.
//!
//! # Crash safety
//!
//! *Writes.* A write is acknowledged when [`BlockDevice::flush`] returns. Each
//! format makes data durable before the metadata that points at it: raw is
//! just `fdatasync`; qcow2 (through `imago`) syncs data, writes its tables,
//! syncs again; VHDX allocates new blocks only at the end of the file, syncs
//! the data, then commits BAT and sector bitmap changes through its log (see
//! [`vhdx`]) so a torn metadata update is either absent or replayed on open.
//!
//! *Checkpoint* ([`checkpoint`]): the child is created and synced under a
//! temporary name, the top is hard-linked to its sealed name, and one atomic
//! rename puts the child in place, with directory syncs between; every
//! intermediate state opens as the old chain or the new one, with the same
//! content.
//!
//! *Commit* ([`ops::commit`]): data is copied into the parent only where the
//! top layer hides it, so the chain reads the same throughout; then one atomic
//! rename replaces the top with the merged parent. A VHDX top first records
//! (through its log) the parent's next DataWriteGuid as `parent_linkage2`,
//! so it accepts the parent before and after the parent's identity changes,
//! while any other child of that parent refuses it from its first write on.
//!
//! *Merge* ([`ops::merge_into`]): a run of sealed layers is copied down into
//! the layer below it (which keeps its identity), only where the run holds
//! data and with the data its newest layer reads, so every chain through the
//! run reads the same; one atomic relink (qcow2: backing name and format in
//! one page; VHDX: locator and linkage through the log) then makes the
//! run's child skip it, and only then are the run's files removed. Run again
//! after a crash, it finishes. Replication uses it to keep chains short.
//!
//! Tests inject a failure at every step (a [`FaultHook`]) and reopen the files.
#![forbid(unsafe_code)]

pub mod chain;
pub mod checkpoint;
pub mod error;
pub mod fault;
pub mod layer;
pub mod ops;
pub mod qcow2;
pub mod qcow2_refs;
pub mod raw;
mod util;
pub mod vhdx;

pub use chain::{open_layer, probe, Chain, ChainOptions, LayerOptions};
pub use error::{DiskError, Result};
pub use fault::FaultHook;
pub use layer::{BlockDevice, Format, Layer, ParentRef, Status};
pub use util::{crc32c, Guid};
