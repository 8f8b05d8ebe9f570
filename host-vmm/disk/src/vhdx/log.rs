//! The VHDX metadata log (MS-VHDX 2.3): entry encoding, and finding and
//! replaying the active sequence on open.
//!
//! Tandem writes exactly one entry per transaction, always at the start of
//! the log with its tail pointing at itself, and only after the previous
//! transaction has been applied in place and synced. So at most one entry of
//! the current log GUID is ever live: a torn entry fails its checksum and the
//! previous transaction is already on disk; a complete one is replayed
//! (idempotently). Reading handles the general circular log qemu and Hyper-V
//! write.

use std::collections::HashMap;

use super::VhdxError;
use crate::util::{crc32c, crc32c_with_zeroed_field, guid_at, le32, le64, put32, put64, Guid};

pub const ENTRY_SIGNATURE: u32 = 0x6567_6F6C; // "loge"
pub const DATA_DESCRIPTOR: u32 = 0x6373_6564; // "desc"
pub const ZERO_DESCRIPTOR: u32 = 0x6F72_657A; // "zero"
pub const DATA_SECTOR: u32 = 0x6174_6164; // "data"
pub const SECTOR: usize = 4096;
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;
/// The log may not be larger than this (the specification allows up to 4 GiB; real logs are 1 MiB).
pub const MAX_LOG_LENGTH: u64 = 256 << 20;

/// One change an entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write this 4 KiB sector at `offset`.
    Data { offset: u64, sector: Vec<u8> },
    /// Zero `length` bytes at `offset`.
    Zero { offset: u64, length: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub sequence: u64,
    pub tail: u32,
    pub length: u32,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<Op>,
}

fn header_area(descriptors: usize) -> usize {
    (ENTRY_HEADER + descriptors * DESCRIPTOR).div_ceil(SECTOR) * SECTOR
}

/// How many data sectors fit in one entry in a log of `log_length` bytes.
pub fn max_sectors_per_entry(log_length: u64) -> usize {
    let mut n = (log_length as usize / SECTOR).saturating_sub(1);
    while n > 0 && header_area(n) + n * SECTOR > log_length as usize {
        n -= 1;
    }
    n
}

/// Encodes an entry writing `sectors` (offset, 4 KiB data) with the tail at `tail`.
pub fn encode(
    sequence: u64,
    tail: u32,
    log_guid: Guid,
    flushed: u64,
    last: u64,
    sectors: &[(u64, &[u8])],
) -> Vec<u8> {
    let ha = header_area(sectors.len());
    let length = ha + sectors.len() * SECTOR;
    let mut b = vec![0u8; length];
    put32(&mut b, 0, ENTRY_SIGNATURE);
    put32(&mut b, 8, length as u32);
    put32(&mut b, 12, tail);
    put64(&mut b, 16, sequence);
    put32(&mut b, 24, sectors.len() as u32);
    b[32..48].copy_from_slice(&log_guid.0);
    put64(&mut b, 48, flushed);
    put64(&mut b, 56, last);
    for (i, (offset, data)) in sectors.iter().enumerate() {
        let d = ENTRY_HEADER + i * DESCRIPTOR;
        put32(&mut b, d, DATA_DESCRIPTOR);
        b[d + 4..d + 8].copy_from_slice(&data[SECTOR - 4..SECTOR]);
        b[d + 8..d + 16].copy_from_slice(&data[..8]);
        put64(&mut b, d + 16, *offset);
        put64(&mut b, d + 24, sequence);
        let s = ha + i * SECTOR;
        put32(&mut b, s, DATA_SECTOR);
        put32(&mut b, s + 4, (sequence >> 32) as u32);
        b[s + 8..s + SECTOR - 4].copy_from_slice(&data[8..SECTOR - 4]);
        put32(&mut b, s + SECTOR - 4, sequence as u32);
    }
    let crc = crc32c(&b);
    put32(&mut b, 4, crc);
    b
}

/// Copies `len` bytes of the circular log starting at `pos`.
fn circular(log: &[u8], pos: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut p = pos;
    while out.len() < len {
        let n = (len - out.len()).min(log.len() - p);
        out.extend_from_slice(&log[p..p + n]);
        p = (p + n) % log.len();
    }
    out
}

/// Parses the entry at `pos` if it is a valid entry of `guid`; `None` if not.
pub fn parse_at(log: &[u8], pos: usize, guid: Guid) -> Option<Entry> {
    let head = circular(log, pos, SECTOR);
    if le32(&head, 0) != ENTRY_SIGNATURE || guid_at(&head, 32) != guid {
        return None;
    }
    let length = le32(&head, 8) as usize;
    if length == 0 || !length.is_multiple_of(SECTOR) || length > log.len() {
        return None;
    }
    let b = circular(log, pos, length);
    if le32(&b, 4) != crc32c_with_zeroed_field(&b, 4) {
        return None;
    }
    let sequence = le64(&b, 16);
    let tail = le32(&b, 12);
    let count = le32(&b, 24) as usize;
    if !(tail as usize).is_multiple_of(SECTOR)
        || tail as usize >= log.len()
        || count > length / DESCRIPTOR
    {
        return None;
    }
    let ha = header_area(count);
    let mut ops = Vec::with_capacity(count);
    let mut data_index = 0usize;
    for i in 0..count {
        let d = ENTRY_HEADER + i * DESCRIPTOR;
        if d + DESCRIPTOR > length || le64(&b, d + 24) != sequence {
            return None;
        }
        let offset = le64(&b, d + 16);
        match le32(&b, d) {
            ZERO_DESCRIPTOR => {
                let len = le64(&b, d + 8);
                if !offset.is_multiple_of(SECTOR as u64) || !len.is_multiple_of(SECTOR as u64) {
                    return None;
                }
                ops.push(Op::Zero {
                    offset,
                    length: len,
                });
            }
            DATA_DESCRIPTOR => {
                let s = ha + data_index * SECTOR;
                data_index += 1;
                if !offset.is_multiple_of(SECTOR as u64)
                    || s + SECTOR > length
                    || le32(&b, s) != DATA_SECTOR
                    || le32(&b, s + 4) != (sequence >> 32) as u32
                    || le32(&b, s + SECTOR - 4) != sequence as u32
                {
                    return None;
                }
                let mut sector = vec![0u8; SECTOR];
                sector[..8].copy_from_slice(&b[d + 8..d + 16]);
                sector[8..SECTOR - 4].copy_from_slice(&b[s + 8..s + SECTOR - 4]);
                sector[SECTOR - 4..].copy_from_slice(&b[d + 4..d + 8]);
                ops.push(Op::Data { offset, sector });
            }
            _ => return None,
        }
    }
    Some(Entry {
        sequence,
        tail,
        length: length as u32,
        flushed_file_offset: le64(&b, 48),
        last_file_offset: le64(&b, 56),
        ops,
    })
}

/// Finds the active sequence of a log whose header names `guid`: the entries
/// from the newest valid entry's tail up to that entry, in order. Empty if
/// the log holds no valid entry of that GUID.
pub fn active_sequence(log: &[u8], guid: Guid) -> Result<Vec<Entry>, VhdxError> {
    if log.is_empty() || !log.len().is_multiple_of(SECTOR) {
        return Err(VhdxError::LogReplay(format!(
            "log length {} is not a multiple of 4 KiB",
            log.len()
        )));
    }
    let mut valid: HashMap<usize, Entry> = HashMap::new();
    for pos in (0..log.len()).step_by(SECTOR) {
        if let Some(e) = parse_at(log, pos, guid) {
            valid.insert(pos, e);
        }
    }
    let Some((&head_pos, head)) = valid.iter().max_by_key(|(_, e)| e.sequence) else {
        return Ok(Vec::new());
    };
    let mut seq = Vec::new();
    let mut pos = head.tail as usize;
    loop {
        let Some(e) = valid.get(&pos) else {
            return Err(VhdxError::LogReplay(format!(
                "the newest entry (sequence {}) has its tail at {pos:#x}, where no valid entry is",
                head.sequence
            )));
        };
        if let Some(prev) = seq.last().map(|p: &Entry| p.sequence) {
            if e.sequence != prev + 1 {
                return Err(VhdxError::LogReplay(format!(
                    "entry at {pos:#x} has sequence {} after {prev}",
                    e.sequence
                )));
            }
        }
        seq.push(e.clone());
        if pos == head_pos {
            return Ok(seq);
        }
        if seq.len() > valid.len() {
            return Err(VhdxError::LogReplay(
                "the sequence from the tail never reaches the newest entry".into(),
            ));
        }
        pos = (pos + e.length as usize) % log.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(fill: u8) -> Vec<u8> {
        let mut s = vec![fill; SECTOR];
        s[0] = 0xA1;
        s[SECTOR - 1] = 0xB2;
        s
    }

    #[test]
    fn entry_round_trip() {
        let g = Guid([3; 16]);
        let (a, b) = (sector(1), sector(2));
        let e = encode(
            5,
            0,
            g,
            1 << 30,
            1 << 30,
            &[(3 << 20, &a), (3 << 20 | 4096, &b)],
        );
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let seq = active_sequence(&log, g).unwrap();
        assert_eq!(seq.len(), 1);
        assert_eq!(
            seq[0].ops,
            vec![
                Op::Data {
                    offset: 3 << 20,
                    sector: a
                },
                Op::Data {
                    offset: 3 << 20 | 4096,
                    sector: b
                }
            ]
        );
        // Another GUID sees an empty log.
        assert!(active_sequence(&log, Guid([4; 16])).unwrap().is_empty());
    }

    #[test]
    fn torn_entry_is_ignored_and_broken_tail_is_refused() {
        let g = Guid([3; 16]);
        let a = sector(1);
        let e = encode(5, 0, g, 0, 0, &[(1 << 20, &a)]);
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        log[5000] ^= 1;
        assert!(active_sequence(&log, g).unwrap().is_empty());
        // A valid entry whose tail points at garbage does not replay.
        let e = encode(6, 8192, g, 0, 0, &[(1 << 20, &a)]);
        log[..e.len()].copy_from_slice(&e);
        assert!(matches!(
            active_sequence(&log, g),
            Err(VhdxError::LogReplay(_))
        ));
    }

    #[test]
    fn multi_entry_sequence_in_order() {
        let g = Guid([7; 16]);
        let a = sector(1);
        let e1 = encode(10, 0, g, 0, 0, &[(1 << 20, &a)]);
        let e2 = encode(11, 0, g, 0, 0, &[(2 << 20, &a)]);
        let mut log = vec![0u8; 1 << 20];
        log[..e1.len()].copy_from_slice(&e1);
        log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        let seq = active_sequence(&log, g).unwrap();
        assert_eq!(
            seq.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![10, 11]
        );
    }

    #[test]
    fn capacity() {
        let n = max_sectors_per_entry(1 << 20);
        assert!(header_area(n) + n * SECTOR <= 1 << 20);
        assert!(n > 200);
    }
}
