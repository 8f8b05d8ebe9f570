//! A chain of layers, top first: reads go down the chain until a layer has
//! the data, writes go to the top (with copy-on-write of partial clusters
//! from below). Opening checks every parent link: loops, depth, format and
//! the parent's identity.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use crate::error::{DiskError, IoContext, Result};
use crate::fault::FaultHook;
use crate::layer::{BlockDevice, Format, Layer, Status};
use crate::qcow2::Qcow2Layer;
use crate::raw::RawLayer;
use crate::vhdx::{VhdxLayer, VhdxOpenOptions};

/// Longest chain we open (a guard against pathological or looping files).
pub const MAX_DEPTH: usize = 64;
const SECTOR: u64 = 512;

/// Guesses the format from the first bytes: VHDX and qcow2 have magic
/// numbers; anything else is raw, unless the file's extension claims VHDX
/// or qcow2 (then its magic is bad, and that is the error).
pub fn probe(path: &Path) -> Result<Format> {
    let f = fs::File::open(path).ctx(path, "open")?;
    let mut b = [0u8; 8];
    let n = f.read_at(&mut b, 0).ctx(path, "read")?;
    Ok(if n >= 8 && &b == crate::vhdx::header::FILE_SIGNATURE {
        Format::Vhdx
    } else if n >= 4 && &b[..4] == crate::qcow2::MAGIC {
        Format::Qcow2
    } else {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .and_then(Format::parse)
        {
            Some(Format::Vhdx) => {
                return Err(DiskError::Vhdx {
                    path: path.into(),
                    source: crate::vhdx::VhdxError::BadSignature {
                        what: "file identifier",
                    },
                })
            }
            Some(Format::Qcow2) => {
                return Err(DiskError::Qcow2 {
                    path: path.into(),
                    source: crate::qcow2::Qcow2Error::Header("bad magic".into()),
                })
            }
            _ => Format::Raw,
        }
    })
}

/// Options for opening one layer.
#[derive(Clone, Debug, Default)]
pub struct LayerOptions {
    pub writable: bool,
    /// VHDX: the DataWriteGuid the first write sets (see [`VhdxOpenOptions`]).
    pub data_write_guid: Option<crate::util::Guid>,
    pub faults: FaultHook,
}

pub fn open_layer(path: &Path, format: Format, opts: &LayerOptions) -> Result<Arc<dyn Layer>> {
    Ok(match format {
        Format::Raw => Arc::new(RawLayer::open(path, opts.writable)?),
        Format::Qcow2 => Arc::new(Qcow2Layer::open(path, opts.writable)?),
        Format::Vhdx => Arc::new(VhdxLayer::open(
            path,
            VhdxOpenOptions {
                writable: opts.writable,
                data_write_guid: opts.data_write_guid,
                faults: opts.faults.clone(),
            },
        )?),
    })
}

/// Options for opening a chain.
#[derive(Clone, Debug, Default)]
pub struct ChainOptions {
    /// Open the top layer writable (lower layers are sealed: always read-only).
    pub writable: bool,
    /// Format of the top layer; probed when `None`.
    pub format: Option<Format>,
    pub faults: FaultHook,
}

/// Opens the parents of `top`, returning the full chain (top first).
pub fn open_parents(top: Arc<dyn Layer>) -> Result<Vec<Arc<dyn Layer>>> {
    let mut seen = HashSet::new();
    seen.insert(fs::canonicalize(top.path()).ctx(top.path(), "resolve path")?);
    let mut layers = vec![top];
    loop {
        let child = layers
            .last()
            .cloned()
            .ok_or_else(|| DiskError::Invalid("empty chain".into()))?;
        let Some(parent) = child.parent() else { break };
        let canonical = fs::canonicalize(&parent.path).ctx(&parent.path, "open parent")?;
        if !seen.insert(canonical) {
            return Err(DiskError::ChainLoop { path: parent.path });
        }
        if layers.len() >= MAX_DEPTH {
            return Err(DiskError::ChainTooDeep { max: MAX_DEPTH });
        }
        let format = match parent.format {
            Some(f) => f,
            None => probe(&parent.path)?,
        };
        if child.format() == Format::Vhdx && format != Format::Vhdx {
            return Err(DiskError::ParentFormat {
                child: child.path().into(),
                parent: parent.path,
                format: format.name(),
            });
        }
        let p = open_layer(&parent.path, format, &LayerOptions::default())?;
        if !parent.identity.is_empty() {
            let found = p.identity();
            if !found.is_some_and(|g| parent.identity.contains(&g)) {
                return Err(DiskError::ParentIdentity {
                    child: child.path().into(),
                    parent: parent.path,
                    expected: parent
                        .identity
                        .iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                    found: found.map_or_else(|| "none".into(), |g| g.to_string()),
                });
            }
        }
        if child.format() == Format::Vhdx && p.size() != child.size() {
            return Err(DiskError::ParentSize {
                child: child.path().into(),
                parent: parent.path,
                parent_size: p.size(),
                child_size: child.size(),
            });
        }
        layers.push(p);
    }
    Ok(layers)
}

/// An open chain; implements [`BlockDevice`].
pub struct Chain {
    layers: RwLock<Vec<Arc<dyn Layer>>>,
    /// Serialises copy-on-write of partial clusters (read parent, merge, write).
    cow: Mutex<()>,
    opts: ChainOptions,
    top_path: PathBuf,
}

impl Chain {
    pub fn open(path: &Path, opts: ChainOptions) -> Result<Chain> {
        let layers = Self::open_layers(path, &opts)?;
        if opts.writable {
            // The writer (re)opening the chain clears what a checkpoint
            // killed before its rename left: the chain at `path` never
            // depends on it (see `checkpoint`), so it is garbage.
            let stray = crate::checkpoint::temp_name(path);
            if stray.exists() {
                fs::remove_file(&stray).ctx(&stray, "remove")?;
                crate::checkpoint::fsync_dir(&crate::checkpoint::dir_of(path))?;
                tracing::info!(path = %stray.display(), "removed what an interrupted checkpoint left");
            }
        }
        Ok(Chain {
            layers: RwLock::new(layers),
            cow: Mutex::new(()),
            opts,
            top_path: path.to_path_buf(),
        })
    }

    fn open_layers(path: &Path, opts: &ChainOptions) -> Result<Vec<Arc<dyn Layer>>> {
        let format = match opts.format {
            Some(f) => f,
            None => probe(path)?,
        };
        let top = open_layer(
            path,
            format,
            &LayerOptions {
                writable: opts.writable,
                data_write_guid: None,
                faults: opts.faults.clone(),
            },
        )?;
        open_parents(top)
    }

    /// A chain over layers opened by the caller (top first).
    pub fn from_layers(layers: Vec<Arc<dyn Layer>>) -> Result<Chain> {
        let top_path = layers
            .first()
            .ok_or_else(|| DiskError::Invalid("empty chain".into()))?
            .path()
            .to_path_buf();
        Ok(Chain {
            layers: RwLock::new(layers),
            cow: Mutex::new(()),
            opts: ChainOptions::default(),
            top_path,
        })
    }

    fn read_layers(&self) -> RwLockReadGuard<'_, Vec<Arc<dyn Layer>>> {
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The layers, top first.
    pub fn layers(&self) -> Vec<Arc<dyn Layer>> {
        self.read_layers().clone()
    }

    pub fn top_path(&self) -> &Path {
        &self.top_path
    }

    /// Whether the chain holds data (in any layer) for the run at `offset`,
    /// and the run's length.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let layers = self.read_layers();
        Self::status_from(&layers, 0, offset, len)
    }

    fn status_from(
        layers: &[Arc<dyn Layer>],
        idx: usize,
        offset: u64,
        len: u64,
    ) -> Result<(bool, u64)> {
        let Some(layer) = layers.get(idx) else {
            return Ok((false, len));
        };
        if offset >= layer.size() {
            return Ok((false, len));
        }
        let (st, n) = layer.status(offset, len.min(layer.size() - offset))?;
        match st {
            Status::Data => Ok((true, n)),
            Status::Zero => Ok((false, n)),
            Status::Unallocated => Self::status_from(layers, idx + 1, offset, n),
        }
    }

    fn read_from(layers: &[Arc<dyn Layer>], idx: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(layer) = layers.get(idx) else {
            buf.fill(0);
            return Ok(());
        };
        let size = layer.size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= size {
                // A backing file smaller than its child reads as zeros past its end.
                buf[done..].fill(0);
                break;
            }
            let want = ((buf.len() - done) as u64).min(size - pos);
            let (st, n) = layer.status(pos, want)?;
            let n = n.min(want) as usize;
            let chunk = &mut buf[done..done + n];
            match st {
                Status::Data => layer.read_data(chunk, pos)?,
                Status::Zero => chunk.fill(0),
                Status::Unallocated => Self::read_from(layers, idx + 1, chunk, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    fn check_request(&self, offset: u64, len: u64, aligned: bool) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(DiskError::OutOfBounds { offset, len, size });
        }
        if aligned && (!offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR)) {
            return Err(DiskError::Unaligned {
                offset,
                len,
                align: SECTOR,
            });
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the top layer; partial clusters the top
    /// does not hold yet are first filled from the layers below.
    fn write_top(&self, layers: &[Arc<dyn Layer>], buf: &[u8], offset: u64) -> Result<()> {
        let top = layers
            .first()
            .ok_or_else(|| DiskError::Invalid("empty chain".into()))?;
        if !top.writable() {
            return Err(DiskError::ReadOnly {
                path: top.path().into(),
            });
        }
        let unit = top.write_unit();
        let g = top.granularity().max(unit);
        if (g <= SECTOR || layers.len() == 1) && unit <= SECTOR {
            return top.write(buf, offset);
        }
        let size = top.size();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let gstart = pos / g * g;
            let gend = (gstart + g).min(size);
            let n = gend.min(end) - pos;
            let piece = &buf[(pos - offset) as usize..(pos - offset + n) as usize];
            if pos == gstart && pos + n == gend {
                top.write(piece, pos)?;
            } else {
                let _cow = self.cow.lock().unwrap_or_else(|p| p.into_inner());
                let (st, _) = top.status(gstart, gend - gstart)?;
                let misaligned = !(pos | n).is_multiple_of(unit);
                if st == Status::Unallocated || misaligned {
                    // Fill the unit from the chain: from below for a range the top
                    // does not hold, from the chain itself for a sub-sector write.
                    let from = if st == Status::Unallocated { 1 } else { 0 };
                    let mut full = vec![0u8; (gend - gstart) as usize];
                    Self::read_from(layers, from, &mut full, gstart)?;
                    full[(pos - gstart) as usize..(pos - gstart + n) as usize]
                        .copy_from_slice(piece);
                    top.write(&full, gstart)?;
                } else {
                    top.write(piece, pos)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Seals the top layer and starts a new differencing layer on it, at the
    /// same path (see [`crate::checkpoint`]). Returns the sealed layer's path.
    pub fn checkpoint(&self) -> Result<PathBuf> {
        let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
        let top = layers
            .first()
            .cloned()
            .ok_or_else(|| DiskError::Invalid("empty chain".into()))?;
        top.flush()?;
        let (format, size) = (top.format(), top.size());
        drop(top);
        // Dropping the layers closes the top cleanly (VHDX: log GUID cleared),
        // so the identity the child records is final.
        layers.clear();
        let result =
            crate::checkpoint::seal_and_branch(&self.top_path, format, size, &self.opts.faults);
        // Whatever happened, the files form a valid chain: reopen it.
        *layers = Self::open_layers(
            &self.top_path,
            &ChainOptions {
                format: None,
                ..self.opts.clone()
            },
        )?;
        result
    }
}

impl BlockDevice for Chain {
    fn size(&self) -> u64 {
        self.read_layers().first().map_or(0, |l| l.size())
    }
    fn writable(&self) -> bool {
        self.read_layers().first().is_some_and(|l| l.writable())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_request(offset, buf.len() as u64, false)?;
        let layers = self.read_layers();
        Self::read_from(&layers, 0, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_request(offset, buf.len() as u64, true)?;
        let layers = self.read_layers();
        self.write_top(&layers, buf, offset)
    }
    fn flush(&self) -> Result<()> {
        match self.read_layers().first() {
            Some(top) => top.flush(),
            None => Ok(()),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_request(offset, len, true)?;
        let layers = self.read_layers();
        let top = layers
            .first()
            .ok_or_else(|| DiskError::Invalid("empty chain".into()))?;
        let g = top.granularity().max(SECTOR);
        let size = top.size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gstart = pos / g * g;
            let gend = (gstart + g).min(size);
            let n = gend.min(end) - pos;
            if pos == gstart && pos + n == gend {
                top.discard(pos, n)?;
            } else {
                self.write_top(&layers, &vec![0u8; n as usize], pos)?;
            }
            pos += n;
        }
        Ok(())
    }
}
