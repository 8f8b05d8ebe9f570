//! Damaged and hostile images: each is refused with a specific error, never a panic.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use tandem_disk::vhdx::header::{
    encode_region_table, RegionEntry, BAT_REGION, MB, METADATA_REGION,
};
use tandem_disk::vhdx::{log, VhdxCreateOptions, VhdxError, VhdxLayer, VhdxOpenOptions};
use tandem_disk::{ops, Chain, ChainOptions, DiskError, Format, Guid};

const SIZE: u64 = 64 << 20;

fn fresh(dir: &Path) -> PathBuf {
    let p = dir.join("d.vhdx");
    VhdxLayer::create(
        &p,
        &VhdxCreateOptions {
            size: SIZE,
            block_size: Some(MB),
            logical_sector: None,
            parent: None,
        },
    )
    .unwrap();
    p
}

fn poke(p: &Path, off: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(data, off)
        .unwrap();
}

fn vhdx_err(p: &Path) -> VhdxError {
    match VhdxLayer::open(p, VhdxOpenOptions::default()) {
        Err(DiskError::Vhdx { source, .. }) => source,
        Err(other) => panic!("expected a VHDX error, got {other}"),
        Ok(_) => panic!("{} opened despite the damage", p.display()),
    }
}

/// Rewrites both headers with `f` applied (valid checksums).
fn edit_header(p: &Path, f: impl Fn(&mut tandem_disk::vhdx::header::Header)) {
    let mut h = VhdxLayer::open(p, VhdxOpenOptions::default())
        .unwrap()
        .header();
    f(&mut h);
    let base = h.sequence;
    for (i, off) in [64 * 1024u64, 128 * 1024].into_iter().enumerate() {
        h.sequence = base + 1 + i as u64;
        poke(p, off, &h.encode());
    }
}

#[test]
fn bad_file_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    poke(&p, 0, b"notvhdx!");
    assert!(matches!(
        vhdx_err(&p),
        VhdxError::BadSignature {
            what: "file identifier"
        }
    ));
    // Probing does not mistake a damaged .vhdx for a raw image.
    let r = Chain::open(&p, ChainOptions::default());
    assert!(
        matches!(
            r,
            Err(DiskError::Vhdx {
                source: VhdxError::BadSignature { .. },
                ..
            })
        ),
        "{:?}",
        r.err()
    );
    // Forcing the format on the chain gives the same answer.
    let r = Chain::open(
        &p,
        ChainOptions {
            format: Some(Format::Vhdx),
            ..Default::default()
        },
    );
    assert!(matches!(
        r,
        Err(DiskError::Vhdx {
            source: VhdxError::BadSignature { .. },
            ..
        })
    ));
}

#[test]
fn bad_qcow2_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    poke(&p, 0, b"QFI\x00");
    let r = Chain::open(
        &p,
        ChainOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    );
    assert!(matches!(r, Err(DiskError::Qcow2 { .. })), "{:?}", r.err());
}

#[test]
fn header_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    // One broken copy: the other is used, and check reports the broken one.
    poke(&p, 64 * 1024 + 200, &[0xff]);
    let report = ops::check(&p).unwrap();
    assert!(
        report.layers[0]
            .1
            .iter()
            .any(|i| i.contains("header copy 1")),
        "{report:?}"
    );
    poke(&p, 128 * 1024 + 200, &[0xff]);
    assert!(matches!(vhdx_err(&p), VhdxError::NoValidHeader { .. }));
}

#[test]
fn region_table_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    poke(&p, 192 * 1024 + 40, &[0xff]);
    poke(&p, 256 * 1024 + 40, &[0xff]);
    assert!(matches!(vhdx_err(&p), VhdxError::NoValidRegionTable { .. }));
}

#[test]
fn overlapping_regions() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    let t = encode_region_table(&[
        RegionEntry {
            guid: BAT_REGION,
            offset: 3 * MB,
            length: MB as u32,
            required: true,
        },
        RegionEntry {
            guid: METADATA_REGION,
            offset: 3 * MB,
            length: MB as u32,
            required: true,
        },
    ]);
    poke(&p, 192 * 1024, &t);
    poke(&p, 256 * 1024, &t);
    assert!(
        matches!(vhdx_err(&p), VhdxError::Overlap { .. }),
        "{}",
        vhdx_err(&p)
    );
}

#[test]
fn overlapping_metadata_items() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    // Metadata table at 2 MiB; entry 1's offset field points it at entry 0's item.
    let mut first = [0u8; 4];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut first, 2 * MB + 32 + 16)
        .unwrap();
    poke(&p, 2 * MB + 32 + 32 + 16, &first);
    assert!(
        matches!(vhdx_err(&p), VhdxError::Overlap { .. }),
        "{}",
        vhdx_err(&p)
    );
}

#[test]
fn bat_entry_past_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    // BAT at 3 MiB: entry 0 fully present at 1 TiB.
    poke(&p, 3 * MB, &((1u64 << 40) | 6).to_le_bytes());
    assert!(
        matches!(vhdx_err(&p), VhdxError::BatPastEof { index: 0, .. }),
        "{}",
        vhdx_err(&p)
    );
}

#[test]
fn bat_entry_overlapping_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    poke(&p, 3 * MB, &((2 * MB) | 6).to_le_bytes());
    assert!(
        matches!(vhdx_err(&p), VhdxError::Overlap { .. }),
        "{}",
        vhdx_err(&p)
    );
}

#[test]
fn bat_entry_with_invalid_state() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    // Partially present is only valid in differencing disks.
    poke(&p, 3 * MB, &((4 * MB) | 7).to_le_bytes());
    assert!(
        matches!(vhdx_err(&p), VhdxError::BadBatState { index: 0, state: 7 }),
        "{}",
        vhdx_err(&p)
    );
}

#[test]
fn log_that_does_not_replay() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    let guid = Guid([0x42; 16]);
    // A valid entry whose tail points where no entry is.
    let sector = vec![0u8; 4096];
    let e = log::encode(9, 8192, guid, 0, 0, &[(3 * MB, &sector)]);
    poke(&p, MB, &e);
    edit_header(&p, |h| h.log_guid = guid);
    assert!(
        matches!(vhdx_err(&p), VhdxError::LogReplay(_)),
        "{}",
        vhdx_err(&p)
    );
    // An entry that would overwrite the headers is refused too.
    let e = log::encode(9, 0, guid, 0, 0, &[(64 * 1024, &sector)]);
    poke(&p, MB, &e);
    assert!(
        matches!(vhdx_err(&p), VhdxError::LogReplay(_)),
        "{}",
        vhdx_err(&p)
    );
}

#[test]
fn truncated_images() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(3 * MB + 4096)
        .unwrap();
    assert!(
        matches!(
            vhdx_err(&p),
            VhdxError::Truncated { .. } | VhdxError::PastEof { .. }
        ),
        "{}",
        vhdx_err(&p)
    );
    let q = dir.path().join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "64M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&q)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(Chain::open(
        &q,
        ChainOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn looping_qcow2_chain() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&a),
        "64M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "64M",
    ]);
    assert!(matches!(
        Chain::open(&a, ChainOptions::default()),
        Err(DiskError::ChainLoop { .. })
    ));
    let c = dir.path().join("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "c.qcow2",
        "-F",
        "qcow2",
        s(&c),
        "64M",
    ]);
    assert!(matches!(
        Chain::open(&c, ChainOptions::default()),
        Err(DiskError::ChainLoop { .. })
    ));
}

#[test]
fn differencing_vhdx_needs_a_vhdx_parent_of_the_same_size() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    let child = dir.path().join("child.vhdx");
    assert!(matches!(
        ops::create(&child, Format::Vhdx, None, Some(&base)),
        Err(DiskError::ParentFormat { .. })
    ));
    let vbase = fresh(dir.path());
    assert!(matches!(
        ops::create(&child, Format::Vhdx, Some(SIZE * 2), Some(&vbase)),
        Err(DiskError::ParentSize { .. })
    ));
}

#[test]
fn log_offset_near_the_end_of_the_address_space() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path());
    edit_header(&p, |h| h.log_offset = !(MB - 1));
    assert!(
        matches!(vhdx_err(&p), VhdxError::PastEof { .. }),
        "{}",
        vhdx_err(&p)
    );
}
