//! Helpers for the replication tests: a site on loopback, a primary chain
//! with known writes, content hashes, and qemu-img as the oracle (a missing
//! qemu-img fails the test loudly).
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_disk::{ops, BlockDevice, Chain, ChainOptions, Format};
use tandem_replica::{sender, ServeConfig, Server, Source, Status};

pub const SIZE: u64 = 4 << 20;

pub fn qemu_img(args: &[&str]) -> (bool, String) {
    let bin = ["/usr/bin/qemu-img", "/usr/local/bin/qemu-img"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("qemu-img is required for the replica tests (apt-get install qemu-utils)")
        });
    let out = Command::new(bin).args(args).output().expect("run qemu-img");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn assert_qemu_check_clean(path: &Path) {
    let (ok, text) = qemu_img(&["check", s(path)]);
    assert!(
        ok && !text.contains("ERROR") && !text.contains("Leaked"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

/// For layers a killed process was writing: no corruption, but leaked
/// clusters are allowed. imago makes a new cluster's refcount durable
/// before the table entry that uses it, so a process killed in between
/// leaves the cluster counted and unused (harmless, as with QEMU;
/// `qemu-img check -r leaks` reclaims it). qemu-img exits 3 for leaks only.
pub fn assert_qemu_check_no_corruption(path: &Path) {
    let (ok, text) = qemu_img(&["check", s(path)]);
    let leaks_only = text.contains("leaked clusters were found") && !text.contains("ERROR");
    assert!(
        (ok || leaks_only) && !text.contains("ERROR"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

pub fn assert_qemu_identical(a: &Path, b: &Path) {
    let (ok, text) = qemu_img(&["compare", s(a), s(b)]);
    assert!(
        ok && text.contains("Images are identical"),
        "qemu-img compare {} {}: {text}",
        a.display(),
        b.display()
    );
}

/// The whole disk read through tandem-disk.
pub fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, ChainOptions::default()).expect("open chain");
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).expect("read chain");
    buf
}

/// A content hash for comparing disk states (FNV-1a over 64-bit words:
/// cheap in a debug build, and the disks differ by whole sectors).
pub fn hash(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in b.chunks(8) {
        let mut x = [0u8; 8];
        x[..w.len()].copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A primary disk with a model of its content.
pub struct Primary {
    pub top: PathBuf,
    pub model: Vec<u8>,
    /// Hashes of every content a checkpoint may have captured.
    pub states: HashSet<u64>,
    rng: u64,
}

impl Primary {
    pub fn create(dir: &Path, base: Format) -> Primary {
        let top = dir.join(format!("disk.{}", base.extension()));
        ops::create(&top, base, Some(SIZE), None).expect("create primary");
        let model = vec![0u8; SIZE as usize];
        let mut states = HashSet::new();
        states.insert(hash(&model));
        Primary {
            top,
            model,
            states,
            rng: 0x9e37_79b9_7f4a_7c15 ^ base as u64,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Writes a few random extents (acknowledged: flushed) and records the state.
    pub fn write_batch(&mut self, extents: usize) {
        let chain = Chain::open(
            &self.top,
            ChainOptions {
                writable: true,
                ..ChainOptions::default()
            },
        )
        .expect("open primary writable");
        for _ in 0..extents {
            let len = ((self.next() % 16) + 1) * 4096;
            let off = (self.next() % ((SIZE - len) / 4096)) * 4096;
            let seed = self.next() as u8 | 1;
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(seed) ^ (off >> 12) as u8)
                .collect();
            chain.write_at(&data, off).expect("write primary");
            self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        chain.flush().expect("flush primary");
        self.states.insert(hash(&self.model));
    }

    /// The sealed layer whose chain reads as point `seq` (after merges).
    pub fn layer_of_point(&self, seq: u64) -> PathBuf {
        sender::layer_of_point(&Source::File(self.top.clone()), seq)
            .expect("layer of point")
            .unwrap_or_else(|| panic!("point {seq} was merged away on the primary"))
    }

    /// Sealed layers, bottom first.
    pub fn sealed(&self) -> Vec<PathBuf> {
        Source::File(self.top.clone())
            .sealed_layers()
            .expect("sealed layers")
            .0
    }
}

/// A site serving on loopback from a background thread.
pub struct Site {
    pub dir: PathBuf,
    pub addr: String,
    stop: Arc<AtomicBool>,
}

impl Site {
    pub fn start(dir: &Path) -> Site {
        Site::start_keeping(dir, None)
    }

    /// A site with a retention policy: keep the last `keep` points.
    pub fn start_keeping(dir: &Path, keep: Option<usize>) -> Site {
        let server = Server::bind(&ServeConfig {
            dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            idle_timeout: Duration::from_secs(30),
            keep,
        })
        .expect("bind site");
        let addr = server.local_addr().expect("addr").to_string();
        let stop = server.stopper();
        std::thread::spawn(move || server.run());
        Site {
            dir: dir.to_path_buf(),
            addr,
            stop,
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}

pub fn send_cfg(top: &Path, to: &str, stop_after: u64) -> sender::SendConfig {
    sender::SendConfig {
        source: Source::File(top.to_path_buf()),
        to: to.to_string(),
        interval: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
        stop_after: Some(stop_after),
        print_progress: false,
        merge_at: 0,
    }
}

/// Runs a sender until the site holds `points` points.
pub fn replicate(top: &Path, to: &str, points: u64) -> Result<Status, sender::SendError> {
    let status = Mutex::new(Status::default());
    let stop = AtomicBool::new(false);
    sender::run(&send_cfg(top, to, points), &status, &stop)?;
    Ok(status.into_inner().expect("status"))
}
