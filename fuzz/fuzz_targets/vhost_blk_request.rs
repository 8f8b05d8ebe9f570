//! virtio-blk requests from a hostile guest: the input is guest memory
//! holding a split queue (descriptor table, available ring, buffers,
//! indirect tables). Every chain is collected, parsed and run against a
//! small in-memory disk: nothing panics, no write reaches past the disk or
//! is unaligned, and a request either runs or is answered as malformed.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use tandem_disk::{BlockDevice, DiskError};
use tandem_vhost_blk::request::{self, DiskParams};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;
const DISK: usize = 64 * 1024;

struct MemDisk(Mutex<Vec<u8>>);

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        DISK as u64
    }
    fn writable(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_disk::Result<()> {
        let d = self.0.lock().unwrap();
        let o = offset as usize;
        assert!(o + buf.len() <= DISK, "read past the end reached the disk");
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_disk::Result<()> {
        let mut d = self.0.lock().unwrap();
        let o = offset as usize;
        assert!(o + buf.len() <= DISK, "write past the end reached the disk");
        assert!(o % 512 == 0 && buf.len() % 512 == 0, "unaligned write");
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> tandem_disk::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> tandem_disk::Result<()> {
        if offset + len > DISK as u64 {
            return Err(DiskError::OutOfBounds {
                offset,
                len,
                size: DISK as u64,
            });
        }
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    // Compact layout so that short inputs reach the parser: descriptor
    // table at 0 (16 entries), available ring at 0x100, used ring at 0x200,
    // buffers and indirect tables anywhere.
    let _ = mem.write_slice(&data[3..data.len().min(MEM + 3)], GuestAddress(0));
    let size = 1u16 << (data[0] % 5); // 1..=16
    let avail = u16::from(data[2]) % (size + 1);
    let _ = mem.write_obj(avail.to_le(), GuestAddress(0x102));
    let Ok(mut q) = Queue::new(256) else { return };
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let params = DiskParams {
        sectors: DISK as u64 / 512,
        readonly: data[1] & 1 != 0,
        serial: b"fuzz".to_vec(),
        discard: data[1] & 2 != 0,
    };
    let disk = MemDisk(Mutex::new(vec![0u8; DISK]));
    let Ok(iter) = q.iter(&mem) else { return };
    for chain in iter.take(64) {
        match request::collect(chain).and_then(|d| request::parse(&d, &mem)) {
            Ok(req) => {
                assert!(req.data.len() <= request::MAX_DESCRIPTORS);
                let (out, _) = request::execute(&req, &mem, &disk, &params);
                assert!(out.status <= 2);
                if out.status != 0 {
                    assert!(out.used_len <= 1);
                }
            }
            Err(m) => {
                assert!(request::reject(&m, &mem) <= 1);
            }
        }
    }
});
