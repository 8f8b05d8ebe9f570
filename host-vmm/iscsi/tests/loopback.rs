//! The target over loopback TCP against a small initiator written here:
//! login with digests, R2T-solicited writes across bursts, Data-In,
//! reservations seen from two sessions with their unit attentions, APTPL
//! state files, and the faults (bad digest, short data-out, bad target).
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tandem_iscsi::pdu::{op, Digests, Pdu, BHS_LEN};
use tandem_iscsi::server::{load_state, Lun, LunSpec, Server, ServerConfig};
use tandem_iscsi::text;
use tandem_scsi::mem::MemDisk;
use tandem_scsi::{LogicalUnit, LuConfig, PrState};

const IQN: &str = "iqn.2026-11.dev.tandem:test";

fn mem_server() -> SocketAddr {
    let lu = LogicalUnit::new(
        Arc::new(MemDisk::new(4 << 20)),
        LuConfig {
            serial: "t0".into(),
            read_only: false,
            unmap: true,
        },
        PrState::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new(listener, IQN, vec![(0, Lun::new(Arc::new(lu), None))]);
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    addr
}

struct Client {
    s: TcpStream,
    d: Digests,
    cmd_sn: u32,
    itt: u32,
    /// Send Data-Out with a DataSN off by this much.
    datasn_skew: u32,
}

struct Reply {
    status: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
    r2ts: u32,
}

impl Client {
    fn send(&mut self, p: &Pdu) {
        self.s.write_all(&p.encode(self.d)).unwrap();
    }

    fn recv(&mut self) -> Option<Pdu> {
        let mut bhs = [0u8; BHS_LEN];
        self.s.read_exact(&mut bhs).ok()?;
        let mut buf = bhs.to_vec();
        buf.resize(Pdu::frame_len(&bhs, self.d), 0);
        self.s.read_exact(&mut buf[BHS_LEN..]).ok()?;
        Some(Pdu::decode(&buf, self.d, 1 << 24).unwrap().0)
    }

    /// Logs in straight to full feature phase; returns the login response.
    fn login(addr: SocketAddr, name: &str, target: &str, digests: bool) -> (Client, Pdu) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            s,
            d: Digests::default(),
            cmd_sn: 1,
            itt: 1,
            datasn_skew: 0,
        };
        let dg = if digests { "CRC32C" } else { "None" };
        let mut p = Pdu::new(op::LOGIN_REQ);
        p.bhs[0] |= 0x40;
        p.set_flags(0x80 | (1 << 2) | 3);
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 7]);
        p.set_u32(24, 1);
        p.data = text::encode(&[
            ("InitiatorName".into(), name.into()),
            ("TargetName".into(), target.into()),
            ("SessionType".into(), "Normal".into()),
            ("HeaderDigest".into(), dg.into()),
            ("DataDigest".into(), dg.into()),
            ("ImmediateData".into(), "No".into()),
            ("InitialR2T".into(), "Yes".into()),
            ("MaxBurstLength".into(), "16384".into()),
            ("MaxRecvDataSegmentLength".into(), "4096".into()),
        ]);
        c.send(&p);
        let r = c.recv().unwrap();
        if r.bhs[36] == 0 {
            c.d = Digests {
                header: digests,
                data: digests,
            };
        }
        (c, r)
    }

    fn command(
        &mut self,
        cdb: &[u8],
        read_len: u32,
        write: Option<&[u8]>,
        short_by: usize,
    ) -> Option<Reply> {
        let itt = self.itt;
        self.itt += 1;
        let mut p = Pdu::new(op::SCSI_CMD);
        let mut flags = 0x80 | 0x01; // F, simple task
        let edtl = match write {
            Some(w) => {
                flags |= 0x20;
                w.len() as u32
            }
            None => {
                if read_len > 0 {
                    flags |= 0x40;
                }
                read_len
            }
        };
        p.set_flags(flags);
        p.set_itt(itt);
        p.set_u32(20, edtl);
        p.set_u32(24, self.cmd_sn);
        self.cmd_sn += 1;
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.send(&p);
        let mut data = Vec::new();
        let mut r2ts = 0;
        loop {
            let r = self.recv()?;
            match r.opcode() {
                op::R2T => {
                    r2ts += 1;
                    let w = write.unwrap();
                    let off = r.u32_at(40) as usize;
                    let mut len = r.u32_at(44) as usize;
                    let ttt = r.u32_at(20);
                    if short_by > 0 {
                        len -= short_by;
                    }
                    let mut sent = 0;
                    let mut sn = 0;
                    while sent < len {
                        let n = (len - sent).min(4096);
                        let mut d = Pdu::new(op::DATA_OUT);
                        d.set_flags(if sent + n == len { 0x80 } else { 0 });
                        d.set_itt(itt);
                        d.set_u32(20, ttt);
                        d.set_u32(36, sn + self.datasn_skew);
                        d.set_u32(40, (off + sent) as u32);
                        d.data = w[off + sent..off + sent + n].to_vec();
                        self.send(&d);
                        sent += n;
                        sn += 1;
                    }
                }
                op::DATA_IN => {
                    assert_eq!(r.u32_at(40) as usize, data.len());
                    assert!(
                        r.data.len() <= 4096,
                        "Data-In above our MaxRecvDataSegmentLength"
                    );
                    data.extend_from_slice(&r.data);
                }
                op::SCSI_RESP => {
                    assert_eq!(r.itt(), itt);
                    let sense = if r.data.len() >= 2 {
                        let n = u16::from_be_bytes([r.data[0], r.data[1]]) as usize;
                        r.data[2..2 + n].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Some(Reply {
                        status: r.bhs[3],
                        sense,
                        data,
                        r2ts,
                    });
                }
                op::REJECT => {
                    // The connection ends after a Reject here.
                    assert!(self.recv().is_none());
                    return None;
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn prout(&mut self, sa: u8, kind: u8, key: u64, sa_key: u64, aptpl: bool) -> Reply {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = u8::from(aptpl);
        self.command(&[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0], 0, Some(&p), 0)
            .unwrap()
    }
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [opcode, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn login_write_read_with_digests_and_r2t() {
    let addr = mem_server();
    let (mut c, r) = Client::login(addr, "iqn.test:a", IQN, true);
    assert_eq!(r.bhs[36], 0);
    let keys = text::parse(&r.data).unwrap();
    assert!(keys.contains(&("HeaderDigest".into(), "CRC32C".into())));
    assert!(keys.contains(&("TargetPortalGroupTag".into(), "1".into())));
    assert_eq!(
        c.command(&[0, 0, 0, 0, 0, 0], 0, None, 0).unwrap().status,
        0
    );
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 253) as u8).collect();
    let w = c.command(&rw10(0x2a, 8, 128), 0, Some(&data), 0).unwrap();
    assert_eq!(w.status, 0);
    // 64 KiB in bursts of MaxBurstLength 16 KiB.
    assert_eq!(w.r2ts, 4);
    let r = c.command(&rw10(0x28, 8, 128), 65536, None, 0).unwrap();
    assert_eq!(r.status, 0);
    assert_eq!(r.data, data);
    // INQUIRY truncated to the expected length.
    let r = c.command(&[0x12, 0, 0, 0, 96, 0], 36, None, 0).unwrap();
    assert_eq!(r.data.len(), 36);
    assert_eq!(&r.data[8..14], b"TANDEM");
}

#[test]
fn reservations_across_sessions() {
    let addr = mem_server();
    let (mut a, _) = Client::login(addr, "iqn.test:a", IQN, false);
    let (mut b, _) = Client::login(addr, "iqn.test:b", IQN, false);
    assert_eq!(a.prout(0, 0, 0, 0xaa, false).status, 0);
    assert_eq!(b.prout(0, 0, 0, 0xbb, false).status, 0);
    assert_eq!(a.prout(1, 1, 0xaa, 0, false).status, 0);
    let block = vec![0x11u8; 512];
    assert_eq!(
        b.command(&rw10(0x2a, 0, 1), 0, Some(&block), 0)
            .unwrap()
            .status,
        0x18
    );
    assert_eq!(
        a.command(&rw10(0x2a, 0, 1), 0, Some(&block), 0)
            .unwrap()
            .status,
        0
    );
    // B preempts A; A hears it once as a unit attention, then conflicts.
    assert_eq!(b.prout(5, 1, 0xbb, 0xaa, false).status, 0);
    let r = a.command(&rw10(0x2a, 0, 1), 0, Some(&block), 0).unwrap();
    assert_eq!(r.status, 2);
    assert_eq!((r.sense[2], r.sense[12], r.sense[13]), (0x06, 0x2a, 0x05));
    assert_eq!(
        a.command(&rw10(0x2a, 0, 1), 0, Some(&block), 0)
            .unwrap()
            .status,
        0x18
    );
    // READ KEYS from either session sees only B's key.
    let r = a
        .command(&[0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0], 64, None, 0)
        .unwrap();
    assert_eq!(&r.data[4..8], &8u32.to_be_bytes());
    assert_eq!(&r.data[8..16], &0xbbu64.to_be_bytes());
}

#[test]
fn aptpl_state_file_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        iqn: IQN.into(),
        luns: vec![LunSpec {
            lun: 0,
            path: disk.clone(),
            read_only: false,
        }],
        state_dir: dir.path().join("state"),
    };
    let server = Server::open(&cfg).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    let (mut a, _) = Client::login(addr, "iqn.test:a", IQN, false);
    assert_eq!(a.prout(0, 0, 0, 0x77, true).status, 0);
    assert_eq!(a.prout(1, 3, 0x77, 0, false).status, 0);
    let state = load_state(&dir.path().join("state/lun0.pr.json")).unwrap();
    assert_eq!(state.registrations.len(), 1);
    assert_eq!(state.registrations[0].key, 0x77);
    assert!(state.reservation.is_some());
    // A second server on the same files restores it: another initiator
    // is locked out of Exclusive Access.
    let server = Server::open(&cfg).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    let (mut b, _) = Client::login(addr, "iqn.test:b", IQN, false);
    assert_eq!(
        b.command(&rw10(0x28, 0, 1), 512, None, 0).unwrap().status,
        0x18
    );
    let r = b
        .command(&[0x5e, 1, 0, 0, 0, 0, 0, 0, 64, 0], 64, None, 0)
        .unwrap();
    assert_eq!(&r.data[8..16], &0x77u64.to_be_bytes());
    assert_eq!(r.data[21], 3);
}

#[test]
fn faults() {
    let addr = mem_server();
    // Unknown target name: login refused, class 2 detail 3.
    let (mut c, r) = Client::login(addr, "iqn.test:a", "iqn.nope", false);
    assert_eq!((r.bhs[36], r.bhs[37]), (2, 3));
    assert!(c.recv().is_none());
    // Data-out ending before the burst it answered: the command fails
    // with its sense, the connection lives on.
    let (mut c, _) = Client::login(addr, "iqn.test:a", IQN, false);
    let data = vec![1u8; 4096];
    let r = c.command(&rw10(0x2a, 0, 8), 0, Some(&data), 512).unwrap();
    assert_eq!(r.status, 2);
    assert_eq!((r.sense[2], r.sense[12], r.sense[13]), (0x0b, 0x4b, 0x00));
    assert_eq!(
        c.command(&[0, 0, 0, 0, 0, 0], 0, None, 0).unwrap().status,
        0
    );
    // EDTL below the CDB's transfer length: only whole blocks within it
    // are written, with an overflow residual (checked by the data).
    let ones = vec![1u8; 1024];
    assert_eq!(
        c.command(&rw10(0x2a, 40, 2), 0, Some(&ones), 0)
            .unwrap()
            .status,
        0
    );
    let twos = vec![2u8; 512];
    assert_eq!(
        c.command(&rw10(0x2a, 40, 2), 0, Some(&twos), 0)
            .unwrap()
            .status,
        0
    );
    let r = c.command(&rw10(0x28, 40, 2), 1024, None, 0).unwrap();
    assert!(r.data[..512].iter().all(|&b| b == 2));
    assert!(r.data[512..].iter().all(|&b| b == 1));
    // A wrong DataSN is a protocol error: Reject, then the end.
    c.datasn_skew = 3;
    assert!(c.command(&rw10(0x2a, 0, 1), 0, Some(&twos), 0).is_none());
    let (mut c, _) = Client::login(addr, "iqn.test:a", IQN, false);
    // A malformed CDB gets its sense.
    let r = c
        .command(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], 512, None, 0)
        .unwrap();
    assert_eq!((r.status, r.sense[2], r.sense[12]), (2, 0x05, 0x24));
    // A bad header digest ends the connection.
    let (mut c, _) = Client::login(addr, "iqn.test:a", IQN, true);
    let mut p = Pdu::new(op::NOP_OUT);
    p.set_itt(5);
    p.set_u32(24, c.cmd_sn);
    let mut bytes = p.encode(c.d);
    bytes[BHS_LEN] ^= 0xff;
    c.s.write_all(&bytes).unwrap();
    assert!(c.recv().is_none());
    // A bad data digest: Reject with reason 0x02, then the end.
    let (mut c, _) = Client::login(addr, "iqn.test:a", IQN, true);
    let mut p = Pdu::new(op::NOP_OUT);
    p.set_itt(5);
    p.set_u32(24, c.cmd_sn);
    p.data = vec![1, 2, 3, 4];
    let mut bytes = p.encode(c.d);
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    c.s.write_all(&bytes).unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.opcode(), r.bhs[2]), (op::REJECT, 0x02));
    assert!(c.recv().is_none());
    // NOP-Out is echoed.
    let (mut c, _) = Client::login(addr, "iqn.test:a", IQN, false);
    let mut p = Pdu::new(op::NOP_OUT);
    p.bhs[0] |= 0x40;
    p.set_itt(9);
    p.data = b"ping".to_vec();
    c.send(&p);
    let r = c.recv().unwrap();
    assert_eq!(
        (r.opcode(), r.itt(), r.data.as_slice()),
        (op::NOP_IN, 9, &b"ping"[..])
    );
}

/// A write of A's is waiting for its data (R2T sent) when B's PREEMPT AND
/// ABORT completes: the data that follows does not land.
#[test]
fn preempt_and_abort_against_a_write_in_flight() {
    let addr = mem_server();
    let (mut a, _) = Client::login(addr, "iqn.test:a", IQN, false);
    let (mut b, _) = Client::login(addr, "iqn.test:b", IQN, false);
    assert_eq!(a.prout(0, 0, 0, 0xa, false).status, 0);
    assert_eq!(b.prout(0, 0, 0, 0xb, false).status, 0);
    assert_eq!(a.prout(1, 1, 0xa, 0, false).status, 0);
    // A's WRITE(10) of block 5, by hand: command, then wait for the R2T.
    let mut p = Pdu::new(op::SCSI_CMD);
    p.set_flags(0x80 | 0x20 | 0x01);
    p.set_itt(900);
    p.set_u32(20, 512);
    p.set_u32(24, a.cmd_sn);
    a.cmd_sn += 1;
    p.bhs[32..42].copy_from_slice(&rw10(0x2a, 5, 1));
    a.send(&p);
    let r2t = a.recv().unwrap();
    assert_eq!(r2t.opcode(), op::R2T);
    // B preempts A and aborts its tasks.
    assert_eq!(b.prout(5, 1, 0xb, 0xa, false).status, 0);
    // A's data arrives after that.
    let mut d = Pdu::new(op::DATA_OUT);
    d.set_flags(0x80);
    d.set_itt(900);
    d.set_u32(20, r2t.u32_at(20));
    d.data = vec![0xee; 512];
    a.send(&d);
    let resp = a.recv().unwrap();
    assert_eq!(resp.opcode(), op::SCSI_RESP);
    assert_ne!(resp.bhs[3], 0, "the preempted write completed");
    let r = b.command(&rw10(0x28, 5, 1), 512, None, 0).unwrap();
    assert_eq!(r.status, 0);
    assert!(r.data.iter().all(|&x| x == 0), "the preempted write landed");
}
