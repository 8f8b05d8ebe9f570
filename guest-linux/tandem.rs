// SPDX-License-Identifier: GPL-2.0 OR MIT

//! tandem.ko: the Linux guest side of Tandem.
//!
//! It binds the Tandem control device (PCI 1af4:10f0) and runs the guest
//! end of the guest/host channel: two message rings in DMA-coherent memory,
//! a doorbell register, MSI-X interrupts, version negotiation, heartbeats,
//! and answers to the host's requests. The protocol rules are not written
//! here: they are `shared-abi`'s files (the wire format and the channel
//! endpoint), compiled into this module with `#[path]`, the same code the
//! host runs. This file is the kernel plumbing around them.
//!
//! State, read-only, in debugfs:
//!
//! ```text
//! /sys/kernel/debug/tandem/version       module version
//! /sys/kernel/debug/tandem/abi_version   highest ABI version spoken
//! /sys/kernel/debug/tandem/<pci-name>/state      channel state, version, session...
//! /sys/kernel/debug/tandem/<pci-name>/counters
//! /sys/kernel/debug/tandem/<pci-name>/last_error
//! /sys/kernel/debug/tandem/<pci-name>/ping_stats
//! ```
//! and two write-only test hooks in the device directory: `ping`
//! ("COUNT [SIZE]": guest-to-host pings, results in `ping_stats`) and
//! `inject` (sends the host a deliberately broken message).
//!
//! With ABI 1.1 it also acts on assigned functions for the host (quiesce,
//! resume, report, policy: `functions.rs`, F6's guest-side filter objects).
//!
//! Module parameters `abi_min` and `abi_max` (wire form, major << 16 |
//! minor; 0 = this build's range) narrow or shift the versions offered, for
//! compatibility tests.

use kernel::{
    bindings,
    debugfs::{self, Dir, Scope, ScopedDir},
    device::Core,
    dma::{Coherent, Device as _, DmaMask},
    driver, fmt,
    io::{io_project, Io},
    irq::{self, IrqReturn, ThreadedIrqReturn},
    new_condvar, new_mutex, new_spinlock_irq, pci,
    prelude::*,
    str::CString,
    sync::{
        atomic::{Acquire, Atomic, Relaxed, Release},
        barrier::{dma_mb, Full, Read, Write},
        Arc, CondVar, CondVarTimeoutResult, Mutex, SpinLockIrq,
    },
    time::{msecs_to_jiffies, Instant, Monotonic},
    uaccess::UserSliceReader,
    workqueue::{self, impl_has_delayed_work, new_delayed_work, DelayedWork, Work, WorkItem},
};

// The shared files are a library: not every item is used here, and their
// `pub` items are the crate API on the host side.
#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../shared-abi/src/lib.rs"]
mod abi;

mod functions;
mod multipath;

use abi::channel::{BeginError, Endpoint, LastError, Outcome, Role, State, DEFAULT_HOST_PARAMS};
use abi::msg::{self as wire, caps, encode, goodbye, os, Kind, Out};
use abi::regs;
use abi::ring::{self, RingGeometry, DEFAULT_GEOMETRY};
use abi::version::{AbiVersion, VersionRange, ABI_VERSION, SUPPORTED};
use zerocopy::IntoBytes;

/// The module's version; the host build checks that it equals the Tandem
/// workspace version, so the guest and host of one release agree.
const VERSION: &str = "0.1.0";

module! {
    type: TandemModule,
    name: "tandem",
    authors: ["The Tandem developers"],
    description: "Tandem: virtualization-aware guest driver for assigned devices",
    license: "Dual MIT/GPL",
    params: {
        abi_min: u32 {
            default: 0,
            description: "Lowest ABI version offered, major<<16|minor (0: this build's)",
        },
        abi_max: u32 {
            default: 0,
            description: "Highest ABI version offered, major<<16|minor (0: this build's)",
        },
    },
}

/// Size of BAR0 (all registers lie below it; checked at build time).
const BAR0_SIZE: usize = regs::BAR0_SIZE as usize;
/// Outstanding requests of ours at once (HELLO, a heartbeat, a ping).
const PENDING: usize = 8;
/// How often the channel's housekeeping runs.
const TICK_MS: u32 = 100;
/// Timeouts of our requests.
const HELLO_TIMEOUT_MS: u32 = 1000;
const PING_TIMEOUT_MS: u32 = 1000;

/// The version range this load offers.
fn offered() -> VersionRange {
    let lo = module_parameters::abi_min.value();
    let hi = module_parameters::abi_max.value();
    VersionRange {
        min: if lo == 0 { SUPPORTED.min } else { AbiVersion::from_wire(lo) },
        max: if hi == 0 { SUPPORTED.max } else { AbiVersion::from_wire(hi) },
    }
}

fn vstr(v: AbiVersion) -> (u16, u16) {
    (v.major, v.minor)
}

kernel::sync::global_lock! {
    // SAFETY: initialized in the module initializer before first use.
    unsafe(uninit) static ROOT_DIR: Mutex<Option<Dir>> = None;
}

/// Guest-to-host ping results, for `ping_stats`.
#[derive(Default, Clone, Copy)]
struct PingStats {
    runs: u64,
    sent: u32,
    ok: u32,
    mismatched: u32,
    timeouts: u32,
    failed: u32,
    rtt_us_median: u64,
    rtt_us_min: u64,
    rtt_us_max: u64,
}

/// The one guest-initiated ping in flight.
#[derive(Default)]
struct PingSlot {
    tag: u64,
    expected: KVec<u8>,
    /// `Some(true)`: answered with the same bytes; `Some(false)`: answered
    /// wrong or refused; `None`: waiting.
    done: Option<bool>,
}

/// Channel state guarded by one mutex (process context only: the
/// interrupt's threaded half, the work item, debugfs writers).
struct Chan {
    ep: Endpoint<PENDING>,
    g2h_producer: u32,
    h2g_consumer: u32,
    /// The rings are programmed and the device accepted them.
    enabled: bool,
    /// The ring rules were broken; stop until the next reset.
    broken: bool,
    session: u32,
    /// Scratch buffers: one incoming slot, one outgoing message.
    rx: KVec<u8>,
    tx: KVec<u8>,
    ping: PingSlot,
    /// Whether the loss of the host has been logged (log once per loss).
    host_lost_logged: bool,
    /// A host `FUNCTION` request waiting to be carried out outside this
    /// lock (it may sleep while a function drains): its tag and payload.
    function: Option<(u64, wire::FunctionRequest)>,
}

#[pin_data(PinnedDrop)]
struct Shared {
    bar: pci::DevresBar<BAR0_SIZE>,
    /// Both rings: G2H at 0, H2G at `h2g_off`.
    rings: Coherent<[u8]>,
    geometry: RingGeometry,
    h2g_off: usize,
    started: Instant<Monotonic>,
    stopping: Atomic<u32>,
    irqs: Atomic<u64>,
    status_irqs: Atomic<u64>,
    doorbells: Atomic<u64>,
    ring_full: Atomic<u64>,
    /// Test hook (`stall_requests`): host `FUNCTION` requests that arrive
    /// before this time (ms since load) are dropped unanswered, as by a
    /// guest driver that hung.
    stall_until_ms: Atomic<u64>,
    #[pin]
    chan: Mutex<Chan>,
    /// Bumped when a ping completes; ping waiters sleep on `ev_cv`.
    #[pin]
    ev: SpinLockIrq<u64>,
    #[pin]
    ev_cv: CondVar,
    #[pin]
    last_error: Mutex<Option<CString>>,
    #[pin]
    ping_stats: Mutex<PingStats>,
    /// Serializes test-hook ping runs.
    #[pin]
    ping_lock: Mutex<()>,
    #[pin]
    work: DelayedWork<Shared>,
}

impl_has_delayed_work! {
    impl HasDelayedWork<Self> for Shared { self.work }
}

#[pinned_drop]
impl PinnedDrop for Shared {
    fn drop(self: Pin<&mut Self>) {}
}

fn queue() -> &'static workqueue::Queue {
    workqueue::system_long()
}

impl Shared {
    fn new(
        bar: pci::DevresBar<BAR0_SIZE>,
        rings: Coherent<[u8]>,
        h2g_off: usize,
        rx: KVec<u8>,
        tx: KVec<u8>,
    ) -> impl PinInit<Self> {
        let now = Instant::<Monotonic>::now();
        pin_init!(Self {
            bar,
            rings,
            geometry: DEFAULT_GEOMETRY,
            h2g_off,
            started: now,
            stopping: Atomic::new(0),
            irqs: Atomic::new(0),
            status_irqs: Atomic::new(0),
            doorbells: Atomic::new(0),
            ring_full: Atomic::new(0),
            stall_until_ms: Atomic::new(0),
            chan <- new_mutex!(Chan {
                ep: Endpoint::new(Role::Guest, offered(), caps::ALL, DEFAULT_HOST_PARAMS, VERSION, 0),
                g2h_producer: 0,
                h2g_consumer: 0,
                enabled: false,
                broken: false,
                session: 0,
                rx,
                tx,
                ping: PingSlot::default(),
                host_lost_logged: false,
                function: None,
            }, "tandem::chan"),
            ev <- new_spinlock_irq!(0, "tandem::ev"),
            ev_cv <- new_condvar!("tandem::ev_cv"),
            last_error <- new_mutex!(None, "tandem::last_error"),
            ping_stats <- new_mutex!(PingStats::default(), "tandem::ping_stats"),
            ping_lock <- new_mutex!((), "tandem::ping_lock"),
            work <- new_delayed_work!("tandem::work"),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(0)
    }

    fn set_error(&self, args: fmt::Arguments<'_>) {
        if let Ok(s) = CString::try_from_fmt(args) {
            pr_warn!("{}\n", s.to_str().unwrap_or("?"));
            *self.last_error.lock() = Some(s);
        }
    }

    // ---- registers (take the Devres guard per access: it is an RCU read
    // section, never held across a sleep) ----

    fn reg_read(&self, off: usize) -> Option<u32> {
        let bar = self.bar.try_access()?;
        bar.try_read32(off).ok()
    }

    fn reg_write(&self, off: usize, v: u32) -> bool {
        match self.bar.try_access() {
            Some(bar) => bar.try_write32(v, off).is_ok(),
            None => false,
        }
    }

    // ---- ring memory: volatile index accesses, bulk payload copies ----

    fn mem_r32(&self, off: usize) -> Result<u32> {
        Ok(io_project!(self.rings, [try: off..off + 4]).try_cast::<u32>()?.read_val())
    }

    fn mem_w32(&self, off: usize, v: u32) -> Result {
        io_project!(self.rings, [try: off..off + 4]).try_cast::<u32>()?.write_val(v);
        Ok(())
    }

    fn mem_write(&self, off: usize, data: &[u8]) -> Result {
        io_project!(self.rings, [try: off..off + data.len()]).copy_from_slice(data);
        Ok(())
    }

    fn mem_read(&self, off: usize, out: &mut [u8]) -> Result {
        io_project!(self.rings, [try: off..off + out.len()]).copy_to_slice(out);
        Ok(())
    }

    // ---- bring-up ----

    /// Programs the rings and enables the device. Called with the channel
    /// lock held.
    fn enable(&self, c: &mut Chan) -> Result {
        let ring_len = self.geometry.ring_bytes();
        // Fresh, zeroed rings every time (the host takes the indices as
        // they are in memory).
        let zero = [0u8; 256];
        let mut off = 0;
        let total = self.h2g_off + ring_len;
        while off < total {
            let n = (total - off).min(zero.len());
            self.mem_write(off, &zero[..n])?;
            off += n;
        }
        c.g2h_producer = 0;
        c.h2g_consumer = 0;
        c.broken = false;
        let base = self.rings.dma_address();
        let g2h = base;
        let h2g = base + self.h2g_off as u64;
        // Ring writes must be visible before the device may read them;
        // the MMIO writes below are ordered after them.
        dma_mb(Write);
        let ok = self.reg_write(regs::CONTROL as usize, regs::control::RESET)
            && self.reg_write(regs::G2H_BASE_LO as usize, g2h as u32)
            && self.reg_write(regs::G2H_BASE_HI as usize, (g2h >> 32) as u32)
            && self.reg_write(regs::H2G_BASE_LO as usize, h2g as u32)
            && self.reg_write(regs::H2G_BASE_HI as usize, (h2g >> 32) as u32)
            && self.reg_write(regs::RING_GEOMETRY as usize, self.geometry.to_register())
            && self.reg_write(regs::CONTROL as usize, regs::control::ENABLE);
        if !ok {
            return Err(ENODEV);
        }
        let status = self.reg_read(regs::STATUS as usize).ok_or(ENODEV)?;
        if status & regs::status::ENABLED == 0 {
            let err = self.reg_read(regs::ERROR as usize).unwrap_or(u32::MAX);
            self.set_error(fmt!("the device refused the rings (status {status:#x}, error {err})"));
            return Err(EIO);
        }
        c.session = self.reg_read(regs::SESSION as usize).unwrap_or(0);
        c.enabled = true;
        c.ep.reset();
        Ok(())
    }

    /// Stops the device using our rings (before they are freed).
    fn disable(&self, c: &mut Chan) {
        if c.enabled {
            let _ = self.reg_write(regs::CONTROL as usize, 0);
        }
        c.enabled = false;
        c.ep.reset();
    }

    // ---- sending ----

    /// Writes one message into G2H and rings the doorbell.
    fn send(&self, c: &mut Chan, out: &Out, payload: &[u8]) -> Result {
        let Chan { tx, g2h_producer, .. } = c;
        self.send_parts(tx, g2h_producer, out, payload)
    }

    /// `send` for callers that hold other parts of `Chan` borrowed.
    fn send_parts(&self, tx: &mut [u8], g2h_producer: &mut u32, out: &Out, payload: &[u8]) -> Result {
        let n = encode(tx, out, payload).map_err(|_| EMSGSIZE)?;
        self.send_raw(g2h_producer, &tx[..n])
    }

    fn send_raw(&self, g2h_producer: &mut u32, bytes: &[u8]) -> Result {
        let g = self.geometry;
        let consumer = self.mem_r32(ring::CONSUMER_OFFSET)?;
        let free = g.free(*g2h_producer, consumer).map_err(|_| EPROTO)?;
        if free == 0 {
            self.ring_full.fetch_add(1, Relaxed);
            return Err(EBUSY);
        }
        self.mem_write(g.slot_offset(*g2h_producer), bytes)?;
        // The slot before the index.
        dma_mb(Write);
        *g2h_producer = g2h_producer.wrapping_add(1);
        self.mem_w32(ring::PRODUCER_OFFSET, *g2h_producer)?;
        self.doorbells.fetch_add(1, Relaxed);
        if !self.reg_write(regs::G2H_DOORBELL as usize, *g2h_producer) {
            return Err(ENODEV);
        }
        Ok(())
    }

    fn send_hello(&self, c: &mut Chan, now: u64) {
        match c.ep.hello(os::LINUX, now, HELLO_TIMEOUT_MS) {
            Ok((out, hello)) => {
                if let Err(e) = self.send(c, &out, hello.as_bytes()) {
                    c.ep.abandon(out.tag);
                    c.ep.reset();
                    self.set_error(fmt!("cannot send HELLO: {e:?}"));
                }
            }
            Err(e) => self.set_error(fmt!("cannot start HELLO: {e:?}")),
        }
    }

    // ---- receiving (threaded interrupt and work item) ----

    /// Consumes everything in H2G, then carries out a host `FUNCTION`
    /// request if one came.
    fn service(&self) {
        self.service_rings();
        self.run_function();
    }

    /// Carries out the pending `FUNCTION` request (outside the channel
    /// lock: a drain sleeps) and answers it.
    fn run_function(&self) {
        let Some((tag, req)) = self.chan.lock().function.take() else {
            return;
        };
        if self.now_ms() < self.stall_until_ms.load(Acquire) {
            pr_warn!("stall_requests: a host function request is dropped unanswered\n");
            return;
        }
        let (status, report) = functions::execute(&req);
        let mut guard = self.chan.lock();
        let c = &mut *guard;
        // None: the channel restarted meanwhile and the request is void.
        let Some(out) = c.ep.respond(Kind::Function, tag, status) else {
            return;
        };
        let payload: &[u8] = match &report {
            Some(r) => r.as_bytes(),
            None => &[],
        };
        if let Err(e) = self.send(c, &out, payload) {
            self.set_error(fmt!("cannot answer the host's function request: {e:?}"));
        }
    }

    /// Consumes everything in H2G.
    fn service_rings(&self) {
        let mut guard = self.chan.lock();
        let c = &mut *guard;
        if !c.enabled || c.broken {
            return;
        }
        let g = self.geometry;
        let mut consumed = false;
        loop {
            let Ok(producer) = self.mem_r32(self.h2g_off + ring::PRODUCER_OFFSET) else {
                return;
            };
            // The index before the slots.
            dma_mb(Read);
            let used = match g.used(producer, c.h2g_consumer) {
                Ok(u) => u,
                Err(_) => {
                    c.broken = true;
                    self.set_error(fmt!(
                        "host broke the ring rules (producer {producer}, consumer {})",
                        c.h2g_consumer
                    ));
                    return;
                }
            };
            if used == 0 {
                break;
            }
            for _ in 0..used {
                let off = self.h2g_off + g.slot_offset(c.h2g_consumer);
                if self.mem_read(off, &mut c.rx).is_err() {
                    return;
                }
                c.h2g_consumer = c.h2g_consumer.wrapping_add(1);
                self.handle(c);
            }
            // Slots read before the consumer index is published.
            dma_mb(Full);
            if self.mem_w32(self.h2g_off + ring::CONSUMER_OFFSET, c.h2g_consumer).is_err() {
                return;
            }
            consumed = true;
        }
        if consumed {
            let _ = self.reg_write(regs::H2G_DOORBELL as usize, c.h2g_consumer);
        }
    }

    /// One incoming message in `c.rx`.
    fn handle(&self, c: &mut Chan) {
        let now = self.now_ms();
        let before = c.ep.state();
        let Chan { ep, rx, tx, g2h_producer, ping, function, .. } = c;
        match ep.receive(rx, now) {
            Outcome::Request { kind, tag, payload, .. } => {
                // Only FUNCTION reaches here (the endpoint checked the
                // payload's length); one at a time.
                let req = wire::payload::<wire::FunctionRequest>(payload);
                let status = match (kind, req, function.is_some()) {
                    (Kind::Function, Some(r), false) => {
                        *function = Some((tag, r));
                        None
                    }
                    (Kind::Function, Some(_), true) => Some(wire::Status::Busy),
                    _ => Some(wire::Status::UnknownKind),
                };
                if let Some(st) = status {
                    if let Some(out) = ep.respond(kind, tag, st) {
                        if let Err(e) = self.send_parts(tx, g2h_producer, &out, &[]) {
                            self.set_error(fmt!("cannot refuse the host's {}: {e:?}", kind.name()));
                        }
                    }
                }
            }
            Outcome::Reply { out, payload } => {
                if let Err(e) = self.send_parts(tx, g2h_producer, &out, payload.as_slice()) {
                    self.set_error(fmt!("cannot answer the host's {}: {e:?}", out.kind.name()));
                }
            }
            Outcome::Completed { tag, kind, status, payload } => {
                if kind == Kind::Ping && tag == ping.tag && ping.done.is_none() {
                    ping.done = Some(status == wire::Status::Ok && payload == &ping.expected[..]);
                    *self.ev.lock() += 1;
                    self.ev_cv.notify_all();
                } else if status != wire::Status::Ok {
                    self.set_error(fmt!(
                        "the host refused our {}: {}",
                        kind.name(),
                        status.name()
                    ));
                }
            }
            Outcome::Negotiated { version, capabilities } => {
                let (ma, mi) = vstr(version);
                pr_info!(
                    "channel up: ABI {}.{}, capabilities {:#x}, host tandem {}, session {}\n",
                    ma,
                    mi,
                    capabilities,
                    ep.peer_version(),
                    c.session
                );
            }
            Outcome::Refused { peer } => {
                let o = ep.range();
                let (a, b, x, y) = (vstr(o.min), vstr(o.max), vstr(peer.min), vstr(peer.max));
                self.set_error(fmt!(
                    "no common ABI version: this driver speaks {}.{}..{}.{}, the host {}.{}..{}.{}",
                    a.0, a.1, b.0, b.1, x.0, x.1, y.0, y.1
                ));
            }
            Outcome::PeerEvent { kind, payload } => match kind {
                Kind::Goodbye => pr_info!("the host said goodbye\n"),
                Kind::Event => {
                    if let Some(ev) = wire::payload::<wire::Event>(payload) {
                        if ev.code.get() == wire::event::NOTICE {
                            pr_info!("notice from the host: {}\n", ev.arg.get());
                        }
                    }
                }
                _ => {}
            },
            Outcome::Nothing => {}
        }
        if let (LastError::Malformed(e), State::Up { .. }) = (c.ep.last_error, before) {
            if c.ep.counters.malformed > 0 {
                pr_debug!("dropped a malformed message: {}\n", e.name());
            }
        }
    }

    // ---- housekeeping (work item) ----

    fn tick(&self) {
        functions::expire_leases();
        let now = self.now_ms();
        let mut guard = self.chan.lock();
        let c = &mut *guard;
        // The host side may have restarted or reset the device.
        let status = self.reg_read(regs::STATUS as usize);
        let session = self.reg_read(regs::SESSION as usize);
        match (status, session) {
            (Some(st), Some(s)) if st != u32::MAX => {
                if c.enabled && (st & regs::status::ENABLED == 0 || s != c.session) {
                    pr_info!(
                        "the host side restarted (status {:#x}, session {} -> {}); reconnecting\n",
                        st,
                        c.session,
                        s
                    );
                    c.enabled = false;
                }
            }
            _ => {}
        }
        if !c.enabled {
            if let Err(e) = self.enable(c) {
                if e != ENODEV {
                    self.set_error(fmt!("cannot enable the channel: {e:?}"));
                }
                return;
            }
        }
        if c.broken {
            return;
        }
        while let Some(p) = c.ep.expire(now) {
            match p.kind {
                Kind::Hello => self.set_error(fmt!("no answer to HELLO within {HELLO_TIMEOUT_MS} ms")),
                Kind::Ping if p.tag == c.ping.tag && c.ping.done.is_none() => {
                    c.ping.done = Some(false);
                    *self.ev.lock() += 1;
                    self.ev_cv.notify_all();
                }
                _ => {}
            }
        }
        match c.ep.state() {
            State::Down => self.send_hello(c, now),
            State::Up { .. } => {
                if c.ep.heartbeat_due(now) {
                    match c.ep.heartbeat(now) {
                        Ok((out, hb)) => {
                            if let Err(e) = self.send(c, &out, hb.as_bytes()) {
                                c.ep.abandon(out.tag);
                                self.set_error(fmt!("cannot send a heartbeat: {e:?}"));
                            }
                        }
                        Err(BeginError::Full) => {}
                        Err(e) => self.set_error(fmt!("heartbeat: {e:?}")),
                    }
                }
                match c.ep.peer_alive(now) {
                    Some(false) if !c.host_lost_logged => {
                        c.host_lost_logged = true;
                        self.set_error(fmt!(
                            "lost the host: nothing heard for {} ms",
                            c.ep.peer_silence_ms(now).unwrap_or(0)
                        ));
                    }
                    Some(true) if c.host_lost_logged => {
                        c.host_lost_logged = false;
                        pr_info!("the host answers again\n");
                    }
                    _ => {}
                }
            }
            // Refused: wait for a new session (a different host) or a reload.
            State::Refused { .. } | State::Negotiating => {}
        }
    }

    /// Stops the work item and waits for a running instance.
    fn stop_work(self: &Arc<Self>) {
        self.stopping.store(1, Release);
        let work: *const DelayedWork<Shared> = &self.work;
        // SAFETY: `work` points to the initialized `DelayedWork` inside
        // `self`, kept alive by the `Arc` we borrow; `raw_as_work` yields the
        // `work_struct` embedded in the C `delayed_work`, so `container_of!`
        // gives the `delayed_work` itself. (`kernel::workqueue` has no cancel.)
        let dwork = unsafe {
            let w = Work::raw_get(DelayedWork::raw_as_work(work));
            kernel::container_of!(w, bindings::delayed_work, work)
        };
        // SAFETY: `dwork` is a valid, initialized `delayed_work`; this cancels
        // a pending instance, waits for a running one, and makes later
        // enqueues fail (the self-requeue in `run` then drops its `Arc`).
        let was_pending = unsafe { bindings::disable_delayed_work_sync(dwork) };
        if was_pending {
            // SAFETY: a pending work owns one reference, made by
            // `Arc::into_raw` in `enqueue_delayed`; it will never run, so we
            // reclaim that reference here.
            drop(unsafe { Arc::from_raw(Arc::as_ptr(self)) });
        }
    }

    // ---- guest-to-host pings (test hook) ----

    fn ping_once(&self, payload: &[u8]) -> Result<bool> {
        let seen = *self.ev.lock();
        {
            let mut guard = self.chan.lock();
            let c = &mut *guard;
            let now = self.now_ms();
            let out = c.ep.begin(Kind::Ping, now, PING_TIMEOUT_MS).map_err(|_| ENOTCONN)?;
            c.ping.expected.clear();
            c.ping.expected.extend_from_slice(payload, GFP_KERNEL)?;
            c.ping.tag = out.tag;
            c.ping.done = None;
            if let Err(e) = self.send(c, &out, payload) {
                c.ep.abandon(out.tag);
                return Err(e);
            }
        }
        let mut left = msecs_to_jiffies(PING_TIMEOUT_MS + 500);
        {
            let mut g = self.ev.lock();
            while *g == seen {
                match self.ev_cv.wait_interruptible_timeout(&mut g, left) {
                    CondVarTimeoutResult::Timeout => break,
                    CondVarTimeoutResult::Signal { .. } => return Err(EINTR),
                    CondVarTimeoutResult::Woken { jiffies } => left = jiffies,
                }
            }
        }
        let c = self.chan.lock();
        c.ping.done.ok_or(ETIMEDOUT)
    }

    fn run_pings(&self, count: u32, size: Option<usize>) -> Result {
        let _one = self.ping_lock.lock();
        let max = self.geometry.max_payload();
        let mut rtts: KVec<u64> = KVec::with_capacity(count as usize, GFP_KERNEL)?;
        let mut st = PingStats::default();
        let mut payload: KVec<u8> = KVec::with_capacity(max, GFP_KERNEL)?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(count);
        for _ in 0..count {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = size.unwrap_or((x % (max as u64 + 1)) as usize).min(max);
            payload.clear();
            for i in 0..len {
                payload.push((x >> ((i % 8) * 8)) as u8 ^ i as u8, GFP_KERNEL)?;
            }
            st.sent += 1;
            let t0 = Instant::<Monotonic>::now();
            match self.ping_once(&payload) {
                Ok(true) => {
                    st.ok += 1;
                    let us = u64::try_from(t0.elapsed().as_micros_ceil()).unwrap_or(0);
                    rtts.push(us, GFP_KERNEL)?;
                }
                Ok(false) => st.mismatched += 1,
                Err(e) if e == ETIMEDOUT => st.timeouts += 1,
                Err(e) if e == EINTR => return Err(e),
                Err(_) => st.failed += 1,
            }
        }
        rtts.sort_unstable();
        if let (Some(first), Some(last)) = (rtts.first(), rtts.last()) {
            st.rtt_us_min = *first;
            st.rtt_us_max = *last;
            st.rtt_us_median = rtts[rtts.len() / 2];
        }
        let mut s = self.ping_stats.lock();
        st.runs = s.runs + 1;
        *s = st;
        Ok(())
    }

    // ---- fault injection (test hook): a broken message to the host ----

    fn inject(&self, what: &str) -> Result {
        let fault = abi::faults::Fault::from_name(what).ok_or(EINVAL)?;
        let mut guard = self.chan.lock();
        let c = &mut *guard;
        if !c.enabled {
            return Err(ENOTCONN);
        }
        let v = c.ep.wire_version();
        let Chan { tx, g2h_producer, .. } = c;
        let n = fault.build(v, tx);
        if n == 0 {
            return Err(EINVAL);
        }
        self.send_raw(g2h_producer, &tx[..n])
    }
}

impl WorkItem for Shared {
    type Pointer = Arc<Shared>;

    fn run(this: Arc<Shared>) {
        if this.stopping.load(Acquire) != 0 {
            return;
        }
        this.tick();
        // A message may have arrived without its interrupt (coalesced, or
        // raised while we were not yet enabled): look anyway.
        this.service();
        if this.stopping.load(Acquire) == 0 {
            let _ = queue().enqueue_delayed(this, msecs_to_jiffies(TICK_MS));
        }
    }
}

// ---- interrupts ----

/// Vector RING: messages arrived (or room was freed).
struct RingIrq {
    shared: Arc<Shared>,
}

impl irq::ThreadedHandler for RingIrq {
    fn handle(&self) -> ThreadedIrqReturn {
        self.shared.irqs.fetch_add(1, Relaxed);
        ThreadedIrqReturn::WakeThread
    }

    fn handle_threaded(&self) -> IrqReturn {
        self.shared.service();
        IrqReturn::Handled
    }
}

/// Vector STATUS: the device changed state; the work item reacts.
struct StatusIrq {
    shared: Arc<Shared>,
}

impl irq::Handler for StatusIrq {
    fn handle(&self) -> IrqReturn {
        self.shared.status_irqs.fetch_add(1, Relaxed);
        IrqReturn::Handled
    }
}

// ---- debugfs ----

fn state_name(s: State) -> &'static str {
    match s {
        State::Down => "down",
        State::Negotiating => "negotiating",
        State::Up { .. } => "up",
        State::Refused { .. } => "refused",
    }
}

fn state_show(s: &Arc<Shared>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let now = s.now_ms();
    let c = s.chan.lock();
    let st = c.ep.state();
    writeln!(f, "state: {}", state_name(st))?;
    let o = c.ep.range();
    writeln!(
        f,
        "offered: {}.{}..{}.{}",
        o.min.major, o.min.minor, o.max.major, o.max.minor
    )?;
    match st {
        State::Up { version, capabilities, heartbeat_interval_ms, heartbeat_timeout_ms, session } => {
            writeln!(f, "version: {}.{}", version.major, version.minor)?;
            writeln!(f, "capabilities: {capabilities:#x}")?;
            writeln!(f, "heartbeat: every {heartbeat_interval_ms} ms, timeout {heartbeat_timeout_ms} ms")?;
            writeln!(f, "host_session: {session}")?;
        }
        State::Refused { peer } => writeln!(
            f,
            "host_speaks: {}.{}..{}.{}",
            peer.min.major, peer.min.minor, peer.max.major, peer.max.minor
        )?,
        _ => {}
    }
    writeln!(f, "session: {}", c.session)?;
    writeln!(f, "device: {}", if c.broken { "broken" } else if c.enabled { "enabled" } else { "disabled" })?;
    writeln!(f, "host_driver: {}", c.ep.peer_version())?;
    match (c.ep.peer_alive(now), c.ep.peer_silence_ms(now)) {
        (Some(a), Some(ms)) => writeln!(f, "host_alive: {} ({} ms since last message)", if a { "yes" } else { "no" }, ms),
        _ => writeln!(f, "host_alive: unknown"),
    }
}

fn counters_show(s: &Arc<Shared>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let c = s.chan.lock();
    let k = c.ep.counters;
    writeln!(f, "rx_messages {}", k.rx_messages)?;
    writeln!(f, "tx_messages {}", k.tx_messages)?;
    writeln!(f, "rx_requests {}", k.rx_requests)?;
    writeln!(f, "rx_responses {}", k.rx_responses)?;
    writeln!(f, "rx_events {}", k.rx_events)?;
    writeln!(f, "malformed {}", k.malformed)?;
    writeln!(f, "error_replies {}", k.error_replies)?;
    writeln!(f, "unexpected_responses {}", k.unexpected_responses)?;
    writeln!(f, "timeouts {}", k.timeouts)?;
    writeln!(f, "failed_requests {}", k.failed_requests)?;
    writeln!(f, "pings_answered {}", k.pings_answered)?;
    writeln!(f, "heartbeats_received {}", k.heartbeats_received)?;
    writeln!(f, "negotiations {}", k.negotiations)?;
    writeln!(f, "interrupts {}", s.irqs.load(Relaxed))?;
    writeln!(f, "status_interrupts {}", s.status_irqs.load(Relaxed))?;
    writeln!(f, "doorbells {}", s.doorbells.load(Relaxed))?;
    writeln!(f, "ring_full {}", s.ring_full.load(Relaxed))
}

fn last_error_show(s: &Arc<Shared>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let ep_err = s.chan.lock().ep.last_error;
    match &*s.last_error.lock() {
        Some(e) => writeln!(f, "{}", e.to_str().unwrap_or("?"))?,
        None => writeln!(f, "none")?,
    }
    writeln!(f, "protocol: {}", ep_err.name())
}

fn ping_stats_show(s: &Arc<Shared>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let p = *s.ping_stats.lock();
    writeln!(
        f,
        "runs={} sent={} ok={} mismatched={} timeouts={} failed={} rtt_us_min={} rtt_us_median={} rtt_us_max={}",
        p.runs, p.sent, p.ok, p.mismatched, p.timeouts, p.failed, p.rtt_us_min, p.rtt_us_median, p.rtt_us_max
    )
}

fn read_words(r: &mut UserSliceReader, buf: &mut [u8; 64]) -> Result<usize> {
    let n = r.len().min(buf.len());
    r.read_slice(&mut buf[..n])?;
    Ok(n)
}

/// `echo "COUNT [SIZE]" > ping`: guest-to-host pings, checked; see `ping_stats`.
fn ping_write(s: &Arc<Shared>, r: &mut UserSliceReader) -> Result {
    let mut buf = [0u8; 64];
    let n = read_words(r, &mut buf)?;
    let text = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?;
    let mut words = text.split_whitespace();
    let count: u32 = words.next().ok_or(EINVAL)?.parse().map_err(|_| EINVAL)?;
    let size = match words.next() {
        Some(w) => Some(w.parse::<usize>().map_err(|_| EINVAL)?),
        None => None,
    };
    if count == 0 || count > 100_000 {
        return Err(EINVAL);
    }
    s.run_pings(count, size)
}

/// `echo FAULT > inject`: garbage, oversized, unknown_kind, bad_version,
/// short_payload, unexpected_response, bad_flags.
/// `stall_requests`: for the next N ms, host function requests go
/// unanswered (tests of a host facing a hung guest driver).
fn stall_write(s: &Arc<Shared>, r: &mut UserSliceReader) -> Result {
    let mut buf = [0u8; 64];
    let n = read_words(r, &mut buf)?;
    let text = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?;
    let ms: u64 = text.trim().parse().map_err(|_| EINVAL)?;
    s.stall_until_ms.store(s.now_ms().saturating_add(ms), Release);
    Ok(())
}

fn inject_write(s: &Arc<Shared>, r: &mut UserSliceReader) -> Result {
    let mut buf = [0u8; 64];
    let n = read_words(r, &mut buf)?;
    let text = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?;
    s.inject(text.trim())
}

fn populate_dir<'d>(s: &'d Arc<Shared>, dir: &ScopedDir<'d, '_>) {
    dir.read_callback_file(c"state", s, &state_show);
    dir.read_callback_file(c"counters", s, &counters_show);
    dir.read_callback_file(c"last_error", s, &last_error_show);
    dir.read_callback_file(c"ping_stats", s, &ping_stats_show);
    dir.write_only_callback_file(c"ping", s, &ping_write);
    dir.write_only_callback_file(c"inject", s, &inject_write);
    dir.write_only_callback_file(c"stall_requests", s, &stall_write);
}

// ---- the PCI driver ----

/// Per-device data. Field order is drop order (after `PinnedDrop::drop`):
/// the IRQ registrations before the vectors they came from; the enable
/// guard last.
#[pin_data(PinnedDrop)]
struct CtlDev<'bound> {
    pdev: &'bound pci::Device<kernel::device::Bound>,
    #[pin]
    ring_irq: irq::ThreadedRegistration<'bound, RingIrq>,
    #[pin]
    status_irq: irq::Registration<'bound, StatusIrq>,
    vectors: pci::IrqVectorRegistration<'bound>,
    dbg: Pin<KBox<Scope<Arc<Shared>>>>,
    shared: Arc<Shared>,
    _enable: PciEnableGuard<'bound>,
}

/// Balances `enable_device_mem()` and `set_master()`: the 7.3 Rust PCI
/// abstraction has neither `clear_master()` nor `disable_device()`, and the
/// PCI core does not disable a device on unbind, so without this the
/// device would keep bus mastering after the driver is gone.
struct PciEnableGuard<'a>(&'a pci::Device<kernel::device::Bound>);

impl Drop for PciEnableGuard<'_> {
    fn drop(&mut self) {
        let raw = core::ptr::from_ref(self.0).cast::<bindings::pci_dev>().cast_mut();
        // SAFETY: `pci::Device` is `#[repr(transparent)]` over
        // `Opaque<bindings::pci_dev>`, so `raw` is the `struct pci_dev` that
        // probe enabled; the guard exists only after a successful enable and
        // is dropped while the device is still bound.
        unsafe {
            bindings::pci_clear_master(raw);
            bindings::pci_disable_device(raw);
        }
    }
}

struct CtlDriver;

kernel::pci_device_table!(
    PCI_TABLE,
    <CtlDriver as pci::Driver>::IdInfo,
    [(
        pci::DeviceId::from_id(pci::Vendor::REDHAT_QUMRANET, abi::pci::CONTROL_DEVICE_ID as u32),
        ()
    )]
);

impl pci::Driver for CtlDriver {
    type IdInfo = ();
    type Data<'bound> = CtlDev<'bound>;

    const ID_TABLE: pci::IdTable<Self::IdInfo> = &PCI_TABLE;

    fn probe<'bound>(
        pdev: &'bound pci::Device<Core<'_>>,
        _info: Option<&'bound Self::IdInfo>,
    ) -> impl PinInit<Self::Data<'bound>, Error> + 'bound {
        pin_init::pin_init_scope(move || {
            pdev.enable_device_mem()?;
            let enable = PciEnableGuard(pdev);
            pdev.set_master();
            // SAFETY: probe is the only place setting up DMA for this device,
            // and nothing runs concurrently for it yet.
            unsafe { pdev.dma_set_mask_and_coherent(DmaMask::new::<64>()) }?;

            let bar = pdev.iomap_region_sized::<BAR0_SIZE>(0, c"tandem")?;
            let magic = bar.read32(regs::MAGIC as usize);
            if magic != wire::MSG_MAGIC {
                dev_err!(pdev, "not a Tandem control device (magic {:#x})\n", magic);
                return Err(ENODEV);
            }
            let host = VersionRange {
                min: AbiVersion::from_wire(bar.read32(regs::VERSION_MIN as usize)),
                max: AbiVersion::from_wire(bar.read32(regs::VERSION_MAX as usize)),
            };
            let bar = bar.into_devres()?;

            let geometry = DEFAULT_GEOMETRY;
            let ring_len = geometry.ring_bytes();
            // H2G starts on its own page.
            let h2g_off = (ring_len + 4095) & !4095;
            let rings = Coherent::<u8>::zeroed_slice(pdev.as_ref(), h2g_off + ring_len, GFP_KERNEL)?;
            let mut rx = KVec::new();
            rx.resize(geometry.slot_size as usize, 0, GFP_KERNEL)?;
            let mut tx = KVec::new();
            tx.resize(geometry.slot_size as usize, 0, GFP_KERNEL)?;
            let shared = Arc::pin_init(Shared::new(bar, rings, h2g_off, rx, tx), GFP_KERNEL)?;

            let vectors = pdev.alloc_irq_vectors(
                u32::from(regs::MSIX_VECTORS),
                u32::from(regs::MSIX_VECTORS),
                pci::IrqTypes::default().with(pci::IrqType::MsiX),
            )?;

            let name = CString::try_from_fmt(fmt!("{}", pdev.as_ref().name()))?;
            let root = ROOT_DIR.lock().clone();
            let dbg = match root {
                Some(root) => KBox::pin_init(root.scope(shared.clone(), &name, populate_dir), GFP_KERNEL)?,
                None => KBox::pin_init(Scope::dir(shared.clone(), &name, populate_dir), GFP_KERNEL)?,
            };
            let (h1, h2) = (vstr(host.min), vstr(host.max));
            dev_info!(
                pdev,
                "Tandem control device: host speaks ABI {}.{}..{}.{}, rings of {} x {} bytes\n",
                h1.0,
                h1.1,
                h2.0,
                h2.1,
                geometry.slot_count,
                geometry.slot_size
            );

            let ring_shared = shared.clone();
            let status_shared = shared.clone();
            let pdev_bound: &'bound pci::Device<kernel::device::Bound> = pdev;
            Ok(try_pin_init!(&this in CtlDev {
                pdev: pdev_bound,
                // Initialized first (initializers run in the order written),
                // though declared, and so dropped, after the registrations.
                vectors,
                ring_irq <- {
                    // SAFETY: `this` is the final, pinned address of the
                    // `CtlDev` being built and `vectors` is already written,
                    // so a shared reference to it is valid. It is given the
                    // `'bound` lifetime although it lives only as long as the
                    // `CtlDev`: that is sound because the `CtlDev` is pinned
                    // and `vectors` is never handed out mutably; only an IRQ
                    // number (plus a marker) is derived from the reference;
                    // and both registrations are declared before `vectors`,
                    // so they are dropped (free_irq) before it (free the
                    // vectors), also when a later initializer fails (pin-init
                    // drops in reverse initialization order).
                    let vectors: &'bound pci::IrqVectorRegistration<'bound> =
                        unsafe { &*core::ptr::addr_of!((*this.as_ptr()).vectors) };
                    let v = vectors.index(usize::from(regs::VECTOR_RING))?;
                    // SAFETY: the registration lives in the driver data, which
                    // the driver core always drops (never forgotten).
                    unsafe {
                        irq::ThreadedRegistration::new(
                            v.into(),
                            irq::Flags::TRIGGER_NONE,
                            c"tandem-ring",
                            Ok::<_, Error>(RingIrq { shared: ring_shared }),
                        )
                    }
                },
                status_irq <- {
                    // SAFETY: as for `ring_irq` above.
                    let vectors: &'bound pci::IrqVectorRegistration<'bound> =
                        unsafe { &*core::ptr::addr_of!((*this.as_ptr()).vectors) };
                    let v = vectors.index(usize::from(regs::VECTOR_STATUS))?;
                    // SAFETY: as for `ring_irq` above.
                    unsafe {
                        irq::Registration::new(
                            v.into(),
                            irq::Flags::TRIGGER_NONE,
                            c"tandem-status",
                            Ok::<_, Error>(StatusIrq { shared: status_shared }),
                        )
                    }
                },
                dbg,
                shared,
                _enable: enable,
            }? Error)
            .pin_chain(|this| {
                // Bring the channel up now, then keep it up from the work item.
                this.shared.tick();
                let _ = queue().enqueue_delayed(this.shared.clone(), msecs_to_jiffies(TICK_MS));
                Ok(())
            }))
        })
    }

    fn unbind<'bound>(pdev: &'bound pci::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let s = &this.shared;
        s.stop_work();
        let mut guard = s.chan.lock();
        let c = &mut *guard;
        if c.enabled && matches!(c.ep.state(), State::Up { .. }) {
            let out = c.ep.event(Kind::Goodbye);
            let bye = Endpoint::<PENDING>::goodbye_payload(goodbye::UNLOAD);
            let _ = s.send(c, &out, bye.as_bytes());
        }
        // The host must stop using our rings before they are freed.
        s.disable(c);
        if c.ping.done.is_none() {
            c.ping.done = Some(false);
        }
        drop(guard);
        *s.ev.lock() += 1;
        s.ev_cv.notify_all();
        dev_info!(
            pdev,
            "control device released: the channel to the host (session {}) is closed\n",
            s.chan.lock().session
        );
    }
}

#[pinned_drop]
impl PinnedDrop for CtlDev<'_> {
    fn drop(self: Pin<&mut Self>) {
        // Idempotent; covers a probe that failed after the work was queued.
        self.shared.stop_work();
    }
}

// ---- the module ----

fn show_version(_: &(), f: &mut fmt::Formatter<'_>) -> fmt::Result {
    writeln!(f, "{}", VERSION)
}

fn show_abi(_: &(), f: &mut fmt::Formatter<'_>) -> fmt::Result {
    writeln!(f, "{}.{}", ABI_VERSION.major, ABI_VERSION.minor)
}

#[pin_data(PinnedDrop)]
struct TandemModule {
    /// First: unregistering unbinds every device before the rest goes.
    #[pin]
    driver: driver::Registration<pci::Adapter<CtlDriver>>,
    /// Dropped after the driver is gone (no request can run any more):
    /// releases whatever the host had quiesced or frozen.
    _functions: functions::Registration,
    /// The multi-path volumes (F4), torn down after the driver is gone.
    _volumes: multipath::Registration,
    _volumes_file: Pin<KBox<debugfs::File<()>>>,
    _version: Pin<KBox<debugfs::File<()>>>,
    _abi_version: Pin<KBox<debugfs::File<()>>>,
    _dir: Dir,
}

impl kernel::InPlaceModule for TandemModule {
    fn init(module: &'static kernel::ThisModule) -> impl PinInit<Self, Error> {
        pin_init::pin_init_scope(move || {
            // The wire format compiled here must be the one the host tests:
            // refuse to load if the golden vectors do not come out identical.
            match abi::golden::check() {
                Ok(n) => pr_info!("{} golden ABI vectors match\n", n),
                Err(name) => {
                    pr_err!("golden ABI vector '{}' does not match; not loading\n", name);
                    return Err(EINVAL);
                }
            }
            let o = offered();
            if !o.is_valid() {
                pr_err!("abi_min is above abi_max\n");
                return Err(EINVAL);
            }
            // SAFETY: called exactly once, before any other use of ROOT_DIR.
            unsafe { ROOT_DIR.init() };
            let dir = Dir::new(c"tandem");
            let version = KBox::pin_init(dir.read_callback_file(c"version", (), &show_version), GFP_KERNEL)?;
            let abi_version = KBox::pin_init(dir.read_callback_file(c"abi_version", (), &show_abi), GFP_KERNEL)?;
            // Visible before the driver registers: probe runs inside it.
            *ROOT_DIR.lock() = Some(dir.clone());
            let (a, b) = (vstr(o.min), vstr(o.max));
            pr_info!(
                "tandem {} loaded, speaks ABI {}.{} (offers {}.{}..{}.{})\n",
                VERSION,
                ABI_VERSION.major,
                ABI_VERSION.minor,
                a.0,
                a.1,
                b.0,
                b.1
            );
            let functions = functions::Registration::new()?;
            let volumes = multipath::Registration::new(module.as_ptr())?;
            let volumes_file = KBox::pin_init(dir.read_callback_file(c"volumes", (), &multipath::show), GFP_KERNEL)?;
            Ok(try_pin_init!(Self {
                // Written first so that a failed driver registration drops
                // it (initializers are undone in reverse order).
                _functions: functions,
                _volumes: volumes,
                _volumes_file: volumes_file,
                driver <- driver::Registration::new(<Self as kernel::ModuleMetadata>::NAME, module),
                _version: version,
                _abi_version: abi_version,
                _dir: dir,
            }? Error))
        })
    }
}

#[pinned_drop]
impl PinnedDrop for TandemModule {
    fn drop(self: Pin<&mut Self>) {
        let _ = ROOT_DIR.lock().take();
        pr_info!("tandem {} unloaded\n", VERSION);
    }
}
