//! The vhost-user-scsi backend: queue 0 is the control queue (task
//! management, asynchronous notification), queue 1 the event queue (its
//! buffers are kept: no event is ever sent), queues 2.. carry commands.
//! One target (0) with the LUNs the file server reports; every command to
//! it goes through the tunnel client, and its completion (from the
//! client's thread) writes the response and publishes it in the used ring.
//!
//! A task management function is answered once no command is in flight
//! (each completes or fails within the client's reconnect limit): virtio
//! requires every request the function touches to be completed before its
//! own response, and the guest frees them when it gets that response.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_share::client::{Client, Request};
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::bindings::virtio_scsi::{
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_TRANSPORT_FAILURE,
};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::{self, Address, CtrlRequest, CMD_RESP_LEN};

/// Queue size we accept.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Request queues offered (QEMU's `num_queues` may be at most this).
pub const MAX_REQUEST_QUEUES: usize = 4;
const CONTROL_QUEUE: usize = 0;
const EVENT_QUEUE: usize = 1;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub commands: u64,
    /// Commands that completed with a SCSI status other than GOOD.
    pub check_conditions: u64,
    pub reservation_conflicts: u64,
    /// Commands that failed in the tunnel (server unreachable).
    pub transport_failures: u64,
    pub bad_target: u64,
    pub malformed: u64,
    pub task_management: u64,
}

#[derive(Default)]
struct AtomicCounters {
    commands: AtomicU64,
    check_conditions: AtomicU64,
    reservation_conflicts: AtomicU64,
    transport_failures: AtomicU64,
    bad_target: AtomicU64,
    malformed: AtomicU64,
    task_management: AtomicU64,
}

/// Commands in flight, and a way to wait for none.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    zero: Condvar,
}

impl InFlight {
    fn add(&self) {
        *lock(&self.count) += 1;
    }
    fn done(&self) {
        let mut c = lock(&self.count);
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.zero.notify_all();
        }
    }
    /// Waits until nothing is in flight or `limit` passes; whether it is none.
    fn wait_none(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut c = lock(&self.count);
        while *c > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self
                .zero
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
    fn get(&self) -> usize {
        *lock(&self.count)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct ScsiDevice {
    client: Client,
    /// How long a task management function waits for in-flight commands.
    tmf_wait: Duration,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: Arc<AtomicBool>,
    inflight: Arc<InFlight>,
    counters: Arc<AtomicCounters>,
    /// Round trips of the latest PERSISTENT RESERVE OUT commands, in µs.
    prout_us: Arc<Mutex<VecDeque<u64>>>,
}

/// PERSISTENT RESERVE OUT latencies kept.
const PROUT_KEPT: usize = 1024;

fn signal(vring: &VringRwLock, event_idx: bool) {
    let needed = !event_idx || vring.needs_notification().unwrap_or(true);
    if needed {
        if let Err(e) = vring.signal_used_queue() {
            debug!(error = %e, "cannot notify the guest");
        }
    }
}

impl ScsiDevice {
    pub fn new(client: Client, tmf_wait: Duration) -> ScsiDevice {
        ScsiDevice {
            client,
            tmf_wait,
            mem: Mutex::new(None),
            event_idx: Arc::new(AtomicBool::new(false)),
            inflight: Arc::new(InFlight::default()),
            counters: Arc::new(AtomicCounters::default()),
            prout_us: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Round trips (submit to outcome) of the latest PERSISTENT RESERVE
    /// OUT commands, in µs, oldest first.
    pub fn prout_latencies_us(&self) -> Vec<u64> {
        lock(&self.prout_us).iter().copied().collect()
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.get()
    }

    pub fn counters(&self) -> Counters {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            commands: l(&c.commands),
            check_conditions: l(&c.check_conditions),
            reservation_conflicts: l(&c.reservation_conflicts),
            transport_failures: l(&c.transport_failures),
            bad_target: l(&c.bad_target),
            malformed: l(&c.malformed),
            task_management: l(&c.task_management),
        }
    }

    /// Pops and starts every available command on a request queue.
    fn process_requests(
        &self,
        vring: &VringRwLock,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<bool> {
        let mem = atomic.memory();
        let mut answered_now = false;
        // Bounded by the queue: each pass pops one chain the guest made
        // available, and the guest can only have queue-size of them.
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| io::Error::other(e.to_string()))?
                .next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let parsed = request::collect(chain).and_then(|d| request::parse_cmd(&d, &*mem));
            let req = match parsed {
                Ok(r) => r,
                Err(m) => {
                    warn!(error = %m.error, "malformed virtio-scsi request");
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    let used = m.response.as_ref().map_or(0, |r| {
                        request::fail(&*mem, r, VIRTIO_SCSI_S_FAILURE as u8, CMD_RESP_LEN)
                    });
                    vring
                        .add_used(head, used)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    answered_now = true;
                    continue;
                }
            };
            let lun = match request::decode_lun(&req.lun) {
                Address::Lun(l) => l,
                Address::BadTarget => {
                    self.counters.bad_target.fetch_add(1, Ordering::Relaxed);
                    let used = request::fail(
                        &*mem,
                        &req.response,
                        VIRTIO_SCSI_S_BAD_TARGET as u8,
                        CMD_RESP_LEN,
                    );
                    vring
                        .add_used(head, used)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    answered_now = true;
                    continue;
                }
            };
            debug!(opcode = ?req.cdb.first(), tag = req.tag, lun, data_in = req.data_in_len, data_out = req.data_out.len(), "command");
            self.counters.commands.fetch_add(1, Ordering::Relaxed);
            self.inflight.add();
            let tunnel = Request {
                lun,
                task_attr: req.task_attr,
                data_in_len: req.data_in_len,
                cdb: req.cdb.clone(),
                data_out: req.data_out.clone(),
            };
            let vring = vring.clone();
            let atomic = atomic.clone();
            let event_idx = self.event_idx.clone();
            let inflight = self.inflight.clone();
            let counters = self.counters.clone();
            let prout =
                (req.cdb.first() == Some(&0x5f)).then(|| (Instant::now(), self.prout_us.clone()));
            self.client.submit(
                tunnel,
                Box::new(move |res| {
                    let mem = atomic.memory();
                    if let (Some((begun, kept)), Ok(_)) = (&prout, &res) {
                        let mut k = lock(kept);
                        if k.len() == PROUT_KEPT {
                            k.pop_front();
                        }
                        k.push_back(u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX));
                    }
                    let used = match res {
                        Ok(o) => {
                            if o.status != 0 {
                                counters.check_conditions.fetch_add(1, Ordering::Relaxed);
                            }
                            if o.status == 0x18 {
                                counters
                                    .reservation_conflicts
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            request::complete_cmd(
                                &*mem,
                                &req,
                                o.status,
                                &o.sense,
                                &o.data,
                                VIRTIO_SCSI_S_OK as u8,
                            )
                        }
                        Err(e) => {
                            warn!(error = %e, tag = req.tag, "command failed in the tunnel");
                            counters.transport_failures.fetch_add(1, Ordering::Relaxed);
                            request::fail(
                                &*mem,
                                &req.response,
                                VIRTIO_SCSI_S_TRANSPORT_FAILURE as u8,
                                CMD_RESP_LEN,
                            )
                        }
                    };
                    debug!(tag = req.tag, head, used, "completed");
                    if let Err(e) = vring.add_used(head, used) {
                        debug!(error = %e, "cannot complete a command (the device was reset?)");
                    } else {
                        signal(&vring, event_idx.load(Ordering::Relaxed));
                    }
                    inflight.done();
                }),
            );
        }
        Ok(answered_now)
    }

    /// Serves the control queue: task management and notifications.
    fn process_control(
        &self,
        vring: &VringRwLock,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> io::Result<bool> {
        let mem = atomic.memory();
        let mut any = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| io::Error::other(e.to_string()))?
                .next();
            let Some(chain) = chain else { break };
            any = true;
            let head = chain.head_index();
            let used = match request::collect(chain).and_then(|d| request::parse_ctrl(&d, &*mem)) {
                Ok(req) => {
                    let code = match &req {
                        CtrlRequest::Tmf { subtype, tag, .. } => {
                            self.counters
                                .task_management
                                .fetch_add(1, Ordering::Relaxed);
                            let none = self.inflight.wait_none(self.tmf_wait);
                            debug!(subtype, tag, none, "task management");
                            if none {
                                // FUNCTION COMPLETE (0).
                                VIRTIO_SCSI_S_OK
                            } else {
                                warn!(
                                    subtype,
                                    tag,
                                    in_flight = self.inflight.get(),
                                    "task management: commands still in flight; rejected"
                                );
                                VIRTIO_SCSI_S_FUNCTION_REJECTED
                            }
                        }
                        // No event is ever reported.
                        CtrlRequest::An { .. } => VIRTIO_SCSI_S_OK,
                        CtrlRequest::Unknown { kind, .. } => {
                            warn!(kind, "unknown control request");
                            VIRTIO_SCSI_S_FAILURE
                        }
                    };
                    request::complete_ctrl(&*mem, &req, code as u8)
                }
                Err(m) => {
                    warn!(error = %m.error, "malformed control request");
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            vring
                .add_used(head, used)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(any)
    }

    fn serve(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        // The guest's event buffers stay with the device (no event is
        // ever sent): nothing to pop, and the notification loop below
        // would never end on a queue whose buffers are never consumed.
        if index == EVENT_QUEUE {
            return Ok(());
        }
        let Some(atomic) = lock(&self.mem).clone() else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let run = |d: &Self| match index {
            CONTROL_QUEUE => d.process_control(vring, &atomic),
            _ => d.process_requests(vring, &atomic),
        };
        if event_idx {
            // Each round consumes everything the guest made available; it
            // ends when no more was added while notifications were off.
            // (The guest can keep adding, as with any virtio device; each
            // round serves real requests.)
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if run(self)? {
                    signal(vring, true);
                }
                if !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(e.to_string()))?
                {
                    break;
                }
            }
        } else if run(self)? {
            signal(vring, false);
        }
        Ok(())
    }
}

impl VhostUserBackend for ScsiDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 + MAX_REQUEST_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *lock(&self.mem) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error returned here ends the worker thread for good, so only
        // a bug of ours (an event for a queue we do not have) does that.
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Err(io::Error::other(format!("no queue {device_event}")));
        };
        if let Err(e) = self.serve(index, vring) {
            // The guest broke its own queue: its requests stall until it
            // resets the device; the process stays sound.
            warn!(queue = index, error = %e, "a queue is broken");
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
