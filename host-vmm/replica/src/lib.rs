//! Replication of a disk chain to a recovery site (F2): the primary seals
//! its top layer at each interval and ships the sealed layer with
//! checksums; the site stores the layers as the same parent/child chain
//! under its own names and lists them as recovery points; failover builds
//! a disk at exactly one of them. This crate owns the wire protocol
//! (`proto`, specified in README.md), the receiver's session state machine
//! (`session`), the site's store and server (`receiver`), the sender
//! (`sender`), progress and its API (`status`), failover (`failover`),
//! and which old points a site merges away (`retention`).
//! It does not own the disk formats, checkpoints or relinking (those are
//! `tandem-disk`'s) nor the running VM's backend (`tandem-vhost-blk`).
#![forbid(unsafe_code)]

pub mod failover;
pub mod manifest;
pub mod proto;
pub mod receiver;
pub mod retention;
pub mod sender;
pub mod session;
pub mod status;
pub mod wire;

pub use failover::{failover, points, Output};
pub use manifest::{LayerRecord, Manifest};
pub use receiver::{ServeConfig, Server, Store};
pub use sender::{SendConfig, Source};
pub use status::Status;
