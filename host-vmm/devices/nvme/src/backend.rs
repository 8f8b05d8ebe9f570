//! What a namespace stores its blocks in: a raw file, read and written in
//! place, any other image the disk layer opens (qcow2, VHDX, differencing
//! chains), or a volume another process owns and lends on a volume socket
//! (`tandem-volume`: the vhost-user-blk backend of a VM's disk, so that the
//! VF is a second path to that disk). The trait is the controller's narrow
//! view (no discard, no layers); `open` picks the backend by what `path`
//! is.

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
    /// For a lent volume, its client's handoff counters (requests moved
    /// from one lender connection to the next).
    fn handoff(&self) -> Option<tandem_volume::HandoffStats> {
        None
    }
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
    #[error(transparent)]
    Volume(#[from] tandem_volume::ClientError),
}

/// Opens `path` by what it is: a volume socket as [`Lent`], a raw file as
/// [`RawFile`], anything else through the disk layer ([`DiskChain`]),
/// writable.
pub fn open(path: &Path) -> Result<std::sync::Arc<dyn BlockBackend>, OpenError> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let volume = tandem_volume::RemoteVolume::connect(path)?;
        let size = volume.geometry().size;
        if size == 0 {
            return Err(OpenError::Size {
                path: path.display().to_string(),
                size,
            });
        }
        return Ok(std::sync::Arc::new(Lent(volume)));
    }
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

/// A volume another process owns (the vhost-user-blk backend of a VM's
/// disk), reached through its volume socket: every block goes through
/// that process's chain, so both paths are the same writes.
pub struct Lent(tandem_volume::RemoteVolume);

impl BlockBackend for Lent {
    fn size(&self) -> u64 {
        self.0.geometry().size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn describe(&self) -> String {
        format!("volume:{}", self.0.path().display())
    }
    fn handoff(&self) -> Option<tandem_volume::HandoffStats> {
        Some(self.0.handoff_stats())
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

    /// A namespace on a volume socket reads and writes the lender's blocks.
    #[test]
    fn a_namespace_on_a_volume_socket_is_the_lenders_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("disk0.volume");
        let lender = std::sync::Arc::new(tandem_volume::server::Memory::new(1 << 20, false));
        tandem_volume::listen(&sock, lender.clone()).unwrap();
        let ns = open(&sock).unwrap();
        assert_eq!(ns.size(), 1 << 20);
        assert!(ns.describe().starts_with("volume:"), "{}", ns.describe());
        ns.write_at(&[0x42; 4096], 8192).unwrap();
        ns.flush().unwrap();
        assert_eq!(lender.data.lock().unwrap()[8192], 0x42);
        // A socket nobody serves is refused by name.
        drop(ns);
        let stale = dir.path().join("stale.volume");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let e = open(&stale).err().unwrap();
        assert!(format!("{e}").contains("stale.volume"), "{e}");
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
