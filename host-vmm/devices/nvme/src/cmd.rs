//! Submission and completion queue entries: pure parsing and encoding.
//!
//! A submission entry comes from guest memory and may hold anything; this
//! module only splits it into fields. Whether the fields make sense is the
//! controller's decision (it answers with an NVMe status, never a panic).

/// Size of a submission queue entry (IOSQES = 6).
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry (IOCQES = 4).
pub const CQE_SIZE: usize = 16;

/// The fields of a submission queue entry that Tandem uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    pub opcode: u8,
    /// FUSE and PSDT bits (CDW0 bits 15:8).
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

fn le32(b: &[u8; SQE_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8; SQE_SIZE], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl Command {
    pub fn parse(b: &[u8; SQE_SIZE]) -> Command {
        let cdw0 = le32(b, 0);
        Command {
            opcode: cdw0 as u8,
            flags: (cdw0 >> 8) as u8,
            cid: (cdw0 >> 16) as u16,
            nsid: le32(b, 4),
            prp1: le64(b, 24),
            prp2: le64(b, 32),
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }

    pub fn encode(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        let cdw0 =
            u32::from(self.opcode) | (u32::from(self.flags) << 8) | (u32::from(self.cid) << 16);
        b[0..4].copy_from_slice(&cdw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, v) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .iter()
        .enumerate()
        {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// PRP or SGL: PSDT (CDW0 bits 15:14); 0 means PRPs.
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }

    /// FUSE (CDW0 bits 9:8); 0 means a normal command.
    pub fn fuse(&self) -> u8 {
        self.flags & 3
    }

    /// Starting LBA of a read, write or write zeroes.
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }

    /// Number of logical blocks (NLB is 0-based).
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    /// Force Unit Access.
    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    /// Status field without the phase bit (bits 15:1 of DW3's upper half).
    pub status: u16,
}

impl Completion {
    pub fn encode(&self, phase: bool) -> [u8; CQE_SIZE] {
        let mut b = [0u8; CQE_SIZE];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        let sf = (self.status << 1) | u16::from(phase);
        b[14..16].copy_from_slice(&sf.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8; CQE_SIZE]) -> (Completion, bool) {
        let sf = u16::from_le_bytes([b[14], b[15]]);
        (
            Completion {
                dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                sq_head: u16::from_le_bytes([b[8], b[9]]),
                sq_id: u16::from_le_bytes([b[10], b[11]]),
                cid: u16::from_le_bytes([b[12], b[13]]),
                status: sf >> 1,
            },
            sf & 1 != 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Command {
            opcode: 0x02,
            flags: 0,
            cid: 0xbeef,
            nsid: 1,
            prp1: 0x1234_5000,
            prp2: 0x6789_a000,
            cdw10: 8,
            cdw11: 1,
            cdw12: 7 | (1 << 30),
            ..Command::default()
        };
        let p = Command::parse(&c.encode());
        assert_eq!(p, c);
        assert_eq!(p.slba(), (1 << 32) | 8);
        assert_eq!(p.nlb(), 8);
        assert!(p.fua());
        let q = Completion {
            dw0: 5,
            sq_head: 3,
            sq_id: 1,
            cid: 0xbeef,
            status: 0x102,
        };
        assert_eq!(Completion::parse(&q.encode(true)), (q, true));
    }
}
