//! Deliberately broken messages, for robustness tests of both sides.
//!
//! The host's `tandem channel inject` and the Linux module's `inject`
//! debugfs hook build their faults here, so both ends are tested with the
//! same bad input. A correct receiver counts each one and carries on.

use super::msg::{encode, Kind, Out, Status};
use super::version::AbiVersion;

/// A kind of broken message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes without the magic.
    Garbage,
    /// A header whose length runs past the slot.
    Oversized,
    /// A kind no version defines.
    UnknownKind,
    /// Undefined flag bits.
    BadFlags,
    /// A request in a version other than the negotiated one.
    BadVersion,
    /// A heartbeat whose payload is too short.
    ShortPayload,
    /// A response to a request the receiver never sent.
    UnexpectedResponse,
}

/// Every fault, in a fixed order.
pub const ALL: [Fault; 7] = [
    Fault::Garbage,
    Fault::Oversized,
    Fault::UnknownKind,
    Fault::BadFlags,
    Fault::BadVersion,
    Fault::ShortPayload,
    Fault::UnexpectedResponse,
];

impl Fault {
    pub const fn name(self) -> &'static str {
        match self {
            Fault::Garbage => "garbage",
            Fault::Oversized => "oversized",
            Fault::UnknownKind => "unknown_kind",
            Fault::BadFlags => "bad_flags",
            Fault::BadVersion => "bad_version",
            Fault::ShortPayload => "short_payload",
            Fault::UnexpectedResponse => "unexpected_response",
        }
    }

    pub fn from_name(s: &str) -> Option<Fault> {
        ALL.iter().copied().find(|f| f.name() == s)
    }

    /// Writes the broken message for `version` (the negotiated one) into
    /// `buf` and returns its length (0 if `buf` is too small: at least 64
    /// bytes are needed).
    pub fn build(self, version: AbiVersion, buf: &mut [u8]) -> usize {
        if buf.len() < 64 {
            return 0;
        }
        let ping = |buf: &mut [u8]| {
            encode(buf, &Out::request(version, Kind::Ping, 0xfeed, 100), b"x").unwrap_or(0)
        };
        match self {
            Fault::Garbage => {
                for (i, b) in buf.iter_mut().take(64).enumerate() {
                    *b = (i as u8).wrapping_mul(37) ^ 0x5a;
                }
                64
            }
            Fault::Oversized => {
                let n = ping(buf);
                buf[16..20].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
                n
            }
            Fault::UnknownKind => {
                let n = ping(buf);
                buf[8..10].copy_from_slice(&0x7777u16.to_le_bytes());
                n
            }
            Fault::BadFlags => {
                let n = ping(buf);
                buf[10..12].copy_from_slice(&0x80u16.to_le_bytes());
                n
            }
            Fault::BadVersion => {
                let wrong = AbiVersion {
                    major: version.major,
                    minor: version.minor.wrapping_add(9),
                };
                encode(
                    buf,
                    &Out::request(wrong, Kind::Ping, 0xbad1, 100),
                    b"wrong version",
                )
                .unwrap_or(0)
            }
            Fault::ShortPayload => encode(
                buf,
                &Out::request(version, Kind::Heartbeat, 0xbad2, 100),
                &[1, 2, 3],
            )
            .unwrap_or(0),
            Fault::UnexpectedResponse => encode(
                buf,
                &Out::response(version, Kind::Ping, 0x0bad_cafe_0bad_cafe, Status::Ok),
                b"nobody asked",
            )
            .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::channel::{Endpoint, HostParams, Outcome, Role};
    use super::super::msg::{caps, parse};
    use super::super::version::{ABI_VERSION, SUPPORTED};
    use super::*;

    #[test]
    fn each_fault_is_refused_the_way_it_should_be() {
        for f in ALL {
            assert_eq!(Fault::from_name(f.name()), Some(f));
            let mut buf = [0u8; 128];
            let n = f.build(ABI_VERSION, &mut buf);
            assert!(n > 0);
            let malformed = parse(&buf[..n]).is_err();
            assert_eq!(
                malformed,
                matches!(
                    f,
                    Fault::Garbage | Fault::Oversized | Fault::UnknownKind | Fault::BadFlags
                ),
                "{f:?}"
            );
        }
        // Against an endpoint that is up, the well-formed ones get an error
        // reply or are counted as unexpected.
        let params = HostParams {
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            session: 1,
        };
        let mut h: Endpoint<4> =
            Endpoint::new(Role::Host, SUPPORTED, caps::ALL_V1_0, params, "h", 0);
        let mut g: Endpoint<4> =
            Endpoint::new(Role::Guest, SUPPORTED, caps::ALL_V1_0, params, "g", 0);
        let (out, hello) = g.hello(1, 0, 100).unwrap();
        let mut buf = [0u8; 128];
        let n = encode(&mut buf, &out, zerocopy::IntoBytes::as_bytes(&hello)).unwrap();
        assert!(matches!(h.receive(&buf[..n], 0), Outcome::Reply { .. }));
        for f in ALL {
            let n = f.build(ABI_VERSION, &mut buf);
            let _ = h.receive(&buf[..n], 1);
        }
        assert_eq!(h.counters.malformed, 4);
        assert_eq!(h.counters.error_replies, 2);
        assert_eq!(h.counters.unexpected_responses, 1);
    }
}
