//! Shared disks for VMs (F7): the SCSI tunnel between a host's
//! vhost-user-scsi backend and a file server. It owns the tunnel's wire
//! format ([`proto`], pure, fuzzed; specified in the crate's README), the
//! server's exactly-once memory per initiator ([`session`], pure), the
//! executed-command record that carries it across a server restart
//! ([`journal`], pure; its file in [`journal_file`]), framing
//! over a stream ([`stream`]), the file server ([`server`], `tandem share
//! serve`) with its operator API ([`api`]), and the client ([`client`]).
//! SCSI semantics (CDBs, reservations, unit attentions) are `tandem-scsi`'s
//! and disk formats `tandem-disk`'s; virtio and vhost-user are the
//! backend's (`tandem-vhost-scsi`). This crate must not touch either.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod journal;
pub mod journal_file;
pub mod proto;
pub mod server;
pub mod session;
pub mod stream;

pub use client::{Client, ClientConfig, ClientError};
pub use server::{ServeConfig, Server, ServerError};
