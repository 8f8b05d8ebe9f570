//! QEMU Machine Protocol (QMP) client.
//!
//! Tandem drives QEMU only through QMP. This crate owns the protocol: the
//! greeting and capability negotiation, commands with ids and timeouts, and
//! the stream of asynchronous events. [`protocol`] is pure parsing with no
//! I/O; [`client`] is the tokio plumbing around it. It knows nothing of VMs,
//! devices or policy: callers decide which commands to send.
#![forbid(unsafe_code)]

pub mod client;
pub mod protocol;

pub use client::{Qmp, QmpError};
pub use protocol::{Event, Greeting, Incoming, ProtocolError, QemuVersion};
