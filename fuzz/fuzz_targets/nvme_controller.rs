//! The NVMe controller as a hostile guest drives it: arbitrary register
//! and doorbell writes and arbitrary submission entries (commands with any
//! opcode, queue ids, PRPs and lengths) in guest memory. Nothing may
//! panic, and the controller only reaches memory through the mapping.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tandem_nvme_device::backend::BlockBackend;
use tandem_nvme_device::cmd::Command;
use tandem_nvme_device::ctrl::{Controller, HostPolicy, Params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A small in-memory namespace.
struct MemDisk(std::sync::Mutex<Vec<u8>>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        64 * 1024
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let o = offset as usize;
        let src = d
            .get(o..o + buf.len())
            .ok_or_else(|| std::io::Error::other("range"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut d = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let o = offset as usize;
        let dst = d
            .get_mut(o..o + buf.len())
            .ok_or_else(|| std::io::Error::other("range"))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "mem".into()
    }
}

const MEM: u64 = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let disk: Arc<dyn BlockBackend> = Arc::new(MemDisk(std::sync::Mutex::new(vec![0; 64 * 1024])));
    let mut c = Controller::new(
        Params {
            controller_id: 1,
            serial: "F".into(),
            model: "fuzz".into(),
            firmware: "0".into(),
            max_io_queues: 4,
            msix_vectors: 5,
        },
        vec![disk],
    );
    c.set_bus_master(true);
    // A sane admin queue at 0x1000/0x2000 so commands get executed.
    c.mmio_write(Some(&mem), 0x24, &0x000f_000fu32.to_le_bytes());
    c.mmio_write(Some(&mem), 0x28, &0x1000u64.to_le_bytes());
    c.mmio_write(Some(&mem), 0x30, &0x2000u64.to_le_bytes());
    c.mmio_write(
        Some(&mem),
        0x14,
        &(1u32 | (6 << 16) | (4 << 20)).to_le_bytes(),
    );
    let mut rest = data;
    let mut sq_tail = 0u32;
    while rest.len() >= 12 {
        let (op, tail) = rest.split_at(12);
        rest = tail;
        match op[0] % 4 {
            // A register or doorbell write.
            0 => {
                let off = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ffc);
                c.mmio_write(Some(&mem), off, &op[3..7]);
            }
            // An admin command with fuzzed fields, submitted.
            1 | 2 => {
                let cmd = Command {
                    opcode: op[1],
                    flags: 0,
                    cid: u16::from(op[2]),
                    nsid: u32::from(op[3] % 3),
                    prp1: u64::from(u32::from_le_bytes([op[4], op[5], op[6], 0])) << 4,
                    prp2: u64::from(u16::from_le_bytes([op[7], op[8]])) << 12,
                    cdw10: u32::from_le_bytes([op[9], op[10], op[11], op[1]]),
                    cdw11: u32::from_le_bytes([op[11], op[2], op[9], op[3]]),
                    cdw12: u32::from(op[10]),
                    ..Command::default()
                };
                let _ = mem.write_slice(
                    &cmd.encode(),
                    GuestAddress(0x1000 + u64::from(sq_tail) * 64),
                );
                sq_tail = (sq_tail + 1) % 16;
                c.mmio_write(Some(&mem), 0x1000, &sq_tail.to_le_bytes());
            }
            // A policy change.
            _ => {
                let _ = c.set_policy(
                    HostPolicy {
                        frozen: op[1] & 1 != 0,
                        max_io_queues: (op[2] & 1 != 0).then_some(u16::from(op[3] % 8)),
                        ..HostPolicy::default()
                    },
                    Some(&mem),
                );
            }
        }
        let mut b = [0u8; 4];
        c.mmio_read(u64::from(op[1] & 0x3c), &mut b);
        let _ = c.state();
    }
});
