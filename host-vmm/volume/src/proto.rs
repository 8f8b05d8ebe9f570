//! The volume socket's wire format, version 1. All integers little-endian.
//!
//! On connect the server sends a [`Hello`] (32 bytes). The client then
//! sends requests, one at a time or pipelined: a [`RequestHeader`] (24
//! bytes), followed for a write by `len` bytes of data. The server answers
//! each, in order, with a [`ResponseHeader`] (16 bytes), followed for a
//! successful read by `len` bytes. A header that does not parse ends the
//! connection (the peer is broken); a request that parses but cannot be
//! served (out of range, read-only) is answered with its status, its
//! write data consumed.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const MAGIC: [u8; 4] = *b"TVOL";
pub const VERSION: u16 = 1;
/// Offsets and lengths are multiples of this.
pub const SECTOR: u64 = 512;
/// The largest read or write.
pub const MAX_TRANSFER: u32 = 2 << 20;
/// `Hello::flags`: the volume refuses writes.
pub const FLAG_READONLY: u16 = 1;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("not a Tandem volume socket (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("volume protocol version {0} (this side speaks {VERSION})")]
    Version(u16),
    #[error("unknown operation {0}")]
    Op(u8),
    #[error("transfer of {0} bytes (at most {MAX_TRANSFER}, a multiple of {SECTOR})")]
    Length(u32),
    #[error("offset {0} is not a multiple of {SECTOR}")]
    Offset(u64),
    #[error("a flush carries no offset or length")]
    FlushRange,
    #[error("volume size {0} is not a whole number of sectors")]
    Size(u64),
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: U16,
    pub flags: U16,
    pub size: U64,
    pub reserved: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RequestHeader {
    pub op: u8,
    pub reserved: [u8; 3],
    pub len: U32,
    pub offset: U64,
    pub tag: U64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ResponseHeader {
    pub tag: U64,
    pub status: u8,
    pub reserved: [u8; 3],
    pub len: U32,
}

pub const HELLO_LEN: usize = std::mem::size_of::<Hello>();
pub const REQUEST_LEN: usize = std::mem::size_of::<RequestHeader>();
pub const RESPONSE_LEN: usize = std::mem::size_of::<ResponseHeader>();

/// What the server says about its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub readonly: bool,
}

impl Geometry {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let h = Hello {
            magic: MAGIC,
            version: VERSION.into(),
            flags: if self.readonly { FLAG_READONLY } else { 0 }.into(),
            size: self.size.into(),
            reserved: [0; 16],
        };
        let mut out = [0; HELLO_LEN];
        out.copy_from_slice(h.as_bytes());
        out
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Geometry, ProtoError> {
        let h = Hello::read_from_bytes(b).map_err(|_| ProtoError::Magic([0; 4]))?;
        if h.magic != MAGIC {
            return Err(ProtoError::Magic(h.magic));
        }
        if h.version.get() != VERSION {
            return Err(ProtoError::Version(h.version.get()));
        }
        let size = h.size.get();
        if size % SECTOR != 0 {
            return Err(ProtoError::Size(size));
        }
        Ok(Geometry {
            size,
            readonly: h.flags.get() & FLAG_READONLY != 0,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Every write answered before the flush was sent is durable when
    /// the flush is answered.
    Flush,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Read => 1,
            Op::Write => 2,
            Op::Flush => 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u32,
    pub tag: u64,
}

/// A request's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The backend failed the operation (its log says why).
    IoError,
    /// Beyond the end of the volume.
    OutOfRange,
    /// A write on a read-only volume.
    ReadOnly,
    /// The backend has closed the volume (its VM has gone).
    Closed,
}

impl Status {
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::IoError => 1,
            Status::OutOfRange => 2,
            Status::ReadOnly => 3,
            Status::Closed => 4,
        }
    }
    pub fn from_code(c: u8) -> Option<Status> {
        Some(match c {
            0 => Status::Ok,
            1 => Status::IoError,
            2 => Status::OutOfRange,
            3 => Status::ReadOnly,
            4 => Status::Closed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::IoError => "I/O error in the volume's backend",
            Status::OutOfRange => "beyond the end of the volume",
            Status::ReadOnly => "the volume is read-only",
            Status::Closed => "the volume's backend has closed it",
        })
    }
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let h = RequestHeader {
            op: self.op.code(),
            reserved: [0; 3],
            len: self.len.into(),
            offset: self.offset.into(),
            tag: self.tag.into(),
        };
        let mut out = [0; REQUEST_LEN];
        out.copy_from_slice(h.as_bytes());
        out
    }

    /// Parses and checks a header by itself (not against a volume).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let h = RequestHeader::read_from_bytes(b).map_err(|_| ProtoError::Op(0))?;
        let op = match h.op {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            other => return Err(ProtoError::Op(other)),
        };
        let (len, offset) = (h.len.get(), h.offset.get());
        if op == Op::Flush {
            if len != 0 || offset != 0 {
                return Err(ProtoError::FlushRange);
            }
        } else {
            if len == 0 || len > MAX_TRANSFER || u64::from(len) % SECTOR != 0 {
                return Err(ProtoError::Length(len));
            }
            if offset % SECTOR != 0 {
                return Err(ProtoError::Offset(offset));
            }
        }
        Ok(Request {
            op,
            offset,
            len,
            tag: h.tag.get(),
        })
    }

    /// Bytes of write data that follow the header.
    pub fn payload_len(&self) -> usize {
        match self.op {
            Op::Write => self.len as usize,
            Op::Read | Op::Flush => 0,
        }
    }

    /// Whether this volume can serve the request.
    pub fn check(&self, volume: Geometry) -> Status {
        if volume.readonly && self.op == Op::Write {
            return Status::ReadOnly;
        }
        let end = self.offset.checked_add(u64::from(self.len));
        if end.is_none_or(|e| e > volume.size) {
            return Status::OutOfRange;
        }
        Status::Ok
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub tag: u64,
    pub status: Status,
    /// Bytes of read data that follow.
    pub len: u32,
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        let h = ResponseHeader {
            tag: self.tag.into(),
            status: self.status.code(),
            reserved: [0; 3],
            len: self.len.into(),
        };
        let mut out = [0; RESPONSE_LEN];
        out.copy_from_slice(h.as_bytes());
        out
    }

    pub fn decode(b: &[u8; RESPONSE_LEN]) -> Result<Response, ProtoError> {
        let h = ResponseHeader::read_from_bytes(b).map_err(|_| ProtoError::Op(0))?;
        let status = Status::from_code(h.status).ok_or(ProtoError::Op(h.status))?;
        let len = h.len.get();
        if len > MAX_TRANSFER || (status != Status::Ok && len != 0) {
            return Err(ProtoError::Length(len));
        }
        Ok(Response {
            tag: h.tag.get(),
            status,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_their_documented_sizes() {
        assert_eq!((HELLO_LEN, REQUEST_LEN, RESPONSE_LEN), (32, 24, 16));
    }

    #[test]
    fn a_request_round_trips_and_a_bad_one_is_named() {
        let r = Request {
            op: Op::Write,
            offset: 4096,
            len: 8192,
            tag: 7,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] = 9;
        assert_eq!(Request::decode(&b), Err(ProtoError::Op(9)));
        for (len, offset, e) in [
            (0, 0, ProtoError::Length(0)),
            (100, 0, ProtoError::Length(100)),
            (
                MAX_TRANSFER + 512,
                0,
                ProtoError::Length(MAX_TRANSFER + 512),
            ),
            (512, 3, ProtoError::Offset(3)),
        ] {
            let bad = Request { len, offset, ..r };
            assert_eq!(Request::decode(&bad.encode()), Err(e));
        }
        let flush = Request {
            op: Op::Flush,
            offset: 0,
            len: 512,
            tag: 1,
        };
        assert_eq!(
            Request::decode(&flush.encode()),
            Err(ProtoError::FlushRange)
        );
    }

    #[test]
    fn requests_are_checked_against_the_volume() {
        let v = Geometry {
            size: 1 << 20,
            readonly: false,
        };
        let at = |op, offset, len| Request {
            op,
            offset,
            len,
            tag: 0,
        };
        assert_eq!(at(Op::Read, (1 << 20) - 512, 512).check(v), Status::Ok);
        assert_eq!(at(Op::Read, 1 << 20, 512).check(v), Status::OutOfRange);
        assert_eq!(
            at(Op::Write, u64::MAX - 511, 512).check(v),
            Status::OutOfRange
        );
        let ro = Geometry {
            readonly: true,
            ..v
        };
        assert_eq!(at(Op::Write, 0, 512).check(ro), Status::ReadOnly);
        assert_eq!(at(Op::Flush, 0, 0).check(ro), Status::Ok);
        assert_eq!(at(Op::Read, 0, 512).check(ro), Status::Ok);
    }

    #[test]
    fn hello_and_response_round_trip_and_refuse_strangers() {
        let g = Geometry {
            size: 1 << 30,
            readonly: true,
        };
        assert_eq!(Geometry::decode(&g.encode()), Ok(g));
        let mut b = g.encode();
        b[0] = b'X';
        assert!(matches!(Geometry::decode(&b), Err(ProtoError::Magic(_))));
        let mut b = g.encode();
        b[4] = 2;
        assert_eq!(Geometry::decode(&b), Err(ProtoError::Version(2)));
        let r = Response {
            tag: 3,
            status: Status::Ok,
            len: 4096,
        };
        assert_eq!(Response::decode(&r.encode()), Ok(r));
        let bad = Response {
            status: Status::IoError,
            ..r
        };
        assert_eq!(
            Response::decode(&bad.encode()),
            Err(ProtoError::Length(4096))
        );
    }
}
