//! The NVMe controller: registers, queues, admin and I/O commands.
//!
//! Pure apart from the two things a controller touches: guest memory (the
//! DMA mappings, through `vm-memory`) and its namespaces' block backends.
//! It never signals interrupts itself: each call returns the MSI-X vectors
//! to raise, and the PCI function (plumbing) raises them.
//!
//! Commands execute synchronously when their doorbell is written, so a
//! command is never in flight inside the controller once the doorbell
//! write returns; only Asynchronous Event Requests wait, as the
//! specification intends. Submission entries the host has queued but the
//! controller has not fetched (the queue is frozen, or its completion
//! queue is full) are the "in-flight" work reported to the host.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::backend::BlockBackend;
use crate::cmd::{Command, Completion, CQE_SIZE, SQE_SIZE};
use crate::prp::{self, PrpError, PAGE};
use crate::spec::{admin, aen, cc, cns, csts, feature, io, log, reg, status, VERSION};

/// Largest queue (entries) the controller accepts: CAP.MQES + 1.
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// Maximum data transfer size as a power of two of the page size:
/// 2^5 * 4 KiB = 128 KiB.
pub const MDTS: u8 = 5;
const MAX_TRANSFER: usize = (PAGE as usize) << MDTS;
/// Outstanding Asynchronous Event Requests accepted (AERL + 1).
const AER_LIMIT: usize = 4;
/// Error log entries kept.
const ERROR_LOG_ENTRIES: usize = 16;

/// Fixed parameters of one controller (one PCI function).
#[derive(Clone, Debug)]
pub struct Params {
    pub controller_id: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// I/O queue pairs the controller implements.
    pub max_io_queues: u16,
    /// MSI-X vectors of the function.
    pub msix_vectors: u16,
}

/// Host-imposed policy, enforced here whatever the guest driver does
/// (the guest-side filter applies the same rules, but a guest can bypass
/// its own filter).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostPolicy {
    /// I/O submission queues are not fetched, and the guest may not reset
    /// or shut the controller down.
    pub frozen: bool,
    /// Ceiling on the I/O queue pairs granted by Set Features.
    pub max_io_queues: Option<u16>,
    /// A guest that owns the PF may enable VFs (config-space policy).
    #[serde(default)]
    pub manage_vfs: bool,
    /// How many VFs such a guest may enable.
    #[serde(default)]
    pub num_vfs_ceiling: u16,
}

/// Counters for the API and the tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub admin_commands: u64,
    pub io_commands: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// DMA attempts outside the memory mapped for the device.
    pub dma_faults: u64,
    /// Doorbell writes to queues that do not exist, or with bad values.
    pub invalid_doorbells: u64,
    /// MMIO doorbell writes (each one a vfio-user message).
    pub doorbell_writes: u64,
    pub controller_resets: u64,
    pub error_completions: u64,
    /// Guest operations refused because of the host policy.
    pub policy_refusals: u64,
    pub backend_errors: u64,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Sq {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
    cqid: u16,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Cq {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
    phase: bool,
    vector: u16,
    interrupts: bool,
}

impl Cq {
    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }
}

/// A queue as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct QueueInfo {
    pub qid: u16,
    pub kind: &'static str,
    pub entries: u32,
    pub head: u32,
    pub tail: u32,
    /// Submission queues: entries queued but not yet fetched.
    pub pending: u32,
    pub cqid_or_vector: u16,
}

/// What the guest driver has done with this controller (the host proxy
/// object mirrors it, F6).
#[derive(Clone, Debug, Serialize)]
pub struct ControllerState {
    pub enabled: bool,
    pub ready: bool,
    pub fatal: bool,
    pub shutdown: bool,
    pub io_queues_granted: u16,
    pub queues: Vec<QueueInfo>,
    /// Commands the guest has submitted that the controller has not
    /// completed (unfetched submission entries plus waiting AERs).
    pub in_flight: u32,
    pub aers_outstanding: u32,
    /// The guest uses shadow doorbells (Doorbell Buffer Config).
    pub shadow_doorbells: bool,
    pub policy: HostPolicy,
    pub stats: Stats,
}

#[derive(Clone, Copy, Debug, Default)]
struct ErrorEntry {
    count: u64,
    sqid: u16,
    cid: u16,
    status: u16,
    nsid: u32,
}

/// Outcome of an MMIO or admin step: the vectors to raise.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub irqs: Vec<u16>,
}

impl Effects {
    fn raise(&mut self, v: u16) {
        if !self.irqs.contains(&v) {
            self.irqs.push(v);
        }
    }
}

pub struct Controller {
    params: Params,
    namespaces: Vec<Arc<dyn BlockBackend>>,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    io_queues_granted: u16,
    features: [u32; 16],
    aers: VecDeque<u16>,
    events: VecDeque<u32>,
    errors: VecDeque<ErrorEntry>,
    error_count: u64,
    policy: HostPolicy,
    /// Bus mastering: without it the function may not touch memory.
    bus_master: bool,
    /// Shadow doorbell and event index buffers (Doorbell Buffer Config).
    dbbuf: Option<DoorbellBuffers>,
    stats: Stats,
}

/// Doorbell Buffer Config (NVMe 1.3, 5.7): the guest writes its I/O queue
/// doorbell values to `shadow` and only rings the MMIO doorbell when the
/// value crosses the event index the controller publishes in `eventidx`.
/// Over vfio-user every MMIO write is a message, so this saves one per
/// completion.
#[derive(Clone, Copy, Debug)]
struct DoorbellBuffers {
    shadow: u64,
    eventidx: u64,
}

fn le_put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn ascii(buf: &mut [u8], at: usize, len: usize, s: &str) {
    let mut field = vec![b' '; len];
    for (d, c) in field
        .iter_mut()
        .zip(s.bytes().filter(|b| b.is_ascii_graphic() || *b == b' '))
    {
        *d = c;
    }
    le_put(buf, at, &field);
}

impl Controller {
    pub fn new(params: Params, namespaces: Vec<Arc<dyn BlockBackend>>) -> Controller {
        let n = usize::from(params.max_io_queues) + 1;
        let mut c = Controller {
            params,
            namespaces,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            intms: 0,
            sqs: vec![None; n],
            cqs: vec![None; n],
            io_queues_granted: 0,
            features: [0; 16],
            aers: VecDeque::new(),
            events: VecDeque::new(),
            errors: VecDeque::new(),
            error_count: 0,
            policy: HostPolicy::default(),
            bus_master: false,
            dbbuf: None,
            stats: Stats::default(),
        };
        c.reset_features();
        c
    }

    fn reset_features(&mut self) {
        self.features = [0; 16];
        self.features[usize::from(feature::VOLATILE_WRITE_CACHE)] = 1;
        // Error recovery, arbitration: zero. Queues: none granted yet.
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn namespaces(&self) -> &[Arc<dyn BlockBackend>] {
        &self.namespaces
    }

    pub fn set_bus_master(&mut self, on: bool) {
        self.bus_master = on;
    }

    pub fn policy(&self) -> HostPolicy {
        self.policy
    }

    /// Sets the host policy; lifting a freeze resumes the queues.
    pub fn set_policy<M: GuestMemory>(&mut self, policy: HostPolicy, mem: Option<&M>) -> Effects {
        let thawed = self.policy.frozen && !policy.frozen;
        self.policy = policy;
        let mut fx = Effects::default();
        if let (true, Some(mem)) = (thawed, mem) {
            for qid in 1..self.sqs.len() {
                self.process_sq(mem, qid as u16, &mut fx);
            }
        }
        fx
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn state(&self) -> ControllerState {
        let mut queues = Vec::new();
        let mut in_flight = 0;
        for (qid, q) in self.sqs.iter().enumerate() {
            if let Some(q) = q {
                let pending = (q.tail + q.size - q.head) % q.size;
                in_flight += pending;
                queues.push(QueueInfo {
                    qid: qid as u16,
                    kind: "sq",
                    entries: q.size,
                    head: q.head,
                    tail: q.tail,
                    pending,
                    cqid_or_vector: q.cqid,
                });
            }
        }
        for (qid, q) in self.cqs.iter().enumerate() {
            if let Some(q) = q {
                queues.push(QueueInfo {
                    qid: qid as u16,
                    kind: "cq",
                    entries: q.size,
                    head: q.head,
                    tail: q.tail,
                    pending: 0,
                    cqid_or_vector: q.vector,
                });
            }
        }
        ControllerState {
            enabled: self.cc & cc::EN != 0,
            ready: self.csts & csts::RDY != 0,
            fatal: self.csts & csts::CFS != 0,
            shutdown: self.csts & csts::SHST_COMPLETE != 0,
            io_queues_granted: self.io_queues_granted,
            queues,
            in_flight: in_flight + self.aers.len() as u32,
            aers_outstanding: self.aers.len() as u32,
            shadow_doorbells: self.dbbuf.is_some(),
            policy: self.policy,
            stats: self.stats.clone(),
        }
    }

    fn cap(&self) -> u64 {
        let mqes = u64::from(MAX_QUEUE_ENTRIES - 1);
        let cqr = 1u64 << 16;
        // Timeout: 10 s in 500 ms units.
        let to = 20u64 << 24;
        // Command sets supported: NVM.
        let css = 1u64 << 37;
        mqes | cqr | to | css
    }

    /// A register read from BAR0.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let regs: [(u64, u64, usize); 9] = [
            (reg::CAP, self.cap(), 8),
            (reg::VS, u64::from(VERSION), 4),
            (reg::INTMS, u64::from(self.intms), 4),
            (reg::INTMC, u64::from(self.intms), 4),
            (reg::CC, u64::from(self.cc), 4),
            (reg::CSTS, u64::from(self.csts), 4),
            (reg::AQA, u64::from(self.aqa), 4),
            (reg::ASQ, self.asq, 8),
            (reg::ACQ, self.acq, 8),
        ];
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = regs
                .iter()
                .find(|(o, _, w)| at >= *o && at < o + *w as u64)
                .map_or(0, |(o, v, _)| (v >> (8 * (at - o))) as u8);
        }
    }

    /// A register or doorbell write to BAR0.
    pub fn mmio_write<M: GuestMemory>(
        &mut self,
        mem: Option<&M>,
        offset: u64,
        data: &[u8],
    ) -> Effects {
        let mut fx = Effects::default();
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let val = u64::from_le_bytes(v);
        let v32 = val as u32;
        match offset {
            reg::INTMS => self.intms |= v32,
            reg::INTMC => self.intms &= !v32,
            reg::CC => self.write_cc(mem, v32),
            reg::AQA => self.aqa = v32 & 0x0fff_0fff,
            reg::ASQ => self.asq = merge(self.asq, 0, data) & !0xfff,
            0x2c => self.asq = merge(self.asq, 4, data) & !0xfff,
            reg::ACQ => self.acq = merge(self.acq, 0, data) & !0xfff,
            0x34 => self.acq = merge(self.acq, 4, data) & !0xfff,
            o if o >= reg::DOORBELL_BASE => {
                self.stats.doorbell_writes += 1;
                let idx = (o - reg::DOORBELL_BASE) / 4;
                let qid = idx / 2;
                if !(o - reg::DOORBELL_BASE).is_multiple_of(4) || data.len() != 4 {
                    self.invalid_doorbell(aen::INFO_INVALID_DOORBELL, &mut fx, mem);
                } else if let Some(mem) = mem {
                    if idx.is_multiple_of(2) {
                        self.sq_doorbell(mem, qid, v32, &mut fx);
                    } else {
                        self.cq_doorbell(mem, qid, v32, &mut fx);
                    }
                } else {
                    // No memory mapped at all: nothing can be fetched.
                    self.stats.dma_faults += 1;
                }
            }
            // CAP, VS, CSTS, NSSR and reserved space: read-only or
            // unsupported; writes are ignored as hardware ignores them.
            _ => {}
        }
        fx
    }

    fn write_cc<M: GuestMemory>(&mut self, mem: Option<&M>, v: u32) {
        let was = self.cc & cc::EN != 0;
        let now = v & cc::EN != 0;
        if was && !now && self.policy.frozen {
            self.stats.policy_refusals += 1;
            warn!(
                cntlid = self.params.controller_id,
                "controller reset refused: the host has this function frozen"
            );
            return;
        }
        let shn = (v >> cc::SHN_SHIFT) & 3;
        self.cc = v;
        if shn != 0 && self.csts & csts::SHST_COMPLETE == 0 {
            self.flush_all();
            self.csts |= csts::SHST_COMPLETE;
            info!(cntlid = self.params.controller_id, "shutdown complete");
        } else if shn == 0 {
            self.csts &= !csts::SHST_COMPLETE;
        }
        if !was && now {
            self.enable();
        } else if was && !now {
            self.controller_reset();
        }
        let _ = mem;
    }

    fn enable(&mut self) {
        let mps = (self.cc >> cc::MPS_SHIFT) & 0xf;
        let css = (self.cc >> cc::CSS_SHIFT) & 7;
        let asqs = (self.aqa & 0xfff) + 1;
        let acqs = ((self.aqa >> 16) & 0xfff) + 1;
        if mps != 0 || css != 0 || asqs < 2 || acqs < 2 || self.asq == 0 || self.acq == 0 {
            warn!(
                cntlid = self.params.controller_id,
                mps,
                css,
                asqs,
                acqs,
                "enable with a bad admin queue or page size: controller fatal"
            );
            self.csts |= csts::CFS;
            return;
        }
        self.sqs[0] = Some(Sq {
            base: self.asq,
            size: asqs,
            head: 0,
            tail: 0,
            cqid: 0,
        });
        self.cqs[0] = Some(Cq {
            base: self.acq,
            size: acqs,
            head: 0,
            tail: 0,
            phase: true,
            vector: 0,
            interrupts: true,
        });
        self.csts |= csts::RDY;
        info!(cntlid = self.params.controller_id, "controller enabled");
    }

    /// Controller reset (CC.EN 1 to 0, or a function-level reset): every
    /// queue is deleted, outstanding AERs are dropped without completion.
    pub fn controller_reset(&mut self) {
        for q in self.sqs.iter_mut() {
            *q = None;
        }
        for q in self.cqs.iter_mut() {
            *q = None;
        }
        self.aers.clear();
        self.events.clear();
        self.dbbuf = None;
        self.io_queues_granted = 0;
        self.csts &= !(csts::RDY | csts::CFS);
        self.reset_features();
        self.stats.controller_resets += 1;
        debug!(cntlid = self.params.controller_id, "controller reset");
    }

    /// Function-level reset: a controller reset plus the registers.
    pub fn function_reset(&mut self) {
        self.controller_reset();
        self.cc = 0;
        self.csts = 0;
        self.aqa = 0;
        self.asq = 0;
        self.acq = 0;
        self.intms = 0;
    }

    fn flush_all(&mut self) {
        for ns in &self.namespaces {
            if let Err(e) = ns.flush() {
                self.stats.backend_errors += 1;
                warn!(disk = %ns.describe(), error = %e, "flush failed");
            }
        }
    }

    fn invalid_doorbell<M: GuestMemory>(&mut self, info: u32, fx: &mut Effects, mem: Option<&M>) {
        self.stats.invalid_doorbells += 1;
        debug!(
            cntlid = self.params.controller_id,
            info, "invalid doorbell write"
        );
        // Asynchronous event: error status, with the error log page.
        let dw0 = aen::TYPE_ERROR | (info << 8) | (u32::from(log::ERROR_INFO) << 16);
        if self.events.len() < 16 {
            self.events.push_back(dw0);
        }
        if let Some(mem) = mem {
            self.deliver_events(mem, fx);
        }
    }

    fn sq_doorbell<M: GuestMemory>(&mut self, mem: &M, qid: u64, tail: u32, fx: &mut Effects) {
        let Some(Some(sq)) = usize::try_from(qid).ok().and_then(|q| self.sqs.get_mut(q)) else {
            self.invalid_doorbell(aen::INFO_INVALID_DOORBELL, fx, Some(mem));
            return;
        };
        if tail >= sq.size {
            self.invalid_doorbell(aen::INFO_INVALID_DOORBELL_VALUE, fx, Some(mem));
            return;
        }
        sq.tail = tail;
        self.process_sq(mem, qid as u16, fx);
    }

    fn cq_doorbell<M: GuestMemory>(&mut self, mem: &M, qid: u64, head: u32, fx: &mut Effects) {
        let Some(Some(cq)) = usize::try_from(qid).ok().and_then(|q| self.cqs.get_mut(q)) else {
            self.invalid_doorbell(aen::INFO_INVALID_DOORBELL, fx, Some(mem));
            return;
        };
        if head >= cq.size {
            self.invalid_doorbell(aen::INFO_INVALID_DOORBELL_VALUE, fx, Some(mem));
            return;
        }
        let was_full = cq.full();
        cq.head = head;
        if was_full {
            // Submission queues stalled on this completion queue resume.
            let sqids: Vec<u16> = self
                .sqs
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.filter(|s| u64::from(s.cqid) == qid).map(|_| i as u16))
                .collect();
            for s in sqids {
                self.process_sq(mem, s, fx);
            }
        }
    }

    fn fatal(&mut self, why: &str) {
        if self.csts & csts::CFS == 0 {
            warn!(
                cntlid = self.params.controller_id,
                why, "controller fatal status"
            );
        }
        self.csts |= csts::CFS;
    }

    /// The shadow doorbell of doorbell index `idx`, when shadows are on.
    fn shadow<M: GuestMemory>(&self, mem: &M, idx: u64) -> Option<u32> {
        let db = self.dbbuf?;
        mem.read_obj::<u32>(GuestAddress(db.shadow + idx * 4)).ok()
    }

    fn set_eventidx<M: GuestMemory>(&self, mem: &M, idx: u64, value: u32) {
        if let Some(db) = self.dbbuf {
            let _ = mem.write_obj(value, GuestAddress(db.eventidx + idx * 4));
            // The guest reads the event index after writing its shadow; we
            // read the shadow after writing the event index: both orders
            // need a full barrier between the store and the load.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Takes the I/O submission queue's tail from its shadow doorbell.
    fn sync_sq_shadow<M: GuestMemory>(&mut self, mem: &M, qid: u16) {
        if qid == 0 {
            return;
        }
        let v = self.shadow(mem, 2 * u64::from(qid));
        if let (Some(v), Some(Some(sq))) = (v, self.sqs.get_mut(usize::from(qid))) {
            if v < sq.size {
                sq.tail = v;
            }
        }
    }

    /// Takes the I/O completion queue's head from its shadow doorbell and
    /// says whether the queue is full. When it is, the event index asks
    /// the guest to ring as soon as it consumes an entry; otherwise it sits
    /// just behind the head, so the guest never needs to ring.
    fn cq_full<M: GuestMemory>(&mut self, mem: &M, cqid: u16) -> bool {
        let idx = 2 * u64::from(cqid) + 1;
        let shadowed = cqid != 0 && self.dbbuf.is_some();
        for _ in 0..2 {
            if shadowed {
                let v = self.shadow(mem, idx);
                if let (Some(v), Some(Some(cq))) = (v, self.cqs.get_mut(usize::from(cqid))) {
                    if v < cq.size {
                        cq.head = v;
                    }
                }
            }
            let Some(Some(cq)) = self.cqs.get(usize::from(cqid)).copied() else {
                return true;
            };
            if !cq.full() {
                if shadowed {
                    self.set_eventidx(mem, idx, (cq.head + 0xffff) & 0xffff);
                }
                return false;
            }
            if !shadowed {
                return true;
            }
            self.set_eventidx(mem, idx, cq.head);
        }
        true
    }

    /// Fetches and executes what submission queue `qid` holds.
    fn process_sq<M: GuestMemory>(&mut self, mem: &M, qid: u16, fx: &mut Effects) {
        if !self.bus_master || self.csts & (csts::RDY | csts::CFS) != csts::RDY {
            return;
        }
        if qid != 0 && self.policy.frozen {
            return;
        }
        // With shadow doorbells the guest may queue more while we work and
        // skip the MMIO write if our event index says we are busy, so after
        // publishing the event index we look at the shadow again, until it
        // has nothing new: commands left there now would never be rung for
        // (the guest waits for their completions). This used to stop after
        // 8 passes, and a slow namespace let a guest at QD16 add more than
        // that one at a time: its I/O sat in the queue until it timed out.
        // Bounded all the same: every pass takes at least one command, and
        // the completion queue (whose interrupt comes after we return)
        // fills within MAX_QUEUE_ENTRIES of them.
        for _ in 0..MAX_QUEUE_ENTRIES {
            self.sync_sq_shadow(mem, qid);
            if !self.process_sq_once(mem, qid, fx) || qid == 0 || self.dbbuf.is_none() {
                return;
            }
            let Some(Some(sq)) = self.sqs.get(usize::from(qid)).copied() else {
                return;
            };
            self.set_eventidx(mem, 2 * u64::from(qid), sq.head);
            match self.shadow(mem, 2 * u64::from(qid)) {
                Some(t) if t != sq.head && t < sq.size => continue,
                _ => return,
            }
        }
    }

    /// One pass over a submission queue; true when it was drained (not
    /// stopped by a full completion queue or an error).
    fn process_sq_once<M: GuestMemory>(&mut self, mem: &M, qid: u16, fx: &mut Effects) -> bool {
        // Bounded: at most one pass over the queue.
        for _ in 0..MAX_QUEUE_ENTRIES {
            let Some(Some(sq)) = self.sqs.get(usize::from(qid)).copied() else {
                return false;
            };
            if sq.head == sq.tail {
                return true;
            }
            if self
                .cqs
                .get(usize::from(sq.cqid))
                .copied()
                .flatten()
                .is_none()
            {
                return false;
            }
            if self.cq_full(mem, sq.cqid) {
                return false;
            }
            let mut raw = [0u8; SQE_SIZE];
            let at = sq.base + u64::from(sq.head) * SQE_SIZE as u64;
            if mem.read_slice(&mut raw, GuestAddress(at)).is_err() {
                self.stats.dma_faults += 1;
                self.fatal("submission queue entry outside DMA-mapped memory");
                return false;
            }
            let head = (sq.head + 1) % sq.size;
            if let Some(Some(s)) = self.sqs.get_mut(usize::from(qid)) {
                s.head = head;
            }
            let cmd = Command::parse(&raw);
            let (st, dw0) = if qid == 0 {
                self.stats.admin_commands += 1;
                self.admin(mem, &cmd, fx)
            } else {
                self.stats.io_commands += 1;
                (Some(self.io(mem, &cmd)), 0)
            };
            if let Some(st) = st {
                if st & 0x3fff != status::SUCCESS {
                    debug!(
                        cntlid = self.params.controller_id,
                        qid,
                        opcode = cmd.opcode,
                        cdw10 = cmd.cdw10,
                        status = format_args!("{st:#x}"),
                        "command failed"
                    );
                }
                self.complete(mem, qid, head as u16, cmd.cid, st, dw0, cmd.nsid, fx);
            }
        }
        self.sqs
            .get(usize::from(qid))
            .copied()
            .flatten()
            .is_some_and(|q| q.head == q.tail)
    }

    #[allow(clippy::too_many_arguments)]
    fn complete<M: GuestMemory>(
        &mut self,
        mem: &M,
        sqid: u16,
        sq_head: u16,
        cid: u16,
        st: u16,
        dw0: u32,
        nsid: u32,
        fx: &mut Effects,
    ) {
        if st & 0x3fff != status::SUCCESS {
            self.stats.error_completions += 1;
            self.error_count += 1;
            if self.errors.len() == ERROR_LOG_ENTRIES {
                self.errors.pop_back();
            }
            self.errors.push_front(ErrorEntry {
                count: self.error_count,
                sqid,
                cid,
                status: st,
                nsid,
            });
        }
        let cqid = self
            .sqs
            .get(usize::from(sqid))
            .copied()
            .flatten()
            .map_or(0, |s| s.cqid);
        let Some(Some(cq)) = self.cqs.get_mut(usize::from(cqid)) else {
            return;
        };
        let entry = Completion {
            dw0,
            sq_head,
            sq_id: sqid,
            cid,
            status: st,
        }
        .encode(cq.phase);
        let at = cq.base + u64::from(cq.tail) * CQE_SIZE as u64;
        if mem.write_slice(&entry, GuestAddress(at)).is_err() {
            self.stats.dma_faults += 1;
            self.fatal("completion queue outside DMA-mapped memory");
            return;
        }
        cq.tail = (cq.tail + 1) % cq.size;
        if cq.tail == 0 {
            cq.phase = !cq.phase;
        }
        if cq.interrupts {
            fx.raise(cq.vector);
        }
    }

    fn deliver_events<M: GuestMemory>(&mut self, mem: &M, fx: &mut Effects) {
        while !self.events.is_empty() && !self.aers.is_empty() {
            let (Some(dw0), Some(cid)) = (self.events.pop_front(), self.aers.pop_front()) else {
                break;
            };
            let head = self.sqs[0].map_or(0, |s| s.head) as u16;
            self.complete(mem, 0, head, cid, status::SUCCESS, dw0, 0, fx);
        }
    }

    /// Executes an admin command: `None` when it completes later (AER).
    fn admin<M: GuestMemory>(
        &mut self,
        mem: &M,
        c: &Command,
        fx: &mut Effects,
    ) -> (Option<u16>, u32) {
        let done = |st: u16| (Some(st), 0);
        match c.opcode {
            admin::IDENTIFY => done(self.identify(mem, c)),
            admin::SET_FEATURES => {
                let (st, dw0) = self.set_features(c);
                (Some(st), dw0)
            }
            admin::GET_FEATURES => {
                let (st, dw0) = self.get_features(c);
                (Some(st), dw0)
            }
            admin::CREATE_CQ => done(self.create_cq(c)),
            admin::CREATE_SQ => done(self.create_sq(c)),
            admin::DELETE_SQ => done(self.delete_sq(c)),
            admin::DELETE_CQ => done(self.delete_cq(c)),
            admin::GET_LOG_PAGE => done(self.get_log_page(mem, c)),
            admin::ASYNC_EVENT_REQUEST => {
                if self.aers.len() >= AER_LIMIT {
                    return done(status::ASYNC_EVENT_LIMIT | status::DNR);
                }
                self.aers.push_back(c.cid);
                self.deliver_events(mem, fx);
                (None, 0)
            }
            // Nothing is ever in flight when an Abort arrives (commands run
            // to completion at their doorbell): "command not aborted".
            admin::ABORT => (Some(status::SUCCESS), 1),
            admin::KEEP_ALIVE => done(status::SUCCESS),
            admin::DOORBELL_BUFFER_CONFIG => done(self.doorbell_buffer_config(mem, c)),
            admin::FORMAT_NVM if self.policy.frozen => {
                self.stats.policy_refusals += 1;
                done(status::COMMAND_SEQUENCE_ERROR | status::DNR)
            }
            _ => done(status::INVALID_OPCODE | status::DNR),
        }
    }

    fn doorbell_buffer_config<M: GuestMemory>(&mut self, mem: &M, c: &Command) -> u16 {
        let ok = |a: u64| {
            a != 0
                && a.is_multiple_of(PAGE)
                && mem.read_obj::<u32>(GuestAddress(a + PAGE - 4)).is_ok()
        };
        if !ok(c.prp1) || !ok(c.prp2) || c.prp1 == c.prp2 {
            return status::INVALID_FIELD | status::DNR;
        }
        self.dbbuf = Some(DoorbellBuffers {
            shadow: c.prp1,
            eventidx: c.prp2,
        });
        debug!(cntlid = self.params.controller_id, "shadow doorbells on");
        status::SUCCESS
    }

    fn write_data<M: GuestMemory>(&mut self, mem: &M, c: &Command, data: &[u8]) -> u16 {
        let segs = match prp::segments(mem, c.prp1, c.prp2, data.len(), MAX_TRANSFER) {
            Ok(s) => s,
            Err(e) => return self.prp_error(e),
        };
        let mut off = 0;
        for (addr, len) in segs {
            if mem
                .write_slice(&data[off..off + len], GuestAddress(addr))
                .is_err()
            {
                self.stats.dma_faults += 1;
                return status::DATA_TRANSFER_ERROR;
            }
            off += len;
        }
        status::SUCCESS
    }

    fn prp_error(&mut self, e: PrpError) -> u16 {
        if matches!(e, PrpError::Unmapped(_)) {
            self.stats.dma_faults += 1;
        }
        debug!(error = %e, "PRP");
        e.status() | status::DNR
    }

    fn identify<M: GuestMemory>(&mut self, mem: &M, c: &Command) -> u16 {
        let mut page = vec![0u8; 4096];
        match c.cdw10 & 0xff {
            cns::CONTROLLER => self.identify_controller(&mut page),
            cns::NAMESPACE => {
                if c.nsid == 0xffff_ffff {
                    // Common namespace capabilities: the format we use.
                    page[26] = 0; // FLBAS
                    le_put(&mut page, 128, &(9u32 << 16).to_le_bytes());
                } else if let Some(ns) = self.ns(c.nsid) {
                    let blocks = ns.size() / 512;
                    le_put(&mut page, 0, &blocks.to_le_bytes());
                    le_put(&mut page, 8, &blocks.to_le_bytes());
                    le_put(&mut page, 16, &blocks.to_le_bytes());
                    // NLBAF = 0 (one format), FLBAS = 0; LBAF0: 512-byte
                    // blocks, no metadata, best performance.
                    le_put(&mut page, 128, &(9u32 << 16).to_le_bytes());
                } else if c.nsid == 0 {
                    return status::INVALID_NAMESPACE | status::DNR;
                }
                // An inactive valid NSID: a zero-filled structure.
            }
            cns::ACTIVE_NS_LIST => {
                let mut at = 0;
                for id in 1..=self.namespaces.len() as u32 {
                    if id > c.nsid && at < 4096 {
                        le_put(&mut page, at, &id.to_le_bytes());
                        at += 4;
                    }
                }
            }
            cns::NS_DESCRIPTORS => {
                let Some(ns) = self.ns(c.nsid) else {
                    return status::INVALID_NAMESPACE | status::DNR;
                };
                // NGUID (type 2, 16 bytes) derived from the controller and
                // the backend, stable across restarts.
                let id = nguid(&self.params.serial, &ns.describe(), c.nsid);
                page[0] = 2;
                page[1] = 16;
                le_put(&mut page, 4, &id);
            }
            _ => return status::INVALID_FIELD | status::DNR,
        }
        self.write_data(mem, c, &page)
    }

    fn identify_controller(&self, p: &mut [u8]) {
        let p16 = |p: &mut [u8], at, v: u16| le_put(p, at, &v.to_le_bytes());
        let p32 = |p: &mut [u8], at, v: u32| le_put(p, at, &v.to_le_bytes());
        // VID/SSVID: the PCI identity's vendor.
        p16(p, 0, crate::VENDOR_ID);
        p16(p, 2, crate::VENDOR_ID);
        ascii(p, 4, 20, &self.params.serial);
        ascii(p, 24, 40, &self.params.model);
        ascii(p, 64, 8, &self.params.firmware);
        p[72] = 0; // RAB
        p[77] = MDTS;
        p16(p, 78, self.params.controller_id);
        p32(p, 80, VERSION);
        // OAES: none. CTRATT: none. CNTRLTYPE (1.4): I/O controller.
        p[111] = 1;
        // OACS: Doorbell Buffer Config only.
        p16(p, 256, 1 << 8);
        p[258] = 3; // ACL: 4 aborts
        p[259] = (AER_LIMIT - 1) as u8; // AERL
        p[260] = 0x03; // FRMW: slot 1 read-only, one slot
        p[261] = 0; // LPA
        p[262] = (ERROR_LOG_ENTRIES - 1) as u8; // ELPE
        p[263] = 0; // NPSS: one power state
        p16(p, 266, 0x157); // WCTEMP 343 K
        p16(p, 268, 0x175); // CCTEMP 373 K
        p[512] = 0x66; // SQES
        p[513] = 0x44; // CQES
        p32(p, 516, self.namespaces.len() as u32); // NN
                                                   // ONCS: Write Zeroes.
        p16(p, 520, 1 << 3);
        p[525] = 1; // VWC present
        p16(p, 526, 0); // AWUN
        p32(p, 536, 0); // SGLS: PRPs only
        let nqn = format!("nqn.2026-11.dev.tandem:nvme:{}", self.params.serial.trim());
        let n = nqn.len().min(255);
        le_put(p, 768, &nqn.as_bytes()[..n]);
        // Power state 0: 25 W max.
        p16(p, 2048, 2500);
    }

    fn ns(&self, nsid: u32) -> Option<&Arc<dyn BlockBackend>> {
        let i = usize::try_from(nsid.checked_sub(1)?).ok()?;
        self.namespaces.get(i)
    }

    fn set_features(&mut self, c: &Command) -> (u16, u32) {
        let fid = (c.cdw10 & 0xff) as u8;
        if c.cdw10 & (1 << 31) != 0 {
            return (status::FEATURE_NOT_SAVEABLE | status::DNR, 0);
        }
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let nsqr = c.cdw11 & 0xffff;
                let ncqr = c.cdw11 >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return (status::INVALID_FIELD | status::DNR, 0);
                }
                if self.io_queues_granted != 0 {
                    // Only once per controller enable (5.21.1.7).
                    let g = u32::from(self.io_queues_granted - 1);
                    return (status::COMMAND_SEQUENCE_ERROR | status::DNR, g | (g << 16));
                }
                let mut max = self.params.max_io_queues;
                if let Some(ceiling) = self.policy.max_io_queues {
                    if u32::from(ceiling) < nsqr.max(ncqr) + 1 {
                        self.stats.policy_refusals += 1;
                        info!(
                            cntlid = self.params.controller_id,
                            asked = nsqr.max(ncqr) + 1,
                            ceiling,
                            "I/O queue count capped by host policy"
                        );
                    }
                    max = max.min(ceiling.max(1));
                }
                let granted = (nsqr.max(ncqr) + 1).min(u32::from(max)) as u16;
                self.io_queues_granted = granted;
                let g = u32::from(granted - 1);
                (status::SUCCESS, g | (g << 16))
            }
            feature::ARBITRATION
            | feature::POWER_MANAGEMENT
            | feature::TEMPERATURE_THRESHOLD
            | feature::ERROR_RECOVERY
            | feature::VOLATILE_WRITE_CACHE
            | feature::INTERRUPT_COALESCING
            | feature::INTERRUPT_VECTOR_CONFIG
            | feature::WRITE_ATOMICITY
            | feature::ASYNC_EVENT_CONFIG => {
                if fid == feature::POWER_MANAGEMENT && c.cdw11 & 0x1f != 0 {
                    // Only power state 0 exists.
                    return (status::INVALID_FIELD | status::DNR, 0);
                }
                if fid == feature::VOLATILE_WRITE_CACHE && c.cdw11 & 1 == 0 {
                    // Turning the cache off: what was written is now durable.
                    self.flush_all();
                }
                self.features[usize::from(fid)] = c.cdw11;
                (status::SUCCESS, 0)
            }
            _ => (status::INVALID_FIELD | status::DNR, 0),
        }
    }

    fn get_features(&mut self, c: &Command) -> (u16, u32) {
        let fid = (c.cdw10 & 0xff) as u8;
        let sel = (c.cdw10 >> 8) & 7;
        if sel == 3 {
            // Supported capabilities: changeable, not saveable.
            return (status::SUCCESS, 1 << 2);
        }
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let g = u32::from(self.io_queues_granted.max(1).min(self.params.max_io_queues) - 1);
                (status::SUCCESS, g | (g << 16))
            }
            f if usize::from(f) < self.features.len() && f != 0 && f != 3 => {
                (status::SUCCESS, self.features[usize::from(f)])
            }
            _ => (status::INVALID_FIELD | status::DNR, 0),
        }
    }

    fn queue_limit(&self) -> u16 {
        self.io_queues_granted.min(self.params.max_io_queues)
    }

    fn create_cq(&mut self, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as u16;
        let size = (c.cdw10 >> 16) + 1;
        let pc = c.cdw11 & 1 != 0;
        let ien = c.cdw11 & 2 != 0;
        let iv = (c.cdw11 >> 16) as u16;
        if qid == 0 || qid > self.queue_limit() || self.cqs[usize::from(qid)].is_some() {
            return status::INVALID_QUEUE_ID | status::DNR;
        }
        if !(2..=MAX_QUEUE_ENTRIES).contains(&size) {
            return status::INVALID_QUEUE_SIZE | status::DNR;
        }
        if !pc || !c.prp1.is_multiple_of(PAGE) {
            // CAP.CQR: queues must be physically contiguous and page aligned.
            return status::INVALID_FIELD | status::DNR;
        }
        if ien && iv >= self.params.msix_vectors {
            return status::INVALID_INTERRUPT_VECTOR | status::DNR;
        }
        self.cqs[usize::from(qid)] = Some(Cq {
            base: c.prp1,
            size,
            head: 0,
            tail: 0,
            phase: true,
            vector: iv,
            interrupts: ien,
        });
        status::SUCCESS
    }

    fn create_sq(&mut self, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as u16;
        let size = (c.cdw10 >> 16) + 1;
        let pc = c.cdw11 & 1 != 0;
        let cqid = (c.cdw11 >> 16) as u16;
        if qid == 0 || qid > self.queue_limit() || self.sqs[usize::from(qid)].is_some() {
            return status::INVALID_QUEUE_ID | status::DNR;
        }
        if !(2..=MAX_QUEUE_ENTRIES).contains(&size) {
            return status::INVALID_QUEUE_SIZE | status::DNR;
        }
        if cqid == 0 || self.cqs.get(usize::from(cqid)).copied().flatten().is_none() {
            return status::CQ_INVALID | status::DNR;
        }
        if !pc || !c.prp1.is_multiple_of(PAGE) {
            return status::INVALID_FIELD | status::DNR;
        }
        self.sqs[usize::from(qid)] = Some(Sq {
            base: c.prp1,
            size,
            head: 0,
            tail: 0,
            cqid,
        });
        status::SUCCESS
    }

    fn delete_sq(&mut self, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as usize;
        if qid == 0 || self.sqs.get(qid).copied().flatten().is_none() {
            return status::INVALID_QUEUE_ID | status::DNR;
        }
        // Unfetched entries are dropped; the host knows (it deleted the
        // queue), and nothing was started for them.
        self.sqs[qid] = None;
        status::SUCCESS
    }

    fn delete_cq(&mut self, c: &Command) -> u16 {
        let qid = (c.cdw10 & 0xffff) as u16;
        if qid == 0 || self.cqs.get(usize::from(qid)).copied().flatten().is_none() {
            return status::INVALID_QUEUE_ID | status::DNR;
        }
        if self.sqs.iter().flatten().any(|s| s.cqid == qid) {
            return status::INVALID_QUEUE_DELETION | status::DNR;
        }
        self.cqs[usize::from(qid)] = None;
        status::SUCCESS
    }

    fn get_log_page<M: GuestMemory>(&mut self, mem: &M, c: &Command) -> u16 {
        let lid = (c.cdw10 & 0xff) as u8;
        let numd = ((c.cdw10 >> 16) & 0xffff) | ((c.cdw11 & 0xffff) << 16);
        let len = (u64::from(numd) + 1) * 4;
        let offset = u64::from(c.cdw12) | (u64::from(c.cdw13) << 32);
        let mut page = match lid {
            log::ERROR_INFO => {
                let mut p = vec![0u8; 64 * ERROR_LOG_ENTRIES];
                for (i, e) in self.errors.iter().enumerate() {
                    let at = i * 64;
                    le_put(&mut p, at, &e.count.to_le_bytes());
                    le_put(&mut p, at + 8, &e.sqid.to_le_bytes());
                    le_put(&mut p, at + 10, &e.cid.to_le_bytes());
                    le_put(&mut p, at + 12, &(e.status << 1).to_le_bytes());
                    le_put(&mut p, at + 14, &0xffffu16.to_le_bytes());
                    le_put(&mut p, at + 24, &e.nsid.to_le_bytes());
                }
                p
            }
            log::SMART => {
                let mut p = vec![0u8; 512];
                // Composite temperature 308 K, spare 100%, threshold 10%.
                le_put(&mut p, 1, &308u16.to_le_bytes());
                p[3] = 100;
                p[4] = 10;
                let units = |bytes: u64| u128::from(bytes / 512_000);
                le_put(&mut p, 32, &units(self.stats.bytes_read).to_le_bytes());
                le_put(&mut p, 48, &units(self.stats.bytes_written).to_le_bytes());
                le_put(&mut p, 64, &u128::from(self.stats.reads).to_le_bytes());
                le_put(&mut p, 80, &u128::from(self.stats.writes).to_le_bytes());
                le_put(&mut p, 160, &u128::from(self.error_count).to_le_bytes());
                p
            }
            log::FIRMWARE_SLOT => {
                let mut p = vec![0u8; 512];
                p[0] = 1; // active slot 1
                ascii(&mut p, 8, 8, &self.params.firmware);
                p
            }
            _ => return status::INVALID_LOG_PAGE | status::DNR,
        };
        if offset % 4 != 0 || offset > page.len() as u64 {
            return status::INVALID_FIELD | status::DNR;
        }
        page.drain(..offset as usize);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_TRANSFER {
            return status::INVALID_FIELD | status::DNR;
        }
        page.resize(len, 0);
        if lid == log::ERROR_INFO {
            // Reading the error log clears the error asynchronous events.
            self.events.retain(|e| e & 7 != aen::TYPE_ERROR);
        }
        self.write_data(mem, c, &page)
    }

    /// Executes an I/O command.
    fn io<M: GuestMemory>(&mut self, mem: &M, c: &Command) -> u16 {
        if c.psdt() != 0 || c.fuse() != 0 {
            return status::INVALID_FIELD | status::DNR;
        }
        let Some(ns) = self.ns(c.nsid).cloned() else {
            return status::INVALID_NAMESPACE | status::DNR;
        };
        match c.opcode {
            io::FLUSH => {
                self.stats.flushes += 1;
                match ns.flush() {
                    Ok(()) => status::SUCCESS,
                    Err(e) => self.backend_error(&*ns, "flush", &e),
                }
            }
            io::READ | io::WRITE | io::WRITE_ZEROES => {
                let blocks = ns.size() / 512;
                let slba = c.slba();
                let nlb = u64::from(c.nlb());
                if slba.checked_add(nlb).is_none_or(|end| end > blocks) {
                    return status::LBA_OUT_OF_RANGE | status::DNR;
                }
                let offset = slba * 512;
                let len = (nlb * 512) as usize;
                match c.opcode {
                    io::READ => self.read(mem, c, &*ns, offset, len),
                    io::WRITE => self.write(mem, c, &*ns, offset, len),
                    _ => self.write_zeroes(c, &*ns, offset, len),
                }
            }
            _ => status::INVALID_OPCODE | status::DNR,
        }
    }

    fn backend_error(&mut self, ns: &dyn BlockBackend, what: &str, e: &std::io::Error) -> u16 {
        self.stats.backend_errors += 1;
        warn!(disk = %ns.describe(), error = %e, "{what} failed");
        status::INTERNAL_ERROR
    }

    fn read<M: GuestMemory>(
        &mut self,
        mem: &M,
        c: &Command,
        ns: &dyn BlockBackend,
        offset: u64,
        len: usize,
    ) -> u16 {
        let segs = match prp::segments(mem, c.prp1, c.prp2, len, MAX_TRANSFER) {
            Ok(s) => s,
            Err(e) => return self.prp_error(e),
        };
        let mut buf = vec![0u8; len];
        if let Err(e) = ns.read_at(&mut buf, offset) {
            return self.backend_error(ns, "read", &e);
        }
        let mut off = 0;
        for (addr, n) in segs {
            if mem
                .write_slice(&buf[off..off + n], GuestAddress(addr))
                .is_err()
            {
                self.stats.dma_faults += 1;
                return status::DATA_TRANSFER_ERROR;
            }
            off += n;
        }
        self.stats.reads += 1;
        self.stats.bytes_read += len as u64;
        status::SUCCESS
    }

    fn write<M: GuestMemory>(
        &mut self,
        mem: &M,
        c: &Command,
        ns: &dyn BlockBackend,
        offset: u64,
        len: usize,
    ) -> u16 {
        let segs = match prp::segments(mem, c.prp1, c.prp2, len, MAX_TRANSFER) {
            Ok(s) => s,
            Err(e) => return self.prp_error(e),
        };
        let mut buf = vec![0u8; len];
        let mut off = 0;
        for (addr, n) in segs {
            if mem
                .read_slice(&mut buf[off..off + n], GuestAddress(addr))
                .is_err()
            {
                // Nothing reaches the disk from a transfer that faulted.
                self.stats.dma_faults += 1;
                return status::DATA_TRANSFER_ERROR;
            }
            off += n;
        }
        if let Err(e) = ns.write_at(&buf, offset) {
            return self.backend_error(ns, "write", &e);
        }
        if c.fua() || self.features[usize::from(feature::VOLATILE_WRITE_CACHE)] & 1 == 0 {
            if let Err(e) = ns.flush() {
                return self.backend_error(ns, "flush", &e);
            }
        }
        self.stats.writes += 1;
        self.stats.bytes_written += len as u64;
        status::SUCCESS
    }

    fn write_zeroes(&mut self, c: &Command, ns: &dyn BlockBackend, offset: u64, len: usize) -> u16 {
        let zero = vec![0u8; len.min(1 << 20)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len());
            if let Err(e) = ns.write_at(&zero[..n], offset + done as u64) {
                return self.backend_error(ns, "write zeroes", &e);
            }
            done += n;
        }
        if c.fua() {
            if let Err(e) = ns.flush() {
                return self.backend_error(ns, "flush", &e);
            }
        }
        self.stats.writes += 1;
        status::SUCCESS
    }
}

fn merge(old: u64, at: u32, data: &[u8]) -> u64 {
    let mut b = old.to_le_bytes();
    for (i, v) in data.iter().enumerate() {
        if let Some(d) = b.get_mut(at as usize + i) {
            *d = *v;
        }
    }
    u64::from_le_bytes(b)
}

/// A namespace's NGUID: FNV-1a over the controller serial, the backend's
/// name and the NSID, widened to 16 bytes.
fn nguid(serial: &str, backend: &str, nsid: u32) -> [u8; 16] {
    let mix = |h: u64, b: u8| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    let a = serial
        .bytes()
        .chain(backend.bytes())
        .chain(nsid.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, mix);
    let h = mix(a, 0x5a);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&h.to_le_bytes());
    out
}
