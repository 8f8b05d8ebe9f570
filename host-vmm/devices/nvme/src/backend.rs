//! What a namespace stores its blocks in.
//!
//! A small trait so that the disk layer (qcow2, VHDX, chains) can stand
//! behind a namespace later; for now a raw file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub trait BlockBackend: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> io::Result<()>;
    /// A name for logs and the API.
    fn describe(&self) -> String;
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open disk {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("disk {path} is {size} bytes, not a whole number of 512-byte blocks (or empty)")]
    Size { path: String, size: u64 },
}

impl RawFile {
    pub fn open(path: &Path) -> Result<RawFile, OpenError> {
        let err = |source| OpenError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        if size == 0 || size % 512 != 0 {
            return Err(OpenError::Size {
                path: path.display().to_string(),
                size,
            });
        }
        Ok(RawFile {
            file,
            size,
            path: path.to_path_buf(),
        })
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn describe(&self) -> String {
        format!("raw:{}", self.path.display())
    }
}
