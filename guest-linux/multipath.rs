// SPDX-License-Identifier: GPL-2.0 OR MIT

//! F4: multi-path volumes. `/dev/tandem<N>` is one block device over two
//! paths to the same storage: the **synthetic** path (a virtio-blk disk,
//! always there, migratable) and at times a **direct** one (the namespace
//! of an assigned NVMe function). The host names the paths with ABI 1.2
//! `FUNCTION` requests (`PATH_SYNTHETIC`, `PATH_DIRECT`, `PATH_RELEASE`;
//! the release of a synthetic path deletes its unused volume).
//!
//! Where each request goes is decided by the handoff core
//! (`shared-abi/src/handoff.rs`), the same pure state machine the host
//! tests: new requests are held while a switch drains the old path, a
//! barrier flush keeps flushes meaningful across the switch, held requests
//! are replayed in order, and requests caught on a direct path that fails
//! or disappears are re-issued on the synthetic path exactly once. This
//! file is the plumbing around it:
//!
//! - the device is bio-based (like device-mapper): `submit_bio` hands each
//!   application bio to the core; the core's `Dispatch` actions become
//!   clones (`bio_alloc_clone`) sent to the chosen path's block device;
//!   clone completions go back to the core.
//! - The core runs under a spinlock (completions arrive in interrupt
//!   context). Clones are only submitted from process context, outside the
//!   lock, by one submitter at a time and in the order the core asked for
//!   them (a FIFO of jobs), so a replay keeps its order.
//! - An application bio ends only when the core completed it **and** no
//!   clone of it is still out: a clone left on a failed path may still
//!   touch the bio's pages, so the bio (and the caller's memory) waits
//!   for it. A late write from such a clone carries the same data the
//!   re-issued one wrote, and the application cannot have written that
//!   block again since (it has not seen the completion).
//! - Paths are opened exclusively (`bdev_file_open_by_dev` with holder
//!   operations): a direct path whose disk goes away (`mark_dead`), whose
//!   driver unbinds (the PCI bus notifier in `functions.rs`) or that fails
//!   a request is lost, and its requests move to the synthetic path.
//!
//! The kernel's Rust API has no bio-based disks, bio clones or block device
//! opens, so they are called through `bindings`, each with its safety
//! argument.

use core::ptr::null_mut;

use kernel::ffi::{c_int, c_void};

use kernel::{
    bindings, fmt, new_spinlock_irq,
    prelude::*,
    sync::{Arc, ArcBorrow, SpinLockIrq},
    types::Opaque,
    workqueue::{self, impl_has_work, new_work, Work, WorkItem},
};

use crate::abi::handoff::{Action, Actions, Handoff, Op, Outcome, Path};
use crate::abi::msg::{function as f, Status};

/// Application requests a volume tracks at once (in flight or held); more
/// wait, in order, in an overflow list.
const NSLOT: usize = 64;
/// The core's action buffer (its capacity rule: slots + 3).
const NACT: usize = NSLOT + 3;
/// Jobs waiting to be submitted: each slot's live dispatch, stale ones of
/// a lost path, barriers.
const NJOB: usize = 2 * NSLOT + 8;
/// The most volumes a guest has.
const MAX_VOLUMES: u32 = 16;
/// Switches whose largest completion gap debugfs keeps.
const GAPS: usize = 16;
/// The longest a path request waits for a switch.
const MAX_WAIT_MS: u32 = 10_000;

// From include/linux/blkdev.h and blk_types.h (macros bindgen cannot see).
const BLK_OPEN_READ: bindings::blk_mode_t = 1 << 0;
const BLK_OPEN_WRITE: bindings::blk_mode_t = 1 << 1;
const BLK_OPEN_EXCL: bindings::blk_mode_t = 1 << 2;
const BLK_FEAT_WRITE_CACHE: bindings::blk_features_t = 1 << 0;
const BLK_FEAT_FUA: bindings::blk_features_t = 1 << 1;
const BLK_STS_RESOURCE: u8 = 9;
const BLK_STS_IOERR: u8 = 10;
const REQ_OP_MASK: u32 = (1 << 8) - 1;
const REQ_PREFLUSH: u32 = 1 << bindings::req_flag_bits___REQ_PREFLUSH;
/// GFP_KERNEL without __GFP_IO and __GFP_FS: allocations on the I/O path
/// must not recurse into I/O.
const GFP_NOIO: bindings::gfp_t =
    bindings::GFP_KERNEL & !((1 << bindings::___GFP_IO_BIT) | (1 << bindings::___GFP_FS_BIT));

fn now_us() -> u64 {
    // SAFETY: reads the monotonic clock; callable from any context.
    let ns = unsafe { bindings::ktime_get() };
    u64::try_from(ns).unwrap_or(0) / 1000
}

fn is_err<T>(p: *mut T) -> bool {
    p.is_null() || (p as usize) >= (-4095isize) as usize
}

/// One application bio the core knows about.
#[derive(Clone, Copy)]
struct Slot {
    /// Null: the slot is free.
    bio: *mut bindings::bio,
    id: u64,
    /// Clones of it not yet completed.
    clones: u32,
    /// The core completed it with this status; it ends when `clones` is 0.
    done: Option<u8>,
}

const FREE: Slot = Slot { bio: null_mut(), id: 0, clones: 0, done: None };

#[derive(Clone, Copy)]
enum Job {
    Dispatch { slot: usize, path: Path, issue: u32 },
    Barrier { path: Path, issue: u32 },
}

/// A FIFO of jobs for the submitter.
struct Jobs {
    items: [Option<Job>; NJOB],
    head: usize,
    len: usize,
}

impl Jobs {
    const fn new() -> Self {
        Jobs { items: [None; NJOB], head: 0, len: 0 }
    }

    fn push(&mut self, j: Job) -> bool {
        if self.len == NJOB {
            return false;
        }
        self.items[(self.head + self.len) % NJOB] = Some(j);
        self.len += 1;
        true
    }

    fn pop(&mut self) -> Option<Job> {
        if self.len == 0 {
            return None;
        }
        let j = self.items[self.head].take();
        self.head = (self.head + 1) % NJOB;
        self.len -= 1;
        j
    }
}

/// An open path.
struct PathDev {
    /// The exclusive open of the path's block device (null: no path).
    file: *mut bindings::file,
    bdev: *mut bindings::block_device,
    /// The PCI function the disk belongs to (a counted reference).
    pdev: *mut bindings::pci_dev,
    /// Jobs and clones that use `bdev`.
    refs: u32,
    /// Lost or released: no new job goes to it; it is closed when `refs`
    /// reaches 0.
    gone: bool,
}

const NO_PATH: PathDev = PathDev { file: null_mut(), bdev: null_mut(), pdev: null_mut(), refs: 0, gone: false };

/// The state a volume's lock protects.
struct Inner {
    h: KBox<Handoff<NSLOT>>,
    acts: KBox<Actions<NACT>>,
    slots: KBox<[Slot; NSLOT]>,
    jobs: KBox<Jobs>,
    /// Makes ids unique over time (the low byte is the slot).
    gen: u64,
    /// Someone is submitting jobs.
    submitting: bool,
    /// Bios that found no free slot, oldest first, linked by `bi_next`.
    overflow: (*mut bindings::bio, *mut bindings::bio),
    paths: [PathDev; 2],
    /// Files whose last use ended where they cannot be closed (interrupt
    /// context); the work item closes them.
    to_close: [(*mut bindings::file, *mut bindings::pci_dev); 2],
    last_blackout_us: u64,
    /// When the last application request completed.
    last_done_us: u64,
    /// A host-driven switch is in progress (until the first completion
    /// after it finished), and whether it finished.
    in_switch: bool,
    switch_over: bool,
    /// The largest gap between two application completions while a
    /// switch was in progress, and outside switches (for comparison).
    max_switch_gap_us: u64,
    max_gap_us: u64,
    /// The largest gap of the switch in progress, and that of the last
    /// `GAPS` switches (a ring; `switch_gap_n` counts every switch).
    cur_switch_gap_us: u64,
    switch_gaps_us: [u32; GAPS],
    switch_gap_n: usize,
    /// `/dev/tandem<N>` (null until added).
    disk: *mut bindings::gendisk,
    /// The volume is going away: new bios fail.
    dead: bool,
}

// SAFETY: the raw pointers are to kernel objects (bios, block devices,
// files, PCI devices) that may be used from any CPU; access is serialized
// by the volume's lock.
unsafe impl Send for Inner {}

/// Per-clone context, in the bioset's front padding.
#[repr(C)]
struct CloneCtx {
    vol: *const Volume,
    slot: usize,
    issue: u32,
    path: u8,
    barrier: bool,
}

#[pin_data]
pub(crate) struct Volume {
    index: u32,
    #[pin]
    inner: SpinLockIrq<Inner>,
    #[pin]
    work: Work<Volume>,
    /// Clones and barriers come from here, with a [`CloneCtx`] in front.
    bs: Opaque<bindings::bio_set>,
}

// SAFETY: see `Inner`; `bs` is used through the block layer's own locking.
unsafe impl Send for Volume {}
// SAFETY: as above.
unsafe impl Sync for Volume {}

impl_has_work! {
    impl HasWork<Self> for Volume { self.work }
}

impl WorkItem for Volume {
    type Pointer = Arc<Volume>;

    fn run(this: Arc<Volume>) {
        this.submit_jobs();
        this.close_gone();
    }
}

fn path_of(i: u8) -> Path {
    if i == 0 {
        Path::Synthetic
    } else {
        Path::Direct
    }
}

fn pidx(p: Path) -> usize {
    match p {
        Path::Synthetic => 0,
        Path::Direct => 1,
    }
}

fn status_of(o: Outcome) -> u8 {
    match o {
        Outcome::Ok => 0,
        Outcome::Error(e) => u8::try_from(e).unwrap_or(BLK_STS_IOERR),
    }
}

/// Ends an application bio.
///
/// # Safety
/// `bio` is an application bio this volume owns and has not ended.
unsafe fn end_bio(bio: *mut bindings::bio, status: u8) {
    // SAFETY: per the function's contract.
    unsafe {
        (*bio).bi_status = status;
        bindings::bio_endio(bio);
    }
}

/// Ends a chain of bios linked by `bi_next` (each with its status already
/// in `bi_status`).
fn end_chain(mut bio: *mut bindings::bio) {
    while !bio.is_null() {
        // SAFETY: bios on a finished chain are ours to end, once.
        unsafe {
            let next = (*bio).bi_next;
            (*bio).bi_next = null_mut();
            bindings::bio_endio(bio);
            bio = next;
        }
    }
}

impl Inner {
    /// Carries out the core's actions: queues jobs, finishes completed
    /// bios (onto `fin`), records switches.
    fn route(&mut self, index: u32, fin: &mut *mut bindings::bio) {
        let Inner {
            h,
            acts,
            jobs,
            slots,
            paths,
            last_blackout_us,
            last_done_us,
            in_switch,
            switch_over,
            max_switch_gap_us,
            max_gap_us,
            cur_switch_gap_us,
            switch_gaps_us,
            switch_gap_n,
            ..
        } = self;
        for a in acts.iter() {
            match a {
                Action::Dispatch { id, path, issue } => {
                    let slot = (id & 0xff) as usize;
                    if jobs.push(Job::Dispatch { slot, path, issue }) {
                        paths[pidx(path)].refs += 1;
                    } else {
                        pr_err!("tandem{}: job queue full; a request is lost\n", index);
                    }
                }
                Action::Barrier { path, issue } => {
                    if jobs.push(Job::Barrier { path, issue }) {
                        paths[pidx(path)].refs += 1;
                    } else {
                        pr_err!("tandem{}: job queue full; a barrier is lost\n", index);
                    }
                }
                Action::Complete { id, outcome } => {
                    let now = now_us();
                    let gap = now.saturating_sub(*last_done_us);
                    if *last_done_us != 0 {
                        if *in_switch {
                            *max_switch_gap_us = (*max_switch_gap_us).max(gap);
                            *cur_switch_gap_us = (*cur_switch_gap_us).max(gap);
                            if *switch_over {
                                *in_switch = false;
                                switch_gaps_us[*switch_gap_n % GAPS] =
                                    u32::try_from(*cur_switch_gap_us).unwrap_or(u32::MAX);
                                *switch_gap_n += 1;
                            }
                        } else {
                            *max_gap_us = (*max_gap_us).max(gap);
                        }
                    }
                    *last_done_us = now;
                    let slot = (id & 0xff) as usize;
                    if let Some(s) = slots.get_mut(slot) {
                        s.done = Some(status_of(outcome));
                        Self::finish_if_done(s, fin);
                    }
                }
                Action::Switched { from, to, parked, reissued, blackout_us } => {
                    *last_blackout_us = blackout_us;
                    *switch_over = true;
                    pr_info!(
                        "tandem{}: I/O moved from the {} path to the {} path ({} held, {} re-issued, {} us)\n",
                        index,
                        from.name(),
                        to.name(),
                        parked,
                        reissued,
                        blackout_us
                    );
                }
            }
        }
        acts.clear();
        // The core drops a direct path that failed a request: so do we.
        let d = &mut paths[1];
        if !h.direct_present() && !d.bdev.is_null() && !d.gone {
            d.gone = true;
            pr_warn!("tandem{}: the direct path failed; its I/O goes to the synthetic path\n", index);
        }
    }

    fn finish_if_done(s: &mut Slot, fin: &mut *mut bindings::bio) {
        if let (Some(st), 0, false) = (s.done, s.clones, s.bio.is_null()) {
            // SAFETY: the slot owns `s.bio` until it is finished, here.
            unsafe {
                (*s.bio).bi_status = st;
                (*s.bio).bi_next = *fin;
            }
            *fin = s.bio;
            *s = FREE;
        }
    }

    /// Gives `bio` to the core if a slot is free.
    fn admit(&mut self, index: u32, bio: *mut bindings::bio, fin: &mut *mut bindings::bio) -> bool {
        let Some(slot) = self.slots.iter().position(|s| s.bio.is_null()) else {
            return false;
        };
        self.gen = self.gen.wrapping_add(1);
        let id = (self.gen << 8) | slot as u64;
        // SAFETY: a live bio handed to us by the block layer.
        let (opf, size) = unsafe { ((*bio).bi_opf, (*bio).bi_iter.bi_size) };
        let op = match opf & REQ_OP_MASK {
            bindings::req_op_REQ_OP_READ => Op::Read,
            bindings::req_op_REQ_OP_FLUSH => Op::Flush,
            bindings::req_op_REQ_OP_WRITE if opf & REQ_PREFLUSH != 0 && size == 0 => Op::Flush,
            _ => Op::Write,
        };
        self.slots[slot] = Slot { bio, id, clones: 0, done: None };
        if self.h.submit(id, op, now_us(), &mut self.acts).is_err() {
            self.slots[slot] = FREE;
            self.acts.clear();
            return false;
        }
        self.route(index, fin);
        true
    }

    /// Admits overflowed bios while slots are free, oldest first.
    fn admit_overflow(&mut self, index: u32, fin: &mut *mut bindings::bio) {
        while !self.overflow.0.is_null() {
            let bio = self.overflow.0;
            // SAFETY: overflowed bios are ours, linked by `bi_next`.
            let next = unsafe { (*bio).bi_next };
            // SAFETY: as above.
            unsafe { (*bio).bi_next = null_mut() };
            if !self.admit(index, bio, fin) {
                // SAFETY: as above.
                unsafe { (*bio).bi_next = next };
                return;
            }
            self.overflow.0 = next;
            if next.is_null() {
                self.overflow.1 = null_mut();
            }
        }
    }

    fn push_overflow(&mut self, bio: *mut bindings::bio) {
        // SAFETY: `bio` is ours; the tail, if any, is ours too.
        unsafe {
            (*bio).bi_next = null_mut();
            if self.overflow.1.is_null() {
                self.overflow.0 = bio;
            } else {
                (*self.overflow.1).bi_next = bio;
            }
        }
        self.overflow.1 = bio;
    }

    /// Moves a path that is gone and unused to `to_close`; true if there
    /// is something to close.
    fn collect_gone(&mut self) -> bool {
        let mut any = false;
        for i in 0..2 {
            let p = &mut self.paths[i];
            if p.gone && p.refs == 0 && !p.file.is_null() && self.to_close[i].0.is_null() {
                self.to_close[i] = (p.file, p.pdev);
                self.paths[i] = NO_PATH;
                any = true;
            } else if p.gone && p.refs == 0 && p.file.is_null() {
                self.paths[i] = NO_PATH;
            }
        }
        any || self.to_close.iter().any(|c| !c.0.is_null())
    }

    fn lose_direct(&mut self, index: u32, why: &str, fin: &mut *mut bindings::bio) -> bool {
        let d = &mut self.paths[1];
        if d.bdev.is_null() || d.gone {
            return false;
        }
        d.gone = true;
        pr_warn!("tandem{}: the direct path is gone ({}); its I/O goes to the synthetic path\n", index, why);
        self.h.path_lost(Path::Direct, now_us(), &mut self.acts);
        self.route(index, fin);
        true
    }
}

/// Closes a path's file and drops its PCI reference.
///
/// # Safety
/// Process context; `file` came from `bdev_file_open_by_dev` and nothing
/// uses its block device any more; `pdev` is a counted reference or null.
unsafe fn close_path(file: *mut bindings::file, pdev: *mut bindings::pci_dev) {
    // SAFETY: per the function's contract.
    unsafe {
        if !file.is_null() {
            bindings::bdev_fput(file);
        }
        if !pdev.is_null() {
            bindings::pci_dev_put(pdev);
        }
    }
}

impl Volume {
    /// Another reference to this volume. Every volume is made with one
    /// reference leaked by `Arc::into_raw` (behind the disk's
    /// `private_data` and the clones' contexts), given back last.
    fn arc(&self) -> Arc<Volume> {
        // SAFETY: see above: `self` is that pointer, and that reference is
        // alive while anything can reach the volume.
        unsafe { ArcBorrow::from_raw(core::ptr::from_ref(self)) }.into()
    }

    fn kick_later(&self) {
        let _ = workqueue::system().enqueue(self.arc());
    }

    /// A bio from the block layer.
    fn submit(&self, bio: *mut bindings::bio) {
        let mut fin = null_mut();
        {
            let mut g = self.inner.lock();
            if g.dead {
                drop(g);
                // SAFETY: a bio the block layer gave us, not yet ended.
                unsafe { end_bio(bio, BLK_STS_IOERR) };
                return;
            }
            // Order: nothing overtakes a bio that is waiting for a slot.
            if !g.overflow.0.is_null() || !g.admit(self.index, bio, &mut fin) {
                g.push_overflow(bio);
            }
        }
        end_chain(fin);
        self.submit_jobs();
    }

    /// Submits queued jobs, one submitter at a time, in order. Process
    /// context only.
    fn submit_jobs(&self) {
        let mut g = self.inner.lock();
        if g.submitting {
            return;
        }
        g.submitting = true;
        loop {
            let Some(job) = g.jobs.pop() else { break };
            let (path, slot, issue, barrier) = match job {
                Job::Dispatch { slot, path, issue } => (path, slot, issue, false),
                Job::Barrier { path, issue } => (path, 0, issue, true),
            };
            let p = &mut g.paths[pidx(path)];
            if p.gone || p.bdev.is_null() {
                // For a path lost after the job was queued: the core has
                // already moved the request elsewhere.
                p.refs = p.refs.saturating_sub(1);
                continue;
            }
            let bdev = p.bdev;
            let orig = if barrier {
                null_mut()
            } else {
                g.slots[slot].clones += 1;
                g.slots[slot].bio
            };
            drop(g);
            let vol = core::ptr::from_ref(self);
            self.issue(bdev, orig, CloneCtx { vol, slot, issue, path: pidx(path) as u8, barrier });
            g = self.inner.lock();
        }
        g.submitting = false;
        let close = g.collect_gone();
        drop(g);
        if close {
            self.close_gone();
        }
    }

    /// Sends one clone (or, for a barrier, an empty flush) to `bdev`.
    fn issue(&self, bdev: *mut bindings::block_device, orig: *mut bindings::bio, ctx: CloneCtx) {
        let bs = self.bs.get();
        // SAFETY: `bdev` is open (the job holds a reference on the path);
        // `orig` is an application bio we own until all its clones are
        // back; `bs` was initialized with room for a `CloneCtx` in front.
        unsafe {
            let clone = if orig.is_null() {
                bindings::bio_alloc_bioset(bdev, 0, bindings::req_op_REQ_OP_WRITE | REQ_PREFLUSH, GFP_NOIO, bs)
            } else {
                bindings::bio_alloc_clone(bdev, orig, GFP_NOIO, bs)
            };
            if clone.is_null() {
                self.done(&ctx, BLK_STS_RESOURCE);
                return;
            }
            let c = clone.cast::<u8>().sub(core::mem::size_of::<CloneCtx>()).cast::<CloneCtx>();
            c.write(ctx);
            (*clone).bi_end_io = Some(clone_end);
            bindings::submit_bio_noacct(clone);
        }
    }

    /// A clone or a barrier came back.
    fn done(&self, ctx: &CloneCtx, status: u8) {
        let outcome = if status == 0 { Outcome::Ok } else { Outcome::Error(i32::from(status)) };
        let path = path_of(ctx.path);
        let now = now_us();
        let mut fin = null_mut();
        let (kick, close) = {
            let mut g = self.inner.lock();
            let g = &mut *g;
            let p = &mut g.paths[pidx(path)];
            p.refs = p.refs.saturating_sub(1);
            if ctx.barrier {
                g.h.barrier_done(ctx.issue, outcome, now, &mut g.acts);
            } else {
                let s = &mut g.slots[ctx.slot];
                s.clones = s.clones.saturating_sub(1);
                let id = s.id;
                g.h.complete(id, ctx.issue, outcome, now, &mut g.acts);
            }
            g.route(self.index, &mut fin);
            if !ctx.barrier {
                Inner::finish_if_done(&mut g.slots[ctx.slot], &mut fin);
            }
            g.admit_overflow(self.index, &mut fin);
            (g.jobs.len > 0 && !g.submitting, g.collect_gone())
        };
        end_chain(fin);
        if kick || close {
            self.kick_later();
        }
    }

    /// Closes paths that are gone and unused. Process context.
    fn close_gone(&self) {
        loop {
            let c = {
                let mut g = self.inner.lock();
                g.collect_gone();
                let i = g.to_close.iter().position(|c| !c.0.is_null());
                i.map(|i| core::mem::replace(&mut g.to_close[i], (null_mut(), null_mut())))
            };
            let Some((file, pdev)) = c else { return };
            // SAFETY: process context (work item or request); the path is
            // gone and unused.
            unsafe { close_path(file, pdev) };
        }
    }

    /// Waits, sleeping, until `cond` holds or `ms` pass.
    fn wait(&self, ms: u32, cond: impl Fn(&Inner) -> bool) -> bool {
        let t0 = now_us();
        loop {
            if cond(&*self.inner.lock()) {
                return true;
            }
            if now_us().saturating_sub(t0) >= u64::from(ms) * 1000 {
                return false;
            }
            // SAFETY: process context.
            unsafe { bindings::msleep(1) };
        }
    }
}

/// `bi_end_io` of clones and barriers.
unsafe extern "C" fn clone_end(clone: *mut bindings::bio) {
    // SAFETY: every bio with this end_io was allocated from a volume's
    // bioset with a `CloneCtx` written in front of it; the volume outlives
    // its clones (teardown waits for them).
    unsafe {
        let ctx = clone.cast::<u8>().sub(core::mem::size_of::<CloneCtx>()).cast::<CloneCtx>().read();
        let status = (*clone).bi_status;
        bindings::bio_put(clone);
        (*ctx.vol).done(&ctx, status);
    }
}

/// `submit_bio` of `/dev/tandem<N>`.
unsafe extern "C" fn submit_bio(bio: *mut bindings::bio) {
    // SAFETY: the block layer passes a bio for one of our disks, whose
    // `private_data` is its volume (alive while the disk is).
    unsafe {
        let disk = (*(*bio).bi_bdev).bd_disk;
        let vol = (*disk).private_data.cast::<Volume>();
        (*vol).submit(bio);
    }
}

/// Holder operations of the paths we open: a path's disk going away.
unsafe extern "C" fn mark_dead(bdev: *mut bindings::block_device, _surprise: bool) {
    // SAFETY: called with `bd_holder_lock` held, which the callee must
    // release (block/bdev.c); `bd_holder` is the volume that opened it.
    let vol = unsafe {
        let v = (*bdev).bd_holder.cast::<Volume>();
        bindings::mutex_unlock(&raw mut (*bdev).bd_holder_lock);
        v
    };
    if vol.is_null() {
        return;
    }
    // SAFETY: a volume stays alive while it holds a path open.
    let vol = unsafe { &*vol };
    let mut fin = null_mut();
    {
        let mut g = vol.inner.lock();
        if g.paths[1].bdev == bdev {
            g.lose_direct(vol.index, "its disk was removed", &mut fin);
        } else if g.paths[0].bdev == bdev {
            pr_err!("tandem{}: the synthetic path's disk was removed; I/O will fail\n", vol.index);
        }
    }
    end_chain(fin);
    vol.kick_later();
}

static HOLDER_OPS: bindings::blk_holder_ops =
    bindings::blk_holder_ops { mark_dead: Some(mark_dead), sync: None, freeze: None, thaw: None };

static mut FOPS: bindings::block_device_operations = bindings::block_device_operations {
    submit_bio: Some(submit_bio),
    poll_bio: None,
    open: None,
    release: None,
    ioctl: None,
    compat_ioctl: None,
    check_events: None,
    unlock_native_capacity: None,
    getgeo: None,
    set_read_only: None,
    swap_slot_free_notify: None,
    report_zones: None,
    devnode: None,
    alternative_gpt_sector: None,
    get_unique_id: None,
    owner: null_mut(),
    pr_ops: core::ptr::null(),
    free_disk: None,
};

kernel::sync::global_lock! {
    // SAFETY: initialized by `Registration::new` (module load) before use.
    unsafe(uninit) static VOLUMES: Mutex<KVec<Arc<Volume>>> = KVec::new();
}

/// Opens `devt` exclusively for `vol`.
fn open_path(vol: *const Volume, devt: u32) -> Result<(*mut bindings::file, *mut bindings::block_device)> {
    // SAFETY: `vol` is the holder identity (a live volume); the holder
    // operations are static.
    let file = unsafe {
        bindings::bdev_file_open_by_dev(
            devt,
            BLK_OPEN_READ | BLK_OPEN_WRITE | BLK_OPEN_EXCL,
            vol.cast_mut().cast::<c_void>(),
            &HOLDER_OPS,
        )
    };
    if is_err(file) {
        let e = if file.is_null() { -(bindings::ENXIO as c_int) } else { file as isize as c_int };
        return Err(Error::from_errno(e));
    }
    // SAFETY: a block device file we just opened.
    let bdev = unsafe { bindings::file_bdev(file) };
    Ok((file, bdev))
}

/// Size in 512-byte sectors and logical block size.
fn geometry(bdev: *mut bindings::block_device) -> (u64, u32) {
    // SAFETY: an open block device; its disk and queue live while open.
    unsafe { ((*bdev).bd_nr_sectors, (*(*(*bdev).bd_disk).queue).limits.logical_block_size) }
}

fn find(index: u32) -> Option<Arc<Volume>> {
    VOLUMES.lock().iter().find(|v| v.index == index).cloned()
}

/// What a path request did, for the report.
pub(crate) struct PathAnswer {
    pub(crate) status: Status,
    pub(crate) us: u32,
}

/// A counted reference to `pdev` for a path record.
fn pci_ref(pdev: *mut bindings::pci_dev) -> *mut bindings::pci_dev {
    // SAFETY: the caller holds a reference to a live device.
    unsafe { bindings::pci_dev_get(pdev) }
}

/// `PATH_SYNTHETIC`: creates `/dev/tandem<index>` over `devt`.
pub(crate) fn make_synthetic(index: u32, devt: u32, pdev: *mut bindings::pci_dev) -> PathAnswer {
    let busy = PathAnswer { status: Status::Busy, us: 0 };
    if index >= MAX_VOLUMES {
        return PathAnswer { status: Status::BadMessage, us: 0 };
    }
    if find(index).is_some() {
        return busy;
    }
    match create(index, devt, pdev) {
        Ok(v) => {
            if VOLUMES.lock().push(v.clone(), GFP_KERNEL).is_err() {
                destroy(v);
                return PathAnswer { status: Status::Internal, us: 0 };
            }
            PathAnswer { status: Status::Ok, us: 0 }
        }
        Err(e) => {
            pr_err!("tandem{}: cannot create the volume: {:?}\n", index, e);
            PathAnswer { status: Status::Internal, us: 0 }
        }
    }
}

const HANDOFF0: Handoff<NSLOT> = Handoff::new();
const ACTIONS0: Actions<NACT> = Actions::new();
const SLOTS0: [Slot; NSLOT] = [FREE; NSLOT];
const JOBS0: Jobs = Jobs::new();

fn create(index: u32, devt: u32, pdev: *mut bindings::pci_dev) -> Result<Arc<Volume>> {
    // The big parts are constants copied to the heap, not built on the
    // kernel stack.
    let inner = Inner {
        h: KBox::new(HANDOFF0, GFP_KERNEL)?,
        acts: KBox::new(ACTIONS0, GFP_KERNEL)?,
        slots: KBox::new(SLOTS0, GFP_KERNEL)?,
        jobs: KBox::new(JOBS0, GFP_KERNEL)?,
        gen: 0,
        submitting: false,
        overflow: (null_mut(), null_mut()),
        paths: [NO_PATH, NO_PATH],
        to_close: [(null_mut(), null_mut()); 2],
        last_blackout_us: 0,
        last_done_us: 0,
        in_switch: false,
        switch_over: false,
        max_switch_gap_us: 0,
        max_gap_us: 0,
        cur_switch_gap_us: 0,
        switch_gaps_us: [0; GAPS],
        switch_gap_n: 0,
        disk: null_mut(),
        dead: false,
    };
    let v = Arc::pin_init(
        pin_init!(Volume {
            index,
            inner <- new_spinlock_irq!(inner, "tandem::volume"),
            work <- new_work!("tandem::volume::work"),
            bs: Opaque::uninit(),
        }),
        GFP_KERNEL,
    )?;
    // SAFETY: `bs` is uninitialized memory inside the pinned volume, not
    // yet used by anything. `bioset_init` expects it zeroed (it leaves the
    // per-CPU cache pointer alone unless asked for one).
    let r = unsafe {
        core::ptr::write_bytes(v.bs.get(), 0, 1);
        bindings::bioset_init(v.bs.get(), NSLOT as u32, core::mem::size_of::<CloneCtx>() as u32, 0)
    };
    if r != 0 {
        return Err(Error::from_errno(r));
    }
    let undo_bs = |v: &Arc<Volume>| {
        // SAFETY: initialized above; no bio was allocated from it.
        unsafe { bindings::bioset_exit(v.bs.get()) };
    };
    let raw = Arc::as_ptr(&v);
    let (file, bdev) = match open_path(raw, devt) {
        Ok(x) => x,
        Err(e) => {
            undo_bs(&v);
            return Err(e);
        }
    };
    let (sectors, lbs) = geometry(bdev);
    v.inner.lock().paths[0] = PathDev { file, bdev, pdev: pci_ref(pdev), refs: 0, gone: false };
    let undo_path = |v: &Arc<Volume>| {
        let p = core::mem::replace(&mut v.inner.lock().paths[0], NO_PATH);
        // SAFETY: no I/O was ever sent to it.
        unsafe { close_path(p.file, p.pdev) };
    };
    // SAFETY: zeroed limits are the block layer's "defaults" input.
    let mut lim: bindings::queue_limits = unsafe { core::mem::zeroed() };
    lim.logical_block_size = lbs;
    lim.physical_block_size = lbs;
    lim.features = BLK_FEAT_WRITE_CACHE | BLK_FEAT_FUA;
    // SAFETY: valid limits; a lock class key with static lifetime.
    let disk = unsafe { bindings::__blk_alloc_disk(&mut lim, -1, kernel::static_lock_class!().as_ptr()) };
    if is_err(disk) {
        undo_path(&v);
        undo_bs(&v);
        return Err(ENOMEM);
    }
    // The name: "tandem" and the index in decimal (under 100).
    let mut name = [0u8; 32];
    name[..6].copy_from_slice(b"tandem");
    let n = if index >= 10 {
        name[6] = b'0' + (index / 10) as u8;
        name[7] = b'0' + (index % 10) as u8;
        8
    } else {
        name[6] = b'0' + index as u8;
        7
    };
    name[n] = 0;
    // The reference behind `private_data` and the clones' contexts.
    let leaked = Arc::into_raw(v.clone());
    // SAFETY: a new disk, not yet visible; `FOPS` is static and only
    // written at module load.
    unsafe {
        (*disk).fops = &raw const FOPS;
        (*disk).private_data = leaked.cast_mut().cast::<c_void>();
        (*disk).flags |= bindings::GENHD_FL_NO_PART as c_int;
        (*disk).disk_name = name;
        bindings::set_capacity(disk, sectors);
    }
    v.inner.lock().disk = disk;
    // SAFETY: a fully set up disk.
    let r = unsafe { bindings::device_add_disk(null_mut(), disk, null_mut()) };
    if r != 0 {
        v.inner.lock().disk = null_mut();
        // SAFETY: never added; nothing else holds it. Then the leaked
        // reference comes back.
        unsafe {
            bindings::put_disk(disk);
            drop(Arc::from_raw(leaked));
        }
        undo_path(&v);
        undo_bs(&v);
        return Err(Error::from_errno(r));
    }
    pr_info!("tandem{}: {} sectors of {} bytes over its synthetic path\n", index, sectors, lbs);
    Ok(v)
}

/// Tears a volume down (module unload). Waits, bounded, for its I/O.
fn destroy(v: Arc<Volume>) {
    let disk = v.inner.lock().disk;
    if !disk.is_null() {
        // SAFETY: a disk we added; no new bio reaches us after this.
        unsafe { bindings::del_gendisk(disk) };
    }
    v.inner.lock().dead = true;
    let idle = v.wait(30_000, |g| g.slots.iter().all(|s| s.bio.is_null()) && g.overflow.0.is_null() && g.jobs.len == 0);
    if !idle {
        // Freeing now could let a late clone touch freed memory: leak.
        pr_err!("tandem{}: requests still outstanding after 30 s; the volume is leaked\n", v.index);
        return;
    }
    let w: *const Work<Volume> = &v.work;
    // SAFETY: an initialized work item in a live volume; waits for a
    // running instance and makes later enqueues fail.
    let was_pending = unsafe { bindings::disable_work_sync(Work::raw_get(w)) };
    if was_pending {
        // SAFETY: a pending work item owns one reference (`enqueue`).
        drop(unsafe { Arc::from_raw(Arc::as_ptr(&v)) });
    }
    let paths = {
        let mut g = v.inner.lock();
        [core::mem::replace(&mut g.paths[0], NO_PATH), core::mem::replace(&mut g.paths[1], NO_PATH)]
    };
    for p in paths {
        // SAFETY: no I/O is left on any path.
        unsafe { close_path(p.file, p.pdev) };
    }
    v.close_gone();
    // SAFETY: all clones are back (they came from `bs`); the disk is
    // deleted and this is our reference to it; the leaked reference of
    // `create` comes back.
    unsafe {
        bindings::bioset_exit(v.bs.get());
        if !disk.is_null() {
            bindings::put_disk(disk);
            drop(Arc::from_raw(Arc::as_ptr(&v)));
        }
    }
}

/// `PATH_DIRECT`: `devt` becomes the direct path of `index` and I/O moves
/// to it.
pub(crate) fn make_direct(index: u32, devt: u32, pdev: *mut bindings::pci_dev, wait_ms: u32) -> PathAnswer {
    let Some(v) = find(index) else {
        return PathAnswer { status: Status::NoDevice, us: 0 };
    };
    let current = {
        let g = v.inner.lock();
        let d = &g.paths[1];
        // SAFETY: an open block device.
        (!d.bdev.is_null() && !d.gone).then(|| unsafe { (*d.bdev).bd_dev })
    };
    match current {
        // Another function is the direct path.
        Some(cur) if cur != devt => return PathAnswer { status: Status::Busy, us: 0 },
        // Already this one: only the switch below.
        Some(_) => {}
        None => {
            let (file, bdev) = match open_path(Arc::as_ptr(&v), devt) {
                Ok(x) => x,
                Err(e) => {
                    pr_err!("tandem{}: cannot open the direct path: {:?}\n", index, e);
                    return PathAnswer { status: Status::NoDevice, us: 0 };
                }
            };
            let (sectors, lbs) = geometry(bdev);
            let (ssec, slbs) = geometry(v.inner.lock().paths[0].bdev);
            // A previous direct path still finishing its last requests is
            // closed first (bounded).
            let free = v.wait(MAX_WAIT_MS, |g| g.paths[1].file.is_null());
            if sectors != ssec || lbs != slbs || !free {
                if free {
                    pr_err!(
                        "tandem{}: the direct path has {} sectors of {} bytes, the synthetic {} of {}; refused\n",
                        index,
                        sectors,
                        lbs,
                        ssec,
                        slbs
                    );
                }
                // SAFETY: just opened, unused.
                unsafe { close_path(file, null_mut()) };
                let status = if free { Status::NoDevice } else { Status::Busy };
                return PathAnswer { status, us: 0 };
            }
            let mut g = v.inner.lock();
            g.paths[1] = PathDev { file, bdev, pdev: pci_ref(pdev), refs: 0, gone: false };
            g.h.direct_added();
        }
    }
    let mut fin = null_mut();
    {
        let mut g = v.inner.lock();
        let g = &mut *g;
        g.in_switch = true;
        g.switch_over = false;
        g.cur_switch_gap_us = 0;
        let _ = g.h.switch_to(Path::Direct, now_us(), &mut g.acts);
        g.route(index, &mut fin);
    }
    end_chain(fin);
    v.submit_jobs();
    let ok = v.wait(wait_ms.min(MAX_WAIT_MS), |g| g.h.active() == Path::Direct && g.h.switching_to().is_none());
    let us = u32::try_from(v.inner.lock().last_blackout_us).unwrap_or(u32::MAX);
    PathAnswer { status: if ok { Status::Ok } else { Status::TimedOut }, us }
}

/// `PATH_RELEASE` of `devt` for volume `index`: of its direct path, the
/// I/O moves off it and it is closed; of its synthetic path, the volume
/// itself goes away.
pub(crate) fn release(index: u32, devt: u32, wait_ms: u32) -> PathAnswer {
    let Some(v) = find(index) else {
        return PathAnswer { status: Status::NoDevice, us: 0 };
    };
    let synthetic = {
        let g = v.inner.lock();
        let d = &g.paths[0];
        // SAFETY: an open block device.
        !d.bdev.is_null() && unsafe { (*d.bdev).bd_dev } == devt
    };
    if synthetic {
        delete(v)
    } else {
        release_direct(index, v, devt, wait_ms)
    }
}

/// Deletes `/dev/tandem<N>`: only when nothing has it open and it has no
/// direct path (release that first), else BUSY and nothing changes. What
/// the application wrote is on the synthetic path's disk; a new
/// `PATH_SYNTHETIC` brings the volume back.
fn delete(v: Arc<Volume>) -> PathAnswer {
    let busy = PathAnswer { status: Status::Busy, us: 0 };
    {
        let g = v.inner.lock();
        let direct = &g.paths[1];
        if !direct.bdev.is_null() && !direct.gone {
            return busy;
        }
        // SAFETY: a disk we added (or none); `part0` lives as long as it.
        if !g.disk.is_null() && unsafe { bindings::atomic_read(&(*(*g.disk).part0).bd_openers) } > 0 {
            return busy;
        }
    }
    {
        let mut list = VOLUMES.lock();
        let Some(at) = list.iter().position(|x| Arc::ptr_eq(x, &v)) else {
            // Deleted meanwhile by another request.
            return PathAnswer { status: Status::NoDevice, us: 0 };
        };
        let _ = list.remove(at);
    }
    let index = v.index;
    // An open racing this point finds the disk going away (its I/O fails),
    // as with any deleted disk.
    destroy(v);
    pr_info!("tandem{}: deleted\n", index);
    PathAnswer { status: Status::Ok, us: 0 }
}

/// `PATH_RELEASE` of a direct path: the I/O of `index` moves off `devt`,
/// which is then closed.
fn release_direct(index: u32, v: Arc<Volume>, devt: u32, wait_ms: u32) -> PathAnswer {
    {
        let g = v.inner.lock();
        let d = &g.paths[1];
        // SAFETY: an open block device.
        if d.bdev.is_null() || d.gone || unsafe { (*d.bdev).bd_dev } != devt {
            // Not (or no longer) its direct path: nothing to move.
            return PathAnswer { status: Status::Ok, us: 0 };
        }
    }
    let mut fin = null_mut();
    {
        let mut g = v.inner.lock();
        let g = &mut *g;
        g.in_switch = true;
        g.switch_over = false;
        g.cur_switch_gap_us = 0;
        let _ = g.h.switch_to(Path::Synthetic, now_us(), &mut g.acts);
        g.route(index, &mut fin);
    }
    end_chain(fin);
    v.submit_jobs();
    // Off the path: I/O goes elsewhere, nothing of the application's and
    // no barrier is left on it. Then the core forgets it (not a loss) and
    // it is closed.
    let released = v.wait(wait_ms.min(MAX_WAIT_MS), |g| {
        g.h.active() == Path::Synthetic
            && g.h.switching_to() != Some(Path::Direct)
            && g.h.in_flight(Path::Direct) == 0
            && g.h.barrier_on() != Some(Path::Direct)
    }) && {
        let mut g = v.inner.lock();
        let ok = g.h.direct_released().is_ok();
        if ok {
            g.paths[1].gone = true;
        }
        ok
    };
    let us = u32::try_from(v.inner.lock().last_blackout_us).unwrap_or(u32::MAX);
    if !released {
        return PathAnswer { status: Status::TimedOut, us };
    }
    v.submit_jobs();
    v.close_gone();
    PathAnswer { status: Status::Ok, us }
}

/// A PCI function is leaving (its driver unbinds): a direct path on it is
/// lost now, before the driver tears its disk down.
pub(crate) fn function_leaving(pdev: *mut bindings::pci_dev) {
    let vols: KVec<Arc<Volume>> = {
        let g = VOLUMES.lock();
        let mut out = KVec::new();
        for v in g.iter() {
            let _ = out.push(v.clone(), GFP_KERNEL);
        }
        out
    };
    for v in vols {
        let mut fin = null_mut();
        let lost = {
            let mut g = v.inner.lock();
            if g.paths[1].pdev == pdev {
                g.lose_direct(v.index, "its function is being removed", &mut fin)
            } else {
                false
            }
        };
        end_chain(fin);
        if lost {
            v.submit_jobs();
        }
    }
}

/// [`f::state`] bits for a disk: a path of a volume, and the active one.
pub(crate) fn state_of(devt: u32) -> u32 {
    let g = VOLUMES.lock();
    for v in g.iter() {
        let i = v.inner.lock();
        for (k, p) in i.paths.iter().enumerate() {
            // SAFETY: an open block device.
            if !p.bdev.is_null() && !p.gone && unsafe { (*p.bdev).bd_dev } == devt {
                let active = i.h.switching_to().is_none() && pidx(i.h.active()) == k;
                return f::state::PATH | if active { f::state::ACTIVE_PATH } else { 0 };
            }
        }
    }
    0
}

/// debugfs `volumes`: one line per volume.
pub(crate) fn show(_: &(), out: &mut fmt::Formatter<'_>) -> fmt::Result {
    let g = VOLUMES.lock();
    for v in g.iter() {
        let i = v.inner.lock();
        let s = i.h.stats;
        write!(
            out,
            "tandem{} active={} switching={} direct={} switches={} losses={} reissued={} barriers={} \
             stale={} errors_to_app={} max_blackout_us={} last_blackout_us={} in_flight_synthetic={} \
             in_flight_direct={} parked={} waiting={} max_switch_gap_us={} max_gap_us={} switch_gaps_us=",
            v.index,
            i.h.active().name(),
            i.h.switching_to().map_or("no", |p| p.name()),
            if i.h.direct_present() { "yes" } else { "no" },
            s.switches,
            s.losses,
            s.reissued,
            s.barriers,
            s.stale_completions,
            s.errors_to_app,
            s.max_blackout_us,
            i.last_blackout_us,
            i.h.in_flight(Path::Synthetic),
            i.h.in_flight(Path::Direct),
            i.h.parked(),
            if i.overflow.0.is_null() { 0 } else { 1 },
            i.max_switch_gap_us,
            i.max_gap_us
        )?;
        // The last switches' largest gaps, oldest first.
        let (first, n) = (i.switch_gap_n.saturating_sub(GAPS), i.switch_gap_n);
        for k in first..n {
            write!(out, "{}{}", if k == first { "" } else { "," }, i.switch_gaps_us[k % GAPS])?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// The volumes, for the module's lifetime.
pub(crate) struct Registration(());

impl Registration {
    /// Module load; at most once. `owner` is the module (open disks keep
    /// it loaded).
    pub(crate) fn new(owner: *mut bindings::module) -> Result<Self> {
        // SAFETY: module load, before any disk exists: nothing reads FOPS.
        unsafe {
            VOLUMES.init();
            (*(&raw mut FOPS)).owner = owner;
        }
        Ok(Registration(()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let vols = core::mem::replace(&mut *VOLUMES.lock(), KVec::new());
        for v in vols {
            destroy(v);
        }
    }
}
