//! qcow2 metadata clusters that are referenced but have refcount 0, and
//! their repair: what a process killed inside imago's allocation of a new
//! L2 table leaves behind.
//!
//! imago 0.2.6 (`ensure_l2`) allocates the table's cluster (the refcount
//! increment stays in its refcount-block cache), writes the table, then
//! writes the L1 entry that points at it, with no ordering between the
//! cached refcount and that L1 write. A SIGKILL in between leaves an L1
//! entry pointing at a cluster whose refcount on disk is 0; the next
//! allocation hands that cluster out again and one of the two users
//! overwrites the other (found by `tandem-vhost-blk`'s kill test: a
//! guest's flushed data read back as another table's bytes). QEMU's qcow2
//! orders these writes; imago does not yet.
//!
//! So every writable open first checks the metadata clusters (L1 table,
//! refcount table, refcount blocks, L2 tables) and sets a refcount of 0 to
//! 1 on disk, then fsyncs, before imago opens the file: the cluster can no
//! longer be handed out twice. Data clusters need no such check (imago
//! makes their refcounts durable before the L2 entry that uses them). At
//! worst the repair keeps a cluster nothing uses (a leak, harmless). Pure
//! reads and writes of the file through `FileExt`; 16-bit refcounts only
//! (what `Qcow2Layer::create` and qemu-img make); other widths are left
//! to imago as before.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Offsets in an L1/L2/refcount-table entry (bits 9..55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A referenced metadata cluster whose refcount on disk is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreferenced {
    pub what: &'static str,
    pub offset: u64,
}

struct Geometry {
    cluster_bits: u32,
    l1_size: u64,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u64,
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// The header fields this needs; `None` if the refcounts are not 16-bit
/// or the header is not one this understands (imago reports that itself).
fn geometry(f: &File) -> std::io::Result<Option<Geometry>> {
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0)?;
    if &h[..4] != crate::qcow2::MAGIC {
        return Ok(None);
    }
    let version = be32(&h[4..]);
    let order = if version >= 3 { be32(&h[96..]) } else { 4 };
    let cluster_bits = be32(&h[20..]);
    if order != 4 || !(9..=21).contains(&cluster_bits) {
        return Ok(None);
    }
    let g = Geometry {
        cluster_bits,
        l1_size: u64::from(be32(&h[36..])),
        l1_offset: be64(&h[40..]),
        rt_offset: be64(&h[48..]),
        rt_clusters: u64::from(be32(&h[56..])),
    };
    // QEMU's limits (32 MiB of L1, 8 MiB of refcount table), and both
    // inside the file: anything else is imago's to refuse.
    let file_len = f.metadata()?.len();
    let inside = |at: u64, len: u64| at.checked_add(len).is_some_and(|end| end <= file_len);
    let rt_len = g.rt_clusters << cluster_bits;
    if g.l1_size * 8 > 32 << 20
        || rt_len > 8 << 20
        || !inside(g.l1_offset, g.l1_size * 8)
        || !inside(g.rt_offset, rt_len)
    {
        return Ok(None);
    }
    Ok(Some(g))
}

impl Geometry {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Where the 16-bit refcount of the cluster at `offset` lives, if its
    /// refcount block exists.
    fn refcount_at(&self, f: &File, offset: u64) -> std::io::Result<Option<u64>> {
        let cluster = offset >> self.cluster_bits;
        let per_block = self.cluster_size() / 2;
        let rt_index = cluster / per_block;
        if rt_index >= self.rt_clusters * self.cluster_size() / 8 {
            return Ok(None);
        }
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, self.rt_offset + rt_index * 8)?;
        // (inside the table: `geometry` checked it is in the file)
        let block = be64(&e) & OFFSET_MASK;
        if block == 0 {
            return Ok(None);
        }
        Ok(Some(block + (cluster % per_block) * 2))
    }

    fn refcount(&self, f: &File, offset: u64) -> std::io::Result<Option<(u64, u16)>> {
        let Some(at) = self.refcount_at(f, offset)? else {
            return Ok(None);
        };
        let mut r = [0u8; 2];
        if f.read_at(&mut r, at)? != 2 {
            // A refcount block past the end: imago's to report.
            return Ok(None);
        }
        Ok(Some((at, u16::from_be_bytes(r))))
    }

    /// Every metadata cluster the header and tables point at.
    fn metadata_clusters(&self, f: &File) -> std::io::Result<Vec<(&'static str, u64)>> {
        let cs = self.cluster_size();
        let mut out = Vec::new();
        let span = |start: u64, len: u64| {
            let first = start / cs * cs;
            (first..start + len).step_by(cs as usize)
        };
        for c in span(self.l1_offset, self.l1_size * 8) {
            out.push(("L1 table", c));
        }
        for c in span(self.rt_offset, self.rt_clusters * cs) {
            out.push(("refcount table", c));
        }
        let mut rt = vec![0u8; (self.rt_clusters * cs) as usize];
        f.read_exact_at(&mut rt, self.rt_offset)?;
        for e in rt.chunks_exact(8) {
            let block = be64(e) & OFFSET_MASK;
            if block != 0 {
                out.push(("refcount block", block));
            }
        }
        let mut l1 = vec![0u8; (self.l1_size * 8) as usize];
        f.read_exact_at(&mut l1, self.l1_offset)?;
        for e in l1.chunks_exact(8) {
            let l2 = be64(e) & OFFSET_MASK;
            if l2 != 0 {
                out.push(("L2 table", l2));
            }
        }
        Ok(out)
    }
}

/// The referenced metadata clusters whose refcount on disk is 0.
pub fn unreferenced(f: &File) -> std::io::Result<Vec<Unreferenced>> {
    scan(f, false)
}

/// Sets each referenced metadata cluster's refcount of 0 to 1 and makes
/// that durable; returns what it repaired.
pub fn repair(f: &File) -> std::io::Result<Vec<Unreferenced>> {
    scan(f, true)
}

fn scan(f: &File, fix: bool) -> std::io::Result<Vec<Unreferenced>> {
    let Some(g) = geometry(f)? else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for (what, offset) in g.metadata_clusters(f)? {
        if let Some((at, 0)) = g.refcount(f, offset)? {
            if fix {
                f.write_all_at(&1u16.to_be_bytes(), at)?;
            }
            found.push(Unreferenced { what, offset });
        }
    }
    if fix && !found.is_empty() {
        f.sync_all()?;
    }
    Ok(found)
}
