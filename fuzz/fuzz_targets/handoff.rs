//! The handoff core (multi-path switching), driven by arbitrary sequences
//! of submissions, completions in any order and with any outcome, switches,
//! direct-path arrivals, orderly releases and losses. Checks that no request is in flight on
//! two paths, nothing is dispatched on one path while the other is busy,
//! and that once everything is answered every request completed exactly
//! once.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use shared_abi::handoff::{Action, Actions, Handoff, Op, Outcome, Path};

const N: usize = 8;

fuzz_target!(|data: &[u8]| {
    let mut h: Handoff<N> = Handoff::new();
    let mut a: Actions<{ N + 3 }> = Actions::default();
    let mut inflight: [Vec<(Option<u64>, u32)>; 2] = [Vec::new(), Vec::new()];
    let mut submitted = BTreeSet::new();
    let mut done = BTreeSet::new();
    let mut next = 1u64;
    let mut now = 0u64;
    let mut bytes = data.iter().copied();
    let apply = |a: &Actions<{ N + 3 }>,
                 h: &Handoff<N>,
                 inflight: &mut [Vec<(Option<u64>, u32)>; 2],
                 done: &mut BTreeSet<u64>| {
        if !h.direct_present() {
            // A lost path's requests never complete (or do, stale: the
            // core ignores those; see the unit tests).
            inflight[1].clear();
        }
        for act in a.iter() {
            match act {
                Action::Dispatch { id, path, issue } => {
                    assert!(inflight
                        .iter()
                        .all(|p| p.iter().all(|(i, _)| *i != Some(id))));
                    // The drain barrier: no application request on the
                    // other path (a barrier flush, which carries no data,
                    // may still run there).
                    assert!(inflight[1 - path as usize].iter().all(|(i, _)| i.is_none()));
                    assert!(path == Path::Synthetic || h.direct_present());
                    inflight[path as usize].push((Some(id), issue));
                }
                Action::Barrier { path, issue } => inflight[path as usize].push((None, issue)),
                Action::Complete { id, .. } => assert!(done.insert(id)),
                Action::Switched { .. } => {}
            }
        }
    };
    while let Some(b) = bytes.next() {
        now += u64::from(b >> 4);
        a.clear();
        match b & 7 {
            0 | 1 => {
                let op = [Op::Read, Op::Write, Op::Flush][usize::from(b >> 3) % 3];
                if h.submit(next, op, now, &mut a).is_ok() {
                    submitted.insert(next);
                }
                next += 1;
            }
            2 | 3 => {
                let p = usize::from(b >> 3) & 1;
                if !inflight[p].is_empty() {
                    let i = usize::from(bytes.next().unwrap_or(0)) % inflight[p].len();
                    let (id, issue) = inflight[p].remove(i);
                    let outcome = if b & 0x80 != 0 {
                        Outcome::Error(-5)
                    } else {
                        Outcome::Ok
                    };
                    match id {
                        Some(id) => h.complete(id, issue, outcome, now, &mut a),
                        None => h.barrier_done(issue, outcome, now, &mut a),
                    }
                }
            }
            4 if b & 0x40 != 0 => {
                // An orderly release is refused while the path is in use.
                let busy = h.active() == Path::Direct
                    || h.switching_to() == Some(Path::Direct)
                    || h.in_flight(Path::Direct) > 0
                    || h.barrier_on() == Some(Path::Direct);
                assert_eq!(h.direct_released().is_err(), busy);
            }
            4 => h.direct_added(),
            5 => {
                let to = if b & 0x10 != 0 {
                    Path::Direct
                } else {
                    Path::Synthetic
                };
                let _ = h.switch_to(to, now, &mut a);
            }
            6 => h.path_lost(Path::Direct, now, &mut a),
            _ => {
                // A completion for something that is not in flight.
                h.complete(
                    u64::MAX - u64::from(b),
                    u32::from(b),
                    Outcome::Ok,
                    now,
                    &mut a,
                );
            }
        }
        apply(&a, &h, &mut inflight, &mut done);
    }
    // Answer everything (synthetic path never fails now).
    for _ in 0..10_000 {
        a.clear();
        let p = usize::from(inflight[0].is_empty());
        let Some((id, issue)) = inflight[p].pop() else {
            break;
        };
        match id {
            Some(id) => h.complete(id, issue, Outcome::Ok, now, &mut a),
            None => h.barrier_done(issue, Outcome::Ok, now, &mut a),
        }
        apply(&a, &h, &mut inflight, &mut done);
    }
    assert_eq!(done, submitted);
});
