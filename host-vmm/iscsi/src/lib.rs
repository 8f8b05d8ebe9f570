//! An iSCSI target (RFC 7143) in front of the `tandem-scsi` engine, so
//! standard initiators and conformance suites reach the same logical units
//! and persistent reservations. It owns the PDU codec ([`pdu`]), text
//! negotiation ([`text`]), the per-connection state machine ([`conn`]) and
//! the TCP server with the reservation state files ([`server`]); SCSI
//! semantics stay in `tandem-scsi`.
#![forbid(unsafe_code)]

pub mod conn;
pub mod pdu;
pub mod server;
pub mod text;
