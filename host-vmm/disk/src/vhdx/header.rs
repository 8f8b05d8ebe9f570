//! VHDX file identifier, the two headers and the two region tables
//! (MS-VHDX 2.2.1 to 2.2.3): parsing with checksum validation, and encoding.

use super::VhdxError;
use crate::util::{
    crc32c, crc32c_with_zeroed_field, guid_at, le16, le32, le64, put16, put32, put64, utf16le, Guid,
};

pub const MB: u64 = 1 << 20;
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIGNATURE: u32 = 0x6461_6568; // "head"
pub const REGION_SIGNATURE: u32 = 0x6967_6572; // "regi"
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const MAX_REGION_ENTRIES: u32 = 2047;

pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

/// One of the two VHDX headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, VhdxError> {
        if b.len() < HEADER_SIZE {
            return Err(VhdxError::Truncated { what: "header" });
        }
        let b = &b[..HEADER_SIZE];
        if le32(b, 0) != HEADER_SIGNATURE {
            return Err(VhdxError::BadSignature { what: "header" });
        }
        let stored = le32(b, 4);
        let computed = crc32c_with_zeroed_field(b, 4);
        if stored != computed {
            return Err(VhdxError::BadChecksum {
                what: "header",
                stored,
                computed,
            });
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.version != 1 {
            return Err(VhdxError::Unsupported(format!(
                "header version {}",
                h.version
            )));
        }
        if h.log_version != 0 {
            return Err(VhdxError::Unsupported(format!(
                "log version {}",
                h.log_version
            )));
        }
        Ok(h)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        put32(&mut b, 0, HEADER_SIGNATURE);
        put64(&mut b, 8, self.sequence);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        let crc = crc32c(&b);
        put32(&mut b, 4, crc);
        b
    }
}

/// Picks the current header: the valid one with the higher sequence number.
/// Returns it and its slot (0 or 1).
pub fn current_header(slots: [&[u8]; 2]) -> Result<(Header, usize), VhdxError> {
    let parsed = [Header::parse(slots[0]), Header::parse(slots[1])];
    match parsed {
        [Ok(a), Ok(b)] => Ok(if b.sequence > a.sequence {
            (b, 1)
        } else {
            (a, 0)
        }),
        [Ok(a), Err(_)] => Ok((a, 0)),
        [Err(_), Ok(b)] => Ok((b, 1)),
        [Err(a), Err(b)] => Err(VhdxError::NoValidHeader {
            first: Box::new(a),
            second: Box::new(b),
        }),
    }
}

/// An entry of the region table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

pub fn parse_region_table(b: &[u8]) -> Result<Vec<RegionEntry>, VhdxError> {
    if b.len() < REGION_TABLE_SIZE {
        return Err(VhdxError::Truncated {
            what: "region table",
        });
    }
    let b = &b[..REGION_TABLE_SIZE];
    if le32(b, 0) != REGION_SIGNATURE {
        return Err(VhdxError::BadSignature {
            what: "region table",
        });
    }
    let stored = le32(b, 4);
    let computed = crc32c_with_zeroed_field(b, 4);
    if stored != computed {
        return Err(VhdxError::BadChecksum {
            what: "region table",
            stored,
            computed,
        });
    }
    let count = le32(b, 8);
    if count > MAX_REGION_ENTRIES {
        return Err(VhdxError::Invalid(format!(
            "region table has {count} entries (max {MAX_REGION_ENTRIES})"
        )));
    }
    Ok((0..count as usize)
        .map(|i| {
            let at = 16 + i * 32;
            RegionEntry {
                guid: guid_at(b, at),
                offset: le64(b, at + 16),
                length: le32(b, at + 24),
                required: le32(b, at + 28) & 1 != 0,
            }
        })
        .collect())
}

pub fn encode_region_table(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    put32(&mut b, 0, REGION_SIGNATURE);
    put32(&mut b, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = 16 + i * 32;
        b[at..at + 16].copy_from_slice(&e.guid.0);
        put64(&mut b, at + 16, e.offset);
        put32(&mut b, at + 24, e.length);
        put32(&mut b, at + 28, u32::from(e.required));
    }
    let crc = crc32c(&b);
    put32(&mut b, 4, crc);
    b
}

/// The 64 KiB file type identifier at offset 0.
pub fn encode_file_identifier() -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    let creator = utf16le("tandem-disk");
    b[8..8 + creator.len()].copy_from_slice(&creator);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            sequence: 7,
            file_write_guid: Guid([1; 16]),
            data_write_guid: Guid([2; 16]),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MB as u32,
            log_offset: MB,
        }
    }

    #[test]
    fn header_round_trip_and_checksum() {
        let h = sample();
        let mut b = h.encode();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        assert!(matches!(
            Header::parse(&b),
            Err(VhdxError::BadChecksum { what: "header", .. })
        ));
        b[0] = b'x';
        assert!(matches!(
            Header::parse(&b),
            Err(VhdxError::BadSignature { what: "header" })
        ));
    }

    #[test]
    fn current_header_prefers_higher_valid_sequence() {
        let a = sample();
        let mut b = sample();
        b.sequence = 9;
        let (ea, eb) = (a.encode(), b.encode());
        assert_eq!(current_header([&ea, &eb]).unwrap().1, 1);
        let mut broken = eb.clone();
        broken[200] ^= 0xff;
        assert_eq!(current_header([&ea, &broken]).unwrap().1, 0);
        assert!(matches!(
            current_header([&broken, &broken]),
            Err(VhdxError::NoValidHeader { .. })
        ));
    }

    #[test]
    fn region_table_round_trip() {
        let e = vec![
            RegionEntry {
                guid: BAT_REGION,
                offset: 3 * MB,
                length: MB as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                offset: 2 * MB,
                length: MB as u32,
                required: true,
            },
        ];
        let mut b = encode_region_table(&e);
        assert_eq!(parse_region_table(&b).unwrap(), e);
        b[40] ^= 1;
        assert!(matches!(
            parse_region_table(&b),
            Err(VhdxError::BadChecksum { .. })
        ));
    }
}
