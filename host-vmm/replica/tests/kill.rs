//! SIGKILL of the sender and of the receiver at random points, at least 50
//! trials each. After every kill, each side reopens and: `tandem disk
//! check` is clean on the primary and on the site's chain, the primary
//! holds every acknowledged write, the site's newest recovery point equals
//! some state the primary had when it sealed a layer, byte for byte, points
//! are never lost, and the base is never sent twice (no full copy). At the
//! end of each round qemu-img checks the site's layers and compares the
//! newest point with the primary's layer of that point.
//!
//! Both sides merge old layers as they go (the sender once 3 sealed layers
//! are shipped, the site keeping 2 points), so kills also land in merges:
//! an interrupted merge is finished when the side restarts, and the checks
//! above hold throughout (the site's newest point only moves forward).
//!
//! The sender and the receiver run as child processes: this test binary
//! started again with `TANDEM_REPLICA_CHILD` set runs only `child_entry`.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tandem_disk::{ops, Format};
use tandem_replica::{sender, Manifest, ServeConfig, Server, Source, Status, Store};
use tandem_testkit::{reexec, Proc, Rng};

const TRIALS_PER_ROUND: usize = 13;
/// The sender merges once this many sealed layers are shipped.
const MERGE_AT: usize = 3;
/// The site keeps this many points.
const KEEP: usize = 2;
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
                merge_at: MERGE_AT,
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
                keep: Some(KEEP),
            })
            .unwrap();
            println!("ready {}", server.local_addr().unwrap());
            let _ = server.run();
        }
        other => panic!("unknown child role {other}"),
    }
    std::process::exit(0);
}

fn child(role: &str, envs: &[(&str, &Path)], to: Option<&str>) -> Proc {
    let mut c = reexec("child_entry");
    c.env("TANDEM_REPLICA_CHILD", role);
    for (k, v) in envs {
        c.env(k, v);
    }
    if let Some(to) = to {
        c.env("TO", to);
    }
    Proc::spawn(c)
}

fn seed() -> Rng {
    Rng::from_clock("kill test")
}

/// The invariants after a kill; returns the newest point's id.
fn check_after_kill(p: &Primary, site: &Path, prev_last: u64) -> u64 {
    sender::recover(&p.top).unwrap();
    let report = ops::check(&p.top).unwrap();
    assert!(report.is_clean(), "primary: {:?}", report.layers);
    assert_eq!(
        hash(&read_all(&p.top)),
        hash(&p.model),
        "an acknowledged write was lost"
    );
    let m = Manifest::load(site).unwrap();
    let last_seq = m.points().last().map_or(0, |l| l.seq);
    assert!(
        last_seq >= prev_last,
        "points lost: newest {last_seq} < {prev_last}"
    );
    assert!(
        m.points().count() <= KEEP + 1,
        "retention: {} points",
        m.points().count()
    );
    if let Some(last) = m.points().last() {
        let top = site.join(&last.file);
        let report = ops::check(&top).unwrap();
        assert!(report.is_clean(), "site: {:?}", report.layers);
        assert!(
            p.states.contains(&hash(&read_all(&top))),
            "point {} equals no state of the primary",
            last.seq
        );
        // The site's chain still starts from the base it was first sent
        // (merged into, never sent again).
        let bottom = &m.layers[0];
        assert_eq!(
            bottom.merged_from.unwrap_or(bottom.seq),
            1,
            "the base was sent again"
        );
    }
    last_seq
}

/// End of a round: qemu-img checks the site's qcow2 layers and compares the
/// newest point with the primary's layer of that point.
fn oracle(p: &Primary, site: &Path) {
    let m = Manifest::load(site).unwrap();
    // Both sides merged during the round.
    assert!(
        m.layers[0].merged_from.is_some(),
        "the site never merged: {m:?}"
    );
    let id = sender::Identity::load(&p.top).unwrap().unwrap();
    assert!(id.first() > 1, "the primary never merged");
    assert!(id.merging.is_none() && m.merging.is_none());
    let last = m.points().last().expect("the round made points");
    let ours = site.join(&last.file);
    let theirs = p.layer_of_point(last.seq);
    if last.format == "vhdx" {
        let dir = site.parent().unwrap();
        let (a, b) = (dir.join("oracle-a.raw"), dir.join("oracle-b.raw"));
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        ops::convert(&ours, &a, Format::Raw, &|_, _| {}).unwrap();
        ops::convert(&theirs, &b, Format::Raw, &|_, _| {}).unwrap();
        assert_qemu_identical(&a, &b);
    } else {
        // Written by processes this test kills: leaks allowed, no corruption.
        for l in &m.layers {
            if l.format == "qcow2" {
                assert_qemu_check_no_corruption(&site.join(&l.file));
            }
        }
        for l in p.sealed() {
            if l.extension().is_some_and(|e| e == "qcow2") {
                assert_qemu_check_no_corruption(&l);
            }
        }
        assert_qemu_identical(&theirs, &ours);
    }
}

/// Runs a sender (merging as the children do) until the site holds `points`.
fn replicate_merging(top: &Path, to: &str, points: u64) -> Result<Status, sender::SendError> {
    let status = Mutex::new(Status::default());
    let mut cfg = send_cfg(top, to, points);
    cfg.merge_at = MERGE_AT;
    sender::run(&cfg, &status, &AtomicBool::new(false))?;
    Ok(status.into_inner().unwrap())
}

/// Ships points 2 to 5 undisturbed (both sides merge from then on);
/// returns the newest point.
fn warm_up(p: &mut Primary, addr: &str) -> u64 {
    for n in 2..=5 {
        p.write_batch(3);
        assert_eq!(replicate_merging(&p.top, addr, n).unwrap().points, n);
    }
    5
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
        let site = Site::start_keeping(&site_dir, Some(KEEP));
        let mut p = Primary::create(&dir, base);
        // The initial sync, timed: kills land within 1.5 times a run's length.
        p.write_batch(10);
        let t = Instant::now();
        replicate_merging(&p.top, &site.addr, 1).unwrap();
        let window = t.elapsed().as_millis() as u64 * 3 / 2 + 50;
        // A few points more, so that every later point comes with merges
        // on both sides (and kills land in them).
        let mut points = warm_up(&mut p, &site.addr);
        for _ in 0..TRIALS_PER_ROUND {
            p.write_batch(1 + rng.below(10) as usize);
            let mut c = child("send", &[("DISK", &p.top)], Some(&site.addr));
            std::thread::sleep(Duration::from_millis(rng.below(window)));
            c.sigkill();
            trials += 1;
            // Let the site notice the closed connection.
            std::thread::sleep(Duration::from_millis(20));
            let now = check_after_kill(&p, &site.dir, points);
            if now == points {
                kills_mid_layer += 1;
            }
            points = now;
        }
        // A last, undisturbed run brings the site up to date.
        p.write_batch(3);
        let st = replicate_merging(&p.top, &site.addr, points + 1).unwrap();
        assert!(st.points > points);
        check_after_kill(&p, &site.dir, points);
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
    let addr = c.ready();
    (c, addr)
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
        let (mut c, addr) = start_receiver(&site_dir);
        p.write_batch(10);
        let t = Instant::now();
        replicate_merging(&p.top, &addr, 1).unwrap();
        let window = t.elapsed().as_millis() as u64 * 3 / 2;
        let mut points = warm_up(&mut p, &addr);
        c.sigkill();
        check_after_kill(&p, &site_dir, points);
        for _ in 0..TRIALS_PER_ROUND {
            p.write_batch(1 + rng.below(10) as usize);
            let (mut c, addr) = start_receiver(&site_dir);
            let stop = Arc::new(AtomicBool::new(false));
            let mut cfg = send_cfg(&p.top, &addr, points + 2);
            cfg.timeout = Duration::from_secs(2);
            cfg.merge_at = MERGE_AT;
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
            let now = check_after_kill(&p, &site_dir, points);
            if now == points {
                kills_mid_layer += 1;
            }
            points = now;
        }
        let (mut c, addr) = start_receiver(&site_dir);
        p.write_batch(3);
        replicate_merging(&p.top, &addr, points + 1).unwrap();
        c.sigkill();
        drop(Store::open(&site_dir).unwrap());
        check_after_kill(&p, &site_dir, points);
        oracle(&p, &site_dir);
    }
    eprintln!(
        "receiver killed {trials} times ({kills_mid_layer} before a new point), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(trials >= 50);
}
