//! Helpers for the component tests: qemu-img and qemu-io as the oracle
//! (missing tools fail the test loudly), patterns, raw reference images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tandem_disk::{BlockDevice, Chain, ChainOptions};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is required for the disk component tests (apt-get install qemu-utils) but was not found");
}

/// Runs a qemu tool and returns stdout; panics with its output on failure.
pub fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed: {text}");
    text
}

/// Runs a qemu tool and returns (success, output).
pub fn try_run(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

pub fn qemu_io(fmt: &str, file: &Path, cmd: &str) -> String {
    let text = run("qemu-io", &["-f", fmt, "-c", cmd, s(file)]);
    assert!(
        !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmd}: {text}"
    );
    text
}

/// `qemu-img check` must report no errors, leaks or corruptions.
pub fn assert_qemu_check_clean(fmt: &str, file: &Path) {
    let (ok, text) = try_run("qemu-img", &["check", "-f", fmt, s(file)]);
    assert!(ok, "qemu-img check {}: {text}", file.display());
    assert!(
        !text.contains("ERROR") && !text.contains("Leaked"),
        "qemu-img check {}: {text}",
        file.display()
    );
}

/// `qemu-img compare` says the two images have the same content.
pub fn assert_qemu_compare(a: (&str, &Path), b: (&str, &Path)) {
    let (ok, text) = try_run(
        "qemu-img",
        &["compare", "-f", a.0, "-F", b.0, s(a.1), s(b.1)],
    );
    assert!(
        ok && text.contains("Images are identical"),
        "qemu-img compare {} {}: {text}",
        a.1.display(),
        b.1.display()
    );
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// A deterministic pattern: every byte depends on its offset and a seed.
pub fn pattern(len: usize, offset: u64, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            (((offset + i) / 512) as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                ^ ((offset + i) as u8)
        })
        .collect()
}

/// Writes of awkward shapes: sector-sized, spanning blocks and clusters, at the end.
pub fn write_set(size: u64) -> Vec<(u64, usize, u8)> {
    vec![
        (0, 512, 1),
        (4096 + 512, 1024, 2),
        (65536 - 512, 4096, 3),               // crosses a 64 KiB cluster
        ((1 << 20) - 1024, 8192, 4),          // crosses a 1 MiB block
        ((32 << 20) - 4096, 3 * 4096, 5),     // crosses a 32 MiB VHDX block
        (size - 2048, 2048, 6),               // last sectors
        ((2 << 20) + 7 * 512, 300 * 1024, 7), // long, spanning 2 MiB blocks
    ]
}

/// Applies `write_set` through Tandem to `chain` and to a raw mirror file.
pub fn write_both(chain: &Chain, mirror: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mirror)
        .expect("mirror");
    for (off, len, seed) in write_set(chain.size()) {
        let data = pattern(len, off, seed);
        chain.write_at(&data, off).expect("write");
        f.write_all_at(&data, off).expect("mirror write");
    }
    chain.flush().expect("flush");
}

/// Reads the whole disk through Tandem.
pub fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, ChainOptions::default()).expect("open chain");
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).expect("read");
    buf
}

/// A raw file of `size` zero bytes.
pub fn raw_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("size raw");
}
