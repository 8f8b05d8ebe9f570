//! The block allocation table (MS-VHDX 2.5): entry states, and where payload
//! and sector bitmap entries sit (a bitmap entry follows every
//! `chunk_ratio` payload entries).

use super::header::MB;
use super::VhdxError;

pub const PAYLOAD_NOT_PRESENT: u8 = 0;
pub const PAYLOAD_UNDEFINED: u8 = 1;
pub const PAYLOAD_ZERO: u8 = 2;
pub const PAYLOAD_UNMAPPED: u8 = 3;
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
pub const SB_NOT_PRESENT: u8 = 0;
pub const SB_PRESENT: u8 = 6;

/// Sector bitmap blocks are always 1 MiB.
pub const SECTOR_BITMAP_BLOCK: u64 = MB;
/// 2^23 sectors per chunk (MS-VHDX 2.5: chunk ratio).
const SECTORS_PER_CHUNK: u64 = 1 << 23;
/// The largest virtual disk the specification allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

pub fn state(entry: u64) -> u8 {
    (entry & 7) as u8
}

/// File offset of the block an entry points at (FileOffsetMB * 1 MiB).
pub fn offset(entry: u64) -> u64 {
    entry & !(MB - 1)
}

pub fn entry(state: u8, file_offset: u64) -> u64 {
    (file_offset & !(MB - 1)) | u64::from(state)
}

/// Shape of the BAT, from the metadata parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub virtual_size: u64,
    pub has_parent: bool,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub total_entries: u64,
}

impl Geometry {
    pub fn new(
        block_size: u64,
        logical_sector: u64,
        virtual_size: u64,
        has_parent: bool,
    ) -> Result<Geometry, VhdxError> {
        if !block_size.is_power_of_two() || !(MB..=256 * MB).contains(&block_size) {
            return Err(VhdxError::Invalid(format!(
                "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
            )));
        }
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(VhdxError::Invalid(format!(
                "logical sector size {logical_sector} is neither 512 nor 4096"
            )));
        }
        if virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(logical_sector) {
            return Err(VhdxError::Invalid(format!(
                "virtual size {virtual_size} is over 64 TiB or not a multiple of the {logical_sector}-byte sector"
            )));
        }
        let chunk_ratio = SECTORS_PER_CHUNK * logical_sector / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let total_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Ok(Geometry {
            block_size,
            logical_sector,
            virtual_size,
            has_parent,
            chunk_ratio,
            data_blocks,
            total_entries,
        })
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block for `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    pub fn is_bitmap_index(&self, index: u64) -> bool {
        (index + 1).is_multiple_of(self.chunk_ratio + 1)
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }

    /// Bytes the BAT needs, rounded up to 1 MiB (regions are MiB-aligned).
    pub fn bat_bytes(&self) -> u64 {
        (self.total_entries * 8).div_ceil(MB).max(1) * MB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_layout_matches_the_specification() {
        // 32 MiB blocks, 512-byte sectors: 128 payload entries per chunk.
        let g = Geometry::new(32 * MB, 512, 10 << 30, false).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 320);
        assert_eq!(g.total_entries, 320 + 319 / 128);
        assert_eq!(g.payload_index(128), 129);
        assert!(g.is_bitmap_index(128));
        let d = Geometry::new(2 * MB, 512, 10 << 30, true).unwrap();
        assert_eq!(d.chunk_ratio, 2048);
        assert_eq!(d.data_blocks, 5120);
        assert_eq!(d.total_entries, 3 * 2049);
        assert_eq!(d.bitmap_index(0), 2048);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Geometry::new(3 * MB, 512, MB, false).is_err());
        assert!(Geometry::new(MB, 1024, MB, false).is_err());
        assert!(Geometry::new(MB, 512, 1000, false).is_err());
        assert!(Geometry::new(MB, 512, MAX_VIRTUAL_SIZE + 512, false).is_err());
    }

    #[test]
    fn entry_encoding() {
        let e = entry(PAYLOAD_FULLY_PRESENT, 5 * MB);
        assert_eq!(state(e), PAYLOAD_FULLY_PRESENT);
        assert_eq!(offset(e), 5 * MB);
    }
}
