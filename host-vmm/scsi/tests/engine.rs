//! The engine against an in-memory disk: each PERSISTENT RESERVE OUT
//! service action and reservation type with its exact status and sense,
//! the access table, unit attentions, APTPL, and block commands.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_disk::BlockDevice;
use tandem_scsi::mem::MemDisk;
use tandem_scsi::pr::SavedPr;
use tandem_scsi::sense::{self, Sense};
use tandem_scsi::{ItNexus, LogicalUnit, LuConfig, PrState, Response, Status, Target};

const BLOCKS: u64 = 2048;

fn cfg() -> LuConfig {
    LuConfig {
        serial: "sn0001".into(),
        read_only: false,
        unmap: true,
    }
}

fn lu() -> LogicalUnit {
    LogicalUnit::new(
        Arc::new(MemDisk::new((BLOCKS * 512) as usize)),
        cfg(),
        PrState::default(),
    )
}

fn n(i: u8) -> ItNexus {
    ItNexus::new(format!("iqn.2026-11.test:init{i},i,0x00023d00000{i}"), 1)
}

fn prout_cdb(sa: u8, kind: u8, len: u32) -> Vec<u8> {
    let mut c = vec![0x5f, sa, kind, 0, 0, 0, 0, 0, 0, 0];
    c[5..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn params(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    p
}

fn prout(lu: &LogicalUnit, who: &ItNexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> Response {
    lu.execute(who, &prout_cdb(sa, kind, 24), &params(key, sa_key, 0))
}

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const PREEMPT_ABORT: u8 = 5;
const REGISTER_IGNORE: u8 = 6;

fn good(r: &Response) {
    assert_eq!(r.status, Status::Good, "{r:?}");
}
fn conflict(r: &Response) {
    assert_eq!(r.status, Status::ReservationConflict, "{r:?}");
    assert_eq!(r.sense, None);
}
fn check(r: &Response, s: Sense) {
    assert_eq!(r.status, Status::CheckCondition, "{r:?}");
    assert_eq!(r.sense, Some(s));
}

fn prin(lu: &LogicalUnit, who: &ItNexus, sa: u8) -> Vec<u8> {
    let r = lu.execute(who, &[0x5e, sa, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
    good(&r);
    r.data
}

fn keys(lu: &LogicalUnit) -> (u32, Vec<u64>) {
    let d = prin(lu, &n(9), 0);
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let keys = d[8..8 + len]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (gen, keys)
}

/// (key, type) from READ RESERVATION.
fn reservation(lu: &LogicalUnit) -> Option<(u64, u8)> {
    let d = prin(lu, &n(9), 1);
    if u32::from_be_bytes(d[4..8].try_into().unwrap()) == 0 {
        return None;
    }
    Some((u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21]))
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}
fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

fn tur(lu: &LogicalUnit, who: &ItNexus) -> Response {
    lu.execute(who, &[0, 0, 0, 0, 0, 0], &[])
}

#[test]
fn register_read_keys_and_generation() {
    let lu = lu();
    assert_eq!(keys(&lu), (0, vec![]));
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 0xaa));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 0xbb));
    assert_eq!(keys(&lu), (2, vec![0xaa, 0xbb]));
    // A registered nexus must give its current key.
    conflict(&prout(&lu, &n(1), REGISTER, 0, 0x99, 0xcc));
    // An unregistered one must give zero.
    conflict(&prout(&lu, &n(3), REGISTER, 0, 0x11, 0xcc));
    // REGISTER AND IGNORE EXISTING KEY ignores it.
    good(&prout(&lu, &n(1), REGISTER_IGNORE, 0, 0x99, 0xcc));
    assert_eq!(keys(&lu), (3, vec![0xcc, 0xbb]));
    // Unregistering with key 0.
    good(&prout(&lu, &n(1), REGISTER, 0, 0xcc, 0));
    assert_eq!(keys(&lu), (4, vec![0xbb]));
    // Nothing to do for an unregistered nexus asking for key 0.
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 0));
    assert_eq!(keys(&lu).0, 4);
}

#[test]
fn read_keys_truncated_keeps_full_length() {
    let lu = lu();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    let r = lu.execute(&n(1), &[0x5e, 0, 0, 0, 0, 0, 0, 0, 12, 0], &[]);
    good(&r);
    assert_eq!(r.data.len(), 12);
    assert_eq!(&r.data[4..8], &16u32.to_be_bytes());
}

#[test]
fn parameter_list_errors() {
    let lu = lu();
    let r = lu.execute(&n(1), &prout_cdb(REGISTER, 0, 23), &params(0, 1, 0));
    check(&r, sense::PARAM_LIST_LENGTH_ERROR);
    assert_eq!((r.sense.unwrap().asc, r.sense.unwrap().ascq), (0x1a, 0x00));
    // Data-out shorter than the parameter list length.
    let r = lu.execute(&n(1), &prout_cdb(REGISTER, 0, 24), &params(0, 1, 0)[..10]);
    check(&r, sense::PARAM_LIST_LENGTH_ERROR);
    // SPEC_I_PT and ALL_TG_PT are not supported.
    let r = lu.execute(&n(1), &prout_cdb(REGISTER, 0, 24), &params(0, 1, 0x08));
    check(&r, sense::INVALID_FIELD_IN_PARAM_LIST);
    let r = lu.execute(&n(1), &prout_cdb(REGISTER, 0, 24), &params(0, 1, 0x04));
    check(&r, sense::INVALID_FIELD_IN_PARAM_LIST);
    assert_eq!(keys(&lu), (0, vec![]));
}

#[test]
fn reserve_needs_registration_and_key() {
    let lu = lu();
    conflict(&prout(&lu, &n(1), RESERVE, 1, 0, 0));
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 0xa));
    conflict(&prout(&lu, &n(1), RESERVE, 1, 0xb, 0));
    // Bad type, bad scope.
    check(
        &prout(&lu, &n(1), RESERVE, 2, 0xa, 0),
        sense::INVALID_FIELD_IN_CDB,
    );
    check(
        &prout(&lu, &n(1), RESERVE, 0x11, 0xa, 0),
        sense::INVALID_FIELD_IN_CDB,
    );
    good(&prout(&lu, &n(1), RESERVE, 1, 0xa, 0));
    assert_eq!(reservation(&lu), Some((0xa, 1)));
    // Same type again is fine, another type conflicts, and so does
    // another registrant.
    good(&prout(&lu, &n(1), RESERVE, 1, 0xa, 0));
    conflict(&prout(&lu, &n(1), RESERVE, 3, 0xa, 0));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 0xb));
    conflict(&prout(&lu, &n(2), RESERVE, 1, 0xb, 0));
    // RESERVE does not change the generation.
    assert_eq!(keys(&lu).0, 2);
}

/// What the SPC-4/SBC-3 tables say, written out per type: (read, write)
/// for a registered non-holder and for an unregistered nexus.
#[test]
fn access_table_per_type() {
    // type, reg read, reg write, unreg read, unreg write
    let table: [(u8, bool, bool, bool, bool); 6] = [
        (1, true, false, true, false),   // Write Exclusive
        (3, false, false, false, false), // Exclusive Access
        (5, true, true, true, false),    // WE registrants only
        (6, true, true, false, false),   // EA registrants only
        (7, true, true, true, false),    // WE all registrants
        (8, true, true, false, false),   // EA all registrants
    ];
    for (kind, rr, rw, ur, uw) in table {
        let lu = lu();
        let (holder, reg, unreg) = (n(1), n(2), n(3));
        good(&prout(&lu, &holder, REGISTER, 0, 0, 1));
        good(&prout(&lu, &reg, REGISTER, 0, 0, 2));
        good(&prout(&lu, &holder, RESERVE, kind, 1, 0));
        let data = vec![0x5a; 512];
        for (who, can_read, can_write) in [(&holder, true, true), (&reg, rr, rw), (&unreg, ur, uw)]
        {
            let r = lu.execute(who, &read10(0, 1), &[]);
            assert_eq!(
                r.status == Status::Good,
                can_read,
                "type {kind} read {who:?} {r:?}"
            );
            if !can_read {
                conflict(&r);
            }
            let w = lu.execute(who, &write10(0, 1), &data);
            assert_eq!(
                w.status == Status::Good,
                can_write,
                "type {kind} write {who:?}"
            );
            if !can_write {
                conflict(&w);
            }
            // START STOP UNIT: starting is allowed, stopping is a write.
            let stop = lu.execute(who, &[0x1b, 0, 0, 0, 0, 0], &[]);
            assert_eq!(
                stop.status == Status::Good,
                can_write,
                "type {kind} stop {who:?}"
            );
            good(&lu.execute(who, &[0x1b, 0, 0, 0, 1, 0], &[]));
            // Allowed whatever the reservation.
            good(&tur(&lu, who));
            good(&lu.execute(who, &[0x12, 0, 0, 0, 36, 0], &[]));
            good(&lu.execute(who, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
            good(&lu.execute(who, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]));
        }
        // Reported with the holder's key, or 0 for all-registrants types.
        let key = if kind >= 7 { 0 } else { 1 };
        assert_eq!(reservation(&lu), Some((key, kind)));
    }
}

#[test]
fn release_semantics_and_unit_attentions() {
    for (kind, ua_expected) in [
        (1u8, false),
        (3, false),
        (5, true),
        (6, true),
        (7, true),
        (8, true),
    ] {
        let lu = lu();
        good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
        good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
        good(&prout(&lu, &n(1), RESERVE, kind, 1, 0));
        if kind < 7 {
            // A non-holder's RELEASE does nothing and succeeds.
            good(&prout(&lu, &n(2), RELEASE, kind, 2, 0));
            assert!(reservation(&lu).is_some());
        }
        // Wrong type from the holder.
        let other = if kind == 1 { 3 } else { 1 };
        check(
            &prout(&lu, &n(1), RELEASE, other, 1, 0),
            sense::INVALID_RELEASE_OF_PR,
        );
        good(&prout(&lu, &n(1), RELEASE, kind, 1, 0));
        assert_eq!(reservation(&lu), None);
        if ua_expected {
            check(&tur(&lu, &n(2)), sense::RESERVATIONS_RELEASED);
        }
        // Reported once, then cleared; none for the releasing nexus.
        good(&tur(&lu, &n(2)));
        good(&tur(&lu, &n(1)));
        // Releasing with no reservation succeeds.
        good(&prout(&lu, &n(1), RELEASE, kind, 1, 0));
    }
}

#[test]
fn clear_removes_everything_and_notifies() {
    let lu = lu();
    for i in 1..=3 {
        good(&prout(&lu, &n(i), REGISTER, 0, 0, u64::from(i)));
    }
    good(&prout(&lu, &n(1), RESERVE, 3, 1, 0));
    conflict(&prout(&lu, &n(4), CLEAR, 0, 0, 0));
    good(&prout(&lu, &n(2), CLEAR, 0, 2, 0));
    assert_eq!(keys(&lu), (4, vec![]));
    assert_eq!(reservation(&lu), None);
    check(&tur(&lu, &n(1)), sense::RESERVATIONS_PREEMPTED);
    check(&tur(&lu, &n(3)), sense::RESERVATIONS_PREEMPTED);
    good(&tur(&lu, &n(2)));
    // REQUEST SENSE reports a pending UA as data and clears it.
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(1), CLEAR, 0, 1, 0));
    let r = lu.execute(&n(2), &[0x03, 0, 0, 0, 18, 0], &[]);
    good(&r);
    assert_eq!((r.data[2], r.data[12], r.data[13]), (0x06, 0x2a, 0x03));
    good(&tur(&lu, &n(2)));
}

#[test]
fn preempt_cases() {
    // No reservation: removes the registrations with that key.
    let lu = lu();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(3), REGISTER, 0, 0, 2));
    check(
        &prout(&lu, &n(1), PREEMPT, 1, 1, 0),
        sense::INVALID_FIELD_IN_PARAM_LIST,
    );
    conflict(&prout(&lu, &n(1), PREEMPT, 1, 1, 7));
    conflict(&prout(&lu, &n(4), PREEMPT, 1, 0, 2));
    good(&prout(&lu, &n(1), PREEMPT, 1, 1, 2));
    assert_eq!(keys(&lu).1, vec![1]);
    assert_eq!(reservation(&lu), None);
    check(&tur(&lu, &n(2)), sense::REGISTRATIONS_PREEMPTED);
    check(&tur(&lu, &n(3)), sense::REGISTRATIONS_PREEMPTED);

    // The holder's key: the reservation moves, with the new type; the
    // remaining registrants hear that the type changed.
    let lu = lu_fresh();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(3), REGISTER, 0, 0, 3));
    good(&prout(&lu, &n(1), RESERVE, 1, 1, 0));
    check(
        &prout(&lu, &n(2), PREEMPT, 3, 2, 0),
        sense::INVALID_FIELD_IN_PARAM_LIST,
    );
    good(&prout(&lu, &n(2), PREEMPT, 3, 2, 1));
    assert_eq!(reservation(&lu), Some((2, 3)));
    assert_eq!(keys(&lu).1, vec![2, 3]);
    check(&tur(&lu, &n(1)), sense::REGISTRATIONS_PREEMPTED);
    check(&tur(&lu, &n(3)), sense::RESERVATIONS_RELEASED);
    // The preempted nexus is locked out now (Exclusive Access).
    conflict(&lu.execute(&n(1), &read10(0, 1), &[]));

    // Another key than the holder's: registrations go, reservation stays.
    let lu = lu_fresh();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(3), REGISTER, 0, 0, 3));
    good(&prout(&lu, &n(1), RESERVE, 1, 1, 0));
    good(&prout(&lu, &n(2), PREEMPT, 1, 2, 3));
    assert_eq!(reservation(&lu), Some((1, 1)));
    assert_eq!(keys(&lu).1, vec![1, 2]);

    // All-registrants with key 0: everyone else goes, the preempter holds
    // a reservation of the new type.
    let lu = lu_fresh();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(1), RESERVE, 8, 1, 0));
    good(&prout(&lu, &n(2), PREEMPT, 1, 2, 0));
    assert_eq!(reservation(&lu), Some((2, 1)));
    assert_eq!(keys(&lu).1, vec![2]);
    check(&tur(&lu, &n(1)), sense::REGISTRATIONS_PREEMPTED);
}

fn lu_fresh() -> LogicalUnit {
    lu()
}

#[test]
fn preempt_and_abort_reports_aborted_nexuses() {
    let lu = lu();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(1), RESERVE, 1, 1, 0));
    let r = prout(&lu, &n(2), PREEMPT_ABORT, 1, 2, 1);
    good(&r);
    assert_eq!(r.aborted, vec![n(1)]);
    let r = prout(&lu, &n(2), PREEMPT, 1, 2, 1);
    conflict(&r);
}

#[test]
fn unregistering_holder_releases() {
    // Registrants-only: released, others told.
    let lu = lu();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(1), RESERVE, 5, 1, 0));
    good(&prout(&lu, &n(1), REGISTER, 0, 1, 0));
    assert_eq!(reservation(&lu), None);
    check(&tur(&lu, &n(2)), sense::RESERVATIONS_RELEASED);
    // All-registrants: stays while a registrant is left.
    let lu = lu_fresh();
    good(&prout(&lu, &n(1), REGISTER, 0, 0, 1));
    good(&prout(&lu, &n(2), REGISTER, 0, 0, 2));
    good(&prout(&lu, &n(1), RESERVE, 7, 1, 0));
    good(&prout(&lu, &n(1), REGISTER, 0, 1, 0));
    assert_eq!(reservation(&lu), Some((0, 7)));
    good(&prout(&lu, &n(2), REGISTER, 0, 2, 0));
    assert_eq!(reservation(&lu), None);
}

#[test]
fn report_capabilities_and_full_status() {
    let lu = lu();
    let d = prin(&lu, &n(1), 2);
    assert_eq!(d, vec![0, 8, 0x01, 0x80, 0xea, 0x01, 0, 0]);
    let r = lu.execute(&n(1), &prout_cdb(REGISTER, 0, 24), &params(0, 5, 0x01));
    good(&r);
    assert!(r.persist.is_some());
    assert_eq!(prin(&lu, &n(1), 2)[3], 0x81); // PTPL_A
    good(&prout(&lu, &n(1), RESERVE, 1, 5, 0));
    let d = prin(&lu, &n(1), 3);
    let add = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(d.len(), 8 + add);
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 5);
    assert_eq!((d[20], d[21]), (0x01, 0x01));
    let tid_len = u32::from_be_bytes(d[28..32].try_into().unwrap()) as usize;
    assert_eq!(&d[32..32 + tid_len], &n(1).transport_id()[..]);
    // Unknown PR IN service action.
    check(
        &lu.execute(&n(1), &[0x5e, 4, 0, 0, 0, 0, 0, 0, 8, 0], &[]),
        sense::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn aptpl_state_survives_a_restart() {
    let lu = lu();
    let r = lu.execute(&n(1), &prout_cdb(REGISTER, 0, 24), &params(0, 0x1234, 0x01));
    let r2 = prout(&lu, &n(1), RESERVE, 3, 0x1234, 0);
    good(&r2);
    let saved = r2.persist.clone().expect("APTPL state to persist");
    assert!(r.persist.is_some());
    let text = serde_json::to_string(&saved).unwrap();
    let back: SavedPr = serde_json::from_str(&text).unwrap();
    let restored = LogicalUnit::new(
        Arc::new(MemDisk::new(1 << 20)),
        cfg(),
        back.restore().unwrap(),
    );
    assert_eq!(reservation(&restored), Some((0x1234, 3)));
    conflict(&restored.execute(&n(2), &read10(0, 1), &[]));
    good(&restored.execute(&n(1), &read10(0, 1), &[]));
    // APTPL cleared by a later REGISTER: the saved state restores empty.
    let r = restored.execute(
        &n(1),
        &prout_cdb(REGISTER, 0, 24),
        &params(0x1234, 0x1234, 0),
    );
    good(&r);
    let saved = r
        .persist
        .expect("the change from APTPL to not is saved too");
    assert_eq!(saved.restore().unwrap(), PrState::default());
    // Without APTPL nothing asks to be saved.
    let r = prout(&restored, &n(2), REGISTER, 0, 0, 9);
    assert!(r.persist.is_none());
    // An unknown version is refused.
    let bad = SavedPr {
        version: 99,
        state: PrState::default(),
    };
    assert!(bad.restore().is_err());
}

#[test]
fn block_commands() {
    let disk = Arc::new(MemDisk::new((BLOCKS * 512) as usize));
    let lu = LogicalUnit::new(disk.clone(), cfg(), PrState::default());
    let me = n(1);
    let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    good(&lu.execute(&me, &write10(10, 2), &data));
    let r = lu.execute(&me, &read10(10, 2), &[]);
    good(&r);
    assert_eq!(r.data, data);
    // Past the end, and ending exactly at it.
    check(
        &lu.execute(&me, &read10(BLOCKS as u32 - 1, 2), &[]),
        sense::LBA_OUT_OF_RANGE,
    );
    good(&lu.execute(&me, &read10(BLOCKS as u32 - 1, 1), &[]));
    check(
        &lu.execute(&me, &write10(BLOCKS as u32, 1), &data),
        sense::LBA_OUT_OF_RANGE,
    );
    // READ(16) with an LBA that would overflow.
    let mut c = vec![0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    c[13] = 1;
    check(&lu.execute(&me, &c, &[]), sense::LBA_OUT_OF_RANGE);
    // The transport expected less than the CDB says: whole blocks land,
    // a cut inside a block is refused.
    good(&lu.execute(&me, &write10(20, 4), &data));
    let r = lu.execute(&me, &read10(20, 4), &[]);
    assert_eq!(&r.data[..1024], &data[..]);
    assert!(r.data[1024..].iter().all(|&b| b == 0));
    check(
        &lu.execute(&me, &write10(30, 4), &data[..600]),
        sense::INVALID_FIELD_IN_IU,
    );
    let r = lu.execute(&me, &read10(30, 2), &[]);
    assert!(r.data.iter().all(|&b| b == 0));
    // FUA flushes.
    let before = disk.flushes();
    let mut c = write10(0, 1);
    c[1] = 0x08;
    good(&lu.execute(&me, &c, &data));
    assert_eq!(disk.flushes(), before + 1);
    good(&lu.execute(&me, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    assert_eq!(disk.flushes(), before + 2);
    // READ CAPACITY.
    let r = lu.execute(&me, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let mut c = vec![0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let r = lu.execute(&me, &c, &[]);
    assert_eq!(r.data.len(), 32);
    assert_eq!(&r.data[0..12], &[0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    assert_eq!(r.data[14] & 0x80, 0x80);
    // UNMAP reads back as zeros.
    let mut p = vec![0u8; 24];
    p[1] = 22;
    p[3] = 16;
    p[8..16].copy_from_slice(&10u64.to_be_bytes());
    p[16..20].copy_from_slice(&1u32.to_be_bytes());
    good(&lu.execute(&me, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p));
    let r = lu.execute(&me, &read10(10, 2), &[]);
    assert!(r.data[..512].iter().all(|&b| b == 0));
    assert_eq!(&r.data[512..], &data[512..]);
    // A malformed CDB.
    check(&lu.execute(&me, &[0xff], &[]), sense::INVALID_OPCODE);
    check(
        &lu.execute(&me, &[0x28, 0, 0], &[]),
        sense::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn read_only_unit() {
    let lu = LogicalUnit::new(
        Arc::new(MemDisk::read_only(1 << 20)),
        cfg(),
        PrState::default(),
    );
    check(
        &lu.execute(&n(1), &write10(0, 1), &[0; 512]),
        sense::WRITE_PROTECTED,
    );
    let r = lu.execute(&n(1), &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]);
    good(&r);
    assert_eq!(r.data[2] & 0x80, 0x80);
}

#[test]
fn inquiry_pages_and_mode_sense() {
    let lu = lu();
    let me = n(1);
    let r = lu.execute(&me, &[0x12, 0, 0, 0, 0xff, 0], &[]);
    assert_eq!(r.data.len(), 96);
    assert_eq!(r.data[4] as usize, 91);
    assert_eq!(&r.data[8..14], b"TANDEM");
    let r = lu.execute(&me, &[0x12, 0, 0, 0, 5, 0], &[]);
    assert_eq!(r.data.len(), 5);
    let r = lu.execute(&me, &[0x12, 1, 0, 0, 0xff, 0], &[]);
    assert_eq!(&r.data[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    for page in [0x80u8, 0x83, 0xb0, 0xb1, 0xb2] {
        let r = lu.execute(&me, &[0x12, 1, page, 0, 0xff, 0], &[]);
        good(&r);
        assert_eq!(r.data[1], page);
        let len = u16::from_be_bytes([r.data[2], r.data[3]]) as usize;
        assert_eq!(r.data.len(), 4 + len);
    }
    check(
        &lu.execute(&me, &[0x12, 1, 0x99, 0, 0xff, 0], &[]),
        sense::INVALID_FIELD_IN_CDB,
    );
    check(
        &lu.execute(&me, &[0x12, 0, 0x80, 0, 0xff, 0], &[]),
        sense::INVALID_FIELD_IN_CDB,
    );
    let r = lu.execute(&me, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]);
    good(&r);
    assert_eq!(r.data[0] as usize, r.data.len() - 1);
    assert_eq!(r.data[2] & 0x10, 0x10);
    assert_eq!(r.data[3], 8);
    let r = lu.execute(&me, &[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 0xff, 0], &[]);
    good(&r);
    assert_eq!(&r.data[8..10], &[0x08, 0x12]);
    check(
        &lu.execute(&me, &[0x1a, 0, 0xc8, 0, 0xff, 0], &[]),
        sense::SAVING_PARAMS_NOT_SUPPORTED,
    );
    check(
        &lu.execute(&me, &[0x1a, 0, 0x19, 0, 0xff, 0], &[]),
        sense::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn target_luns() {
    let mut t = Target::new();
    t.add_lun(0, Arc::new(lu()));
    t.add_lun(3, Arc::new(lu()));
    let me = n(1);
    let r = t.execute(&me, Some(7), &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    good(&r);
    assert_eq!(&r.data[0..4], &16u32.to_be_bytes());
    assert_eq!(&r.data[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&r.data[16..24], &[0, 3, 0, 0, 0, 0, 0, 0]);
    let r = t.execute(&me, Some(7), &[0x12, 0, 0, 0, 36, 0], &[]);
    assert_eq!(r.data[0], 0x7f);
    check(
        &t.execute(&me, Some(7), &[0, 0, 0, 0, 0, 0], &[]),
        sense::LUN_NOT_SUPPORTED,
    );
    check(
        &t.execute(&me, None, &read10(0, 1), &[]),
        sense::LUN_NOT_SUPPORTED,
    );
    good(&t.execute(&me, Some(3), &[0, 0, 0, 0, 0, 0], &[]));
}

/// Records, for each write that lands, a global sequence number and who
/// wrote it (first byte of the buffer).
struct Recording {
    inner: MemDisk,
    seq: AtomicU64,
    log: Mutex<Vec<(u64, u8)>>,
}

impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn writable(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_disk::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_disk::Result<()> {
        // Slow writes widen the race window.
        std::thread::yield_now();
        self.inner.write_at(buf, offset)?;
        let s = self.seq.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((s, buf[0]));
        Ok(())
    }
    fn flush(&self) -> tandem_disk::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> tandem_disk::Result<()> {
        self.inner.discard(offset, len)
    }
}

/// Two initiators race PREEMPT AND ABORT against in-flight writes: no write
/// from the preempted initiator lands after the preempt completes.
#[test]
fn preempt_and_abort_races_writes() {
    for round in 0..20 {
        let disk = Arc::new(Recording {
            inner: MemDisk::new(1 << 20),
            seq: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        let lu = Arc::new(LogicalUnit::new(disk.clone(), cfg(), PrState::default()));
        let (a, b) = (n(1), n(2));
        good(&prout(&lu, &a, REGISTER, 0, 0, 0xa));
        good(&prout(&lu, &b, REGISTER, 0, 0, 0xb));
        good(&prout(&lu, &a, RESERVE, 1, 0xa, 0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|t| {
                let (lu, a, stop) = (lu.clone(), a.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut landed = 0u32;
                    let buf = vec![0xa0 | t as u8; 512];
                    while !stop.load(Ordering::SeqCst) {
                        let r = lu.execute(&a, &write10(t, 1), &buf);
                        match r.status {
                            Status::Good => landed += 1,
                            Status::ReservationConflict => break,
                            // Told once that its registration is gone.
                            Status::CheckCondition
                                if r.sense == Some(sense::REGISTRATIONS_PREEMPTED) => {}
                            _ => panic!("unexpected {r:?}"),
                        }
                    }
                    landed
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(2 + round % 5));
        let r = prout(&lu, &b, PREEMPT_ABORT, 1, 0xb, 0xa);
        good(&r);
        let done_at = disk.seq.load(Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(5));
        stop.store(true, Ordering::SeqCst);
        let landed: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        let log = disk.log.lock().unwrap().clone();
        assert!(landed > 0, "the writers never ran");
        let late: Vec<_> = log
            .iter()
            .filter(|(s, w)| *s >= done_at && w & 0xf0 == 0xa0)
            .collect();
        assert!(
            late.is_empty(),
            "round {round}: writes after the preempt: {late:?}"
        );
        // B holds the reservation and can write.
        good(&lu.execute(&b, &write10(9, 1), &[0xb0; 512]));
    }
}
