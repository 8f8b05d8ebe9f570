//! Replication over loopback TCP between a primary chain and a site:
//! round trips for raw, qcow2 and VHDX chains with qemu-img as the oracle,
//! resume after a cut connection, wrong, stale and diverged primaries,
//! corrupted chunks and digests.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use tandem_disk::{ops, Format};
use tandem_replica::proto::{LayerDigest, Message, RefuseCode, WireFormat, CHUNK, VERSION};
use tandem_replica::sender::SendError;
use tandem_replica::{failover, points, wire, Manifest, Output, Status};

/// Ships three points, each after more writes, then fails over to each
/// point and checks it against the primary's sealed layer of that point.
fn round_trip(base: Format) {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(&dir.path().join(""), base);
    let mut contents = Vec::new();
    for n in 1..=3u64 {
        p.write_batch(20);
        let st = replicate(&p.top, &site.addr, n).unwrap();
        assert_eq!(st.points, n);
        contents.push(p.model.clone());
    }
    let sealed = p.sealed();
    assert_eq!(sealed.len(), 3);
    let pts = points(&site.dir).unwrap();
    assert_eq!(pts.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(pts
        .windows(2)
        .all(|w| w[0].sealed_at_ms <= w[1].sealed_at_ms));
    let top = site.dir.join(&pts[2].file);
    assert!(ops::check(&top).unwrap().is_clean());
    // The site's chain names only the site's files.
    for l in ops::info(&top).unwrap() {
        assert!(l.path.starts_with(&site.dir), "{}", l.path.display());
    }
    for (i, rec) in pts.iter().enumerate() {
        let out = dir.path().join(format!("failover{}", rec.seq));
        failover(&site.dir, rec.seq, &out, Output::Chain).unwrap();
        assert_eq!(read_all(&out), contents[i], "point {}", rec.seq);
        assert_eq!(read_all(&out), read_all(&sealed[i]));
        let flat = dir.path().join(format!("flat{}.raw", rec.seq));
        failover(&site.dir, rec.seq, &flat, Output::Flat(Format::Raw)).unwrap();
        if base == Format::Vhdx {
            // qemu-img cannot open VHDX differencing disks: compare flat copies,
            // and check the base with it.
            let pflat = dir.path().join(format!("pflat{}.raw", rec.seq));
            ops::convert(&sealed[i], &pflat, Format::Raw, &|_, _| {}).unwrap();
            assert_qemu_identical(&pflat, &flat);
        } else {
            assert_qemu_identical(&sealed[i], &out);
            assert_qemu_identical(&sealed[i], &flat);
            assert_qemu_check_clean(&out);
        }
    }
    for rec in &pts {
        if rec.format != "raw" && !(rec.format == "vhdx" && rec.seq > 1) {
            assert_qemu_check_clean(&site.dir.join(&rec.file));
        }
    }
    if base != Format::Vhdx {
        let (ok, info) = qemu_img(&["info", "--backing-chain", s(&top)]);
        assert!(ok, "{info}");
        assert!(info.contains("backing file: layer-000002"), "{info}");
        assert!(!info.contains("disk.ckpt"), "{info}");
    }
}

#[test]
fn round_trip_raw_base_with_qcow2_layers() {
    round_trip(Format::Raw);
}

#[test]
fn round_trip_qcow2_chain() {
    round_trip(Format::Qcow2);
}

#[test]
fn round_trip_vhdx_chain() {
    round_trip(Format::Vhdx);
}

/// A proxy that cuts its first connection after `limit` bytes from the
/// primary; later connections pass everything.
fn cutting_proxy(target: String, limit: u64) -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicU64::new(0));
    let c = cuts.clone();
    std::thread::spawn(move || {
        for (i, conn) in l.incoming().enumerate() {
            let Ok(a) = conn else { continue };
            let Ok(b) = TcpStream::connect(&target) else {
                continue;
            };
            let limit = if i == 0 { limit } else { u64::MAX };
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let c = c.clone();
            std::thread::spawn(move || {
                let (mut a, mut b) = (a, b);
                let mut buf = vec![0u8; 65536];
                let mut total = 0u64;
                loop {
                    let n = match a.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    total += n as u64;
                    if total > limit {
                        c.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let (mut b2, mut a2) = (b2, a2);
                let _ = std::io::copy(&mut b2, &mut a2);
                let _ = a2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, cuts)
}

#[test]
fn a_cut_connection_resumes_without_a_full_copy() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(dir.path(), Format::Qcow2);
    // A base with several MiB of data, then a second layer.
    p.write_batch(200);
    replicate(&p.top, &site.addr, 1).unwrap();
    let base_received = points(&site.dir).unwrap()[0].received_at_ms;
    let base_bytes = std::fs::metadata(&p.sealed()[0]).unwrap().len();
    p.write_batch(100);
    // Cut the next session 1 MiB into the second layer.
    let (proxy, cuts) = cutting_proxy(site.addr.clone(), 1 << 20);
    let st = replicate(&p.top, &proxy, 2).unwrap();
    assert_eq!(cuts.load(Ordering::SeqCst), 1, "the connection was cut");
    assert!(st.reconnects >= 1, "{st:?}");
    let pts = points(&site.dir).unwrap();
    assert_eq!(pts.len(), 2);
    assert_eq!(
        pts[0].received_at_ms, base_received,
        "the base was not sent again"
    );
    let layer2 = std::fs::metadata(&p.sealed()[1]).unwrap().len();
    assert!(
        st.bytes_sent < 2 * layer2 + (1 << 20),
        "sent {} for a {layer2}-byte layer (base {base_bytes})",
        st.bytes_sent
    );
    let out = dir.path().join("fo.qcow2");
    failover(&site.dir, 2, &out, Output::Chain).unwrap();
    assert_eq!(read_all(&out), p.model);
    assert_qemu_identical(&p.sealed()[1], &out);
}

/// A layer cut in the middle of its transfer resumes where the site got
/// to: the site keeps what it received and offers its offset, the sender
/// hashes that part without sending it (the digest still covers the whole
/// layer), and the point equals the primary's layer.
#[test]
fn a_layer_cut_mid_transfer_resumes_where_the_site_got_to() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(dir.path(), Format::Raw);
    p.write_batch(300);
    // Cut the initial sync (a 4 MiB raw base) 2.5 MiB in.
    let (proxy, cuts) = cutting_proxy(site.addr.clone(), 5 << 19);
    let st = replicate(&p.top, &proxy, 1).unwrap();
    assert_eq!(cuts.load(Ordering::SeqCst), 1, "the connection was cut");
    assert!(st.reconnects >= 1, "{st:?}");
    assert!(
        st.bytes_resumed >= 2 << 20,
        "the site's first 2 MiB were sent again: {st:?}"
    );
    let pts = points(&site.dir).unwrap();
    assert_eq!(pts.len(), 1);
    let base = &p.sealed()[0];
    assert_eq!(read_all(&site.dir.join(&pts[0].file)), read_all(base));
    assert_qemu_identical(base, &site.dir.join(&pts[0].file));
    let names: Vec<String> = std::fs::read_dir(&site.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with(".partial") && !n.starts_with(".incoming")),
        "{names:?}"
    );
}

#[test]
fn wrong_stale_and_diverged_primaries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(&dir.path().join(""), Format::Raw);
    p.write_batch(5);
    replicate(&p.top, &site.addr, 1).unwrap();
    let id_path = tandem_replica::sender::Identity::path(&p.top);
    let old_identity = std::fs::read(&id_path).unwrap();
    replicate(&p.top, &site.addr, 1).unwrap();
    replicate(&p.top, &site.addr, 1).unwrap();
    assert_eq!(Manifest::load(&site.dir).unwrap().generation, 3);

    // Another disk: wrong primary.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let mut q = Primary::create(&other_dir, Format::Raw);
    q.write_batch(1);
    match replicate(&q.top, &site.addr, 1) {
        Err(SendError::Refused { code, .. }) => assert_eq!(code, RefuseCode::WrongPrimary),
        other => panic!("{other:?}"),
    }
    // The primary restored from an old copy of itself: stale.
    std::fs::write(&id_path, &old_identity).unwrap();
    match replicate(&p.top, &site.addr, 2) {
        Err(SendError::Refused { code, reason }) => {
            assert_eq!(code, RefuseCode::StaleGeneration, "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(points(&site.dir).unwrap().len(), 1);
    // Bring the identity forward; change a shipped layer: diverged.
    let mut id: tandem_replica::sender::Identity = serde_json::from_slice(&old_identity).unwrap();
    id.generation = 10;
    std::fs::write(&id_path, serde_json::to_vec(&id).unwrap()).unwrap();
    let base = p.sealed()[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 512], 0).unwrap();
    match replicate(&p.top, &site.addr, 2) {
        Err(SendError::Diverged(m)) => assert!(m.contains("point 1 is"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(points(&site.dir).unwrap().len(), 1);
}

/// A hand-made primary speaking the protocol.
struct RawPeer {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl RawPeer {
    fn connect(addr: &str, id: u8, generation: u64) -> (RawPeer, Message) {
        let w = TcpStream::connect(addr).unwrap();
        let mut p = RawPeer {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        };
        p.send_msg(&Message::Hello {
            version: VERSION,
            chain_id: [id; 16],
            generation,
            disk_size: CHUNK * 2,
        });
        let m = p.recv();
        (p, m)
    }
    fn send_msg(&mut self, m: &Message) {
        self.send_bytes(&m.encode());
    }
    fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.w.write_all(b);
    }
    fn recv(&mut self) -> Message {
        wire::recv(&mut self.r).unwrap().expect("a message")
    }
}

fn raw_base_layer() -> Vec<u8> {
    (0..2 * CHUNK).map(|i| (i % 251) as u8 | 1).collect()
}

fn begin_base(p: &mut RawPeer) {
    p.send_msg(&Message::LayerBegin {
        seq: 1,
        format: WireFormat::Raw,
        file_len: 2 * CHUNK,
        sealed_at_ms: 1,
        has_parent: false,
        name: "base.img".into(),
    });
}

#[test]
fn corrupted_chunks_and_digests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let data = raw_base_layer();

    // A chunk whose bytes changed after the checksum: refused.
    let (mut p, w) = RawPeer::connect(&site.addr, 1, 1);
    assert!(matches!(w, Message::Welcome { last_seq: 0, .. }));
    begin_base(&mut p);
    let mut frame = Message::Chunk {
        seq: 1,
        offset: 0,
        data: data[..CHUNK as usize].to_vec(),
    }
    .encode();
    frame[1000] ^= 0x40;
    p.send_bytes(&frame);
    // The site closes the session; it never stores the layer.
    let mut rest = Vec::new();
    let _ = p.r.read_to_end(&mut rest);
    assert!(points(&site.dir).unwrap().is_empty());

    // Good chunks but a wrong digest: refused with Digest.
    let (mut p, _) = RawPeer::connect(&site.addr, 1, 1);
    begin_base(&mut p);
    let mut d = LayerDigest::new(2 * CHUNK);
    for off in [0, CHUNK] {
        let c = data[off as usize..(off + CHUNK) as usize].to_vec();
        d.add(off, &c).unwrap();
        p.send_msg(&Message::Chunk {
            seq: 1,
            offset: off,
            data: c,
        });
    }
    let mut digest = d.finish();
    let good = digest;
    digest[0] ^= 1;
    p.send_msg(&Message::LayerEnd {
        seq: 1,
        chunks: 2,
        digest,
    });
    match p.recv() {
        Message::Refuse { code, .. } => assert_eq!(code, RefuseCode::Digest),
        other => panic!("{other:?}"),
    }
    assert!(points(&site.dir).unwrap().is_empty());

    // The same layer, correct: stored and acknowledged.
    let (mut p, _) = RawPeer::connect(&site.addr, 1, 1);
    begin_base(&mut p);
    for off in [0, CHUNK] {
        p.send_msg(&Message::Chunk {
            seq: 1,
            offset: off,
            data: data[off as usize..(off + CHUNK) as usize].to_vec(),
        });
    }
    p.send_msg(&Message::LayerEnd {
        seq: 1,
        chunks: 2,
        digest: good,
    });
    assert_eq!(
        p.recv(),
        Message::LayerAck {
            seq: 1,
            digest: good
        }
    );
    let pts = points(&site.dir).unwrap();
    assert_eq!(pts.len(), 1);
    assert_eq!(std::fs::read(site.dir.join(&pts[0].file)).unwrap(), data);
    // No temporary files are left behind by the refused sessions.
    let names: Vec<String> = std::fs::read_dir(&site.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".incoming")),
        "{names:?}"
    );
}

/// An old sender that is still connected is fenced off once a newer
/// generation has connected: its session is cut, its layer never stored.
#[test]
fn a_newer_generation_fences_off_an_older_session() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let data = raw_base_layer();
    let (mut old, _) = RawPeer::connect(&site.addr, 7, 1);
    let (_new, w) = RawPeer::connect(&site.addr, 7, 2);
    assert!(matches!(w, Message::Welcome { .. }));
    begin_base(&mut old);
    let mut d = LayerDigest::new(2 * CHUNK);
    for off in [0, CHUNK] {
        let c = data[off as usize..(off + CHUNK) as usize].to_vec();
        d.add(off, &c).unwrap();
        old.send_msg(&Message::Chunk {
            seq: 1,
            offset: off,
            data: c,
        });
    }
    old.send_msg(&Message::LayerEnd {
        seq: 1,
        chunks: 2,
        digest: d.finish(),
    });
    // The site cut the old session when the new one was accepted (or, had
    // it still been connected, would refuse its commit as stale).
    match wire::recv(&mut old.r) {
        Ok(Some(Message::Refuse { code, .. })) => assert_eq!(code, RefuseCode::StaleGeneration),
        Ok(None) | Err(_) => {}
        Ok(Some(other)) => panic!("{other:?}"),
    }
    assert!(points(&site.dir).unwrap().is_empty());
}

/// The status API of a running sender reports points, bytes and lag.
#[test]
fn status_api_reports_progress_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(dir.path(), Format::Qcow2);
    p.write_batch(10);
    let status = Arc::new(Mutex::new(Status::default()));
    let sock = dir.path().join("api.sock");
    tandem_replica::status::serve_api(&sock, status.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = send_cfg(&p.top, &site.addr, 3);
    let (st2, stop2) = (status.clone(), stop.clone());
    let h = std::thread::spawn(move || tandem_replica::sender::run(&cfg, &st2, &stop2));
    h.join().unwrap().unwrap();
    match tandem_replica::status::query(&sock).unwrap() {
        tandem_replica::status::ApiResponse::Status { status, .. } => {
            assert_eq!(status.points, 3);
            assert!(status.bytes_sent > 0);
            assert_eq!(status.state, "stopped");
            assert!(status.worst_lag_ms < 10_000);
        }
        other => panic!("{other:?}"),
    }
}

/// A chain about to be too deep: the sender seals up to the limit, ships
/// everything, then stops sealing (state chain-full) instead of making a
/// chain that no longer opens; the deepest point still fails over.
#[test]
fn the_sender_stops_sealing_before_the_chain_is_too_deep() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(dir.path(), Format::Qcow2);
    p.write_batch(3);
    for _ in 0..tandem_replica::sender::MAX_SEALED - 1 {
        ops::checkpoint(&p.top, tandem_disk::FaultHook::default()).unwrap();
    }
    p.write_batch(3);
    let status = Arc::new(Mutex::new(Status::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut cfg = send_cfg(&p.top, &site.addr, u64::MAX);
    cfg.stop_after = None;
    let (st2, stop2) = (status.clone(), stop.clone());
    let h = std::thread::spawn(move || tandem_replica::sender::run(&cfg, &st2, &stop2));
    let begun = std::time::Instant::now();
    while status.lock().unwrap().state != "chain-full" {
        assert!(
            begun.elapsed().as_secs() < 120,
            "{:?}",
            status.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap().unwrap();
    let max = tandem_replica::sender::MAX_SEALED as u64;
    assert_eq!(status.lock().unwrap().points, max);
    assert_eq!(p.sealed().len() as u64, max);
    assert!(ops::check(&p.top).unwrap().is_clean());
    assert_eq!(read_all(&p.top), p.model);
    let out = dir.path().join("deepest.qcow2");
    failover(&site.dir, max, &out, Output::Chain).unwrap();
    assert_eq!(read_all(&out), p.model);
    assert_qemu_identical(&p.sealed()[max as usize - 1], &out);
}

/// A disk served by the vhost-blk backend (no VM attached): the sender
/// lists its layers and checkpoints it through the backend's API socket,
/// and the site's points fail over to what the disk held.
#[test]
fn a_disk_served_by_the_vhost_blk_backend_replicates_through_its_api() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(&dir.path().join("site"));
    let mut p = Primary::create(dir.path(), Format::Vhdx);
    p.write_batch(10);
    let api = dir.path().join("backend.api");
    let cfg = tandem_vhost_blk::ServerConfig {
        socket: dir.path().join("backend.sock"),
        disk: p.top.clone(),
        readonly: false,
        api_socket: Some(api.clone()),
        serial: None,
        volume_socket: None,
    };
    // The backend waits for a vhost-user frontend that never comes; its API
    // answers meanwhile. The thread ends with the test process.
    std::thread::spawn(move || tandem_vhost_blk::run(cfg).map_err(|e| e.to_string()));
    let begun = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&api).is_err() {
        assert!(
            begun.elapsed().as_secs() < 30,
            "the backend's API never came up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = Mutex::new(Status::default());
    let mut cfg = send_cfg(&p.top, &site.addr, 2);
    cfg.source = tandem_replica::Source::Vhost(api);
    tandem_replica::sender::run(&cfg, &status, &AtomicBool::new(false)).unwrap();
    let st = status.into_inner().unwrap();
    assert_eq!(st.points, 2);
    assert_eq!(st.disk, p.top.display().to_string());
    // The backend checkpointed: two sealed layers under the live top.
    let sealed = p.sealed();
    assert_eq!(sealed.len(), 2);
    assert!(tandem_replica::sender::Identity::path(&p.top).exists());
    for (i, rec) in points(&site.dir).unwrap().iter().enumerate() {
        let out = dir.path().join(format!("fo{}.vhdx", rec.seq));
        failover(&site.dir, rec.seq, &out, Output::Chain).unwrap();
        assert_eq!(read_all(&out), p.model);
        assert_eq!(read_all(&out), read_all(&sealed[i]));
    }
}

/// A stand-in for the vhost-blk backend of a running VM: a writable chain
/// written by a "guest" thread, and the backend's API (info, checkpoint)
/// on a Unix socket. A checkpoint and a batch of guest writes exclude each
/// other, so every point is a state the guest saw complete.
struct LiveDisk {
    api: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    guest: Option<std::thread::JoinHandle<(Vec<u8>, std::collections::HashSet<u64>)>>,
}

impl LiveDisk {
    fn start(dir: &std::path::Path, p: &Primary) -> LiveDisk {
        use std::io::BufRead;
        use tandem_disk::{BlockDevice, Chain, ChainOptions};
        use tandem_vhost_blk::api::{Info, LayerInfo, Request, Response};
        let chain = Arc::new(
            Chain::open(
                &p.top,
                ChainOptions {
                    writable: true,
                    ..ChainOptions::default()
                },
            )
            .unwrap(),
        );
        let gate = Arc::new(Mutex::new(()));
        let stop = Arc::new(AtomicBool::new(false));
        let api = dir.join("live.api");
        let listener = std::os::unix::net::UnixListener::bind(&api).unwrap();
        let (c2, g2) = (chain.clone(), gate.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut line = String::new();
                if std::io::BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let answer = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Info) => Response::Info(Box::new(Info {
                        chain: c2
                            .layers()
                            .iter()
                            .enumerate()
                            .map(|(i, l)| LayerInfo {
                                path: l.path().display().to_string(),
                                format: l.format().name().into(),
                                sealed: i > 0,
                            })
                            .collect(),
                        capacity_bytes: c2.size(),
                        blk_size: 512,
                        readonly: false,
                        counters: Default::default(),
                        last_error: None,
                        lending: None,
                    })),
                    Ok(Request::Checkpoint) => {
                        let _g = g2.lock().unwrap();
                        match c2.checkpoint() {
                            Ok(sealed) => Response::Checkpoint {
                                sealed: sealed.display().to_string(),
                                elapsed_us: 0,
                            },
                            Err(e) => Response::Error {
                                message: e.to_string(),
                            },
                        }
                    }
                    Ok(Request::Fence { .. } | Request::Unfence) => Response::Error {
                        message: "this stand-in lends no volume".into(),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                };
                let mut text = serde_json::to_string(&answer).unwrap();
                text.push('\n');
                let _ = (&conn).write_all(text.as_bytes());
            }
        });
        let (mut model, s2) = (p.model.clone(), stop.clone());
        let guest = std::thread::spawn(move || {
            let mut states = std::collections::HashSet::new();
            states.insert(hash(&model));
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            // Bounded: the test stops it long before.
            for _ in 0..200_000 {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                {
                    let _g = gate.lock().unwrap();
                    for _ in 0..2 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let len = (rng % 8 + 1) * 4096;
                        let off = (rng >> 20) % ((SIZE - len) / 4096) * 4096;
                        let data = vec![(rng >> 8) as u8 | 1; len as usize];
                        chain.write_at(&data, off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    chain.flush().unwrap();
                    states.insert(hash(&model));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            chain.flush().unwrap();
            (model, states)
        });
        LiveDisk {
            api,
            stop,
            guest: Some(guest),
        }
    }

    /// Stops the guest; returns its last content and every state it had.
    fn stop(mut self) -> (Vec<u8>, std::collections::HashSet<u64>) {
        self.stop.store(true, Ordering::SeqCst);
        self.guest.take().unwrap().join().unwrap()
    }
}

/// The site's points once its merges after the last acknowledgement are
/// done (they run after the acknowledgement is sent).
fn settled(site: &std::path::Path, expect: &[u64]) -> Vec<tandem_replica::LayerRecord> {
    let begun = std::time::Instant::now();
    loop {
        let m = Manifest::load(site).unwrap();
        let pts: Vec<_> = m.points().cloned().collect();
        let seqs: Vec<u64> = pts.iter().map(|r| r.seq).collect();
        if seqs == expect && m.merging.is_none() {
            return pts;
        }
        assert!(
            begun.elapsed().as_secs() < 10,
            "points {seqs:?}, expected {expect:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Replication runs indefinitely: 102 points at a 20 ms interval (past
/// the 62 layers a chain could hold unmerged) while a guest writes,
/// the primary merging shipped layers (at 4) and the site keeping 3
/// points. A point held by a failover survives the merges around it until
/// released. Every point equals a state the guest saw; qemu-img checks
/// both chains and compares the newest point with the primary.
#[test]
fn replication_runs_indefinitely_with_merges_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start_keeping(&dir.path().join("site"), Some(3));
    let mut p = Primary::create(dir.path(), Format::Qcow2);
    p.write_batch(20);
    let live = LiveDisk::start(dir.path(), &p);
    let run = |points: u64| {
        let status = Mutex::new(Status::default());
        let mut cfg = send_cfg(&p.top, &site.addr, points);
        cfg.interval = std::time::Duration::from_millis(20);
        cfg.source = tandem_replica::Source::Vhost(live.api.clone());
        cfg.merge_at = 4;
        tandem_replica::sender::run(&cfg, &status, &AtomicBool::new(false)).unwrap();
        status.into_inner().unwrap()
    };
    let st = run(70);
    assert_eq!(st.points, 70);
    assert!(st.merges >= 15, "{st:?}");
    // A failover holds point 70 while replication goes on past it.
    let held_out = dir.path().join("held.qcow2");
    failover(&site.dir, 70, &held_out, Output::Chain).unwrap();
    let held_content = read_all(&held_out);
    let st = run(100);
    assert_eq!(st.points, 100);
    // Below the held point, its parent (point 69) stays as it is, and so
    // does point 68 below it (all older ones merged into it): merging 69
    // into it would relink the held layer.
    settled(&site.dir, &[68, 69, 70, 98, 99, 100]);
    assert_eq!(read_all(&held_out), held_content, "the held point changed");
    assert!(tandem_replica::failover::release(&site.dir, 70).unwrap());
    std::fs::remove_file(&held_out).unwrap();
    let st = run(102);
    assert_eq!(st.points, 102);
    let pts = settled(&site.dir, &[100, 101, 102]);
    let (model, states) = live.stop();
    // Both chains stay short and sound.
    let primary = ops::info(&p.top).unwrap();
    assert!(
        primary.len() <= 4 + 2,
        "primary chain {} deep",
        primary.len()
    );
    for l in &primary {
        assert_qemu_check_clean(&l.path);
    }
    assert!(ops::check(&p.top).unwrap().is_clean());
    assert_eq!(read_all(&p.top), model);
    let m = Manifest::load(&site.dir).unwrap();
    assert!(m.layers.len() <= 4, "site chain {} deep", m.layers.len());
    for l in &m.layers {
        assert_qemu_check_clean(&site.dir.join(&l.file));
    }
    for rec in &pts {
        let content = read_all(&site.dir.join(&rec.file));
        assert!(states.contains(&hash(&content)), "point {}", rec.seq);
    }
    let newest = site.dir.join(&pts[2].file);
    assert_qemu_identical(&p.layer_of_point(pts[2].seq), &newest);
    // Nothing but the chains' files is left on either side.
    let site_files = std::fs::read_dir(&site.dir).unwrap().count();
    assert!(
        site_files <= m.layers.len() + 2,
        "{site_files} files in the site"
    );
}
