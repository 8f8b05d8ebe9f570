//! The two message rings in guest memory, and their index rules.
//!
//! The guest allocates both rings in DMA-able memory and gives their bus
//! addresses to the device ([`super::regs`]). One ring carries guest-to-host
//! messages (G2H: the guest produces, the host consumes), the other
//! host-to-guest (H2G). Both have the same layout:
//!
//! ```text
//! offset 0    producer index, u32 LE, written only by the producer
//! offset 64   consumer index, u32 LE, written only by the consumer
//! offset 128  slot 0, slot 1, ... slot_count - 1, each slot_size bytes
//! ```
//! Indices run freely and wrap at 2^32; slot `i` is at index `i & (count-1)`.
//! `producer - consumer` (wrapping) is the number of full slots and must
//! never exceed `slot_count`: a reader that sees more treats the ring as
//! corrupt. Each slot holds one message (header and payload).
//!
//! Ordering: a producer writes the slot, then (release) the producer
//! index, then notifies; a consumer reads (acquire) the producer index,
//! then the slots, then writes (release) the consumer index.

/// Offset of the producer index in a ring.
pub const PRODUCER_OFFSET: usize = 0;
/// Offset of the consumer index (its own cache line).
pub const CONSUMER_OFFSET: usize = 64;
/// Offset of the first slot.
pub const SLOTS_OFFSET: usize = 128;

pub const MIN_SLOTS: u32 = 2;
pub const MAX_SLOTS: u32 = 1024;
pub const MIN_SLOT_SIZE: u32 = 64;
pub const MAX_SLOT_SIZE: u32 = 4096;

/// Shape of both rings, chosen by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    pub slot_count: u32,
    pub slot_size: u32,
}

/// The default geometry the Linux driver uses: 64 slots of 512 bytes.
pub const DEFAULT_GEOMETRY: RingGeometry = RingGeometry {
    slot_count: 64,
    slot_size: 512,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// Slot count or size is not a power of two within the limits.
    BadGeometry,
    /// `producer - consumer` exceeds the slot count.
    Corrupt { producer: u32, consumer: u32 },
    /// No free slot.
    Full,
}

impl RingGeometry {
    /// Checks the limits: both powers of two, count in 2..=1024, size in
    /// 64..=4096.
    pub const fn validate(self) -> Result<RingGeometry, RingError> {
        let c = self.slot_count;
        let s = self.slot_size;
        if c < MIN_SLOTS
            || c > MAX_SLOTS
            || !c.is_power_of_two()
            || s < MIN_SLOT_SIZE
            || s > MAX_SLOT_SIZE
            || !s.is_power_of_two()
        {
            return Err(RingError::BadGeometry);
        }
        Ok(self)
    }

    /// Packs the geometry for the `RING_GEOMETRY` register: slot count in
    /// bits 0..16, slot size in bits 16..32.
    pub const fn to_register(self) -> u32 {
        (self.slot_count & 0xffff) | (self.slot_size << 16)
    }

    pub const fn from_register(raw: u32) -> RingGeometry {
        RingGeometry {
            slot_count: raw & 0xffff,
            slot_size: raw >> 16,
        }
    }

    /// Bytes one ring occupies.
    pub const fn ring_bytes(self) -> usize {
        SLOTS_OFFSET + self.slot_count as usize * self.slot_size as usize
    }

    /// The largest payload a message in one slot can carry.
    pub const fn max_payload(self) -> usize {
        self.slot_size as usize - super::msg::HEADER_LEN
    }

    /// Byte offset of the slot for a free-running index.
    pub const fn slot_offset(self, index: u32) -> usize {
        SLOTS_OFFSET + (index & (self.slot_count - 1)) as usize * self.slot_size as usize
    }

    /// Full slots, or `Corrupt` when the indices cannot both be right.
    pub const fn used(self, producer: u32, consumer: u32) -> Result<u32, RingError> {
        let used = producer.wrapping_sub(consumer);
        if used > self.slot_count {
            return Err(RingError::Corrupt { producer, consumer });
        }
        Ok(used)
    }

    /// Free slots for the producer.
    pub const fn free(self, producer: u32, consumer: u32) -> Result<u32, RingError> {
        match self.used(producer, consumer) {
            Ok(u) => Ok(self.slot_count - u),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_limits() {
        assert!(DEFAULT_GEOMETRY.validate().is_ok());
        for (c, s) in [
            (0, 512),
            (1, 512),
            (3, 512),
            (2048, 512),
            (64, 32),
            (64, 8192),
            (64, 500),
        ] {
            assert_eq!(
                RingGeometry {
                    slot_count: c,
                    slot_size: s
                }
                .validate(),
                Err(RingError::BadGeometry),
                "{c} x {s}"
            );
        }
        let g = RingGeometry {
            slot_count: 1024,
            slot_size: 4096,
        };
        assert_eq!(RingGeometry::from_register(g.to_register()), g);
        assert_eq!(DEFAULT_GEOMETRY.ring_bytes(), 128 + 64 * 512);
        assert_eq!(DEFAULT_GEOMETRY.max_payload(), 480);
    }

    #[test]
    fn index_math_wraps() {
        let g = RingGeometry {
            slot_count: 4,
            slot_size: 64,
        };
        assert_eq!(g.slot_offset(0), 128);
        assert_eq!(g.slot_offset(5), 128 + 64);
        assert_eq!(g.used(3, 1), Ok(2));
        assert_eq!(g.used(1, u32::MAX - 1), Ok(3));
        assert_eq!(g.free(2, u32::MAX - 1), Ok(0));
        assert_eq!(
            g.used(9, 4),
            Err(RingError::Corrupt {
                producer: 9,
                consumer: 4
            })
        );
        // A consumer ahead of the producer is corrupt too.
        assert!(g.used(1, 2).is_err());
    }
}
