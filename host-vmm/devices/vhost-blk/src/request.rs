//! virtio-blk requests: parsing a descriptor chain the guest wrote into a
//! [`Request`], and carrying it out against a [`BlockDevice`]. Pure: guest
//! memory and the disk are the only things touched, so the whole module is
//! tested over `virtio-queue`'s mock queue and an in-memory disk.
//!
//! The chain comes from the guest and is hostile until proven otherwise:
//! its length is bounded ([`MAX_DESCRIPTORS`]), readable descriptors must
//! come before writable ones, the header may span descriptors (any layout),
//! the status byte is the last byte of the last (writable) descriptor, and
//! every length is summed with checked arithmetic. A malformed request is
//! answered with `VIRTIO_BLK_S_IOERR` when the status byte can be located,
//! and completed with no status otherwise.

use std::ops::Deref;

use tandem_disk::BlockDevice;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// virtio-blk sectors are always 512 bytes, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request we advertise (`seg_max`).
pub const SEG_MAX: u32 = 254;
/// Descriptors per chain we accept: the data segments, the header and the status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Length of a `GET_ID` answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
/// Ranges per discard or write-zeroes request we advertise.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Sectors per discard or write-zeroes range we advertise (32 MiB): a raw
/// layer zeroes by writing, and the queue waits meanwhile.
pub const MAX_DISCARD_SECTORS: u32 = 65536;
/// Bytes moved between guest memory and the disk per step.
const CHUNK: usize = 1 << 20;
const HEADER_LEN: usize = 16;
const RANGE_LEN: usize = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: the only flag a range may carry.
const FLAG_UNMAP: u32 = 1;

/// One descriptor as the chain gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A run of guest memory carrying request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl Kind {
    fn from_type(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            other => Kind::Unsupported(other),
        }
    }
}

/// A well-formed request (its ranges are checked against the disk when it runs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    /// Readable data after the header (OUT, DISCARD, WRITE_ZEROES) or
    /// writable data before the status byte (IN, GET_ID).
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("the chain does not end in a writable status byte")]
    NoStatus,
    #[error("a readable descriptor follows a writable one")]
    ReadableAfterWritable,
    #[error("the header is {0} bytes, not {HEADER_LEN}")]
    ShortHeader(u64),
    #[error("the header is not in guest memory")]
    HeaderMemory,
    #[error("descriptor at {addr:#x}+{len:#x} wraps the address space")]
    Wraps { addr: u64, len: u32 },
    #[error("{kind:?} request carries data in the wrong direction")]
    WrongDirection { kind: Kind },
    #[error("{kind:?} request has a bad data length {len}")]
    BadLength { kind: Kind, len: u64 },
}

/// A malformed chain, and where its status byte is, if anywhere.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed {
    pub error: ParseError,
    pub status: Option<GuestAddress>,
}

/// Reads at most [`MAX_DESCRIPTORS`] descriptors of a chain (plus one, to
/// tell a chain that is too long). `virtio-queue` already bounds a chain by
/// the queue or indirect table size and stops at a bad indirect table.
pub fn collect<M>(chain: DescriptorChain<M>) -> Result<Vec<Desc>, Malformed>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descs: Vec<Desc> = chain
        .take(MAX_DESCRIPTORS + 1)
        .map(|d| Desc {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
        })
        .collect();
    if descs.len() > MAX_DESCRIPTORS {
        return Err(Malformed {
            error: ParseError::TooManyDescriptors,
            status: None,
        });
    }
    Ok(descs)
}

fn segment(d: &Desc) -> Result<Segment, ParseError> {
    if d.len > 0 && d.addr.checked_add(u64::from(d.len) - 1).is_none() {
        return Err(ParseError::Wraps {
            addr: d.addr,
            len: d.len,
        });
    }
    Ok(Segment {
        addr: GuestAddress(d.addr),
        len: d.len,
    })
}

fn total(segs: &[Segment]) -> u64 {
    // At most MAX_DESCRIPTORS u32 lengths: cannot overflow a u64.
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segs` after `at` bytes.
fn split(segs: &[Segment], mut at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    for s in segs {
        let len = u64::from(s.len);
        if at >= len {
            head.push(*s);
            at -= len;
        } else if at == 0 {
            tail.push(*s);
        } else {
            // at < len <= u32::MAX
            let a = at as u32;
            head.push(Segment {
                addr: s.addr,
                len: a,
            });
            tail.push(Segment {
                addr: GuestAddress(s.addr.0 + at),
                len: s.len - a,
            });
            at = 0;
        }
    }
    head.retain(|s| s.len > 0);
    tail.retain(|s| s.len > 0);
    (head, tail)
}

/// Copies from guest memory across segments into `buf`.
fn gather<M: GuestMemory>(mem: &M, segs: &[Segment], skip: u64, buf: &mut [u8]) -> bool {
    let mut skip = skip;
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = (len - skip) as usize;
        let n = avail.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(s.addr.0 + skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

/// Copies `buf` into guest memory across segments, starting `skip` bytes in.
fn scatter<M: GuestMemory>(mem: &M, segs: &[Segment], skip: u64, buf: &[u8]) -> bool {
    let mut skip = skip;
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = (len - skip) as usize;
        let n = avail.min(buf.len() - done);
        if mem
            .write_slice(&buf[done..done + n], GuestAddress(s.addr.0 + skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

/// Parses a chain's descriptors into a request.
pub fn parse<M: GuestMemory>(descs: &[Desc], mem: &M) -> Result<Request, Malformed> {
    let bad = |error, status| Err(Malformed { error, status });
    if descs.len() > MAX_DESCRIPTORS {
        return bad(ParseError::TooManyDescriptors, None);
    }
    let status = match descs.last() {
        Some(d) if d.writable && d.len > 0 => match d.addr.checked_add(u64::from(d.len) - 1) {
            Some(a) => GuestAddress(a),
            None => return bad(ParseError::NoStatus, None),
        },
        _ => return bad(ParseError::NoStatus, None),
    };
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return bad(ParseError::ReadableAfterWritable, Some(status));
    }
    let to_segs = |ds: &[Desc]| ds.iter().map(segment).collect::<Result<Vec<_>, _>>();
    let readable = to_segs(&descs[..first_writable]).map_err(|error| Malformed {
        error,
        status: Some(status),
    })?;
    let writable = to_segs(&descs[first_writable..]).map_err(|error| Malformed {
        error,
        status: Some(status),
    })?;
    let readable_len = total(&readable);
    if readable_len < HEADER_LEN as u64 {
        return bad(ParseError::ShortHeader(readable_len), Some(status));
    }
    let mut header = [0u8; HEADER_LEN];
    if !gather(mem, &readable, 0, &mut header) {
        return bad(ParseError::HeaderMemory, Some(status));
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let kind = Kind::from_type(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let (_, out_data) = split(&readable, HEADER_LEN as u64);
    // Everything writable but the status byte.
    let (in_data, _) = split(&writable, total(&writable) - 1);
    let (out_len, in_len) = (total(&out_data), total(&in_data));
    let request = |data: Vec<Segment>, data_len| {
        Ok(Request {
            kind,
            sector,
            data,
            data_len,
            status,
        })
    };
    let wrong = bad(ParseError::WrongDirection { kind }, Some(status));
    let length = |len| bad(ParseError::BadLength { kind, len }, Some(status));
    match kind {
        Kind::In | Kind::Out => {
            let (data, len, other) = if kind == Kind::In {
                (in_data, in_len, out_len)
            } else {
                (out_data, out_len, in_len)
            };
            if other != 0 {
                return wrong;
            }
            if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return length(len);
            }
            request(data, len)
        }
        Kind::Flush => {
            if out_len != 0 || in_len != 0 {
                return wrong;
            }
            request(Vec::new(), 0)
        }
        Kind::GetId => {
            if out_len != 0 {
                return wrong;
            }
            if in_len == 0 {
                return length(0);
            }
            request(in_data, in_len)
        }
        Kind::Discard | Kind::WriteZeroes => {
            if in_len != 0 {
                return wrong;
            }
            let ranges = out_len / RANGE_LEN as u64;
            if out_len == 0
                || !out_len.is_multiple_of(RANGE_LEN as u64)
                || ranges > u64::from(MAX_DISCARD_SEG)
            {
                return length(out_len);
            }
            request(out_data, out_len)
        }
        Kind::Unsupported(_) => request(Vec::new(), 0),
    }
}

/// What the device knows about its disk when it runs a request.
#[derive(Clone, Debug)]
pub struct DiskParams {
    /// Capacity in sectors.
    pub sectors: u64,
    pub readonly: bool,
    /// The `GET_ID` answer (at most [`ID_BYTES`]; shorter is NUL-padded by the guest).
    pub serial: Vec<u8>,
    /// Whether DISCARD and WRITE_ZEROES were offered.
    pub discard: bool,
}

/// What running a request did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Bytes written to the guest's buffers, status byte included.
    pub used_len: u32,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Why a request failed (logged; the guest sees `IOERR`).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("sectors {sector}+{bytes} bytes are outside the disk ({sectors} sectors)")]
    OutOfRange {
        sector: u64,
        bytes: u64,
        sectors: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("guest memory at the request's buffers is not accessible")]
    GuestMemory,
    #[error("discard range has flags {0:#x}")]
    RangeFlags(u32),
    #[error("discard range of {0} sectors is too long")]
    RangeTooLong(u32),
    #[error(transparent)]
    Disk(#[from] tandem_disk::DiskError),
}

fn byte_range(sector: u64, bytes: u64, sectors: u64) -> Result<u64, ExecError> {
    let oob = || ExecError::OutOfRange {
        sector,
        bytes,
        sectors,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(oob)?;
    let end = offset.checked_add(bytes).ok_or_else(oob)?;
    if end > sectors.saturating_mul(SECTOR_SIZE) {
        return Err(oob());
    }
    Ok(offset)
}

fn read<M: GuestMemory>(
    req: &Request,
    mem: &M,
    disk: &dyn BlockDevice,
    p: &DiskParams,
) -> Result<(), ExecError> {
    let offset = byte_range(req.sector, req.data_len, p.sectors)?;
    let mut buf = vec![0u8; (req.data_len as usize).min(CHUNK)];
    let mut done = 0u64;
    while done < req.data_len {
        let n = ((req.data_len - done) as usize).min(CHUNK);
        disk.read_at(&mut buf[..n], offset + done)?;
        if !scatter(mem, &req.data, done, &buf[..n]) {
            return Err(ExecError::GuestMemory);
        }
        done += n as u64;
    }
    Ok(())
}

fn write<M: GuestMemory>(
    req: &Request,
    mem: &M,
    disk: &dyn BlockDevice,
    p: &DiskParams,
) -> Result<(), ExecError> {
    if p.readonly {
        return Err(ExecError::ReadOnly);
    }
    let offset = byte_range(req.sector, req.data_len, p.sectors)?;
    let mut buf = vec![0u8; (req.data_len as usize).min(CHUNK)];
    let mut done = 0u64;
    while done < req.data_len {
        let n = ((req.data_len - done) as usize).min(CHUNK);
        if !gather(mem, &req.data, done, &mut buf[..n]) {
            return Err(ExecError::GuestMemory);
        }
        disk.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn discard<M: GuestMemory>(
    req: &Request,
    mem: &M,
    disk: &dyn BlockDevice,
    p: &DiskParams,
) -> Result<u64, ExecError> {
    if p.readonly {
        return Err(ExecError::ReadOnly);
    }
    let mut ranges = vec![0u8; req.data_len as usize];
    if !gather(mem, &req.data, 0, &mut ranges) {
        return Err(ExecError::GuestMemory);
    }
    // Check every range before touching the disk: all or nothing.
    let mut checked = Vec::new();
    for r in ranges.chunks_exact(RANGE_LEN) {
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&r[..8]);
        let sector = u64::from_le_bytes(sector);
        let num = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
        let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
        let allowed = if req.kind == Kind::WriteZeroes {
            FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(ExecError::RangeFlags(flags));
        }
        if num > MAX_DISCARD_SECTORS {
            return Err(ExecError::RangeTooLong(num));
        }
        let bytes = u64::from(num) * SECTOR_SIZE;
        checked.push((byte_range(sector, bytes, p.sectors)?, bytes));
    }
    let mut total = 0;
    for (offset, bytes) in checked {
        if bytes > 0 {
            // The disk layer's discard leaves the range reading as zeros,
            // which is what WRITE_ZEROES promises too (with or without UNMAP).
            disk.discard(offset, bytes)?;
        }
        total += bytes;
    }
    Ok(total)
}

/// Runs a parsed request and writes its status byte. Never fails: errors
/// become a status (and are returned for logging).
pub fn execute<M: GuestMemory>(
    req: &Request,
    mem: &M,
    disk: &dyn BlockDevice,
    p: &DiskParams,
) -> (Outcome, Option<ExecError>) {
    let mut out = Outcome {
        status: VIRTIO_BLK_S_OK as u8,
        used_len: 1,
        ..Default::default()
    };
    let result = match req.kind {
        Kind::In => read(req, mem, disk, p).map(|()| {
            out.bytes_read = req.data_len;
            // IN lengths are at most MAX_DESCRIPTORS * u32::MAX; the used
            // length saturates (the guest only checks it against its buffer).
            out.used_len = u32::try_from(req.data_len + 1).unwrap_or(u32::MAX);
        }),
        Kind::Out => write(req, mem, disk, p).map(|()| out.bytes_written = req.data_len),
        Kind::Flush => disk.flush().map_err(ExecError::from),
        Kind::GetId => {
            let n = (req.data_len as usize).min(ID_BYTES);
            let mut id = [0u8; ID_BYTES];
            let len = p.serial.len().min(ID_BYTES);
            id[..len].copy_from_slice(&p.serial[..len]);
            if scatter(mem, &req.data, 0, &id[..n]) {
                out.used_len = n as u32 + 1;
                Ok(())
            } else {
                Err(ExecError::GuestMemory)
            }
        }
        Kind::Discard | Kind::WriteZeroes if p.discard => {
            discard(req, mem, disk, p).map(|n| out.bytes_written = n)
        }
        Kind::Discard | Kind::WriteZeroes | Kind::Unsupported(_) => {
            out.status = VIRTIO_BLK_S_UNSUPP as u8;
            Ok(())
        }
    };
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            out = Outcome {
                status: VIRTIO_BLK_S_IOERR as u8,
                used_len: 1,
                ..Default::default()
            };
            Some(e)
        }
    };
    if mem.write_obj(out.status, req.status).is_err() {
        out.used_len = 0;
    }
    (out, error)
}

/// Answers a malformed chain: `IOERR` in its status byte if it has one.
/// Returns the used length.
pub fn reject<M: GuestMemory>(m: &Malformed, mem: &M) -> u32 {
    match m.status {
        Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, addr).is_ok() => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tandem_disk::DiskError;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    /// An in-memory disk.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        flushes: Mutex<u32>,
    }

    impl MemDisk {
        fn new(size: usize) -> MemDisk {
            MemDisk {
                data: Mutex::new((0..size).map(|i| (i / 512) as u8).collect()),
                flushes: Mutex::new(0),
            }
        }
    }

    impl BlockDevice for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn writable(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_disk::Result<()> {
            let d = self.data.lock().unwrap();
            let o = offset as usize;
            if o + buf.len() > d.len() {
                return Err(DiskError::OutOfBounds {
                    offset,
                    len: buf.len() as u64,
                    size: d.len() as u64,
                });
            }
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> tandem_disk::Result<()> {
            let mut d = self.data.lock().unwrap();
            let o = offset as usize;
            assert!(
                o + buf.len() <= d.len(),
                "write past the end reached the disk"
            );
            assert!(
                o.is_multiple_of(512) && buf.len().is_multiple_of(512),
                "unaligned write"
            );
            d[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> tandem_disk::Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> tandem_disk::Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    const DISK: usize = 64 * 1024;
    const BUF: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn params() -> DiskParams {
        DiskParams {
            sectors: DISK as u64 / 512,
            readonly: false,
            serial: b"tandem-serial".to_vec(),
            discard: true,
        }
    }

    fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn raw(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Builds `descs` as one chain on a mock queue and parses it.
    fn chain(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, Malformed> {
        let q = MockSplitQueue::new(mem, 256);
        let c = q.build_desc_chain(descs).unwrap();
        let ds = collect(c)?;
        parse(&ds, mem)
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(at)).unwrap()
    }

    #[test]
    fn read_spanning_segments() {
        let m = mem();
        let disk = MemDisk::new(DISK);
        header(&m, BUF, VIRTIO_BLK_T_IN, 3);
        let req = chain(
            &m,
            &[
                raw(BUF, 16, false),
                raw(BUF + 0x1000, 100, true),
                raw(BUF + 0x2000, 924, true),
                raw(BUF + 0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(req.kind, Kind::In);
        assert_eq!(req.data_len, 1024);
        let (out, err) = execute(&req, &m, &disk, &params());
        assert!(err.is_none(), "{err:?}");
        assert_eq!(out.status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(out.used_len, 1025);
        assert_eq!(status(&m, BUF + 0x3000), 0);
        let mut got = vec![0u8; 100];
        m.read_slice(&mut got, GuestAddress(BUF + 0x1000)).unwrap();
        assert!(got.iter().all(|&b| b == 3));
        let mut got = vec![0u8; 924];
        m.read_slice(&mut got, GuestAddress(BUF + 0x2000)).unwrap();
        assert!(got[..412].iter().all(|&b| b == 3) && got[412..].iter().all(|&b| b == 4));
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor() {
        let m = mem();
        let disk = MemDisk::new(DISK);
        header(&m, BUF, VIRTIO_BLK_T_OUT, 10);
        m.write_slice(&[0xab; 512], GuestAddress(BUF + 16)).unwrap();
        // Header, data and status split arbitrarily (any layout).
        let req = chain(&m, &[raw(BUF, 16 + 512, false), raw(BUF + 0x1000, 1, true)]).unwrap();
        assert_eq!(req.kind, Kind::Out);
        assert_eq!(req.data_len, 512);
        let (out, err) = execute(&req, &m, &disk, &params());
        assert!(err.is_none());
        assert_eq!((out.status, out.used_len, out.bytes_written), (0, 1, 512));
        let d = disk.data.lock().unwrap();
        assert!(d[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
        assert!(d[11 * 512..12 * 512].iter().all(|&b| b == 11));
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let m = mem();
        let disk = MemDisk::new(DISK);
        header(&m, BUF, VIRTIO_BLK_T_FLUSH, 0);
        let req = chain(&m, &[raw(BUF, 16, false), raw(BUF + 0x100, 1, true)]).unwrap();
        let (out, _) = execute(&req, &m, &disk, &params());
        assert_eq!(out.status, 0);
        assert_eq!(*disk.flushes.lock().unwrap(), 1);

        header(&m, BUF, VIRTIO_BLK_T_GET_ID, 0);
        let req = chain(
            &m,
            &[
                raw(BUF, 16, false),
                raw(BUF + 0x200, 20, true),
                raw(BUF + 0x300, 1, true),
            ],
        )
        .unwrap();
        let (out, _) = execute(&req, &m, &disk, &params());
        assert_eq!((out.status, out.used_len), (0, 21));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(BUF + 0x200)).unwrap();
        assert_eq!(&id[..13], b"tandem-serial");
        assert!(id[13..].iter().all(|&b| b == 0));

        header(&m, BUF, 77, 0);
        let req = chain(&m, &[raw(BUF, 16, false), raw(BUF + 0x100, 1, true)]).unwrap();
        let (out, _) = execute(&req, &m, &disk, &params());
        assert_eq!(out.status, VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(status(&m, BUF + 0x100), VIRTIO_BLK_S_UNSUPP as u8);

        let mut p = params();
        p.discard = false;
        header(&m, BUF, VIRTIO_BLK_T_DISCARD, 0);
        m.write_slice(&[0u8; 16], GuestAddress(BUF + 16)).unwrap();
        let req = chain(&m, &[raw(BUF, 32, false), raw(BUF + 0x100, 1, true)]).unwrap();
        let (out, _) = execute(&req, &m, &disk, &p);
        assert_eq!(out.status, VIRTIO_BLK_S_UNSUPP as u8);
    }

    fn range(sector: u64, num: u32, flags: u32) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&num.to_le_bytes());
        r[12..].copy_from_slice(&flags.to_le_bytes());
        r
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let disk = MemDisk::new(DISK);
        header(&m, BUF, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        m.write_slice(&range(2, 2, FLAG_UNMAP), GuestAddress(BUF + 16))
            .unwrap();
        m.write_slice(&range(8, 1, 0), GuestAddress(BUF + 32))
            .unwrap();
        let req = chain(&m, &[raw(BUF, 48, false), raw(BUF + 0x100, 1, true)]).unwrap();
        let (out, err) = execute(&req, &m, &disk, &params());
        assert!(err.is_none(), "{err:?}");
        assert_eq!((out.status, out.bytes_written), (0, 3 * 512));
        {
            let d = disk.data.lock().unwrap();
            assert!(d[2 * 512..4 * 512].iter().all(|&b| b == 0));
            assert!(d[4 * 512..5 * 512].iter().all(|&b| b == 4));
            assert!(d[8 * 512..9 * 512].iter().all(|&b| b == 0));
        }
        // DISCARD may not carry the unmap flag; a range past the end fails
        // the whole request before anything is discarded.
        header(&m, BUF, VIRTIO_BLK_T_DISCARD, 0);
        for (r, needle) in [
            (range(20, 1, FLAG_UNMAP), "flags"),
            (range(DISK as u64 / 512, 1, 0), "outside"),
            (range(u64::MAX, 1, 0), "outside"),
            (range(0, MAX_DISCARD_SECTORS + 1, 0), "too long"),
        ] {
            m.write_slice(&range(20, 1, 0), GuestAddress(BUF + 16))
                .unwrap();
            m.write_slice(&r, GuestAddress(BUF + 32)).unwrap();
            let req = chain(&m, &[raw(BUF, 48, false), raw(BUF + 0x100, 1, true)]).unwrap();
            let (out, err) = execute(&req, &m, &disk, &params());
            assert_eq!(out.status, VIRTIO_BLK_S_IOERR as u8);
            assert!(err.unwrap().to_string().contains(needle));
            assert!(disk.data.lock().unwrap()[20 * 512..21 * 512]
                .iter()
                .all(|&b| b == 20));
        }
    }

    #[test]
    fn out_of_range_and_read_only() {
        let m = mem();
        let disk = MemDisk::new(DISK);
        let last = DISK as u64 / 512 - 1;
        for (t, sector, len) in [
            (VIRTIO_BLK_T_IN, last, 1024u32),
            (VIRTIO_BLK_T_OUT, last + 1, 512),
            (VIRTIO_BLK_T_OUT, u64::MAX / 256, 512),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
        ] {
            header(&m, BUF, t, sector);
            let write = t == VIRTIO_BLK_T_IN;
            let req = chain(
                &m,
                &[
                    raw(BUF, 16, false),
                    raw(BUF + 0x1000, len, write),
                    raw(BUF + 0x100, 1, true),
                ],
            )
            .unwrap();
            let (out, err) = execute(&req, &m, &disk, &params());
            assert_eq!((out.status, out.used_len), (VIRTIO_BLK_S_IOERR as u8, 1));
            assert!(matches!(err, Some(ExecError::OutOfRange { .. })), "{err:?}");
            assert_eq!(status(&m, BUF + 0x100), VIRTIO_BLK_S_IOERR as u8);
        }
        let mut p = params();
        p.readonly = true;
        header(&m, BUF, VIRTIO_BLK_T_OUT, 0);
        let req = chain(
            &m,
            &[
                raw(BUF, 16, false),
                raw(BUF + 0x1000, 512, false),
                raw(BUF + 0x100, 1, true),
            ],
        )
        .unwrap();
        let (out, err) = execute(&req, &m, &disk, &p);
        assert_eq!(out.status, VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(err, Some(ExecError::ReadOnly)));
        assert_eq!(disk.data.lock().unwrap()[0], 0);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, BUF, VIRTIO_BLK_T_IN, 0);
        let cases: Vec<(Vec<RawDescriptor>, ParseError, bool)> = vec![
            // No writable status.
            (vec![raw(BUF, 16, false)], ParseError::NoStatus, false),
            // Zero-length status descriptor.
            (
                vec![raw(BUF, 16, false), raw(BUF + 0x100, 0, true)],
                ParseError::NoStatus,
                false,
            ),
            // Short header.
            (
                vec![raw(BUF, 8, false), raw(BUF + 0x100, 1, true)],
                ParseError::ShortHeader(8),
                true,
            ),
            // Readable after writable.
            (
                vec![
                    raw(BUF, 16, false),
                    raw(BUF + 0x1000, 512, true),
                    raw(BUF + 0x2000, 512, false),
                    raw(BUF + 0x100, 1, true),
                ],
                ParseError::ReadableAfterWritable,
                true,
            ),
            // Read with no data.
            (
                vec![raw(BUF, 16, false), raw(BUF + 0x100, 1, true)],
                ParseError::BadLength {
                    kind: Kind::In,
                    len: 0,
                },
                true,
            ),
            // Read of a partial sector.
            (
                vec![
                    raw(BUF, 16, false),
                    raw(BUF + 0x1000, 100, true),
                    raw(BUF + 0x100, 1, true),
                ],
                ParseError::BadLength {
                    kind: Kind::In,
                    len: 100,
                },
                true,
            ),
            // Read carrying data to the device.
            (
                vec![
                    raw(BUF, 16 + 512, false),
                    raw(BUF + 0x1000, 512, true),
                    raw(BUF + 0x100, 1, true),
                ],
                ParseError::WrongDirection { kind: Kind::In },
                true,
            ),
            // Header outside guest memory.
            (
                vec![raw(0x1000_0000, 16, false), raw(BUF + 0x100, 1, true)],
                ParseError::HeaderMemory,
                true,
            ),
            // A descriptor that wraps the address space.
            (
                vec![
                    raw(BUF, 16, false),
                    raw(u64::MAX - 10, 512, true),
                    raw(BUF + 0x100, 1, true),
                ],
                ParseError::Wraps {
                    addr: u64::MAX - 10,
                    len: 512,
                },
                true,
            ),
        ];
        for (descs, error, has_status) in cases {
            m.write_obj(0xffu8, GuestAddress(BUF + 0x100)).unwrap();
            let got = chain(&m, &descs).unwrap_err();
            assert_eq!(got.error, error);
            assert_eq!(got.status.is_some(), has_status, "{error}");
            let used = reject(&got, &m);
            if has_status {
                assert_eq!(used, 1);
                assert_eq!(status(&m, BUF + 0x100), VIRTIO_BLK_S_IOERR as u8);
            } else {
                assert_eq!(used, 0);
            }
        }
    }

    #[test]
    fn status_outside_memory_completes_with_no_length() {
        let m = mem();
        let disk = MemDisk::new(DISK);
        header(&m, BUF, VIRTIO_BLK_T_FLUSH, 0);
        let req = chain(&m, &[raw(BUF, 16, false), raw(0x1000_0000, 1, true)]).unwrap();
        let (out, _) = execute(&req, &m, &disk, &params());
        assert_eq!(out.used_len, 0);
    }

    #[test]
    fn too_many_descriptors() {
        let m = mem();
        header(&m, BUF, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![raw(BUF, 16, false)];
        descs.extend((0..MAX_DESCRIPTORS).map(|i| raw(BUF + 0x1000 + i as u64 * 512, 512, true)));
        // A queue of 256 cannot hold 257 descriptors: use the parser directly.
        let ds: Vec<Desc> = descs
            .iter()
            .map(|d| {
                let d = SplitDescriptor::from(*d);
                Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.flags() & VRING_DESC_F_WRITE as u16 != 0,
                }
            })
            .collect();
        assert_eq!(
            parse(&ds, &m).unwrap_err().error,
            ParseError::TooManyDescriptors
        );
        // On the queue, a chain longer than the limit is cut by collect.
        let q = MockSplitQueue::new(&m, 1024);
        let long: Vec<RawDescriptor> = (0..300u16)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    BUF,
                    16,
                    VRING_DESC_F_NEXT as u16 | VRING_DESC_F_WRITE as u16,
                    i + 1,
                ))
            })
            .collect();
        let c = q.build_desc_chain(&long).unwrap();
        assert_eq!(
            collect(c).unwrap_err().error,
            ParseError::TooManyDescriptors
        );
    }

    #[test]
    fn large_request_moves_in_chunks() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let disk = MemDisk::new(4 << 20);
        let mut p = params();
        p.sectors = (4 << 20) / 512;
        header(&m, BUF, VIRTIO_BLK_T_OUT, 8);
        let data: Vec<u8> = (0..(3 << 20) / 2).map(|i| (i % 251) as u8).collect();
        m.write_slice(&data, GuestAddress(0x20_0000)).unwrap();
        // Segments that are not multiples of 512: the chunking still writes
        // whole sectors.
        let req = chain(
            &m,
            &[
                raw(BUF, 16, false),
                raw(0x20_0000, 1000, false),
                raw(0x20_0000 + 1000, (data.len() - 1000) as u32, false),
                raw(BUF + 0x100, 1, true),
            ],
        )
        .unwrap();
        let (out, err) = execute(&req, &m, &disk, &p);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(out.bytes_written, data.len() as u64);
        assert_eq!(
            &disk.data.lock().unwrap()[8 * 512..8 * 512 + data.len()],
            &data[..]
        );
        header(&m, BUF, VIRTIO_BLK_T_IN, 8);
        let req = chain(
            &m,
            &[
                raw(BUF, 16, false),
                raw(0x50_0000, data.len() as u32, true),
                raw(BUF + 0x100, 1, true),
            ],
        )
        .unwrap();
        let (out, _) = execute(&req, &m, &disk, &p);
        assert_eq!(out.used_len as usize, data.len() + 1);
        let mut back = vec![0u8; data.len()];
        m.read_slice(&mut back, GuestAddress(0x50_0000)).unwrap();
        assert_eq!(back, data);
    }
}
