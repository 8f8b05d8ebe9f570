//! What the device offers: virtio feature bits and the virtio-blk
//! configuration space (`struct virtio_blk_config`, little-endian), which
//! QEMU reads from the backend over `VHOST_USER_GET_CONFIG`. Pure.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use crate::request::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE, SEG_MAX};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the backend speaks protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// `VHOST_F_LOG_ALL`: the backend logs the guest pages it writes in the
/// log QEMU shares during live migration (see `device::GuestMemoryMmap`).
/// Without it QEMU blocks migration of the VM.
pub const VHOST_F_LOG_ALL: u32 = 26;
/// Bytes of configuration space we answer for (up to and including the
/// write-zeroes fields; later fields read as zero).
pub const CONFIG_LEN: usize = 60;

/// The disk as the device presents it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size the guest should use (512 or 4096).
    pub blk_size: u32,
    pub readonly: bool,
    /// Offer DISCARD and WRITE_ZEROES (the disk layer can make ranges read as zeros).
    pub discard: bool,
}

/// The virtio feature bits the device offers.
pub fn features(g: &Geometry) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        | 1 << VHOST_F_LOG_ALL
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH;
    if g.readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else if g.discard {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// `struct virtio_blk_config`, first [`CONFIG_LEN`] bytes.
pub fn config_space(g: &Geometry) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &g.sectors.to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &g.blk_size.to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    let align = (u64::from(g.blk_size) / SECTOR_SIZE).max(1) as u32;
    if g.discard && !g.readonly {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &align.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
    }
    c
}

/// The bytes QEMU asks for: `[offset, offset + size)` of the configuration
/// space, zero past what we define; empty if the request is absurd.
pub fn config_slice(g: &Geometry, offset: u32, size: u32) -> Vec<u8> {
    const LIMIT: u32 = 256;
    let Some(end) = offset.checked_add(size).filter(|&e| e <= LIMIT) else {
        return Vec::new();
    };
    let space = config_space(g);
    (offset..end)
        .map(|i| space.get(i as usize).copied().unwrap_or(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(readonly: bool) -> Geometry {
        Geometry {
            sectors: 0x1_0000_0001,
            blk_size: 4096,
            readonly,
            discard: true,
        }
    }

    #[test]
    fn layout_matches_virtio_blk_config() {
        use virtio_bindings::bindings::virtio_blk::virtio_blk_config;
        let c = config_space(&geo(false));
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            0x1_0000_0001
        );
        assert_eq!(std::mem::offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(std::mem::offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(std::mem::offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_discard_sectors),
            36
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            56
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let f = features(&geo(true));
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(config_space(&geo(true))[36..60], [0u8; 24]);
        let f = features(&geo(false));
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    }

    #[test]
    fn config_slices_are_bounded() {
        let g = geo(false);
        assert_eq!(config_slice(&g, 0, 8), 0x1_0000_0001u64.to_le_bytes());
        assert_eq!(config_slice(&g, 58, 10), vec![0; 10]);
        assert!(config_slice(&g, u32::MAX, 2).is_empty());
        assert!(config_slice(&g, 0, 100_000).is_empty());
    }
}
