//! CDBs and data-out from a hostile initiator, run against a small
//! in-memory logical unit from two I_T nexuses: nothing panics, every
//! answer is GOOD with data no longer than the CDB allows, or carries a
//! status that matches its sense.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tandem_scsi::mem::MemDisk;
use tandem_scsi::{Command, ItNexus, LogicalUnit, LuConfig, PrState, Status, Target};

fuzz_target!(|data: &[u8]| {
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
    let nexus = [
        ItNexus::new("iqn.a,i,0x01", 1),
        ItNexus::new("iqn.b,i,0x02", 1),
    ];
    // Records: [selector, cdb length, cdb..., data-out length, data-out...].
    let mut rest = data;
    while rest.len() >= 2 {
        let who = &nexus[usize::from(rest[0] & 1)];
        let lun = if rest[0] & 2 != 0 { Some(1) } else { Some(0) };
        let cdb_len = usize::from(rest[1] % 17).min(rest.len() - 2);
        let cdb = &rest[2..2 + cdb_len];
        rest = &rest[2 + cdb_len..];
        let dlen = rest
            .first()
            .map_or(0, |&b| usize::from(b) * 4)
            .min(rest.len().saturating_sub(1));
        let dout = rest.get(1..1 + dlen).unwrap_or(&[]);
        rest = rest.get(1 + dlen..).unwrap_or(&[]);
        let _ = Command::parse(cdb);
        let r = target.execute(who, lun, cdb, dout);
        match r.status {
            Status::Good => assert!(r.sense.is_none()),
            Status::CheckCondition => {
                assert!(r.sense.is_some());
                assert!(r.data.is_empty());
            }
            Status::ReservationConflict => assert!(r.sense.is_none() && r.data.is_empty()),
            s => panic!("unexpected status {s:?}"),
        }
        assert!(r.data.len() <= 64 * 1024 + 64);
    }
});
