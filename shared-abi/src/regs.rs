//! The control device's registers (BAR0) and interrupt vectors.
//!
//! BAR0 is 4 KiB of 32-bit little-endian registers; accesses of other
//! widths or at unaligned offsets are ignored (reads return 0). MSI-X
//! lives in BAR2 (table at 0, PBA at [`MSIX_PBA_OFFSET`]).

/// RO: [`super::msg::MSG_MAGIC`], so a driver knows what it talks to.
pub const MAGIC: u64 = 0x000;
/// RO: the highest ABI version the device speaks (wire form).
pub const VERSION_MAX: u64 = 0x004;
/// RO: the lowest.
pub const VERSION_MIN: u64 = 0x008;
/// RO: host capabilities, low and high 32 bits (informational; `HELLO`
/// negotiates).
pub const CAPS_LO: u64 = 0x00c;
pub const CAPS_HI: u64 = 0x010;
/// RO: [`status`] bits.
pub const STATUS: u64 = 0x014;
/// RW: [`control`] bits.
pub const CONTROL: u64 = 0x018;
/// RO: the last device error ([`error`]); cleared by a reset.
pub const ERROR: u64 = 0x01c;
/// RW while disabled: the bus address of the G2H ring, low and high halves.
pub const G2H_BASE_LO: u64 = 0x020;
pub const G2H_BASE_HI: u64 = 0x024;
/// RW while disabled: the bus address of the H2G ring.
pub const H2G_BASE_LO: u64 = 0x028;
pub const H2G_BASE_HI: u64 = 0x02c;
/// RW while disabled: [`super::ring::RingGeometry::to_register`].
pub const RING_GEOMETRY: u64 = 0x030;
/// WO: the guest produced into G2H (the value written is ignored; the ring
/// in memory is the truth).
pub const G2H_DOORBELL: u64 = 0x034;
/// WO: the guest consumed from H2G (wakes a host waiting for room).
pub const H2G_DOORBELL: u64 = 0x038;
/// RO: changes every time the device server (re)starts or is reset, so a
/// driver can tell it talks to a new host incarnation.
pub const SESSION: u64 = 0x03c;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x1000;

/// Bits of [`STATUS`].
pub mod status {
    /// The rings were accepted; messages flow.
    pub const ENABLED: u32 = 1 << 0;
    /// The device stopped on an error (see `ERROR`); a reset clears it.
    pub const FAILED: u32 = 1 << 1;
}

/// Bits of [`CONTROL`].
pub mod control {
    /// Set to start using the rings (after programming their addresses and
    /// geometry); clear to stop.
    pub const ENABLE: u32 = 1 << 0;
    /// Write 1 to reset the device: rings forgotten, state cleared. Reads
    /// as 0.
    pub const RESET: u32 = 1 << 1;
}

/// Values of [`ERROR`].
pub mod error {
    pub const NONE: u32 = 0;
    /// `RING_GEOMETRY` is out of limits.
    pub const BAD_GEOMETRY: u32 = 1;
    /// A ring is not inside guest memory mapped for the device's DMA.
    pub const RING_NOT_MAPPED: u32 = 2;
    /// A ring's indices broke the ring rules.
    pub const RING_CORRUPT: u32 = 3;
    /// The two rings overlap.
    pub const RINGS_OVERLAP: u32 = 4;
    /// A ring address is not 64-byte aligned.
    pub const RING_MISALIGNED: u32 = 5;
}

/// MSI-X vector: new messages in H2G (or room freed in G2H).
pub const VECTOR_RING: u16 = 0;
/// MSI-X vector: `STATUS` changed (failure, reset done).
pub const VECTOR_STATUS: u16 = 1;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u16 = 2;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 2;
pub const MSIX_TABLE_OFFSET: u32 = 0x000;
pub const MSIX_PBA_OFFSET: u32 = 0x800;
pub const BAR2_SIZE: u64 = 0x1000;
