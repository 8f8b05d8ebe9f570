//! virtio-scsi requests from a hostile guest: the input is guest memory
//! holding a split queue (descriptor table, available ring, buffers,
//! indirect tables). Every chain is parsed as a command and as a control
//! request and answered: nothing panics, data stays within the tunnel's
//! bound, and answers never claim more bytes than the chain offered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_share::proto::MAX_DATA;
use tandem_vhost_scsi::request::{self, CMD_RESP_LEN};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    // Descriptor table at 0 (16 entries), available ring at 0x100, used
    // ring at 0x200, buffers and indirect tables anywhere.
    let _ = mem.write_slice(&data[3..data.len().min(MEM + 3)], GuestAddress(0));
    let size = 1u16 << (data[0] % 5);
    let avail = u16::from(data[2]) % (size + 1);
    let _ = mem.write_obj(avail.to_le(), GuestAddress(0x102));
    let Ok(mut q) = Queue::new(256) else { return };
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let Ok(iter) = q.iter(&mem) else { return };
    for chain in iter.take(64) {
        let Ok(descs) = request::collect(chain) else {
            continue;
        };
        let offered: u64 = descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum();
        match request::parse_cmd(&descs, &mem) {
            Ok(req) => {
                assert!(req.data_out.len() <= MAX_DATA);
                assert!(req.data_in_len as usize <= MAX_DATA);
                assert!(!req.cdb.is_empty() && req.cdb.len() <= request::CDB_SIZE);
                let _ = request::decode_lun(&req.lun);
                let answer = vec![0x5a; (data[1] as usize) << 4];
                let used = request::complete_cmd(&mem, &req, 2, &[0x70; 18], &answer, 0);
                assert!(u64::from(used) <= offered);
            }
            Err(m) => {
                if let Some(r) = m.response {
                    let used = request::fail(&mem, &r, 9, CMD_RESP_LEN);
                    assert!(u64::from(used) <= offered);
                }
            }
        }
        if let Ok(req) = request::parse_ctrl(&descs, &mem) {
            assert!(u64::from(request::complete_ctrl(&mem, &req, 0)) <= offered);
        }
    }
});
