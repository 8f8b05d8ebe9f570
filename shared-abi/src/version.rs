//! ABI versions, the range each side supports, and how two sides agree.

/// A version of the Tandem guest/host ABI.
///
/// `major` changes when a peer of the old major cannot talk to a peer of
/// the new one; `minor` adds messages or fields that an older peer may
/// ignore. A peer that speaks `x.y` also speaks `x.0` to `x.(y-1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AbiVersion {
    pub major: u16,
    pub minor: u16,
}

/// The ABI version this build of Tandem speaks at most.
pub const ABI_VERSION: AbiVersion = AbiVersion { major: 1, minor: 2 };

/// The versions this build can speak.
pub const SUPPORTED: VersionRange = VersionRange {
    min: AbiVersion { major: 1, minor: 0 },
    max: ABI_VERSION,
};

impl AbiVersion {
    /// The version packed in 32 bits as it travels on the wire:
    /// major in the high half, minor in the low half.
    pub const fn to_wire(self) -> u32 {
        ((self.major as u32) << 16) | self.minor as u32
    }

    /// The inverse of [`AbiVersion::to_wire`]; every `u32` is a version.
    pub const fn from_wire(raw: u32) -> Self {
        AbiVersion {
            major: (raw >> 16) as u16,
            minor: (raw & 0xffff) as u16,
        }
    }
}

impl core::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// An inclusive range of versions a peer speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionRange {
    pub min: AbiVersion,
    pub max: AbiVersion,
}

/// Why two peers cannot talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NegotiationError {
    /// A range whose minimum is above its maximum.
    EmptyRange,
    /// The ranges do not overlap.
    NoCommonVersion,
}

impl VersionRange {
    pub const fn is_valid(&self) -> bool {
        self.min.to_wire() <= self.max.to_wire()
    }

    pub const fn contains(&self, v: AbiVersion) -> bool {
        self.min.to_wire() <= v.to_wire() && v.to_wire() <= self.max.to_wire()
    }
}

/// The version two peers use: the highest one both speak. Both sides run
/// this same function on the same two ranges, so they agree without a
/// further round trip.
pub fn negotiate(guest: VersionRange, host: VersionRange) -> Result<AbiVersion, NegotiationError> {
    if !guest.is_valid() || !host.is_valid() {
        return Err(NegotiationError::EmptyRange);
    }
    let low = if guest.min > host.min {
        guest.min
    } else {
        host.min
    };
    let high = if guest.max < host.max {
        guest.max
    } else {
        host.max
    };
    if low > high {
        return Err(NegotiationError::NoCommonVersion);
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v(major: u16, minor: u16) -> AbiVersion {
        AbiVersion { major, minor }
    }
    const fn r(a: AbiVersion, b: AbiVersion) -> VersionRange {
        VersionRange { min: a, max: b }
    }

    #[test]
    fn wire_roundtrip_and_golden_bytes() {
        assert_eq!(ABI_VERSION.to_wire(), 0x0001_0002);
        assert_eq!(
            ABI_VERSION.to_wire().to_le_bytes(),
            [0x02, 0x00, 0x01, 0x00]
        );
        for raw in [0u32, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX] {
            assert_eq!(AbiVersion::from_wire(raw).to_wire(), raw);
        }
        assert!(v(1, 65535) < v(2, 0));
    }

    #[test]
    fn the_highest_common_version_wins() {
        assert_eq!(
            negotiate(r(v(1, 0), v(1, 5)), r(v(1, 0), v(1, 3))),
            Ok(v(1, 3))
        );
        assert_eq!(
            negotiate(r(v(1, 2), v(2, 1)), r(v(1, 0), v(1, 4))),
            Ok(v(1, 4))
        );
        assert_eq!(negotiate(SUPPORTED, SUPPORTED), Ok(ABI_VERSION));
    }

    #[test]
    fn disjoint_or_empty_ranges_are_refused() {
        assert_eq!(
            negotiate(r(v(2, 0), v(2, 0)), r(v(1, 0), v(1, 9))),
            Err(NegotiationError::NoCommonVersion)
        );
        assert_eq!(
            negotiate(r(v(1, 5), v(1, 0)), SUPPORTED),
            Err(NegotiationError::EmptyRange)
        );
    }

    #[test]
    fn display() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(v(1, 12).to_string(), "1.12");
    }
}
