//! A SCSI target engine for disks, with no I/O of its own: it parses CDBs
//! ([`cdb`]), executes them against a [`tandem_disk::BlockDevice`] per
//! logical unit ([`lu`]), keeps SPC-4 persistent reservations ([`pr`]) and
//! the unit attentions they cause per I_T nexus. Transports (the iSCSI
//! front-end in `tandem-iscsi`) own sockets, sessions and the files the
//! reservation state is saved to; this crate must not touch either.
#![forbid(unsafe_code)]

pub mod cdb;
pub mod lu;
pub mod mem;
pub mod opcodes;
pub mod pr;
pub mod sense;
pub mod target;

use serde::{Deserialize, Serialize};

pub use cdb::Command;
pub use lu::{LogicalUnit, LuConfig, Response};
pub use pr::{PrState, SavedPr};
pub use sense::{Sense, Status};
pub use target::Target;

/// Logical block size the engine serves.
pub const BLOCK_SIZE: u32 = 512;

/// An I_T nexus: an initiator port and the target port it reached. With
/// iSCSI the initiator port name is `<initiator name>,i,0x<ISID>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItNexus {
    pub initiator: String,
    pub target_port: u16,
}

impl ItNexus {
    pub fn new(initiator: impl Into<String>, target_port: u16) -> ItNexus {
        ItNexus {
            initiator: initiator.into(),
            target_port,
        }
    }

    /// The iSCSI TransportID of the initiator port (SPC-4 7.6.4.6): format
    /// 01b (name, ",i,0x", ISID) when the port name has an ISID, else 00b.
    pub fn transport_id(&self) -> Vec<u8> {
        let format: u8 = if self.initiator.contains(",i,0x") {
            0x40
        } else {
            0
        };
        let mut name = self.initiator.as_bytes().to_vec();
        name.push(0);
        // At least 20 bytes, a multiple of 4.
        let len = name.len().max(20).div_ceil(4) * 4;
        name.resize(len, 0);
        let mut t = vec![format | 0x05, 0];
        t.extend_from_slice(&(len as u16).to_be_bytes());
        t.extend_from_slice(&name);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_id_format() {
        let n = ItNexus::new("iqn.a,i,0x123456789abc", 1);
        let t = n.transport_id();
        assert_eq!(t[0], 0x45);
        let len = u16::from_be_bytes([t[2], t[3]]) as usize;
        assert_eq!(t.len(), 4 + len);
        assert_eq!(len % 4, 0);
        assert_eq!(&t[4..4 + 22], b"iqn.a,i,0x123456789abc");
        assert_eq!(t[4 + 22], 0);
        let short = ItNexus::new("x", 1).transport_id();
        assert_eq!(short[0], 0x05);
        assert_eq!(short.len(), 24);
    }
}
