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
