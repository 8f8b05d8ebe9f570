//! NVMe submission entries and PRP lists from guest memory: parsing never
//! panics, and a PRP walk stays within the transfer and the mapping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_nvme_device::cmd::{Command, Completion, SQE_SIZE};
use tandem_nvme_device::prp;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    if data.len() < SQE_SIZE {
        return;
    }
    let mut raw = [0u8; SQE_SIZE];
    raw.copy_from_slice(&data[..SQE_SIZE]);
    let c = Command::parse(&raw);
    assert_eq!(Command::parse(&c.encode()), c);
    let _ = (c.slba(), c.nlb(), c.fua(), c.psdt(), c.fuse());
    let done = Completion {
        dw0: c.cdw10,
        sq_head: 1,
        sq_id: 2,
        cid: c.cid,
        status: (c.cdw11 & 0x7fff) as u16,
    };
    assert_eq!(Completion::parse(&done.encode(true)).0, done);
    // The rest of the input is guest memory holding PRP lists.
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]) else {
        return;
    };
    let _ = mem.write_slice(
        &data[SQE_SIZE..data.len().min(SQE_SIZE + 0x10000)],
        GuestAddress(0),
    );
    let len = (c.nlb() as usize) * 512;
    if let Ok(segs) = prp::segments(&mem, c.prp1 & 0x1ffff, c.prp2 & 0x1ffff, len, 1 << 17) {
        assert_eq!(segs.iter().map(|s| s.1).sum::<usize>(), len);
    }
});
