//! SIGKILL of the sender and of the receiver at random points, at least 50
//! trials each. After every kill, each side reopens and: `tandem disk
//! check` is clean on the primary and on the site's chain, the primary
//! holds every acknowledged write, the site's newest recovery point equals
//! some state the primary had when it sealed a layer, byte for byte, points
//! are never lost, and the base is never sent twice (no full copy). At the
//! end of each round qemu-img checks the site's layers and compares the
//! newest point with the primary's layer of that point.
//!
//! The sender and the receiver run as child processes: this test binary
//! started again with `TANDEM_REPLICA_CHILD` set runs only `child_entry`.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tandem_disk::{ops, Format};
use tandem_replica::{sender, Manifest, ServeConfig, Server, Source, Status, Store};

const TRIALS_PER_ROUND: usize = 13;
const ROUNDS: [Format; 4] = [Format::Qcow2, Format::Raw, Format::Vhdx, Format::Qcow2];

/// The child processes' entry: a no-op in a normal test run.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var("TANDEM_REPLICA_CHILD") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    match role.as_str() {
        "send" => {
            let cfg = sender::SendConfig {
                source: Source::File(env("DISK").into()),
                to: env("TO"),
                interval: Duration::from_secs(3600),
                timeout: Duration::from_secs(2),
                stop_after: None,
                print_progress: false,
            };
            let _ = sender::run(
                &cfg,
                &Mutex::new(Status::default()),
                &AtomicBool::new(false),
            );
        }
        "serve" => {
            let server = Server::bind(&ServeConfig {
                dir: env("DIR").into(),
                listen: "127.0.0.1:0".into(),
                idle_timeout: Duration::from_secs(30),
            })
            .unwrap();
            println!("ready {}", server.local_addr().unwrap());
            let _ = server.run();
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

/// A child process, killed with SIGKILL (and reaped) at the latest when
/// dropped, so a failing test leaves no process behind.
struct Proc(Child);

impl Proc {
    fn sigkill(&mut self) {
        // std's kill is SIGKILL on Unix.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn child(role: &str, envs: &[(&str, &Path)], to: Option<&str>) -> Proc {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("TANDEM_REPLICA_CHILD", role)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    if let Some(to) = to {
        c.env("TO", to);
    }
    Proc(c.spawn().unwrap())
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn seed() -> Rng {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill test seed {s:#x}");
    Rng(s)
}

/// The invariants after a kill; returns the number of points.
fn check_after_kill(
    p: &Primary,
    site: &Path,
    prev_points: usize,
    base_received: &mut Option<u64>,
) -> usize {
    sender::recover(&p.top).unwrap();
    let report = ops::check(&p.top).unwrap();
    assert!(report.is_clean(), "primary: {:?}", report.layers);
    assert_eq!(
        hash(&read_all(&p.top)),
        hash(&p.model),
        "an acknowledged write was lost"
    );
    let m = Manifest::load(site).unwrap();
    assert!(
        m.layers.len() >= prev_points,
        "points lost: {} < {prev_points}",
        m.layers.len()
    );
    if let Some(last) = m.layers.last() {
        let top = site.join(&last.file);
        let report = ops::check(&top).unwrap();
        assert!(report.is_clean(), "site: {:?}", report.layers);
        assert!(
            p.states.contains(&hash(&read_all(&top))),
            "point {} equals no state of the primary",
            last.seq
        );
        let base = m.layers[0].received_at_ms;
        assert_eq!(
            *base_received.get_or_insert(base),
            base,
            "the base was sent again"
        );
    }
    m.layers.len()
}

/// End of a round: qemu-img checks the site's qcow2 layers and compares the
/// newest point with the primary's layer of that point.
fn oracle(p: &Primary, site: &Path) {
    let m = Manifest::load(site).unwrap();
    let sealed = p.sealed();
    let last = m.layers.last().expect("the round made points");
    let ours = site.join(&last.file);
    let theirs = &sealed[last.seq as usize - 1];
    if last.format == "vhdx" {
        let dir = site.parent().unwrap();
        let (a, b) = (dir.join("oracle-a.raw"), dir.join("oracle-b.raw"));
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        ops::convert(&ours, &a, Format::Raw, &|_, _| {}).unwrap();
        ops::convert(theirs, &b, Format::Raw, &|_, _| {}).unwrap();
        assert_qemu_identical(&a, &b);
    } else {
        for l in &m.layers {
            if l.format == "qcow2" {
                assert_qemu_check_clean(&site.join(&l.file));
            }
        }
        assert_qemu_identical(theirs, &ours);
    }
}

fn round_dirs(root: &Path, round: usize) -> (PathBuf, PathBuf) {
    let r = root.join(format!("round{round}"));
    let site = r.join("site");
    std::fs::create_dir_all(&site).unwrap();
    (r, site)
}

#[test]
fn sigkill_the_sender_at_random_points() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = seed();
    let started = Instant::now();
    let mut trials = 0;
    let mut kills_mid_layer = 0;
    for (round, base) in ROUNDS.into_iter().enumerate() {
        let (dir, site_dir) = round_dirs(root.path(), round);
        let site = Site::start(&site_dir);
        let mut p = Primary::create(&dir, base);
        let mut base_received = None;
        // The initial sync, timed: kills land within 1.5 times a run's length.
        p.write_batch(10);
        let t = Instant::now();
        replicate(&p.top, &site.addr, 1).unwrap();
        let window = t.elapsed().as_millis() as u64 * 3 / 2 + 50;
        let mut points = check_after_kill(&p, &site.dir, 0, &mut base_received);
        for _ in 0..TRIALS_PER_ROUND {
            p.write_batch(1 + rng.below(10) as usize);
            let mut c = child("send", &[("DISK", &p.top)], Some(&site.addr));
            std::thread::sleep(Duration::from_millis(rng.below(window)));
            c.sigkill();
            trials += 1;
            // Let the site notice the closed connection.
            std::thread::sleep(Duration::from_millis(20));
            let now = check_after_kill(&p, &site.dir, points, &mut base_received);
            if now == points {
                kills_mid_layer += 1;
            }
            points = now;
        }
        // A last, undisturbed run brings the site up to date.
        p.write_batch(3);
        let st = replicate(&p.top, &site.addr, p.sealed().len() as u64 + 1).unwrap();
        assert!(st.points as usize > points);
        check_after_kill(&p, &site.dir, points, &mut base_received);
        oracle(&p, &site.dir);
    }
    eprintln!(
        "sender killed {trials} times ({kills_mid_layer} before a new point), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(trials >= 50);
}

fn start_receiver(site: &Path) -> (Proc, String) {
    let mut c = child("serve", &[("DIR", site)], None);
    // The test harness prints its own lines first.
    let mut out = BufReader::new(c.0.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the receiver exited");
        // ("test child_entry ... " may precede it on the same line.)
        if let Some(at) = line.find("ready ") {
            return (c, line[at + 6..].trim().to_string());
        }
    }
}

#[test]
fn sigkill_the_receiver_at_random_points() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = seed();
    let started = Instant::now();
    let mut trials = 0;
    let mut kills_mid_layer = 0;
    for (round, base) in ROUNDS.into_iter().enumerate() {
        let (dir, site_dir) = round_dirs(root.path(), round);
        let mut p = Primary::create(&dir, base);
        let mut base_received = None;
        let (mut c, addr) = start_receiver(&site_dir);
        p.write_batch(10);
        let t = Instant::now();
        replicate(&p.top, &addr, 1).unwrap();
        let window = t.elapsed().as_millis() as u64 * 3 / 2;
        c.sigkill();
        let mut points = check_after_kill(&p, &site_dir, 0, &mut base_received);
        for _ in 0..TRIALS_PER_ROUND {
            p.write_batch(1 + rng.below(10) as usize);
            let (mut c, addr) = start_receiver(&site_dir);
            let stop = Arc::new(AtomicBool::new(false));
            let mut cfg = send_cfg(&p.top, &addr, points as u64 + 2);
            cfg.timeout = Duration::from_secs(2);
            let s2 = stop.clone();
            let h =
                std::thread::spawn(move || sender::run(&cfg, &Mutex::new(Status::default()), &s2));
            std::thread::sleep(Duration::from_millis(rng.below(window)));
            c.sigkill();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            // A sender cut off by the kill retries, never gives up for good.
            if let Err(e) = h.join().unwrap() {
                assert!(!e.is_permanent(), "{e}");
            }
            trials += 1;
            // The receiver reopens.
            drop(Store::open(&site_dir).unwrap());
            let now = check_after_kill(&p, &site_dir, points, &mut base_received);
            if now == points {
                kills_mid_layer += 1;
            }
            points = now;
        }
        let (mut c, addr) = start_receiver(&site_dir);
        p.write_batch(3);
        replicate(&p.top, &addr, p.sealed().len() as u64 + 1).unwrap();
        c.sigkill();
        check_after_kill(&p, &site_dir, points, &mut base_received);
        oracle(&p, &site_dir);
    }
    eprintln!(
        "receiver killed {trials} times ({kills_mid_layer} before a new point), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(trials >= 50);
}
