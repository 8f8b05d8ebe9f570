//! qcow2 against qemu-img: chains qemu makes read back in Tandem, chains
//! Tandem makes and writes open clean in qemu-img.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use common::*;
use tandem_disk::{ops, BlockDevice, Chain, ChainOptions, FaultHook, Format};

const SIZE: u64 = 96 << 20;

#[test]
fn qemu_made_chain_reads_back_and_takes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "96M"]);
    qemu_io("qcow2", &base, "write -P 0xab 0 64k");
    qemu_io("qcow2", &base, "write -P 0xa1 1M 128k");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&mid),
    ]);
    qemu_io("qcow2", &mid, "write -P 0xcd 32k 4k");
    qemu_io("qcow2", &mid, "write -z 1M 64k");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io("qcow2", &top, "write -P 0xef 90M 512");

    let info = ops::info(&top).unwrap();
    assert_eq!(
        info.iter().map(|l| l.path.clone()).collect::<Vec<_>>(),
        vec![top.clone(), mid.clone(), base.clone()]
    );
    let data = read_all(&top);
    assert!(data[..32768].iter().all(|&b| b == 0xab));
    assert!(data[32768..36864].iter().all(|&b| b == 0xcd));
    assert!(data[36864..65536].iter().all(|&b| b == 0xab));
    assert!(
        data[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0),
        "explicit zeros hide the base"
    );
    assert!(data[(1 << 20) + 65536..(1 << 20) + 131072]
        .iter()
        .all(|&b| b == 0xa1));
    assert!(data[90 << 20..(90 << 20) + 512].iter().all(|&b| b == 0xef));

    // Tandem writes partial clusters on top (copy-on-write from below).
    let flat = dir.path().join("flat.raw");
    qemu_img(&["convert", "-q", "-O", "raw", s(&top), s(&flat)]);
    {
        let chain = Chain::open(
            &top,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        write_both(&chain, &flat);
    }
    assert_qemu_check_clean("qcow2", &top);
    assert_qemu_compare(("qcow2", &top), ("raw", &flat));
    assert_eq!(read_all(&top), std::fs::read(&flat).unwrap());
}

#[test]
fn tandem_made_chain_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("disk.qcow2");
    let mirror = dir.path().join("mirror.raw");
    ops::create(&top, Format::Qcow2, Some(SIZE), None).unwrap();
    raw_file(&mirror, SIZE);
    write_both(
        &Chain::open(
            &top,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap(),
        &mirror,
    );
    let sealed = ops::checkpoint(&top, FaultHook::default()).unwrap();
    {
        let chain = Chain::open(
            &top,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let d = pattern(1536, 70 * 1024 + 512, 77);
        chain.write_at(&d, 70 * 1024 + 512).unwrap();
        chain.flush().unwrap();
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&mirror)
            .unwrap()
            .write_all_at(&d, 70 * 1024 + 512)
            .unwrap();
    }
    let chain_info = qemu_img(&["info", "--backing-chain", s(&top)]);
    assert!(
        chain_info.contains(sealed.file_name().unwrap().to_str().unwrap()),
        "{chain_info}"
    );
    assert_qemu_check_clean("qcow2", &top);
    assert_qemu_check_clean("qcow2", &sealed);
    assert_qemu_compare(("qcow2", &top), ("raw", &mirror));
    // qemu-io reads Tandem's data through the chain.
    let out = qemu_io("qcow2", &top, "read -P 0 8M 64k");
    assert!(out.contains("read 65536/65536"), "{out}");
}

#[test]
fn qcow2_over_a_raw_base_and_a_raw_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let mirror = dir.path().join("mirror.raw");
    ops::create(&base, Format::Raw, Some(SIZE), None).unwrap();
    raw_file(&mirror, SIZE);
    write_both(
        &Chain::open(
            &base,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap(),
        &mirror,
    );
    // Checkpointing a raw top gives a qcow2 child over the raw file.
    ops::checkpoint(&base, FaultHook::default()).unwrap();
    assert_eq!(
        ops::info(&base)
            .unwrap()
            .iter()
            .map(|l| l.format)
            .collect::<Vec<_>>(),
        vec![Format::Qcow2, Format::Raw]
    );
    assert_qemu_check_clean("qcow2", &base);
    assert_qemu_compare(("qcow2", &base), ("raw", &mirror));
}

/// What a writer killed inside imago's allocation of an L2 table leaves
/// (the L1 entry written, the table's refcount not): `tandem disk check`
/// and qemu-img both report it, the next writable open repairs it, and
/// the data stays.
#[test]
fn an_l2_table_left_with_refcount_0_is_found_and_repaired() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    ops::create(&img, Format::Qcow2, Some(SIZE), None).unwrap();
    {
        let c = Chain::open(
            &img,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        c.write_at(&[0x5a; 4096], 8192).unwrap();
        c.flush().unwrap();
    }
    // The L2 table's refcount, as the killed writer left it: 0.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap());
    let (l1, rt) = (be64(&h[40..]), be64(&h[48..]));
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1).unwrap();
    let l2 = be64(&e) & 0x00ff_ffff_ffff_fe00;
    f.read_exact_at(&mut e, rt).unwrap();
    let block = be64(&e) & 0x00ff_ffff_ffff_fe00;
    let at = block + (l2 >> 16) * 2;
    let mut r = [0u8; 2];
    f.read_exact_at(&mut r, at).unwrap();
    assert_eq!(u16::from_be_bytes(r), 1, "the L2 table's refcount");
    f.write_all_at(&[0, 0], at).unwrap();
    drop(f);

    let report = ops::check(&img).unwrap();
    assert!(
        format!("{report:?}").contains("L2 table at") && !report.is_clean(),
        "check did not see it: {report:?}"
    );
    let (ok, out) = try_run("qemu-img", &["check", "-q", s(&img)]);
    assert!(!ok, "qemu-img check found nothing: {out}");

    // The next writer repairs it before anything is allocated.
    {
        let c = Chain::open(
            &img,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        c.write_at(&[0x77; 4096], 50 << 20).unwrap();
        c.flush().unwrap();
    }
    assert!(ops::check(&img).unwrap().is_clean());
    qemu_img(&["check", "-q", s(&img)]);
    let c = Chain::open(&img, ChainOptions::default()).unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, vec![0x5a; 4096]);
    c.read_at(&mut b, 50 << 20).unwrap();
    assert_eq!(b, vec![0x77; 4096]);
}
