//! Finding the capabilities in a config space image: the standard list
//! from the pointer at 0x34, the extended list from 0x100. The image comes
//! from a device model, but a broken one must give an error, not a hang:
//! pointers are range-checked and loops refused.

use crate::desc::CapKind;

/// Conventional config space (standard capabilities only).
pub const CONVENTIONAL_SIZE: usize = 256;
/// PCI Express config space (extended capabilities from 0x100).
pub const EXPRESS_SIZE: usize = 4096;

const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u8 = 1 << 4;
const CAP_PTR: usize = 0x34;
const EXT_START: usize = 0x100;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("config space image is {0} bytes; expected 256 or 4096")]
    ImageSize(usize),
    #[error("{kind} capability list: pointer {pointer:#x} at {from:#x} is out of range")]
    BadPointer {
        kind: CapKind,
        from: usize,
        pointer: usize,
    },
    #[error("{kind} capability list loops back to {at:#x}")]
    Loop { kind: CapKind, at: usize },
}

/// A capability found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub kind: CapKind,
    pub id: u16,
    pub offset: u16,
}

/// Walks both capability lists. Standard capabilities are followed only
/// when the status register says there is a list.
pub fn walk(image: &[u8]) -> Result<Vec<Found>, LayoutError> {
    if image.len() != CONVENTIONAL_SIZE && image.len() != EXPRESS_SIZE {
        return Err(LayoutError::ImageSize(image.len()));
    }
    let mut found = Vec::new();
    let mut seen = vec![false; image.len()];
    if image[STATUS] & STATUS_CAP_LIST != 0 {
        let mut from = CAP_PTR;
        let mut at = usize::from(image[CAP_PTR] & 0xfc);
        while at != 0 {
            let kind = CapKind::Standard;
            if !(0x40..=0xfc).contains(&at) {
                return Err(LayoutError::BadPointer {
                    kind,
                    from,
                    pointer: at,
                });
            }
            if std::mem::replace(&mut seen[at], true) {
                return Err(LayoutError::Loop { kind, at });
            }
            found.push(Found {
                kind,
                id: u16::from(image[at]),
                offset: at as u16,
            });
            from = at + 1;
            at = usize::from(image[at + 1] & 0xfc);
        }
    }
    if image.len() == EXPRESS_SIZE {
        let mut at = EXT_START;
        let mut from = EXT_START;
        loop {
            let kind = CapKind::Extended;
            if !(EXT_START..=EXPRESS_SIZE - 4).contains(&at) {
                return Err(LayoutError::BadPointer {
                    kind,
                    from,
                    pointer: at,
                });
            }
            let header =
                u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]]);
            // An absent list reads as 0 (or all-ones from some hardware).
            if at == EXT_START && (header == 0 || header == u32::MAX) {
                break;
            }
            if std::mem::replace(&mut seen[at], true) {
                return Err(LayoutError::Loop { kind, at });
            }
            found.push(Found {
                kind,
                id: (header & 0xffff) as u16,
                offset: at as u16,
            });
            let next = ((header >> 20) & 0xffc) as usize;
            if next == 0 {
                break;
            }
            from = at;
            at = next;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_looping_lists() {
        let mut img = vec![0u8; EXPRESS_SIZE];
        assert_eq!(walk(&img), Ok(vec![]));
        img[STATUS] = STATUS_CAP_LIST;
        img[CAP_PTR] = 0x40;
        img[0x40] = 0x01;
        img[0x41] = 0x40;
        assert_eq!(
            walk(&img),
            Err(LayoutError::Loop {
                kind: CapKind::Standard,
                at: 0x40
            })
        );
        img[0x41] = 0x20;
        assert!(matches!(
            walk(&img),
            Err(LayoutError::BadPointer { pointer: 0x20, .. })
        ));
        img[0x41] = 0;
        img[0x100..0x104].copy_from_slice(&(0x0010u32 | (1 << 16) | (0x100 << 20)).to_le_bytes());
        assert!(matches!(
            walk(&img),
            Err(LayoutError::Loop { at: 0x100, .. })
        ));
        img[0x100..0x104].copy_from_slice(&(0x0010u32 | (1 << 16) | (0x20 << 20)).to_le_bytes());
        assert!(matches!(
            walk(&img),
            Err(LayoutError::BadPointer { pointer: 0x20, .. })
        ));
        img[0x100..0x104].copy_from_slice(&(0x0010u32 | (1 << 16)).to_le_bytes());
        assert_eq!(
            walk(&img),
            Ok(vec![
                Found {
                    kind: CapKind::Standard,
                    id: 1,
                    offset: 0x40
                },
                Found {
                    kind: CapKind::Extended,
                    id: 0x10,
                    offset: 0x100
                }
            ])
        );
        assert_eq!(walk(&img[..100]), Err(LayoutError::ImageSize(100)));
    }
}
