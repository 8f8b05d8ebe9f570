//! What a namespace stores its blocks in: a raw file, read and written in
//! place, or any other image the disk layer opens (qcow2, VHDX,
//! differencing chains). The trait is the controller's narrow view (no
//! discard, no layers); `open` picks the backend by the file's format.

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
    #[error("cannot open disk {path}")]
    Disk {
        path: String,
        #[source]
        source: tandem_disk::DiskError,
    },
}

/// Opens `path` by its format: a raw file as [`RawFile`], anything else
/// through the disk layer ([`DiskChain`]), writable.
pub fn open(path: &Path) -> Result<std::sync::Arc<dyn BlockBackend>, OpenError> {
    let disk_err = |source| OpenError::Disk {
        path: path.display().to_string(),
        source,
    };
    match tandem_disk::probe(path).map_err(disk_err)? {
        tandem_disk::Format::Raw => Ok(std::sync::Arc::new(RawFile::open(path)?)),
        format => {
            let chain = tandem_disk::Chain::open(
                path,
                tandem_disk::ChainOptions {
                    writable: true,
                    format: Some(format),
                    ..Default::default()
                },
            )
            .map_err(disk_err)?;
            let size = tandem_disk::BlockDevice::size(&chain);
            if size == 0 || size % 512 != 0 {
                return Err(OpenError::Size {
                    path: path.display().to_string(),
                    size,
                });
            }
            Ok(std::sync::Arc::new(DiskChain {
                chain,
                format,
                path: path.to_path_buf(),
            }))
        }
    }
}

/// An image of the disk layer (qcow2, VHDX, a differencing chain): the
/// same code that serves the image to virtio-blk (`tandem-vhost-blk`).
/// Only this process may have it open for writing: the layer keeps
/// metadata in memory.
pub struct DiskChain {
    chain: tandem_disk::Chain,
    format: tandem_disk::Format,
    path: PathBuf,
}

fn io_err(e: tandem_disk::DiskError) -> io::Error {
    io::Error::other(e)
}

impl BlockBackend for DiskChain {
    fn size(&self) -> u64 {
        tandem_disk::BlockDevice::size(&self.chain)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        tandem_disk::BlockDevice::read_at(&self.chain, buf, offset).map_err(io_err)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        tandem_disk::BlockDevice::write_at(&self.chain, buf, offset).map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        tandem_disk::BlockDevice::flush(&self.chain).map_err(io_err)
    }
    fn describe(&self) -> String {
        format!("{}:{}", self.format.name(), self.path.display())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_disk::Format;

    #[test]
    fn a_namespace_opens_raw_and_layered_images_by_their_format() {
        let dir = tempfile::tempdir().unwrap();
        for (name, format) in [
            ("a.raw", Format::Raw),
            ("a.qcow2", Format::Qcow2),
            ("a.vhdx", Format::Vhdx),
        ] {
            let path = dir.path().join(name);
            tandem_disk::ops::create(&path, format, Some(4 << 20), None).unwrap();
            let ns = open(&path).unwrap();
            assert_eq!(ns.size(), 4 << 20, "{name}");
            assert!(ns.describe().ends_with(name), "{}", ns.describe());
            let data = vec![0x5au8; 4096];
            ns.write_at(&data, 1 << 20).unwrap();
            ns.flush().unwrap();
            drop(ns);
            let ns = open(&path).unwrap();
            let mut back = vec![0u8; 4096];
            ns.read_at(&mut back, 1 << 20).unwrap();
            assert_eq!(back, data, "{name} after reopening");
        }
    }

    #[test]
    fn a_missing_or_empty_disk_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.qcow2");
        let e = open(&missing).err().unwrap().to_string();
        assert!(e.contains("nope.qcow2"), "{e}");
        let empty = dir.path().join("empty.raw");
        std::fs::File::create(&empty).unwrap();
        let e = open(&empty).err().unwrap().to_string();
        assert!(e.contains("empty.raw"), "{e}");
    }
}
