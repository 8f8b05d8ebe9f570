//! The file server killed and started again on the same directory, with
//! APTPL set: registrations and the reservation survive, and a replayed
//! command is answered, never run twice. A write that ran and whose
//! result was lost gets its result again while another initiator's later
//! write to the same block stays; a kill between a write's intent and its
//! run (the server's test hook) gets a clean failure (UNIT ATTENTION 29h)
//! and the write does not land; a record from another boot answers every
//! replay as unknown.
//!
//! The server runs as a child process: this test binary started again
//! with `TANDEM_SHARE_CHILD_DIR` set runs only `child_entry`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use tandem_share::client::{Client, ClientConfig, Request};
use tandem_share::journal_file::ABORT_AFTER_INTENT_ENV;
use tandem_share::proto::{self, Message, Outcome};
use tandem_share::stream::{read_message, write_message};
use tandem_share::{ServeConfig, Server};
use tandem_testkit::{reexec, Proc};

const WAIT: Duration = Duration::from_secs(10);

/// The child process's entry: a no-op in a normal test run.
#[test]
fn child_entry() {
    let Ok(dir) = std::env::var("TANDEM_SHARE_CHILD_DIR") else {
        return;
    };
    let listen = std::env::var("TANDEM_SHARE_CHILD_LISTEN").unwrap();
    let server = Server::open(&ServeConfig {
        dir: dir.into(),
        listen: listen.parse().unwrap(),
        state_dir: None,
        api_socket: None,
    })
    .unwrap();
    println!("ready {}", server.local_addr().unwrap());
    let _ = server.run();
    std::process::exit(0);
}

fn serve(dir: &Path, listen: &str, abort_after_intent: Option<&str>) -> (Proc, SocketAddr) {
    let mut c = reexec("child_entry");
    c.env("TANDEM_SHARE_CHILD_DIR", dir)
        .env("TANDEM_SHARE_CHILD_LISTEN", listen)
        .env_remove(ABORT_AFTER_INTENT_ENV);
    if let Some(v) = abort_after_intent {
        c.env(ABORT_AFTER_INTENT_ENV, v);
    }
    let mut child = Proc::spawn(c);
    let addr = child.ready().parse().unwrap();
    (child, addr)
}

fn disk(dir: &Path) {
    std::fs::File::create(dir.join("d.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
}

fn block(dir: &Path, lba: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(dir.join("d.raw")).unwrap();
    f.seek(SeekFrom::Start(lba * 512)).unwrap();
    let mut b = vec![0u8; 512];
    f.read_exact(&mut b).unwrap();
    b
}

/// A client speaking the protocol by hand, so the test decides what is
/// acknowledged and what is sent again.
struct Raw(TcpStream);

impl Raw {
    /// Connects; the Welcome's `resumed` and `last_seq`.
    fn hello(addr: SocketAddr, initiator: &str, incarnation: u64) -> (Raw, bool, u64) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write_message(
            &mut s,
            &Message::Hello {
                min_version: proto::MIN_VERSION,
                max_version: proto::VERSION,
                incarnation,
                initiator: initiator.into(),
                disk: "d.raw".into(),
            },
        )
        .unwrap();
        match read_message(&mut s).unwrap() {
            Some(Message::Welcome {
                resumed, last_seq, ..
            }) => (Raw(s), resumed, last_seq),
            other => panic!("{other:?}"),
        }
    }

    fn run(
        &mut self,
        seq: u64,
        acked: u64,
        cdb: &[u8],
        data_out: Vec<u8>,
        data_in: u32,
    ) -> Outcome {
        write_message(
            &mut self.0,
            &Message::Command(proto::Command {
                seq,
                acked,
                lun: 0,
                task_attr: 0,
                data_in_len: data_in,
                cdb: cdb.to_vec(),
                data_out,
            }),
        )
        .unwrap();
        match read_message(&mut self.0).unwrap() {
            Some(Message::Outcome(o)) => {
                assert_eq!(o.seq, seq);
                o
            }
            other => panic!("{other:?}"),
        }
    }

    fn write(&mut self, seq: u64, acked: u64, lba: u8, byte: u8) -> Outcome {
        self.run(
            seq,
            acked,
            &[0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0],
            vec![byte; 512],
            0,
        )
    }

    fn prout(&mut self, seq: u64, sa: u8, kind: u8, key: u64, sa_key: u64) -> Outcome {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = 1; // APTPL
        self.run(seq, seq - 1, &[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0], p, 0)
    }
}

fn is_unknown(o: &Outcome) -> bool {
    // CHECK CONDITION, UNIT ATTENTION, 29h/00h, not run now.
    o.status == 2 && o.sense.get(2) == Some(&6) && o.sense.get(12) == Some(&0x29) && o.replayed
}

#[test]
fn an_executed_write_replayed_after_a_kill_is_answered_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    disk(dir.path());
    let (mut server, addr) = serve(dir.path(), "127.0.0.1:0", None);
    let (mut a, ..) = Raw::hello(addr, "a@h1", 7);
    let (mut b, ..) = Raw::hello(addr, "b@h2", 8);
    assert_eq!(a.prout(1, 0, 0, 0, 0xa).status, 0);
    assert_eq!(b.prout(1, 0, 0, 0, 0xb).status, 0);
    // Write Exclusive, Registrants Only: both write.
    assert_eq!(a.prout(2, 1, 5, 0xa, 0).status, 0);
    // A's write ran, its result is not acknowledged; then B's write to
    // the same block.
    assert_eq!(a.write(3, 2, 0, b'A').status, 0);
    assert_eq!(b.write(2, 1, 0, b'B').status, 0);
    server.sigkill();

    let (mut server, addr) = serve(dir.path(), "127.0.0.1:0", None);
    let (mut a, resumed, last_seq) = Raw::hello(addr, "a@h1", 7);
    assert_eq!((resumed, last_seq), (true, 3));
    let o = a.write(3, 2, 0, b'A');
    assert_eq!((o.status, o.replayed), (0, true));
    assert_eq!(block(dir.path(), 0), vec![b'B'; 512], "A's write ran twice");
    // APTPL: both registrations and the reservation are back.
    let keys = a.run(4, 3, &[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], vec![], 4096);
    assert_eq!((keys.status, keys.data[7]), (0, 16));
    let res = a.run(5, 4, &[0x5e, 1, 0, 0, 0, 0, 0, 0x10, 0, 0], vec![], 4096);
    assert_eq!((res.status, res.data[7], res.data[21] & 0xf), (0, 16, 5));
    // B's unacknowledged write is answered too.
    let (mut b, ..) = Raw::hello(addr, "b@h2", 8);
    let o = b.write(2, 1, 0, b'B');
    assert_eq!((o.status, o.replayed), (0, true));
    // A new incarnation of A starts afresh: its seq 3 runs.
    let (mut a2, resumed, _) = Raw::hello(addr, "a@h1", 70);
    assert!(!resumed);
    assert_eq!(a2.prout(1, 0, 0, 0xa, 0xa).status, 0);
    let o = a2.write(2, 1, 1, b'C');
    assert_eq!((o.status, o.replayed), (0, false));
    assert_eq!(block(dir.path(), 1), vec![b'C'; 512]);
    server.sigkill();

    // As if the host had crashed: the record says another boot. Its
    // results are not trusted: the replay fails cleanly, and is not run.
    let rec = dir.path().join(".tandem-share/d.raw.cmds.jsonl");
    let text = std::fs::read_to_string(&rec).unwrap();
    let (head, rest) = text.split_once('\n').unwrap();
    assert!(head.contains("\"boot_id\""), "{head}");
    let head = head.replace("\"boot_id\":\"", "\"boot_id\":\"other-");
    std::fs::write(&rec, format!("{head}\n{rest}")).unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    let (_server, addr) = serve(dir.path(), "127.0.0.1:0", None);
    let (mut a2, resumed, _) = Raw::hello(addr, "a@h1", 70);
    assert!(resumed);
    let o = a2.write(2, 1, 1, b'C');
    assert!(is_unknown(&o), "{o:?}");
    assert_eq!(block(dir.path(), 1), vec![0u8; 512]);
    // A new command runs.
    assert_eq!(a2.write(3, 2, 2, b'D').status, 0);
    assert_eq!(block(dir.path(), 2), vec![b'D'; 512]);
}

fn submit(c: &Client, lba: u8, byte: u8) -> mpsc::Receiver<Outcome> {
    let (tx, rx) = mpsc::channel();
    c.submit(
        Request {
            lun: 0,
            task_attr: 0,
            data_in_len: 0,
            cdb: vec![0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0],
            data_out: vec![byte; 512],
        },
        Box::new(move |r| {
            let _ = tx.send(r.expect("the command failed in the client"));
        }),
    );
    rx
}

#[test]
fn a_kill_between_intent_and_write_fails_the_replay_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    disk(dir.path());
    // A fixed port, so the client reconnects to the restarted server.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // The server aborts once a@h1's command 3 is recorded, before it runs.
    let (mut server, addr) = serve(dir.path(), &listen, Some("a@h1/3"));
    let a = Client::connect(ClientConfig {
        server: addr.to_string(),
        disk: "d.raw".into(),
        initiator: "a@h1".into(),
        reconnect_for: Duration::from_secs(15),
        command_timeout: Duration::from_secs(2),
    })
    .unwrap();
    let epoch = a.server_epoch();
    assert_eq!(submit(&a, 1, 1).recv_timeout(WAIT).unwrap().status, 0);
    assert_eq!(submit(&a, 2, 2).recv_timeout(WAIT).unwrap().status, 0);
    let third = submit(&a, 1, 9);
    // The server dies by its own hand.
    let status = server.0.wait().unwrap();
    assert!(!status.success());
    assert!(third.try_recv().is_err());

    let (_server, _) = serve(dir.path(), &listen, None);
    let o = third
        .recv_timeout(WAIT)
        .expect("the replay was not answered");
    assert!(is_unknown(&o), "{o:?}");
    assert_ne!(a.server_epoch(), epoch);
    assert_eq!(block(dir.path(), 1), vec![1u8; 512], "the write ran");
    // The client goes on: new commands run.
    assert_eq!(submit(&a, 1, 4).recv_timeout(WAIT).unwrap().status, 0);
    assert_eq!(block(dir.path(), 1), vec![4u8; 512]);
    assert_eq!(block(dir.path(), 2), vec![2u8; 512]);
}
