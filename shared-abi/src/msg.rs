//! Messages: the header every message starts with, the message kinds and
//! their payloads, status codes, and the parser and encoder.
//!
//! Every message fits in one ring slot: a 32-byte [`MsgHeader`] followed by
//! `length` payload bytes. All integers are little-endian.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::version::AbiVersion;

/// "TNDM" in memory order: the first four bytes of every message.
pub const MSG_MAGIC: u32 = 0x4D44_4E54;
/// Size of [`MsgHeader`].
pub const HEADER_LEN: usize = 32;

/// Declares a wire layout: `repr(C)`, unaligned little-endian fields, and
/// the zerocopy traits that let both sides read and write it without
/// `unsafe`.
macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(
            zerocopy_derive::FromBytes,
            zerocopy_derive::IntoBytes,
            zerocopy_derive::KnownLayout,
            zerocopy_derive::Immutable,
            zerocopy_derive::Unaligned,
            Clone,
            Copy,
            Debug,
            PartialEq,
            Eq,
        )]
        #[repr(C)]
        pub struct $name { $($body)* }
    };
}

wire_struct! {
    /// The header of every message.
    pub struct MsgHeader {
        /// [`MSG_MAGIC`].
        pub magic: U32,
        /// The ABI version the sender speaks in this message
        /// ([`AbiVersion::to_wire`]): the negotiated one, except in `HELLO`
        /// where it is the sender's highest.
        pub version: U32,
        /// A [`Kind`].
        pub kind: U16,
        /// [`FLAG_RESPONSE`] and/or [`FLAG_EVENT`]; other bits must be zero.
        pub flags: U16,
        /// A [`Status`]; zero in requests and events.
        pub status: U16,
        /// Must be zero.
        pub reserved: U16,
        /// Payload bytes after the header.
        pub length: U32,
        /// Chosen by the requester, unique among its outstanding requests,
        /// echoed in the response; zero in events.
        pub tag: U64,
        /// How long the requester waits for the response, in milliseconds
        /// (0: no limit). A responder may drop a request it cannot answer in
        /// time; the requester reports a timeout either way.
        pub timeout_ms: U32,
    }
}

const _: () = assert!(core::mem::size_of::<MsgHeader>() == HEADER_LEN);

/// The message is a response to the request with the same tag.
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// The message is an event: no response is expected and `tag` is zero.
pub const FLAG_EVENT: u16 = 1 << 1;
const KNOWN_FLAGS: u16 = FLAG_RESPONSE | FLAG_EVENT;

/// What a message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Guest to host request: version and capability negotiation.
    /// Payload [`Hello`]; response payload [`HelloReply`].
    Hello = 1,
    /// Either direction: "I am alive". Payload [`Heartbeat`], echoed with
    /// the responder's own values.
    Heartbeat = 2,
    /// Either direction: the response echoes the payload byte for byte.
    Ping = 3,
    /// Event, either direction: the sender is going away. Payload [`Goodbye`].
    Goodbye = 4,
    /// Host to guest event. Payload [`Event`].
    Event = 5,
    /// Host to guest request (ABI 1.1, capability [`caps::FUNCTIONS`]):
    /// act on an assigned PCI function's driver stack in the guest (quiesce
    /// its I/O, resume it, report it, apply the host's policy). Payload
    /// [`FunctionRequest`]; response payload [`FunctionReport`].
    Function = 6,
}

impl Kind {
    pub const fn from_u16(raw: u16) -> Option<Kind> {
        match raw {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Heartbeat),
            3 => Some(Kind::Ping),
            4 => Some(Kind::Goodbye),
            5 => Some(Kind::Event),
            6 => Some(Kind::Function),
            _ => None,
        }
    }

    /// Whether this kind travels as an event (no response) rather than as
    /// a request and response.
    pub const fn is_event_kind(self) -> bool {
        matches!(self, Kind::Goodbye | Kind::Event)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Heartbeat => "heartbeat",
            Kind::Ping => "ping",
            Kind::Goodbye => "goodbye",
            Kind::Event => "event",
            Kind::Function => "function",
        }
    }
}

/// The result of a request, carried in responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    /// The request's header was malformed (see the counters for why).
    BadMessage = 1,
    /// The request's `version` is not the negotiated one.
    BadVersion = 2,
    /// The kind is unknown to the responder.
    UnknownKind = 3,
    /// The payload is shorter than the kind requires.
    BadLength = 4,
    /// A request other than `HELLO` before `HELLO` succeeded.
    NotNegotiated = 5,
    /// `HELLO`: the two version ranges do not overlap; the reply payload
    /// still carries the responder's range.
    NoCommonVersion = 6,
    /// The responder cannot take more requests now; retry later.
    Busy = 7,
    /// The responder failed for its own reasons.
    Internal = 8,
    /// `FUNCTION`: the guest has no device at that address (ABI 1.1).
    NoDevice = 9,
    /// `FUNCTION`: the operation did not finish in the time asked (ABI 1.1).
    TimedOut = 10,
}

impl Status {
    pub const fn from_u16(raw: u16) -> Option<Status> {
        match raw {
            0 => Some(Status::Ok),
            1 => Some(Status::BadMessage),
            2 => Some(Status::BadVersion),
            3 => Some(Status::UnknownKind),
            4 => Some(Status::BadLength),
            5 => Some(Status::NotNegotiated),
            6 => Some(Status::NoCommonVersion),
            7 => Some(Status::Busy),
            8 => Some(Status::Internal),
            9 => Some(Status::NoDevice),
            10 => Some(Status::TimedOut),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadMessage => "bad message",
            Status::BadVersion => "bad version",
            Status::UnknownKind => "unknown kind",
            Status::BadLength => "bad length",
            Status::NotNegotiated => "not negotiated",
            Status::NoCommonVersion => "no common version",
            Status::Busy => "busy",
            Status::Internal => "internal error",
            Status::NoDevice => "no such function",
            Status::TimedOut => "timed out",
        }
    }
}

/// Guest capabilities and host capabilities are bit sets; the channel uses
/// their intersection.
pub mod caps {
    /// `PING` in both directions.
    pub const PING: u64 = 1 << 0;
    /// `HEARTBEAT` and the liveness rules that go with it.
    pub const HEARTBEAT: u64 = 1 << 1;
    /// Host to guest `EVENT`s.
    pub const EVENTS: u64 = 1 << 2;
    /// Everything ABI 1.0 defines.
    pub const ALL_V1_0: u64 = PING | HEARTBEAT | EVENTS;
    /// `FUNCTION` requests (ABI 1.1): the guest driver acts on assigned
    /// functions for the host.
    pub const FUNCTIONS: u64 = 1 << 3;
    /// Everything ABI 1.1 defines.
    pub const ALL_V1_1: u64 = ALL_V1_0 | FUNCTIONS;
    /// The multi-path operations of `FUNCTION` (ABI 1.2,
    /// [`super::function::op::PATH_SYNTHETIC`] and after): the guest driver
    /// presents one block device over a synthetic and a direct path (F4).
    pub const PATHS: u64 = 1 << 4;
    /// Everything ABI 1.2 defines.
    pub const ALL_V1_2: u64 = ALL_V1_1 | PATHS;
    /// Everything this build defines.
    pub const ALL: u64 = ALL_V1_2;

    /// The capabilities a version defines: two peers that settle on 1.0
    /// use no 1.1 capability even if both builds have it.
    pub const fn known_in(v: super::AbiVersion) -> u64 {
        match (v.major, v.minor) {
            (1, 0) => ALL_V1_0,
            (1, 1) => ALL_V1_1,
            (1, _) => ALL_V1_2,
            _ => 0,
        }
    }
}

/// Operating systems in [`Hello::os`].
pub mod os {
    pub const LINUX: u32 = 1;
    pub const WINDOWS: u32 = 2;
}

wire_struct! {
    /// `HELLO` request payload.
    pub struct Hello {
        /// The lowest ABI version the guest speaks.
        pub min_version: U32,
        /// The highest.
        pub max_version: U32,
        /// The guest's capability bits.
        pub capabilities: U64,
        /// One of [`os`].
        pub os: U32,
        pub reserved: U32,
        /// The driver's version, ASCII, NUL-padded.
        pub driver_version: [u8; 16],
    }
}

wire_struct! {
    /// `HELLO` response payload.
    pub struct HelloReply {
        /// The version both will use (0 when the status is `NoCommonVersion`).
        pub version: U32,
        /// The host's range, so a refused guest can say what the host speaks.
        pub host_min_version: U32,
        pub host_max_version: U32,
        pub reserved: U32,
        /// Capabilities both will use: the intersection.
        pub capabilities: U64,
        /// The guest sends a heartbeat this often...
        pub heartbeat_interval_ms: U32,
        /// ...and each side considers the other gone after this long without one.
        pub heartbeat_timeout_ms: U32,
        /// Changes whenever the host side of the channel restarts.
        pub session: U64,
        /// The host's version, ASCII, NUL-padded.
        pub host_version: [u8; 16],
    }
}

wire_struct! {
    /// `HEARTBEAT` payload (request and response).
    pub struct Heartbeat {
        /// The sender's heartbeat counter.
        pub seq: U64,
        /// Milliseconds since the sender's side of the channel started.
        pub uptime_ms: U64,
    }
}

wire_struct! {
    /// `GOODBYE` event payload.
    pub struct Goodbye {
        /// One of [`goodbye`].
        pub reason: U32,
        pub reserved: U32,
    }
}

/// Reasons in [`Goodbye::reason`].
pub mod goodbye {
    /// The driver is being unloaded or unbound.
    pub const UNLOAD: u32 = 1;
    /// The host is stopping the device (for example before a restart).
    pub const HOST_STOP: u32 = 2;
}

wire_struct! {
    /// `EVENT` payload.
    pub struct Event {
        /// What happened; the meaning of `arg` depends on it. ABI 1.0 defines
        /// only [`event::NOTICE`]; a receiver ignores codes it does not know.
        pub code: U32,
        pub reserved: U32,
        pub arg: U64,
    }
}

/// Codes in [`Event::code`].
pub mod event {
    /// Informational: the host wants the guest to log `arg`.
    pub const NOTICE: u32 = 1;
}

wire_struct! {
    /// `FUNCTION` request payload.
    pub struct FunctionRequest {
        /// One of [`function::op`].
        pub op: U32,
        /// The function's PCI address as the guest enumerated it.
        pub segment: U16,
        pub bus: u8,
        /// Device << 3 | function.
        pub devfn: u8,
        /// `QUIESCE`: how long to wait for requests already sent to the
        /// function to complete before answering (0: do not wait).
        pub drain_ms: U32,
        /// `QUIESCE`: the guest resumes by itself after this long without
        /// a `RESUME`, so a host that vanished cannot stall it forever
        /// (0: [`function::DEFAULT_LEASE_MS`]).
        pub lease_ms: U32,
        /// `POLICY`: [`function::policy`] bits.
        pub policy: U32,
        /// `PATH_*` (ABI 1.2): the multi-path volume (0 is `/dev/tandem0`).
        /// Zero in other operations.
        pub volume: U32,
    }
}

wire_struct! {
    /// `FUNCTION` response payload: the guest's view of the function after
    /// the operation.
    pub struct FunctionReport {
        /// [`function::state`] bits.
        pub state: U32,
        /// PCI power state: 0 D0, 1 D1, 2 D2, 3 D3hot, 4 D3cold.
        pub power_state: U32,
        /// Block devices the function's driver created.
        pub disks: U32,
        /// Requests sent to the function and not completed.
        pub in_flight: U32,
        /// `QUIESCE`: how long the drain took, in microseconds.
        pub drain_us: U32,
        /// Quiesces since the driver loaded.
        pub quiesces: U32,
        /// The driver bound to the function, ASCII, NUL-padded (empty:
        /// none).
        pub driver: [u8; 16],
    }
}

/// Values for [`FunctionRequest`] and [`FunctionReport`].
pub mod function {
    /// Operations in [`super::FunctionRequest::op`].
    pub mod op {
        /// Hold new I/O to the function (it waits in the guest's queues,
        /// it does not fail) and wait up to `drain_ms` for I/O already
        /// sent to complete. Answered `TIMED_OUT` (with the report) if it
        /// did not drain; the function stays quiesced either way.
        pub const QUIESCE: u32 = 1;
        /// Let held I/O go.
        pub const RESUME: u32 = 2;
        /// Only report.
        pub const REPORT: u32 = 3;
        /// Apply the host's policy bits to guest-originated management of
        /// the function.
        pub const POLICY: u32 = 4;
        /// (ABI 1.2, capability `PATHS`.) The function's block device
        /// becomes the synthetic path of `volume`; the guest creates the
        /// volume's block device if it has none yet. Answered `BUSY` if
        /// the volume already has a synthetic path.
        pub const PATH_SYNTHETIC: u32 = 5;
        /// (ABI 1.2.) The function's block device becomes the direct path
        /// of `volume` and its I/O moves there (a handoff: new requests are
        /// held, requests on the synthetic path complete, held ones are
        /// replayed in order). Waits up to `drain_ms` for the move;
        /// `TIMED_OUT` if it has not finished (it goes on). `NO_DEVICE` if
        /// the volume does not exist or the sizes differ.
        pub const PATH_DIRECT: u32 = 6;
        /// (ABI 1.2.) The volume's I/O moves off this function (its direct
        /// path) to the synthetic path, and the guest lets go of the
        /// function's block device. Waits up to `drain_ms`; `TIMED_OUT` if
        /// requests are still in flight on the function (the move goes on,
        /// and a removal of the function re-issues them on the synthetic
        /// path exactly once).
        pub const PATH_RELEASE: u32 = 7;
    }
    /// Bits of [`super::FunctionRequest::policy`].
    pub mod policy {
        /// The host holds the function frozen: the guest refuses its own
        /// function resets (sysfs `reset`, and kernel-initiated ones).
        pub const FROZEN: u32 = 1 << 0;
    }
    /// Bits of [`super::FunctionReport::state`].
    pub mod state {
        /// The guest has a device at that address.
        pub const PRESENT: u32 = 1 << 0;
        /// A driver is bound to it.
        pub const BOUND: u32 = 1 << 1;
        /// The driver enabled the device.
        pub const ENABLED: u32 = 1 << 2;
        pub const BUS_MASTER: u32 = 1 << 3;
        pub const MSIX: u32 = 1 << 4;
        /// New I/O is held (after `QUIESCE`, until `RESUME` or the lease ends).
        pub const QUIESCED: u32 = 1 << 5;
        /// Nothing is in flight.
        pub const DRAINED: u32 = 1 << 6;
        /// The `FROZEN` policy is applied.
        pub const FROZEN: u32 = 1 << 7;
        /// (ABI 1.2.) The function's block device is a path of a volume.
        pub const PATH: u32 = 1 << 8;
        /// (ABI 1.2.) The volume's I/O goes to this function.
        pub const ACTIVE_PATH: u32 = 1 << 9;
    }
    /// The lease of a quiesce when the request says 0.
    pub const DEFAULT_LEASE_MS: u32 = 60_000;
}

/// Why a message was refused by [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than a header.
    Truncated,
    BadMagic(u32),
    UnknownKind(u16),
    /// Undefined flag bits, or both `RESPONSE` and `EVENT`, or an event
    /// kind without the `EVENT` flag (and the reverse).
    BadFlags(u16),
    /// `reserved` is not zero.
    Reserved,
    /// A status that is not defined, or a non-zero status in a request.
    BadStatus(u16),
    /// `length` exceeds what the slot holds.
    TooLong {
        length: u32,
        max: u32,
    },
    /// An event with a non-zero tag.
    EventWithTag,
}

impl ParseError {
    pub const fn name(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::BadMagic(_) => "bad magic",
            ParseError::UnknownKind(_) => "unknown kind",
            ParseError::BadFlags(_) => "bad flags",
            ParseError::Reserved => "reserved bits set",
            ParseError::BadStatus(_) => "bad status",
            ParseError::TooLong { .. } => "too long",
            ParseError::EventWithTag => "event with a tag",
        }
    }
}

/// A parsed message borrowing its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub version: AbiVersion,
    pub kind: Kind,
    pub response: bool,
    pub event: bool,
    pub status: Status,
    pub tag: u64,
    pub timeout_ms: u32,
    pub payload: &'a [u8],
}

/// Parses one slot's bytes. `bytes` may be longer than the message (a
/// whole slot); `length` is checked against it.
pub fn parse(bytes: &[u8]) -> Result<Message<'_>, ParseError> {
    let (h, rest) = MsgHeader::read_from_prefix(bytes).map_err(|_| ParseError::Truncated)?;
    if h.magic.get() != MSG_MAGIC {
        return Err(ParseError::BadMagic(h.magic.get()));
    }
    let kind = Kind::from_u16(h.kind.get()).ok_or(ParseError::UnknownKind(h.kind.get()))?;
    let flags = h.flags.get();
    let response = flags & FLAG_RESPONSE != 0;
    let event = flags & FLAG_EVENT != 0;
    if flags & !KNOWN_FLAGS != 0 || (response && event) || event != kind.is_event_kind() {
        return Err(ParseError::BadFlags(flags));
    }
    if h.reserved.get() != 0 {
        return Err(ParseError::Reserved);
    }
    let status = Status::from_u16(h.status.get()).ok_or(ParseError::BadStatus(h.status.get()))?;
    if !response && status != Status::Ok {
        return Err(ParseError::BadStatus(h.status.get()));
    }
    if event && h.tag.get() != 0 {
        return Err(ParseError::EventWithTag);
    }
    let length = h.length.get();
    let max = u32::try_from(rest.len()).unwrap_or(u32::MAX);
    if length > max {
        return Err(ParseError::TooLong { length, max });
    }
    Ok(Message {
        version: AbiVersion::from_wire(h.version.get()),
        kind,
        response,
        event,
        status,
        tag: h.tag.get(),
        timeout_ms: h.timeout_ms.get(),
        payload: &rest[..length as usize],
    })
}

/// Reads a fixed-size payload. Later minor versions may append fields, so
/// extra bytes are ignored; fewer than the struct is an error.
pub fn payload<T: FromBytes>(bytes: &[u8]) -> Option<T> {
    T::read_from_prefix(bytes).ok().map(|(t, _)| t)
}

/// What to write: everything of a header but the magic and the length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Out {
    pub version: AbiVersion,
    pub kind: Kind,
    pub response: bool,
    pub status: Status,
    pub tag: u64,
    pub timeout_ms: u32,
}

impl Out {
    pub const fn request(version: AbiVersion, kind: Kind, tag: u64, timeout_ms: u32) -> Out {
        Out {
            version,
            kind,
            response: false,
            status: Status::Ok,
            tag,
            timeout_ms,
        }
    }

    pub const fn response(version: AbiVersion, kind: Kind, tag: u64, status: Status) -> Out {
        Out {
            version,
            kind,
            response: true,
            status,
            tag,
            timeout_ms: 0,
        }
    }

    pub const fn event(version: AbiVersion, kind: Kind) -> Out {
        Out {
            version,
            kind,
            response: false,
            status: Status::Ok,
            tag: 0,
            timeout_ms: 0,
        }
    }
}

/// The buffer cannot hold the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub needed: usize,
    pub room: usize,
}

/// Writes a message (header and payload) at the start of `buf` and returns
/// its total length.
pub fn encode(buf: &mut [u8], out: &Out, payload: &[u8]) -> Result<usize, TooLarge> {
    let needed = HEADER_LEN + payload.len();
    if needed > buf.len() {
        return Err(TooLarge {
            needed,
            room: buf.len(),
        });
    }
    let flags = if out.kind.is_event_kind() {
        FLAG_EVENT
    } else if out.response {
        FLAG_RESPONSE
    } else {
        0
    };
    let h = MsgHeader {
        magic: U32::new(MSG_MAGIC),
        version: U32::new(out.version.to_wire()),
        kind: U16::new(out.kind as u16),
        flags: U16::new(flags),
        status: U16::new(out.status as u16),
        reserved: U16::new(0),
        // CAST: `needed <= buf.len()` and slots are far below 4 GiB.
        length: U32::new(payload.len() as u32),
        tag: U64::new(out.tag),
        timeout_ms: U32::new(out.timeout_ms),
    };
    buf[..HEADER_LEN].copy_from_slice(h.as_bytes());
    buf[HEADER_LEN..needed].copy_from_slice(payload);
    Ok(needed)
}

/// Copies an ASCII version string into a NUL-padded field (truncating).
pub fn version_field(s: &str) -> [u8; 16] {
    let mut f = [0u8; 16];
    let n = if s.len() < 16 { s.len() } else { 16 };
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
    f
}

/// The printable part of a NUL-padded version field.
pub fn version_str(f: &[u8; 16]) -> &str {
    let end = f.iter().position(|&b| b == 0).unwrap_or(16);
    match core::str::from_utf8(&f[..end]) {
        Ok(s) => s,
        Err(_) => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: AbiVersion = AbiVersion { major: 1, minor: 0 };

    #[test]
    fn roundtrip() {
        let mut buf = [0u8; 512];
        let n = encode(&mut buf, &Out::request(V, Kind::Ping, 77, 1000), b"hello").unwrap();
        assert_eq!(n, HEADER_LEN + 5);
        let m = parse(&buf).unwrap();
        assert_eq!(m.kind, Kind::Ping);
        assert!(!m.response && !m.event);
        assert_eq!(m.tag, 77);
        assert_eq!(m.timeout_ms, 1000);
        assert_eq!(m.payload, b"hello");
        let n = encode(
            &mut buf,
            &Out::response(V, Kind::Ping, 77, Status::Busy),
            &[],
        )
        .unwrap();
        let m = parse(&buf[..n]).unwrap();
        assert!(m.response);
        assert_eq!(m.status, Status::Busy);
        let n = encode(
            &mut buf,
            &Out::event(V, Kind::Goodbye),
            &[1, 0, 0, 0, 0, 0, 0, 0],
        )
        .unwrap();
        let m = parse(&buf[..n]).unwrap();
        assert!(m.event && !m.response);
        assert_eq!(
            payload::<Goodbye>(m.payload).unwrap().reason.get(),
            goodbye::UNLOAD
        );
    }

    #[test]
    fn refuses_malformed_headers() {
        let mut good = [0u8; 64];
        let n = encode(&mut good, &Out::request(V, Kind::Ping, 1, 0), &[9; 8]).unwrap();
        assert!(parse(&good[..n]).is_ok());
        let with = |off: usize, val: &[u8]| {
            let mut b = good;
            b[off..off + val.len()].copy_from_slice(val);
            parse(&b[..n]).err()
        };
        assert_eq!(parse(&good[..31]), Err(ParseError::Truncated));
        assert_eq!(with(0, &[0, 0, 0, 0]), Some(ParseError::BadMagic(0)));
        assert_eq!(with(8, &[99, 0]), Some(ParseError::UnknownKind(99)));
        assert_eq!(with(10, &[4, 0]), Some(ParseError::BadFlags(4)));
        assert_eq!(with(10, &[3, 0]), Some(ParseError::BadFlags(3)));
        // A request kind flagged as an event.
        assert_eq!(with(10, &[2, 0]), Some(ParseError::BadFlags(2)));
        assert_eq!(with(12, &[1, 0]), Some(ParseError::BadStatus(1)));
        assert_eq!(with(14, &[1, 0]), Some(ParseError::Reserved));
        assert_eq!(
            with(16, &[9, 0, 0, 0]),
            Some(ParseError::TooLong { length: 9, max: 8 })
        );
        assert_eq!(
            with(16, &[0xff, 0xff, 0xff, 0xff]),
            Some(ParseError::TooLong {
                length: u32::MAX,
                max: 8
            })
        );
        // Events carry no tag.
        let n = encode(&mut good, &Out::event(V, Kind::Event), &[0; 16]).unwrap();
        let mut b = good;
        b[20] = 1;
        assert_eq!(parse(&b[..n]), Err(ParseError::EventWithTag));
    }

    #[test]
    fn payloads_may_grow_but_not_shrink() {
        let hb = Heartbeat {
            seq: U64::new(5),
            uptime_ms: U64::new(6),
        };
        let mut longer = [0u8; 24];
        longer[..16].copy_from_slice(hb.as_bytes());
        assert_eq!(payload::<Heartbeat>(&longer), Some(hb));
        assert_eq!(payload::<Heartbeat>(&longer[..15]), None);
    }

    #[test]
    fn encode_refuses_what_does_not_fit() {
        let mut small = [0u8; 40];
        assert_eq!(
            encode(&mut small, &Out::request(V, Kind::Ping, 1, 0), &[0; 9]),
            Err(TooLarge {
                needed: 41,
                room: 40
            })
        );
    }

    #[test]
    fn version_fields() {
        assert_eq!(version_str(&version_field("0.1.0")), "0.1.0");
        assert_eq!(
            version_str(&version_field("a-very-long-version-string")),
            "a-very-long-vers"
        );
        let mut bad = [0xffu8; 16];
        bad[0] = b'x';
        assert_eq!(version_str(&bad), "?");
    }

    #[test]
    fn fixed_sizes() {
        use core::mem::size_of;
        assert_eq!(size_of::<Hello>(), 40);
        assert_eq!(size_of::<HelloReply>(), 56);
        assert_eq!(size_of::<Heartbeat>(), 16);
        assert_eq!(size_of::<Goodbye>(), 8);
        assert_eq!(size_of::<Event>(), 16);
        assert_eq!(size_of::<FunctionRequest>(), 24);
        assert_eq!(size_of::<FunctionReport>(), 40);
    }
}
