//! The control device as a hostile guest drives it: arbitrary register and
//! config writes, arbitrary ring memory, doorbells. Nothing may panic, and
//! the device never touches memory outside what was mapped.
#![no_main]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tandem_control_device::ControlDevice;
use tandem_vfio_server::{DmaSpace, PciFunction};

const BASE: u64 = 0x10_0000;
const SIZE: u64 = 0x4_0000;

fuzz_target!(|data: &[u8]| {
    let mut mem = match tempfile() {
        Some(f) => f,
        None => return,
    };
    let _ = mem.write_all(&vec![0u8; SIZE as usize]);
    let dma = Arc::new(DmaSpace::new());
    let Ok(file) = mem.try_clone() else { return };
    if dma.map(BASE, SIZE, file, 0).is_err() {
        return;
    }
    let mut dev = ControlDevice::new(dma, 1, shared_abi::SUPPORTED);
    dev.config_write(0x04, &0x6u16.to_le_bytes());
    let mut rest = data;
    while rest.len() >= 8 {
        let (op, tail) = rest.split_at(8);
        rest = tail;
        let kind = op[0] % 5;
        let off = u16::from_le_bytes([op[1], op[2]]);
        let val = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match kind {
            0 => dev.bar_write(0, u64::from(off & 0xffc), &val.to_le_bytes()),
            1 => {
                let mut b = [0u8; 4];
                dev.bar_read(usize::from(op[7] % 3), u64::from(off), &mut b);
            }
            2 => dev.config_write(
                usize::from(off & 0xfff),
                &val.to_le_bytes()[..usize::from(op[7] % 4) + 1],
            ),
            3 => {
                // Guest memory: write a run of bytes from the input.
                let n = usize::from(op[7]).min(rest.len());
                let at = u64::from(off) * 16 % SIZE;
                let _ = mem.write_all_at(&rest[..n], at);
                rest = &rest[n..];
            }
            _ => {
                // Ring a doorbell or enable with addresses inside the map.
                dev.bar_write(
                    0,
                    0x020,
                    &((BASE as u32) + u32::from(off) * 64).to_le_bytes(),
                );
                dev.bar_write(0, 0x028, &((BASE as u32) + 0x2_0000).to_le_bytes());
                dev.bar_write(0, 0x030, &val.to_le_bytes());
                dev.bar_write(0, 0x018, &1u32.to_le_bytes());
                dev.bar_write(0, 0x034, &0u32.to_le_bytes());
                dev.tick();
            }
        }
    }
    let _ = dev.info();
});

fn tempfile() -> Option<std::fs::File> {
    let path = std::env::temp_dir().join(format!("tandem-fuzz-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .ok()?;
    let _ = std::fs::remove_file(&path);
    Some(f)
}
