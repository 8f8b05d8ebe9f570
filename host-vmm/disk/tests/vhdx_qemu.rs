//! VHDX against qemu-img: images qemu makes open and read back in Tandem,
//! images Tandem writes pass `qemu-img check` and `qemu-img compare`.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use tandem_disk::vhdx::{VhdxCreateOptions, VhdxLayer, VhdxOpenOptions};
use tandem_disk::{BlockDevice, Chain, ChainOptions, Layer};

const SIZE: u64 = 96 << 20;

#[test]
fn qemu_made_vhdx_with_qemu_io_data_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&img), "96M"]);
    qemu_io("vhdx", &img, "write -P 0xab 0 64k");
    qemu_io("vhdx", &img, "write -P 0xcd 40M 1M");
    qemu_io("vhdx", &img, "write -P 0x11 95M 512");
    let data = read_all(&img);
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[65536..40 << 20].iter().all(|&b| b == 0));
    assert!(data[40 << 20..41 << 20].iter().all(|&b| b == 0xcd));
    assert!(data[95 << 20..(95 << 20) + 512].iter().all(|&b| b == 0x11));
    assert!(data[(95 << 20) + 512..].iter().all(|&b| b == 0));
}

#[test]
fn tandem_writes_into_qemu_made_vhdx_pass_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    let mirror = dir.path().join("mirror.raw");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&img), "96M"]);
    qemu_io("vhdx", &img, "write -P 0xab 0 64k");
    raw_file(&mirror, SIZE);
    mirror_write(&mirror, 0, &[0xab; 65536]);
    {
        let chain = Chain::open(
            &img,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        write_both(&chain, &mirror);
    }
    assert_qemu_check_clean("vhdx", &img);
    assert_qemu_compare(("vhdx", &img), ("raw", &mirror));
    assert_eq!(read_all(&img), std::fs::read(&mirror).unwrap());
}

#[test]
fn tandem_made_vhdx_passes_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.vhdx");
    let mirror = dir.path().join("mirror.raw");
    for block in [None, Some(1 << 20)] {
        let _ = std::fs::remove_file(&img);
        VhdxLayer::create(
            &img,
            &VhdxCreateOptions {
                size: SIZE,
                block_size: block,
                logical_sector: None,
                parent: None,
            },
        )
        .unwrap();
        assert_qemu_check_clean("vhdx", &img);
        raw_file(&mirror, SIZE);
        {
            let chain = Chain::open(
                &img,
                ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            write_both(&chain, &mirror);
            // Overwrite part of an allocated block, and discard a whole one.
            let d = pattern(4096, 8192, 9);
            chain.write_at(&d, 8192).unwrap();
            mirror_write(&mirror, 8192, &d);
            chain.flush().unwrap();
        }
        assert_qemu_check_clean("vhdx", &img);
        assert_qemu_compare(("vhdx", &img), ("raw", &mirror));
        let info = qemu_img(&["info", "-f", "vhdx", s(&img)]);
        assert!(info.contains("virtual size: 96 MiB"), "{info}");
    }
}

#[test]
fn qemu_log_entries_replay_in_tandem() {
    // qemu updates the BAT through the log, then clears the log GUID in the
    // header. Put that GUID back and wipe the BAT sector the entry rewrites:
    // only a correct replay of qemu's entry brings the data back.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&img), "96M"]);
    qemu_io("vhdx", &img, "write -P 0x5a 0 64k");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let hdr = VhdxLayer::open(&img, VhdxOpenOptions::default())
        .unwrap()
        .header();
    let mut log = vec![0u8; hdr.log_length as usize];
    f.read_exact_at(&mut log, hdr.log_offset).unwrap();
    let pos = (0..log.len())
        .step_by(4096)
        .find(|&p| &log[p..p + 4] == b"loge")
        .expect("qemu left a log entry");
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&log[pos + 32..pos + 48]);
    // First data descriptor's target sector.
    assert_eq!(&log[pos + 64..pos + 68], b"desc");
    let target = u64::from_le_bytes(log[pos + 64 + 16..pos + 64 + 24].try_into().unwrap());
    f.write_all_at(&[0u8; 4096], target).unwrap();
    let mut h = hdr.clone();
    h.log_guid = tandem_disk::Guid(guid);
    for (i, off) in [64 * 1024u64, 128 * 1024].into_iter().enumerate() {
        h.sequence = hdr.sequence + 1 + i as u64;
        f.write_all_at(&h.encode(), off).unwrap();
    }
    drop(f);
    let data = read_all(&img);
    assert!(
        data[..65536].iter().all(|&b| b == 0x5a),
        "replayed BAT does not map the data"
    );
    assert!(VhdxLayer::open(&img, VhdxOpenOptions::default())
        .unwrap()
        .header()
        .log_guid
        .is_zero());
    assert_qemu_check_clean("vhdx", &img);
}

#[test]
fn vhdx_flush_survives_a_crash_at_every_step() {
    // Acknowledged data (flushed before) always survives; the data of the
    // interrupted flush is either all there or absent, never garbage.
    for step in ["vhdx.before-log", "vhdx.log-written", "vhdx.applied"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("t.vhdx");
        let opts = VhdxCreateOptions {
            size: SIZE,
            block_size: Some(1 << 20),
            logical_sector: None,
            parent: None,
        };
        VhdxLayer::create(&img, &opts).unwrap();
        {
            // Fail the second time the step is reached (the first flush must succeed).
            let hits = std::sync::atomic::AtomicUsize::new(0);
            let faults = tandem_disk::FaultHook::new(move |s| {
                s == step && hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1
            });
            let l = VhdxLayer::open(
                &img,
                VhdxOpenOptions {
                    writable: true,
                    data_write_guid: None,
                    faults,
                },
            )
            .unwrap();
            l.write(&[0x11; 8192], 5 << 20).unwrap();
            l.flush().unwrap();
            l.write(&[0x22; 4096], (5 << 20) + 4096).unwrap();
            l.write(&[0x33; 4096], 9 << 20).unwrap();
            assert!(
                l.flush().is_err(),
                "the injected crash at {step} stops the flush"
            );
        }
        let data = read_all(&img);
        assert!(
            data[5 << 20..(5 << 20) + 4096].iter().all(|&x| x == 0x11),
            "{step}: acknowledged data lost"
        );
        let second = &data[(5 << 20) + 4096..(5 << 20) + 8192];
        assert!(
            second.iter().all(|&x| x == 0x22),
            "{step}: an allocated block's overwrite is in place"
        );
        let new_block = &data[9 << 20..(9 << 20) + 4096];
        let replayed = step != "vhdx.before-log";
        assert!(
            new_block
                .iter()
                .all(|&x| x == if replayed { 0x33 } else { 0 }),
            "{step}: new block"
        );
        assert_qemu_check_clean("vhdx", &img);
    }
}

#[test]
fn tandem_log_replays_after_crash_between_log_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.vhdx");
    VhdxLayer::create(
        &img,
        &VhdxCreateOptions {
            size: SIZE,
            block_size: Some(1 << 20),
            logical_sector: None,
            parent: None,
        },
    )
    .unwrap();
    {
        let faults = tandem_disk::FaultHook::new(|step| step == "vhdx.log-written");
        let l = VhdxLayer::open(
            &img,
            VhdxOpenOptions {
                writable: true,
                data_write_guid: None,
                faults,
            },
        )
        .unwrap();
        l.write(&[0x77; 4096], 3 << 20).unwrap();
        assert!(l.flush().is_err(), "the injected crash stops the flush");
    }
    // The BAT on disk does not map the block yet; the log does.
    let l = VhdxLayer::open(&img, VhdxOpenOptions::default()).unwrap();
    let mut b = vec![0u8; 4096];
    l.read_data(&mut b, 3 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0x77));
    drop(l);
    assert_qemu_check_clean("vhdx", &img);
}

fn mirror_write(mirror: &std::path::Path, off: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(mirror)
        .unwrap()
        .write_all_at(data, off)
        .unwrap();
}

#[test]
fn qemu_vhdx_variants_open_read_and_take_writes() {
    let dir = tempfile::tempdir().unwrap();
    // 5 GiB with 1 MiB blocks spans two chunks, so the BAT interleaves a
    // sector bitmap slot; a 2 MiB log, a fixed disk, and ZERO-state blocks.
    let variants: &[(&str, &str)] = &[
        ("block_size=1M", "5G"),
        ("block_size=1M,log_size=2M", "96M"),
        ("subformat=fixed,block_size=1M", "48M"),
        ("block_state_zero=off", "96M"),
    ];
    for (i, (opts, size)) in variants.iter().enumerate() {
        let img = dir.path().join(format!("v{i}.vhdx"));
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", opts, s(&img), size]);
        let chain = Chain::open(
            &img,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let disk = chain.size();
        let far = disk - (1 << 20) - 4096;
        drop(chain);
        qemu_io("vhdx", &img, &format!("write -P 0x6b {far} 8k"));
        {
            let chain = Chain::open(
                &img,
                ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut b = vec![0u8; 16384];
            chain.read_at(&mut b, far - 4096).unwrap();
            assert!(
                b[..4096].iter().all(|&x| x == 0) && b[4096..12288].iter().all(|&x| x == 0x6b),
                "{opts}"
            );
            assert!(b[12288..].iter().all(|&x| x == 0), "{opts}");
            chain
                .write_at(&pattern(4096, 512 * 1024, 1), 512 * 1024)
                .unwrap();
            chain
                .write_at(&pattern(8192, far + 4096, 2), far + 4096)
                .unwrap();
            chain.flush().unwrap();
        }
        assert_qemu_check_clean("vhdx", &img);
        let out = qemu_io("vhdx", &img, &format!("read -P 0x6b {far} 4k"));
        assert!(out.contains("read 4096/4096"), "{opts}: {out}");
        // qemu reads back what Tandem wrote.
        let dump = dir.path().join("dump.raw");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "vhdx",
            "-O",
            "raw",
            s(&img),
            s(&dump),
        ]);
        let f = std::fs::File::open(&dump).unwrap();
        let mut b = vec![0u8; 8192];
        f.read_exact_at(&mut b, far + 4096).unwrap();
        assert!(
            b == pattern(8192, far + 4096, 2),
            "{opts}: qemu reads other data at {far:#x}"
        );
        f.read_exact_at(&mut b[..4096], 512 * 1024).unwrap();
        assert!(
            b[..4096] == pattern(4096, 512 * 1024, 1),
            "{opts}: qemu reads other data at 512 KiB"
        );
        let _ = std::fs::remove_file(&dump);
    }
}
