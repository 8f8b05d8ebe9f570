//! The file server and clients over loopback: commands, reservations
//! shared between two initiators, and a connection cut in the middle
//! (through a proxy this test owns) with every command answered once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_share::client::{Client, ClientConfig, Request};
use tandem_share::proto::Outcome;
use tandem_share::{ServeConfig, Server};

const WAIT: Duration = Duration::from_secs(10);

fn start_server(dir: &std::path::Path) -> SocketAddr {
    let server = Server::open(&ServeConfig {
        dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: None,
        api_socket: None,
    })
    .unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    addr
}

fn client(addr: SocketAddr, initiator: &str) -> Client {
    Client::connect(ClientConfig {
        server: addr.to_string(),
        disk: "d.raw".into(),
        initiator: initiator.into(),
        reconnect_for: Duration::from_secs(5),
        command_timeout: Duration::from_secs(2),
    })
    .unwrap()
}

fn run(c: &Client, cdb: &[u8], data_out: Vec<u8>, data_in_len: u32) -> Outcome {
    let (tx, rx) = mpsc::channel();
    c.submit(
        Request {
            lun: 0,
            task_attr: 0,
            data_in_len,
            cdb: cdb.to_vec(),
            data_out,
        },
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(WAIT).expect("no result").expect("failed")
}

fn prout(c: &Client, sa: u8, kind: u8, key: u64, sa_key: u64) -> Outcome {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    run(c, &[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0], p, 0)
}

fn write(c: &Client, lba: u8) -> Outcome {
    run(c, &[0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0], vec![lba; 512], 0)
}

fn tur_until_good(c: &Client) {
    for _ in 0..8 {
        if run(c, &[0, 0, 0, 0, 0, 0], vec![], 0).status == 0 {
            return;
        }
    }
    panic!("unit attentions do not end");
}

#[test]
fn two_initiators_share_reservations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("d.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let addr = start_server(dir.path());
    let a = client(addr, "a@h1");
    let b = client(addr, "b@h2");
    assert_eq!(a.geometry().blocks, 2048);
    let inq = run(&a, &[0x12, 0, 0, 0, 36, 0], vec![], 36);
    assert_eq!((inq.status, &inq.data[8..14]), (0, &b"TANDEM"[..]));
    assert_eq!(prout(&a, 0, 0, 0, 0xa).status, 0);
    assert_eq!(prout(&b, 0, 0, 0, 0xb).status, 0);
    // Write Exclusive (type 1): only the holder writes.
    assert_eq!(prout(&a, 1, 1, 0xa, 0).status, 0);
    assert_eq!(write(&a, 1).status, 0);
    assert_eq!(write(&b, 2).status, 0x18);
    // B preempts A: A's registration and reservation are gone.
    assert_eq!(prout(&b, 4, 1, 0xb, 0xa).status, 0);
    tur_until_good(&a);
    assert_eq!(write(&a, 3).status, 0x18);
    assert_eq!(write(&b, 4).status, 0);
    let rd = run(&b, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], vec![], 512);
    assert_eq!(rd.data, vec![1u8; 512]);
    // Nothing needed a reconnect.
    for c in [&a, &b] {
        assert_eq!(
            c.stats()
                .reconnects
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(
            c.stats().resent.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}

/// A proxy that forwards bytes both ways and can cut every connection.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// While set, new connections are closed at once (the server is away).
    refuse: Arc<AtomicBool>,
}

impl Proxy {
    fn start(to: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(false));
        let c2 = conns.clone();
        let r2 = refuse.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                if r2.load(Ordering::SeqCst) {
                    drop(s);
                    continue;
                }
                let Ok(up) = TcpStream::connect(to) else {
                    continue;
                };
                c2.lock().unwrap().push(s.try_clone().unwrap());
                c2.lock().unwrap().push(up.try_clone().unwrap());
                for (mut from, mut to) in
                    [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            conns,
            refuse,
        }
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn commands_survive_a_cut_connection_and_run_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("d.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let addr = start_server(dir.path());
    let proxy = Proxy::start(addr);
    let a = client(proxy.addr, "a@h1");
    assert_eq!(prout(&a, 0, 0, 0, 0xa).status, 0);
    // Many writes in flight while the connection is cut again and again:
    // every one completes, exactly once each.
    let (tx, rx) = mpsc::channel();
    for i in 0..200u32 {
        let tx = tx.clone();
        let lba = (i % 2000) as u8;
        a.submit(
            Request {
                lun: 0,
                task_attr: 0,
                data_in_len: 0,
                cdb: vec![0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0],
                data_out: vec![lba; 512],
            },
            Box::new(move |r| {
                let _ = tx.send((i, r));
            }),
        );
        if i % 50 == 25 {
            proxy.cut();
        }
    }
    drop(tx);
    let mut seen = [false; 200];
    for _ in 0..200 {
        let (i, r) = rx.recv_timeout(WAIT).expect("a command never completed");
        let o = r.expect("a command failed");
        assert_eq!(o.status, 0);
        assert!(!seen[i as usize], "command {i} completed twice");
        seen[i as usize] = true;
    }
    assert!(
        a.stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // REGISTER with the old key as reservation key would fail if the first
    // REGISTER had run twice with another outcome; it is still 0xa.
    assert_eq!(prout(&a, 0, 0, 0xa, 0xc).status, 0);
}

#[test]
fn commands_fail_cleanly_while_the_server_stays_away_then_work_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("d.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let addr = start_server(dir.path());
    let proxy = Proxy::start(addr);
    let a = Client::connect(ClientConfig {
        server: proxy.addr.to_string(),
        disk: "d.raw".into(),
        initiator: "a@h1".into(),
        reconnect_for: Duration::from_secs(1),
        command_timeout: Duration::from_secs(2),
    })
    .unwrap();
    assert_eq!(write(&a, 1).status, 0);
    proxy.refuse.store(true, Ordering::SeqCst);
    proxy.cut();
    let (tx, rx) = mpsc::channel();
    a.submit(
        Request {
            lun: 0,
            task_attr: 0,
            data_in_len: 0,
            cdb: vec![0x2a, 0, 0, 0, 0, 2, 0, 0, 1, 0],
            data_out: vec![2; 512],
        },
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    // Failed after the reconnect limit, not before, not never.
    let begun = std::time::Instant::now();
    let r = rx.recv_timeout(WAIT).expect("the command hangs");
    assert!(r.is_err(), "{r:?}");
    assert!(begun.elapsed() >= Duration::from_millis(500));
    assert_eq!(a.pending(), 0);
    // The server is back: the next commands work.
    proxy.refuse.store(false, Ordering::SeqCst);
    let mut ok = false;
    for _ in 0..50 {
        let (tx, rx) = mpsc::channel();
        a.submit(
            Request {
                lun: 0,
                task_attr: 0,
                data_in_len: 512,
                cdb: vec![0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0],
                data_out: vec![],
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        if let Ok(Ok(o)) = rx.recv_timeout(WAIT) {
            assert_eq!(o.data, vec![1u8; 512]);
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "the client never came back");
}
