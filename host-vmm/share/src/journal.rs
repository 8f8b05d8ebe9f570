//! The executed-command record of one disk, which makes a command replayed
//! after a *server restart* run at most once (within one run
//! [`crate::session`] does it from memory). Pure: the records, their
//! encoding (JSON lines), the state they describe and what each replayed
//! command gets; `journal_file` reads and writes the file.
//!
//! For every command with side effects ([`has_side_effects`]) the server
//! appends `Intent` **before** the command touches anything, and `Done`
//! with its result after it ran and **before** the result is sent. After
//! a restart, for the incarnation each initiator last began:
//!
//! | what the record holds for the seq | the replay gets |
//! | --- | --- |
//! | `Done`, record trusted, data-in kept | that result, marked replayed; it does not run |
//! | `Intent` only (killed while it ran) | [`unknown_outcome`]: UNIT ATTENTION 29h/00h; it does not run |
//! | `Done`, record not trusted, or data-in not kept | [`unknown_outcome`] |
//! | nothing, or at or below the acknowledgement | it runs (never ran: the intent precedes any effect), or is ignored |
//!
//! The record is *trusted* when its header carries this boot's id and
//! every line read: appends are write(2)s into the page cache, which a
//! process's death keeps and a host crash may not (the data writes they
//! describe are in the same page cache). A cut last line is a write cut by
//! the process's death and is dropped. Reads and the other commands
//! without side effects are not recorded: run again, they change nothing.
//!
//! The record stays small: entries at or below the client's acknowledgement
//! and every entry of an incarnation an initiator left are dropped, and
//! the file is rewritten from [`Journal::snapshot`] once enough was
//! appended.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proto::Outcome;
use crate::session::{has_side_effects, unknown_outcome, Earlier, Session};

/// Version in the header.
pub const JOURNAL_VERSION: u32 = 1;
/// Data-in kept in a `Done` record (REQUEST SENSE's fits); a command with
/// side effects and more data-in is answered as unknown after a restart.
pub const KEEP_DATA: usize = 256;
/// Longest line read; a longer one is corrupt.
pub const MAX_LINE: usize = 8192;
/// Appended records after which the file is rewritten (and only if they
/// are more than twice what is still needed).
pub const COMPACT_AFTER: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("the command record has no header")]
    NoHeader,
    #[error("command record version {0} (this build reads {JOURNAL_VERSION})")]
    Version(u32),
}

/// One line of the file (a format: the header is versioned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "kebab-case")]
pub enum Record {
    /// The first line: written (with fsync) when the file is (re)written.
    Header {
        version: u32,
        /// `/proc/sys/kernel/random/boot_id` when written.
        boot_id: Option<String>,
    },
    /// From now on `initiator` is this incarnation: everything of an
    /// earlier one is forgotten; the client has the results up to `acked`.
    Begin {
        initiator: String,
        incarnation: u64,
        acked: u64,
    },
    /// The command is about to run.
    Intent {
        initiator: String,
        incarnation: u64,
        seq: u64,
    },
    /// The command ran; its result. `data` is `None` when the data-in was
    /// over [`KEEP_DATA`].
    Done {
        initiator: String,
        incarnation: u64,
        seq: u64,
        status: u8,
        sense: Vec<u8>,
        data: Option<Vec<u8>>,
    },
}

/// One line: the record's JSON and a newline.
pub fn encode(r: &Record) -> Vec<u8> {
    // Serializing these types cannot fail (no maps, no floats); an empty
    // line would only be read as a bad line.
    let mut v = serde_json::to_vec(r).unwrap_or_default();
    v.push(b'\n');
    v
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// About to run, or (after a restart) may have run.
    Intent,
    Done {
        status: u8,
        sense: Vec<u8>,
        data: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Track {
    incarnation: u64,
    acked: u64,
    entries: BTreeMap<u64, Entry>,
}

/// What the record says, per initiator: its incarnation, acknowledgement
/// and the commands above it. Live, the server feeds it (each call returns
/// the records to append); after a restart it is rebuilt by [`parse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Journal {
    tracks: BTreeMap<String, Track>,
    /// Records appended since the file was last written whole.
    appended: usize,
}

/// The result of reading a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Not trusted: every `Done` was turned into an `Intent`.
    pub journal: Journal,
    /// Written during this boot, every line read.
    pub trusted: bool,
    /// Lines that did not parse (the cut last line not counted).
    pub bad_lines: usize,
    /// The last line was cut (a write cut by the process's death).
    pub torn: bool,
}

/// Reads a record file. An empty file is a fresh disk; `boot_id` is this
/// boot's (None if unknown: nothing is then trusted).
pub fn parse(bytes: &[u8], boot_id: Option<&str>) -> Result<Loaded, JournalError> {
    if bytes.is_empty() {
        return Ok(Loaded {
            journal: Journal::default(),
            trusted: true,
            bad_lines: 0,
            torn: false,
        });
    }
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // What follows the last newline: empty, or a cut write.
    let torn = lines.pop().is_some_and(|last| !last.is_empty());
    let mut lines = lines.into_iter();
    let header = lines
        .next()
        .filter(|l| l.len() <= MAX_LINE)
        .and_then(|l| serde_json::from_slice::<Record>(l).ok());
    let written_in = match header {
        Some(Record::Header {
            version: JOURNAL_VERSION,
            boot_id,
        }) => boot_id,
        Some(Record::Header { version, .. }) => return Err(JournalError::Version(version)),
        _ => return Err(JournalError::NoHeader),
    };
    let mut j = Journal::default();
    let mut bad_lines = 0;
    for l in lines {
        let r = (l.len() <= MAX_LINE)
            .then(|| serde_json::from_slice::<Record>(l).ok())
            .flatten();
        match r {
            Some(Record::Header { .. }) | None => bad_lines += 1,
            Some(r) => j.apply(&r),
        }
    }
    let trusted = bad_lines == 0 && boot_id.is_some() && written_in.as_deref() == boot_id;
    if !trusted {
        for t in j.tracks.values_mut() {
            for e in t.entries.values_mut() {
                *e = Entry::Intent;
            }
        }
    }
    Ok(Loaded {
        journal: j,
        trusted,
        bad_lines,
        torn,
    })
}

impl Journal {
    fn apply(&mut self, r: &Record) {
        match r {
            Record::Header { .. } => {}
            Record::Begin {
                initiator,
                incarnation,
                acked,
            } => match self.tracks.get_mut(initiator) {
                Some(t) if t.incarnation == *incarnation => t.ack(*acked),
                _ => {
                    self.tracks.insert(
                        initiator.clone(),
                        Track {
                            incarnation: *incarnation,
                            acked: *acked,
                            entries: BTreeMap::new(),
                        },
                    );
                }
            },
            Record::Intent {
                initiator,
                incarnation,
                seq,
            } => {
                let t = self
                    .tracks
                    .entry(initiator.clone())
                    .or_insert_with(|| Track {
                        incarnation: *incarnation,
                        acked: 0,
                        entries: BTreeMap::new(),
                    });
                if t.incarnation == *incarnation && *seq > t.acked {
                    t.entries.insert(*seq, Entry::Intent);
                }
            }
            Record::Done {
                initiator,
                incarnation,
                seq,
                status,
                sense,
                data,
            } => {
                if let Some(t) = self.tracks.get_mut(initiator) {
                    if t.incarnation == *incarnation && *seq > t.acked {
                        t.entries.insert(
                            *seq,
                            Entry::Done {
                                status: *status,
                                sense: sense.clone(),
                                data: data.clone(),
                            },
                        );
                    }
                }
            }
        }
    }

    fn track(&self, initiator: &str, incarnation: u64) -> Option<&Track> {
        self.tracks
            .get(initiator)
            .filter(|t| t.incarnation == incarnation)
    }

    fn record(&mut self, r: Record) -> Record {
        self.apply(&r);
        self.appended += 1;
        r
    }

    /// A client said hello with `incarnation`: a new one forgets the
    /// initiator's earlier commands. The record to append first, if any.
    pub fn begin(&mut self, initiator: &str, incarnation: u64) -> Option<Record> {
        if self.track(initiator, incarnation).is_some() {
            return None;
        }
        Some(self.record(Record::Begin {
            initiator: initiator.to_string(),
            incarnation,
            acked: 0,
        }))
    }

    /// Command `seq` is about to run: the records to append (and reach the
    /// file) before it does. None for a command without side effects, for
    /// an acknowledged one, and for one of an incarnation the initiator
    /// left (a replay of those never comes).
    pub fn intent(
        &mut self,
        initiator: &str,
        incarnation: u64,
        seq: u64,
        cdb: &[u8],
    ) -> Vec<Record> {
        if !has_side_effects(cdb) {
            return Vec::new();
        }
        let mut out = Vec::new();
        match self.tracks.get(initiator) {
            None => out.extend(self.begin(initiator, incarnation)),
            Some(t) if t.incarnation != incarnation || seq <= t.acked => return out,
            Some(_) => {}
        }
        out.push(self.record(Record::Intent {
            initiator: initiator.to_string(),
            incarnation,
            seq,
        }));
        out
    }

    /// The command ran with `outcome`: the record to append before the
    /// result goes out (None if its intent was not recorded).
    pub fn done(&mut self, initiator: &str, incarnation: u64, outcome: &Outcome) -> Option<Record> {
        let t = self.track(initiator, incarnation)?;
        if t.entries.get(&outcome.seq) != Some(&Entry::Intent) {
            return None;
        }
        Some(self.record(Record::Done {
            initiator: initiator.to_string(),
            incarnation,
            seq: outcome.seq,
            status: outcome.status,
            sense: outcome.sense.clone(),
            data: (outcome.data.len() <= KEEP_DATA).then(|| outcome.data.clone()),
        }))
    }

    /// The client has the results up to `acked` (nothing to append: an
    /// acknowledgement lost with the process only keeps entries longer).
    pub fn ack(&mut self, initiator: &str, incarnation: u64, acked: u64) {
        if let Some(t) = self.tracks.get_mut(initiator) {
            if t.incarnation == incarnation {
                t.ack(acked);
            }
        }
    }

    /// Entries still needed, and one per initiator.
    pub fn live(&self) -> usize {
        self.tracks.values().map(|t| 1 + t.entries.len()).sum()
    }

    /// Whether the file should be rewritten from [`Journal::snapshot`].
    pub fn wants_compaction(&self) -> bool {
        self.appended >= COMPACT_AFTER && self.appended > 2 * self.live()
    }

    /// The file was written whole from [`Journal::snapshot`].
    pub fn written(&mut self) {
        self.appended = 0;
    }

    /// Everything still needed, as the lines of a new file (header first).
    pub fn snapshot(&self, boot_id: Option<&str>) -> Vec<Record> {
        let mut out = vec![Record::Header {
            version: JOURNAL_VERSION,
            boot_id: boot_id.map(str::to_string),
        }];
        for (name, t) in &self.tracks {
            out.push(Record::Begin {
                initiator: name.clone(),
                incarnation: t.incarnation,
                acked: t.acked,
            });
            for (seq, e) in &t.entries {
                out.push(match e {
                    Entry::Intent => Record::Intent {
                        initiator: name.clone(),
                        incarnation: t.incarnation,
                        seq: *seq,
                    },
                    Entry::Done {
                        status,
                        sense,
                        data,
                    } => Record::Done {
                        initiator: name.clone(),
                        incarnation: t.incarnation,
                        seq: *seq,
                        status: *status,
                        sense: sense.clone(),
                        data: data.clone(),
                    },
                });
            }
        }
        out
    }

    /// What a restarted server knows, per initiator.
    pub fn restored(&self) -> Vec<Restored> {
        self.tracks
            .iter()
            .map(|(name, t)| Restored {
                initiator: name.clone(),
                incarnation: t.incarnation,
                acked: t.acked,
                earlier: t
                    .entries
                    .iter()
                    .map(|(seq, e)| {
                        let e = match e {
                            Entry::Done {
                                status,
                                sense,
                                data: Some(data),
                            } => Earlier::Finished(Outcome {
                                seq: *seq,
                                status: *status,
                                replayed: true,
                                sense: sense.clone(),
                                data: data.clone(),
                            }),
                            _ => Earlier::Unknown,
                        };
                        (*seq, e)
                    })
                    .collect(),
            })
            .collect()
    }

    /// The sessions a restarted server starts with, one per initiator.
    pub fn sessions(&self) -> Vec<(String, Session)> {
        self.restored()
            .into_iter()
            .map(|r| (r.initiator.clone(), r.session()))
            .collect()
    }

    /// What a replay of `seq` gets right after a restart (the sessions
    /// decide the same; this is the rule in one place for tests and the
    /// fuzz target): `None` means it runs.
    pub fn replay(&self, initiator: &str, incarnation: u64, seq: u64) -> Option<Outcome> {
        let t = self.track(initiator, incarnation)?;
        match t.entries.get(&seq)? {
            Entry::Done {
                status,
                sense,
                data: Some(data),
            } => Some(Outcome {
                seq,
                status: *status,
                replayed: true,
                sense: sense.clone(),
                data: data.clone(),
            }),
            _ => Some(unknown_outcome(seq)),
        }
    }
}

/// One initiator's commands as a restarted server knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub initiator: String,
    pub incarnation: u64,
    pub acked: u64,
    pub earlier: BTreeMap<u64, Earlier>,
}

impl Restored {
    pub fn session(self) -> Session {
        Session::resumed(self.incarnation, self.acked, self.earlier)
    }
}

impl Track {
    fn ack(&mut self, acked: u64) {
        if acked > self.acked {
            self.acked = acked;
            // (The record is read from a file: no overflow at u64::MAX.)
            self.entries = match acked.checked_add(1) {
                Some(above) => self.entries.split_off(&above),
                None => BTreeMap::new(),
            };
        }
    }
}

/// Runs `ops` as a server would (each op drives a [`Journal`] and the
/// records it returns are appended to a file in memory) and checks, for a
/// kill inside or after every append, what a restarted server answers:
/// a command whose intent reached the file (so it may have run) is never
/// run by a replay; one whose Done reached it gets that result (or the
/// unknown answer when `boot` is None, i.e. nothing is trusted); one never
/// recorded runs. Panics on a violation. Shared by the tests and the fuzz
/// target `share_journal`.
pub fn check_run(ops: &[u16], boot: Option<&str>) {
    use std::collections::BTreeSet;
    type Key = (usize, u64, u64);
    let names = ["a", "b"];
    let mut j = Journal::default();
    let mut f: Vec<u8> = j.snapshot(boot).iter().flat_map(encode).collect();
    // None: may have run; Some: its result.
    let mut fate: BTreeMap<Key, Option<u8>> = BTreeMap::new();
    let mut running: BTreeSet<Key> = BTreeSet::new();
    let mut next_seq: BTreeMap<(usize, u64), u64> = BTreeMap::new();
    // Incarnations are never reused: a client starts a new one.
    let mut cur = [0u64; 2];
    let mut next_inc = 1u64;
    let check = |f: &[u8],
                 fate: &BTreeMap<Key, Option<u8>>,
                 next_seq: &BTreeMap<(usize, u64), u64>| {
        let l = match parse(f, boot) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        assert_eq!((l.bad_lines, l.trusted), (0, boot.is_some()));
        for (&(who, inc, seq), got) in fate {
            let Some(t) = l.journal.tracks.get(names[who]) else {
                panic!("{who}/{inc}/{seq}: its intent reached the file, its track is gone")
            };
            // Of an incarnation left behind, or acknowledged: the client
            // never sends it again.
            if t.incarnation != inc || seq <= t.acked {
                continue;
            }
            match (got, l.journal.replay(names[who], inc, seq)) {
                (_, None) => panic!("{who}/{inc}/{seq} may have run; a replay would run it again"),
                (Some(st), Some(o)) if boot.is_some() => {
                    assert_eq!((o.status, o.replayed), (*st, true))
                }
                (_, Some(o)) => assert_eq!(o, unknown_outcome(seq)),
            }
        }
        for (name, t) in &l.journal.tracks {
            let who = usize::from(name == "b");
            let next = next_seq.get(&(who, t.incarnation)).copied().unwrap_or(1);
            for seq in t.acked + 1..next {
                if !fate.contains_key(&(who, t.incarnation, seq)) {
                    assert_eq!(l.journal.replay(name, t.incarnation, seq), None);
                }
            }
        }
    };
    for op in ops {
        let who = usize::from(op & 1);
        let name = names[who];
        let mut rs = Vec::new();
        let mut begin = |rs: &mut Vec<Record>, j: &mut Journal, cur: &mut [u64; 2]| {
            cur[who] = next_inc;
            next_inc += 1;
            rs.extend(j.begin(name, cur[who]));
        };
        match op >> 1 & 7 {
            0..=2 => {
                if cur[who] == 0 {
                    begin(&mut rs, &mut j, &mut cur);
                }
                // Now and then a late command of an incarnation left behind.
                let inc = if op >> 4 & 7 == 0 && cur[who] > 1 {
                    cur[who] - 1
                } else {
                    cur[who]
                };
                let n = next_seq.entry((who, inc)).or_insert(1);
                let seq = *n;
                *n += 1;
                let cdb: &[u8] = if op >> 7 & 3 == 0 { &[0x28] } else { &[0x2a] };
                let got = j.intent(name, inc, seq, cdb);
                if got.iter().any(|r| matches!(r, Record::Intent { .. })) {
                    running.insert((who, inc, seq));
                }
                rs.extend(got);
            }
            3 | 4 => {
                let pick = running
                    .iter()
                    .nth(usize::from(op >> 4) % running.len().max(1))
                    .copied();
                if let Some(k @ (w, i, s)) = pick {
                    running.remove(&k);
                    let o = Outcome {
                        seq: s,
                        status: (op >> 9) as u8 & 0x18,
                        replayed: false,
                        sense: Vec::new(),
                        data: Vec::new(),
                    };
                    rs.extend(j.done(names[w], i, &o));
                }
            }
            5 => {
                let next = next_seq.get(&(who, cur[who])).copied().unwrap_or(1);
                let acked = next.saturating_sub(1 + u64::from(op >> 4 & 3));
                // The client acknowledges only results it has.
                if (1..=acked).all(|s| !running.contains(&(who, cur[who], s))) {
                    j.ack(name, cur[who], acked);
                }
            }
            6 => begin(&mut rs, &mut j, &mut cur),
            _ => {
                if j.wants_compaction() || op >> 4 & 1 == 0 {
                    // Written whole and renamed: the old file or the new.
                    f = j.snapshot(boot).iter().flat_map(encode).collect();
                    j.written();
                    check(&f, &fate, &next_seq);
                }
            }
        }
        for r in rs {
            let line = encode(&r);
            for cut in [0, 1, line.len() - 1] {
                let mut g = f.clone();
                g.extend_from_slice(&line[..cut]);
                check(&g, &fate, &next_seq);
            }
            f.extend_from_slice(&line);
            match r {
                Record::Intent {
                    ref initiator,
                    incarnation,
                    seq,
                } => {
                    fate.insert((usize::from(initiator == "b"), incarnation, seq), None);
                }
                Record::Done {
                    ref initiator,
                    incarnation,
                    seq,
                    status,
                    ..
                } => {
                    fate.insert(
                        (usize::from(initiator == "b"), incarnation, seq),
                        Some(status),
                    );
                }
                _ => {}
            }
            check(&f, &fate, &next_seq);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::session::Admit;

    const BOOT: Option<&str> = Some("b1");
    const WRITE: [u8; 10] = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const READ: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    fn out(seq: u64, status: u8) -> Outcome {
        Outcome {
            seq,
            status,
            replayed: false,
            sense: vec![],
            data: vec![],
        }
    }

    /// A file as the server writes it: a header, then appended lines.
    fn file(j: &mut Journal) -> Vec<u8> {
        j.written();
        j.snapshot(BOOT).iter().flat_map(encode).collect()
    }

    fn append(f: &mut Vec<u8>, rs: impl IntoIterator<Item = Record>) {
        for r in rs {
            f.extend(encode(&r));
        }
    }

    #[test]
    fn each_case_gets_its_answer_after_a_restart() {
        let mut j = Journal::default();
        let mut f = file(&mut j);
        append(&mut f, j.begin("a", 7));
        // 1 finished, 2 was running when the process died, 3 is a read.
        append(&mut f, j.intent("a", 7, 1, &WRITE));
        append(&mut f, j.done("a", 7, &out(1, 0x18)));
        append(&mut f, j.intent("a", 7, 2, &WRITE));
        assert!(j.intent("a", 7, 3, &READ).is_empty());

        let l = parse(&f, BOOT).unwrap();
        assert!(l.trusted && !l.torn && l.bad_lines == 0);
        let r = &l.journal;
        let o = r.replay("a", 7, 1).unwrap();
        assert_eq!((o.status, o.replayed), (0x18, true));
        assert_eq!(r.replay("a", 7, 2), Some(unknown_outcome(2)));
        assert_eq!(r.replay("a", 7, 3), None);
        assert_eq!(r.replay("a", 7, 4), None);
        // Another incarnation's commands are not these.
        assert_eq!(r.replay("a", 8, 1), None);

        let mut sessions = r.sessions();
        let (name, s) = &mut sessions[0];
        assert_eq!((name.as_str(), s.incarnation(), s.last_seq()), ("a", 7, 2));
        assert!(matches!(s.admit(1, 0), Ok(Admit::Replay(o)) if o.status == 0x18));
        assert_eq!(s.admit(2, 0), Ok(Admit::Replay(unknown_outcome(2))));
        assert_eq!(s.admit(3, 0), Ok(Admit::Run));
    }

    #[test]
    fn another_boot_trusts_no_result() {
        let mut j = Journal::default();
        let mut f = file(&mut j);
        append(&mut f, j.intent("a", 7, 1, &WRITE));
        append(&mut f, j.done("a", 7, &out(1, 0)));
        let l = parse(&f, Some("b2")).unwrap();
        assert!(!l.trusted);
        assert_eq!(l.journal.replay("a", 7, 1), Some(unknown_outcome(1)));
        // Nor does an unknown boot id.
        let l = parse(&f, None).unwrap();
        assert_eq!(l.journal.replay("a", 7, 1), Some(unknown_outcome(1)));
        // Rewritten under the new boot, it still says unknown.
        let mut j = l.journal;
        let f = file(&mut j);
        let l = parse(&f, BOOT).unwrap();
        assert!(l.trusted);
        assert_eq!(l.journal.replay("a", 7, 1), Some(unknown_outcome(1)));
    }

    #[test]
    fn a_cut_last_line_is_dropped_and_a_bad_line_trusts_nothing() {
        let mut j = Journal::default();
        let mut f = file(&mut j);
        append(&mut f, j.intent("a", 7, 1, &WRITE));
        let whole = f.len();
        append(&mut f, j.done("a", 7, &out(1, 0)));
        // The Done write was cut: the intent stands.
        let l = parse(&f[..f.len() - 3], BOOT).unwrap();
        assert!(l.torn && l.trusted);
        assert_eq!(l.journal.replay("a", 7, 1), Some(unknown_outcome(1)));
        // Cut right after the intent's newline: nothing torn.
        assert!(!parse(&f[..whole], BOOT).unwrap().torn);
        // Garbage inside: nothing is trusted.
        let mut g = f[..whole].to_vec();
        g.extend_from_slice(b"{garbage\n");
        append(&mut g, j.intent("a", 7, 2, &WRITE));
        let l = parse(&g, BOOT).unwrap();
        assert_eq!((l.trusted, l.bad_lines), (false, 1));
        assert_eq!(l.journal.replay("a", 7, 2), Some(unknown_outcome(2)));
        // No header, or another version: an error, not a guess.
        assert_eq!(parse(b"{}\n", BOOT), Err(JournalError::NoHeader));
        let v2 = encode(&Record::Header {
            version: 2,
            boot_id: None,
        });
        assert_eq!(parse(&v2, BOOT), Err(JournalError::Version(2)));
        // Hostile numbers: no overflow.
        let mut h = file(&mut Journal::default());
        append(
            &mut h,
            [
                Record::Intent {
                    initiator: "a".into(),
                    incarnation: 1,
                    seq: u64::MAX,
                },
                Record::Begin {
                    initiator: "a".into(),
                    incarnation: 1,
                    acked: u64::MAX,
                },
            ],
        );
        assert_eq!(parse(&h, BOOT).unwrap().journal.live(), 1);
        assert!(parse(b"", BOOT).unwrap().trusted);
    }

    #[test]
    fn acknowledgements_and_new_incarnations_bound_the_record() {
        let mut j = Journal::default();
        for seq in 1..=COMPACT_AFTER as u64 {
            j.intent("a", 7, seq, &WRITE);
            j.done("a", 7, &out(seq, 0));
            j.ack("a", 7, seq.saturating_sub(4));
        }
        assert!(j.live() <= 6);
        assert!(j.wants_compaction());
        let f = file(&mut j);
        assert!(!j.wants_compaction());
        let l = parse(&f, BOOT).unwrap();
        assert_eq!(l.journal, j);
        // Acknowledged: not in the record; the session ignores it.
        assert_eq!(l.journal.replay("a", 7, 1), None);
        let mut sessions = l.journal.sessions();
        assert_eq!(sessions[0].1.admit(1, 0), Ok(Admit::Stale));
        // A new incarnation forgets the old one's, and a late intent of the
        // old one is not recorded.
        assert!(j.begin("a", 8).is_some());
        assert!(j.begin("a", 8).is_none());
        assert_eq!(j.live(), 1);
        assert!(j.intent("a", 7, 5000, &WRITE).is_empty());
        assert!(j.done("a", 7, &out(5000, 0)).is_none());
        // An intent at or below the acknowledgement is not recorded.
        j.ack("a", 8, 3);
        assert!(j.intent("a", 8, 3, &WRITE).is_empty());
    }

    #[test]
    fn big_data_in_is_not_kept() {
        let mut j = Journal::default();
        j.intent("a", 7, 1, &[0x03, 0, 0, 0, 252, 0]);
        let mut o = out(1, 0);
        o.data = vec![1; KEEP_DATA + 1];
        assert!(matches!(
            j.done("a", 7, &o),
            Some(Record::Done { data: None, .. })
        ));
        assert_eq!(j.replay("a", 7, 1), Some(unknown_outcome(1)));
        o.data.truncate(KEEP_DATA);
        j.intent("a", 7, 2, &[0x03, 0, 0, 0, 252, 0]);
        o.seq = 2;
        j.done("a", 7, &o);
        assert_eq!(j.replay("a", 7, 2).map(|o| o.data.len()), Some(KEEP_DATA));
    }

    /// The property, over random runs killed inside any append: every
    /// command whose intent reached the file (so it may have run) is never
    /// run again by a replay; one whose Done reached it gets that result;
    /// one never recorded runs.
    #[test]
    fn a_kill_inside_any_append_never_runs_a_command_twice() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let ops: Vec<u16> = (0..60)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u16
                })
                .collect();
            check_run(&ops, BOOT);
            check_run(&ops[..20], None);
        }
    }
}
