//! The file server's executed-command record: any bytes read as a record
//! file never panic, and what parses is rewritten and read back to the
//! same state; the same bytes as a run of commands, acknowledgements, new
//! incarnations and rewrites, killed inside any append, never let a
//! restarted server run a command that may have run
//! (`tandem_share::journal::check_run`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_share::journal::{check_run, encode, parse};

fuzz_target!(|data: &[u8]| {
    for boot in [Some("b1"), None] {
        if let Ok(l) = parse(data, boot) {
            let again: Vec<u8> = l.journal.snapshot(boot).iter().flat_map(encode).collect();
            let back = parse(&again, boot).expect("a rewritten record reads back");
            assert_eq!(back.journal, l.journal);
            assert_eq!(back.bad_lines, 0);
            assert!(!back.torn);
            let _ = l.journal.sessions();
        }
    }
    let ops: Vec<u16> = data
        .chunks_exact(2)
        .take(64)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    check_run(&ops, Some("b1"));
});
