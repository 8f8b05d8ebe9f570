//! The metadata region (MS-VHDX 2.6): the table of items, the system items
//! (file parameters, sizes, disk id) and the parent locator of differencing
//! disks.

use super::header::MB;
use super::VhdxError;
use crate::util::{from_utf16le, guid_at, le16, le32, le64, put16, put32, utf16le, Guid};

const SIGNATURE: &[u8; 8] = b"metadata";
const MAX_ENTRIES: usize = 2047;
const TABLE_SIZE: u64 = 64 * 1024;
const FLAG_VIRTUAL_DISK: u32 = 2;
const FLAG_REQUIRED: u32 = 4;

pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub const VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
pub const VHDX_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// The parsed system metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    pub block_size: u64,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub disk_id: Guid,
    pub logical_sector: u64,
    pub physical_sector: u64,
    /// Key/value pairs of the parent locator (differencing disks only).
    pub parent_locator: Vec<(String, String)>,
}

impl Params {
    pub fn locator(&self, key: &str) -> Option<&str> {
        self.parent_locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

struct Item {
    id: Guid,
    offset: u64,
    length: u64,
    flags: u32,
}

/// Parses and validates the metadata region (`region` is all of it).
pub fn parse(region: &[u8]) -> Result<Params, VhdxError> {
    if region.len() < TABLE_SIZE as usize || &region[..8] != SIGNATURE {
        return Err(VhdxError::BadSignature {
            what: "metadata table",
        });
    }
    let count = usize::from(le16(region, 10));
    if count > MAX_ENTRIES {
        return Err(VhdxError::Invalid(format!(
            "metadata table has {count} entries (max {MAX_ENTRIES})"
        )));
    }
    let mut items: Vec<Item> = (0..count)
        .map(|i| {
            let at = 32 + i * 32;
            Item {
                id: guid_at(region, at),
                offset: u64::from(le32(region, at + 16)),
                length: u64::from(le32(region, at + 20)),
                flags: le32(region, at + 24),
            }
        })
        .collect();
    for it in &items {
        if it.length == 0 {
            continue;
        }
        if it.offset < TABLE_SIZE || it.offset + it.length > region.len() as u64 {
            return Err(VhdxError::Invalid(format!(
                "metadata item {} at {:#x}+{:#x} lies outside the metadata region",
                it.id, it.offset, it.length
            )));
        }
    }
    items.sort_by_key(|it| it.offset);
    for w in items.windows(2) {
        if w[0].length != 0 && w[1].length != 0 && w[0].offset + w[0].length > w[1].offset {
            return Err(VhdxError::Overlap {
                first: format!("metadata item {}", w[0].id),
                second: format!("metadata item {}", w[1].id),
            });
        }
    }
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        VIRTUAL_DISK_ID,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    for (i, it) in items.iter().enumerate() {
        if items[..i].iter().any(|o| o.id == it.id) {
            return Err(VhdxError::Invalid(format!(
                "metadata item {} appears twice",
                it.id
            )));
        }
        if it.flags & FLAG_REQUIRED != 0 && !known.contains(&it.id) {
            return Err(VhdxError::Unsupported(format!(
                "required metadata item {}",
                it.id
            )));
        }
    }
    let get = |id: Guid, min_len: u64, name: &'static str| -> Result<&[u8], VhdxError> {
        let it = items
            .iter()
            .find(|it| it.id == id)
            .ok_or(VhdxError::MissingMetadata(name))?;
        if it.length < min_len {
            return Err(VhdxError::Invalid(format!(
                "metadata item {name} is {} bytes, needs {min_len}",
                it.length
            )));
        }
        Ok(&region[it.offset as usize..(it.offset + it.length) as usize])
    };
    let fp = get(FILE_PARAMETERS, 8, "file parameters")?;
    let flags = le32(fp, 4);
    let params_block = u64::from(le32(fp, 0));
    let logical = u64::from(le32(get(LOGICAL_SECTOR_SIZE, 4, "logical sector size")?, 0));
    let physical = u64::from(le32(
        get(PHYSICAL_SECTOR_SIZE, 4, "physical sector size")?,
        0,
    ));
    if physical != 512 && physical != 4096 {
        return Err(VhdxError::Invalid(format!(
            "physical sector size {physical} is neither 512 nor 4096"
        )));
    }
    let has_parent = flags & 2 != 0;
    let parent_locator = if has_parent {
        parse_locator(get(PARENT_LOCATOR, 20, "parent locator")?)?
    } else {
        Vec::new()
    };
    Ok(Params {
        block_size: params_block,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size: le64(get(VIRTUAL_DISK_SIZE, 8, "virtual disk size")?, 0),
        disk_id: guid_at(get(VIRTUAL_DISK_ID, 16, "virtual disk id")?, 0),
        logical_sector: logical,
        physical_sector: physical,
        parent_locator,
    })
}

fn parse_locator(b: &[u8]) -> Result<Vec<(String, String)>, VhdxError> {
    if guid_at(b, 0) != VHDX_LOCATOR_TYPE {
        return Err(VhdxError::Unsupported(format!(
            "parent locator type {}",
            guid_at(b, 0)
        )));
    }
    let count = usize::from(le16(b, 18));
    if 20 + count * 12 > b.len() {
        return Err(VhdxError::Invalid(format!(
            "parent locator claims {count} entries but is {} bytes",
            b.len()
        )));
    }
    let field = |off: u32, len: u16, what: &str| -> Result<String, VhdxError> {
        let (off, len) = (off as usize, usize::from(len));
        b.get(off..off + len).map(from_utf16le).ok_or_else(|| {
            VhdxError::Invalid(format!(
                "parent locator {what} at {off:#x}+{len:#x} is outside the item"
            ))
        })
    };
    (0..count)
        .map(|i| {
            let at = 20 + i * 12;
            Ok((
                field(le32(b, at), le16(b, at + 8), "key")?,
                field(le32(b, at + 4), le16(b, at + 10), "value")?,
            ))
        })
        .collect()
}

/// Builds a whole metadata region (1 MiB) for `p`.
pub fn encode(p: &Params) -> Vec<u8> {
    let mut region = vec![0u8; MB as usize];
    region[..8].copy_from_slice(SIGNATURE);
    let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
    let mut fp = vec![0u8; 8];
    put32(&mut fp, 0, p.block_size as u32);
    put32(
        &mut fp,
        4,
        u32::from(p.leave_blocks_allocated) | (u32::from(p.has_parent) << 1),
    );
    items.push((FILE_PARAMETERS, fp, FLAG_REQUIRED));
    items.push((
        VIRTUAL_DISK_SIZE,
        p.virtual_size.to_le_bytes().to_vec(),
        FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
    ));
    items.push((
        VIRTUAL_DISK_ID,
        p.disk_id.0.to_vec(),
        FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
    ));
    items.push((
        LOGICAL_SECTOR_SIZE,
        (p.logical_sector as u32).to_le_bytes().to_vec(),
        FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
    ));
    items.push((
        PHYSICAL_SECTOR_SIZE,
        (p.physical_sector as u32).to_le_bytes().to_vec(),
        FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
    ));
    if p.has_parent {
        items.push((
            PARENT_LOCATOR,
            encode_locator(&p.parent_locator),
            FLAG_REQUIRED,
        ));
    }
    put16(&mut region, 10, items.len() as u16);
    let mut next = TABLE_SIZE as usize;
    for (i, (id, data, flags)) in items.iter().enumerate() {
        let at = 32 + i * 32;
        region[at..at + 16].copy_from_slice(&id.0);
        put32(&mut region, at + 16, next as u32);
        put32(&mut region, at + 20, data.len() as u32);
        put32(&mut region, at + 24, *flags);
        region[next..next + data.len()].copy_from_slice(data);
        next = (next + data.len()).div_ceil(4096) * 4096;
    }
    region
}

fn encode_locator(kv: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + kv.len() * 12];
    b[..16].copy_from_slice(&VHDX_LOCATOR_TYPE.0);
    put16(&mut b, 18, kv.len() as u16);
    for (i, (k, v)) in kv.iter().enumerate() {
        let (k, v) = (utf16le(k), utf16le(v));
        let at = 20 + i * 12;
        let ko = b.len();
        b.extend_from_slice(&k);
        let vo = b.len();
        b.extend_from_slice(&v);
        put32(&mut b, at, ko as u32);
        put32(&mut b, at + 4, vo as u32);
        put16(&mut b, at + 8, k.len() as u16);
        put16(&mut b, at + 10, v.len() as u16);
    }
    b
}

// Offsets are little helpers for tests that corrupt a region on purpose.
#[cfg(test)]
pub(crate) fn entry_offset_field(index: usize) -> usize {
    32 + index * 32 + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(parent: bool) -> Params {
        Params {
            block_size: 2 * MB,
            leave_blocks_allocated: false,
            has_parent: parent,
            virtual_size: 64 * MB,
            disk_id: Guid([9; 16]),
            logical_sector: 512,
            physical_sector: 4096,
            parent_locator: if parent {
                vec![
                    (
                        "parent_linkage".into(),
                        "{01020304-0506-0708-090a-0b0c0d0e0f10}".into(),
                    ),
                    ("relative_path".into(), ".\\base.vhdx".into()),
                ]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn round_trip_with_and_without_parent() {
        for parent in [false, true] {
            let p = params(parent);
            assert_eq!(parse(&encode(&p)).unwrap(), p);
        }
        assert_eq!(params(true).locator("relative_path"), Some(".\\base.vhdx"));
    }

    #[test]
    fn overlapping_items_are_refused() {
        let mut r = encode(&params(false));
        // Point item 1 at item 0's offset.
        let first = le32(&r, entry_offset_field(0));
        put32(&mut r, entry_offset_field(1), first);
        assert!(matches!(parse(&r), Err(VhdxError::Overlap { .. })));
    }

    #[test]
    fn items_outside_the_region_are_refused() {
        let mut r = encode(&params(false));
        put32(&mut r, entry_offset_field(2), (MB - 4) as u32);
        assert!(matches!(parse(&r), Err(VhdxError::Invalid(_))));
    }
}
