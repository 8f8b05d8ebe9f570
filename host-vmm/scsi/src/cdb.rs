//! CDB parsing (SPC-4, SBC-3): bytes in, a [`Command`] or the sense data
//! to return. Pure, and fuzzed (`fuzz/fuzz_targets/scsi_cdb.rs`).

use crate::sense::{self, Sense};

/// Operation codes this engine knows.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    /// MAINTENANCE IN service action.
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    /// SERVICE ACTION IN(16) service action.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
}

/// PERSISTENT RESERVE IN service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrInAction {
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
    ReadFullStatus,
}

/// PERSISTENT RESERVE OUT service actions this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrOutAction {
    Register,
    Reserve,
    Release,
    Clear,
    Preempt,
    PreemptAndAbort,
    RegisterAndIgnore,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    /// Accepted and done at once: the medium is always spinning.
    StartStopUnit {
        /// START set and POWER CONDITION 0 (SBC-3 allows it under any
        /// reservation).
        start_only: bool,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    SynchronizeCache {
        lba: u64,
        blocks: u32,
    },
    Unmap {
        len: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    PrIn {
        action: PrInAction,
        alloc: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    PrOut {
        action: PrOutAction,
        scope: u8,
        kind: u8,
        len: u32,
    },
}

/// The length of a CDB, from the group code of its operation code.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}
fn be24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The protection field of READ/WRITE (RDPROTECT/WRPROTECT) must be zero:
/// the engine formats no protection information.
fn no_protect(byte1: u8) -> Result<(), Sense> {
    if byte1 >> 5 != 0 {
        return Err(sense::INVALID_FIELD_IN_CDB);
    }
    Ok(())
}

impl Command {
    /// Parses `cdb`; bytes past the CDB's length are ignored (iSCSI pads
    /// CDBs to 16 bytes).
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        let opcode = *cdb.first().ok_or(sense::INVALID_OPCODE)?;
        let len = cdb_len(opcode).ok_or(sense::INVALID_OPCODE)?;
        let Some(c) = cdb.get(..len) else {
            return Err(sense::INVALID_FIELD_IN_CDB);
        };
        // NACA (control byte bit 2) asks for ACA, which is not supported.
        if c[len - 1] & 0x04 != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB);
        }
        let cmd = match opcode {
            op::TEST_UNIT_READY => Command::TestUnitReady,
            op::REQUEST_SENSE => {
                // Descriptor-format sense is not supported.
                if c[1] & 1 != 0 {
                    return Err(sense::INVALID_FIELD_IN_CDB);
                }
                Command::RequestSense {
                    alloc: u32::from(c[4]),
                }
            }
            op::INQUIRY => {
                let evpd = c[1] & 1 != 0;
                if c[1] & 0xfe != 0 || (!evpd && c[2] != 0) {
                    return Err(sense::INVALID_FIELD_IN_CDB);
                }
                Command::Inquiry {
                    evpd,
                    page: c[2],
                    alloc: be16(&c[3..]),
                }
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
                let ten = opcode == op::MODE_SENSE_10;
                Command::ModeSense {
                    ten,
                    dbd: c[1] & 0x08 != 0,
                    pc: c[2] >> 6,
                    page: c[2] & 0x3f,
                    subpage: c[3],
                    alloc: if ten { be16(&c[7..]) } else { u32::from(c[4]) },
                }
            }
            op::START_STOP_UNIT => Command::StartStopUnit {
                start_only: c[4] & 0x01 != 0 && c[4] >> 4 == 0,
            },
            op::READ_CAPACITY_10 => {
                // PMI without an LBA is the only form SBC-3 keeps.
                if c[8] & 1 == 0 && be32(&c[2..]) != 0 {
                    return Err(sense::INVALID_FIELD_IN_CDB);
                }
                Command::ReadCapacity10
            }
            op::SERVICE_ACTION_IN_16 => match c[1] & 0x1f {
                op::SAI_READ_CAPACITY_16 => Command::ReadCapacity16 {
                    alloc: be32(&c[10..]),
                },
                _ => return Err(sense::INVALID_FIELD_IN_CDB),
            },
            op::READ_6 | op::WRITE_6 => {
                let lba = u64::from(be24(&c[1..]) & 0x1f_ffff);
                // A transfer length of 0 means 256 blocks in the 6-byte forms.
                let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
                if opcode == op::READ_6 {
                    Command::Read { lba, blocks }
                } else {
                    Command::Write {
                        lba,
                        blocks,
                        fua: false,
                    }
                }
            }
            op::READ_10
            | op::READ_12
            | op::READ_16
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16 => {
                no_protect(c[1])?;
                let (lba, blocks) = match opcode {
                    op::READ_10 | op::WRITE_10 => (u64::from(be32(&c[2..])), be16(&c[7..])),
                    op::READ_12 | op::WRITE_12 => (u64::from(be32(&c[2..])), be32(&c[6..])),
                    _ => (be64(&c[2..]), be32(&c[10..])),
                };
                if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                    Command::Read { lba, blocks }
                } else {
                    Command::Write {
                        lba,
                        blocks,
                        fua: c[1] & 0x08 != 0,
                    }
                }
            }
            op::SYNCHRONIZE_CACHE_10 => Command::SynchronizeCache {
                lba: u64::from(be32(&c[2..])),
                blocks: be16(&c[7..]),
            },
            op::SYNCHRONIZE_CACHE_16 => Command::SynchronizeCache {
                lba: be64(&c[2..]),
                blocks: be32(&c[10..]),
            },
            op::UNMAP => {
                // ANCHOR is not supported (no anchored state).
                if c[1] & 1 != 0 {
                    return Err(sense::INVALID_FIELD_IN_CDB);
                }
                Command::Unmap { len: be16(&c[7..]) }
            }
            op::REPORT_LUNS => {
                let alloc = be32(&c[6..]);
                if c[2] > 2 || alloc < 16 {
                    return Err(sense::INVALID_FIELD_IN_CDB);
                }
                Command::ReportLuns {
                    select: c[2],
                    alloc,
                }
            }
            op::MAINTENANCE_IN => match c[1] & 0x1f {
                op::MI_REPORT_SUPPORTED_OPCODES => Command::ReportSupportedOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options: c[2] & 0x07,
                    opcode: c[3],
                    sa: be16(&c[4..]) as u16,
                    alloc: be32(&c[6..]),
                },
                _ => return Err(sense::INVALID_FIELD_IN_CDB),
            },
            op::PERSISTENT_RESERVE_IN => {
                let action = match c[1] & 0x1f {
                    0 => PrInAction::ReadKeys,
                    1 => PrInAction::ReadReservation,
                    2 => PrInAction::ReportCapabilities,
                    3 => PrInAction::ReadFullStatus,
                    _ => return Err(sense::INVALID_FIELD_IN_CDB),
                };
                Command::PrIn {
                    action,
                    alloc: be16(&c[7..]),
                }
            }
            op::PERSISTENT_RESERVE_OUT => {
                let action = match c[1] & 0x1f {
                    0 => PrOutAction::Register,
                    1 => PrOutAction::Reserve,
                    2 => PrOutAction::Release,
                    3 => PrOutAction::Clear,
                    4 => PrOutAction::Preempt,
                    5 => PrOutAction::PreemptAndAbort,
                    6 => PrOutAction::RegisterAndIgnore,
                    // REGISTER AND MOVE and REPLACE LOST RESERVATION are
                    // not offered (REPORT CAPABILITIES says so).
                    _ => return Err(sense::INVALID_FIELD_IN_CDB),
                };
                Command::PrOut {
                    action,
                    scope: c[2] >> 4,
                    kind: c[2] & 0xf,
                    len: be32(&c[5..]),
                }
            }
            _ => return Err(sense::INVALID_OPCODE),
        };
        Ok(cmd)
    }

    /// Bytes of data-out this command needs from the initiator.
    pub fn data_out_len(&self, block_size: u32) -> u64 {
        match *self {
            Command::Write { blocks, .. } => u64::from(blocks) * u64::from(block_size),
            Command::Unmap { len } | Command::PrOut { len, .. } => u64::from(len),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_by_group() {
        assert_eq!(cdb_len(0x00), Some(6));
        assert_eq!(cdb_len(0x28), Some(10));
        assert_eq!(cdb_len(0x5e), Some(10));
        assert_eq!(cdb_len(0x88), Some(16));
        assert_eq!(cdb_len(0xa0), Some(12));
        assert_eq!(cdb_len(0x60), None);
        assert_eq!(cdb_len(0xc0), None);
    }

    #[test]
    fn read10_fields() {
        let c = [0x28, 0, 0, 0, 1, 0, 0, 0, 8, 0];
        assert_eq!(
            Command::parse(&c),
            Ok(Command::Read {
                lba: 256,
                blocks: 8
            })
        );
        // RDPROTECT without protection information.
        let c = [0x28, 0x20, 0, 0, 1, 0, 0, 0, 8, 0];
        assert_eq!(Command::parse(&c), Err(sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn six_byte_zero_length_is_256() {
        let c = [0x08, 0x01, 0x02, 0x03, 0, 0];
        assert_eq!(
            Command::parse(&c),
            Ok(Command::Read {
                lba: 0x010203,
                blocks: 256
            })
        );
    }

    #[test]
    fn write16_fua_and_length() {
        let mut c = [0u8; 16];
        c[0] = 0x8a;
        c[1] = 0x08;
        c[9] = 7;
        c[13] = 2;
        let cmd = Command::parse(&c).unwrap();
        assert_eq!(
            cmd,
            Command::Write {
                lba: 7,
                blocks: 2,
                fua: true
            }
        );
        assert_eq!(cmd.data_out_len(512), 1024);
    }

    #[test]
    fn short_cdb_and_naca_and_unknown() {
        assert_eq!(Command::parse(&[]), Err(sense::INVALID_OPCODE));
        assert_eq!(
            Command::parse(&[0x28, 0, 0]),
            Err(sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            Command::parse(&[0, 0, 0, 0, 0, 4]),
            Err(sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            Command::parse(&[0x07, 0, 0, 0, 0, 0]),
            Err(sense::INVALID_OPCODE)
        );
    }

    #[test]
    fn pr_service_actions() {
        let c = [0x5e, 0x03, 0, 0, 0, 0, 0, 0x10, 0, 0];
        assert_eq!(
            Command::parse(&c),
            Ok(Command::PrIn {
                action: PrInAction::ReadFullStatus,
                alloc: 0x1000
            })
        );
        let c = [0x5e, 0x04, 0, 0, 0, 0, 0, 0x10, 0, 0];
        assert_eq!(Command::parse(&c), Err(sense::INVALID_FIELD_IN_CDB));
        let c = [0x5f, 0x05, 0x03, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(
            Command::parse(&c),
            Ok(Command::PrOut {
                action: PrOutAction::PreemptAndAbort,
                scope: 0,
                kind: 3,
                len: 24
            })
        );
        // REGISTER AND MOVE is not offered.
        let c = [0x5f, 0x07, 0, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(Command::parse(&c), Err(sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn report_luns_minimum_allocation() {
        let mut c = [0u8; 12];
        c[0] = 0xa0;
        c[9] = 15;
        assert_eq!(Command::parse(&c), Err(sense::INVALID_FIELD_IN_CDB));
        c[9] = 16;
        assert!(Command::parse(&c).is_ok());
    }
}
