//! virtio-scsi requests (virtio 1.2, 5.6.6): parsing the descriptor chains
//! the guest puts on the request and control queues, and writing the
//! responses back. Pure: guest memory is the only thing touched, so the
//! module is tested over `virtio-queue`'s mock queue.
//!
//! A chain is hostile until proven otherwise: its length is bounded,
//! readable descriptors come before writable ones, headers may span
//! descriptors, every length is summed with checked arithmetic and data is
//! bounded by the tunnel's largest transfer. The default `cdb_size` (32)
//! and `sense_size` (96) are the only ones used (QEMU's config space
//! leaves them at that and Linux never changes them).

use std::ops::Deref;

use tandem_share::proto::{MAX_DATA, NO_LUN};
use virtio_bindings::bindings::virtio_scsi::{
    VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE, VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub const CDB_SIZE: usize = VIRTIO_SCSI_CDB_DEFAULT_SIZE as usize;
pub const SENSE_SIZE: usize = VIRTIO_SCSI_SENSE_DEFAULT_SIZE as usize;
/// `virtio_scsi_cmd_req`: lun (8), id (8), task_attr, prio, crn, cdb.
pub const CMD_REQ_LEN: usize = 19 + CDB_SIZE;
/// `virtio_scsi_cmd_resp`: sense_len, resid, status_qualifier, status,
/// response, sense.
pub const CMD_RESP_LEN: usize = 12 + SENSE_SIZE;
/// `virtio_scsi_ctrl_tmf_req`: type, subtype, lun, id.
const TMF_REQ_LEN: usize = 24;
/// `virtio_scsi_ctrl_an_req`: type, lun, event_requested.
const AN_REQ_LEN: usize = 16;
/// Descriptors per chain accepted (QEMU's queue size plus header and
/// response).
pub const MAX_DESCRIPTORS: usize = 1026;

/// One descriptor as the chain gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A run of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a readable descriptor follows a writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x}+{len:#x} wraps the address space")]
    Wraps { addr: u64, len: u32 },
    #[error("the request header is {0} bytes, not {1}")]
    ShortRequest(u64, usize),
    #[error("the response room is {0} bytes, not {1}")]
    ShortResponse(u64, usize),
    #[error("the chain carries data both ways")]
    Bidirectional,
    #[error("data of {0} bytes is over the limit")]
    TooMuchData(u64),
    #[error("guest memory at the request is not readable")]
    Memory,
}

/// A malformed chain, and where its response goes if that is known.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed {
    pub error: ParseError,
    /// The response segments, when the chain had room for a response.
    pub response: Option<Vec<Segment>>,
}

/// Where a virtio-scsi LUN address points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address {
    /// Target 0 and this LUN (`NO_LUN` when its format is not one we
    /// decode: the target then answers as for a missing LUN).
    Lun(u16),
    /// Another target: there is none.
    BadTarget,
}

/// Decodes the 8-byte virtio-scsi LUN: byte 0 is 1, byte 1 the target,
/// bytes 2-3 the LUN in SAM's peripheral or flat format.
pub fn decode_lun(l: &[u8; 8]) -> Address {
    if l[0] != 1 || l[1] != 0 {
        return Address::BadTarget;
    }
    if l[4..].iter().any(|&b| b != 0) {
        return Address::Lun(NO_LUN);
    }
    match l[2] >> 6 {
        0 if l[2] == 0 => Address::Lun(u16::from(l[3])),
        1 => Address::Lun((u16::from(l[2] & 0x3f) << 8) | u16::from(l[3])),
        _ => Address::Lun(NO_LUN),
    }
}

/// A well-formed command request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdRequest {
    pub lun: [u8; 8],
    pub tag: u64,
    pub task_attr: u8,
    /// The CDB cut to its opcode's length (all 32 bytes if unknown).
    pub cdb: Vec<u8>,
    pub data_out: Vec<u8>,
    /// Where the response header goes.
    pub response: Vec<Segment>,
    /// Room for data-in after it.
    pub data_in: Vec<Segment>,
    pub data_in_len: u32,
}

/// A control queue request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlRequest {
    /// A task management function; the response is one byte.
    Tmf {
        subtype: u32,
        lun: [u8; 8],
        tag: u64,
        response: Vec<Segment>,
    },
    /// Asynchronous notification query or subscription: event_actual (4)
    /// and response (1).
    An {
        lun: [u8; 8],
        requested: u32,
        response: Vec<Segment>,
    },
    /// Another type; answered with a bare failure if there is room.
    Unknown { kind: u32, response: Vec<Segment> },
}

/// Reads at most [`MAX_DESCRIPTORS`] descriptors of a chain (plus one, to
/// tell a chain that is too long).
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
            response: None,
        });
    }
    Ok(descs)
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

/// Copies `buf.len()` bytes from guest memory across segments.
fn gather<M: GuestMemory>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Copies `buf` into guest memory across segments.
pub fn scatter<M: GuestMemory>(mem: &M, segs: &[Segment], buf: &[u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        if mem.write_slice(&buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Splits descriptors into readable and writable segments, checked.
fn segments(descs: &[Desc]) -> Result<(Vec<Segment>, Vec<Segment>), ParseError> {
    if descs.len() > MAX_DESCRIPTORS {
        return Err(ParseError::TooManyDescriptors);
    }
    let (mut r, mut w) = (Vec::new(), Vec::new());
    for d in descs {
        if d.len > 0 && d.addr.checked_add(u64::from(d.len) - 1).is_none() {
            return Err(ParseError::Wraps {
                addr: d.addr,
                len: d.len,
            });
        }
        let s = Segment {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        if d.writable {
            w.push(s);
        } else if !w.is_empty() {
            return Err(ParseError::ReadableAfterWritable);
        } else {
            r.push(s);
        }
    }
    Ok((r, w))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses a request queue chain.
pub fn parse_cmd<M: GuestMemory>(descs: &[Desc], mem: &M) -> Result<CmdRequest, Malformed> {
    let bad = |error, response| Err(Malformed { error, response });
    let (readable, writable) = match segments(descs) {
        Ok(rw) => rw,
        Err(e) => return bad(e, None),
    };
    let wlen = total(&writable);
    if wlen < CMD_RESP_LEN as u64 {
        return bad(ParseError::ShortResponse(wlen, CMD_RESP_LEN), None);
    }
    let (response, data_in) = split(&writable, CMD_RESP_LEN as u64);
    let rlen = total(&readable);
    if rlen < CMD_REQ_LEN as u64 {
        return bad(ParseError::ShortRequest(rlen, CMD_REQ_LEN), Some(response));
    }
    let (header, data_out_segs) = split(&readable, CMD_REQ_LEN as u64);
    let mut h = [0u8; CMD_REQ_LEN];
    if !gather(mem, &header, &mut h) {
        return bad(ParseError::Memory, Some(response));
    }
    let out_len = rlen - CMD_REQ_LEN as u64;
    let in_len = total(&data_in);
    if out_len > 0 && in_len > 0 {
        return bad(ParseError::Bidirectional, Some(response));
    }
    if out_len.max(in_len) > MAX_DATA as u64 {
        return bad(ParseError::TooMuchData(out_len.max(in_len)), Some(response));
    }
    // Bounded by MAX_DATA just above.
    let mut data_out = vec![0u8; out_len as usize];
    if !gather(mem, &data_out_segs, &mut data_out) {
        return bad(ParseError::Memory, Some(response));
    }
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&h[0..8]);
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&h[8..16]);
    let cdb_all = &h[19..19 + CDB_SIZE];
    let cdb_len = tandem_scsi::cdb::cdb_len(cdb_all[0])
        .unwrap_or(CDB_SIZE)
        .min(CDB_SIZE);
    Ok(CmdRequest {
        lun,
        tag: u64::from_le_bytes(tag),
        task_attr: h[16],
        cdb: cdb_all[..cdb_len].to_vec(),
        data_out,
        response,
        data_in,
        data_in_len: in_len as u32,
    })
}

/// Parses a control queue chain.
pub fn parse_ctrl<M: GuestMemory>(descs: &[Desc], mem: &M) -> Result<CtrlRequest, Malformed> {
    let bad = |error, response| Err(Malformed { error, response });
    let (readable, writable) = match segments(descs) {
        Ok(rw) => rw,
        Err(e) => return bad(e, None),
    };
    let mut t = [0u8; 4];
    if total(&readable) < 4 || !gather(mem, &readable, &mut t) {
        return bad(ParseError::ShortRequest(total(&readable), 4), None);
    }
    let kind = le32(&t);
    let (need_req, need_resp) = match kind {
        VIRTIO_SCSI_T_TMF => (TMF_REQ_LEN, 1),
        VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => (AN_REQ_LEN, 5),
        _ => {
            return Ok(CtrlRequest::Unknown {
                kind,
                response: writable,
            })
        }
    };
    let wlen = total(&writable);
    if wlen < need_resp as u64 {
        return bad(ParseError::ShortResponse(wlen, need_resp), None);
    }
    let (response, _) = split(&writable, need_resp as u64);
    let mut h = [0u8; TMF_REQ_LEN];
    let h = &mut h[..need_req];
    if total(&readable) < need_req as u64 {
        return bad(
            ParseError::ShortRequest(total(&readable), need_req),
            Some(response),
        );
    }
    if !gather(mem, &readable, h) {
        return bad(ParseError::Memory, Some(response));
    }
    let mut lun = [0u8; 8];
    Ok(if kind == VIRTIO_SCSI_T_TMF {
        lun.copy_from_slice(&h[8..16]);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&h[16..24]);
        CtrlRequest::Tmf {
            subtype: le32(&h[4..8]),
            lun,
            tag: u64::from_le_bytes(tag),
            response,
        }
    } else {
        lun.copy_from_slice(&h[4..12]);
        CtrlRequest::An {
            lun,
            requested: le32(&h[12..16]),
            response,
        }
    })
}

/// The `virtio_scsi_cmd_resp` header.
pub fn cmd_response(sense: &[u8], resid: u32, status: u8, response: u8) -> [u8; CMD_RESP_LEN] {
    let mut b = [0u8; CMD_RESP_LEN];
    let n = sense.len().min(SENSE_SIZE);
    b[0..4].copy_from_slice(&(n as u32).to_le_bytes());
    b[4..8].copy_from_slice(&resid.to_le_bytes());
    b[10] = status;
    b[11] = response;
    b[12..12 + n].copy_from_slice(&sense[..n]);
    b
}

/// Writes a command's data-in and response; returns the used length.
/// `data` longer than the room is cut and answered with OVERRUN.
pub fn complete_cmd<M: GuestMemory>(
    mem: &M,
    req: &CmdRequest,
    status: u8,
    sense: &[u8],
    data: &[u8],
    response: u8,
) -> u32 {
    let room = req.data_in_len as usize;
    let (n, response) = if data.len() > room {
        (
            room,
            virtio_bindings::bindings::virtio_scsi::VIRTIO_SCSI_S_OVERRUN as u8,
        )
    } else {
        (data.len(), response)
    };
    let data_ok = scatter(mem, &req.data_in, &data[..n]);
    let resid = if req.data_out.is_empty() {
        (room - n) as u32
    } else {
        0
    };
    let hdr = cmd_response(sense, resid, status, response);
    if !scatter(mem, &req.response, &hdr) || !data_ok {
        return 0;
    }
    (CMD_RESP_LEN + n) as u32
}

/// Answers a malformed or unroutable request with a bare response code;
/// the used length.
pub fn fail<M: GuestMemory>(mem: &M, response: &[Segment], code: u8, len: usize) -> u32 {
    let mut b = vec![0u8; len];
    if let Some(last) = b.last_mut() {
        *last = code;
    }
    if len == CMD_RESP_LEN {
        b = cmd_response(&[], 0, 0, code).to_vec();
    }
    if scatter(mem, response, &b) {
        len as u32
    } else {
        0
    }
}

/// Writes a control response (TMF: one byte; AN: event_actual and the
/// byte); the used length.
pub fn complete_ctrl<M: GuestMemory>(mem: &M, req: &CtrlRequest, code: u8) -> u32 {
    match req {
        CtrlRequest::Tmf { response, .. } => fail(mem, response, code, 1),
        CtrlRequest::An { response, .. } => fail(mem, response, code, 5),
        CtrlRequest::Unknown { response, .. } => {
            if total(response) >= 1 {
                fail(mem, response, code, 1)
            } else {
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap()
    }

    /// Builds `descs` (addr, len, writable) as one chain and collects it.
    fn chain(m: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> Vec<Desc> {
        let q = MockSplitQueue::new(m, 256);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(a, l, w)| {
                let f = if *w { F_WRITE } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(*a, *l, f, 0))
            })
            .collect();
        collect(q.build_desc_chain(&raw).unwrap()).unwrap()
    }

    fn header(lun: [u8; 8], cdb: &[u8]) -> [u8; CMD_REQ_LEN] {
        let mut h = [0u8; CMD_REQ_LEN];
        h[0..8].copy_from_slice(&lun);
        h[8..16].copy_from_slice(&77u64.to_le_bytes());
        h[19..19 + cdb.len()].copy_from_slice(cdb);
        h
    }

    #[test]
    fn a_write_and_a_read() {
        let m = mem();
        // WRITE(10) of one block, header split across two descriptors.
        let cdb = [0x2a, 0, 0, 0, 0, 9, 0, 0, 1, 0];
        let h = header([1, 0, 0, 0, 0, 0, 0, 0], &cdb);
        m.write_slice(&h, GuestAddress(0x11000)).unwrap();
        m.write_slice(&[0xab; 512], GuestAddress(0x13000)).unwrap();
        let d = chain(
            &m,
            &[
                (0x11000, 10, false),
                (0x1100a, CMD_REQ_LEN as u32 - 10, false),
                (0x13000, 512, false),
                (0x15000, CMD_RESP_LEN as u32, true),
            ],
        );
        let r = parse_cmd(&d, &m).unwrap();
        assert_eq!(r.cdb, cdb);
        assert_eq!(r.tag, 77);
        assert_eq!(r.data_out, vec![0xab; 512]);
        assert_eq!(r.data_in_len, 0);
        assert_eq!(decode_lun(&r.lun), Address::Lun(0));
        let used = complete_cmd(&m, &r, 0x18, &[], &[], 0);
        assert_eq!(used, CMD_RESP_LEN as u32);
        let mut resp = [0u8; CMD_RESP_LEN];
        m.read_slice(&mut resp, GuestAddress(0x15000)).unwrap();
        assert_eq!(resp[10], 0x18);

        // READ(10) with 1024 bytes of room; 512 come back: resid 512.
        let cdb = [0x28, 0, 0, 0, 0, 9, 0, 0, 1, 0];
        m.write_slice(
            &header([1, 0, 0x40, 5, 0, 0, 0, 0], &cdb),
            GuestAddress(0x11000),
        )
        .unwrap();
        let d = chain(
            &m,
            &[
                (0x11000, CMD_REQ_LEN as u32, false),
                (0x15000, CMD_RESP_LEN as u32 + 24, true),
                (0x18000, 1000, true),
            ],
        );
        let r = parse_cmd(&d, &m).unwrap();
        assert_eq!(decode_lun(&r.lun), Address::Lun(5));
        assert_eq!(r.data_in_len, 1024);
        let sense = [0x70, 0, 6, 0, 0, 0, 0, 10];
        let used = complete_cmd(&m, &r, 2, &sense, &[0x5a; 512], 0);
        assert_eq!(used, CMD_RESP_LEN as u32 + 512);
        m.read_slice(&mut resp, GuestAddress(0x15000)).unwrap();
        assert_eq!(le32(&resp[0..4]), 8);
        assert_eq!(le32(&resp[4..8]), 512);
        assert_eq!(&resp[12..20], &sense);
        let mut got = [0u8; 512];
        m.read_slice(&mut got[..24], GuestAddress(0x15000 + CMD_RESP_LEN as u64))
            .unwrap();
        m.read_slice(&mut got[24..], GuestAddress(0x18000)).unwrap();
        assert_eq!(got, [0x5a; 512]);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        // No room for the response: nothing can be answered.
        let d = chain(
            &m,
            &[(0x11000, CMD_REQ_LEN as u32, false), (0x15000, 8, true)],
        );
        assert!(matches!(
            parse_cmd(&d, &m),
            Err(Malformed {
                error: ParseError::ShortResponse(8, _),
                response: None
            })
        ));
        // A short header is answered.
        let d = chain(
            &m,
            &[(0x11000, 10, false), (0x15000, CMD_RESP_LEN as u32, true)],
        );
        let e = parse_cmd(&d, &m).unwrap_err();
        assert!(e.response.is_some());
        // Readable after writable.
        let d = chain(
            &m,
            &[
                (0x11000, CMD_REQ_LEN as u32, false),
                (0x15000, CMD_RESP_LEN as u32, true),
                (0x19000, 4, false),
            ],
        );
        assert_eq!(
            parse_cmd(&d, &m).unwrap_err().error,
            ParseError::ReadableAfterWritable
        );
        // Data both ways.
        let d = chain(
            &m,
            &[
                (0x11000, CMD_REQ_LEN as u32 + 4, false),
                (0x15000, CMD_RESP_LEN as u32 + 4, true),
            ],
        );
        assert_eq!(
            parse_cmd(&d, &m).unwrap_err().error,
            ParseError::Bidirectional
        );
        // Outside guest memory.
        let d = chain(
            &m,
            &[
                (0x2000_0000, CMD_REQ_LEN as u32, false),
                (0x15000, CMD_RESP_LEN as u32, true),
            ],
        );
        assert_eq!(parse_cmd(&d, &m).unwrap_err().error, ParseError::Memory);
    }

    #[test]
    fn luns_and_targets() {
        assert_eq!(decode_lun(&[1, 0, 0, 0, 0, 0, 0, 0]), Address::Lun(0));
        assert_eq!(decode_lun(&[1, 3, 0, 0, 0, 0, 0, 0]), Address::BadTarget);
        assert_eq!(decode_lun(&[0, 0, 0, 0, 0, 0, 0, 0]), Address::BadTarget);
        assert_eq!(
            decode_lun(&[1, 0, 0x41, 2, 0, 0, 0, 0]),
            Address::Lun(0x102)
        );
        assert_eq!(
            decode_lun(&[1, 0, 0x80, 0, 0, 0, 0, 0]),
            Address::Lun(NO_LUN)
        );
        assert_eq!(decode_lun(&[1, 0, 0, 1, 0, 0, 0, 1]), Address::Lun(NO_LUN));
    }

    #[test]
    fn control_requests() {
        let m = mem();
        let mut tmf = [0u8; TMF_REQ_LEN];
        tmf[4] = 5; // LOGICAL UNIT RESET
        tmf[8] = 1;
        m.write_slice(&tmf, GuestAddress(0x11000)).unwrap();
        let d = chain(
            &m,
            &[(0x11000, TMF_REQ_LEN as u32, false), (0x15000, 1, true)],
        );
        let r = parse_ctrl(&d, &m).unwrap();
        assert!(matches!(r, CtrlRequest::Tmf { subtype: 5, .. }));
        m.write_slice(&[9], GuestAddress(0x15000)).unwrap();
        assert_eq!(complete_ctrl(&m, &r, 0), 1);
        let mut b = [9u8; 1];
        m.read_slice(&mut b, GuestAddress(0x15000)).unwrap();
        assert_eq!(b, [0]);
        let mut an = [0u8; AN_REQ_LEN];
        an[0] = 2;
        m.write_slice(&an, GuestAddress(0x11000)).unwrap();
        let d = chain(
            &m,
            &[(0x11000, AN_REQ_LEN as u32, false), (0x15000, 8, true)],
        );
        let r = parse_ctrl(&d, &m).unwrap();
        assert!(matches!(r, CtrlRequest::An { .. }));
        assert_eq!(complete_ctrl(&m, &r, 0), 5);
    }
}
