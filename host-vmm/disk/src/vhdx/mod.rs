//! VHDX (MS-VHDX v1): dynamic and differencing disks, written from the
//! specification. `header` holds the headers and region tables, `log` the
//! metadata log, `bat` the block allocation table, `metadata` the metadata
//! region; this file opens and validates an image and serves I/O.
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
pub mod log;
pub mod metadata;

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
    /// Keep the DataWriteGuid when the first write starts a session. Only for
    /// a commit, which writes into a parent data its child already shows, so
    /// the child's `parent_linkage` must stay valid until the child is gone.
    pub keep_data_write_guid: bool,
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
    keep_data_write_guid: bool,
    faults: FaultHook,
    geo: Geometry,
    params: Params,
    bat_offset: u64,
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
    pub fn open(path: &Path, opts: VhdxOpenOptions) -> Result<VhdxLayer> {
        let e = |s| verr(path, s);
        let file = OpenOptions::new()
            .read(true)
            .write(opts.writable)
            .open(path)
            .ctx(path, "open")?;
        let mut file_len = file.metadata().ctx(path, "stat")?.len();
        if file_len < 4 * MB {
            // Identifier, headers and region tables fill the first MiB; the log, metadata and BAT are MiB-aligned after it.
            return Err(e(VhdxError::Truncated {
                what: "file (under 4 MiB)",
            }));
        }
        if read_vec(&file, path, 0, 8)? != header::FILE_SIGNATURE {
            return Err(e(VhdxError::BadSignature {
                what: "file identifier",
            }));
        }
        let h0 = read_vec(
            &file,
            path,
            header::HEADER_OFFSETS[0],
            header::HEADER_SIZE as u64,
        )?;
        let h1 = read_vec(
            &file,
            path,
            header::HEADER_OFFSETS[1],
            header::HEADER_SIZE as u64,
        )?;
        let (mut hdr, mut slot) = header::current_header([&h0, &h1]).map_err(e)?;
        let mut warnings = Vec::new();
        for (i, h) in [&h0, &h1].iter().enumerate() {
            if let Err(err) = Header::parse(h) {
                warnings.push(format!("header copy {} is invalid: {err}", i + 1));
            }
        }
        let (log_offset, log_length) = (hdr.log_offset, u64::from(hdr.log_length));
        if log_length > 0 {
            if log_offset % MB != 0
                || log_length % MB != 0
                || log_offset < MB
                || log_length > log::MAX_LOG_LENGTH
            {
                return Err(e(VhdxError::Invalid(format!(
                    "log at {log_offset:#x}+{log_length:#x} is not MiB-aligned or too large"
                ))));
            }
            if log_offset + log_length > file_len {
                return Err(e(VhdxError::PastEof {
                    what: "log".into(),
                    offset: log_offset,
                    length: log_length,
                    file_len,
                }));
            }
        }
        if !hdr.log_guid.is_zero() {
            let rw = if opts.writable {
                file.try_clone().ctx(path, "dup")?
            } else {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|_| e(VhdxError::DirtyLogReadOnly))?
            };
            if log_length == 0 {
                return Err(e(VhdxError::LogReplay(
                    "the header names a log GUID but the log is empty".into(),
                )));
            }
            let log_bytes = read_vec(&rw, path, log_offset, log_length)?;
            let seq = log::active_sequence(&log_bytes, hdr.log_guid).map_err(e)?;
            replay(&rw, path, &seq, file_len, log_offset, log_length)?;
            let mut new = hdr.clone();
            new.log_guid = Guid::ZERO;
            for _ in 0..2 {
                new.sequence = hdr.sequence.wrapping_add(1);
                slot = 1 - slot;
                rw.write_all_at(&new.encode(), header::HEADER_OFFSETS[slot])
                    .ctx(path, "write header")?;
                rw.sync_data().ctx(path, "fdatasync")?;
                hdr = new.clone();
            }
            tracing::info!(path = %path.display(), entries = seq.len(), "replayed VHDX log");
            file_len = rw.metadata().ctx(path, "stat")?.len();
        }

        let r0 = read_vec(
            &file,
            path,
            header::REGION_TABLE_OFFSETS[0],
            header::REGION_TABLE_SIZE as u64,
        )?;
        let r1 = read_vec(
            &file,
            path,
            header::REGION_TABLE_OFFSETS[1],
            header::REGION_TABLE_SIZE as u64,
        )?;
        let regions = match (
            header::parse_region_table(&r0),
            header::parse_region_table(&r1),
        ) {
            (Ok(t), Ok(_)) => t,
            (Ok(t), Err(err)) => {
                warnings.push(format!("region table copy 2 is invalid: {err}"));
                t
            }
            (Err(err), Ok(t)) => {
                warnings.push(format!("region table copy 1 is invalid: {err}"));
                t
            }
            (Err(a), Err(b)) => {
                return Err(e(VhdxError::NoValidRegionTable {
                    first: Box::new(a),
                    second: Box::new(b),
                }))
            }
        };
        let (bat_region, meta_region) =
            validate_regions(&regions, log_offset, log_length, file_len).map_err(e)?;
        if u64::from(meta_region.length) > MAX_METADATA_REGION {
            return Err(e(VhdxError::Unsupported(format!(
                "metadata region of {} bytes (at most {MAX_METADATA_REGION})",
                meta_region.length
            ))));
        }
        let meta = read_vec(
            &file,
            path,
            meta_region.offset,
            u64::from(meta_region.length),
        )?;
        let params = metadata::parse(&meta).map_err(e)?;
        let geo = Geometry::new(
            params.block_size,
            params.logical_sector,
            params.virtual_size,
            params.has_parent,
        )
        .map_err(e)?;
        if geo.total_entries * 8 > u64::from(bat_region.length) {
            return Err(e(VhdxError::Invalid(format!(
                "BAT region holds {} bytes but the disk needs {} entries",
                bat_region.length, geo.total_entries
            ))));
        }
        let raw_bat = read_vec(&file, path, bat_region.offset, geo.total_entries * 8)?;
        let bat: Vec<u64> = raw_bat
            .chunks_exact(8)
            .map(|c| crate::util::le64(c, 0))
            .collect();
        let mut used = vec![
            (0, MB, "file header area".to_string()),
            (
                meta_region.offset,
                u64::from(meta_region.length),
                "metadata region".to_string(),
            ),
            (
                bat_region.offset,
                u64::from(bat_region.length),
                "BAT region".to_string(),
            ),
        ];
        if log_length > 0 {
            used.push((log_offset, log_length, "log".into()));
        }
        let mut end = file_len;
        for (i, &entry) in bat.iter().enumerate() {
            let index = i as u64;
            let st = bat::state(entry);
            let is_bitmap = geo.is_bitmap_index(index);
            let present = if is_bitmap {
                match st {
                    bat::SB_NOT_PRESENT => false,
                    bat::SB_PRESENT if params.has_parent => true,
                    _ => return Err(e(VhdxError::BadBatState { index, state: st })),
                }
            } else {
                match st {
                    bat::PAYLOAD_NOT_PRESENT
                    | bat::PAYLOAD_UNDEFINED
                    | bat::PAYLOAD_ZERO
                    | bat::PAYLOAD_UNMAPPED => false,
                    bat::PAYLOAD_FULLY_PRESENT => true,
                    bat::PAYLOAD_PARTIALLY_PRESENT if params.has_parent => true,
                    _ => return Err(e(VhdxError::BadBatState { index, state: st })),
                }
            };
            if present {
                let offset = bat::offset(entry);
                let length = if is_bitmap {
                    bat::SECTOR_BITMAP_BLOCK
                } else {
                    geo.block_size
                };
                if offset < MB || offset.checked_add(length).is_none_or(|x| x > file_len) {
                    return Err(e(VhdxError::BatPastEof {
                        index,
                        offset,
                        length,
                        file_len,
                    }));
                }
                end = end.max(offset + length);
                used.push((offset, length, format!("block of BAT entry {index}")));
            }
        }
        used.sort_by_key(|u| u.0);
        for w in used.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(e(VhdxError::Overlap {
                    first: w[0].2.clone(),
                    second: w[1].2.clone(),
                }));
            }
        }
        let parent = if params.has_parent {
            Some(parent_ref(path, &params).map_err(e)?)
        } else {
            None
        };
        let file_end =
            round_up(end, MB).ok_or_else(|| e(VhdxError::Invalid("file size overflows".into())))?;
        Ok(VhdxLayer {
            path: path.to_path_buf(),
            file,
            writable: opts.writable,
            keep_data_write_guid: opts.keep_data_write_guid,
            faults: opts.faults,
            geo,
            params,
            bat_offset: bat_region.offset,
            log_offset,
            log_length,
            parent,
            warnings,
            state: Mutex::new(State {
                header: hdr,
                slot,
                bat,
                dirty_bat: BTreeSet::new(),
                bitmaps: HashMap::new(),
                dirty_bitmap: BTreeSet::new(),
                file_end,
                session: false,
                log_seq: 0,
                crashed: false,
            }),
        })
    }

    /// Creates a new dynamic (no parent) or differencing image; refuses to
    /// overwrite an existing file. The file is synced before returning.
    pub fn create(path: &Path, opts: &VhdxCreateOptions) -> Result<()> {
        let e = |s| verr(path, s);
        let block_size = opts.block_size.unwrap_or(if opts.parent.is_some() {
            2 * MB
        } else {
            32 * MB
        });
        let logical_sector = opts.logical_sector.unwrap_or(512);
        let geo = Geometry::new(block_size, logical_sector, opts.size, opts.parent.is_some())
            .map_err(e)?;
        let mut locator = Vec::new();
        if let Some(p) = &opts.parent {
            locator.push(("parent_linkage".to_string(), p.linkage.to_string()));
            locator.push((
                "relative_path".to_string(),
                p.relative_path.replace('/', "\\"),
            ));
        }
        let params = Params {
            block_size,
            leave_blocks_allocated: false,
            has_parent: opts.parent.is_some(),
            virtual_size: opts.size,
            disk_id: Guid::random().ctx(path, "random GUID")?,
            logical_sector,
            physical_sector: 4096,
            parent_locator: locator,
        };
        let (log_offset, meta_offset, bat_offset) = (MB, 2 * MB, 3 * MB);
        let bat_len = geo.bat_bytes();
        let hdr = Header {
            sequence: 0,
            file_write_guid: Guid::random().ctx(path, "random GUID")?,
            data_write_guid: Guid::random().ctx(path, "random GUID")?,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MB as u32,
            log_offset,
        };
        let regions = header::encode_region_table(&[
            RegionEntry {
                guid: header::BAT_REGION,
                offset: bat_offset,
                length: bat_len as u32,
                required: true,
            },
            RegionEntry {
                guid: header::METADATA_REGION,
                offset: meta_offset,
                length: MB as u32,
                required: true,
            },
        ]);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .ctx(path, "create")?;
        file.set_len(bat_offset + bat_len).ctx(path, "set length")?;
        file.write_all_at(&header::encode_file_identifier(), 0)
            .ctx(path, "write")?;
        let mut h2 = hdr.clone();
        h2.sequence = 1;
        file.write_all_at(&hdr.encode(), header::HEADER_OFFSETS[0])
            .ctx(path, "write")?;
        file.write_all_at(&h2.encode(), header::HEADER_OFFSETS[1])
            .ctx(path, "write")?;
        for off in header::REGION_TABLE_OFFSETS {
            file.write_all_at(&regions, off).ctx(path, "write")?;
        }
        file.write_all_at(&metadata::encode(&params), meta_offset)
            .ctx(path, "write")?;
        file.sync_all().ctx(path, "fsync")?;
        Ok(())
    }

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
        if !self.keep_data_write_guid {
            h.data_write_guid = Guid::random().ctx(&self.path, "random GUID")?;
        }
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
            st.log_seq += 1;
            let sectors: Vec<(u64, &[u8])> =
                batch.iter().map(|(o, b)| (*o, b.as_slice())).collect();
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
            for (off, b) in batch {
                self.file
                    .write_all_at(b, *off)
                    .ctx(&self.path, "write metadata")?;
            }
            self.fail(st, "vhdx.applied")?;
            self.file.sync_data().ctx(&self.path, "fdatasync")?;
        }
        st.dirty_bat.clear();
        st.dirty_bitmap.clear();
        Ok(())
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

fn validate_regions(
    regions: &[RegionEntry],
    log_offset: u64,
    log_length: u64,
    file_len: u64,
) -> Result<(RegionEntry, RegionEntry), VhdxError> {
    let mut spans = vec![(0u64, MB, "file header area".to_string())];
    if log_length > 0 {
        spans.push((log_offset, log_length, "log".into()));
    }
    let (mut bat, mut meta) = (None, None);
    for r in regions {
        let name = if r.guid == header::BAT_REGION {
            "BAT region".to_string()
        } else if r.guid == header::METADATA_REGION {
            "metadata region".to_string()
        } else if r.required {
            return Err(VhdxError::Unsupported(format!(
                "required region {}",
                r.guid
            )));
        } else {
            format!("region {}", r.guid)
        };
        let len = u64::from(r.length);
        if r.offset % MB != 0 || len % MB != 0 || len == 0 {
            return Err(VhdxError::Invalid(format!(
                "{name} at {:#x}+{len:#x} is not MiB-aligned",
                r.offset
            )));
        }
        if r.offset.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(VhdxError::PastEof {
                what: name,
                offset: r.offset,
                length: len,
                file_len,
            });
        }
        let slot = if r.guid == header::BAT_REGION {
            &mut bat
        } else if r.guid == header::METADATA_REGION {
            &mut meta
        } else {
            &mut None
        };
        if slot.is_some() {
            return Err(VhdxError::Invalid(format!(
                "{name} appears twice in the region table"
            )));
        }
        *slot = Some(r.clone());
        spans.push((r.offset, len, name));
    }
    spans.sort_by_key(|s| s.0);
    for w in spans.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(VhdxError::Overlap {
                first: w[0].2.clone(),
                second: w[1].2.clone(),
            });
        }
    }
    Ok((
        bat.ok_or(VhdxError::MissingRegion("BAT"))?,
        meta.ok_or(VhdxError::MissingRegion("metadata"))?,
    ))
}

fn replay(
    file: &File,
    path: &Path,
    seq: &[log::Entry],
    file_len: u64,
    log_offset: u64,
    log_length: u64,
) -> Result<()> {
    let e = |s| verr(path, s);
    for entry in seq {
        if file_len < entry.flushed_file_offset {
            return Err(e(VhdxError::LogReplay(format!(
                "the file is {file_len:#x} bytes but entry {} says {:#x} were flushed",
                entry.sequence, entry.flushed_file_offset
            ))));
        }
        if entry.last_file_offset > file_len.saturating_add(MAX_LOG_EXTENSION) {
            return Err(e(VhdxError::LogReplay(format!(
                "entry {} says the file is {:#x} bytes, far past its real end {file_len:#x}",
                entry.sequence, entry.last_file_offset
            ))));
        }
        let limit = entry.last_file_offset.max(file_len);
        for op in &entry.ops {
            let (offset, len) = match op {
                log::Op::Data { offset, .. } => (*offset, log::SECTOR as u64),
                log::Op::Zero { offset, length } => (*offset, *length),
            };
            let end = offset
                .checked_add(len)
                .ok_or_else(|| e(VhdxError::LogReplay("descriptor offset overflows".into())))?;
            if offset < MB || (offset < log_offset + log_length && end > log_offset) || end > limit
            {
                return Err(e(VhdxError::LogReplay(format!(
                    "entry {} writes {offset:#x}+{len:#x}, inside the header area or log, or past the file end {limit:#x}",
                    entry.sequence
                ))));
            }
        }
    }
    for entry in seq {
        for op in &entry.ops {
            match op {
                log::Op::Data { offset, sector } => {
                    file.write_all_at(sector, *offset).ctx(path, "replay log")?
                }
                log::Op::Zero { offset, length } => {
                    let zeros = vec![0u8; 1 << 20];
                    let mut done = 0;
                    while done < *length {
                        let n = (*length - done).min(zeros.len() as u64);
                        file.write_all_at(&zeros[..n as usize], offset + done)
                            .ctx(path, "replay log")?;
                        done += n;
                    }
                }
            }
        }
        let len = file.metadata().ctx(path, "stat")?.len();
        if len < entry.last_file_offset {
            file.set_len(entry.last_file_offset).ctx(path, "extend")?;
        }
    }
    file.sync_data().ctx(path, "fdatasync")
}

fn parent_ref(path: &Path, p: &Params) -> Result<ParentRef, VhdxError> {
    let linkage = p
        .locator("parent_linkage")
        .ok_or(VhdxError::MissingMetadata(
            "parent_linkage in the parent locator",
        ))?;
    let mut identity = vec![Guid::parse(linkage)
        .ok_or_else(|| VhdxError::Invalid(format!("parent_linkage {linkage:?} is not a GUID")))?];
    if let Some(g) = p.locator("parent_linkage2").and_then(Guid::parse) {
        identity.push(g);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let resolved = if let Some(rel) = p.locator("relative_path") {
        let rel = rel.replace('\\', "/");
        dir.join(rel.trim_start_matches("./"))
    } else if let Some(abs) = p
        .locator("absolute_win32_path")
        .filter(|a| a.starts_with('/'))
    {
        PathBuf::from(abs)
    } else {
        return Err(VhdxError::MissingMetadata(
            "a usable parent path (relative_path) in the parent locator",
        ));
    };
    Ok(ParentRef {
        path: resolved,
        format: Some(Format::Vhdx),
        identity,
    })
}

impl Layer for VhdxLayer {
    fn path(&self) -> &Path {
        &self.path
    }
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn size(&self) -> u64 {
        self.geo.virtual_size
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn granularity(&self) -> u64 {
        self.geo.logical_sector
    }
    fn write_unit(&self) -> u64 {
        self.geo.logical_sector
    }

    fn status(&self, offset: u64, len: u64) -> Result<(Status, u64)> {
        self.check_bounds(offset, len.min(1))?;
        let bs = self.geo.block_size;
        let (block, in_block) = (offset / bs, offset % bs);
        let run = len
            .min(bs - in_block)
            .min(self.geo.virtual_size - offset)
            .max(1);
        let mut st = self.lock();
        let e = st.bat[self.geo.payload_index(block) as usize];
        let has_parent = self.params.has_parent;
        Ok(match bat::state(e) {
            bat::PAYLOAD_FULLY_PRESENT => (Status::Data, run),
            bat::PAYLOAD_PARTIALLY_PRESENT => {
                let chunk = block / self.geo.chunk_ratio;
                if bat::state(st.bat[self.geo.bitmap_index(chunk) as usize]) != bat::SB_PRESENT {
                    return Ok((Status::Unallocated, run));
                }
                let lss = self.geo.logical_sector;
                let first =
                    (block % self.geo.chunk_ratio) * self.geo.sectors_per_block() + in_block / lss;
                let sectors = (in_block % lss + run).div_ceil(lss);
                let bm = self.bitmap(&mut st, chunk)?;
                let bit = |i: u64| bm[(i / 8) as usize] & (1 << (i % 8)) != 0;
                let v = bit(first);
                let mut n = 1;
                while n < sectors && bit(first + n) == v {
                    n += 1;
                }
                let len = (n * lss - in_block % lss).min(run);
                (if v { Status::Data } else { Status::Unallocated }, len)
            }
            bat::PAYLOAD_ZERO | bat::PAYLOAD_UNMAPPED => (Status::Zero, run),
            bat::PAYLOAD_UNDEFINED if !has_parent => (Status::Zero, run),
            _ => (Status::Unallocated, run),
        })
    }

    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        let bs = self.geo.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (block, in_block) = (pos / bs, pos % bs);
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let e = self.lock().bat[self.geo.payload_index(block) as usize];
            match bat::state(e) {
                bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT => read_at_zero_tail(
                    &self.file,
                    &mut buf[done..done + n],
                    bat::offset(e) + in_block,
                )
                .ctx(&self.path, "read")?,
                _ => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let lss = self.geo.logical_sector;
        let len = buf.len() as u64;
        if !offset.is_multiple_of(lss) || !len.is_multiple_of(lss) {
            return Err(verr(
                &self.path,
                VhdxError::Unaligned {
                    offset,
                    len,
                    sector: lss,
                },
            ));
        }
        self.check_bounds(offset, len)?;
        let bs = self.geo.block_size;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (block, in_block) = (pos / bs, pos % bs);
            let n = (bs - in_block).min(len - done);
            let (file_off, partial) = {
                let mut st = self.lock();
                self.begin_session(&mut st)?;
                self.ensure_block(&mut st, block)?
            };
            self.file
                .write_all_at(
                    &buf[done as usize..(done + n) as usize],
                    file_off + in_block,
                )
                .ctx(&self.path, "write")?;
            if partial {
                let mut st = self.lock();
                self.set_bits(&mut st, block, in_block, n)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        if st.crashed {
            return Err(DiskError::InjectedFault(
                "flush after an injected crash".into(),
            ));
        }
        self.file.sync_data().ctx(&self.path, "fdatasync")?;
        self.commit_metadata(&mut st)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_bounds(offset, len)?;
        let bs = self.geo.block_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (block, in_block) = (pos / bs, pos % bs);
            let n = (bs - in_block).min(end - pos);
            let block_end_in_disk = (block * bs + bs).min(self.geo.virtual_size);
            if in_block == 0 && pos + n >= block_end_in_disk {
                // Whole block: mark it zero. Its space is not reused, so a
                // crash can never expose it under another block.
                let mut st = self.lock();
                self.begin_session(&mut st)?;
                let pi = self.geo.payload_index(block);
                st.bat[pi as usize] = bat::entry(bat::PAYLOAD_ZERO, 0);
                Self::mark_bat(&mut st, pi);
            } else {
                let zeros = vec![0u8; n as usize];
                self.write(&zeros, pos)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.file.metadata().ctx(&self.path, "stat")?.blocks() * 512)
    }

    fn parent(&self) -> Option<ParentRef> {
        self.parent.clone()
    }

    fn identity(&self) -> Option<Guid> {
        Some(self.lock().header.data_write_guid)
    }

    fn check(&self) -> Result<Vec<String>> {
        let mut issues = self.warnings.clone();
        let st = self.lock();
        for block in 0..self.geo.data_blocks {
            let e = st.bat[self.geo.payload_index(block) as usize];
            if bat::state(e) == bat::PAYLOAD_PARTIALLY_PRESENT {
                let chunk = block / self.geo.chunk_ratio;
                if bat::state(st.bat[self.geo.bitmap_index(chunk) as usize]) != bat::SB_PRESENT {
                    issues.push(format!("payload block {block} is partially present but its sector bitmap block is absent"));
                }
            }
        }
        Ok(issues)
    }
}
