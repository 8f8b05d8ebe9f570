//! A qcow2 image from the fuzzer (imago underneath, our header parsing and
//! chain glue on top): its refcounts checked and repaired (`qcow2_refs`,
//! what a writable open does first), opened without following its backing
//! file, mapped and read.
#![no_main]

use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use tandem_disk::qcow2::Qcow2Layer;
use tandem_disk::{Layer, Status};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tandem-fuzz-{}-disk.qcow2", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
    else {
        return;
    };
    if f.write_all_at(data, 0).is_err() {
        return;
    }
    let _ = tandem_disk::qcow2_refs::unreferenced(&f);
    let _ = tandem_disk::qcow2_refs::repair(&f);
    drop(f);
    if let Ok(layer) = Qcow2Layer::open(&path, false) {
        let _ = layer.parent();
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
