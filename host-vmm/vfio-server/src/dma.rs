//! Guest memory mapped for a device's DMA.

use std::fs::File;
use std::sync::{Arc, RwLock};

use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// The guest memory a device may reach, as a `vm-memory` collection.
pub type Mem = GuestMemoryMmap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    #[error("DMA map of {size:#x} bytes at {address:#x}: {reason}")]
    Map {
        address: u64,
        size: u64,
        reason: String,
    },
    #[error("DMA unmap of {size:#x} bytes at {address:#x}: no such mapping")]
    Unmap { address: u64, size: u64 },
}

/// The regions QEMU mapped for the device, swapped atomically so that a
/// device holds a consistent snapshot while it works.
#[derive(Default)]
pub struct DmaSpace {
    regions: RwLock<Vec<Arc<GuestRegionMmap>>>,
    snapshot: RwLock<Option<Arc<Mem>>>,
    /// Ranges QEMU announced without a file descriptor (ROMs, firmware):
    /// known, so that their unmapping is not an error, but unreachable.
    opaque: RwLock<Vec<(u64, u64)>>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl DmaSpace {
    pub fn new() -> DmaSpace {
        DmaSpace::default()
    }

    /// The current mappings; `None` when nothing is mapped.
    pub fn memory(&self) -> Option<Arc<Mem>> {
        read(&self.snapshot).clone()
    }

    fn publish(&self, regions: &[Arc<GuestRegionMmap>]) -> Result<(), String> {
        let snap = if regions.is_empty() {
            None
        } else {
            Some(Arc::new(
                GuestMemoryMmap::from_arc_regions(regions.to_vec()).map_err(|e| e.to_string())?,
            ))
        };
        *write(&self.snapshot) = snap;
        Ok(())
    }

    /// Maps `size` bytes of `file` at `offset` as guest addresses
    /// `address..address + size`.
    pub fn map(&self, address: u64, size: u64, file: File, offset: u64) -> Result<(), DmaError> {
        let err = |reason: String| DmaError::Map {
            address,
            size,
            reason,
        };
        let len = usize::try_from(size).map_err(|_| err("too large".into()))?;
        if len == 0 || address.checked_add(size).is_none() {
            return Err(err("empty or wrapping range".into()));
        }
        let region = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| err(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(address))
            .ok_or_else(|| err("address range overflows".into()))?;
        let mut regions = write(&self.regions);
        let mut next = regions.clone();
        next.push(Arc::new(region));
        next.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(r.as_ref()));
        self.publish(&next).map_err(err)?;
        *regions = next;
        Ok(())
    }

    /// Records a range the device cannot reach (no file descriptor).
    pub fn map_opaque(&self, address: u64, size: u64) {
        write(&self.opaque).push((address, size));
    }

    pub fn unmap(&self, address: u64, size: u64) -> Result<(), DmaError> {
        {
            let mut opaque = write(&self.opaque);
            if let Some(i) = opaque.iter().position(|&r| r == (address, size)) {
                opaque.remove(i);
                return Ok(());
            }
        }
        let mut regions = write(&self.regions);
        let pos = regions
            .iter()
            .position(|r| {
                vm_memory::GuestMemoryRegion::start_addr(r.as_ref()) == GuestAddress(address)
                    && vm_memory::GuestMemoryRegion::len(r.as_ref()) == size
            })
            .ok_or(DmaError::Unmap { address, size })?;
        let mut next = regions.clone();
        next.remove(pos);
        self.publish(&next).map_err(|reason| DmaError::Map {
            address,
            size,
            reason,
        })?;
        *regions = next;
        Ok(())
    }

    /// Forgets every mapping (the client went away).
    pub fn clear(&self) {
        let mut regions = write(&self.regions);
        regions.clear();
        write(&self.opaque).clear();
        *write(&self.snapshot) = None;
    }

    /// Whether `len` bytes at `address` are all inside mapped memory.
    pub fn contains(&self, address: u64, len: usize) -> bool {
        self.memory().is_some_and(|m| {
            m.check_range(
                GuestAddress(address),
                len,
                vm_memory::Permissions::ReadWrite,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn memfile(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    #[test]
    fn map_access_unmap() {
        let d = DmaSpace::new();
        assert!(d.memory().is_none());
        d.map(0x10_0000, 0x2000, memfile(0x3000), 0x1000).unwrap();
        d.map(0x0, 0x1000, memfile(0x1000), 0).unwrap();
        assert!(d.contains(0x10_0000, 0x2000));
        assert!(!d.contains(0x10_1000, 0x1001), "runs past the end");
        assert!(!d.contains(0x5000, 1), "a hole");
        let m = d.memory().unwrap();
        m.write_obj(0xdead_beefu32, GuestAddress(0x10_0ffc))
            .unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x10_0ffc)).unwrap(),
            0xdead_beef
        );
        assert!(m.read_obj::<u32>(GuestAddress(0x5000)).is_err());
        assert_eq!(
            d.unmap(0x10_0000, 0x1000),
            Err(DmaError::Unmap {
                address: 0x10_0000,
                size: 0x1000
            })
        );
        d.unmap(0x10_0000, 0x2000).unwrap();
        assert!(!d.contains(0x10_0000, 1));
        d.unmap(0, 0x1000).unwrap();
        assert!(d.memory().is_none());
    }

    #[test]
    fn opaque_ranges_unmap_but_never_map() {
        let d = DmaSpace::new();
        d.map_opaque(0xc0000, 0x20000);
        assert!(!d.contains(0xc0000, 1));
        d.unmap(0xc0000, 0x20000).unwrap();
        assert!(d.unmap(0xc0000, 0x20000).is_err());
    }

    #[test]
    fn overlapping_maps_are_refused() {
        let d = DmaSpace::new();
        d.map(0x1000, 0x2000, memfile(0x2000), 0).unwrap();
        assert!(d.map(0x2000, 0x1000, memfile(0x1000), 0).is_err());
        assert!(d.map(u64::MAX - 10, 0x1000, memfile(0x1000), 0).is_err());
        assert!(
            d.contains(0x1000, 0x2000),
            "a refused map leaves the old state"
        );
    }
}
