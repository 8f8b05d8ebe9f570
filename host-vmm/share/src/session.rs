//! The server's memory of one initiator's commands, which is what makes a
//! replayed command run at most once: per incarnation of the client, the
//! sequence numbers seen, the ones still running and the results not yet
//! acknowledged. Pure; the server feeds it commands and results. After a
//! server restart it is rebuilt from the executed-command record
//! ([`crate::journal`]), which may also say "this one may or may not have
//! run": such a command is answered with [`unknown_outcome`], never run.

use std::collections::{BTreeMap, BTreeSet};

use tandem_scsi::sense;

use crate::proto::{Outcome, WINDOW};

/// Data-in above this size is not kept for a replay of a command without
/// side effects (a READ): the replay runs it again, which changes nothing.
pub const KEEP_DATA_MAX: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("command {seq} is beyond the window ({WINDOW} after the acknowledged {acked})")]
    Window { seq: u64, acked: u64 },
}

/// What to do with an arriving command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// New: run it, then call [`Session::finish`].
    Run,
    /// Already ran: send this result again (marked replayed).
    Replay(Outcome),
    /// Already running (a replay raced its first run): its result goes out
    /// when it finishes.
    Running,
    /// The client acknowledged this one's result already: ignore it.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Done {
    Kept(Outcome),
    /// A command without side effects whose data was too big to keep.
    RunAgain,
    /// A command an earlier server run may or may not have run: it is
    /// answered with [`unknown_outcome`] and never runs.
    Unknown,
}

/// The answer to a command whose fate a server restart hid (the record
/// says it was about to run, not that it finished): CHECK CONDITION, UNIT
/// ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED, as a real
/// device answers after losing power with commands in flight. The command
/// did not run now; the initiator decides (Linux retries it as a new
/// command).
pub fn unknown_outcome(seq: u64) -> Outcome {
    Outcome {
        seq,
        status: 0x02,
        replayed: true,
        sense: sense::POWER_ON_RESET.to_fixed().to_vec(),
        data: Vec::new(),
    }
}

/// What an earlier server run left known about one command, for
/// [`Session::resumed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Earlier {
    /// It finished with this result (data-in included).
    Finished(Outcome),
    /// It may or may not have run.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    incarnation: u64,
    acked: u64,
    last_seq: u64,
    running: BTreeSet<u64>,
    done: BTreeMap<u64, Done>,
}

/// Whether a CDB's command changes anything (medium, reservations, mode,
/// unit attentions): those results are always kept for a replay. The list
/// is of commands known to change nothing; anything else counts as a
/// change.
pub fn has_side_effects(cdb: &[u8]) -> bool {
    match cdb.first() {
        // TEST UNIT READY, INQUIRY, MODE SENSE(6/10), READ CAPACITY(10),
        // READ(6/10/12/16), PERSISTENT RESERVE IN, REPORT LUNS.
        Some(0x00 | 0x12 | 0x1a | 0x5a | 0x25 | 0x08 | 0x28 | 0xa8 | 0x88 | 0x5e | 0xa0) => false,
        // SERVICE ACTION IN(16): READ CAPACITY(16); MAINTENANCE IN:
        // REPORT SUPPORTED OPCODES.
        Some(0x9e | 0xa3) => false,
        _ => true,
    }
}

impl Session {
    pub fn new(incarnation: u64) -> Session {
        Session {
            incarnation,
            acked: 0,
            last_seq: 0,
            running: BTreeSet::new(),
            done: BTreeMap::new(),
        }
    }

    /// A session restored after a server restart from the last PERSISTENT
    /// RESERVE OUT result saved for this initiator.
    pub fn restored(incarnation: u64, seq: u64, outcome: Outcome) -> Session {
        Session::resumed(incarnation, 0, [(seq, Earlier::Finished(outcome))])
    }

    /// A session rebuilt after a server restart: the client had the
    /// results up to `acked`; `earlier` is what the record knows of the
    /// commands above. A command it does not name never ran (or has no
    /// side effects) and runs when it arrives.
    pub fn resumed(
        incarnation: u64,
        acked: u64,
        earlier: impl IntoIterator<Item = (u64, Earlier)>,
    ) -> Session {
        let mut s = Session::new(incarnation);
        s.acked = acked;
        s.last_seq = acked;
        for (seq, e) in earlier {
            if seq <= acked {
                continue;
            }
            s.last_seq = s.last_seq.max(seq);
            s.done.insert(
                seq,
                match e {
                    Earlier::Finished(o) => Done::Kept(Outcome { seq, ..o }),
                    Earlier::Unknown => Done::Unknown,
                },
            );
        }
        s
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The highest sequence number seen.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Commands running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Results kept for a replay.
    pub fn kept(&self) -> usize {
        self.done.len()
    }

    /// Takes in command `seq` carrying the client's acknowledgement `acked`.
    pub fn admit(&mut self, seq: u64, acked: u64) -> Result<Admit, SessionError> {
        if acked > self.acked {
            self.acked = acked;
            // Everything at or below the acknowledgement is forgotten.
            self.done = self.done.split_off(&(acked + 1));
        }
        if seq > self.acked.saturating_add(WINDOW) {
            return Err(SessionError::Window {
                seq,
                acked: self.acked,
            });
        }
        if seq <= self.acked {
            return Ok(Admit::Stale);
        }
        if self.running.contains(&seq) {
            return Ok(Admit::Running);
        }
        match self.done.get(&seq) {
            Some(Done::Kept(o)) => {
                return Ok(Admit::Replay(Outcome {
                    replayed: true,
                    ..o.clone()
                }))
            }
            Some(Done::Unknown) => return Ok(Admit::Replay(unknown_outcome(seq))),
            Some(Done::RunAgain) => {}
            None => {}
        }
        self.done.remove(&seq);
        self.running.insert(seq);
        self.last_seq = self.last_seq.max(seq);
        Ok(Admit::Run)
    }

    /// Records the result of a command admitted with [`Admit::Run`];
    /// `side_effects` from [`has_side_effects`].
    pub fn finish(&mut self, outcome: &Outcome, side_effects: bool) {
        let seq = outcome.seq;
        if !self.running.remove(&seq) || seq <= self.acked {
            return;
        }
        let keep = side_effects || outcome.data.len() <= KEEP_DATA_MAX;
        self.done.insert(
            seq,
            if keep {
                Done::Kept(outcome.clone())
            } else {
                Done::RunAgain
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(seq: u64, data: usize) -> Outcome {
        Outcome {
            seq,
            status: 0,
            replayed: false,
            sense: vec![],
            data: vec![7; data],
        }
    }

    #[test]
    fn a_replayed_command_runs_once() {
        let mut s = Session::new(1);
        assert_eq!(s.admit(1, 0), Ok(Admit::Run));
        // The replay arrives while the first run is going on.
        assert_eq!(s.admit(1, 0), Ok(Admit::Running));
        s.finish(&out(1, 0), true);
        match s.admit(1, 0) {
            Ok(Admit::Replay(o)) => assert!(o.replayed && o.seq == 1),
            other => panic!("{other:?}"),
        }
        // Acknowledged: forgotten, and a late duplicate is ignored.
        assert_eq!(s.admit(2, 1), Ok(Admit::Run));
        assert_eq!(s.kept(), 0);
        assert_eq!(s.admit(1, 1), Ok(Admit::Stale));
        assert_eq!(s.last_seq(), 2);
    }

    #[test]
    fn big_reads_run_again_writes_never() {
        let mut s = Session::new(1);
        assert_eq!(s.admit(1, 0), Ok(Admit::Run));
        assert_eq!(s.admit(2, 0), Ok(Admit::Run));
        s.finish(&out(1, 65536), false);
        s.finish(&out(2, 0), true);
        assert_eq!(s.admit(1, 0), Ok(Admit::Run));
        assert!(matches!(s.admit(2, 0), Ok(Admit::Replay(_))));
        assert!(has_side_effects(&[0x2a]));
        assert!(has_side_effects(&[0x5f]));
        assert!(has_side_effects(&[0x03]));
        assert!(!has_side_effects(&[0x28]));
    }

    #[test]
    fn the_window_bounds_what_is_kept() {
        let mut s = Session::new(1);
        assert!(s.admit(WINDOW + 1, 0).is_err());
        assert_eq!(s.admit(WINDOW, 0), Ok(Admit::Run));
        assert_eq!(s.admit(WINDOW + 5, 5), Ok(Admit::Run));
    }

    #[test]
    fn a_restored_session_replays_its_last_reservation_command() {
        let mut s = Session::restored(9, 40, out(40, 0));
        assert_eq!(s.incarnation(), 9);
        // Earlier unacknowledged commands are unknown: they run.
        assert_eq!(s.admit(38, 37), Ok(Admit::Run));
        assert!(matches!(s.admit(40, 37), Ok(Admit::Replay(_))));
        assert_eq!(s.admit(41, 37), Ok(Admit::Run));
    }

    #[test]
    fn a_resumed_session_never_runs_what_may_have_run() {
        let mut s = Session::resumed(
            3,
            10,
            [
                (9, Earlier::Unknown),
                (11, Earlier::Finished(out(11, 0))),
                (12, Earlier::Unknown),
            ],
        );
        assert_eq!(s.last_seq(), 12);
        assert_eq!(s.admit(9, 10), Ok(Admit::Stale));
        match s.admit(11, 10) {
            Ok(Admit::Replay(o)) => assert!(o.replayed && o.seq == 11 && o.status == 0),
            other => panic!("{other:?}"),
        }
        // Again and again: the same clean failure, never a run.
        for _ in 0..2 {
            match s.admit(12, 10) {
                Ok(Admit::Replay(o)) => {
                    assert_eq!(o, unknown_outcome(12));
                    assert_eq!((o.status, o.sense[2], o.sense[12]), (2, 6, 0x29));
                }
                other => panic!("{other:?}"),
            }
        }
        // Not named: never ran.
        assert_eq!(s.admit(13, 10), Ok(Admit::Run));
        // Acknowledged: forgotten.
        assert_eq!(s.admit(14, 12), Ok(Admit::Run));
        assert_eq!(s.kept(), 0);
    }
}
