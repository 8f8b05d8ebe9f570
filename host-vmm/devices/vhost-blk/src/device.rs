//! The vhost-user backend: one request queue served from a `tandem-disk`
//! chain, counters, and the quiesce gate that lets a checkpoint swap the
//! chain's top layer between requests.
//!
//! Every request runs under a shared hold of the gate, from reading its
//! descriptors to publishing it in the used ring; a checkpoint takes the
//! gate exclusively. So a write the guest saw completed before the
//! checkpoint began is in the sealed layer (the chain flushes it first),
//! a write submitted after it ends lands in the new top, and no request
//! straddles the swap.

use std::io;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tandem_disk::{BlockDevice, Chain, ChainOptions};
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use tandem_volume::server::VolumeError;

use crate::config::{self, Geometry};
use crate::request::{self, DiskParams, Kind};

/// Guest memory as the backend maps it. Every write into it (read data,
/// status bytes, used-ring entries) goes through vm-memory, which marks
/// the page in QEMU's dirty log once QEMU has shared one
/// (`VHOST_USER_SET_LOG_BASE` during live migration): what makes the
/// device migratable.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;

/// The request queue, over that memory.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

/// Queue size we accept (the guest may pick a smaller one).
pub const MAX_QUEUE_SIZE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the request queue's descriptor table or rings are not in guest memory")]
    Queue(#[source] virtio_queue::Error),
    #[error("cannot notify the guest")]
    Notify(#[source] io::Error),
    #[error("checkpoint of {path}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
}

/// What the device has done since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered with IOERR or UNSUPP, malformed chains included.
    pub errors: u64,
    pub checkpoints: u64,
    /// Requests from the second path, through the volume socket
    /// (`tandem-volume`): an NVMe function's namespace on this disk.
    #[serde(default)]
    pub lent_reads: u64,
    #[serde(default)]
    pub lent_writes: u64,
    #[serde(default)]
    pub lent_flushes: u64,
    #[serde(default)]
    pub lent_errors: u64,
}

#[derive(Default)]
struct AtomicCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    checkpoints: AtomicU64,
    lent_reads: AtomicU64,
    lent_writes: AtomicU64,
    lent_flushes: AtomicU64,
    lent_errors: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            errors: l(&self.errors),
            checkpoints: l(&self.checkpoints),
            lent_reads: l(&self.lent_reads),
            lent_writes: l(&self.lent_writes),
            lent_flushes: l(&self.lent_flushes),
            lent_errors: l(&self.lent_errors),
        }
    }
}

/// A vhost-user-blk device over one chain.
pub struct BlkDevice {
    top_path: PathBuf,
    geometry: Geometry,
    params: DiskParams,
    /// The chain: shared by requests, exclusive for a checkpoint; `None`
    /// once closed (requests then fail).
    gate: RwLock<Option<Arc<Chain>>>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: AtomicBool,
    counters: AtomicCounters,
    last_error: Mutex<Option<String>>,
    /// The volume socket's orphans, once the disk is lent: a guest request
    /// waits while a lent write runs that its sender gave up on (the guest
    /// may be re-issuing it here).
    orphans: std::sync::OnceLock<tandem_volume::Orphans>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlkDevice {
    /// `serial` is the `GET_ID` answer (truncated to 20 bytes).
    pub fn new(chain: Arc<Chain>, readonly: bool, serial: &str) -> BlkDevice {
        let size = chain.size();
        let readonly = readonly || !chain.writable();
        // A layer with 4 KiB sectors gets 4 KiB guest blocks: no
        // read-modify-write in the chain for every 512-byte write.
        let unit = chain.layers().first().map_or(512, |l| l.write_unit());
        let blk_size = if unit >= 4096 { 4096 } else { 512 };
        let sectors = size / request::SECTOR_SIZE;
        let geometry = Geometry {
            sectors,
            blk_size,
            readonly,
            discard: true,
        };
        let mut id = serial.as_bytes().to_vec();
        id.truncate(request::ID_BYTES);
        BlkDevice {
            params: DiskParams {
                sectors,
                readonly,
                serial: id,
                discard: geometry.discard && !readonly,
            },
            geometry,
            top_path: chain.top_path().to_path_buf(),
            gate: RwLock::new(Some(chain)),
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            counters: AtomicCounters::default(),
            last_error: Mutex::new(None),
            orphans: std::sync::OnceLock::new(),
        }
    }

    /// The disk is lent: from now on its own requests wait for the
    /// lender's orphans.
    pub fn lend_through(&self, lending: &tandem_volume::Lending) {
        let _ = self.orphans.set(lending.orphans());
    }

    fn wait_for_orphans(&self) {
        if let Some(o) = self.orphans.get() {
            o.wait();
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn read_gate(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<Chain>>> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_gate(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Chain>>> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The chain's layers (path and format), top first; empty once closed.
    pub fn layers(&self) -> Vec<(PathBuf, String)> {
        self.read_gate().as_ref().map_or_else(Vec::new, |c| {
            c.layers()
                .iter()
                .map(|l| (l.path().to_path_buf(), l.format().to_string()))
                .collect()
        })
    }

    pub fn counters(&self) -> Counters {
        self.counters.snapshot()
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn note_error(&self, e: String) {
        *lock(&self.last_error) = Some(e);
    }

    /// Seals the top layer and continues on a new one. Waits for the
    /// requests in progress, holds new ones back meanwhile. Returns the
    /// sealed layer's path.
    pub fn checkpoint(&self) -> Result<PathBuf, DeviceError> {
        let mut quiet = self.write_gate();
        let err = |source| DeviceError::Checkpoint {
            path: self.top_path.clone(),
            source,
        };
        let sealed = match quiet.as_ref() {
            Some(chain) => chain.checkpoint().map_err(err),
            None => Err(err(tandem_disk::DiskError::Invalid(
                "the device is closed".into(),
            ))),
        };
        match &sealed {
            Ok(p) => {
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                debug!(sealed = %p.display(), "checkpoint");
            }
            Err(e) => {
                warn!(error = %e, cause = source_text(e), "checkpoint failed");
                self.note_error(format!("{e}: {}", source_text(e)));
                // A failed checkpoint leaves valid files (old chain or new),
                // but the chain object may have lost its layers if reopening
                // them failed: try once more rather than fail every request.
                if let Some(chain) = quiet.as_ref().filter(|c| c.layers().is_empty()) {
                    let opts = ChainOptions {
                        writable: !self.params.readonly,
                        ..Default::default()
                    };
                    match Chain::open(chain.top_path(), opts) {
                        Ok(c) => *quiet = Some(Arc::new(c)),
                        Err(e) => {
                            warn!(error = %e, "cannot reopen the chain; requests fail");
                            self.note_error(format!("chain lost after a failed checkpoint: {e}"));
                        }
                    }
                }
            }
        }
        sealed
    }

    /// Makes every completed write durable and closes the chain (VHDX:
    /// a clean close clears the log), once the guest has gone. Requests
    /// after this fail.
    pub fn close(&self) -> tandem_disk::Result<()> {
        let Some(chain) = self.write_gate().take() else {
            return Ok(());
        };
        let flushed = chain.flush();
        if Arc::strong_count(&chain) > 1 {
            warn!("the chain is still in use elsewhere; it closes when that ends");
        }
        drop(chain);
        flushed
    }

    fn count(&self, kind: Kind, out: &request::Outcome) {
        let c = &self.counters;
        if out.status != 0 {
            c.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let counter = match kind {
            Kind::In => &c.reads,
            Kind::Out => &c.writes,
            Kind::Flush => &c.flushes,
            Kind::Discard | Kind::WriteZeroes => &c.discards,
            Kind::GetId | Kind::Unsupported(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(out.bytes_read, Ordering::Relaxed);
        c.bytes_written
            .fetch_add(out.bytes_written, Ordering::Relaxed);
    }

    /// Serves every available request on the locked queue; returns
    /// whether any was served. A queue QEMU has stopped serves nothing.
    fn process_queue(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
    ) -> Result<bool, DeviceError> {
        let mut served = false;
        loop {
            self.wait_for_orphans();
            let hold = self.read_gate();
            let chain = match state.get_queue_mut().iter(mem.clone()) {
                Ok(mut requests) => requests.next(),
                Err(virtio_queue::Error::QueueNotReady) => None,
                Err(e) => return Err(DeviceError::Queue(e)),
            };
            let Some(chain) = chain else { break };
            served = true;
            let head = chain.head_index();
            let used_len = self.run_chain(chain, hold.as_deref());
            state.add_used(head, used_len).map_err(DeviceError::Queue)?;
        }
        Ok(served)
    }

    /// Runs one request chain (outside a queue: tests, other frontends)
    /// under the gate; returns the used length to report.
    pub fn run_request<M>(&self, chain: DescriptorChain<M>) -> u32
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        self.wait_for_orphans();
        let hold = self.read_gate();
        self.run_chain(chain, hold.as_deref())
    }

    fn run_chain<M>(&self, chain: DescriptorChain<M>, disk: Option<&Chain>) -> u32
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        let mem = chain.memory();
        let parsed = request::collect(chain.clone()).and_then(|descs| request::parse(&descs, mem));
        match parsed {
            Ok(req) => {
                let (out, err) = match disk {
                    Some(disk) => request::execute(&req, mem, disk, &self.params),
                    None => request::execute(&req, mem, &Closed, &self.params),
                };
                if let Some(e) = err {
                    warn!(kind = ?req.kind, sector = req.sector, error = %e, "request failed");
                    self.note_error(format!("{:?} at sector {}: {e}", req.kind, req.sector));
                }
                self.count(req.kind, &out);
                out.used_len
            }
            Err(m) => {
                warn!(error = %m.error, "malformed request");
                self.note_error(format!("malformed request: {}", m.error));
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                request::reject(&m, mem)
            }
        }
    }

    fn serve(&self, vring: &Vring) -> Result<(), DeviceError> {
        let Some(atomic) = lock(&self.mem).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        // The queue stays locked while requests are taken, run, published
        // and signalled. QEMU stopping the device (GET_VRING_BASE: before a
        // live migration's last pass, a save, a reset) waits for that, so
        // the index it gets back counts exactly the requests answered, and
        // no answer's interrupt is lost with the call fd it then drops.
        let mut state = vring.get_mut();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                state.disable_notification().map_err(DeviceError::Queue)?;
            }
            let served = self.process_queue(&mut state, &mem)?;
            let notify =
                served && (!event_idx || state.needs_notification().map_err(DeviceError::Queue)?);
            if notify {
                state.signal_used_queue().map_err(DeviceError::Notify)?;
            }
            // With EVENT_IDX, keep going until the guest has added nothing
            // while notifications were off.
            if !event_idx || !state.enable_notification().map_err(DeviceError::Queue)? {
                break;
            }
        }
        Ok(())
    }
}

/// The second path (the volume socket): its requests run under the same
/// gate as the guest's virtio requests, so a checkpoint covers both paths
/// and a closed device refuses both.
impl tandem_volume::Volume for BlkDevice {
    fn geometry(&self) -> tandem_volume::proto::Geometry {
        tandem_volume::proto::Geometry {
            size: self.geometry.sectors * request::SECTOR_SIZE,
            readonly: self.geometry.readonly,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        self.lent(&self.counters.lent_reads, "read", |c| {
            c.read_at(buf, offset)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
        self.lent(&self.counters.lent_writes, "write", |c| {
            c.write_at(buf, offset)
        })
    }

    fn flush(&self) -> Result<(), VolumeError> {
        self.lent(&self.counters.lent_flushes, "flush", |c| c.flush())
    }
}

impl BlkDevice {
    fn lent(
        &self,
        counter: &AtomicU64,
        what: &str,
        op: impl FnOnce(&Chain) -> tandem_disk::Result<()>,
    ) -> Result<(), VolumeError> {
        let hold = self.read_gate();
        let Some(chain) = hold.as_deref() else {
            self.counters.lent_errors.fetch_add(1, Ordering::Relaxed);
            return Err(VolumeError::Closed);
        };
        match op(chain) {
            Ok(()) => {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.lent_errors.fetch_add(1, Ordering::Relaxed);
                warn!(what, error = %e, "volume-socket request failed");
                self.note_error(format!("volume socket {what}: {e}"));
                Err(VolumeError::Io(e.to_string()))
            }
        }
    }
}

/// The disk once the device is closed: every request fails.
struct Closed;

impl BlockDevice for Closed {
    fn size(&self) -> u64 {
        0
    }
    fn writable(&self) -> bool {
        false
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> tandem_disk::Result<()> {
        Err(closed())
    }
    fn write_at(&self, _: &[u8], _: u64) -> tandem_disk::Result<()> {
        Err(closed())
    }
    fn flush(&self) -> tandem_disk::Result<()> {
        Err(closed())
    }
    fn discard(&self, _: u64, _: u64) -> tandem_disk::Result<()> {
        Err(closed())
    }
}

fn closed() -> tandem_disk::DiskError {
    tandem_disk::DiskError::Invalid("the device is closed".into())
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::features(&self.geometry)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD: QEMU shares its dirty log with us during live
        // migration (with VHOST_F_LOG_ALL in `features`).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::config_slice(&self.geometry, offset, size)
    }

    fn set_config(&self, offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Without VIRTIO_BLK_F_CONFIG_WCE nothing in the space is writable.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("virtio-blk config space is read-only (write at {offset})"),
        ))
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
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error returned here ends the worker thread for good, so only
        // a bug of ours (an event for a queue we do not have) does that.
        if !evset.contains(EventSet::IN) {
            debug!(?evset, "queue event without input; ignored");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!("no queue {device_event}")));
        };
        if let Err(e) = self.serve(vring) {
            // The guest broke its own queue (rings outside its memory): its
            // requests stall until it resets the device; the process and the
            // disk stay sound.
            warn!(error = %e, "the request queue is broken");
            self.note_error(e.to_string());
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
