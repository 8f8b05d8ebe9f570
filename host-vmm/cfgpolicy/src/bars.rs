//! BAR placement checks: two memory BARs of one function must not overlap,
//! and none may cover the x86 MSI window (a guest that maps a BAR there
//! could make the function's own MMIO decode interrupt messages). The
//! policy's `bar-check` and `decode-check` translations use this; callers
//! can also run [`check`] directly on a header image.

/// The x86 interrupt (MSI) window, `[start, end)`.
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfef0_0000);

const BAR0: usize = 0x10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarError {
    #[error("BAR{a} [{a_base:#x}, +{a_size:#x}) overlaps BAR{b} [{b_base:#x}, +{b_size:#x})")]
    Overlap {
        a: usize,
        a_base: u64,
        a_size: u64,
        b: usize,
        b_base: u64,
        b_size: u64,
    },
    #[error("BAR{index} [{base:#x}, +{size:#x}) covers the MSI window [0xfee00000, 0xfef00000)")]
    MsiWindow { index: usize, base: u64, size: u64 },
    #[error("BAR{index} at {base:#x} of size {size:#x} runs past the end of the address space")]
    Wraps { index: usize, base: u64, size: u64 },
}

/// A memory BAR's decoded range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    /// The BAR's (lower) index.
    pub index: usize,
    pub is64: bool,
    pub base: u64,
    pub size: u64,
}

impl BarRange {
    /// Whether header register `BAR<reg>` is part of this BAR.
    pub fn holds(&self, reg: usize) -> bool {
        reg == self.index || (self.is64 && reg == self.index + 1)
    }
}

fn read32(image: &[u8], off: usize, patch: Option<(usize, u32)>) -> u32 {
    if let Some((at, v)) = patch {
        if at == off {
            return v;
        }
    }
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = image.get(off + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// The assigned memory BARs of a header: `sizes[i]` is BAR `i`'s size
/// (0 for an unimplemented BAR; a 64-bit BAR's size is at its lower
/// index). `patch` replaces one BAR register's value (offset, value), to
/// judge a write before it happens. BARs at address 0 count as unassigned,
/// I/O BARs are not considered.
pub fn decode(image: &[u8], sizes: &[u64; 6], patch: Option<(usize, u32)>) -> Vec<BarRange> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < 6 {
        let low = read32(image, BAR0 + 4 * i, patch);
        let is64 = low & 1 == 0 && (low >> 1) & 3 == 2 && i < 5;
        let step = if is64 { 2 } else { 1 };
        let size = sizes[i];
        if low & 1 == 0 && size != 0 {
            let high = if is64 {
                read32(image, BAR0 + 4 * (i + 1), patch)
            } else {
                0
            };
            let mut base = u64::from(low & !0xf) | (u64::from(high) << 32);
            if size.is_power_of_two() {
                // The BAR's low address bits are hardwired to 0.
                base &= !(size - 1);
            }
            if base != 0 {
                out.push(BarRange {
                    index: i,
                    is64,
                    base,
                    size,
                });
            }
        }
        i += step;
    }
    out
}

/// The BAR's last byte (a BAR may end at the very top of the space).
fn last(r: &BarRange) -> Result<u64, BarError> {
    r.size
        .checked_sub(1)
        .and_then(|s| r.base.checked_add(s))
        .ok_or(BarError::Wraps {
            index: r.index,
            base: r.base,
            size: r.size,
        })
}

fn check_one(r: &BarRange) -> Result<u64, BarError> {
    let last = last(r)?;
    if r.base < MSI_WINDOW.1 && last >= MSI_WINDOW.0 {
        return Err(BarError::MsiWindow {
            index: r.index,
            base: r.base,
            size: r.size,
        });
    }
    Ok(last)
}

/// Checks the ranges: each pair (or, with `only`, each pair involving the
/// BAR holding register `only`) and each range against the MSI window.
pub fn conflicts(ranges: &[BarRange], only: Option<usize>) -> Result<(), BarError> {
    for (ai, a) in ranges.iter().enumerate() {
        let a_mine = only.is_none_or(|o| a.holds(o));
        let a_last = if a_mine {
            check_one(a)?
        } else {
            last(a).unwrap_or(u64::MAX)
        };
        for b in &ranges[ai + 1..] {
            if !a_mine && !only.is_none_or(|o| b.holds(o)) {
                continue;
            }
            let b_last = last(b).unwrap_or(u64::MAX);
            if a.base <= b_last && b.base <= a_last {
                // Name the BAR being judged first.
                let (a, b) = if a_mine { (a, b) } else { (b, a) };
                return Err(BarError::Overlap {
                    a: a.index,
                    a_base: a.base,
                    a_size: a.size,
                    b: b.index,
                    b_base: b.base,
                    b_size: b.size,
                });
            }
        }
    }
    Ok(())
}

/// Checks a header image as it stands: the hook for a caller that wants
/// to validate BARs at a moment of its choosing (e.g. before mapping them).
pub fn check(image: &[u8], sizes: &[u64; 6]) -> Result<(), BarError> {
    conflicts(&decode(image, sizes, None), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bars: &[(usize, u32)]) -> Vec<u8> {
        let mut h = vec![0u8; 0x40];
        for &(i, v) in bars {
            h[BAR0 + 4 * i..BAR0 + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn overlap_window_and_64_bit() {
        let sizes = [0x4000, 0, 0, 0, 0x4000, 0];
        // BAR0/1 64-bit at 0x1_0000_0000, BAR4 32-bit at 0xfe00_0000.
        let h = header(&[(0, 0x4), (1, 0x1), (4, 0xfe00_0000)]);
        let r = decode(&h, &sizes, None);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].base, 0x1_0000_0000);
        assert!(r[0].holds(1));
        assert_eq!(check(&h, &sizes), Ok(()));
        // Move BAR4 onto BAR0/1.
        let r = decode(&h, &sizes, Some((0x20, 0x0000_0000)));
        assert_eq!(r.len(), 1, "BAR4 at 0 is unassigned");
        let h2 = header(&[(0, 0xfe00_2004), (1, 0), (4, 0xfe00_0000)]);
        assert!(matches!(
            check(&h2, &sizes),
            Err(BarError::Overlap { a: 0, b: 4, .. })
        ));
        let h3 = header(&[(4, 0xfee0_0000)]);
        assert!(matches!(
            check(&h3, &sizes),
            Err(BarError::MsiWindow { index: 4, .. })
        ));
        // A 64-bit BAR may end at the very top; a size past it wraps.
        let h4 = header(&[(0, 0xffff_c004), (1, 0xffff_ffff)]);
        assert_eq!(check(&h4, &sizes), Ok(()));
        let r = [BarRange {
            index: 0,
            is64: true,
            base: u64::MAX - 0xfff,
            size: 0x2000,
        }];
        assert!(matches!(
            conflicts(&r, None),
            Err(BarError::Wraps { index: 0, .. })
        ));
        // `only` ignores conflicts between other BARs.
        let r = decode(
            &h2,
            &[0x4000, 0, 0, 0x1000, 0x4000, 0],
            Some((0x1c, 0x1000_0000)),
        );
        assert_eq!(conflicts(&r, Some(3)), Ok(()));
        assert!(conflicts(&r, None).is_err());
    }
}
