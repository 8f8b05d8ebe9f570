//! VHDX (MS-VHDX v1): dynamic and differencing disks, written from the
//! specification. `header` holds the headers and region tables, `log` the
//! metadata log, `bat` the block allocation table, `metadata` the metadata
//! region; `open` validates (and replays) an image or creates one, `io`
//! serves reads and writes; this file holds the write session, allocation
//! and the metadata commit.
//!
//! Crash safety: payload data is only ever written to blocks allocated at
//! the end of the file (space is never reused), so data writes cannot
//! damage acknowledged data. BAT and sector bitmap changes are kept in
//! memory and committed on flush: `fdatasync` (the data), one log entry with
//! the changed 4 KiB metadata sectors, `fdatasync`, the same sectors written
//! in place, `fdatasync`. A crash before the log entry is complete leaves the
//! previous metadata (the torn entry fails its CRC); a crash after it leaves
//! a log that open replays. The header carries the log GUID for the whole
//! write session and is cleared on a clean close.

pub mod bat;
pub mod header;
mod io;
pub mod log;
pub mod metadata;
mod open;

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use self::bat::Geometry;
use self::header::{Header, RegionEntry, MB};
use self::metadata::Params;
use crate::error::{DiskError, IoContext, Result};
use crate::fault::FaultHook;
use crate::layer::{Format, Layer, ParentRef, Status};
use crate::util::{read_at_zero_tail, round_up, Guid};

#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    #[error("bad {what} signature")]
    BadSignature { what: &'static str },
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("no valid header (first copy: {first}; second copy: {second})")]
    NoValidHeader {
        first: Box<VhdxError>,
        second: Box<VhdxError>,
    },
    #[error("no valid region table (first copy: {first}; second copy: {second})")]
    NoValidRegionTable {
        first: Box<VhdxError>,
        second: Box<VhdxError>,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("{first} overlaps {second}")]
    Overlap { first: String, second: String },
    #[error(
        "{what} at {offset:#x}+{length:#x} extends past the end of the file ({file_len:#x} bytes)"
    )]
    PastEof {
        what: String,
        offset: u64,
        length: u64,
        file_len: u64,
    },
    #[error("missing required metadata item: {0}")]
    MissingMetadata(&'static str),
    #[error("missing required region: {0}")]
    MissingRegion(&'static str),
    #[error("BAT entry {index} has invalid state {state}")]
    BadBatState { index: u64, state: u8 },
    #[error("BAT entry {index} points past the end of the file: block at {offset:#x}+{length:#x}, file is {file_len:#x} bytes")]
    BatPastEof {
        index: u64,
        offset: u64,
        length: u64,
        file_len: u64,
    },
    #[error("log does not replay: {0}")]
    LogReplay(String),
    #[error("the log needs replaying but the file cannot be opened for writing")]
    DirtyLogReadOnly,
    #[error("request at {offset:#x}+{len:#x} is not aligned to the {sector}-byte logical sector")]
    Unaligned { offset: u64, len: u64, sector: u64 },
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct VhdxOpenOptions {
    pub writable: bool,
    /// The DataWriteGuid the first write gives the image (random if `None`).
    /// A commit sets the one it recorded beforehand as the child's
    /// `parent_linkage2`, so the child keeps accepting its parent throughout.
    pub data_write_guid: Option<Guid>,
    pub faults: FaultHook,
}

/// What a differencing disk records about its parent.
#[derive(Clone, Debug)]
pub struct VhdxParent {
    /// Path relative to the child's directory, as stored in `relative_path`.
    pub relative_path: String,
    /// The parent's DataWriteGuid (`parent_linkage`).
    pub linkage: Guid,
}

/// How to create an image.
#[derive(Clone, Debug)]
pub struct VhdxCreateOptions {
    pub size: u64,
    /// Defaults to 32 MiB for dynamic and 2 MiB for differencing disks.
    pub block_size: Option<u64>,
    /// 512 (the default) or 4096.
    pub logical_sector: Option<u64>,
    pub parent: Option<VhdxParent>,
}

struct State {
    header: Header,
    slot: usize,
    bat: Vec<u64>,
    dirty_bat: BTreeSet<u64>,
    bitmaps: HashMap<u64, Vec<u8>>,
    dirty_bitmap: BTreeSet<(u64, u64)>,
    file_end: u64,
    session: bool,
    log_seq: u64,
    /// Set when an injected fault stopped an update half way: the layer then
    /// behaves like a crashed process (no further writes, no clean close).
    crashed: bool,
}

pub struct VhdxLayer {
    path: PathBuf,
    file: File,
    writable: bool,
    data_write_guid: Option<Guid>,
    faults: FaultHook,
    geo: Geometry,
    params: Params,
    bat_offset: u64,
    meta_offset: u64,
    log_offset: u64,
    log_length: u64,
    parent: Option<ParentRef>,
    warnings: Vec<String>,
    state: Mutex<State>,
}

/// The metadata region is 1 MiB in practice; refuse to load absurd ones.
const MAX_METADATA_REGION: u64 = 64 * MB;
/// How far past the file's end a log entry may claim the file extends.
const MAX_LOG_EXTENSION: u64 = 4 << 30;

fn verr(path: &Path, source: VhdxError) -> DiskError {
    DiskError::Vhdx {
        path: path.to_path_buf(),
        source,
    }
}

fn read_vec(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut b = vec![
        0u8;
        usize::try_from(len).map_err(|_| DiskError::Invalid(format!(
            "{len} bytes do not fit in memory"
        )))?
    ];
    read_at_zero_tail(file, &mut b, offset).ctx(path, "read")?;
    Ok(b)
}

impl VhdxLayer {
    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The header currently in force.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, st: &mut State, step: &str) -> Result<()> {
        let r = self.faults.check(step);
        if r.is_err() {
            st.crashed = true;
        }
        r
    }

    fn write_headers(&self, st: &mut State, mut new: Header) -> Result<()> {
        for _ in 0..2 {
            new.sequence = st.header.sequence.wrapping_add(1);
            let target = 1 - st.slot;
            self.file
                .write_all_at(&new.encode(), header::HEADER_OFFSETS[target])
                .ctx(&self.path, "write header")?;
            self.file.sync_data().ctx(&self.path, "fdatasync")?;
            st.header = new.clone();
            st.slot = target;
        }
        Ok(())
    }

    /// First write of this open: new FileWriteGuid, DataWriteGuid and log GUID.
    fn begin_session(&self, st: &mut State) -> Result<()> {
        if st.crashed {
            return Err(DiskError::InjectedFault(
                "write after an injected crash".into(),
            ));
        }
        if st.session {
            return Ok(());
        }
        let mut h = st.header.clone();
        h.file_write_guid = Guid::random().ctx(&self.path, "random GUID")?;
        h.data_write_guid = match self.data_write_guid {
            Some(g) => g,
            None => Guid::random().ctx(&self.path, "random GUID")?,
        };
        h.log_guid = Guid::random().ctx(&self.path, "random GUID")?;
        if self.log_length == 0 {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                what: "writing an image without a log".into(),
            });
        }
        self.write_headers(st, h)?;
        st.session = true;
        Ok(())
    }

    fn alloc(&self, st: &mut State, len: u64) -> Result<u64> {
        let off = st.file_end;
        st.file_end = off
            .checked_add(len)
            .ok_or_else(|| DiskError::Invalid("file offset overflow".into()))?;
        self.file.set_len(st.file_end).ctx(&self.path, "extend")?;
        Ok(off)
    }

    fn mark_bat(st: &mut State, index: u64) {
        st.dirty_bat.insert(index * 8 / 4096);
    }

    fn bitmap<'a>(&self, st: &'a mut State, chunk: u64) -> Result<&'a mut Vec<u8>> {
        if !st.bitmaps.contains_key(&chunk) {
            let sb = st.bat[self.geo.bitmap_index(chunk) as usize];
            let data = if bat::state(sb) == bat::SB_PRESENT {
                read_vec(
                    &self.file,
                    &self.path,
                    bat::offset(sb),
                    bat::SECTOR_BITMAP_BLOCK,
                )?
            } else {
                vec![0u8; bat::SECTOR_BITMAP_BLOCK as usize]
            };
            st.bitmaps.insert(chunk, data);
        }
        st.bitmaps
            .get_mut(&chunk)
            .ok_or_else(|| DiskError::Invalid("sector bitmap cache".into()))
    }

    /// File offset of payload block `block`, allocating it if needed.
    fn ensure_block(&self, st: &mut State, block: u64) -> Result<(u64, bool)> {
        let pi = self.geo.payload_index(block);
        let e = st.bat[pi as usize];
        match bat::state(e) {
            bat::PAYLOAD_FULLY_PRESENT => return Ok((bat::offset(e), false)),
            bat::PAYLOAD_PARTIALLY_PRESENT => return Ok((bat::offset(e), true)),
            _ => {}
        }
        // A block that reads as zeros becomes a fully present block of zeros
        // (the file grows with zeros); a transparent one becomes partially
        // present, with an all-clear sector bitmap.
        let transparent = self.params.has_parent
            && matches!(
                bat::state(e),
                bat::PAYLOAD_NOT_PRESENT | bat::PAYLOAD_UNDEFINED
            );
        if transparent {
            let chunk = block / self.geo.chunk_ratio;
            let bi = self.geo.bitmap_index(chunk);
            if bat::state(st.bat[bi as usize]) != bat::SB_PRESENT {
                let off = self.alloc(st, bat::SECTOR_BITMAP_BLOCK)?;
                st.bat[bi as usize] = bat::entry(bat::SB_PRESENT, off);
                st.bitmaps
                    .insert(chunk, vec![0u8; bat::SECTOR_BITMAP_BLOCK as usize]);
                Self::mark_bat(st, bi);
            }
        }
        let off = self.alloc(st, self.geo.block_size)?;
        let state = if transparent {
            bat::PAYLOAD_PARTIALLY_PRESENT
        } else {
            bat::PAYLOAD_FULLY_PRESENT
        };
        st.bat[pi as usize] = bat::entry(state, off);
        Self::mark_bat(st, pi);
        Ok((off, transparent))
    }

    fn set_bits(&self, st: &mut State, block: u64, in_block: u64, len: u64) -> Result<()> {
        let lss = self.geo.logical_sector;
        let chunk = block / self.geo.chunk_ratio;
        let first = (block % self.geo.chunk_ratio) * self.geo.sectors_per_block() + in_block / lss;
        let count = len / lss;
        let bm = self.bitmap(st, chunk)?;
        let mut pages = BTreeSet::new();
        for bit in first..first + count {
            let byte = (bit / 8) as usize;
            bm[byte] |= 1 << (bit % 8);
            pages.insert(byte as u64 / 4096);
        }
        st.dirty_bitmap
            .extend(pages.into_iter().map(|p| (chunk, p)));
        Ok(())
    }

    /// Writes the dirty BAT and bitmap sectors through the log.
    fn commit_metadata(&self, st: &mut State) -> Result<()> {
        let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
        for &p in &st.dirty_bat {
            let mut b = vec![0u8; 4096];
            for (i, e) in st.bat.iter().skip(p as usize * 512).take(512).enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            pages.push((self.bat_offset + p * 4096, b));
        }
        for &(chunk, p) in &st.dirty_bitmap {
            let sb = st.bat[self.geo.bitmap_index(chunk) as usize];
            if let Some(bm) = st.bitmaps.get(&chunk) {
                let start = p as usize * 4096;
                pages.push((bat::offset(sb) + p * 4096, bm[start..start + 4096].to_vec()));
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        let per_entry = log::max_sectors_per_entry(self.log_length).max(1);
        for batch in pages.chunks(per_entry) {
            self.log_pages(st, batch)?;
        }
        st.dirty_bat.clear();
        st.dirty_bitmap.clear();
        Ok(())
    }

    /// Writes 4 KiB metadata `pages` (file offset, bytes) as one log
    /// transaction: log entry, sync, in place, sync.
    fn log_pages(&self, st: &mut State, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        st.log_seq += 1;
        let sectors: Vec<(u64, &[u8])> = pages.iter().map(|(o, b)| (*o, b.as_slice())).collect();
        let entry = log::encode(
            st.log_seq,
            0,
            st.header.log_guid,
            st.file_end,
            st.file_end,
            &sectors,
        );
        self.fail(st, "vhdx.before-log")?;
        self.file
            .write_all_at(&entry, self.log_offset)
            .ctx(&self.path, "write log")?;
        self.file.sync_data().ctx(&self.path, "fdatasync")?;
        self.fail(st, "vhdx.log-written")?;
        for (off, b) in pages {
            self.file
                .write_all_at(b, *off)
                .ctx(&self.path, "write metadata")?;
        }
        self.fail(st, "vhdx.applied")?;
        self.file.sync_data().ctx(&self.path, "fdatasync")
    }

    /// Records `guid` as the parent's alternate identity (`parent_linkage2`),
    /// atomically through the log. A commit does this before it writes into
    /// the parent under that new DataWriteGuid. The metadata region is
    /// rewritten in Tandem's layout; optional items Tandem does not know
    /// are dropped.
    pub fn add_parent_linkage2(&self, guid: Guid) -> Result<()> {
        self.rewrite_locator(|locator| {
            locator.retain(|(k, _)| k != "parent_linkage2");
            locator.push(("parent_linkage2".to_string(), guid.to_string()));
        })
    }

    /// Points the parent locator at `relative_path` (resolved against this
    /// file's directory), atomically through the log, and drops the
    /// absolute and volume paths that would name the old place. The parent
    /// linkage is kept. A replica site uses it on a layer it received, so the
    /// layer names the site's own copy of its parent. Open the layer with
    /// `data_write_guid` set to its current DataWriteGuid: a locator is not
    /// user data, and a child naming this layer must keep accepting it.
    pub fn set_parent_path(&self, relative_path: &str) -> Result<()> {
        let value = relative_path.replace('/', "\\");
        self.rewrite_locator(|locator| {
            locator.retain(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "relative_path" | "absolute_win32_path" | "volume_path"
                )
            });
            locator.push(("relative_path".to_string(), value));
        })
    }

    /// Makes this layer a child of another parent: the locator names
    /// `relative_path` and the parent's identity `linkage` (any
    /// `parent_linkage2` goes), in one log entry, so a crash leaves the old
    /// parent or the new one. Used by a merge to link the child of the
    /// merged layers to the layer they were merged into. Open the layer
    /// with `data_write_guid` set to its current DataWriteGuid, so its own
    /// children keep accepting it.
    pub fn set_parent(&self, relative_path: &str, linkage: Guid) -> Result<()> {
        let value = relative_path.replace('/', "\\");
        self.rewrite_locator(|locator| {
            locator.retain(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "relative_path"
                        | "absolute_win32_path"
                        | "volume_path"
                        | "parent_linkage"
                        | "parent_linkage2"
                )
            });
            locator.push(("parent_linkage".to_string(), linkage.to_string()));
            locator.push(("relative_path".to_string(), value));
        })
    }

    fn rewrite_locator(&self, edit: impl FnOnce(&mut Vec<(String, String)>)) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if !self.params.has_parent {
            return Err(DiskError::Invalid(format!(
                "{}: not a differencing disk",
                self.path.display()
            )));
        }
        let mut st = self.lock();
        self.begin_session(&mut st)?;
        self.file.sync_data().ctx(&self.path, "fdatasync")?;
        self.commit_metadata(&mut st)?;
        let mut params = self.params.clone();
        edit(&mut params.parent_locator);
        let new = metadata::encode(&params);
        let old = read_vec(&self.file, &self.path, self.meta_offset, new.len() as u64)?;
        let pages: Vec<(u64, Vec<u8>)> = new
            .chunks(4096)
            .zip(old.chunks(4096))
            .enumerate()
            .filter(|(_, (n, o))| n != o)
            .map(|(i, (n, _))| (self.meta_offset + i as u64 * 4096, n.to_vec()))
            .collect();
        if pages.len() > log::max_sectors_per_entry(self.log_length) {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                what: "a metadata rewrite larger than the log".into(),
            });
        }
        self.log_pages(&mut st, &pages)
    }

    /// Flushes and ends the write session (clears the log GUID). Also done on drop.
    pub fn close(&self) -> Result<()> {
        let mut st = self.lock();
        if !st.session || st.crashed {
            return Ok(());
        }
        self.file.sync_data().ctx(&self.path, "fdatasync")?;
        self.commit_metadata(&mut st)?;
        let mut h = st.header.clone();
        h.log_guid = Guid::ZERO;
        self.write_headers(&mut st, h)?;
        st.session = false;
        Ok(())
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.geo.virtual_size)
        {
            return Err(DiskError::OutOfBounds {
                offset,
                len,
                size: self.geo.virtual_size,
            });
        }
        Ok(())
    }
}

impl Drop for VhdxLayer {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            tracing::warn!(path = %self.path.display(), %err, "closing VHDX image failed");
        }
    }
}
