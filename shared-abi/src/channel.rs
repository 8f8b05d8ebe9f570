//! The channel protocol: one endpoint's rules, for either side.
//!
//! The host (device server) and the guest drivers run this same code: it
//! decides what to answer to each incoming message, tracks this side's
//! outstanding requests with their deadlines, negotiates the version, and
//! keeps the liveness and error counters. It does no I/O and allocates
//! nothing: callers move bytes between rings and this type, and give it
//! the time.

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use super::msg::{
    self, caps, parse, FunctionRequest, Goodbye, Heartbeat, Hello, HelloReply, Kind, Message, Out,
    ParseError, Status,
};
use super::version::{negotiate, AbiVersion, NegotiationError, VersionRange};

/// Which side of the channel this endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Host,
    Guest,
}

/// Host-side settings announced in `HELLO` replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostParams {
    pub heartbeat_interval_ms: u32,
    pub heartbeat_timeout_ms: u32,
    pub session: u64,
}

pub const DEFAULT_HOST_PARAMS: HostParams = HostParams {
    heartbeat_interval_ms: 1000,
    heartbeat_timeout_ms: 5000,
    session: 0,
};

/// What the channel knows about the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No `HELLO` exchanged yet (or the channel was reset).
    Down,
    /// Guest: `HELLO` sent, waiting for the reply.
    Negotiating,
    /// Both sides agreed.
    Up {
        version: AbiVersion,
        capabilities: u64,
        heartbeat_interval_ms: u32,
        heartbeat_timeout_ms: u32,
        session: u64,
    },
    /// The versions do not overlap; `peer` is what the other side speaks.
    Refused { peer: VersionRange },
}

/// Counters every endpoint keeps (all wrap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_messages: u64,
    pub tx_messages: u64,
    pub rx_requests: u64,
    pub rx_responses: u64,
    pub rx_events: u64,
    /// Messages dropped because they did not parse.
    pub malformed: u64,
    /// Requests answered with an error status.
    pub error_replies: u64,
    /// Responses for no outstanding request (late, duplicated, forged).
    pub unexpected_responses: u64,
    /// Our requests that got no answer in time.
    pub timeouts: u64,
    /// Our requests that the peer answered with an error status.
    pub failed_requests: u64,
    pub pings_answered: u64,
    pub heartbeats_received: u64,
    pub negotiations: u64,
}

/// The last thing that went wrong, for the state files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastError {
    None,
    Malformed(ParseError),
    /// The peer sent a message in a version other than the negotiated one.
    WrongVersion(AbiVersion),
    /// A request before negotiation.
    NotNegotiated(Kind),
    NoCommonVersion {
        peer: VersionRange,
    },
    /// Our request `kind` timed out.
    Timeout(Kind),
    /// Our request `kind` came back with `status`.
    PeerError(Kind, Status),
    UnexpectedResponse(u64),
    /// A payload too short for its kind.
    ShortPayload(Kind),
}

impl LastError {
    pub const fn name(self) -> &'static str {
        match self {
            LastError::None => "none",
            LastError::Malformed(e) => e.name(),
            LastError::WrongVersion(_) => "message in a version that was not negotiated",
            LastError::NotNegotiated(_) => "request before negotiation",
            LastError::NoCommonVersion { .. } => "no common ABI version",
            LastError::Timeout(_) => "request timed out",
            LastError::PeerError(..) => "the peer refused a request",
            LastError::UnexpectedResponse(_) => "response to no outstanding request",
            LastError::ShortPayload(_) => "payload too short",
        }
    }
}

/// A reply payload: borrowed from the request (a ping echo) or built here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyPayload<'a> {
    Borrowed(&'a [u8]),
    Built { bytes: [u8; 64], len: usize },
}

impl ReplyPayload<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReplyPayload::Borrowed(b) => b,
            ReplyPayload::Built { bytes, len } => &bytes[..*len],
        }
    }

    fn built(src: &[u8]) -> ReplyPayload<'static> {
        let mut bytes = [0u8; 64];
        let len = src.len().min(64);
        bytes[..len].copy_from_slice(&src[..len]);
        ReplyPayload::Built { bytes, len }
    }
}

/// What the caller must do after feeding an incoming message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Nothing (the message was consumed, or dropped and counted).
    Nothing,
    /// Send this reply.
    Reply { out: Out, payload: ReplyPayload<'a> },
    /// A response to one of our requests: `status` and its payload.
    Completed {
        tag: u64,
        kind: Kind,
        status: Status,
        payload: &'a [u8],
    },
    /// Guest: negotiation finished (the `HELLO` reply arrived).
    Negotiated {
        version: AbiVersion,
        capabilities: u64,
    },
    /// Guest: the host refused our versions (the host side sees its own
    /// refusal as a `Reply` and in [`Endpoint::state`]).
    Refused { peer: VersionRange },
    /// An event from the peer.
    PeerEvent { kind: Kind, payload: &'a [u8] },
    /// Guest: a request the driver itself must carry out (`FUNCTION`). The
    /// caller answers it, now or later, with [`Endpoint::respond`] and a
    /// payload of its own.
    Request {
        kind: Kind,
        tag: u64,
        timeout_ms: u32,
        payload: &'a [u8],
    },
}

/// A request of ours that is outstanding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub tag: u64,
    pub kind: Kind,
    pub sent_ms: u64,
    pub deadline_ms: u64,
}

/// Why a request of ours could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeginError {
    /// Not negotiated (and not a `HELLO`).
    NotUp,
    /// Too many outstanding requests.
    Full,
    /// The negotiated capabilities do not include this kind.
    NotSupported,
}

/// One side of the channel. `N` bounds the outstanding requests.
#[derive(Clone, Debug)]
pub struct Endpoint<const N: usize> {
    role: Role,
    range: VersionRange,
    capabilities: u64,
    host: HostParams,
    version_str: [u8; 16],
    state: State,
    peer_version_str: [u8; 16],
    pending: [Option<Pending>; N],
    next_tag: u64,
    last_peer_ms: Option<u64>,
    heartbeat_seq: u64,
    last_heartbeat_sent_ms: Option<u64>,
    started_ms: u64,
    pub counters: Counters,
    pub last_error: LastError,
}

impl<const N: usize> Endpoint<N> {
    /// A new endpoint. `version` is this side's software version (for the
    /// peer's logs); `host` matters only for the host role.
    pub fn new(
        role: Role,
        range: VersionRange,
        capabilities: u64,
        host: HostParams,
        version: &str,
        now_ms: u64,
    ) -> Self {
        Endpoint {
            role,
            range,
            capabilities,
            host,
            version_str: msg::version_field(version),
            state: State::Down,
            peer_version_str: [0; 16],
            pending: [None; N],
            next_tag: 1,
            last_peer_ms: None,
            heartbeat_seq: 0,
            last_heartbeat_sent_ms: None,
            started_ms: now_ms,
            counters: Counters::default(),
            last_error: LastError::None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn range(&self) -> VersionRange {
        self.range
    }

    /// The peer's software version from `HELLO` (empty before).
    pub fn peer_version(&self) -> &str {
        msg::version_str(&self.peer_version_str)
    }

    /// The negotiated version, or this side's highest before negotiation
    /// (what goes in a `HELLO` header).
    pub fn wire_version(&self) -> AbiVersion {
        match self.state {
            State::Up { version, .. } => version,
            _ => self.range.max,
        }
    }

    /// Forgets the peer: pending requests are dropped (the caller reports
    /// them failed), the state goes down. Used on device reset or when the
    /// peer says goodbye.
    pub fn reset(&mut self) {
        self.state = State::Down;
        self.pending = [None; N];
        self.last_peer_ms = None;
        self.last_heartbeat_sent_ms = None;
    }

    fn alloc(&mut self, kind: Kind, now_ms: u64, timeout_ms: u32) -> Result<Out, BeginError> {
        let slot = self
            .pending
            .iter()
            .position(Option::is_none)
            .ok_or(BeginError::Full)?;
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        self.pending[slot] = Some(Pending {
            tag,
            kind,
            sent_ms: now_ms,
            deadline_ms: now_ms.saturating_add(u64::from(timeout_ms)),
        });
        self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
        Ok(Out::request(self.wire_version(), kind, tag, timeout_ms))
    }

    /// Starts a request of ours. The caller encodes `Out` with its payload
    /// and sends it; if sending fails it calls [`Endpoint::abandon`].
    pub fn begin(&mut self, kind: Kind, now_ms: u64, timeout_ms: u32) -> Result<Out, BeginError> {
        let State::Up { capabilities, .. } = self.state else {
            return Err(BeginError::NotUp);
        };
        let needed = match kind {
            Kind::Ping => caps::PING,
            Kind::Heartbeat => caps::HEARTBEAT,
            Kind::Function => caps::FUNCTIONS,
            _ => 0,
        };
        if kind == Kind::Hello || kind.is_event_kind() || capabilities & needed != needed {
            return Err(BeginError::NotSupported);
        }
        self.alloc(kind, now_ms, timeout_ms)
    }

    /// Guest: starts negotiation; returns the `HELLO` header and payload.
    pub fn hello(
        &mut self,
        os: u32,
        now_ms: u64,
        timeout_ms: u32,
    ) -> Result<(Out, Hello), BeginError> {
        self.reset();
        let out = self.alloc(Kind::Hello, now_ms, timeout_ms)?;
        self.state = State::Negotiating;
        Ok((
            out,
            Hello {
                min_version: U32::new(self.range.min.to_wire()),
                max_version: U32::new(self.range.max.to_wire()),
                capabilities: U64::new(self.capabilities),
                os: U32::new(os),
                reserved: U32::new(0),
                driver_version: self.version_str,
            },
        ))
    }

    /// An event of ours (no response expected).
    /// The header of our answer to a request handed out as
    /// [`Outcome::Request`]. `None` when the channel went down or was
    /// renegotiated since (the request is void, section 2 of the spec).
    pub fn respond(&mut self, kind: Kind, tag: u64, status: Status) -> Option<Out> {
        let State::Up { version, .. } = self.state else {
            return None;
        };
        self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
        if status != Status::Ok {
            self.counters.error_replies = self.counters.error_replies.wrapping_add(1);
        }
        Some(Out::response(version, kind, tag, status))
    }

    pub fn event(&mut self, kind: Kind) -> Out {
        self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
        Out::event(self.wire_version(), kind)
    }

    /// The `GOODBYE` payload for `reason`.
    pub fn goodbye_payload(reason: u32) -> Goodbye {
        Goodbye {
            reason: U32::new(reason),
            reserved: U32::new(0),
        }
    }

    /// Forgets a request whose message could not be sent.
    pub fn abandon(&mut self, tag: u64) {
        for p in self.pending.iter_mut() {
            if p.is_some_and(|p| p.tag == tag) {
                *p = None;
            }
        }
    }

    /// Removes and returns one request whose deadline passed.
    pub fn expire(&mut self, now_ms: u64) -> Option<Pending> {
        for slot in self.pending.iter_mut() {
            if let Some(p) = *slot {
                if p.deadline_ms <= now_ms {
                    *slot = None;
                    self.counters.timeouts = self.counters.timeouts.wrapping_add(1);
                    self.last_error = LastError::Timeout(p.kind);
                    if p.kind == Kind::Hello {
                        self.state = State::Down;
                    }
                    return Some(p);
                }
            }
        }
        None
    }

    pub fn outstanding(&self) -> usize {
        self.pending.iter().filter(|p| p.is_some()).count()
    }

    /// Whether a heartbeat of ours is due (guest role: every interval).
    pub fn heartbeat_due(&self, now_ms: u64) -> bool {
        let State::Up {
            heartbeat_interval_ms,
            capabilities,
            ..
        } = self.state
        else {
            return false;
        };
        if self.role != Role::Guest || capabilities & caps::HEARTBEAT == 0 {
            return false;
        }
        if self
            .pending
            .iter()
            .flatten()
            .any(|p| p.kind == Kind::Heartbeat)
        {
            return false;
        }
        match self.last_heartbeat_sent_ms {
            None => true,
            Some(t) => now_ms.saturating_sub(t) >= u64::from(heartbeat_interval_ms),
        }
    }

    /// Starts a heartbeat request and returns its header and payload.
    pub fn heartbeat(&mut self, now_ms: u64) -> Result<(Out, Heartbeat), BeginError> {
        let timeout = match self.state {
            State::Up {
                heartbeat_timeout_ms,
                ..
            } => heartbeat_timeout_ms,
            _ => return Err(BeginError::NotUp),
        };
        let out = self.begin(Kind::Heartbeat, now_ms, timeout)?;
        self.last_heartbeat_sent_ms = Some(now_ms);
        self.heartbeat_seq = self.heartbeat_seq.wrapping_add(1);
        Ok((out, self.heartbeat_body(now_ms)))
    }

    fn heartbeat_body(&self, now_ms: u64) -> Heartbeat {
        Heartbeat {
            seq: U64::new(self.heartbeat_seq),
            uptime_ms: U64::new(now_ms.saturating_sub(self.started_ms)),
        }
    }

    /// Whether the peer has been heard from within the heartbeat timeout.
    /// `None` before negotiation.
    pub fn peer_alive(&self, now_ms: u64) -> Option<bool> {
        let State::Up {
            heartbeat_timeout_ms,
            ..
        } = self.state
        else {
            return None;
        };
        let last = self.last_peer_ms?;
        Some(now_ms.saturating_sub(last) <= u64::from(heartbeat_timeout_ms))
    }

    /// Milliseconds since the peer was last heard from.
    pub fn peer_silence_ms(&self, now_ms: u64) -> Option<u64> {
        self.last_peer_ms.map(|t| now_ms.saturating_sub(t))
    }

    fn error_reply<'a>(&mut self, m: &Message<'_>, status: Status) -> Outcome<'a> {
        self.counters.error_replies = self.counters.error_replies.wrapping_add(1);
        self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
        Outcome::Reply {
            out: Out::response(self.wire_version(), m.kind, m.tag, status),
            payload: ReplyPayload::Borrowed(&[]),
        }
    }

    /// Feeds one incoming message (a slot's bytes).
    pub fn receive<'a>(&mut self, bytes: &'a [u8], now_ms: u64) -> Outcome<'a> {
        self.counters.rx_messages = self.counters.rx_messages.wrapping_add(1);
        let m = match parse(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.counters.malformed = self.counters.malformed.wrapping_add(1);
                self.last_error = LastError::Malformed(e);
                return Outcome::Nothing;
            }
        };
        self.last_peer_ms = Some(now_ms);
        if m.response {
            self.counters.rx_responses = self.counters.rx_responses.wrapping_add(1);
            return self.on_response(&m, now_ms);
        }
        if m.event {
            self.counters.rx_events = self.counters.rx_events.wrapping_add(1);
            if m.kind == Kind::Goodbye {
                self.reset();
            }
            return Outcome::PeerEvent {
                kind: m.kind,
                payload: m.payload,
            };
        }
        self.counters.rx_requests = self.counters.rx_requests.wrapping_add(1);
        if m.kind == Kind::Hello {
            return self.on_hello(&m);
        }
        let State::Up { version, .. } = self.state else {
            self.last_error = LastError::NotNegotiated(m.kind);
            return self.error_reply(&m, Status::NotNegotiated);
        };
        if m.version != version {
            self.last_error = LastError::WrongVersion(m.version);
            return self.error_reply(&m, Status::BadVersion);
        }
        match m.kind {
            Kind::Ping => {
                self.counters.pings_answered = self.counters.pings_answered.wrapping_add(1);
                self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
                Outcome::Reply {
                    out: Out::response(version, Kind::Ping, m.tag, Status::Ok),
                    payload: ReplyPayload::Borrowed(m.payload),
                }
            }
            Kind::Heartbeat => {
                if msg::payload::<Heartbeat>(m.payload).is_none() {
                    self.last_error = LastError::ShortPayload(Kind::Heartbeat);
                    return self.error_reply(&m, Status::BadLength);
                }
                self.counters.heartbeats_received =
                    self.counters.heartbeats_received.wrapping_add(1);
                self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
                let body = self.heartbeat_body(now_ms);
                Outcome::Reply {
                    out: Out::response(version, Kind::Heartbeat, m.tag, Status::Ok),
                    payload: ReplyPayload::built(body.as_bytes()),
                }
            }
            Kind::Function => {
                let State::Up { capabilities, .. } = self.state else {
                    return self.error_reply(&m, Status::NotNegotiated);
                };
                if self.role != Role::Guest || capabilities & caps::FUNCTIONS == 0 {
                    return self.error_reply(&m, Status::UnknownKind);
                }
                if msg::payload::<FunctionRequest>(m.payload).is_none() {
                    self.last_error = LastError::ShortPayload(Kind::Function);
                    return self.error_reply(&m, Status::BadLength);
                }
                Outcome::Request {
                    kind: m.kind,
                    tag: m.tag,
                    timeout_ms: m.timeout_ms,
                    payload: m.payload,
                }
            }
            // Hello is handled above; events never reach here.
            Kind::Hello | Kind::Goodbye | Kind::Event => self.error_reply(&m, Status::UnknownKind),
        }
    }

    fn on_hello<'a>(&mut self, m: &Message<'_>) -> Outcome<'a> {
        if self.role != Role::Host {
            return self.error_reply(m, Status::UnknownKind);
        }
        let Some(h) = msg::payload::<Hello>(m.payload) else {
            self.last_error = LastError::ShortPayload(Kind::Hello);
            return self.error_reply(m, Status::BadLength);
        };
        let guest = VersionRange {
            min: AbiVersion::from_wire(h.min_version.get()),
            max: AbiVersion::from_wire(h.max_version.get()),
        };
        // A new HELLO restarts the channel: the guest's driver restarted.
        self.pending = [None; N];
        self.peer_version_str = h.driver_version;
        let mut reply = HelloReply {
            version: U32::new(0),
            host_min_version: U32::new(self.range.min.to_wire()),
            host_max_version: U32::new(self.range.max.to_wire()),
            reserved: U32::new(0),
            capabilities: U64::new(0),
            heartbeat_interval_ms: U32::new(self.host.heartbeat_interval_ms),
            heartbeat_timeout_ms: U32::new(self.host.heartbeat_timeout_ms),
            session: U64::new(self.host.session),
            host_version: self.version_str,
        };
        self.counters.tx_messages = self.counters.tx_messages.wrapping_add(1);
        match negotiate(guest, self.range) {
            Ok(version) => {
                let capabilities =
                    h.capabilities.get() & self.capabilities & caps::known_in(version);
                reply.version = U32::new(version.to_wire());
                reply.capabilities = U64::new(capabilities);
                self.state = State::Up {
                    version,
                    capabilities,
                    heartbeat_interval_ms: self.host.heartbeat_interval_ms,
                    heartbeat_timeout_ms: self.host.heartbeat_timeout_ms,
                    session: self.host.session,
                };
                self.counters.negotiations = self.counters.negotiations.wrapping_add(1);
                Outcome::Reply {
                    // The reply speaks the chosen version.
                    out: Out::response(version, Kind::Hello, m.tag, Status::Ok),
                    payload: ReplyPayload::built(reply.as_bytes()),
                }
            }
            Err(e) => {
                let peer = guest;
                self.state = State::Refused { peer };
                self.last_error = LastError::NoCommonVersion { peer };
                self.counters.error_replies = self.counters.error_replies.wrapping_add(1);
                let status = match e {
                    NegotiationError::EmptyRange | NegotiationError::NoCommonVersion => {
                        Status::NoCommonVersion
                    }
                };
                Outcome::Reply {
                    out: Out::response(self.range.max, Kind::Hello, m.tag, status),
                    payload: ReplyPayload::built(reply.as_bytes()),
                }
            }
        }
    }

    fn on_response<'a>(&mut self, m: &Message<'a>, _now_ms: u64) -> Outcome<'a> {
        let Some(slot) = self
            .pending
            .iter()
            .position(|p| p.is_some_and(|p| p.tag == m.tag && p.kind == m.kind))
        else {
            self.counters.unexpected_responses = self.counters.unexpected_responses.wrapping_add(1);
            self.last_error = LastError::UnexpectedResponse(m.tag);
            return Outcome::Nothing;
        };
        self.pending[slot] = None;
        if m.status != Status::Ok && m.kind != Kind::Hello {
            self.counters.failed_requests = self.counters.failed_requests.wrapping_add(1);
            self.last_error = LastError::PeerError(m.kind, m.status);
        }
        if m.kind == Kind::Hello && self.role == Role::Guest {
            let Some(r) = msg::payload::<HelloReply>(m.payload) else {
                self.state = State::Down;
                self.last_error = LastError::ShortPayload(Kind::Hello);
                return Outcome::Nothing;
            };
            let host = VersionRange {
                min: AbiVersion::from_wire(r.host_min_version.get()),
                max: AbiVersion::from_wire(r.host_max_version.get()),
            };
            self.peer_version_str = r.host_version;
            let chosen = AbiVersion::from_wire(r.version.get());
            // Accept only what we would have chosen ourselves.
            let ours = negotiate(self.range, host);
            if m.status != Status::Ok || ours != Ok(chosen) {
                self.state = State::Refused { peer: host };
                self.last_error = LastError::NoCommonVersion { peer: host };
                return Outcome::Refused { peer: host };
            }
            let capabilities = r.capabilities.get() & self.capabilities & caps::known_in(chosen);
            self.state = State::Up {
                version: chosen,
                capabilities,
                heartbeat_interval_ms: r.heartbeat_interval_ms.get().max(10),
                heartbeat_timeout_ms: r.heartbeat_timeout_ms.get().max(50),
                session: r.session.get(),
            };
            self.counters.negotiations = self.counters.negotiations.wrapping_add(1);
            return Outcome::Negotiated {
                version: chosen,
                capabilities,
            };
        }
        Outcome::Completed {
            tag: m.tag,
            kind: m.kind,
            status: m.status,
            payload: m.payload,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::super::msg::{encode, goodbye, os};
    use super::super::version::SUPPORTED;
    use super::*;

    type Ep = Endpoint<8>;

    fn host() -> Ep {
        Ep::new(
            Role::Host,
            SUPPORTED,
            caps::ALL_V1_0,
            HostParams {
                session: 42,
                ..DEFAULT_HOST_PARAMS
            },
            "host-0.1",
            0,
        )
    }
    fn guest_with(range: VersionRange) -> Ep {
        Ep::new(
            Role::Guest,
            range,
            caps::ALL_V1_0,
            DEFAULT_HOST_PARAMS,
            "guest-0.1",
            0,
        )
    }

    fn enc(out: &Out, payload: &[u8]) -> Vec<u8> {
        let mut b = std::vec![0u8; 512];
        let n = encode(&mut b, out, payload).unwrap();
        b.truncate(n);
        b
    }

    /// Delivers a message and returns the encoded reply, if any.
    fn deliver(to: &mut Ep, bytes: &[u8], now: u64) -> Option<Vec<u8>> {
        match to.receive(bytes, now) {
            Outcome::Reply { out, payload } => Some(enc(&out, payload.as_slice())),
            _ => None,
        }
    }

    fn connect(g: &mut Ep, h: &mut Ep) {
        let (out, hello) = g.hello(os::LINUX, 0, 1000).unwrap();
        let reply = deliver(h, &enc(&out, hello.as_bytes()), 1).unwrap();
        match g.receive(&reply, 2) {
            Outcome::Negotiated {
                version,
                capabilities,
            } => {
                assert_eq!(version, super::super::version::ABI_VERSION);
                assert_eq!(capabilities, caps::ALL_V1_0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn function_requests_reach_the_guest_driver_and_back() {
        use super::super::msg::{function, FunctionReport};
        let mk = |role, c| Ep::new(role, SUPPORTED, c, DEFAULT_HOST_PARAMS, "x", 0);
        let (mut g, mut h) = (mk(Role::Guest, caps::ALL), mk(Role::Host, caps::ALL));
        let (out, hello) = g.hello(os::LINUX, 0, 1000).unwrap();
        let reply = deliver(&mut h, &enc(&out, hello.as_bytes()), 1).unwrap();
        assert!(matches!(
            g.receive(&reply, 2),
            Outcome::Negotiated {
                capabilities: caps::ALL,
                ..
            }
        ));
        let req = FunctionRequest {
            op: U32::new(function::op::QUIESCE),
            segment: 0.into(),
            bus: 3,
            devfn: 0,
            drain_ms: U32::new(500),
            lease_ms: U32::new(0),
            policy: U32::new(0),
            volume: U32::new(0),
        };
        let out = h.begin(Kind::Function, 10, 2000).unwrap();
        let bytes = enc(&out, req.as_bytes());
        let (tag, got) = match g.receive(&bytes, 11) {
            Outcome::Request {
                kind: Kind::Function,
                tag,
                timeout_ms: 2000,
                payload,
            } => (tag, msg::payload::<FunctionRequest>(payload).unwrap()),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, req);
        let report = FunctionReport {
            state: U32::new(function::state::PRESENT | function::state::QUIESCED),
            power_state: U32::new(0),
            disks: U32::new(1),
            in_flight: U32::new(0),
            drain_us: U32::new(1234),
            quiesces: U32::new(1),
            driver: msg::version_field("nvme"),
        };
        let out = g.respond(Kind::Function, tag, Status::Ok).unwrap();
        match h.receive(&enc(&out, report.as_bytes()), 12) {
            Outcome::Completed {
                kind: Kind::Function,
                status: Status::Ok,
                payload,
                ..
            } => {
                assert_eq!(msg::payload::<FunctionReport>(payload), Some(report));
            }
            other => panic!("{other:?}"),
        }
        // A short payload is refused by the endpoint, not handed out.
        let out = h.begin(Kind::Function, 20, 2000).unwrap();
        let r = deliver(&mut g, &enc(&out, &req.as_bytes()[..10]), 21).unwrap();
        assert_eq!(parse(&r).unwrap().status, Status::BadLength);
        // The host does not take FUNCTION requests.
        let r = deliver(
            &mut h,
            &enc(
                &Out::request(super::super::version::ABI_VERSION, Kind::Function, 5, 0),
                req.as_bytes(),
            ),
            22,
        )
        .unwrap();
        assert_eq!(parse(&r).unwrap().status, Status::UnknownKind);
        // After a reset the late answer has no channel to go to.
        g.reset();
        assert_eq!(g.respond(Kind::Function, tag, Status::Ok), None);
        // Peers that settle on 1.0 do not use them, whatever their builds have.
        let r10 = VersionRange {
            min: AbiVersion { major: 1, minor: 0 },
            max: AbiVersion { major: 1, minor: 0 },
        };
        let mut g10 = Ep::new(
            Role::Guest,
            r10,
            caps::ALL_V1_1,
            DEFAULT_HOST_PARAMS,
            "x",
            0,
        );
        let mut h11 = mk(Role::Host, caps::ALL_V1_1);
        let (out, hello) = g10.hello(os::LINUX, 0, 1000).unwrap();
        let reply = deliver(&mut h11, &enc(&out, hello.as_bytes()), 1).unwrap();
        assert!(matches!(
            g10.receive(&reply, 2),
            Outcome::Negotiated {
                capabilities: caps::ALL_V1_0,
                ..
            }
        ));
        assert_eq!(
            h11.begin(Kind::Function, 3, 100),
            Err(BeginError::NotSupported)
        );
        // A guest build without them never gets them.
        let (mut g0, mut h1) = (
            mk(Role::Guest, caps::ALL_V1_0),
            mk(Role::Host, caps::ALL_V1_1),
        );
        let (out, hello) = g0.hello(os::LINUX, 0, 1000).unwrap();
        let reply = deliver(&mut h1, &enc(&out, hello.as_bytes()), 1).unwrap();
        g0.receive(&reply, 2);
        assert_eq!(
            h1.begin(Kind::Function, 3, 100),
            Err(BeginError::NotSupported)
        );
    }

    #[test]
    fn a_1_1_peer_gets_functions_but_not_paths() {
        let r11 = VersionRange {
            min: AbiVersion { major: 1, minor: 0 },
            max: AbiVersion { major: 1, minor: 1 },
        };
        let mut g11 = Ep::new(Role::Guest, r11, caps::ALL, DEFAULT_HOST_PARAMS, "x", 0);
        let mut h = Ep::new(
            Role::Host,
            SUPPORTED,
            caps::ALL,
            DEFAULT_HOST_PARAMS,
            "x",
            0,
        );
        let (out, hello) = g11.hello(os::LINUX, 0, 1000).unwrap();
        let reply = deliver(&mut h, &enc(&out, hello.as_bytes()), 1).unwrap();
        assert!(matches!(
            g11.receive(&reply, 2),
            Outcome::Negotiated {
                capabilities: caps::ALL_V1_1,
                ..
            }
        ));
        assert_eq!(caps::ALL_V1_1 & caps::PATHS, 0);
    }

    #[test]
    fn negotiate_ping_and_heartbeat() {
        let (mut g, mut h) = (guest_with(SUPPORTED), host());
        connect(&mut g, &mut h);
        assert!(matches!(h.state(), State::Up { session: 42, .. }));
        assert_eq!(g.peer_version(), "host-0.1");
        assert_eq!(h.peer_version(), "guest-0.1");
        // Host pings the guest.
        let out = h.begin(Kind::Ping, 10, 100).unwrap();
        let reply = deliver(&mut g, &enc(&out, b"abc"), 11).unwrap();
        match h.receive(&reply, 12) {
            Outcome::Completed {
                tag,
                status,
                payload,
                ..
            } => {
                assert_eq!(tag, out.tag);
                assert_eq!(status, Status::Ok);
                assert_eq!(payload, b"abc");
            }
            other => panic!("{other:?}"),
        }
        // Heartbeats flow from the guest.
        assert!(g.heartbeat_due(20));
        let (out, hb) = g.heartbeat(20).unwrap();
        assert!(!g.heartbeat_due(21), "one heartbeat at a time");
        let reply = deliver(&mut h, &enc(&out, hb.as_bytes()), 21).unwrap();
        assert!(matches!(
            g.receive(&reply, 22),
            Outcome::Completed {
                kind: Kind::Heartbeat,
                ..
            }
        ));
        assert!(!g.heartbeat_due(500));
        assert!(g.heartbeat_due(1020));
        assert_eq!(h.peer_alive(21), Some(true));
        assert_eq!(h.peer_alive(6000), Some(false));
        assert_eq!(h.counters.heartbeats_received, 1);
    }

    #[test]
    fn version_mismatch_degrades_or_refuses_on_both_sides() {
        let v = |a, b| AbiVersion { major: a, minor: b };
        // A newer guest (1.0..1.7) talks 1.0 to this host.
        let (mut g, mut h) = (
            guest_with(VersionRange {
                min: v(1, 0),
                max: v(1, 7),
            }),
            host(),
        );
        connect(&mut g, &mut h);
        // A guest that speaks only 2.x is refused, and both sides know why.
        let (mut g, mut h) = (
            guest_with(VersionRange {
                min: v(2, 0),
                max: v(2, 3),
            }),
            host(),
        );
        let (out, hello) = g.hello(os::LINUX, 0, 1000).unwrap();
        let reply = deliver(&mut h, &enc(&out, hello.as_bytes()), 1).unwrap();
        assert_eq!(
            h.state(),
            State::Refused {
                peer: VersionRange {
                    min: v(2, 0),
                    max: v(2, 3)
                }
            }
        );
        assert!(matches!(h.last_error, LastError::NoCommonVersion { .. }));
        assert_eq!(g.receive(&reply, 2), Outcome::Refused { peer: SUPPORTED });
        assert_eq!(g.state(), State::Refused { peer: SUPPORTED });
        // Requests are refused until a successful HELLO.
        assert_eq!(g.begin(Kind::Ping, 3, 10), Err(BeginError::NotUp));
    }

    #[test]
    fn bad_input_is_counted_never_trusted() {
        let (mut g, mut h) = (guest_with(SUPPORTED), host());
        // Before HELLO: a ping is answered NotNegotiated.
        let early = enc(&Out::request(SUPPORTED.max, Kind::Ping, 9, 0), b"x");
        let r = deliver(&mut h, &early, 0).unwrap();
        assert_eq!(parse(&r).unwrap().status, Status::NotNegotiated);
        connect(&mut g, &mut h);
        // Garbage is dropped and counted.
        assert_eq!(h.receive(&[0u8; 40], 5), Outcome::Nothing);
        assert_eq!(h.counters.malformed, 1);
        // Wrong version.
        let wrong = enc(
            &Out::request(AbiVersion { major: 1, minor: 9 }, Kind::Ping, 9, 0),
            b"x",
        );
        let r = deliver(&mut h, &wrong, 6).unwrap();
        assert_eq!(parse(&r).unwrap().status, Status::BadVersion);
        // A heartbeat with a short payload.
        let short = enc(
            &Out::request(SUPPORTED.max, Kind::Heartbeat, 10, 0),
            &[1, 2, 3],
        );
        let r = deliver(&mut h, &short, 7).unwrap();
        assert_eq!(parse(&r).unwrap().status, Status::BadLength);
        // A response nobody asked for (late or forged).
        let forged = enc(
            &Out::response(SUPPORTED.max, Kind::Ping, 12345, Status::Ok),
            b"x",
        );
        assert_eq!(h.receive(&forged, 8), Outcome::Nothing);
        assert_eq!(h.counters.unexpected_responses, 1);
        // A guest may not send HELLO replies' kind as a request to a guest.
        let hello_to_guest = enc(&Out::request(SUPPORTED.max, Kind::Hello, 3, 0), &[0; 40]);
        let r = deliver(&mut g, &hello_to_guest, 9).unwrap();
        assert_eq!(parse(&r).unwrap().status, Status::UnknownKind);
    }

    #[test]
    fn timeouts_and_capacity() {
        let (mut g, mut h) = (guest_with(SUPPORTED), host());
        connect(&mut g, &mut h);
        for i in 0..8 {
            h.begin(Kind::Ping, 100 + i, 50).unwrap();
        }
        assert_eq!(h.begin(Kind::Ping, 200, 50), Err(BeginError::Full));
        assert_eq!(h.expire(149), None);
        let p = h.expire(150).unwrap();
        assert_eq!(p.kind, Kind::Ping);
        assert_eq!(h.counters.timeouts, 1);
        assert!(h.begin(Kind::Ping, 151, 50).is_ok());
        // A late answer to the expired ping is unexpected, not a completion.
        let late = enc(
            &Out::response(SUPPORTED.max, Kind::Ping, p.tag, Status::Ok),
            b"",
        );
        assert_eq!(h.receive(&late, 152), Outcome::Nothing);
    }

    #[test]
    fn goodbye_resets_and_hello_again_renegotiates() {
        let (mut g, mut h) = (guest_with(SUPPORTED), host());
        connect(&mut g, &mut h);
        h.begin(Kind::Ping, 0, 1000).unwrap();
        let bye = enc(
            &g.event(Kind::Goodbye),
            Ep::goodbye_payload(goodbye::UNLOAD).as_bytes(),
        );
        assert!(matches!(
            h.receive(&bye, 1),
            Outcome::PeerEvent {
                kind: Kind::Goodbye,
                ..
            }
        ));
        assert_eq!(h.state(), State::Down);
        assert_eq!(h.outstanding(), 0);
        connect(&mut g, &mut h);
        assert_eq!(h.counters.negotiations, 2);
    }

    #[test]
    fn hello_timeout_returns_to_down() {
        let mut g = guest_with(SUPPORTED);
        g.hello(os::LINUX, 0, 100).unwrap();
        assert_eq!(g.state(), State::Negotiating);
        assert_eq!(g.expire(100).map(|p| p.kind), Some(Kind::Hello));
        assert_eq!(g.state(), State::Down);
    }
}
