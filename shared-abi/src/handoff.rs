//! The handoff core: moving a block device's I/O from one path to another
//! (F4, F1) without losing, failing, duplicating or reordering any of it.
//!
//! A multi-path device has a **synthetic** path (virtio-blk, always there,
//! migratable) and at times a **direct** one (an assigned NVMe function on
//! the same storage). This state machine decides where each application
//! request goes; the caller (the guest module's block driver, or the host's
//! volume client, `tandem_volume::RemoteVolume`, whose paths are a lender
//! process's connection and the volume by its name) does the I/O and
//! reports completions. It is pure: no I/O, no allocation, no clock (the
//! caller passes microseconds), fixed capacity.
//! It lives in `shared-abi` because the guest module and the host must run
//! the very same rules, and this crate is the one source both compile.
//!
//! The rules:
//! - **Steady**: new requests go to the active path.
//! - **Switch** (asked for, or the direct path arrived): new requests are
//!   *parked* in a holding queue; requests already on the old path
//!   complete there (the drain barrier); then the parked requests are
//!   *replayed* on the new path in the order they arrived. If the old path
//!   completed writes since its last flush, a flush of ours (a *barrier*)
//!   runs on it at the same time, so that a later flush means what it says:
//!   application flushes wait for the barrier (they are held until it
//!   completes), reads and writes do not. A barrier carries no data, so
//!   running it beside the new path's requests reorders nothing; and the
//!   switch costs the drain, not a cache flush of the old device.
//! - **Loss** (surprise removal, or any error from the direct path): the
//!   requests in flight on it are parked again, ahead of the ones that
//!   arrived later (they were submitted first), and re-issued exactly once
//!   on the synthetic path; completions that still arrive from the lost
//!   path are stale and ignored. If the lost path had unflushed writes,
//!   the barrier runs on the new path (the storage behind both is the same;
//!   that is what makes this a failover and not a data loss).
//! - Applications see an error only when the synthetic path itself fails a
//!   request: there is no path left to try.
//!
//! Per block, order is kept because nothing is dispatched on the new path
//! while anything is in flight on the old one (unless the old one is lost,
//! in which case its requests are re-issued before anything newer).

/// One of the two paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    Synthetic = 0,
    Direct = 1,
}

impl Path {
    const fn index(self) -> usize {
        self as usize
    }

    pub const fn name(self) -> &'static str {
        match self {
            Path::Synthetic => "synthetic",
            Path::Direct => "direct",
        }
    }
}

/// What a request does, as far as the handoff cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    /// Writes, write-zeroes, discards: anything a flush must make durable.
    Write,
    Flush,
}

/// The outcome of a request on a path, or for the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An error with the caller's code (for Linux, a negative errno).
    Error(i32),
}

/// What the caller must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send application request `id` to `path`; report its completion
    /// with this `issue` number.
    Dispatch { id: u64, path: Path, issue: u32 },
    /// Send a flush of the handoff's own to `path`; report it with
    /// [`Handoff::barrier_done`] and this `issue`.
    Barrier { path: Path, issue: u32 },
    /// Complete application request `id`.
    Complete { id: u64, outcome: Outcome },
    /// A switch finished: I/O now goes to `to`.
    Switched {
        from: Path,
        to: Path,
        /// Requests that waited in the holding queue.
        parked: u32,
        /// Of those, requests that had been on a lost path and were re-issued.
        reissued: u32,
        /// How long new I/O was held, in microseconds (application flushes
        /// may wait longer, for the barrier).
        blackout_us: u64,
    },
}

/// The actions of one call, in order. `M` must be at least the handoff's
/// capacity plus 3 (a replay dispatches every parked request).
#[derive(Debug)]
pub struct Actions<const M: usize> {
    items: [Option<Action>; M],
    len: usize,
}

impl<const M: usize> Default for Actions<M> {
    fn default() -> Self {
        Actions {
            items: [None; M],
            len: 0,
        }
    }
}

impl<const M: usize> Actions<M> {
    /// An empty list (a `const fn`, so that a large one can be placed
    /// straight into memory that is not the stack).
    pub const fn new() -> Self {
        Actions {
            items: [None; M],
            len: 0,
        }
    }

    fn push(&mut self, a: Action) {
        // The capacity rule (M >= N + 3) makes this always fit; a caller
        // that breaks it loses actions, which its tests would show.
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = Some(a);
            self.len += 1;
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = Action> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }
}

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffError {
    /// More requests outstanding than the handoff holds.
    Full,
    /// The application id is already outstanding.
    DuplicateId,
    /// The direct path is not there.
    NoDirectPath,
    /// The direct path is still in use (I/O goes to it, or requests or a
    /// barrier are in flight on it).
    Busy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Steady,
    /// Waiting for the old path's in-flight requests.
    Draining {
        from: Path,
        to: Path,
    },
}

/// A barrier flush in flight: application flushes wait for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    on: Path,
    issue: u32,
    /// The write count of `on` it covers, and its dispatch number.
    mark: (u64, u64),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: u64,
    op: Op,
    /// Arrival order.
    seq: u64,
    /// Where it is in flight (`None`: parked).
    path: Option<Path>,
    issue: u32,
    /// It was in flight on a path that was lost.
    reissue: bool,
}

/// Counters, for the caller's reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub dispatched: u64,
    pub completed: u64,
    pub errors_to_app: u64,
    pub switches: u64,
    pub losses: u64,
    pub reissued: u64,
    pub stale_completions: u64,
    pub barriers: u64,
    pub barrier_errors: u64,
    pub max_blackout_us: u64,
}

/// The handoff state of one multi-path device; `N` bounds the application
/// requests outstanding at once (in flight or parked).
#[derive(Clone, Debug)]
pub struct Handoff<const N: usize> {
    entries: [Option<Entry>; N],
    active: Path,
    direct_present: bool,
    phase: Phase,
    /// A lost direct path had unflushed writes: a synthetic flush
    /// dispatched after the loss (`lost_at`, a dispatch number) must
    /// complete before a later flush may be acknowledged as covering them.
    lost_dirty: bool,
    lost_at: u64,
    /// Counts every dispatch, barriers included (flush ordering).
    dispatch_no: u64,
    /// Writes completed per path, and how many of them a flush covered.
    writes_done: [u64; 2],
    flushed: [u64; 2],
    /// Per in-flight flush (by entry index): the write count of its path it
    /// covers, and its dispatch number.
    flush_marks: [(u64, u64); N],
    barrier: Option<Pending>,
    next_issue: u32,
    next_seq: u64,
    parked_since_us: Option<u64>,
    pub stats: Stats,
}

impl<const N: usize> Default for Handoff<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Handoff<N> {
    /// A device on its synthetic path alone.
    pub const fn new() -> Self {
        Handoff {
            entries: [None; N],
            active: Path::Synthetic,
            direct_present: false,
            phase: Phase::Steady,
            lost_dirty: false,
            lost_at: 0,
            dispatch_no: 0,
            writes_done: [0; 2],
            flushed: [0; 2],
            flush_marks: [(0, 0); N],
            barrier: None,
            next_issue: 1,
            next_seq: 0,
            parked_since_us: None,
            stats: Stats {
                dispatched: 0,
                completed: 0,
                errors_to_app: 0,
                switches: 0,
                losses: 0,
                reissued: 0,
                stale_completions: 0,
                barriers: 0,
                barrier_errors: 0,
                max_blackout_us: 0,
            },
        }
    }

    /// Where new requests go once no switch is in progress.
    pub fn active(&self) -> Path {
        self.active
    }

    /// The path a switch in progress is moving to, if any.
    pub fn switching_to(&self) -> Option<Path> {
        match self.phase {
            Phase::Steady => None,
            Phase::Draining { to, .. } => Some(to),
        }
    }

    pub fn direct_present(&self) -> bool {
        self.direct_present
    }

    /// Requests in flight on `path`.
    pub fn in_flight(&self, path: Path) -> usize {
        self.entries
            .iter()
            .flatten()
            .filter(|e| e.path == Some(path))
            .count()
    }

    /// Requests in the holding queue.
    pub fn parked(&self) -> usize {
        self.entries
            .iter()
            .flatten()
            .filter(|e| e.path.is_none())
            .count()
    }

    fn issue(&mut self) -> u32 {
        let i = self.next_issue;
        self.next_issue = self.next_issue.wrapping_add(1).max(1);
        i
    }

    fn dispatch<const M: usize>(&mut self, idx: usize, path: Path, out: &mut Actions<M>) {
        let issue = self.issue();
        let mark = self.writes_done[path.index()];
        if let Some(e) = self.entries[idx].as_mut() {
            e.path = Some(path);
            e.issue = issue;
            self.stats.dispatched += 1;
            self.dispatch_no += 1;
            if e.op == Op::Flush {
                self.flush_marks[idx] = (mark, self.dispatch_no);
            }
            out.push(Action::Dispatch {
                id: e.id,
                path,
                issue,
            });
        }
    }

    /// A new application request.
    pub fn submit<const M: usize>(
        &mut self,
        id: u64,
        op: Op,
        now_us: u64,
        out: &mut Actions<M>,
    ) -> Result<(), HandoffError> {
        if self.entries.iter().flatten().any(|e| e.id == id) {
            return Err(HandoffError::DuplicateId);
        }
        let idx = self
            .entries
            .iter()
            .position(Option::is_none)
            .ok_or(HandoffError::Full)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries[idx] = Some(Entry {
            id,
            op,
            seq,
            path: None,
            issue: 0,
            reissue: false,
        });
        if self.phase != Phase::Steady {
            if self.parked_since_us.is_none() {
                self.parked_since_us = Some(now_us);
            }
        } else if !(op == Op::Flush && self.barrier.is_some()) {
            self.dispatch(idx, self.active, out);
        }
        // Else a flush held until the barrier completes.
        Ok(())
    }

    /// The direct path arrived (its stack is built). The caller decides
    /// whether to [`Handoff::switch_to`] it.
    pub fn direct_added(&mut self) {
        self.direct_present = true;
    }

    /// The barrier flush in flight, if any, and its path.
    pub fn barrier_on(&self) -> Option<Path> {
        self.barrier.map(|b| b.on)
    }

    /// The direct path goes away in an orderly way (after a switch off it,
    /// once nothing is in flight on it): not a loss, nothing to re-issue.
    pub fn direct_released(&mut self) -> Result<(), HandoffError> {
        let busy = self.active == Path::Direct
            || self.switching_to() == Some(Path::Direct)
            || self.in_flight(Path::Direct) > 0
            || self.barrier_on() == Some(Path::Direct);
        if busy {
            return Err(HandoffError::Busy);
        }
        self.direct_present = false;
        Ok(())
    }

    /// Starts moving I/O to `to`. Asking for the path I/O is already on
    /// (or already moving to) does nothing.
    pub fn switch_to<const M: usize>(
        &mut self,
        to: Path,
        now_us: u64,
        out: &mut Actions<M>,
    ) -> Result<(), HandoffError> {
        if to == Path::Direct && !self.direct_present {
            return Err(HandoffError::NoDirectPath);
        }
        match self.phase {
            Phase::Steady if self.active == to => return Ok(()),
            Phase::Steady => {
                self.phase = Phase::Draining {
                    from: self.active,
                    to,
                };
                self.parked_since_us = None;
            }
            Phase::Draining { to: t, .. } if t == to => {
                return Ok(());
            }
            Phase::Draining { from, .. } => self.phase = Phase::Draining { from, to },
        }
        self.progress(now_us, out);
        Ok(())
    }

    /// The path is gone (surprise removal, or the caller saw it fail):
    /// what was in flight on it is re-issued on the synthetic path.
    pub fn path_lost<const M: usize>(&mut self, path: Path, now_us: u64, out: &mut Actions<M>) {
        if path == Path::Synthetic {
            // There is nothing to fall back to; errors reach the
            // application as they come.
            return;
        }
        let was_present = self.direct_present;
        self.direct_present = false;
        let mut moved = 0u64;
        for e in self.entries.iter_mut().flatten() {
            if e.path == Some(Path::Direct) {
                e.path = None;
                e.reissue = true;
                moved += 1;
            }
        }
        if !was_present && moved == 0 {
            return;
        }
        self.stats.losses += 1;
        self.stats.reissued += moved;
        if self.writes_done[Path::Direct.index()] > self.flushed[Path::Direct.index()] {
            self.lost_dirty = true;
            self.lost_at = self.dispatch_no;
        }
        if moved > 0 && self.parked_since_us.is_none() {
            self.parked_since_us = Some(now_us);
        }
        // A barrier on the lost path will never complete; its writes are
        // now covered by the synthetic flushes dispatched after the loss.
        if self.barrier.is_some_and(|b| b.on == Path::Direct) {
            self.barrier = None;
        }
        self.phase = match self.phase {
            Phase::Draining { from, .. } => Phase::Draining {
                from,
                to: Path::Synthetic,
            },
            Phase::Steady if self.active == Path::Direct || moved > 0 => Phase::Draining {
                from: Path::Direct,
                to: Path::Synthetic,
            },
            Phase::Steady => Phase::Steady,
        };
        if self.phase == Phase::Steady {
            self.release_flushes(out);
        }
        self.progress(now_us, out);
    }

    /// A request the caller dispatched completed on `path`.
    pub fn complete<const M: usize>(
        &mut self,
        id: u64,
        issue: u32,
        outcome: Outcome,
        now_us: u64,
        out: &mut Actions<M>,
    ) {
        let Some(idx) = self
            .entries
            .iter()
            .position(|e| e.is_some_and(|e| e.id == id && e.issue == issue && e.path.is_some()))
        else {
            // From a lost path, or a duplicate: already taken care of.
            self.stats.stale_completions += 1;
            return;
        };
        let Some(e) = self.entries[idx] else { return };
        let Some(path) = e.path else { return };
        match outcome {
            Outcome::Error(_) if path == Path::Direct => {
                // The direct path failed this request: treat it as gone;
                // this request and the others on it go to the synthetic one.
                self.path_lost(Path::Direct, now_us, out);
                return;
            }
            Outcome::Error(_) => self.stats.errors_to_app += 1,
            Outcome::Ok => match e.op {
                Op::Write => self.writes_done[path.index()] += 1,
                Op::Flush => {
                    let (mark, at) = self.flush_marks[idx];
                    self.flushed_upto(path, mark, at);
                }
                Op::Read => {}
            },
        }
        self.entries[idx] = None;
        self.stats.completed += 1;
        out.push(Action::Complete { id, outcome });
        self.progress(now_us, out);
    }

    /// A barrier flush completed.
    pub fn barrier_done<const M: usize>(
        &mut self,
        issue: u32,
        outcome: Outcome,
        now_us: u64,
        out: &mut Actions<M>,
    ) {
        let Some(b) = self.barrier.filter(|b| b.issue == issue) else {
            self.stats.stale_completions += 1;
            return;
        };
        self.barrier = None;
        match outcome {
            Outcome::Ok => self.flushed_upto(b.on, b.mark.0, b.mark.1),
            Outcome::Error(_) if b.on == Path::Direct => {
                // The old direct path cannot flush: it counts as lost (its
                // writes are then covered by synthetic flushes).
                self.stats.barrier_errors += 1;
                self.path_lost(Path::Direct, now_us, out);
                return;
            }
            Outcome::Error(_) => {
                // Nothing else can flush. Go on; the application's own
                // flushes will report the storage's errors.
                self.stats.barrier_errors += 1;
                self.lost_dirty = false;
                let p = b.on.index();
                self.flushed[p] = self.flushed[p].max(b.mark.0);
            }
        }
        if self.phase == Phase::Steady {
            self.release_flushes(out);
        }
        self.progress(now_us, out);
    }

    /// Dispatches the application flushes held for a barrier, oldest
    /// first, once no barrier is in flight.
    fn release_flushes<const M: usize>(&mut self, out: &mut Actions<M>) {
        while self.barrier.is_none() {
            let next = self
                .entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.filter(|e| e.path.is_none()).map(|e| (i, e)))
                .min_by_key(|(_, e)| e.seq);
            let Some((idx, _)) = next else { return };
            self.dispatch(idx, self.active, out);
        }
    }

    /// A flush dispatched as number `at` on `path` covering `mark` of its
    /// writes completed.
    fn flushed_upto(&mut self, path: Path, mark: u64, at: u64) {
        let p = path.index();
        self.flushed[p] = self.flushed[p].max(mark);
        if path == Path::Synthetic && self.lost_dirty && at > self.lost_at {
            self.lost_dirty = false;
        }
    }

    fn progress<const M: usize>(&mut self, now_us: u64, out: &mut Actions<M>) {
        let Phase::Draining { from, to } = self.phase else {
            return;
        };
        if self.in_flight(from) > 0 {
            return;
        }
        // Requests still on the *new* path (a switch reversed midway) must
        // finish too before parked ones overtake them.
        if to != from && self.in_flight(to) > 0 {
            return;
        }
        let from_alive = from == Path::Synthetic || self.direct_present;
        let f = from.index();
        // First the old path's own writes (while it can still flush them),
        // then a lost direct path's (only the synthetic path can).
        let on = if from_alive && from != to && self.writes_done[f] > self.flushed[f] {
            Some(from)
        } else if self.lost_dirty {
            Some(Path::Synthetic)
        } else {
            None
        };
        if let Some(on) = on {
            if self.barrier.is_some() {
                // One barrier at a time: this switch waits for the last
                // one (`barrier_done` comes back here).
                return;
            }
            let issue = self.issue();
            self.dispatch_no += 1;
            self.barrier = Some(Pending {
                on,
                issue,
                mark: (self.writes_done[on.index()], self.dispatch_no),
            });
            self.stats.barriers += 1;
            out.push(Action::Barrier { path: on, issue });
        }
        self.replay(from, to, now_us, out);
    }

    fn replay<const M: usize>(&mut self, from: Path, to: Path, now_us: u64, out: &mut Actions<M>) {
        let mut parked = 0u32;
        let mut reissued = 0u32;
        loop {
            // The oldest parked request next (re-issued ones are older than
            // anything that arrived after them).
            let held = self.barrier.is_some();
            let next = self
                .entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.filter(|e| e.path.is_none() && !(held && e.op == Op::Flush))
                        .map(|e| (i, e))
                })
                .min_by_key(|(_, e)| e.seq);
            let Some((idx, e)) = next else { break };
            parked += 1;
            if e.reissue {
                reissued += 1;
                if let Some(x) = self.entries[idx].as_mut() {
                    x.reissue = false;
                }
            }
            self.dispatch(idx, to, out);
        }
        self.active = to;
        self.phase = Phase::Steady;
        let blackout_us = self
            .parked_since_us
            .take()
            .map_or(0, |t| now_us.saturating_sub(t));
        self.stats.max_blackout_us = self.stats.max_blackout_us.max(blackout_us);
        if from != to {
            self.stats.switches += 1;
        }
        out.push(Action::Switched {
            from,
            to,
            parked,
            reissued,
            blackout_us,
        });
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::{BTreeMap, BTreeSet};
    use std::vec::Vec;

    use super::*;

    const N: usize = 16;
    type H = Handoff<N>;
    type A = Actions<{ N + 3 }>;

    fn acts(a: &A) -> Vec<Action> {
        a.iter().collect()
    }

    #[test]
    fn steady_requests_go_to_the_active_path() {
        let mut h = H::new();
        let mut a = A::default();
        h.submit(1, Op::Write, 0, &mut a).unwrap();
        assert_eq!(
            acts(&a),
            [Action::Dispatch {
                id: 1,
                path: Path::Synthetic,
                issue: 1
            }]
        );
        a.clear();
        h.complete(1, 1, Outcome::Ok, 5, &mut a);
        assert_eq!(
            acts(&a),
            [Action::Complete {
                id: 1,
                outcome: Outcome::Ok
            }]
        );
        assert_eq!(h.submit(1, Op::Read, 6, &mut a), Ok(()));
        assert_eq!(
            h.submit(1, Op::Read, 6, &mut a),
            Err(HandoffError::DuplicateId)
        );
        assert_eq!(
            h.switch_to(Path::Direct, 7, &mut a),
            Err(HandoffError::NoDirectPath)
        );
    }

    #[test]
    fn a_switch_parks_drains_flushes_and_replays_in_order() {
        let mut h = H::new();
        let mut a = A::default();
        h.submit(1, Op::Write, 0, &mut a).unwrap(); // issue 1 on synthetic
        h.submit(2, Op::Write, 0, &mut a).unwrap(); // issue 2
        h.complete(2, 2, Outcome::Ok, 1, &mut a);
        h.direct_added();
        a.clear();
        h.switch_to(Path::Direct, 10, &mut a).unwrap();
        assert!(a.is_empty(), "request 1 still in flight: {:?}", acts(&a));
        h.submit(3, Op::Write, 11, &mut a).unwrap();
        h.submit(4, Op::Flush, 12, &mut a).unwrap();
        assert_eq!(h.parked(), 2);
        assert!(a.is_empty());
        // The last old request completes: a barrier on the old path (it
        // completed writes nobody flushed) and, beside it, the replay of
        // the write; the flush waits for the barrier.
        h.complete(1, 1, Outcome::Ok, 20, &mut a);
        assert_eq!(
            acts(&a),
            [
                Action::Complete {
                    id: 1,
                    outcome: Outcome::Ok
                },
                Action::Barrier {
                    path: Path::Synthetic,
                    issue: 3
                },
                Action::Dispatch {
                    id: 3,
                    path: Path::Direct,
                    issue: 4
                },
                Action::Switched {
                    from: Path::Synthetic,
                    to: Path::Direct,
                    parked: 1,
                    reissued: 0,
                    blackout_us: 9
                }
            ]
        );
        assert_eq!(h.active(), Path::Direct);
        assert_eq!(h.stats.switches, 1);
        assert_eq!(h.parked(), 1);
        // A new flush waits too; new writes do not.
        a.clear();
        h.submit(5, Op::Flush, 21, &mut a).unwrap();
        h.submit(6, Op::Write, 22, &mut a).unwrap();
        assert_eq!(
            acts(&a),
            [Action::Dispatch {
                id: 6,
                path: Path::Direct,
                issue: 5
            }]
        );
        // The direct path cannot be released while I/O goes to it.
        assert_eq!(h.direct_released(), Err(HandoffError::Busy));
        a.clear();
        h.barrier_done(3, Outcome::Ok, 30, &mut a);
        assert_eq!(
            acts(&a),
            [
                Action::Dispatch {
                    id: 4,
                    path: Path::Direct,
                    issue: 6
                },
                Action::Dispatch {
                    id: 5,
                    path: Path::Direct,
                    issue: 7
                },
            ]
        );
        assert_eq!(h.barrier_on(), None);
    }

    #[test]
    fn surprise_removal_reissues_in_flight_requests_once() {
        let mut h = H::new();
        let mut a = A::default();
        h.direct_added();
        h.switch_to(Path::Direct, 0, &mut a).unwrap();
        a.clear();
        h.submit(1, Op::Write, 1, &mut a).unwrap(); // direct, issue 1
        h.submit(2, Op::Read, 1, &mut a).unwrap(); // direct, issue 2
        h.complete(1, 1, Outcome::Ok, 2, &mut a);
        a.clear();
        // The VF vanishes with request 2 in flight and a write unflushed:
        // a barrier on the synthetic path (the same storage) and the
        // re-issue of request 2 there, at once.
        h.path_lost(Path::Direct, 5, &mut a);
        assert_eq!(
            acts(&a),
            [
                Action::Barrier {
                    path: Path::Synthetic,
                    issue: 3
                },
                Action::Dispatch {
                    id: 2,
                    path: Path::Synthetic,
                    issue: 4
                },
                Action::Switched {
                    from: Path::Direct,
                    to: Path::Synthetic,
                    parked: 1,
                    reissued: 1,
                    blackout_us: 0
                }
            ]
        );
        a.clear();
        h.submit(3, Op::Write, 6, &mut a).unwrap();
        assert_eq!(
            acts(&a),
            [Action::Dispatch {
                id: 3,
                path: Path::Synthetic,
                issue: 5
            }]
        );
        a.clear();
        h.barrier_done(3, Outcome::Ok, 9, &mut a);
        assert!(a.is_empty());
        a.clear();
        // The dead path's late answer for request 2 is ignored.
        h.complete(2, 2, Outcome::Error(-5), 10, &mut a);
        assert!(a.is_empty());
        assert_eq!(h.stats.stale_completions, 1);
        h.complete(2, 4, Outcome::Ok, 11, &mut a);
        assert_eq!(
            acts(&a),
            [Action::Complete {
                id: 2,
                outcome: Outcome::Ok
            }]
        );
    }

    #[test]
    fn a_direct_path_error_falls_back_instead_of_failing() {
        let mut h = H::new();
        let mut a = A::default();
        h.direct_added();
        h.switch_to(Path::Direct, 0, &mut a).unwrap();
        a.clear();
        h.submit(7, Op::Read, 1, &mut a).unwrap();
        a.clear();
        h.complete(7, 1, Outcome::Error(-5), 2, &mut a);
        let v = acts(&a);
        assert_eq!(
            v[0],
            Action::Dispatch {
                id: 7,
                path: Path::Synthetic,
                issue: 2
            }
        );
        assert!(!h.direct_present());
        // The synthetic path's errors do reach the application.
        a.clear();
        h.complete(7, 2, Outcome::Error(-5), 3, &mut a);
        assert_eq!(
            acts(&a),
            [Action::Complete {
                id: 7,
                outcome: Outcome::Error(-5)
            }]
        );
    }

    /// A random model run: each path completes requests in any order;
    /// switches, surprise removals and direct-path errors come at random.
    /// Checks every rule in the module documentation.
    fn run_model(seed: u64, steps: usize) {
        let mut x = seed | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut h = H::new();
        let mut a = A::default();
        // In flight per path: (application id, or None for a barrier; issue).
        let mut inflight: [Vec<(Option<u64>, u32)>; 2] = [Vec::new(), Vec::new()];
        // Requests a lost path still answers (late, stale).
        let mut zombies: Vec<(Option<u64>, u32)> = Vec::new();
        let mut ops: BTreeMap<u64, Op> = BTreeMap::new();
        let mut submitted_at: BTreeMap<u64, u64> = BTreeMap::new();
        let mut done: BTreeSet<u64> = BTreeSet::new();
        // Durability: each path has its own write cache; a flush on a path
        // makes durable the writes completed on it before the flush was
        // dispatched. A lost direct path's completed writes are on the
        // shared storage and a later synthetic flush covers them.
        let mut completed_writes: Vec<(u64, Path, u64)> = Vec::new();
        let mut durable_upto = [0u64; 2];
        // When the direct path was lost, each time.
        let mut losses: Vec<u64> = std::vec![0];
        let mut dispatched: BTreeMap<(Option<u64>, u32), (Path, u64)> = BTreeMap::new();
        let mut next_id = 1u64;
        let mut now = 0u64;
        let apply = |acts: &A,
                     now: u64,
                     h: &H,
                     inflight: &mut [Vec<(Option<u64>, u32)>; 2],
                     zombies: &mut Vec<(Option<u64>, u32)>,
                     dispatched: &mut BTreeMap<(Option<u64>, u32), (Path, u64)>,
                     done: &mut BTreeSet<u64>,
                     completed_writes: &mut Vec<(u64, Path, u64)>,
                     durable_upto: &[u64; 2],
                     ops: &BTreeMap<u64, Op>,
                     submitted_at: &BTreeMap<u64, u64>| {
            if !h.direct_present() {
                zombies.append(&mut inflight[1]);
            }
            // A replay dispatches in arrival order (ids grow with arrival).
            let batch: Vec<u64> = acts
                .iter()
                .filter_map(|a| match a {
                    Action::Dispatch { id, .. } => Some(id),
                    _ => None,
                })
                .collect();
            if acts.iter().any(|a| matches!(a, Action::Switched { .. })) {
                assert!(
                    batch.windows(2).all(|w| w[0] < w[1]),
                    "replay out of order: {batch:?}"
                );
            }
            for act in acts.iter() {
                match act {
                    Action::Dispatch { id, path, issue } => {
                        assert!(!done.contains(&id), "{id} dispatched after completing");
                        assert!(
                            path == Path::Synthetic || h.direct_present(),
                            "{id} dispatched to a direct path that is gone"
                        );
                        for p in inflight.iter() {
                            assert!(
                                !p.iter().any(|(i, _)| *i == Some(id)),
                                "{id} twice in flight"
                            );
                        }
                        // The drain barrier (barrier flushes carry no data and
                        // may run beside the other path's requests).
                        let other = 1 - path.index();
                        assert!(
                            !inflight[other].iter().any(|(i, _)| i.is_some()),
                            "dispatch to {path:?} while the other path is busy"
                        );
                        inflight[path.index()].push((Some(id), issue));
                        dispatched.insert((Some(id), issue), (path, now));
                    }
                    Action::Barrier { path, issue } => {
                        inflight[path.index()].push((None, issue));
                        dispatched.insert((None, issue), (path, now));
                    }
                    Action::Complete { id, outcome } => {
                        assert!(done.insert(id), "{id} completed twice");
                        if outcome == Outcome::Ok {
                            match ops[&id] {
                                Op::Write => {
                                    let path = inflight_path_of(dispatched, id);
                                    completed_writes.push((id, path, now));
                                }
                                Op::Flush => {
                                    let s = submitted_at[&id];
                                    for (w, p, t) in completed_writes.iter() {
                                        assert!(
                                            *t > s || *t <= durable_upto[p.index()],
                                            "flush {id} acknowledged but write {w} ({p:?}, done at {t}) is not durable"
                                        );
                                    }
                                }
                                Op::Read => {}
                            }
                        }
                    }
                    Action::Switched { .. } => {}
                }
            }
        };
        for _ in 0..steps {
            now += 1;
            a.clear();
            match rnd(11) {
                0..=3 => {
                    let op = match rnd(5) {
                        0 => Op::Flush,
                        1 | 2 => Op::Write,
                        _ => Op::Read,
                    };
                    if h.submit(next_id, op, now, &mut a).is_ok() {
                        ops.insert(next_id, op);
                        submitted_at.insert(next_id, now);
                        next_id += 1;
                    }
                }
                4..=7 => {
                    let p = rnd(2) as usize;
                    if !inflight[p].is_empty() {
                        let i = rnd(inflight[p].len() as u64) as usize;
                        let (id, issue) = inflight[p].remove(i);
                        let path = if p == 0 {
                            Path::Synthetic
                        } else {
                            Path::Direct
                        };
                        let fail = path == Path::Direct && rnd(20) == 0;
                        let outcome = if fail {
                            Outcome::Error(-5)
                        } else {
                            Outcome::Ok
                        };
                        if !fail {
                            flushed(id, issue, &ops, &dispatched, &losses, &mut durable_upto);
                        }
                        match id {
                            Some(id) => h.complete(id, issue, outcome, now, &mut a),
                            None => h.barrier_done(issue, outcome, now, &mut a),
                        }
                        if fail {
                            losses.push(now);
                        }
                    }
                }
                8 => {
                    if !zombies.is_empty() {
                        // A late answer from a lost path changes nothing.
                        let (id, issue) = zombies.remove(0);
                        let before = h.stats.stale_completions;
                        match id {
                            Some(id) => h.complete(id, issue, Outcome::Ok, now, &mut a),
                            None => h.barrier_done(issue, Outcome::Ok, now, &mut a),
                        }
                        assert!(a.is_empty() && h.stats.stale_completions == before + 1);
                    }
                }
                9 => {
                    if h.direct_present() {
                        let to = if rnd(2) == 0 {
                            Path::Direct
                        } else {
                            Path::Synthetic
                        };
                        h.switch_to(to, now, &mut a).unwrap();
                    } else {
                        h.direct_added();
                        h.switch_to(Path::Direct, now, &mut a).unwrap();
                    }
                }
                _ => {
                    if rnd(3) == 0 && h.direct_present() {
                        losses.push(now);
                        h.path_lost(Path::Direct, now, &mut a);
                    } else if h.direct_present() {
                        // An orderly release: only when nothing uses the path.
                        let idle = h.active() == Path::Synthetic
                            && h.switching_to() != Some(Path::Direct)
                            && inflight[1].is_empty();
                        let r = h.direct_released();
                        assert_eq!(r.is_ok(), idle, "release of the direct path: {r:?}");
                    }
                }
            }
            apply(
                &a,
                now,
                &h,
                &mut inflight,
                &mut zombies,
                &mut dispatched,
                &mut done,
                &mut completed_writes,
                &durable_upto,
                &ops,
                &submitted_at,
            );
        }
        // Let everything finish: every request completes exactly once.
        for _ in 0..100_000 {
            now += 1;
            a.clear();
            let p = if !inflight[0].is_empty() { 0 } else { 1 };
            if inflight[p].is_empty() {
                break;
            }
            let (id, issue) = inflight[p].remove(0);
            flushed(id, issue, &ops, &dispatched, &losses, &mut durable_upto);
            match id {
                Some(id) => h.complete(id, issue, Outcome::Ok, now, &mut a),
                None => h.barrier_done(issue, Outcome::Ok, now, &mut a),
            }
            apply(
                &a,
                now,
                &h,
                &mut inflight,
                &mut zombies,
                &mut dispatched,
                &mut done,
                &mut completed_writes,
                &durable_upto,
                &ops,
                &submitted_at,
            );
        }
        let all: BTreeSet<u64> = ops.keys().copied().collect();
        assert_eq!(done, all, "requests never completed (seed {seed})");
        assert_eq!(h.parked(), 0);
    }

    /// The durability model when a request completes successfully: a flush
    /// (or barrier) on a path makes durable what completed on that path
    /// before it was dispatched; a synthetic one also covers what a lost
    /// direct path completed before its last loss before that dispatch.
    fn flushed(
        id: Option<u64>,
        issue: u32,
        ops: &BTreeMap<u64, Op>,
        dispatched: &BTreeMap<(Option<u64>, u32), (Path, u64)>,
        losses: &[u64],
        durable_upto: &mut [u64; 2],
    ) {
        if !id.is_none_or(|i| ops[&i] == Op::Flush) {
            return;
        }
        let (fp, d) = dispatched[&(id, issue)];
        durable_upto[fp.index()] = durable_upto[fp.index()].max(d);
        if fp == Path::Synthetic {
            let l = losses
                .iter()
                .filter(|l| **l <= d)
                .max()
                .copied()
                .unwrap_or(0);
            durable_upto[1] = durable_upto[1].max(l);
        }
    }

    /// The path an application request was last dispatched on.
    fn inflight_path_of(d: &BTreeMap<(Option<u64>, u32), (Path, u64)>, id: u64) -> Path {
        d.iter()
            .filter(|((i, _), _)| *i == Some(id))
            .max_by_key(|((_, issue), _)| *issue)
            .map(|(_, (p, _))| *p)
            .unwrap()
    }

    #[test]
    fn random_runs_keep_every_rule() {
        for seed in 1..400u64 {
            run_model(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 600);
        }
    }
}
