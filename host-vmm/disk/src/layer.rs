//! The per-file interface every format implements, and the chain-wide
//! [`BlockDevice`] interface a block device backend uses.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::util::Guid;

/// On-disk format of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhdx => "vhdx",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "vhdx" => Some(Format::Vhdx),
            _ => None,
        }
    }

    /// File name extension conventionally used for the format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Qcow2 => "qcow2",
            Format::Vhdx => "vhdx",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a layer holds for a run of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The layer stores the data itself.
    Data,
    /// The layer says the range reads as zeros (hides any parent).
    Zero,
    /// The layer does not have the range: read it from the parent (zeros at the bottom).
    Unallocated,
}

/// Where a layer says its parent is, as recorded in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// Path resolved against the child's directory.
    pub path: PathBuf,
    /// Format recorded in the child, if the format records one.
    pub format: Option<Format>,
    /// Identities the parent may have (VHDX: `parent_linkage` and `parent_linkage2`).
    pub identity: Vec<Guid>,
}

/// One image file. Implementations use interior locking: every method takes
/// `&self` and may be called from several threads at once.
///
/// Writes to a range the layer reports as [`Status::Unallocated`] must cover
/// whole [`Layer::granularity`] units (the chain does the copy-on-write
/// from the parent); writes to allocated ranges may be any 512-byte multiple.
pub trait Layer: Send + Sync {
    fn path(&self) -> &Path;
    fn format(&self) -> Format;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn writable(&self) -> bool;
    /// Allocation unit for copy-on-write from the parent.
    fn granularity(&self) -> u64;
    /// Smallest write the layer accepts (offsets and lengths are multiples of it).
    fn write_unit(&self) -> u64 {
        512
    }
    /// Status of the run starting at `offset` (at most `len` bytes long) and its length (> 0).
    fn status(&self, offset: u64, len: u64) -> Result<(Status, u64)>;
    /// Reads bytes the layer holds; the caller only asks for runs `status` called `Data`.
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (data first, then the metadata that points at it).
    fn flush(&self) -> Result<()>;
    /// Makes the range read as zeros; may free space.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Bytes of host storage the file occupies.
    fn allocated_bytes(&self) -> Result<u64>;
    fn parent(&self) -> Option<ParentRef>;
    /// Identity a child records to name this layer as its parent (VHDX DataWriteGuid).
    fn identity(&self) -> Option<Guid> {
        None
    }
    /// Structural problems found by a full consistency check (empty if clean).
    fn check(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// What a block device backend needs from a disk: byte offsets and lengths,
/// `&self` everywhere, safe to share between threads.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn writable(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// `offset` and `buf.len()` must be multiples of 512.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Returns once every write that completed before the call is durable.
    fn flush(&self) -> Result<()>;
    /// The range reads as zeros afterwards. 512-byte aligned.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
}
