//! An in-memory [`BlockDevice`] for tests and fuzzing.

use std::sync::Mutex;

use tandem_disk::{BlockDevice, DiskError};

pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    writable: bool,
    flushes: Mutex<u64>,
}

impl MemDisk {
    pub fn new(size: usize) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0; size]),
            writable: true,
            flushes: Mutex::new(0),
        }
    }

    pub fn read_only(size: usize) -> MemDisk {
        MemDisk {
            writable: false,
            ..MemDisk::new(size)
        }
    }

    pub fn flushes(&self) -> u64 {
        *self.flushes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: usize, size: usize) -> tandem_disk::Result<usize> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(e) if e <= size as u64 => Ok(offset as usize),
            _ => Err(DiskError::OutOfBounds {
                offset,
                len: len as u64,
                size: size as u64,
            }),
        }
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_disk::Result<()> {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let o = self.check(offset, buf.len(), d.len())?;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_disk::Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let o = self.check(offset, buf.len(), d.len())?;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> tandem_disk::Result<()> {
        *self.flushes.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> tandem_disk::Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let o = self.check(offset, len as usize, d.len())?;
        d[o..o + len as usize].fill(0);
        Ok(())
    }
}
