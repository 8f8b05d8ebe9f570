//! iSCSI PDU framing (RFC 7143 11.2): the 48-byte basic header segment,
//! additional header segments, the data segment padded to 4 bytes, and
//! optional CRC32C header and data digests. Pure, and fuzzed
//! (`fuzz/fuzz_targets/iscsi_pdu.rs`).

use tandem_disk::crc32c;

pub const BHS_LEN: usize = 48;

/// Opcodes (RFC 7143 11.2.1.2).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest,
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataTooLong { len: usize, max: usize },
    #[error("PDU truncated")]
    Truncated,
}

/// Which digests the connection negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// One PDU: its basic header segment, AHS bytes and data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Pdu {
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.bhs[1] = f;
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[off],
            self.bhs[off + 1],
            self.bhs[off + 2],
            self.bhs[off + 3],
        ])
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bhs[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.bhs[8..16]);
        l
    }
    pub fn set_lun(&mut self, lun: [u8; 8]) {
        self.bhs[8..16].copy_from_slice(&lun);
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v);
    }

    /// The AHS length and data segment length the header announces.
    pub fn rest_len(bhs: &[u8; BHS_LEN]) -> (usize, usize) {
        let ahs = usize::from(bhs[4]) * 4;
        let dsl = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        (ahs, dsl)
    }

    /// Total bytes of the PDU whose BHS is `bhs`, including digests.
    pub fn frame_len(bhs: &[u8; BHS_LEN], d: Digests) -> usize {
        let (ahs, dsl) = Pdu::rest_len(bhs);
        BHS_LEN
            + ahs
            + if d.header { 4 } else { 0 }
            + pad4(dsl)
            + if d.data && dsl > 0 { 4 } else { 0 }
    }

    /// Decodes one PDU from the front of `buf`, returning it and the bytes
    /// it took. `max_data` bounds the data segment.
    pub fn decode(buf: &[u8], d: Digests, max_data: usize) -> Result<(Pdu, usize), PduError> {
        let Some(head) = buf.get(..BHS_LEN) else {
            return Err(PduError::Truncated);
        };
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(head);
        let (ahs_len, dsl) = Pdu::rest_len(&bhs);
        if dsl > max_data {
            return Err(PduError::DataTooLong {
                len: dsl,
                max: max_data,
            });
        }
        let mut pos = BHS_LEN;
        let ahs = buf
            .get(pos..pos + ahs_len)
            .ok_or(PduError::Truncated)?
            .to_vec();
        pos += ahs_len;
        if d.header {
            let got = buf.get(pos..pos + 4).ok_or(PduError::Truncated)?;
            let want = crc32c(&buf[..pos]).to_le_bytes();
            if got != want {
                return Err(PduError::HeaderDigest);
            }
            pos += 4;
        }
        let padded = pad4(dsl);
        let seg = buf.get(pos..pos + padded).ok_or(PduError::Truncated)?;
        let data = seg[..dsl].to_vec();
        pos += padded;
        if d.data && dsl > 0 {
            let got = buf.get(pos..pos + 4).ok_or(PduError::Truncated)?;
            if got != crc32c(seg).to_le_bytes() {
                return Err(PduError::DataDigest);
            }
            pos += 4;
        }
        Ok((Pdu { bhs, ahs, data }, pos))
    }

    /// Encodes with the lengths filled in from `ahs` and `data`.
    pub fn encode(&self, d: Digests) -> Vec<u8> {
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        let dsl = (self.data.len() as u32).to_be_bytes();
        bhs[5..8].copy_from_slice(&dsl[1..4]);
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + pad4(self.data.len()) + 8);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        if d.header {
            let c = crc32c(&out).to_le_bytes();
            out.extend_from_slice(&c);
        }
        if !self.data.is_empty() {
            let start = out.len();
            out.extend_from_slice(&self.data);
            out.resize(start + pad4(self.data.len()), 0);
            if d.data {
                let c = crc32c(&out[start..]).to_le_bytes();
                out.extend_from_slice(&c);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // RFC 3720 appendix B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn round_trip_with_digests() {
        for d in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            let mut p = Pdu::new(op::DATA_IN);
            p.set_itt(7);
            p.data = vec![1, 2, 3, 4, 5];
            p.ahs = vec![0; 4];
            let bytes = p.encode(d);
            let (q, used) = Pdu::decode(&bytes, d, 1 << 20).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(q.data, p.data);
            assert_eq!(q.itt(), 7);
            assert_eq!(q.ahs.len(), 4);
            assert_eq!(used % 4, 0);
        }
    }

    #[test]
    fn bad_digests_and_lengths() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut p = Pdu::new(op::NOP_OUT);
        p.data = vec![9; 10];
        let bytes = p.encode(d);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert_eq!(Pdu::decode(&bad, d, 1 << 20), Err(PduError::HeaderDigest));
        let mut bad = bytes.clone();
        bad[BHS_LEN + 4] ^= 1;
        assert_eq!(Pdu::decode(&bad, d, 1 << 20), Err(PduError::DataDigest));
        assert_eq!(
            Pdu::decode(&bytes, d, 8),
            Err(PduError::DataTooLong { len: 10, max: 8 })
        );
        assert_eq!(
            Pdu::decode(&bytes[..bytes.len() - 1], d, 1 << 20),
            Err(PduError::Truncated)
        );
    }
}
