//! Checkpoints while a writer keeps writing, on real chains (raw, qcow2,
//! VHDX): every sealed layer holds exactly the writes completed before its
//! checkpoint began (and none submitted after it ended), and the live chain
//! holds them all.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_disk::{ops, BlockDevice, Chain, ChainOptions, Format};
use tandem_vhost_blk::BlkDevice;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 64;
const DISK: u64 = 4 << 20;
const CHECKPOINTS: usize = 5;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

/// One completed write: its number, block, and the checkpoint count seen
/// before submitting and after completion.
#[derive(Clone, Copy, Debug)]
struct Done {
    n: u32,
    block: u64,
    before: u64,
    after: u64,
}

fn pattern(n: u32) -> Vec<u8> {
    n.to_le_bytes().repeat(BLOCK / 4)
}

fn submit(dev: &BlkDevice, mem: &GuestMemoryMmap, t: u32, sector: u64, data: Option<&[u8]>) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0))];
    if let Some(d) = data {
        mem.write_slice(d, GuestAddress(DATA)).unwrap();
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            DATA,
            d.len() as u32,
            0,
            0,
        )));
    }
    descs.push(RawDescriptor::from(SplitDescriptor::new(
        STATUS,
        1,
        VRING_DESC_F_WRITE as u16,
        0,
    )));
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(&descs).unwrap();
    assert_eq!(dev.run_request(chain), 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0,
        "request failed"
    );
}

fn block_of(chain: &Chain, b: u64) -> u32 {
    let mut buf = vec![0u8; BLOCK];
    chain.read_at(&mut buf, b * BLOCK as u64).unwrap();
    let n = u32::from_le_bytes(buf[..4].try_into().unwrap());
    assert_eq!(
        buf,
        if n == 0 { vec![0; BLOCK] } else { pattern(n) },
        "torn block {b}"
    );
    n
}

/// What block `b` may read in the state sealed by checkpoint `k` (1-based).
fn allowed(done: &[Done], b: u64, k: u64) -> Vec<u32> {
    let mut certain = 0;
    let mut maybe = Vec::new();
    for d in done.iter().filter(|d| d.block == b) {
        if d.after < k {
            certain = d.n;
            maybe.clear();
        } else if d.before < k {
            // Straddles checkpoint k: before or after it, never half.
            maybe.push(d.n);
        }
    }
    let mut v = vec![certain];
    v.extend(maybe);
    v
}

fn run(format: Format, dir: &Path) {
    let top = dir.join(format!("disk.{}", format.extension()));
    ops::create(&top, format, Some(DISK), None).unwrap();
    let chain = Chain::open(
        &top,
        ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = Arc::new(BlkDevice::new(Arc::new(chain), false, "t"));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
            let mut done = Vec::new();
            let mut n = 1u32;
            while !stop.load(Ordering::Relaxed) {
                // A small LCG spreads the writes over the blocks.
                let block = u64::from(n.wrapping_mul(2_654_435_761)) % BLOCKS;
                let before = dev.counters().checkpoints;
                submit(&dev, &mem, VIRTIO_BLK_T_OUT, block * 8, Some(&pattern(n)));
                let after = dev.counters().checkpoints;
                done.push(Done {
                    n,
                    block,
                    before,
                    after,
                });
                if n.is_multiple_of(97) {
                    submit(&dev, &mem, VIRTIO_BLK_T_FLUSH, 0, None);
                }
                n += 1;
            }
            done
        })
    };
    // Between checkpoints, let the writer complete some writes.
    let let_it_write = || {
        let from = dev.counters().writes;
        while dev.counters().writes < from + 20 {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut sealed: Vec<PathBuf> = Vec::new();
    for _ in 0..CHECKPOINTS {
        let_it_write();
        sealed.push(dev.checkpoint().unwrap());
    }
    let_it_write();
    stop.store(true, Ordering::Relaxed);
    let done = writer.join().unwrap();
    assert!(done.len() > 50, "only {} writes", done.len());
    assert_eq!(dev.counters().errors, 0, "{:?}", dev.last_error());
    assert_eq!(dev.layers().len(), CHECKPOINTS + 1);
    // Written during the checkpoints: not all before the first, not all after the last.
    assert!(
        done.iter().any(|d| d.after == 0) && done.iter().any(|d| d.before == CHECKPOINTS as u64)
    );

    let mut states: Vec<Vec<u32>> = Vec::new();
    for (i, s) in sealed.iter().enumerate() {
        let k = i as u64 + 1;
        let c = Chain::open(s, ChainOptions::default()).unwrap();
        assert_eq!(c.layers().len(), i + 1, "{}", s.display());
        let mut state = Vec::new();
        for b in 0..BLOCKS {
            let got = block_of(&c, b);
            state.push(got);
            let ok = allowed(&done, b, k);
            assert!(
                ok.contains(&got),
                "{format}: checkpoint {k} block {b} reads write {got}, expected one of {ok:?}"
            );
        }
        states.push(state);
    }
    // Each checkpoint captured a different moment (20 writes apart at least).
    for w in states.windows(2) {
        assert_ne!(w[0], w[1], "{format}: two checkpoints hold the same data");
    }
    dev.close().unwrap();
    let live = Chain::open(&top, ChainOptions::default()).unwrap();
    for b in 0..BLOCKS {
        let last = done.iter().rev().find(|d| d.block == b).map_or(0, |d| d.n);
        assert_eq!(block_of(&live, b), last, "{format}: live block {b}");
    }
    let report = ops::check(&top).unwrap();
    assert!(report.is_clean(), "{format}: {:?}", report.layers);
}

#[test]
fn checkpoints_under_writes_keep_every_write_in_its_layer() {
    for format in [Format::Qcow2, Format::Vhdx, Format::Raw] {
        let dir = tempfile::tempdir().unwrap();
        run(format, dir.path());
    }
}

#[test]
fn requests_after_close_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("d.qcow2");
    ops::create(&top, Format::Qcow2, Some(DISK), None).unwrap();
    let chain = Chain::open(
        &top,
        ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = BlkDevice::new(Arc::new(chain), false, "t");
    dev.close().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    mem.write_slice(
        &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        GuestAddress(HDR),
    )
    .unwrap();
    let chain = q
        .build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(
                STATUS,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ])
        .unwrap();
    assert_eq!(dev.run_request(chain), 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        1,
        "IOERR"
    );
    assert!(dev.checkpoint().is_err());
    assert!(dev.layers().is_empty());
}

#[test]
fn a_failed_checkpoint_leaves_the_disk_serving() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("d.qcow2");
    ops::create(&top, Format::Qcow2, Some(DISK), None).unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let hook = {
        let fail = fail.clone();
        tandem_disk::FaultHook::new(move |step| {
            step == "checkpoint.linked" && fail.load(Ordering::Relaxed)
        })
    };
    let chain = Chain::open(
        &top,
        ChainOptions {
            writable: true,
            faults: hook,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = BlkDevice::new(Arc::new(chain), false, "t");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    submit(&dev, &mem, VIRTIO_BLK_T_OUT, 0, Some(&pattern(1)));
    let err = dev.checkpoint().unwrap_err();
    assert!(
        format!("{:?}", err).contains("checkpoint.linked"),
        "{err:?}"
    );
    assert!(dev.last_error().is_some());
    // Still serving, on a chain that reads what was written.
    submit(&dev, &mem, VIRTIO_BLK_T_OUT, 8, Some(&pattern(2)));
    fail.store(false, Ordering::Relaxed);
    dev.checkpoint().unwrap();
    submit(&dev, &mem, VIRTIO_BLK_T_OUT, 16, Some(&pattern(3)));
    dev.close().unwrap();
    let c = Chain::open(&top, ChainOptions::default()).unwrap();
    assert_eq!(
        (block_of(&c, 0), block_of(&c, 1), block_of(&c, 2)),
        (1, 2, 3)
    );
    assert_eq!(c.layers().len(), 2);
    assert!(ops::check(&top).unwrap().is_clean());
}
