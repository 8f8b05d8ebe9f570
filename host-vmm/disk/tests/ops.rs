//! convert and compare across every format pair.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use common::*;
use tandem_disk::{ops, BlockDevice, Chain, ChainOptions, FaultHook, Format};

const SIZE: u64 = 80 << 20;

#[test]
fn convert_every_format_to_every_format() {
    let formats = [Format::Raw, Format::Qcow2, Format::Vhdx];
    for src_format in formats {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join(format!("src.{}", src_format.extension()));
        let mirror = dir.path().join("mirror.raw");
        ops::create(&src, src_format, Some(SIZE), None).unwrap();
        raw_file(&mirror, SIZE);
        write_both(
            &Chain::open(
                &src,
                ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap(),
            &mirror,
        );
        if src_format != Format::Raw {
            // A two-layer chain, flattened by convert.
            ops::checkpoint(&src, FaultHook::default()).unwrap();
            let c = Chain::open(
                &src,
                ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let d = pattern(8192, 50 << 20, 3);
            c.write_at(&d, 50 << 20).unwrap();
            c.flush().unwrap();
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&mirror)
                .unwrap()
                .write_all_at(&d, 50 << 20)
                .unwrap();
        }
        for dst_format in formats {
            let dst = dir.path().join(format!("dst.{}", dst_format.extension()));
            let _ = std::fs::remove_file(&dst);
            let last = std::cell::Cell::new(0);
            ops::convert(&src, &dst, dst_format, &|done, total| {
                assert!(done <= total && done >= last.get());
                last.set(done);
            })
            .unwrap();
            assert_eq!(last.get(), SIZE);
            assert_eq!(ops::info(&dst).unwrap().len(), 1);
            if dst_format != Format::Raw {
                assert_qemu_check_clean(dst_format.name(), &dst);
            }
            assert_qemu_compare((dst_format.name(), &dst), ("raw", &mirror));
            let cmp = ops::compare(&src, &dst, &|_, _| {}).unwrap();
            assert_eq!(cmp.first_difference, None, "{src_format} -> {dst_format}");
        }
    }
}

#[test]
fn compare_reports_the_first_difference() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    let b = dir.path().join("b.qcow2");
    ops::create(&a, Format::Vhdx, Some(SIZE), None).unwrap();
    ops::create(&b, Format::Qcow2, Some(SIZE), None).unwrap();
    assert_eq!(
        ops::compare(&a, &b, &|_, _| {}).unwrap().first_difference,
        None
    );
    let mut d = vec![0u8; 4096];
    d[1234] = 1;
    Chain::open(
        &b,
        ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
    .write_at(&d, 40 << 20)
    .unwrap();
    let cmp = ops::compare(&a, &b, &|_, _| {}).unwrap();
    assert_eq!(cmp.first_difference, Some((40 << 20) + 1234));
    // A longer disk whose tail is zero compares equal over the common part.
    let c = dir.path().join("c.img");
    ops::create(&c, Format::Raw, Some(SIZE + 4096), None).unwrap();
    let cmp = ops::compare(&a, &c, &|_, _| {}).unwrap();
    assert_eq!((cmp.first_difference, cmp.size_b), (None, SIZE + 4096));
}

#[test]
fn create_with_parent_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    ops::create(&base, Format::Vhdx, Some(SIZE), None).unwrap();
    ops::create(&child, Format::Vhdx, None, Some(&base)).unwrap();
    let info = ops::info(&child).unwrap();
    assert_eq!(info.len(), 2);
    assert_eq!(info[0].virtual_size, SIZE);
    assert!(info[0].allocated_bytes > 0 && !info[0].sealed && info[1].sealed);
    let q = dir.path().join("child.qcow2");
    ops::create(&q, Format::Qcow2, None, Some(&base)).unwrap();
    assert_eq!(
        ops::info(&q)
            .unwrap()
            .iter()
            .map(|l| l.format)
            .collect::<Vec<_>>(),
        vec![Format::Qcow2, Format::Vhdx]
    );
    assert!(ops::create(&dir.path().join("r.img"), Format::Raw, None, Some(&base)).is_err());
}

/// Moves a chain's layers to new names and relinks each child: the chain
/// reads the same, `check` is clean, and qemu-img (for qcow2) follows the
/// new backing names. A VHDX grandchild still accepts its relinked parent.
#[test]
fn relink_moves_a_chain_to_new_names() {
    let dir = tempfile::tempdir().unwrap();
    for (base_fmt, fmt) in [(Format::Raw, Format::Qcow2), (Format::Vhdx, Format::Vhdx)] {
        let top = dir.path().join(format!("disk.{}", base_fmt.extension()));
        ops::create(&top, base_fmt, Some(SIZE), None).unwrap();
        let mirror = dir.path().join("mirror.raw");
        raw_file(&mirror, SIZE);
        let mut sealed = Vec::new();
        for round in 0..3u8 {
            let chain = Chain::open(
                &top,
                ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let off = u64::from(round) * (1 << 20) + 4096;
            let data = pattern(8192, off, round + 10);
            chain.write_at(&data, off).unwrap();
            chain.flush().unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&mirror)
                .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &data, off))
                .unwrap();
            sealed.push(chain.checkpoint().unwrap());
        }
        // Copy the sealed layers (bottom first) under new names in another
        // directory and relink each to the copy of its parent.
        let site = dir.path().join(format!("site-{fmt}"));
        std::fs::create_dir(&site).unwrap();
        let mut prev: Option<String> = None;
        for (i, layer) in sealed.iter().enumerate() {
            let ext = layer.extension().unwrap().to_string_lossy().into_owned();
            let name = format!("L{i}.{ext}");
            std::fs::copy(layer, site.join(&name)).unwrap();
            if let Some(parent) = &prev {
                ops::relink(&site.join(&name), parent).unwrap();
            } else {
                // A base has no parent to rename.
                assert!(ops::relink(&site.join(&name), "x").is_err());
            }
            prev = Some(name);
        }
        let new_top = site.join(prev.unwrap());
        assert!(ops::check(&new_top).unwrap().is_clean());
        assert_eq!(read_all(&new_top), read_all(&sealed[2]));
        assert_eq!(read_all(&new_top), std::fs::read(&mirror).unwrap());
        assert_eq!(ops::info(&new_top).unwrap().len(), 3);
        for l in ops::info(&new_top).unwrap() {
            assert!(
                l.path.starts_with(&site),
                "{} escaped the site",
                l.path.display()
            );
        }
        if fmt == Format::Qcow2 {
            assert_qemu_check_clean("qcow2", &new_top);
            assert_qemu_compare(("qcow2", &new_top), ("raw", &mirror));
            let info = qemu_img(&["info", "--backing-chain", s(&new_top)]);
            assert!(info.contains("backing file: L1.img"), "{info}");
            assert!(!info.contains("disk.ckpt"), "{info}");
        }
    }
}
