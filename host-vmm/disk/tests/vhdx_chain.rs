//! VHDX differencing chains: reads go down, writes go to the top,
//! checkpoint and commit survive a crash at every step.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::path::Path;

use common::*;
use tandem_disk::ops;
use tandem_disk::vhdx::{VhdxCreateOptions, VhdxLayer};
use tandem_disk::{BlockDevice, Chain, ChainOptions, DiskError, FaultHook, Format};

const SIZE: u64 = 160 << 20;

fn writable(p: &Path) -> Chain {
    Chain::open(
        p,
        ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Writes a second pattern set (shifted) so layers differ.
fn write_more(chain: &Chain, mirror: &Path, seed: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mirror)
        .unwrap();
    for (off, len, s) in write_set(chain.size()) {
        let len = len.min(64 * 1024);
        let off = (off + 1024).min(chain.size() - len as u64);
        let data = pattern(len, off, s.wrapping_add(seed));
        chain.write_at(&data, off).unwrap();
        f.write_all_at(&data, off).unwrap();
    }
    // And one range no earlier layer holds (a block the parent has not allocated).
    let off = (120 << 20) + 4096 * u64::from(seed % 7);
    let data = pattern(70 * 1024, off, seed);
    chain.write_at(&data, off).unwrap();
    f.write_all_at(&data, off).unwrap();
    chain.flush().unwrap();
}

fn setup(dir: &Path, format: Format) -> (std::path::PathBuf, std::path::PathBuf) {
    let top = dir.join(format!("disk.{}", format.extension()));
    let mirror = dir.join("mirror.raw");
    ops::create(&top, format, Some(SIZE), None).unwrap();
    raw_file(&mirror, SIZE);
    write_both(&writable(&top), &mirror);
    (top, mirror)
}

#[test]
fn differencing_reads_go_down_and_writes_go_up() {
    let dir = tempfile::tempdir().unwrap();
    let (top, mirror) = setup(dir.path(), Format::Vhdx);
    let sealed = ops::checkpoint(&top, FaultHook::default()).unwrap();
    write_more(&writable(&top), &mirror, 50);
    assert_eq!(read_all(&top), std::fs::read(&mirror).unwrap());
    let info = ops::info(&top).unwrap();
    assert_eq!(info.len(), 2);
    assert_eq!((info[0].sealed, info[1].sealed), (false, true));
    assert_eq!(info[1].path, sealed);
    assert!(info
        .iter()
        .all(|l| l.format == Format::Vhdx && l.virtual_size == SIZE));
    // The sealed base is untouched by the child's writes and still passes qemu-img check.
    assert_qemu_check_clean("vhdx", &sealed);
    // Flattened, the chain matches the mirror in qemu's eyes too.
    let flat = dir.path().join("flat.vhdx");
    ops::convert(&top, &flat, Format::Vhdx, &|_, _| {}).unwrap();
    assert_qemu_check_clean("vhdx", &flat);
    assert_qemu_compare(("vhdx", &flat), ("raw", &mirror));
    assert!(ops::check(&top).unwrap().is_clean());
}

#[test]
fn checkpoint_survives_a_crash_at_every_step() {
    for format in [Format::Vhdx, Format::Qcow2, Format::Raw] {
        for step in [
            "checkpoint.child-created",
            "checkpoint.linked",
            "checkpoint.renamed",
            "none",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (top, mirror) = setup(dir.path(), format);
            let faults = FaultHook::new(move |s| s == step);
            let r = ops::checkpoint(&top, faults);
            assert_eq!(r.is_err(), step != "none", "{format} {step}: {r:?}");
            // Reopen from the files: same content, and it takes writes.
            assert_eq!(
                read_all(&top),
                std::fs::read(&mirror).unwrap(),
                "{format} after crash at {step}"
            );
            write_more(&writable(&top), &mirror, 7);
            assert_eq!(
                read_all(&top),
                std::fs::read(&mirror).unwrap(),
                "{format} writes after crash at {step}"
            );
            // A later checkpoint completes and the content is unchanged.
            ops::checkpoint(&top, FaultHook::default()).unwrap();
            assert_eq!(read_all(&top), std::fs::read(&mirror).unwrap());
            assert!(
                ops::check(&top).unwrap().is_clean(),
                "{format} {step}: {:?}",
                ops::check(&top)
            );
        }
    }
}

#[test]
fn commit_survives_a_crash_at_every_step() {
    // (step, which occurrence): VHDX log steps happen first while recording
    // parent_linkage2 in the top, then while flushing the parent.
    let steps = [
        ("vhdx.before-log", 0),
        ("vhdx.log-written", 0),
        ("vhdx.applied", 0),
        ("commit.linkage2", 0),
        ("vhdx.before-log", 1),
        ("vhdx.log-written", 1),
        ("vhdx.applied", 1),
        ("commit.copying", 0),
        ("commit.copying", 3),
        ("commit.parent-flushed", 0),
        ("commit.renamed", 0),
        ("none", 0),
    ];
    for format in [Format::Vhdx, Format::Qcow2] {
        for (step, nth) in steps {
            let dir = tempfile::tempdir().unwrap();
            let (top, mirror) = setup(dir.path(), format);
            ops::checkpoint(&top, FaultHook::default()).unwrap();
            write_more(&writable(&top), &mirror, 90);
            let hits = std::sync::atomic::AtomicUsize::new(0);
            let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let f2 = fired.clone();
            let faults = FaultHook::new(move |s| {
                let hit =
                    s == step && hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == nth;
                if hit {
                    f2.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                hit
            });
            let r = ops::commit(&top, faults, &|_, _| {});
            let fired = fired.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(r.is_err(), fired, "{format} {step}#{nth}: {r:?}");
            if format == Format::Vhdx && step != "none" {
                assert!(fired, "{format}: step {step}#{nth} never reached");
            }
            assert_eq!(
                read_all(&top),
                std::fs::read(&mirror).unwrap(),
                "{format} after crash at {step}#{nth}"
            );
            // Finish (or redo) the commit; the chain is then one layer with the same content.
            if ops::info(&top).unwrap().len() > 1 {
                ops::commit(&top, FaultHook::default(), &|_, _| {}).unwrap();
            }
            assert_eq!(ops::info(&top).unwrap().len(), 1, "{format} {step}#{nth}");
            assert_eq!(
                read_all(&top),
                std::fs::read(&mirror).unwrap(),
                "{format} committed after {step}#{nth}"
            );
            assert_qemu_check_clean(format.name(), &top);
            assert_qemu_compare((format.name(), &top), ("raw", &mirror));
        }
    }
}

#[test]
fn commit_makes_other_children_of_the_parent_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _mirror) = setup(dir.path(), Format::Vhdx);
    let sealed = ops::checkpoint(&top, FaultHook::default()).unwrap();
    let sibling = dir.path().join("sibling.vhdx");
    ops::create(&sibling, Format::Vhdx, None, Some(&sealed)).unwrap();
    assert_eq!(ops::info(&sibling).unwrap().len(), 2);
    write_more(&writable(&top), &dir.path().join("mirror.raw"), 5);
    ops::commit(&top, FaultHook::default(), &|_, _| {}).unwrap();
    // The sibling's parent is gone under its name; put the merged file back
    // there: its content changed, so its identity did too.
    std::fs::hard_link(&top, &sealed).unwrap();
    match Chain::open(&sibling, ChainOptions::default()) {
        Err(DiskError::ParentIdentity { .. }) => {}
        other => panic!("expected ParentIdentity, got {:?}", other.err()),
    }
}

#[test]
fn parent_with_wrong_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    ops::create(&base, Format::Vhdx, Some(SIZE), None).unwrap();
    ops::create(&child, Format::Vhdx, None, Some(&base)).unwrap();
    assert_eq!(read_all(&child).len() as u64, SIZE);
    // Writing to the parent gives it a new DataWriteGuid: the child no longer matches.
    writable(&base).write_at(&[1; 512], 0).unwrap();
    match Chain::open(&child, ChainOptions::default()) {
        Err(DiskError::ParentIdentity { .. }) => {}
        other => panic!("expected ParentIdentity, got {:?}", other.err()),
    }
}

#[test]
fn looping_vhdx_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.vhdx");
    let y = dir.path().join("y.vhdx");
    let x2 = dir.path().join("x2.vhdx");
    ops::create(&x, Format::Vhdx, Some(SIZE), None).unwrap();
    ops::create(&y, Format::Vhdx, None, Some(&x)).unwrap();
    ops::create(&x2, Format::Vhdx, None, Some(&y)).unwrap();
    std::fs::rename(&x2, &x).unwrap();
    match Chain::open(&x, ChainOptions::default()) {
        Err(DiskError::ChainLoop { .. }) => {}
        other => panic!("expected ChainLoop, got {:?}", other.err()),
    }
}

#[test]
fn concurrent_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vhdx");
    ops::create(&img, Format::Vhdx, Some(SIZE), None).unwrap();
    ops::checkpoint(&img, FaultHook::default()).unwrap();
    let chain = std::sync::Arc::new(writable(&img));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = chain.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    // Interleaved sectors of the same blocks from every thread.
                    let off = (i * 4 + t) * 512 + (i % 3) * (2 << 20);
                    c.write_at(&pattern(512, off, t as u8), off).unwrap();
                    let mut b = vec![0u8; 512];
                    c.read_at(&mut b, off).unwrap();
                    assert_eq!(b, pattern(512, off, t as u8));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    chain.flush().unwrap();
    drop(chain);
    let data = read_all(&img);
    for t in 0..4u64 {
        for i in 0..64u64 {
            let off = (i * 4 + t) * 512 + (i % 3) * (2 << 20);
            assert_eq!(
                &data[off as usize..off as usize + 512],
                pattern(512, off, t as u8).as_slice()
            );
        }
    }
}

#[test]
fn four_k_sector_vhdx_takes_sub_sector_writes_through_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("4k.vhdx");
    let mirror = dir.path().join("mirror.raw");
    VhdxLayer::create(
        &img,
        &VhdxCreateOptions {
            size: SIZE,
            block_size: None,
            logical_sector: Some(4096),
            parent: None,
        },
    )
    .unwrap();
    raw_file(&mirror, SIZE);
    // 512-byte writes land inside 4 KiB sectors: the chain reads, merges, writes whole sectors.
    write_both(&writable(&img), &mirror);
    assert_eq!(read_all(&img), std::fs::read(&mirror).unwrap());
    // (qemu's VHDX driver only supports 512-byte logical sectors: no qemu-img check here.)
    ops::checkpoint(&img, FaultHook::default()).unwrap();
    write_more(&writable(&img), &mirror, 11);
    assert_eq!(read_all(&img), std::fs::read(&mirror).unwrap());
    assert!(ops::check(&img).unwrap().is_clean());
}

#[test]
fn discard_reads_zeros_and_hides_the_parent() {
    for format in [Format::Vhdx, Format::Qcow2] {
        let dir = tempfile::tempdir().unwrap();
        let (top, mirror) = setup(dir.path(), format);
        ops::checkpoint(&top, FaultHook::default()).unwrap();
        {
            let chain = writable(&top);
            // A whole 2 MiB block / many clusters, and a partial range.
            chain.discard(2 << 20, 2 << 20).unwrap();
            chain.discard(4096 + 512, 1024).unwrap();
            chain.flush().unwrap();
        }
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&mirror)
            .unwrap();
        f.write_all_at(&vec![0u8; 2 << 20], 2 << 20).unwrap();
        f.write_all_at(&[0u8; 1024], 4096 + 512).unwrap();
        assert_eq!(read_all(&top), std::fs::read(&mirror).unwrap(), "{format}");
        if format == Format::Qcow2 {
            assert_qemu_check_clean("qcow2", &top);
            assert_qemu_compare(("qcow2", &top), ("raw", &mirror));
        }
    }
}

/// A merge of sealed layers into the layer below them, killed at every
/// step: the live top and the layer above the run read the same throughout
/// (the run's own chains are not points any more), and running the merge
/// again finishes it. qemu-img checks every qcow2 file and the VHDX base.
#[test]
fn merge_down_survives_a_crash_at_every_step() {
    let steps = [
        ("merge.copying", 0),
        ("merge.copying", 40),
        ("vhdx.before-log", 0),
        ("vhdx.applied", 0),
        ("merge.copied", 0),
        // The relink's log entry (VHDX) comes after the target's own.
        ("vhdx.log-written", 1),
        ("merge.relinked", 0),
        ("merge.removed", 0),
        ("merge.removed", 1),
        ("none", 0),
    ];
    for format in [Format::Vhdx, Format::Qcow2, Format::Raw] {
        for (step, nth) in steps {
            // The raw base only changes the copy's target: a few steps do.
            if (format != Format::Vhdx && step.starts_with("vhdx."))
                || (format == Format::Raw && !matches!(step, "merge.relinked" | "none"))
                || (format == Format::Qcow2 && nth > 0)
            {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let (top, mirror) = setup(dir.path(), format);
            // disk.ckpt1 (the base) <- ckpt2 <- ckpt3 <- ckpt4 <- disk.
            let mut sealed = Vec::new();
            for seed in 0..4u8 {
                sealed.push(ops::checkpoint(&top, FaultHook::default()).unwrap());
                write_more(&writable(&top), &mirror, 40 + seed);
            }
            let point4 = read_all(&sealed[3]);
            let point3 = read_all(&sealed[2]);
            let hits = std::sync::atomic::AtomicUsize::new(0);
            let faults = FaultHook::new(move |s| {
                s == step && hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == nth
            });
            let run = [sealed[1].clone(), sealed[2].clone()];
            let r = ops::merge_into(&sealed[0], &run, Some(&sealed[3]), &faults);
            assert_eq!(r.is_err(), step != "none", "{format} {step}#{nth}: {r:?}");
            let expect = std::fs::read(&mirror).unwrap();
            assert_eq!(read_all(&top), expect, "{format} top after {step}#{nth}");
            assert_eq!(read_all(&sealed[3]), point4, "{format} {step}#{nth}");
            assert!(ops::check(&top).unwrap().is_clean());
            ops::merge_into(&sealed[0], &run, Some(&sealed[3]), &FaultHook::default()).unwrap();
            let layers = ops::info(&top).unwrap();
            assert_eq!(layers.len(), 3, "{format} {step}#{nth}");
            assert_eq!(layers[2].path, sealed[0]);
            assert!(!run[0].exists() && !run[1].exists());
            assert_eq!(read_all(&top), expect, "{format} merged after {step}#{nth}");
            assert_eq!(read_all(&sealed[3]), point4);
            assert_eq!(
                read_all(&sealed[0]),
                point3,
                "the target reads as the run's newest"
            );
            for l in &layers {
                if l.format == Format::Qcow2 || (l.format == Format::Vhdx && l.path == sealed[0]) {
                    assert_qemu_check_clean(l.format.name(), &l.path);
                }
            }
            if format != Format::Vhdx {
                assert_qemu_compare(("qcow2", &top), ("raw", &mirror));
            }
            // The next checkpoint takes a new name, not one the merge freed.
            let next = ops::checkpoint(&top, FaultHook::default()).unwrap();
            assert!(
                next.to_string_lossy().contains(".ckpt5."),
                "{}",
                next.display()
            );
        }
    }
}
