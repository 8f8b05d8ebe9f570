//! A VHDX image from the fuzzer: opened (headers, region tables, metadata,
//! BAT, log replay) and read. Input byte 0 picks the mode: 0 mod 3, the rest
//! is the start of the file (sparse up to 8 MiB); otherwise the rest is
//! patches (offset, length, bytes) applied to a valid image, and in mode
//! 2 mod 3 the header and region table checksums are recomputed afterwards,
//! so the fuzzer reaches the structures behind them.
#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use tandem_disk::vhdx::{VhdxCreateOptions, VhdxLayer, VhdxOpenOptions};
use tandem_disk::{Layer, Status};

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tandem-fuzz-{}-{name}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = scratch("disk.vhdx");
    let _ = std::fs::remove_file(&path);
    if mode % 3 == 0 {
        let Ok(f) = std::fs::File::create(&path) else {
            return;
        };
        let _ = f.write_all_at(rest, 0);
        let _ = f.set_len((rest.len() as u64).max(8 << 20));
    } else {
        let opts = VhdxCreateOptions {
            size: 16 << 20,
            block_size: Some(1 << 20),
            logical_sector: None,
            parent: None,
        };
        if VhdxLayer::create(&path, &opts).is_err() {
            return;
        }
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return;
        };
        let mut p = rest;
        while p.len() >= 6 {
            // Offsets land in the first 5 MiB: headers, log, metadata, BAT.
            let off = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]])) % (5 << 20);
            let len = usize::from(u16::from_le_bytes([p[4], p[5]])).min(p.len() - 6);
            let _ = f.write_all_at(&p[6..6 + len], off);
            p = &p[6 + len..];
        }
        if mode % 3 == 2 {
            for (off, size) in [
                (64 << 10, 4096),
                (128 << 10, 4096),
                (192 << 10, 65536),
                (256 << 10, 65536),
            ] {
                let mut b = vec![0u8; size];
                if f.read_exact_at(&mut b, off).is_err() {
                    return;
                }
                b[4..8].fill(0);
                let crc = tandem_disk::crc32c(&b);
                let _ = f.write_all_at(&crc.to_le_bytes(), off + 4);
            }
        }
    }
    if let Ok(layer) = VhdxLayer::open(&path, VhdxOpenOptions::default()) {
        let _ = layer.check();
        let size = layer.size();
        let mut off = 0;
        let mut buf = vec![0u8; 4096];
        for _ in 0..256 {
            if off >= size {
                break;
            }
            let Ok((st, n)) = layer.status(off, size - off) else {
                break;
            };
            if st == Status::Data {
                let len = n.min(4096) as usize;
                let _ = layer.read_data(&mut buf[..len], off);
            }
            off += n.max(1);
        }
    }
    let _ = std::fs::remove_file(&path);
});
