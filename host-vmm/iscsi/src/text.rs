//! Text parameters (RFC 7143 6.1 and 13): `key=value` pairs separated by
//! NUL, and the negotiation of the operational keys this target supports.

use std::fmt::Write as _;

/// Most key=value pairs one login or text exchange may carry.
const MAX_PAIRS: usize = 256;
/// Longest key and value (RFC 7143 6.1: keys up to 63 bytes, values 8192).
const MAX_KEY: usize = 63;
const MAX_VALUE: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text pair without '=': {0:?}")]
    NoEquals(String),
    #[error("key or value too long")]
    TooLong,
    #[error("more than {MAX_PAIRS} text pairs")]
    TooMany,
    #[error("text is not UTF-8")]
    NotUtf8,
}

pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| TextError::NoEquals(s.chars().take(64).collect()))?;
        if k.is_empty() || k.len() > MAX_KEY || v.len() > MAX_VALUE {
            return Err(TextError::TooLong);
        }
        if out.len() == MAX_PAIRS {
            return Err(TextError::TooMany);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut s = String::new();
    for (k, v) in pairs {
        let _ = write!(s, "{k}={v}\0");
    }
    s.into_bytes()
}

/// The session and connection parameters in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The initiator's MaxRecvDataSegmentLength: the most the target may
    /// put in one PDU's data segment.
    pub peer_max_recv: u32,
    pub max_burst: u32,
    pub first_burst: u32,
}

impl Default for Params {
    fn default() -> Params {
        // RFC 7143 13: the defaults before negotiation.
        Params {
            header_digest: false,
            data_digest: false,
            initial_r2t: true,
            immediate_data: true,
            peer_max_recv: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
        }
    }
}

/// The MaxRecvDataSegmentLength this target declares.
pub const OUR_MAX_RECV: u32 = 262_144;
/// Largest burst this target accepts.
const OUR_MAX_BURST: u32 = 1 << 20;

fn num(v: &str) -> Option<u32> {
    v.parse().ok()
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

fn digest(v: &str) -> Option<bool> {
    // The initiator lists what it accepts in order of preference.
    v.split(',').find_map(|d| match d {
        "CRC32C" => Some(true),
        "None" => Some(false),
        _ => None,
    })
}

impl Params {
    /// Negotiates one operational key; returns the pair to answer with
    /// (`None` for declarative keys that need no answer).
    pub fn negotiate(&mut self, key: &str, value: &str) -> Option<(String, String)> {
        let answer = |v: String| Some((key.to_string(), v));
        let reject = || Some((key.to_string(), "Reject".to_string()));
        match key {
            "HeaderDigest" | "DataDigest" => match digest(value) {
                Some(on) => {
                    if key == "HeaderDigest" {
                        self.header_digest = on;
                    } else {
                        self.data_digest = on;
                    }
                    answer(if on { "CRC32C" } else { "None" }.to_string())
                }
                None => reject(),
            },
            "InitialR2T" => match yes_no(value) {
                // OR: our preference is No.
                Some(b) => {
                    self.initial_r2t = b;
                    answer(yn(b))
                }
                None => reject(),
            },
            "ImmediateData" => match yes_no(value) {
                // AND: our preference is Yes.
                Some(b) => {
                    self.immediate_data = b;
                    answer(yn(b))
                }
                None => reject(),
            },
            "MaxRecvDataSegmentLength" => match num(value) {
                Some(n) if (512..=16_777_215).contains(&n) => {
                    self.peer_max_recv = n;
                    None
                }
                _ => reject(),
            },
            "MaxBurstLength" => match num(value) {
                Some(n) if n >= 512 => {
                    self.max_burst = n.min(OUR_MAX_BURST);
                    self.first_burst = self.first_burst.min(self.max_burst);
                    answer(self.max_burst.to_string())
                }
                _ => reject(),
            },
            "FirstBurstLength" => match num(value) {
                Some(n) if n >= 512 => {
                    self.first_burst = n.min(self.max_burst).min(OUR_MAX_BURST);
                    answer(self.first_burst.to_string())
                }
                _ => reject(),
            },
            "MaxConnections" => match num(value) {
                Some(n) if n >= 1 => answer("1".into()),
                _ => reject(),
            },
            "MaxOutstandingR2T" => match num(value) {
                Some(n) if n >= 1 => answer("1".into()),
                _ => reject(),
            },
            "ErrorRecoveryLevel" => match num(value) {
                Some(_) => answer("0".into()),
                None => reject(),
            },
            "DefaultTime2Wait" => match num(value) {
                Some(n) => answer(n.clamp(2, 3600).to_string()),
                None => reject(),
            },
            "DefaultTime2Retain" => match num(value) {
                Some(n) => answer(n.min(20).to_string()),
                None => reject(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no(value) {
                // OR with our Yes: this target needs data in order.
                Some(_) => answer("Yes".into()),
                None => reject(),
            },
            "IFMarker" | "OFMarker" => answer("No".into()),
            // Declarative, nothing to answer.
            "InitiatorAlias" | "InitiatorName" | "TargetName" | "SessionType" => None,
            _ => answer("NotUnderstood".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let t = b"InitiatorName=iqn.x\0SessionType=Normal\0\0";
        let p = parse(t).unwrap();
        assert_eq!(p[0], ("InitiatorName".into(), "iqn.x".into()));
        assert_eq!(p.len(), 2);
        assert_eq!(
            encode(&p),
            b"InitiatorName=iqn.x\0SessionType=Normal\0".to_vec()
        );
        assert!(matches!(parse(b"novalue\0"), Err(TextError::NoEquals(_))));
        assert_eq!(parse(&[0xff, b'=', b'1']), Err(TextError::NotUtf8));
    }

    #[test]
    fn negotiation_rules() {
        let mut p = Params::default();
        assert_eq!(
            p.negotiate("HeaderDigest", "CRC32C,None"),
            Some(("HeaderDigest".into(), "CRC32C".into()))
        );
        assert!(p.header_digest);
        p.negotiate("DataDigest", "None");
        assert!(!p.data_digest);
        p.negotiate("MaxBurstLength", "16776192");
        assert_eq!(p.max_burst, 1 << 20);
        p.negotiate("FirstBurstLength", "16776192");
        assert_eq!(p.first_burst, 1 << 20);
        assert_eq!(p.negotiate("MaxRecvDataSegmentLength", "65536"), None);
        assert_eq!(p.peer_max_recv, 65536);
        p.negotiate("InitialR2T", "No");
        assert!(!p.initial_r2t);
        assert_eq!(
            p.negotiate("X-com.example.foo", "1"),
            Some(("X-com.example.foo".into(), "NotUnderstood".into()))
        );
        assert_eq!(
            p.negotiate("MaxBurstLength", "abc"),
            Some(("MaxBurstLength".into(), "Reject".into()))
        );
        assert_eq!(p.negotiate("ErrorRecoveryLevel", "2").unwrap().1, "0");
    }
}
