//! A hostile tunnel peer: the input is a byte stream of frames. Every
//! frame that decodes re-encodes to the same bytes; the decoded commands
//! (and outcomes, as finishes) drive the server's per-initiator memory,
//! which must never let a command run twice while it runs or after it
//! finished with side effects and was not acknowledged.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use tandem_share::proto::{decode_from, Message, Outcome};
use tandem_share::session::{has_side_effects, Admit, Session, KEEP_DATA_MAX};

fuzz_target!(|data: &[u8]| {
    let mut msgs = Vec::new();
    let mut pos = 0;
    while pos < data.len() && msgs.len() < 128 {
        match decode_from(&data[pos..]) {
            Ok(Some((m, used))) => {
                assert_eq!(m.encode(), data[pos..pos + used].to_vec());
                msgs.push(m);
                pos += used;
            }
            Ok(None) => break,
            Err(_) => pos += 1,
        }
    }
    let mut s = Session::new(1);
    let mut running: BTreeSet<u64> = BTreeSet::new();
    // seq -> whether a replay must not run it again
    let mut finished: BTreeMap<u64, bool> = BTreeMap::new();
    let mut acked = 0u64;
    let mut cdbs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for m in &msgs {
        match m {
            Message::Command(c) => {
                // The acknowledgement applies even to a refused command.
                acked = acked.max(c.acked);
                finished.retain(|k, _| *k > acked);
                let Ok(a) = s.admit(c.seq, c.acked) else {
                    continue;
                };
                if a == Admit::Run {
                    assert!(!running.contains(&c.seq), "ran {} while running", c.seq);
                    assert!(
                        !finished.get(&c.seq).copied().unwrap_or(false),
                        "ran {} twice",
                        c.seq
                    );
                    running.insert(c.seq);
                    cdbs.insert(c.seq, c.cdb.clone());
                }
            }
            Message::Outcome(o) => {
                if running.remove(&o.seq) {
                    let side = has_side_effects(cdbs.get(&o.seq).map_or(&[][..], |v| v));
                    s.finish(
                        &Outcome {
                            replayed: false,
                            ..o.clone()
                        },
                        side,
                    );
                    if o.seq > acked {
                        finished.insert(o.seq, side || o.data.len() <= KEEP_DATA_MAX);
                    }
                }
            }
            _ => {}
        }
    }
});
