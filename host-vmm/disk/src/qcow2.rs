//! qcow2 through `imago` (a maintained qcow2 implementation that keeps
//! refcounts correct). Each qcow2 file is opened without its backing file:
//! the chain opens parents itself (any format, with loop and identity
//! checks) and does copy-on-write of partial clusters, so imago only ever
//! sees whole-cluster writes to unallocated clusters.
//!
//! Flush is `sync` (data durable), then imago's `flush` (L1/L2/refcount
//! tables written), then `sync` again: a flushed write's data is on disk
//! before any table that points at it. imago may write tables earlier when
//! its cache evicts; that can only expose a write that was never flushed.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, ShallowMapping,
    Storage, StorageCreateOptions, StorageOpenOptions,
};

use crate::error::{DiskError, IoContext, Result};
use crate::layer::{Format, Layer, ParentRef, Status};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header extension that names the backing file's format.
const BACKING_FORMAT_EXT: u32 = 0xe279_2aca;
/// Writes within one page are never torn by a killed process.
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("cannot open")]
    Open(#[source] std::io::Error),
    #[error("I/O at {offset:#x}+{len:#x}")]
    Io {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create")]
    Create(#[source] std::io::Error),
    #[error("header: {0}")]
    Header(String),
}

pub struct Qcow2Layer {
    path: PathBuf,
    access: FormatAccess<ImagoFile>,
    writable: bool,
    cluster_size: u64,
    parent: Option<ParentRef>,
    stat: std::fs::File,
}

fn qerr(path: &Path, source: Qcow2Error) -> DiskError {
    DiskError::Qcow2 {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the cluster size from the header (imago does not expose it).
fn cluster_size(path: &Path, file: &std::fs::File) -> Result<u64> {
    let mut h = [0u8; 24];
    file.read_exact_at(&mut h, 0)
        .ctx(path, "read qcow2 header")?;
    if &h[..4] != MAGIC {
        return Err(qerr(path, Qcow2Error::Header("bad magic".into())));
    }
    let bits = u32::from_be_bytes([h[20], h[21], h[22], h[23]]);
    if !(9..=21).contains(&bits) {
        return Err(qerr(
            path,
            Qcow2Error::Header(format!("cluster_bits {bits} outside 9..=21")),
        ));
    }
    Ok(1 << bits)
}

impl Qcow2Layer {
    pub fn open(path: &Path, writable: bool) -> Result<Qcow2Layer> {
        let stat = OpenOptions::new().read(true).open(path).ctx(path, "open")?;
        let cluster_size = cluster_size(path, &stat)?;
        if writable {
            // Before imago may allocate: what a killed writer left
            // referenced with refcount 0 must not be handed out again
            // (see `qcow2_refs`).
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .ctx(path, "open")?;
            let fixed = crate::qcow2_refs::repair(&f).ctx(path, "repair refcounts")?;
            for u in &fixed {
                tracing::warn!(path = %path.display(), what = u.what, offset = u.offset, "a metadata cluster a killed writer left with refcount 0 is counted again");
            }
        }
        let storage = ImagoFile::open(StorageOpenOptions::new().filename(path).write(writable))
            .map_err(|e| qerr(path, Qcow2Error::Open(e)))?;
        let qcow2 = Qcow2::<ImagoFile>::builder(storage)
            .write(writable)
            .backing(None)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| qerr(path, Qcow2Error::Open(e)))?;
        let parent = qcow2.implicit_backing_file().map(|name| {
            let dir = path.parent().unwrap_or(Path::new("."));
            ParentRef {
                path: dir.join(name),
                format: qcow2
                    .implicit_backing_format()
                    .and_then(|f| Format::parse(f)),
                identity: Vec::new(),
            }
        });
        Ok(Qcow2Layer {
            path: path.to_path_buf(),
            access: FormatAccess::new(qcow2),
            writable,
            cluster_size,
            parent,
            stat,
        })
    }

    /// Creates a qcow2 v3 image (64 KiB clusters), optionally naming a backing file
    /// (`backing` is written as given: relative names resolve against this file's directory).
    pub fn create(path: &Path, size: u64, backing: Option<(&str, Format)>) -> Result<()> {
        let storage =
            ImagoFile::create_open(StorageCreateOptions::new().filename(path).overwrite(false))
                .map_err(|e| qerr(path, Qcow2Error::Create(e)))?;
        let mut builder = Qcow2::<ImagoFile>::create_builder(storage).size(size);
        if let Some((name, format)) = backing {
            builder = builder.backing(name.to_string(), format.name().to_string());
        }
        builder
            .create()
            .map_err(|e| qerr(path, Qcow2Error::Create(e)))?;
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.sync_all())
            .ctx(path, "fsync")
    }

    /// Rewrites the backing file name recorded in the header of the closed
    /// image at `path` (the backing format is kept). The name stays where
    /// the old one was, so it must fit in the header cluster. Not atomic: for
    /// files no chain uses yet (a replica site relinks a received layer
    /// under its temporary name, before the rename that publishes it).
    pub fn set_backing_name(path: &Path, name: &str) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(path, "open")?;
        let cluster = cluster_size(path, &file)?;
        let mut h = [0u8; 20];
        file.read_exact_at(&mut h, 0)
            .ctx(path, "read qcow2 header")?;
        let offset = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let old_len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if offset == 0 {
            return Err(qerr(
                path,
                Qcow2Error::Header("no backing file to rename".into()),
            ));
        }
        // QEMU's limit on backing file names.
        if name.is_empty() || name.len() > 1023 {
            return Err(qerr(
                path,
                Qcow2Error::Header(format!("backing name of {} bytes", name.len())),
            ));
        }
        let end = offset
            .checked_add(name.len().max(old_len as usize) as u64)
            .filter(|&e| e <= cluster && offset >= 72)
            .ok_or_else(|| {
                qerr(
                    path,
                    Qcow2Error::Header(format!(
                        "backing name at {offset:#x} does not fit in the header cluster"
                    )),
                )
            })?;
        let mut region = vec![0u8; (end - offset) as usize];
        region[..name.len()].copy_from_slice(name.as_bytes());
        file.write_all_at(&region, offset)
            .ctx(path, "write backing name")?;
        file.write_all_at(&(name.len() as u32).to_be_bytes(), 16)
            .ctx(path, "write backing name length")?;
        file.sync_all().ctx(path, "fsync")
    }

    /// Points the closed image at `path` to another backing file: `name`
    /// (relative to this file's directory, or absolute) of format
    /// `format`, rewriting the backing name and the backing-format header
    /// extension together in one write within one page, so a killed
    /// process leaves the old link or the new one. The name stays where
    /// the old one was (it must fit in the header cluster); the image must
    /// already record a backing format, and the new one must pad to the
    /// same length (true of raw, qcow2 and vhdx). Used by merges, to link
    /// the child of the merged layers to the layer they were merged into.
    pub fn set_backing(path: &Path, name: &str, format: Format) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(path, "open")?;
        let cluster = cluster_size(path, &file)?;
        let head_len = cluster.min(PAGE * 16);
        let mut old = vec![0u8; head_len as usize];
        file.read_exact_at(&mut old, 0)
            .ctx(path, "read qcow2 header")?;
        let hdr = |msg: String| qerr(path, Qcow2Error::Header(msg));
        let be32 =
            |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let offset = u64::from_be_bytes(old[8..16].try_into().unwrap_or_default());
        let old_len = be32(&old, 16) as u64;
        if offset == 0 {
            return Err(hdr("no backing file to relink".into()));
        }
        if name.is_empty() || name.len() > 1023 {
            return Err(hdr(format!("backing name of {} bytes", name.len())));
        }
        let end = offset
            .checked_add((name.len() as u64).max(old_len))
            .filter(|&e| e <= head_len && offset >= 72)
            .ok_or_else(|| hdr(format!("backing name at {offset:#x} is outside the header")))?;
        let mut new = old.clone();
        new[offset as usize..end as usize].fill(0);
        new[offset as usize..offset as usize + name.len()].copy_from_slice(name.as_bytes());
        new[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        // Header extensions: after the header (v3: its length at byte 100).
        let version = be32(&old, 4);
        let mut ext = if version >= 3 {
            be32(&old, 100) as u64
        } else {
            72
        };
        let mut found = false;
        for _ in 0..64 {
            if ext + 8 > head_len {
                break;
            }
            let (kind, len) = (
                be32(&old, ext as usize),
                be32(&old, ext as usize + 4) as u64,
            );
            if kind == 0 {
                break;
            }
            let data = ext + 8;
            let padded = len.div_ceil(8) * 8;
            if data + padded > head_len {
                return Err(hdr(format!(
                    "header extension at {ext:#x} runs past the header"
                )));
            }
            if kind == BACKING_FORMAT_EXT {
                let f = format.name().as_bytes();
                if (f.len() as u64).div_ceil(8) * 8 != padded {
                    return Err(hdr(format!(
                        "backing format {:?} does not fit where {len} bytes were",
                        format.name()
                    )));
                }
                new[ext as usize + 4..ext as usize + 8]
                    .copy_from_slice(&(f.len() as u32).to_be_bytes());
                let d = &mut new[data as usize..(data + padded) as usize];
                d.fill(0);
                d[..f.len()].copy_from_slice(f);
                found = true;
                break;
            }
            ext = data + padded;
        }
        if !found {
            return Err(hdr("no backing format extension to rewrite".into()));
        }
        let first = old.iter().zip(&new).position(|(a, b)| a != b);
        let last = old.iter().zip(&new).rposition(|(a, b)| a != b);
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(());
        };
        if first as u64 / PAGE != last as u64 / PAGE {
            return Err(hdr(format!(
                "the backing name and format ({first:#x}..{last:#x}) are not in one page"
            )));
        }
        file.write_all_at(&new[first..=last], first as u64)
            .ctx(path, "write backing link")?;
        file.sync_all().ctx(path, "fsync")
    }

    fn io(&self, offset: u64, len: u64) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
        move |source| {
            qerr(
                &self.path,
                Qcow2Error::Io {
                    offset,
                    len,
                    source,
                },
            )
        }
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.access.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(DiskError::OutOfBounds { offset, len, size });
        }
        Ok(())
    }
}

impl Layer for Qcow2Layer {
    fn path(&self) -> &Path {
        &self.path
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        self.access.size()
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn granularity(&self) -> u64 {
        self.cluster_size
    }
    fn status(&self, offset: u64, len: u64) -> Result<(Status, u64)> {
        self.check_bounds(offset, len.min(1))?;
        let (mapping, n) = self
            .access
            .get_shallow_mapping(offset, len)
            .map_err(self.io(offset, len))?;
        let status = match mapping {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Status::Data,
            ShallowMapping::Zero { explicit: true, .. } => Status::Zero,
            _ => Status::Unallocated,
        };
        Ok((status, n.clamp(1, len.max(1))))
    }
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        self.access.read(buf, offset).map_err(self.io(offset, len))
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_bounds(offset, buf.len() as u64)?;
        self.access
            .write(buf, offset)
            .map_err(self.io(offset, buf.len() as u64))
    }
    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Data clusters durable, then the metadata that points at them
        // written back and made durable. The fsyncs go through our own
        // descriptor of the same file, not imago's `sync()`: imago holds
        // its file's lock exclusively for the whole fsync, so every read
        // and write of the image waited for it (measured here: writes
        // stalled for the length of each flush, 20 to 100 ms, against
        // 1.4 ms on raw; a multi-path volume's switch flushes, and its
        // I/O stalled with it). There is no other file to sync: an
        // external data file is never opened (`DenyImplicitOpenGate`).
        let sync = |what| self.stat.sync_all().ctx(&self.path, what);
        sync("fsync (data)")?;
        self.access.flush().map_err(self.io(0, 0))?;
        sync("fsync (metadata)")
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_bounds(offset, len)?;
        self.access
            .write_zeroes(offset, len)
            .map_err(self.io(offset, len))
    }
    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.stat.metadata().ctx(&self.path, "stat")?.blocks() * 512)
    }
    fn parent(&self) -> Option<ParentRef> {
        self.parent.clone()
    }
    fn check(&self) -> Result<Vec<String>> {
        // Metadata a killed writer left with refcount 0 (the next writable
        // open repairs it).
        let mut issues: Vec<String> = crate::qcow2_refs::unreferenced(&self.stat)
            .ctx(&self.path, "read refcounts")?
            .into_iter()
            .map(|u| format!("{} at {:#x} is used but has refcount 0", u.what, u.offset))
            .collect();
        // Walk every mapping: broken L1/L2 entries surface as errors here.
        let size = self.access.size();
        let mut off = 0;
        while off < size {
            match self.access.get_shallow_mapping(off, size - off) {
                Ok((_, n)) if n > 0 => off += n,
                Ok(_) => break,
                Err(e) => {
                    issues.push(format!("mapping at {off:#x}: {e}"));
                    off = (off / self.cluster_size + 1) * self.cluster_size;
                }
            }
        }
        Ok(issues)
    }
}
