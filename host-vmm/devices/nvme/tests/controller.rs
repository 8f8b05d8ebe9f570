//! Drives the controller as the Linux driver does, over mock guest memory.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns; a failure is the test failing

use std::sync::Arc;

use tandem_nvme_device::backend::{BlockBackend, RawFile};
use tandem_nvme_device::cmd::{Command, Completion, CQE_SIZE};
use tandem_nvme_device::ctrl::{Controller, HostPolicy, Params};
use tandem_nvme_device::spec::{admin, io, reg, status};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const ASQ: u64 = 0x10000;
const ACQ: u64 = 0x20000;
const IOSQ: u64 = 0x30000;
const IOCQ: u64 = 0x40000;
const DATA: u64 = 0x80000;

struct Host {
    mem: GuestMemoryMmap,
    ctrl: Controller,
    asq_tail: u32,
    acq_head: u32,
    iosq_tail: u32,
    iocq_head: u32,
    irqs: Vec<u16>,
    _dir: tempfile::TempDir,
}

fn w32(c: &mut Controller, m: &GuestMemoryMmap, off: u64, v: u32) -> Vec<u16> {
    c.mmio_write(Some(m), off, &v.to_le_bytes()).irqs
}

fn r32(c: &Controller, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Host {
    fn new(policy: HostPolicy) -> Host {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21)]).unwrap();
        Host::with(policy, mem, |_| None)
    }

    /// `backend` may supply the namespace (given the raw file's path).
    fn with(
        policy: HostPolicy,
        mem: GuestMemoryMmap,
        backend: impl FnOnce(&std::path::Path) -> Option<Arc<dyn BlockBackend>>,
    ) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let disk: Arc<dyn BlockBackend> =
            backend(&path).unwrap_or_else(|| Arc::new(RawFile::open(&path).unwrap()));
        let mut ctrl = Controller::new(
            Params {
                controller_id: 1,
                serial: "T1".into(),
                model: "test".into(),
                firmware: "0".into(),
                max_io_queues: 4,
                msix_vectors: 5,
            },
            vec![disk],
        );
        ctrl.set_bus_master(true);
        ctrl.set_policy::<GuestMemoryMmap>(policy, None);
        let mut h = Host {
            mem,
            ctrl,
            asq_tail: 0,
            acq_head: 0,
            iosq_tail: 0,
            iocq_head: 0,
            irqs: vec![],
            _dir: dir,
        };
        let m = &h.mem;
        w32(&mut h.ctrl, m, reg::AQA, (15 << 16) | 15);
        h.ctrl.mmio_write(Some(m), reg::ASQ, &ASQ.to_le_bytes());
        h.ctrl.mmio_write(Some(m), reg::ACQ, &ACQ.to_le_bytes());
        w32(&mut h.ctrl, m, reg::CC, 1 | (6 << 16) | (4 << 20));
        assert_eq!(r32(&h.ctrl, reg::CSTS) & 1, 1, "ready");
        h
    }

    fn admin(&mut self, mut c: Command) -> Completion {
        c.cid = self.asq_tail as u16 + 100;
        self.mem
            .write_slice(
                &c.encode(),
                GuestAddress(ASQ + u64::from(self.asq_tail) * 64),
            )
            .unwrap();
        self.asq_tail = (self.asq_tail + 1) % 16;
        let irqs = w32(&mut self.ctrl, &self.mem, reg::DOORBELL_BASE, self.asq_tail);
        self.irqs.extend(irqs);
        let cqe = self.reap(ACQ, self.acq_head, 16);
        self.acq_head = (self.acq_head + 1) % 16;
        w32(
            &mut self.ctrl,
            &self.mem,
            reg::DOORBELL_BASE + 4,
            self.acq_head,
        );
        assert_eq!(cqe.cid, c.cid);
        cqe
    }

    fn reap(&self, base: u64, head: u32, _size: u32) -> Completion {
        let mut b = [0u8; CQE_SIZE];
        self.mem
            .read_slice(&mut b, GuestAddress(base + u64::from(head) * 16))
            .unwrap();
        Completion::parse(&b).0
    }

    fn submit_io(&mut self, mut c: Command) -> Vec<u16> {
        c.cid = self.iosq_tail as u16;
        self.mem
            .write_slice(
                &c.encode(),
                GuestAddress(IOSQ + u64::from(self.iosq_tail) * 64),
            )
            .unwrap();
        self.iosq_tail = (self.iosq_tail + 1) % 32;
        w32(
            &mut self.ctrl,
            &self.mem,
            reg::DOORBELL_BASE + 8,
            self.iosq_tail,
        )
    }

    fn io(&mut self, c: Command) -> Completion {
        let irqs = self.submit_io(c);
        assert_eq!(irqs, vec![1], "I/O completion raises the queue's vector");
        let cqe = self.reap(IOCQ, self.iocq_head, 32);
        self.iocq_head = (self.iocq_head + 1) % 32;
        w32(
            &mut self.ctrl,
            &self.mem,
            reg::DOORBELL_BASE + 12,
            self.iocq_head,
        );
        cqe
    }

    fn setup_io(&mut self) {
        let c = self.admin(Command {
            opcode: admin::SET_FEATURES,
            cdw10: 0x07,
            cdw11: (7 << 16) | 7,
            ..Command::default()
        });
        assert_eq!(c.status, 0);
        let c = self.admin(Command {
            opcode: admin::CREATE_CQ,
            prp1: IOCQ,
            cdw10: (31 << 16) | 1,
            cdw11: (1 << 16) | 3,
            ..Command::default()
        });
        assert_eq!(c.status, 0);
        let c = self.admin(Command {
            opcode: admin::CREATE_SQ,
            prp1: IOSQ,
            cdw10: (31 << 16) | 1,
            cdw11: (1 << 16) | 1,
            ..Command::default()
        });
        assert_eq!(c.status, 0);
    }
}

#[test]
fn identify_queues_and_io() {
    let mut h = Host::new(HostPolicy::default());
    let c = h.admin(Command {
        opcode: admin::IDENTIFY,
        prp1: DATA,
        cdw10: 1,
        ..Command::default()
    });
    assert_eq!(c.status, 0);
    let mut id = [0u8; 4096];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[4..6], b"T1");
    assert_eq!(
        u32::from_le_bytes(id[516..520].try_into().unwrap()),
        1,
        "NN"
    );
    // Queue count: asked 8, granted the 4 the controller has.
    let c = h.admin(Command {
        opcode: admin::SET_FEATURES,
        cdw10: 0x07,
        cdw11: (7 << 16) | 7,
        ..Command::default()
    });
    assert_eq!(c.dw0, (3 << 16) | 3);
    // An SQ on a CQ that does not exist.
    let c = h.admin(Command {
        opcode: admin::CREATE_SQ,
        prp1: IOSQ,
        cdw10: (31 << 16) | 1,
        cdw11: (1 << 16) | 1,
        ..Command::default()
    });
    assert_eq!(c.status & 0x3fff, status::CQ_INVALID);
    // A CQ with an interrupt vector the function does not have.
    let c = h.admin(Command {
        opcode: admin::CREATE_CQ,
        prp1: IOCQ,
        cdw10: (31 << 16) | 1,
        cdw11: (9 << 16) | 3,
        ..Command::default()
    });
    assert_eq!(c.status & 0x3fff, status::INVALID_INTERRUPT_VECTOR);
    for (op, cdw10, cdw11) in [
        (admin::CREATE_CQ, (31 << 16) | 1, (1 << 16) | 3),
        (admin::CREATE_SQ, (31 << 16) | 1, (1 << 16) | 1),
    ] {
        let c = h.admin(Command {
            opcode: op,
            prp1: if op == admin::CREATE_CQ { IOCQ } else { IOSQ },
            cdw10,
            cdw11,
            ..Command::default()
        });
        assert_eq!(c.status, 0);
    }
    // Write 8 KiB across two pages, read it back elsewhere.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let c = h.io(Command {
        opcode: io::WRITE,
        nsid: 1,
        prp1: DATA,
        prp2: DATA + 4096,
        cdw10: 16,
        cdw12: 15,
        ..Command::default()
    });
    assert_eq!(c.status, 0);
    let c = h.io(Command {
        opcode: io::READ,
        nsid: 1,
        prp1: DATA + 0x10000,
        prp2: DATA + 0x11000,
        cdw10: 16,
        cdw12: 15,
        ..Command::default()
    });
    assert_eq!(c.status, 0);
    let mut back = vec![0u8; 8192];
    h.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(back, pattern);
    // Out of range, bad namespace, unmapped memory.
    let c = h.io(Command {
        opcode: io::READ,
        nsid: 1,
        prp1: DATA,
        cdw10: 2047,
        cdw12: 1,
        ..Command::default()
    });
    assert_eq!(c.status & 0x3fff, status::LBA_OUT_OF_RANGE);
    let c = h.io(Command {
        opcode: io::READ,
        nsid: 2,
        prp1: DATA,
        ..Command::default()
    });
    assert_eq!(c.status & 0x3fff, status::INVALID_NAMESPACE);
    let c = h.io(Command {
        opcode: io::WRITE,
        nsid: 1,
        prp1: 0x4000_0000,
        ..Command::default()
    });
    assert_eq!(c.status & 0x3fff, status::DATA_TRANSFER_ERROR);
    assert_eq!(h.ctrl.stats().dma_faults, 1);
    let c = h.io(Command {
        opcode: io::FLUSH,
        nsid: 1,
        ..Command::default()
    });
    assert_eq!(c.status, 0);
}

#[test]
fn invalid_doorbells_raise_an_async_event() {
    let mut h = Host::new(HostPolicy::default());
    let c = Command {
        opcode: admin::ASYNC_EVENT_REQUEST,
        cid: 7,
        ..Command::default()
    };
    h.mem.write_slice(&c.encode(), GuestAddress(ASQ)).unwrap();
    w32(&mut h.ctrl, &h.mem, reg::DOORBELL_BASE, 1);
    // Nothing completed yet: the AER waits.
    assert_eq!(h.reap(ACQ, 0, 16).cid, 0);
    // Doorbell of SQ 9, which does not exist.
    let irqs = w32(&mut h.ctrl, &h.mem, reg::DOORBELL_BASE + 9 * 8, 3);
    assert_eq!(irqs, vec![0]);
    let cqe = h.reap(ACQ, 0, 16);
    assert_eq!(cqe.cid, 7);
    assert_eq!(cqe.dw0 & 7, 0, "error status event");
    assert_eq!(h.ctrl.stats().invalid_doorbells, 1);
}

#[test]
fn frozen_functions_hold_io_and_refuse_resets() {
    let mut h = Host::new(HostPolicy {
        frozen: false,
        max_io_queues: Some(2),
        ..HostPolicy::default()
    });
    h.setup_io();
    assert_eq!(h.ctrl.state().io_queues_granted, 2, "ceiling applies");
    h.ctrl.set_policy::<GuestMemoryMmap>(
        HostPolicy {
            frozen: true,
            max_io_queues: Some(2),
            ..HostPolicy::default()
        },
        None,
    );
    let irqs = h.submit_io(Command {
        opcode: io::FLUSH,
        nsid: 1,
        ..Command::default()
    });
    assert!(irqs.is_empty(), "nothing is fetched while frozen");
    assert_eq!(h.ctrl.state().in_flight, 1);
    // A controller reset is refused while frozen.
    w32(&mut h.ctrl, &h.mem, reg::CC, 0);
    assert_eq!(r32(&h.ctrl, reg::CSTS) & 1, 1);
    assert_eq!(h.ctrl.stats().policy_refusals, 2);
    let fx = h.ctrl.set_policy(HostPolicy::default(), Some(&h.mem));
    assert_eq!(fx.irqs, vec![1]);
    assert_eq!(h.ctrl.state().in_flight, 0);
    let cqe = h.reap(IOCQ, 0, 32);
    assert_eq!(cqe.status, status::SUCCESS);
}

/// A namespace that, like a guest on another vCPU, submits one more
/// command (shadow doorbell only, no MMIO write: the event index says the
/// device is busy) each time the device writes to it, `left` times.
struct SubmitsWhileBusy {
    disk: RawFile,
    mem: GuestMemoryMmap,
    left: std::sync::atomic::AtomicU32,
    tail: std::sync::atomic::AtomicU32,
}

const SHADOW: u64 = 0x50000;
const EVENTIDX: u64 = 0x51000;

impl BlockBackend for SubmitsWhileBusy {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.left.load(SeqCst) > 0 {
            self.left.fetch_sub(1, SeqCst);
            let slot = self.tail.fetch_add(1, SeqCst);
            let c = Command {
                opcode: io::WRITE,
                cid: slot as u16,
                nsid: 1,
                prp1: DATA,
                ..Command::default()
            };
            self.mem
                .write_slice(&c.encode(), GuestAddress(IOSQ + u64::from(slot) * 64))
                .unwrap();
            // The guest's shadow tail for SQ 1 (doorbell index 2).
            self.mem
                .write_obj(slot + 1, GuestAddress(SHADOW + 2 * 4))
                .unwrap();
        }
        self.disk.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.disk.flush()
    }
    fn describe(&self) -> String {
        "submits-while-busy".into()
    }
}

/// With shadow doorbells a guest adds commands while the device works and
/// does not ring; the device must take all of them before it stops
/// looking, however many times that happens (a slow namespace, a volume
/// socket, made it happen more than the 8 passes the device used to
/// allow: the rest sat in the queue, unrung, until the guest timed out).
#[test]
fn commands_added_while_the_device_works_are_all_taken() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21)]).unwrap();
    let feeder = Arc::new(std::sync::Mutex::new(None::<Arc<SubmitsWhileBusy>>));
    let f2 = feeder.clone();
    let m2 = mem.clone();
    let mut h = Host::with(HostPolicy::default(), mem, move |path| {
        let b = Arc::new(SubmitsWhileBusy {
            disk: RawFile::open(path).unwrap(),
            mem: m2,
            left: std::sync::atomic::AtomicU32::new(0),
            tail: std::sync::atomic::AtomicU32::new(1),
        });
        *f2.lock().unwrap() = Some(b.clone());
        Some(b)
    });
    h.setup_io();
    let c = h.admin(Command {
        opcode: admin::DOORBELL_BUFFER_CONFIG,
        prp1: SHADOW,
        prp2: EVENTIDX,
        ..Command::default()
    });
    assert_eq!(c.status, 0, "doorbell buffer config");
    let b = feeder.lock().unwrap().clone().unwrap();
    const MORE: u32 = 20;
    b.left.store(MORE, std::sync::atomic::Ordering::SeqCst);
    // The first command: shadow and MMIO doorbell, as the driver does
    // when the event index asks for it.
    let first = Command {
        opcode: io::WRITE,
        cid: 0,
        nsid: 1,
        prp1: DATA,
        ..Command::default()
    };
    h.mem
        .write_slice(&first.encode(), GuestAddress(IOSQ))
        .unwrap();
    h.mem.write_obj(1u32, GuestAddress(SHADOW + 8)).unwrap();
    w32(&mut h.ctrl, &h.mem, reg::DOORBELL_BASE + 8, 1);
    for i in 0..=MORE {
        let cqe = h.reap(IOCQ, i, 32);
        assert_eq!(
            (cqe.cid, cqe.status),
            (i as u16, 0),
            "completion {i} of {} (the rest left in the queue)",
            MORE + 1
        );
    }
}
