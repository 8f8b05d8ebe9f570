//! The SCSI tunnel's wire format (specified in the crate's README): frames,
//! the five messages, their encoding and decoding. Pure: bytes in,
//! messages out; every length is checked against a bound before anything
//! is allocated, so a hostile peer gets an error, never a panic or a huge
//! allocation. This is the only definition of the format; the server, the
//! client and the fuzz target all use it.

/// Protocol version spoken by this build (the highest; also the lowest).
pub const VERSION: u16 = 1;
/// Lowest version this build still speaks.
pub const MIN_VERSION: u16 = 1;
/// First bytes of a Hello, so a stray peer is told apart from a client.
pub const MAGIC: [u8; 4] = *b"TDSK";
/// Frame header: type (1) and payload length (4).
pub const HEADER_LEN: usize = 5;
/// Largest data-out or data-in of one command: the engine's largest
/// transfer (16384 blocks of 512 bytes).
pub const MAX_DATA: usize = 8 << 20;
/// Largest payload: a command with the largest data and its fixed fields.
pub const MAX_PAYLOAD: usize = MAX_DATA + 64;
/// Longest string field (initiator names, disk paths, reasons).
pub const MAX_STRING: usize = 1024;
/// Longest CDB (virtio-scsi's default cdb_size).
pub const MAX_CDB: usize = 32;
/// Longest sense data carried.
pub const MAX_SENSE: usize = 252;
/// Commands a client may have unacknowledged at once; the server keeps
/// this many results per initiator for replay.
pub const WINDOW: u64 = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("{what}: message is truncated")]
    Truncated { what: &'static str },
    #[error("{what}: {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, ProtoError>;

/// Why a server refuses a Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseCode {
    /// No version in common.
    Version = 1,
    /// The disk path is not a plain relative path under the served dir.
    BadPath = 2,
    /// The disk cannot be opened.
    NoDisk = 3,
    /// The initiator name is empty or malformed.
    BadInitiator = 4,
    /// The server is at its connection limit.
    Busy = 5,
    /// The first frame was not a Hello.
    Protocol = 6,
}

impl RefuseCode {
    fn from_u8(v: u8) -> Result<RefuseCode> {
        Ok(match v {
            1 => RefuseCode::Version,
            2 => RefuseCode::BadPath,
            3 => RefuseCode::NoDisk,
            4 => RefuseCode::BadInitiator,
            5 => RefuseCode::Busy,
            6 => RefuseCode::Protocol,
            _ => return Err(ProtoError::Invalid(format!("unknown refusal code {v}"))),
        })
    }
}

/// One SCSI command, as the client's initiator sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Per-initiator sequence number, from 1, one per command, never reused
    /// within an incarnation; a replay carries the original number.
    pub seq: u64,
    /// Every command up to this number has its result at the client (the
    /// server may forget those results).
    pub acked: u64,
    /// The LUN (flat space); `NO_LUN` when the initiator's address did not
    /// decode.
    pub lun: u16,
    /// SAM task attribute (0 simple, 1 ordered, 2 head of queue, 4 ACA).
    pub task_attr: u8,
    /// Room for data-in at the initiator: the server sends no more.
    pub data_in_len: u32,
    pub cdb: Vec<u8>,
    pub data_out: Vec<u8>,
}

/// The LUN value that means "the initiator addressed no LUN we can decode".
pub const NO_LUN: u16 = 0xffff;

/// The outcome of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub seq: u64,
    /// SAM status byte.
    pub status: u8,
    /// The server answered from its replay cache: the command had already
    /// run (before a reconnect), it did not run again.
    pub replayed: bool,
    /// Sense data (fixed format) with CHECK CONDITION, else empty.
    pub sense: Vec<u8>,
    /// Data-in, at most the command's `data_in_len`.
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client to server, first frame: open `disk` (a path relative to the
    /// served directory) as `initiator`.
    Hello {
        min_version: u16,
        max_version: u16,
        /// Chosen once per client process start; a new incarnation means
        /// a fresh sequence space (the server forgets the old one's results).
        incarnation: u64,
        initiator: String,
        disk: String,
    },
    /// Server to client: the disk is open.
    Welcome {
        version: u16,
        /// Chosen at each server start: a client that sees it change knows
        /// the server restarted (and its replay cache is gone).
        server_epoch: u64,
        /// The server already knew this incarnation (results kept).
        resumed: bool,
        /// Commands of this incarnation the server has seen up to (0: none).
        last_seq: u64,
        blocks: u64,
        block_size: u32,
        read_only: bool,
    },
    /// Server to client, instead of a Welcome; the connection then closes.
    Refuse {
        code: RefuseCode,
        reason: String,
    },
    Command(Command),
    Outcome(Outcome),
}

const T_HELLO: u8 = 0x01;
const T_COMMAND: u8 = 0x02;
const T_WELCOME: u8 = 0x81;
const T_REFUSE: u8 = 0x82;
const T_OUTCOME: u8 = 0x83;

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Strings are cut to MAX_STRING bytes (at a char boundary) so that
    /// whatever is encoded decodes.
    fn str(&mut self, s: &str) {
        let mut end = s.len().min(MAX_STRING);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn bytes8(&mut self, b: &[u8]) {
        self.u8(b.len() as u8);
        self.0.extend_from_slice(b);
    }
    fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::Invalid(format!("{}: flag {v}", self.what))),
        }
    }
    fn str(&mut self) -> Result<String> {
        let len = usize::from(self.u16()?);
        if len > MAX_STRING {
            return Err(ProtoError::TooLong {
                len,
                max: MAX_STRING,
            });
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ProtoError::Invalid(format!("{}: string is not UTF-8", self.what)))
    }
    fn bytes8(&mut self, max: usize) -> Result<Vec<u8>> {
        let len = usize::from(self.u8()?);
        if len > max {
            return Err(ProtoError::TooLong { len, max });
        }
        Ok(self.take(len)?.to_vec())
    }
    fn bytes32(&mut self, max: usize) -> Result<Vec<u8>> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(ProtoError::TooLong { len, max });
        }
        Ok(self.take(len)?.to_vec())
    }
    fn end(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => T_HELLO,
            Message::Command(_) => T_COMMAND,
            Message::Welcome { .. } => T_WELCOME,
            Message::Refuse { .. } => T_REFUSE,
            Message::Outcome(_) => T_OUTCOME,
        }
    }

    /// The frame: type, payload length, payload. Fields longer than the
    /// protocol allows (a CDB over 32 bytes, data over MAX_DATA, sense over
    /// MAX_SENSE) are the caller's bug; they are cut so the frame still
    /// decodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.u8(self.type_byte());
        w.u32(0);
        match self {
            Message::Hello {
                min_version,
                max_version,
                incarnation,
                initiator,
                disk,
            } => {
                w.0.extend_from_slice(&MAGIC);
                w.u16(*min_version);
                w.u16(*max_version);
                w.u64(*incarnation);
                w.str(initiator);
                w.str(disk);
            }
            Message::Welcome {
                version,
                server_epoch,
                resumed,
                last_seq,
                blocks,
                block_size,
                read_only,
            } => {
                w.u16(*version);
                w.u64(*server_epoch);
                w.u8(u8::from(*resumed));
                w.u64(*last_seq);
                w.u64(*blocks);
                w.u32(*block_size);
                w.u8(u8::from(*read_only));
            }
            Message::Refuse { code, reason } => {
                w.u8(*code as u8);
                w.str(reason);
            }
            Message::Command(c) => {
                w.0.reserve(c.data_out.len().min(MAX_DATA) + 48);
                w.u64(c.seq);
                w.u64(c.acked);
                w.u16(c.lun);
                w.u8(c.task_attr);
                w.u32(c.data_in_len.min(MAX_DATA as u32));
                w.bytes8(&c.cdb[..c.cdb.len().min(MAX_CDB)]);
                w.bytes32(&c.data_out[..c.data_out.len().min(MAX_DATA)]);
            }
            Message::Outcome(o) => {
                w.0.reserve(o.data.len().min(MAX_DATA) + o.sense.len() + 24);
                w.u64(o.seq);
                w.u8(o.status);
                w.u8(u8::from(o.replayed));
                w.bytes8(&o.sense[..o.sense.len().min(MAX_SENSE)]);
                w.bytes32(&o.data[..o.data.len().min(MAX_DATA)]);
            }
        }
        let len = (w.0.len() - HEADER_LEN) as u32;
        w.0[1..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        w.0
    }

    /// Decodes one payload of type `kind`.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Message> {
        let what = match kind {
            T_HELLO => "hello",
            T_COMMAND => "command",
            T_WELCOME => "welcome",
            T_REFUSE => "refuse",
            T_OUTCOME => "outcome",
            other => return Err(ProtoError::UnknownType(other)),
        };
        let mut r = Reader { buf: payload, what };
        let m = match kind {
            T_HELLO => {
                if r.take(4)? != MAGIC {
                    return Err(ProtoError::Invalid("hello: bad magic".into()));
                }
                let min_version = r.u16()?;
                let max_version = r.u16()?;
                if min_version > max_version {
                    return Err(ProtoError::Invalid(format!(
                        "hello: version range {min_version}-{max_version}"
                    )));
                }
                Message::Hello {
                    min_version,
                    max_version,
                    incarnation: r.u64()?,
                    initiator: r.str()?,
                    disk: r.str()?,
                }
            }
            T_WELCOME => Message::Welcome {
                version: r.u16()?,
                server_epoch: r.u64()?,
                resumed: r.bool()?,
                last_seq: r.u64()?,
                blocks: r.u64()?,
                block_size: r.u32()?,
                read_only: r.bool()?,
            },
            T_REFUSE => Message::Refuse {
                code: RefuseCode::from_u8(r.u8()?)?,
                reason: r.str()?,
            },
            T_COMMAND => {
                let seq = r.u64()?;
                let acked = r.u64()?;
                if seq == 0 || acked >= seq {
                    return Err(ProtoError::Invalid(format!(
                        "command: seq {seq} with acked {acked}"
                    )));
                }
                let lun = r.u16()?;
                let task_attr = r.u8()?;
                let data_in_len = r.u32()?;
                if data_in_len as usize > MAX_DATA {
                    return Err(ProtoError::TooLong {
                        len: data_in_len as usize,
                        max: MAX_DATA,
                    });
                }
                let cdb = r.bytes8(MAX_CDB)?;
                if cdb.is_empty() {
                    return Err(ProtoError::Invalid("command: empty CDB".into()));
                }
                Message::Command(Command {
                    seq,
                    acked,
                    lun,
                    task_attr,
                    data_in_len,
                    cdb,
                    data_out: r.bytes32(MAX_DATA)?,
                })
            }
            _ => Message::Outcome(Outcome {
                seq: r.u64()?,
                status: r.u8()?,
                replayed: r.bool()?,
                sense: r.bytes8(MAX_SENSE)?,
                data: r.bytes32(MAX_DATA)?,
            }),
        };
        r.end()?;
        Ok(m)
    }
}

/// The type and payload length in a frame header, the length checked.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize)> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLong {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok((h[0], len))
}

/// Decodes the first frame in `buf`: `None` if more bytes are needed,
/// else the message and the bytes it used.
pub fn decode_from(buf: &[u8]) -> Result<Option<(Message, usize)>> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = parse_header(h)?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Message::decode(kind, &buf[HEADER_LEN..total])?,
        total,
    )))
}

/// The version both sides speak, if any.
pub fn negotiate(min: u16, max: u16) -> Option<u16> {
    let hi = max.min(VERSION);
    (hi >= min.max(MIN_VERSION)).then_some(hi)
}

/// Whether a disk path names a file under the served directory: relative,
/// made of normal components only (no `..`, no `.`, no empty parts).
pub fn valid_disk_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 3,
                incarnation: 0x0102_0304_0506_0708,
                initiator: "tandem:vm-a@host-1".into(),
                disk: "cluster/quorum.raw".into(),
            },
            Message::Welcome {
                version: 1,
                server_epoch: 77,
                resumed: true,
                last_seq: 12,
                blocks: 131072,
                block_size: 512,
                read_only: false,
            },
            Message::Refuse {
                code: RefuseCode::BadPath,
                reason: "no".into(),
            },
            Message::Command(Command {
                seq: 5,
                acked: 3,
                lun: 0,
                task_attr: 0,
                data_in_len: 0,
                cdb: vec![0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0],
                data_out: vec![0xab; 512],
            }),
            Message::Outcome(Outcome {
                seq: 5,
                status: 2,
                replayed: true,
                sense: vec![0x70, 0, 6],
                data: vec![1, 2, 3],
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let b = m.encode();
            let (d, used) = decode_from(&b).unwrap().unwrap();
            assert_eq!(d, m);
            assert_eq!(used, b.len());
            // Every shorter prefix asks for more bytes or is refused.
            for cut in 0..b.len() {
                assert!(!matches!(decode_from(&b[..cut]), Ok(Some(_))));
            }
        }
    }

    /// Golden bytes: the format is what the README says, not whatever the
    /// encoder happens to do.
    #[test]
    fn golden_command_frame() {
        let m = Message::Command(Command {
            seq: 2,
            acked: 1,
            lun: 3,
            task_attr: 0,
            data_in_len: 36,
            cdb: vec![0x12, 0, 0, 0, 36, 0],
            data_out: vec![],
        });
        let want: Vec<u8> = [
            &[0x02, 0, 0, 0, 34][..],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 3],
            &[0],
            &[0, 0, 0, 36],
            &[6, 0x12, 0, 0, 0, 36, 0],
            &[0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(m.encode(), want);
        let hello = Message::Hello {
            min_version: 1,
            max_version: 1,
            incarnation: 9,
            initiator: "i".into(),
            disk: "d".into(),
        }
        .encode();
        assert_eq!(&hello[..5], &[0x01, 0, 0, 0, 22]);
        assert_eq!(&hello[5..9], b"TDSK");
    }

    #[test]
    fn hostile_frames_are_refused() {
        // Length above the bound, before any allocation.
        assert!(matches!(
            decode_from(&[0x02, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtoError::TooLong { .. })
        ));
        assert_eq!(
            decode_from(&[0x42, 0, 0, 0, 0]),
            Err(ProtoError::UnknownType(0x42))
        );
        // seq 0, acked not below seq.
        let mut c = Command {
            seq: 1,
            acked: 0,
            lun: 0,
            task_attr: 0,
            data_in_len: 0,
            cdb: vec![0],
            data_out: vec![],
        };
        for (seq, acked) in [(0, 0), (4, 4), (4, 9)] {
            c.seq = seq;
            c.acked = acked;
            assert!(decode_from(&Message::Command(c.clone()).encode()).is_err());
        }
        // A data length field larger than what follows.
        c.seq = 1;
        c.acked = 0;
        let mut b = Message::Command(c).encode();
        let n = b.len();
        b[n - 1] = 9;
        assert!(decode_from(&b).is_err());
        // A trailing byte inside the payload.
        let mut b = all()[1].encode();
        b.push(0);
        b[4] += 1;
        assert!(matches!(decode_from(&b), Err(ProtoError::Trailing { .. })));
    }

    #[test]
    fn versions_and_paths() {
        assert_eq!(negotiate(1, 5), Some(VERSION));
        assert_eq!(negotiate(2, 5), None);
        assert!(valid_disk_path("a.raw"));
        assert!(valid_disk_path("c/d.qcow2"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/"] {
            assert!(!valid_disk_path(bad), "{bad}");
        }
    }
}
