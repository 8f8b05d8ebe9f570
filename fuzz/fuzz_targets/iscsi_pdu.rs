//! iSCSI PDUs from a hostile initiator: framing and digests are decoded
//! with and without digests, then a connection that has logged in gets
//! every PDU the input holds. Nothing panics; every PDU sent back encodes
//! and decodes again.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tandem_iscsi::conn::{Connection, TargetInfo};
use tandem_iscsi::pdu::{op, Digests, Pdu};
use tandem_iscsi::text;
use tandem_scsi::mem::MemDisk;
use tandem_scsi::{LogicalUnit, LuConfig, PrState, Target};

const IQN: &str = "iqn.2026-11.dev.tandem:fuzz";

fn login() -> Pdu {
    let mut p = Pdu::new(op::LOGIN_REQ);
    p.bhs[0] |= 0x40;
    p.set_flags(0x80 | (1 << 2) | 3);
    p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    p.data = text::encode(&[
        ("InitiatorName".into(), "iqn.fuzz:init".into()),
        ("TargetName".into(), IQN.into()),
        ("SessionType".into(), "Normal".into()),
        ("MaxRecvDataSegmentLength".into(), "4096".into()),
    ]);
    p
}

fuzz_target!(|data: &[u8]| {
    for d in [
        Digests::default(),
        Digests {
            header: true,
            data: true,
        },
    ] {
        if let Ok((p, used)) = Pdu::decode(data, d, 1 << 16) {
            assert!(used <= data.len());
            let again = p.encode(d);
            assert_eq!(Pdu::decode(&again, d, 1 << 16).map(|x| x.0), Ok(p));
        }
    }
    let lu = Arc::new(LogicalUnit::new(
        Arc::new(MemDisk::new(64 * 1024)),
        LuConfig {
            serial: "fuzz".into(),
            read_only: false,
            unmap: true,
        },
        PrState::default(),
    ));
    let mut target = Target::new();
    target.add_lun(0, lu);
    let info = Arc::new(TargetInfo {
        iqn: IQN.into(),
        portal: "127.0.0.1:3260".into(),
        tpgt: 1,
    });
    let mut conn = Connection::new(info, Arc::new(target));
    let out = conn.handle(login());
    assert!(!out.close);
    let mut rest = data;
    while let Ok((p, used)) = Pdu::decode(rest, conn.digests(), 1 << 16) {
        rest = &rest[used..];
        let d = conn.digests();
        let out = conn.handle(p);
        for q in &out.pdus {
            let bytes = q.encode(d);
            assert!(Pdu::decode(&bytes, d, 1 << 24).is_ok());
        }
        if out.close {
            break;
        }
    }
});
