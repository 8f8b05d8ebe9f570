//! Opening an image (validating every structure and replaying the log) and
//! creating one.

use super::*;

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
            if log_offset
                .checked_add(log_length)
                .is_none_or(|end| end > file_len)
            {
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
            data_write_guid: opts.data_write_guid,
            faults: opts.faults,
            geo,
            params,
            bat_offset: bat_region.offset,
            meta_offset: meta_region.offset,
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
