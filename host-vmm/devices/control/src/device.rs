//! The control device's behaviour: registers, rings, interrupts.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use shared_abi::channel::{
    Endpoint, HostParams, LastError, Outcome, Role, State, DEFAULT_HOST_PARAMS,
};
use shared_abi::msg::{self, caps, encode, Kind, Out};
use shared_abi::regs::{self, control, error, status};
use shared_abi::ring::{self, RingGeometry};
use shared_abi::{faults, pci, VersionRange};
use tandem_pci::{command, Bar, BarKind, ConfigEvent, ConfigSpace, Identity};
use tandem_vfio_server::{DmaSpace, Mem, PciFunction};
use tracing::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress};

use crate::api::{ChannelInfo, Counters, Fault};

/// Outstanding host requests at once.
const MAX_PENDING: usize = 64;
/// Host-to-guest messages waiting for ring room before new ones are refused.
const OUTBOX_LIMIT: usize = 256;

/// How a host request ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the channel is not up ({0})")]
    NotUp(String),
    #[error("too many outstanding requests")]
    Busy,
    #[error("payload of {0} bytes is larger than a ring slot holds ({1})")]
    TooLarge(usize, usize),
    #[error("no answer in time")]
    Timeout,
    #[error("the guest answered with status {0}")]
    Refused(String),
    #[error("the channel went down: {0}")]
    Down(String),
    #[error("the guest driver does not take {0} requests (an older ABI)")]
    NotSupported(&'static str),
}

/// A completed request of ours: the guest's status and response payload.
pub type Answer = Result<(msg::Status, Vec<u8>), RequestError>;
type Waiter = Sender<Answer>;

#[derive(Clone, Copy, Debug)]
struct Rings {
    g2h: u64,
    h2g: u64,
    geometry: RingGeometry,
    g2h_consumer: u32,
    h2g_producer: u32,
}

#[derive(Default)]
struct Stats {
    doorbells: u64,
    interrupts: u64,
    dma_faults: u64,
    outbox_drops: u64,
}

/// The device model. Lives behind a mutex shared by the vfio-user thread,
/// the API threads and the ticker.
pub struct ControlDevice {
    config: ConfigSpace,
    pristine: ConfigSpace,
    dma: Arc<DmaSpace>,
    msix: Vec<Option<File>>,
    ctl: u32,
    status: u32,
    error: u32,
    g2h_base: u64,
    h2g_base: u64,
    geometry: u32,
    rings: Option<Rings>,
    endpoint: Endpoint<MAX_PENDING>,
    range: VersionRange,
    outbox: VecDeque<Vec<u8>>,
    waiters: HashMap<u64, Waiter>,
    clock: Instant,
    session: u32,
    stats: Stats,
}

fn identity() -> Identity {
    Identity {
        vendor_id: pci::VENDOR_ID,
        device_id: pci::CONTROL_DEVICE_ID,
        subsystem_vendor_id: pci::SUBSYSTEM_VENDOR_ID,
        subsystem_id: pci::SUBSYSTEM_ID,
        class_code: pci::CLASS_CODE,
        revision: pci::REVISION,
    }
}

fn config_space() -> ConfigSpace {
    let mut c = ConfigSpace::new(identity());
    // The layout is fixed; these cannot fail (the unit tests build it too).
    let bars = [
        (0, regs::BAR0_SIZE),
        (usize::from(regs::MSIX_BAR), regs::BAR2_SIZE),
    ];
    for (i, size) in bars {
        if let Err(e) = c.add_bar(
            i,
            Bar {
                size,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
        ) {
            warn!(error = %e, "control device BAR");
        }
    }
    if let Err(e) = c.add_pcie_endpoint() {
        warn!(error = %e, "control device PCIe capability");
    }
    if let Err(e) = c.add_msix(
        regs::MSIX_VECTORS,
        regs::MSIX_BAR,
        regs::MSIX_TABLE_OFFSET,
        regs::MSIX_BAR,
        regs::MSIX_PBA_OFFSET,
    ) {
        warn!(error = %e, "control device MSI-X capability");
    }
    c
}

fn error_name(code: u32) -> &'static str {
    match code {
        error::NONE => "none",
        error::BAD_GEOMETRY => "ring geometry out of limits",
        error::RING_NOT_MAPPED => "a ring is outside the guest memory mapped for DMA",
        error::RING_CORRUPT => "a ring's indices broke the ring rules",
        error::RINGS_OVERLAP => "the rings overlap",
        error::RING_MISALIGNED => "a ring is not 64-byte aligned",
        _ => "unknown",
    }
}

impl ControlDevice {
    /// A device for host `session` (a number that changes on every restart)
    /// speaking `range`.
    pub fn new(dma: Arc<DmaSpace>, session: u32, range: VersionRange) -> ControlDevice {
        let config = config_space();
        let clock = Instant::now();
        ControlDevice {
            pristine: config.clone(),
            config,
            dma,
            msix: Vec::new(),
            ctl: 0,
            status: 0,
            error: 0,
            g2h_base: 0,
            h2g_base: 0,
            geometry: 0,
            rings: None,
            endpoint: Self::endpoint(session, range),
            range,
            outbox: VecDeque::new(),
            waiters: HashMap::new(),
            clock,
            session,
            stats: Stats::default(),
        }
    }

    fn endpoint(session: u32, range: VersionRange) -> Endpoint<MAX_PENDING> {
        Endpoint::new(
            Role::Host,
            range,
            caps::ALL,
            HostParams {
                session: u64::from(session),
                ..DEFAULT_HOST_PARAMS
            },
            env!("CARGO_PKG_VERSION"),
            0,
        )
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn reg_read(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC => msg::MSG_MAGIC,
            regs::VERSION_MAX => self.range.max.to_wire(),
            regs::VERSION_MIN => self.range.min.to_wire(),
            regs::CAPS_LO => caps::ALL as u32,
            regs::CAPS_HI => (caps::ALL >> 32) as u32,
            regs::STATUS => self.status,
            regs::CONTROL => self.ctl,
            regs::ERROR => self.error,
            regs::G2H_BASE_LO => self.g2h_base as u32,
            regs::G2H_BASE_HI => (self.g2h_base >> 32) as u32,
            regs::H2G_BASE_LO => self.h2g_base as u32,
            regs::H2G_BASE_HI => (self.h2g_base >> 32) as u32,
            regs::RING_GEOMETRY => self.geometry,
            regs::SESSION => self.session,
            _ => 0,
        }
    }

    fn reg_write(&mut self, offset: u64, value: u32) {
        let enabled = self.status & status::ENABLED != 0;
        let set_lo = |base: &mut u64| *base = (*base & !0xffff_ffff) | u64::from(value);
        let set_hi = |base: &mut u64| *base = (*base & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            // Ring registers are frozen while the rings are in use.
            regs::G2H_BASE_LO if !enabled => set_lo(&mut self.g2h_base),
            regs::G2H_BASE_HI if !enabled => set_hi(&mut self.g2h_base),
            regs::H2G_BASE_LO if !enabled => set_lo(&mut self.h2g_base),
            regs::H2G_BASE_HI if !enabled => set_hi(&mut self.h2g_base),
            regs::RING_GEOMETRY if !enabled => self.geometry = value,
            regs::CONTROL => {
                if value & control::RESET != 0 {
                    self.soft_reset("the guest reset the device");
                    return;
                }
                self.ctl = value & control::ENABLE;
                if value & control::ENABLE != 0 && !enabled {
                    self.enable();
                } else if value & control::ENABLE == 0 && enabled {
                    self.disable("the guest disabled the channel");
                }
            }
            regs::G2H_DOORBELL | regs::H2G_DOORBELL => {
                self.stats.doorbells = self.stats.doorbells.wrapping_add(1);
                self.process();
            }
            _ => debug!(
                offset,
                value, "write to a read-only or unknown register ignored"
            ),
        }
    }

    fn enable(&mut self) {
        let geometry = match RingGeometry::from_register(self.geometry).validate() {
            Ok(g) => g,
            Err(_) => return self.fail(error::BAD_GEOMETRY),
        };
        let len = geometry.ring_bytes() as u64;
        let (g, h) = (self.g2h_base, self.h2g_base);
        if g % 64 != 0 || h % 64 != 0 {
            return self.fail(error::RING_MISALIGNED);
        }
        if g < h.saturating_add(len) && h < g.saturating_add(len) {
            return self.fail(error::RINGS_OVERLAP);
        }
        let Some(mem) = self.dma.memory() else {
            return self.fail(error::RING_NOT_MAPPED);
        };
        if !self.dma.contains(g, geometry.ring_bytes())
            || !self.dma.contains(h, geometry.ring_bytes())
        {
            return self.fail(error::RING_NOT_MAPPED);
        }
        // Start from the indices as they are in memory (the guest zeroes
        // them; a different value must still obey the ring rules).
        let g2h_consumer = load(&mem, g + ring::CONSUMER_OFFSET as u64);
        let h2g_producer = load(&mem, h + ring::PRODUCER_OFFSET as u64);
        let (Some(g2h_consumer), Some(h2g_producer)) = (g2h_consumer, h2g_producer) else {
            return self.fail(error::RING_NOT_MAPPED);
        };
        self.rings = Some(Rings {
            g2h: g,
            h2g: h,
            geometry,
            g2h_consumer,
            h2g_producer,
        });
        self.endpoint.reset();
        self.status = status::ENABLED;
        self.error = error::NONE;
        info!(
            slots = geometry.slot_count,
            slot_size = geometry.slot_size,
            "channel rings enabled"
        );
        self.signal(regs::VECTOR_STATUS);
        self.process();
    }

    fn disable(&mut self, why: &str) {
        info!(why, "channel rings disabled");
        self.rings = None;
        self.status &= !status::ENABLED;
        self.outbox.clear();
        self.endpoint.reset();
        self.fail_waiters(RequestError::Down(why.into()));
    }

    fn soft_reset(&mut self, why: &str) {
        self.disable(why);
        self.ctl = 0;
        self.status = 0;
        self.error = 0;
        self.g2h_base = 0;
        self.h2g_base = 0;
        self.geometry = 0;
        self.signal(regs::VECTOR_STATUS);
    }

    fn fail(&mut self, code: u32) {
        warn!(error = error_name(code), "control device failed");
        self.stats.dma_faults = self
            .stats
            .dma_faults
            .wrapping_add(u64::from(code == error::RING_NOT_MAPPED));
        self.rings = None;
        self.status = (self.status & !status::ENABLED) | status::FAILED;
        self.error = code;
        self.outbox.clear();
        self.endpoint.reset();
        self.fail_waiters(RequestError::Down(error_name(code).into()));
        self.signal(regs::VECTOR_STATUS);
    }

    fn fail_waiters(&mut self, e: RequestError) {
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(e.clone()));
        }
    }

    fn signal(&mut self, vector: u16) {
        if let Some(Some(fd)) = self.msix.get_mut(usize::from(vector)) {
            if fd.write_all(&1u64.to_le_bytes()).is_ok() {
                self.stats.interrupts = self.stats.interrupts.wrapping_add(1);
            }
        }
    }

    /// Consumes what the guest produced and sends what is queued.
    pub fn process(&mut self) {
        let Some(mut r) = self.rings else { return };
        if self.config.command() & command::BUS_MASTER == 0 {
            // No DMA without bus mastering, as on hardware.
            return;
        }
        let Some(mem) = self.dma.memory() else {
            return self.fail(error::RING_NOT_MAPPED);
        };
        let Some(producer) = load(&mem, r.g2h + ring::PRODUCER_OFFSET as u64) else {
            return self.fail(error::RING_NOT_MAPPED);
        };
        let used = match r.geometry.used(producer, r.g2h_consumer) {
            Ok(u) => u,
            Err(_) => return self.fail(error::RING_CORRUPT),
        };
        let was_full = used == r.geometry.slot_count;
        let mut slot = vec![0u8; r.geometry.slot_size as usize];
        for _ in 0..used {
            let at = r.g2h + r.geometry.slot_offset(r.g2h_consumer) as u64;
            if mem.read_slice(&mut slot, GuestAddress(at)).is_err() {
                return self.fail(error::RING_NOT_MAPPED);
            }
            self.receive(&slot);
            r.g2h_consumer = r.g2h_consumer.wrapping_add(1);
        }
        if used > 0 && !store(&mem, r.g2h + ring::CONSUMER_OFFSET as u64, r.g2h_consumer) {
            return self.fail(error::RING_NOT_MAPPED);
        }
        // `receive` may have failed the device; only then are rings gone.
        if self.rings.is_none() {
            return;
        }
        self.rings = Some(Rings {
            g2h_consumer: r.g2h_consumer,
            ..r
        });
        let sent = self.flush(&mem);
        if was_full && !sent {
            // The guest may be waiting for room in G2H.
            self.signal(regs::VECTOR_RING);
        }
    }

    /// Writes queued messages into H2G; signals once if any went out.
    fn flush(&mut self, mem: &Mem) -> bool {
        let Some(mut r) = self.rings else {
            return false;
        };
        if self.outbox.is_empty() {
            return false;
        }
        let Some(consumer) = load(mem, r.h2g + ring::CONSUMER_OFFSET as u64) else {
            self.fail(error::RING_NOT_MAPPED);
            return false;
        };
        let free = match r.geometry.free(r.h2g_producer, consumer) {
            Ok(f) => f,
            Err(_) => {
                self.fail(error::RING_CORRUPT);
                return false;
            }
        };
        let mut sent = 0;
        while sent < free {
            let Some(m) = self.outbox.pop_front() else {
                break;
            };
            let at = r.h2g + r.geometry.slot_offset(r.h2g_producer) as u64;
            if mem.write_slice(&m, GuestAddress(at)).is_err() {
                self.fail(error::RING_NOT_MAPPED);
                return false;
            }
            r.h2g_producer = r.h2g_producer.wrapping_add(1);
            sent += 1;
        }
        if sent > 0 {
            if !store(mem, r.h2g + ring::PRODUCER_OFFSET as u64, r.h2g_producer) {
                self.fail(error::RING_NOT_MAPPED);
                return false;
            }
            self.rings = Some(r);
            self.signal(regs::VECTOR_RING);
        }
        sent > 0
    }

    fn queue(&mut self, out: &Out, payload: &[u8]) -> bool {
        let Some(r) = self.rings else { return false };
        if self.outbox.len() >= OUTBOX_LIMIT {
            self.stats.outbox_drops = self.stats.outbox_drops.wrapping_add(1);
            return false;
        }
        let mut buf = vec![0u8; r.geometry.slot_size as usize];
        match encode(&mut buf, out, payload) {
            Ok(n) => {
                buf.truncate(n);
                self.outbox.push_back(buf);
                true
            }
            Err(_) => false,
        }
    }

    fn receive(&mut self, slot: &[u8]) {
        let before = self.endpoint.state();
        let now = self.now_ms();
        let outcome = self.endpoint.receive(slot, now);
        match outcome {
            Outcome::Reply { out, payload } => {
                let p = payload.as_slice().to_vec();
                if !self.queue(&out, &p) {
                    debug!("reply dropped: no room");
                }
            }
            Outcome::Completed {
                tag,
                status,
                payload,
                ..
            } => {
                if let Some(w) = self.waiters.remove(&tag) {
                    let _ = w.send(Ok((status, payload.to_vec())));
                }
            }
            Outcome::PeerEvent { kind, .. } => {
                if kind == Kind::Goodbye {
                    info!("the guest driver said goodbye");
                    self.fail_waiters(RequestError::Down("the guest driver said goodbye".into()));
                }
            }
            Outcome::Negotiated { .. }
            | Outcome::Refused { .. }
            | Outcome::Request { .. }
            | Outcome::Nothing => {}
        }
        let after = self.endpoint.state();
        if after != before {
            match after {
                State::Up { version, .. } => info!(
                    guest = self.endpoint.peer_version(),
                    %version,
                    session = self.session,
                    "channel negotiated"
                ),
                State::Refused { peer } => warn!(
                    "guest speaks ABI {}..{}, this host {}..{}: no common version, refused",
                    peer.min, peer.max, self.range.min, self.range.max
                ),
                _ => {}
            }
        }
        if let LastError::Malformed(e) = self.endpoint.last_error {
            if self.endpoint.counters.malformed > 0 && matches!(outcome, Outcome::Nothing) {
                debug!(error = e.name(), "malformed message from the guest dropped");
            }
        }
    }

    /// Starts a host-to-guest ping. The answer (or error) arrives on the
    /// returned channel.
    pub fn begin_ping(
        &mut self,
        payload: &[u8],
        timeout_ms: u32,
    ) -> Result<Receiver<Answer>, RequestError> {
        self.begin_request(Kind::Ping, payload, timeout_ms)
    }

    /// Starts a host-to-guest request of any kind the channel negotiated.
    /// The guest's status and payload (or an error) arrive on the returned
    /// channel.
    pub fn begin_request(
        &mut self,
        kind: Kind,
        payload: &[u8],
        timeout_ms: u32,
    ) -> Result<Receiver<Answer>, RequestError> {
        let Some(r) = self.rings else {
            return Err(RequestError::NotUp(
                "the guest has not enabled the rings".into(),
            ));
        };
        if payload.len() > r.geometry.max_payload() {
            return Err(RequestError::TooLarge(
                payload.len(),
                r.geometry.max_payload(),
            ));
        }
        let now = self.now_ms();
        let out = self
            .endpoint
            .begin(kind, now, timeout_ms)
            .map_err(|e| match e {
                shared_abi::channel::BeginError::Full => RequestError::Busy,
                shared_abi::channel::BeginError::NotSupported => {
                    RequestError::NotSupported(kind.name())
                }
                _ => RequestError::NotUp(state_name(self.endpoint.state()).into()),
            })?;
        if !self.queue(&out, payload) {
            self.endpoint.abandon(out.tag);
            return Err(RequestError::Busy);
        }
        let (tx, rx) = channel();
        self.waiters.insert(out.tag, tx);
        if let Some(mem) = self.dma.memory() {
            self.flush(&mem);
        }
        Ok(rx)
    }

    /// Puts a deliberately broken message into H2G (robustness tests).
    pub fn inject(&mut self, fault: Fault) -> Result<(), RequestError> {
        let Some(r) = self.rings else {
            return Err(RequestError::NotUp(
                "the guest has not enabled the rings".into(),
            ));
        };
        let f = match fault {
            Fault::Garbage => faults::Fault::Garbage,
            Fault::Oversized => faults::Fault::Oversized,
            Fault::UnknownKind => faults::Fault::UnknownKind,
            Fault::BadFlags => faults::Fault::BadFlags,
            Fault::BadVersion => faults::Fault::BadVersion,
            Fault::ShortPayload => faults::Fault::ShortPayload,
            Fault::UnexpectedResponse => faults::Fault::UnexpectedResponse,
        };
        let mut buf = vec![0u8; r.geometry.slot_size as usize];
        let n = f.build(self.endpoint.wire_version(), &mut buf);
        buf.truncate(n);
        if self.outbox.len() >= OUTBOX_LIMIT {
            return Err(RequestError::Busy);
        }
        self.outbox.push_back(buf);
        if let Some(mem) = self.dma.memory() {
            self.flush(&mem);
        }
        Ok(())
    }

    /// Periodic work: expired requests, and a poll of the rings as a safety
    /// net for a lost doorbell.
    pub fn tick(&mut self) {
        let now = self.now_ms();
        while let Some(p) = self.endpoint.expire(now) {
            if let Some(w) = self.waiters.remove(&p.tag) {
                let _ = w.send(Err(RequestError::Timeout));
            }
        }
        self.process();
    }

    pub fn info(&self) -> ChannelInfo {
        let now = self.now_ms();
        let st = self.endpoint.state();
        let c = self.endpoint.counters;
        ChannelInfo {
            pid: std::process::id(),
            session: self.session,
            device_state: if self.status & status::FAILED != 0 {
                "failed"
            } else if self.status & status::ENABLED != 0 {
                "enabled"
            } else {
                "disabled"
            }
            .into(),
            device_error: (self.error != error::NONE).then(|| error_name(self.error).into()),
            channel_state: state_name(st).into(),
            version: match st {
                State::Up { version, .. } => Some(version.to_string()),
                _ => None,
            },
            capabilities: match st {
                State::Up { capabilities, .. } => Some(capabilities),
                _ => None,
            },
            host_versions: format!("{}..{}", self.range.min, self.range.max),
            refused_guest_versions: match st {
                State::Refused { peer } => Some(format!("{}..{}", peer.min, peer.max)),
                _ => None,
            },
            guest_driver: (!self.endpoint.peer_version().is_empty())
                .then(|| self.endpoint.peer_version().into()),
            guest_alive: self.endpoint.peer_alive(now),
            guest_silence_ms: self.endpoint.peer_silence_ms(now),
            counters: Counters {
                rx_messages: c.rx_messages,
                tx_messages: c.tx_messages,
                malformed: c.malformed,
                error_replies: c.error_replies,
                unexpected_responses: c.unexpected_responses,
                timeouts: c.timeouts,
                pings_answered: c.pings_answered,
                heartbeats_received: c.heartbeats_received,
                negotiations: c.negotiations,
                doorbells: self.stats.doorbells,
                interrupts: self.stats.interrupts,
                dma_faults: self.stats.dma_faults,
                outbox_drops: self.stats.outbox_drops,
            },
            last_error: match self.endpoint.last_error {
                LastError::Malformed(e) => format!("malformed message: {}", e.name()),
                LastError::NoCommonVersion { peer } => format!(
                    "no common ABI version: guest {}..{}, host {}..{}",
                    peer.min, peer.max, self.range.min, self.range.max
                ),
                e => e.name().into(),
            },
            ring_slots: self.rings.map(|r| r.geometry.slot_count),
            ring_slot_size: self.rings.map(|r| r.geometry.slot_size),
            dma_mapped: self.dma.memory().is_some(),
        }
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Down => "down",
        State::Negotiating => "negotiating",
        State::Up { .. } => "up",
        State::Refused { .. } => "refused",
    }
}

fn load(mem: &Mem, addr: u64) -> Option<u32> {
    mem.load::<u32>(GuestAddress(addr), Ordering::Acquire).ok()
}

fn store(mem: &Mem, addr: u64, v: u32) -> bool {
    mem.store(v, GuestAddress(addr), Ordering::Release).is_ok()
}

impl PciFunction for ControlDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        for ev in self.config.write(offset, data) {
            if let ConfigEvent::Command { old, new } = ev {
                if old & command::BUS_MASTER == 0 && new & command::BUS_MASTER != 0 {
                    self.process();
                }
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 && data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.reg_read(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 && offset.is_multiple_of(4) {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.reg_write(offset, u32::from_le_bytes(b));
            }
        }
    }

    fn msix_vectors(&self) -> u32 {
        u32::from(regs::MSIX_VECTORS)
    }

    fn set_msix(&mut self, start: u32, fds: Vec<Option<File>>) {
        let n = usize::from(regs::MSIX_VECTORS);
        self.msix.resize_with(n, || None);
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(slot) = self.msix.get_mut(start as usize + i) {
                *slot = fd;
            }
        }
    }

    fn reset(&mut self) {
        self.soft_reset("device reset");
        self.config.reset(&self.pristine);
    }
}
