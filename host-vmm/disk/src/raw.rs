//! Raw images: the file is the disk. No metadata, so no parent and nothing
//! to order on flush beyond `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{DiskError, IoContext, Result};
use crate::layer::{Format, Layer, ParentRef, Status};
use crate::util::read_at_zero_tail;

pub struct RawLayer {
    path: PathBuf,
    file: File,
    size: u64,
    writable: bool,
}

impl RawLayer {
    pub fn open(path: &Path, writable: bool) -> Result<RawLayer> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .ctx(path, "open")?;
        let size = file.metadata().ctx(path, "stat")?.len();
        Ok(RawLayer {
            path: path.to_path_buf(),
            file,
            size,
            writable,
        })
    }

    /// Creates a sparse raw file of `size` bytes (refuses to overwrite).
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .ctx(path, "create")?;
        file.set_len(size).ctx(path, "set length")?;
        file.sync_all().ctx(path, "fsync")?;
        Ok(())
    }
}

impl Layer for RawLayer {
    fn path(&self) -> &Path {
        &self.path
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn granularity(&self) -> u64 {
        512
    }
    fn status(&self, offset: u64, len: u64) -> Result<(Status, u64)> {
        Ok((
            Status::Data,
            len.min(self.size.saturating_sub(offset)).max(1),
        ))
    }
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_at_zero_tail(&self.file, buf, offset).ctx(&self.path, "read")
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.file.write_all_at(buf, offset).ctx(&self.path, "write")
    }
    fn flush(&self) -> Result<()> {
        if self.writable {
            self.file.sync_data().ctx(&self.path, "fdatasync")?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Writing zeros keeps this portable; hole punching is an optimisation
        // a later change can add behind the same contract.
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.file.metadata().ctx(&self.path, "stat")?.blocks() * 512)
    }
    fn parent(&self) -> Option<ParentRef> {
        None
    }
}
