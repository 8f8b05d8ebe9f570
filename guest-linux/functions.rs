// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The guest side of F6: tandem.ko acting on an assigned PCI function's
//! driver stack for the host (ABI 1.1 `FUNCTION` requests).
//!
//! The function is driven by its own stock driver (`nvme` for the Tandem
//! NVMe VF); tandem.ko does not bind it. It works on what that driver built
//! and on the PCI core's view of the device:
//!
//! - **quiesce**: every block device under the function has its blk-mq
//!   queue quiesced, so new I/O waits in the guest's queues (it is not
//!   failed), then tandem.ko waits, bounded, until the requests already
//!   started on the function complete. A lease bounds the hold: without a
//!   `RESUME` the queues are released when it ends, so a host that vanished
//!   cannot stall the guest's I/O forever.
//! - **resume**: releases exactly the queues that quiesce held.
//! - **report**: driver, enable and bus master state, MSI-X, power state,
//!   disks, requests in flight.
//! - **policy** (frozen): the guest's filter refuses function resets of the
//!   device while the host holds it frozen (the PCI core's reset methods
//!   are cleared, so `echo 1 > /sys/bus/pci/devices/.../reset` and resets
//!   the kernel would start fail with ENOTTY), and hides the NVMe
//!   controller's `reset_controller` file, so that an operator's
//!   controller reset is refused in the guest (the device would not come
//!   back ready while frozen, and the driver would give the controller up);
//!   both come back when the host thaws it. Controller resets and formats
//!   sent through the controller's ioctls do not pass anything tandem.ko
//!   can hold. The device server enforces the same policy regardless: a
//!   root user in the guest can bypass a filter in its own kernel.
//!
//! A driver unbinding from a function (hot-removal, surprise removal, an
//! operator's unbind) releases whatever tandem.ko holds on it first, from a
//! PCI bus notifier: a queue left quiesced would otherwise keep the
//! driver's teardown waiting for requests that can never be dispatched.
//!
//! The kernel's Rust API has no safe wrappers for blk-mq queue quiescing,
//! tag-set iteration, PCI device lookup or bus notifiers; they are called
//! through `bindings` here, each call with its safety argument.

use core::ffi::CStr;

use kernel::ffi::{c_int, c_ulong, c_void};

use kernel::{
    bindings,
    prelude::*,
    time::{Instant, Monotonic},
};

use crate::abi::msg::{function as f, FunctionReport, FunctionRequest, Status};

/// The longest drain the guest waits for in one request.
const MAX_DRAIN_MS: u32 = 10_000;

/// A counted reference to a block device's `struct device` (`get_device`).
struct DiskRef(*mut bindings::device);

// SAFETY: a counted reference to a kernel object may be used and dropped
// from any thread; the object itself does its own locking.
unsafe impl Send for DiskRef {}

impl DiskRef {
    /// The disk's request queue.
    fn queue(&self) -> *mut bindings::request_queue {
        // SAFETY: `self.0` is the `bd_device` of a `struct block_device` of
        // type "disk" (checked when the reference was taken) and is kept
        // alive by our reference; a disk's `bd_disk` and its `queue` live as
        // long as the disk's device does.
        unsafe {
            let bdev = kernel::container_of!(self.0, bindings::block_device, bd_device);
            let disk = (*bdev).bd_disk;
            if disk.is_null() {
                core::ptr::null_mut()
            } else {
                (*disk).queue
            }
        }
    }
}

impl DiskRef {
    /// The disk's device number.
    fn devt(&self) -> u32 {
        // SAFETY: as in `queue`: the `bd_device` of a live block device.
        unsafe { (*kernel::container_of!(self.0, bindings::block_device, bd_device)).bd_dev }
    }
}

impl Drop for DiskRef {
    fn drop(&mut self) {
        // SAFETY: we took exactly this reference with `get_device`.
        unsafe { bindings::put_device(self.0) };
    }
}

/// A counted reference to a `struct pci_dev` (`pci_get_*`).
struct PciRef(*mut bindings::pci_dev);

// SAFETY: as for `DiskRef`.
unsafe impl Send for PciRef {}

impl Drop for PciRef {
    fn drop(&mut self) {
        // SAFETY: we hold exactly this reference.
        unsafe { bindings::pci_dev_put(self.0) };
    }
}

impl PciRef {
    fn lookup(segment: u16, bus: u8, devfn: u8) -> Option<PciRef> {
        // SAFETY: plain lookup; returns a counted reference or null.
        let p = unsafe {
            bindings::pci_get_domain_bus_and_slot(c_int::from(segment), u32::from(bus), u32::from(devfn))
        };
        (!p.is_null()).then_some(PciRef(p))
    }

    fn dev(&self) -> *mut bindings::device {
        // SAFETY: `self.0` is a live `pci_dev` (we hold a reference).
        unsafe { core::ptr::addr_of_mut!((*self.0).dev) }
    }
}

/// Whether the disk whose device is `dev` (of type "disk") is fully added.
/// The block layer makes the disk's device a child of its parent before
/// it can be opened (`bdev_add`) and before its partitions are scanned; a
/// disk counts only once it is `GD_ADDED`, so that a path request made as
/// soon as a disk is reported finds it openable.
///
/// # Safety
/// `dev` is a live device of type "disk" (the `bd_device` of a disk's
/// `part0`).
unsafe fn disk_added(dev: *mut bindings::device) -> bool {
    // SAFETY: per the contract; a disk's `bd_disk` lives as long as its
    // device. `state` is a bit set the block layer changes with atomic
    // bit operations: a volatile read of the word sees each bit whole.
    unsafe {
        let bdev = kernel::container_of!(dev, bindings::block_device, bd_device);
        let disk = (*bdev).bd_disk;
        !disk.is_null() && core::ptr::read_volatile(&(*disk).state) & (1 << bindings::GD_ADDED) != 0
    }
}

/// `device_for_each_child` callback: collects the fully added "disk"
/// devices below `dev`, recursively, into the `KVec<DiskRef>` behind
/// `data`.
unsafe extern "C" fn collect_disks(dev: *mut bindings::device, data: *mut c_void) -> c_int {
    // SAFETY: the driver core passes a live child device; `data` is the
    // `&mut KVec<DiskRef>` `disks_of` passed, used by one walk at a time.
    unsafe {
        let out = &mut *data.cast::<KVec<DiskRef>>();
        let ty = (*dev).type_;
        if !ty.is_null()
            && !(*ty).name.is_null()
            && CStr::from_ptr((*ty).name.cast()) == c"disk"
            && disk_added(dev)
        {
            let d = bindings::get_device(dev);
            if !d.is_null() {
                // On allocation failure the reference is dropped again.
                let _ = out.push(DiskRef(d), GFP_KERNEL);
            }
        }
        bindings::device_for_each_child(dev, data, Some(collect_disks));
    }
    0
}

fn disks_of(p: &PciRef) -> KVec<DiskRef> {
    let mut v: KVec<DiskRef> = KVec::new();
    // SAFETY: `p` is a live device; the callback only reads the children
    // and takes references.
    unsafe {
        bindings::device_for_each_child(
            p.dev(),
            core::ptr::from_mut(&mut v).cast::<c_void>(),
            Some(collect_disks),
        )
    };
    v
}

/// `blk_mq_tagset_busy_iter` callback: counts started requests of the
/// queue in `data[0]` into `data[1]`.
unsafe extern "C" fn count_rq(rq: *mut bindings::request, data: *mut c_void) -> bool {
    // SAFETY: blk-mq passes a live request; `data` is `in_flight`'s pair.
    unsafe {
        let d = &mut *data.cast::<(*mut bindings::request_queue, u32)>();
        if (*rq).q == d.0 {
            d.1 += 1;
        }
    }
    true
}

/// Requests started on the function's disks and not completed.
fn in_flight(disks: &[DiskRef]) -> u32 {
    let mut n = 0;
    for d in disks {
        let q = d.queue();
        if q.is_null() {
            continue;
        }
        let mut pair: (*mut bindings::request_queue, u32) = (q, 0);
        // SAFETY: `q` is live (see `DiskRef::queue`); a blk-mq queue's
        // `tag_set` is set for its whole life; the iteration takes its own
        // references on the requests it visits.
        unsafe {
            let set = (*q).tag_set;
            if !set.is_null() {
                bindings::blk_mq_tagset_busy_iter(
                    set,
                    Some(count_rq),
                    core::ptr::from_mut(&mut pair).cast::<c_void>(),
                );
            }
        }
        n += pair.1;
    }
    n
}

/// Queues held by a quiesce.
struct Quiesced {
    /// Identity of the function (the `pci_dev` address; it cannot be
    /// reused while `pdev` holds its reference).
    pdev: PciRef,
    disks: KVec<DiskRef>,
    since: Instant<Monotonic>,
    lease_ms: u32,
}

impl Quiesced {
    fn release(self) {
        for d in &self.disks {
            let q = d.queue();
            if !q.is_null() {
                // SAFETY: this queue was quiesced exactly once by us and is
                // kept alive by the disk reference.
                unsafe { bindings::blk_mq_unquiesce_queue(q) };
            }
        }
    }
}

/// Reset methods saved while the host holds a function frozen.
struct Frozen {
    pdev: PciRef,
    saved: [u8; 8],
    reset_file: Option<HiddenFile>,
}

impl Frozen {
    /// Gives back what the freeze took. `locked`: the caller holds the
    /// function's device lock (the driver core does, around the bus
    /// notifier's unbind event); otherwise it is taken here.
    fn release(self, locked: bool) {
        // SAFETY: the device is live (we hold a reference); the array is
        // only ever read by the PCI core, byte by byte.
        unsafe { (*self.pdev.0).reset_methods = self.saved };
        if let Some(h) = self.reset_file {
            if locked {
                h.restore();
            } else {
                let _l = DeviceLock::new(&self.pdev);
                h.restore();
            }
        }
    }
}

/// The device lock of a PCI function (`device_lock`), held until drop.
/// Held around the removal and restoring of a controller's files, so that
/// the controller's device cannot be deleted meanwhile: its driver
/// unbinds only under this lock. Never taken while holding `FUNCS` (the
/// bus notifier takes `FUNCS` under it).
struct DeviceLock<'a>(&'a PciRef);

impl<'a> DeviceLock<'a> {
    fn new(p: &'a PciRef) -> Self {
        // SAFETY: a live device's own mutex; released in `drop`.
        unsafe { bindings::mutex_lock(core::ptr::addr_of_mut!((*p.dev()).mutex)) };
        DeviceLock(p)
    }
}

impl Drop for DeviceLock<'_> {
    fn drop(&mut self) {
        // SAFETY: taken in `new`.
        unsafe { bindings::mutex_unlock(core::ptr::addr_of_mut!((*self.0.dev()).mutex)) };
    }
}

/// A sysfs file of a device, removed while the host holds its function
/// frozen (the NVMe controller's `reset_controller`).
struct HiddenFile {
    /// The controller's device (a counted reference).
    dev: *mut bindings::device,
    /// The file's attribute: the driver's static data (nvme is built in).
    attr: *const bindings::attribute,
}

// SAFETY: a counted device reference and a pointer to static data.
unsafe impl Send for HiddenFile {}

impl HiddenFile {
    /// Removes the file `name` of the child device of class `class` of
    /// `p`; `None` if there is no such device or file.
    fn hide(p: &PciRef, class: &CStr, name: &CStr) -> Option<HiddenFile> {
        let mut find: (&CStr, *mut bindings::device) = (class, core::ptr::null_mut());
        // SAFETY: `p` is live; the callback only reads the children and
        // takes a reference on the one it returns.
        unsafe {
            bindings::device_for_each_child(
                p.dev(),
                core::ptr::from_mut(&mut find).cast::<c_void>(),
                Some(find_class_child),
            )
        };
        let dev = find.1;
        if dev.is_null() {
            return None;
        }
        // SAFETY: `dev` is live (our reference). A sysfs file's kernfs
        // node has its `struct attribute` as private data; the lookup
        // returns a counted node, put right after reading that pointer.
        // Removing the file by its attribute waits for writers already in
        // it to leave.
        unsafe {
            let kobj = core::ptr::addr_of_mut!((*dev).kobj);
            let kn = bindings::kernfs_find_and_get_ns((*kobj).sd, name.as_ptr().cast(), core::ptr::null());
            if kn.is_null() {
                bindings::put_device(dev);
                return None;
            }
            let attr = (*kn).priv_.cast::<bindings::attribute>().cast_const();
            bindings::kernfs_put(kn);
            bindings::sysfs_remove_file_ns(kobj, attr, core::ptr::null());
            Some(HiddenFile { dev, attr })
        }
    }

    fn restore(self) {
        // SAFETY: `dev` is live (our reference, put here); `attr` is the
        // driver's static attribute. A device already deleted has no
        // sysfs directory (`sd` null) and gets nothing back.
        unsafe {
            let kobj = core::ptr::addr_of_mut!((*self.dev).kobj);
            if !(*kobj).sd.is_null() {
                let r = bindings::sysfs_create_file_ns(kobj, self.attr, core::ptr::null());
                if r != 0 {
                    pr_warn!("tandem: could not restore a controller file after a thaw ({r})\n");
                }
            }
            bindings::put_device(self.dev);
        }
    }
}

/// `device_for_each_child` callback: the first child whose class is named
/// `data.0`, with a reference taken, into `data.1`.
unsafe extern "C" fn find_class_child(dev: *mut bindings::device, data: *mut c_void) -> c_int {
    // SAFETY: the driver core passes a live child device; `data` is the
    // pair `HiddenFile::hide` passed. A class's name is a static string.
    unsafe {
        let want = &mut *data.cast::<(&CStr, *mut bindings::device)>();
        let cls = (*dev).class;
        if !cls.is_null() && !(*cls).name.is_null() && CStr::from_ptr((*cls).name.cast()) == want.0 {
            want.1 = bindings::get_device(dev);
            return 1;
        }
    }
    0
}

struct Funcs {
    quiesced: KVec<Quiesced>,
    frozen: KVec<Frozen>,
    quiesces: u32,
}

kernel::sync::global_lock! {
    // SAFETY: initialized by `init` (module load) before any use.
    unsafe(uninit) static FUNCS: Mutex<Funcs> = Funcs { quiesced: KVec::new(), frozen: KVec::new(), quiesces: 0 };
}

kernel::sync::global_lock! {
    // SAFETY: as above. Serializes whole requests (a drain can take a
    // while; `FUNCS` is never held across it).
    unsafe(uninit) static EXEC: Mutex<()> = ();
}

/// The bus notifier; the kernel links it into its list.
static mut NOTIFIER: bindings::notifier_block = bindings::notifier_block {
    notifier_call: Some(on_bus_event),
    next: core::ptr::null_mut(),
    priority: 0,
};

/// PCI bus events: a driver about to unbind from a function, or the
/// function leaving, releases what we hold on it.
unsafe extern "C" fn on_bus_event(
    _nb: *mut bindings::notifier_block,
    action: c_ulong,
    data: *mut c_void,
) -> c_int {
    // CAST: bus notifier events are small enum values.
    let unbind = action == bindings::bus_notifier_event_BUS_NOTIFY_UNBIND_DRIVER as c_ulong;
    let unbinding = unbind || action == bindings::bus_notifier_event_BUS_NOTIFY_DEL_DEVICE as c_ulong;
    if !unbinding {
        return 0;
    }
    let dev = data.cast::<bindings::device>();
    // SAFETY: PCI bus notifications carry the `dev` embedded in a `pci_dev`.
    let pdev = unsafe { kernel::container_of!(dev, bindings::pci_dev, dev) };
    // A direct path on it is lost before its driver tears its disk down.
    crate::multipath::function_leaving(pdev);
    let (q, fr) = {
        let mut g = FUNCS.lock();
        (take(&mut g.quiesced, |x| x.pdev.0 == pdev), take(&mut g.frozen, |x| x.pdev.0 == pdev))
    };
    if let Some(q) = q {
        pr_warn!("a quiesced function is going away: its held I/O is released to its driver\n");
        q.release();
    }
    if let Some(fr) = fr {
        // The driver core holds the device lock around an unbind, not
        // around a deletion.
        fr.release(unbind);
    }
    0
}

/// Removes and returns the first record `pred` picks.
fn take<T>(v: &mut KVec<T>, pred: impl Fn(&T) -> bool) -> Option<T> {
    let i = v.iter().position(pred)?;
    v.remove(i).ok()
}

/// The global state and the bus notifier, for the module's lifetime.
pub(crate) struct Registration(());

impl Registration {
    /// Module load; at most once.
    pub(crate) fn new() -> Result<Self> {
        init()?;
        Ok(Registration(()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        exit();
    }
}

fn init() -> Result {
    // SAFETY: called once at module load, before any other use.
    unsafe {
        FUNCS.init();
        EXEC.init();
    }
    // SAFETY: `NOTIFIER` is a static that outlives its registration (it is
    // unregistered in `exit`); `pci_bus_type` is the PCI core's bus.
    let r = unsafe {
        bindings::bus_register_notifier(&raw const bindings::pci_bus_type, &raw mut NOTIFIER)
    };
    if r != 0 {
        return Err(Error::from_errno(r));
    }
    Ok(())
}

/// Module unload: nothing stays held.
fn exit() {
    // SAFETY: registered in `init`.
    unsafe { bindings::bus_unregister_notifier(&raw const bindings::pci_bus_type, &raw mut NOTIFIER) };
    let (qs, frs) = {
        let mut g = FUNCS.lock();
        (core::mem::replace(&mut g.quiesced, KVec::new()), core::mem::replace(&mut g.frozen, KVec::new()))
    };
    for q in qs {
        q.release();
    }
    for fr in frs {
        fr.release(false);
    }
}

/// Releases quiesces whose lease ran out (the housekeeping tick).
pub(crate) fn expire_leases() {
    loop {
        let q = {
            let mut g = FUNCS.lock();
            take(&mut g.quiesced, |x| {
                x.since.elapsed().as_millis() >= i64::from(x.lease_ms)
            })
        };
        let Some(q) = q else { return };
        pr_warn!(
            "the host did not resume a quiesced function within its {} ms lease; resuming it\n",
            q.lease_ms
        );
        q.release();
    }
}

fn power_state(p: &PciRef) -> u32 {
    // SAFETY: a live device; `current_state` is a plain integer the PCI
    // core updates.
    let s = unsafe { (*p.0).current_state };
    u32::try_from(s).unwrap_or(u32::MAX)
}

fn report(p: &PciRef, drain_us: u32) -> FunctionReport {
    let disks = disks_of(p);
    let busy = in_flight(&disks);
    let mut state = f::state::PRESENT;
    let mut driver = [0u8; 16];
    let g = FUNCS.lock();
    // SAFETY: reads of a live device's fields. The driver pointer stays
    // valid while we look: an unbind first runs our bus notifier, which
    // waits for `FUNCS`, held here; the name is the driver's static string.
    unsafe {
        let dev = &*p.dev();
        if !dev.driver.is_null() {
            state |= f::state::BOUND;
            let name = (*dev.driver).name;
            if !name.is_null() {
                let s = CStr::from_ptr(name.cast()).to_bytes();
                let n = s.len().min(16);
                driver[..n].copy_from_slice(&s[..n]);
            }
        }
        let pd = &*p.0;
        if pd.enable_cnt.counter > 0 {
            state |= f::state::ENABLED;
        }
        if pd.is_busmaster() != 0 {
            state |= f::state::BUS_MASTER;
        }
        if pd.msix_enabled() != 0 {
            state |= f::state::MSIX;
        }
    }
    if g.quiesced.iter().any(|x| x.pdev.0 == p.0) {
        state |= f::state::QUIESCED;
    }
    if g.frozen.iter().any(|x| x.pdev.0 == p.0) {
        state |= f::state::FROZEN;
    }
    if busy == 0 {
        state |= f::state::DRAINED;
    }
    for d in &disks {
        state |= crate::multipath::state_of(d.devt());
    }
    FunctionReport {
        state: state.into(),
        power_state: power_state(p).into(),
        disks: u32::try_from(disks.len()).unwrap_or(u32::MAX).into(),
        in_flight: busy.into(),
        drain_us: drain_us.into(),
        quiesces: g.quiesces.into(),
        driver,
    }
}

/// Carries out one request; returns the status and, when the function
/// exists, the report after the operation.
pub(crate) fn execute(req: &FunctionRequest) -> (Status, Option<FunctionReport>) {
    let _one = EXEC.lock();
    let Some(p) = PciRef::lookup(req.segment.get(), req.bus, req.devfn) else {
        return (Status::NoDevice, None);
    };
    match req.op.get() {
        f::op::QUIESCE => {
            let lease_ms = match req.lease_ms.get() {
                0 => f::DEFAULT_LEASE_MS,
                l => l,
            };
            {
                let mut g = FUNCS.lock();
                if let Some(q) = g.quiesced.iter_mut().find(|x| x.pdev.0 == p.0) {
                    // Already held: a new lease from now.
                    q.since = Instant::now();
                    q.lease_ms = lease_ms;
                } else {
                    // Room for the record first: once quiesced, the queues
                    // must be on record to ever be released.
                    if g.quiesced.reserve(1, GFP_KERNEL).is_err() {
                        drop(g);
                        return (Status::Internal, Some(report(&p, 0)));
                    }
                    let disks = disks_of(&p);
                    for d in &disks {
                        let q = d.queue();
                        if !q.is_null() {
                            // SAFETY: a live queue (the disk reference);
                            // quiescing nests with the driver's own.
                            unsafe { bindings::blk_mq_quiesce_queue(q) };
                        }
                    }
                    // SAFETY: a second reference to the same device, for
                    // the record.
                    let held = PciRef(unsafe { bindings::pci_dev_get(p.0) });
                    let rec = Quiesced { pdev: held, disks, since: Instant::now(), lease_ms };
                    // Cannot fail: the room was reserved above.
                    let _ = g.quiesced.push_within_capacity(rec);
                    g.quiesces = g.quiesces.wrapping_add(1);
                }
            }
            let t0 = Instant::<Monotonic>::now();
            let limit = i64::from(req.drain_ms.get().min(MAX_DRAIN_MS));
            let disks = disks_of(&p);
            let mut drained = in_flight(&disks) == 0;
            while !drained && t0.elapsed().as_millis() < limit {
                // SAFETY: process context (threaded IRQ or work item).
                unsafe { bindings::msleep(1) };
                drained = in_flight(&disks) == 0;
            }
            let us = u32::try_from(t0.elapsed().as_micros_ceil()).unwrap_or(u32::MAX);
            let status = if drained { Status::Ok } else { Status::TimedOut };
            (status, Some(report(&p, us)))
        }
        f::op::RESUME => {
            let q = take(&mut FUNCS.lock().quiesced, |x| x.pdev.0 == p.0);
            if let Some(q) = q {
                q.release();
            }
            (Status::Ok, Some(report(&p, 0)))
        }
        f::op::REPORT => (Status::Ok, Some(report(&p, 0))),
        f::op::POLICY => {
            let frozen = req.policy.get() & f::policy::FROZEN != 0;
            let was = FUNCS.lock().frozen.iter().position(|x| x.pdev.0 == p.0);
            // Requests are serialized (`EXEC`), so nothing changes `frozen`
            // between here and the record. Sysfs files are removed and
            // restored outside `FUNCS`: removal waits for a writer in the
            // file, whose reset may take a while.
            match (frozen, was) {
                (true, None) => {
                    // SAFETY: a live device; see `Frozen::release`.
                    let saved = unsafe { (*p.0).reset_methods };
                    // SAFETY: as above; a second reference for the record.
                    let held = PciRef(unsafe { bindings::pci_dev_get(p.0) });
                    let mut g = FUNCS.lock();
                    if g.frozen.reserve(1, GFP_KERNEL).is_err() {
                        drop(g);
                        return (Status::Internal, Some(report(&p, 0)));
                    }
                    // SAFETY: as above. No reset method: the PCI core
                    // refuses every function reset with ENOTTY.
                    unsafe { (*p.0).reset_methods = [0; 8] };
                    drop(g);
                    let reset_file = {
                        let _l = DeviceLock::new(&p);
                        HiddenFile::hide(&p, c"nvme", c"reset_controller")
                    };
                    if reset_file.is_some() {
                        pr_info!("tandem: controller resets refused while the host holds the function frozen\n");
                    }
                    // Cannot fail: the room was reserved above.
                    let _ = FUNCS.lock().frozen.push_within_capacity(Frozen { pdev: held, saved, reset_file });
                }
                (false, Some(_)) => {
                    let fr = take(&mut FUNCS.lock().frozen, |x| x.pdev.0 == p.0);
                    if let Some(fr) = fr {
                        fr.release(false);
                    }
                }
                _ => {}
            }
            (Status::Ok, Some(report(&p, 0)))
        }
        op @ (f::op::PATH_SYNTHETIC | f::op::PATH_DIRECT | f::op::PATH_RELEASE) => {
            let mut disks = disks_of(&p);
            // A function just plugged may have its disk's node before the
            // disk is fully added (openable, partitions scanned): a
            // PATH_DIRECT waits for it within its drain time.
            let t0 = Instant::<Monotonic>::now();
            let limit = i64::from(req.drain_ms.get().min(MAX_DRAIN_MS));
            while op == f::op::PATH_DIRECT && disks.is_empty() && t0.elapsed().as_millis() < limit {
                // SAFETY: process context (threaded IRQ or work item).
                unsafe { bindings::msleep(5) };
                disks = disks_of(&p);
            }
            let Some(d) = disks.first() else {
                return (Status::NoDevice, Some(report(&p, 0)));
            };
            // What is left of the drain time after waiting for the disk.
            let spent = u32::try_from(t0.elapsed().as_millis()).unwrap_or(u32::MAX);
            let wait = req.drain_ms.get().saturating_sub(spent);
            let (devt, vol) = (d.devt(), req.volume.get());
            drop(disks);
            let a = match op {
                f::op::PATH_SYNTHETIC => crate::multipath::make_synthetic(vol, devt, p.0),
                f::op::PATH_DIRECT => crate::multipath::make_direct(vol, devt, p.0, wait),
                _ => crate::multipath::release(vol, devt, wait),
            };
            (a.status, Some(report(&p, a.us)))
        }
        _ => (Status::BadMessage, None),
    }
}
