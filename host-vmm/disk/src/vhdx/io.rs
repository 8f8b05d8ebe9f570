//! Serving I/O: the [`Layer`] implementation.

use super::*;

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
