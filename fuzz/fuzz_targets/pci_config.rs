//! Config-space accesses of any width at any offset.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_pci::{Bar, BarKind, ConfigSpace, Identity};

fuzz_target!(|data: &[u8]| {
    let mut c = ConfigSpace::new(Identity {
        vendor_id: 0x1af4,
        device_id: 0x10f0,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x10f0,
        class_code: 0x088000,
        revision: 1,
    });
    let _ = c.add_bar(
        0,
        Bar {
            size: 0x1000,
            kind: BarKind::Mem32,
            prefetchable: false,
        },
    );
    let _ = c.add_bar(
        2,
        Bar {
            size: 0x4000,
            kind: BarKind::Mem64,
            prefetchable: true,
        },
    );
    let _ = c.add_pcie_endpoint();
    let _ = c.add_msix(2, 2, 0, 2, 0x800);
    let mut rest = data;
    while rest.len() >= 3 {
        let off = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let n = usize::from(rest[2] % 9).min(rest.len() - 3);
        let bytes = &rest[3..3 + n];
        c.write(off, bytes);
        let mut out = vec![0u8; n];
        c.read(off, &mut out);
        rest = &rest[3 + n..];
    }
    // Identity never changes, whatever was written.
    assert_eq!(c.read32(0), 0x10f0_1af4);
});
