//! Physical Region Page lists (section 4.3): where a command's data lives
//! in guest memory.
//!
//! The walk reads list pages from guest memory, so every entry is checked:
//! offsets where the specification requires page alignment, the number of
//! entries bounded by the transfer length, and every read through the DMA
//! mappings (an unmapped list is a data transfer error, not a host access).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::spec::status;

/// Memory page size (CC.MPS = 0).
pub const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    #[error("PRP entry {0:#x} has an offset where none is allowed")]
    Offset(u64),
    #[error("PRP list at {0:#x} is not in memory mapped for the device")]
    Unmapped(u64),
    #[error("transfer of {0} bytes is larger than allowed")]
    TooLong(usize),
}

impl PrpError {
    /// The NVMe status the command completes with.
    pub fn status(&self) -> u16 {
        match self {
            PrpError::Offset(_) => status::INVALID_PRP_OFFSET,
            PrpError::Unmapped(_) => status::DATA_TRANSFER_ERROR,
            PrpError::TooLong(_) => status::INVALID_FIELD,
        }
    }
}

/// The guest memory segments `(address, length)` of a `len`-byte transfer
/// described by `prp1` and `prp2`; at most `max_len` bytes.
pub fn segments<M: GuestMemory>(
    mem: &M,
    prp1: u64,
    prp2: u64,
    len: usize,
    max_len: usize,
) -> Result<Vec<(u64, usize)>, PrpError> {
    if len > max_len {
        return Err(PrpError::TooLong(len));
    }
    if prp1 & 3 != 0 {
        return Err(PrpError::Offset(prp1));
    }
    let first = usize::try_from(PAGE - (prp1 % PAGE))
        .unwrap_or(usize::MAX)
        .min(len);
    let mut out = vec![(prp1, first)];
    let mut left = len - first;
    if left == 0 {
        return Ok(out);
    }
    let page = PAGE as usize;
    if left <= page {
        if !prp2.is_multiple_of(PAGE) {
            return Err(PrpError::Offset(prp2));
        }
        out.push((prp2, left));
        return Ok(out);
    }
    // prp2 points at a PRP list; its last entry chains to the next list page
    // when more entries are needed than a page holds.
    if prp2 & 7 != 0 {
        return Err(PrpError::Offset(prp2));
    }
    let mut list = prp2;
    let mut slots = (PAGE - (prp2 % PAGE)) / 8;
    while left > 0 {
        let entry: u64 = mem
            .read_obj(GuestAddress(list))
            .map_err(|_| PrpError::Unmapped(list))?;
        if slots == 1 && left > page {
            if entry & 7 != 0 {
                return Err(PrpError::Offset(entry));
            }
            list = entry;
            slots = (PAGE - (entry % PAGE)) / 8;
            continue;
        }
        if !entry.is_multiple_of(PAGE) {
            return Err(PrpError::Offset(entry));
        }
        let n = left.min(page);
        out.push((entry, n));
        left -= n;
        list = list.checked_add(8).ok_or(PrpError::Unmapped(list))?;
        slots -= 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn one_and_two_pages() {
        let m = mem();
        assert_eq!(
            segments(&m, 0x1000, 0, 4096, 1 << 17),
            Ok(vec![(0x1000, 4096)])
        );
        assert_eq!(
            segments(&m, 0x1800, 0x5000, 4096, 1 << 17),
            Ok(vec![(0x1800, 2048), (0x5000, 2048)])
        );
        assert_eq!(
            segments(&m, 0x1000, 0x5008, 8192, 1 << 17),
            Err(PrpError::Offset(0x5008))
        );
        assert_eq!(
            segments(&m, 0x1002, 0, 8, 1 << 17),
            Err(PrpError::Offset(0x1002))
        );
    }

    #[test]
    fn lists_chain_across_pages() {
        let m = mem();
        // A list page at 0x10000 whose last slot chains to 0x20000.
        for i in 0..511u64 {
            m.write_obj(0x40000 + i * 0x1000, GuestAddress(0x10000 + i * 8))
                .unwrap();
        }
        m.write_obj(0x20000u64, GuestAddress(0x10000 + 511 * 8))
            .unwrap();
        m.write_obj(0x90000u64, GuestAddress(0x20000)).unwrap();
        m.write_obj(0x91000u64, GuestAddress(0x20008)).unwrap();
        // Exactly 512 list entries fit one list page: no chaining.
        let s = segments(&m, 0x3000, 0x10000, 4096 * 513, usize::MAX).unwrap();
        assert_eq!(s[512], (0x20000, 4096));
        let len = 4096 * 514;
        let s = segments(&m, 0x3000, 0x10000, len, usize::MAX).unwrap();
        assert_eq!(s.len(), 514);
        assert_eq!(s[1], (0x40000, 4096));
        assert_eq!(s[511], (0x40000 + 510 * 0x1000, 4096));
        assert_eq!(s[512], (0x90000, 4096));
        assert_eq!(s[513], (0x91000, 4096));
        assert_eq!(
            segments(&m, 0x3000, 0x200000, 3 * 4096, usize::MAX),
            Err(PrpError::Unmapped(0x200000))
        );
        assert_eq!(
            segments(&m, 0, 0, 1 << 20, 1 << 17),
            Err(PrpError::TooLong(1 << 20))
        );
    }
}
