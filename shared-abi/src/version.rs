//! The ABI version both sides announce.
//!
//! Included verbatim by the Linux guest module (see the crate docs): keep it
//! free of `crate::` paths and of anything outside `core`.

/// A version of the Tandem guest/host ABI.
///
/// `major` changes when a peer of the old major cannot talk to a peer of the
/// new one; `minor` adds messages or fields that an older peer may ignore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AbiVersion {
    pub major: u16,
    pub minor: u16,
}

/// The ABI version this build of Tandem speaks.
pub const ABI_VERSION: AbiVersion = AbiVersion { major: 1, minor: 0 };

impl AbiVersion {
    /// The version packed in 32 bits as it travels on the wire:
    /// major in the high half, minor in the low half.
    pub const fn to_wire(self) -> u32 {
        ((self.major as u32) << 16) | self.minor as u32
    }

    /// The inverse of [`AbiVersion::to_wire`]; every `u32` is a valid version.
    pub const fn from_wire(raw: u32) -> Self {
        AbiVersion {
            major: (raw >> 16) as u16,
            minor: (raw & 0xffff) as u16,
        }
    }

    /// Whether a peer speaking `other` can talk to us at all.
    pub const fn compatible_with(self, other: AbiVersion) -> bool {
        self.major == other.major
    }
}

impl core::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_roundtrip_and_golden_bytes() {
        // Golden value: the guest module checks the same number.
        assert_eq!(ABI_VERSION.to_wire(), 0x0001_0000);
        assert_eq!(
            ABI_VERSION.to_wire().to_le_bytes(),
            [0x00, 0x00, 0x01, 0x00]
        );
        for raw in [0u32, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX] {
            assert_eq!(AbiVersion::from_wire(raw).to_wire(), raw);
        }
    }

    #[test]
    fn compatibility_is_by_major() {
        let v1_3 = AbiVersion { major: 1, minor: 3 };
        let v2_0 = AbiVersion { major: 2, minor: 0 };
        assert!(ABI_VERSION.compatible_with(v1_3));
        assert!(!ABI_VERSION.compatible_with(v2_0));
    }

    #[test]
    fn display() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(
            AbiVersion {
                major: 1,
                minor: 12
            }
            .to_string(),
            "1.12"
        );
    }
}
