//! The control device driven in-process by `vfio_user::Client`, a client we
//! did not write: config space, BARs, DMA mappings and MSI-X interrupts,
//! with this test playing the guest driver through `shared_abi`'s endpoint.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared_abi::channel::{Endpoint, Outcome, Role, DEFAULT_HOST_PARAMS};
use shared_abi::msg::{caps, encode, os};
use shared_abi::regs::{self, control, error, status};
use shared_abi::ring::{self, RingGeometry, DEFAULT_GEOMETRY};
use shared_abi::SUPPORTED;
use tandem_control_device::ControlDevice;
use tandem_vfio_server::{DmaSpace, Listener};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::IntoBytes;

const GUEST_BASE: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x20_0000;
const G2H: u64 = GUEST_BASE + 0x1000;
const H2G: u64 = GUEST_BASE + 0x10_0000;

struct Rig {
    client: vfio_user::Client,
    mem: File,
    irq: Vec<EventFd>,
    dev: Arc<Mutex<ControlDevice>>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sock: PathBuf = dir.path().join("ctl.sock");
        let dma = Arc::new(DmaSpace::new());
        let dev = Arc::new(Mutex::new(ControlDevice::new(dma.clone(), 7, SUPPORTED)));
        let listener = Listener::bind(&sock, dev.clone(), dma).unwrap();
        std::thread::spawn(move || listener.serve());
        let mut client = vfio_user::Client::new(&sock).unwrap();
        let mem = tempfile::tempfile().unwrap();
        mem.set_len(GUEST_SIZE).unwrap();
        client
            .dma_map(0, GUEST_BASE, GUEST_SIZE, mem.as_raw_fd())
            .unwrap();
        let irq: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let fds: Vec<_> = irq.iter().map(|e| e.as_raw_fd()).collect();
        client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                2,
                &fds,
            )
            .unwrap();
        Rig {
            client,
            mem,
            irq,
            dev,
            _dir: dir,
        }
    }

    fn cfg32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }
    fn cfg_write32(&mut self, off: u64, v: u32) {
        self.client
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
            .unwrap();
    }
    fn reg(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, off, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }
    fn set_reg(&mut self, off: u64, v: u32) {
        self.client
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, off, &v.to_le_bytes())
            .unwrap();
    }
    fn gread(&self, addr: u64, buf: &mut [u8]) {
        self.mem.read_exact_at(buf, addr - GUEST_BASE).unwrap();
    }
    fn gwrite(&self, addr: u64, buf: &[u8]) {
        self.mem.write_all_at(buf, addr - GUEST_BASE).unwrap();
    }
    fn g32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.gread(addr, &mut b);
        u32::from_le_bytes(b)
    }
    fn wait_irq(&self, vector: usize) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.irq[vector].read().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Programs and enables the rings as a driver would.
    fn enable(&mut self, g2h: u64, h2g: u64, geometry: RingGeometry) {
        self.gwrite(g2h, &[0u8; 128]);
        self.gwrite(h2g, &[0u8; 128]);
        self.set_reg(regs::G2H_BASE_LO, g2h as u32);
        self.set_reg(regs::G2H_BASE_HI, (g2h >> 32) as u32);
        self.set_reg(regs::H2G_BASE_LO, h2g as u32);
        self.set_reg(regs::H2G_BASE_HI, (h2g >> 32) as u32);
        self.set_reg(regs::RING_GEOMETRY, geometry.to_register());
        self.set_reg(regs::CONTROL, control::ENABLE);
    }
}

/// The guest side: produce into G2H, consume from H2G.
struct Guest {
    ep: Endpoint<8>,
    g2h_producer: u32,
    h2g_consumer: u32,
}

impl Guest {
    /// A fresh guest endpoint that has just sent its HELLO.
    fn hello(rig: &mut Rig, name: &str) -> Guest {
        let mut guest = Guest {
            ep: Endpoint::new(
                Role::Guest,
                SUPPORTED,
                caps::ALL,
                DEFAULT_HOST_PARAMS,
                name,
                0,
            ),
            g2h_producer: 0,
            h2g_consumer: 0,
        };
        let (out, hello) = guest.ep.hello(os::LINUX, 0, 1000).unwrap();
        let mut buf = [0u8; 512];
        let n = encode(&mut buf, &out, hello.as_bytes()).unwrap();
        guest.send(rig, &buf[..n]);
        guest
    }

    fn send(&mut self, rig: &mut Rig, bytes: &[u8]) {
        let g = DEFAULT_GEOMETRY;
        rig.gwrite(G2H + g.slot_offset(self.g2h_producer) as u64, bytes);
        self.g2h_producer = self.g2h_producer.wrapping_add(1);
        rig.gwrite(
            G2H + ring::PRODUCER_OFFSET as u64,
            &self.g2h_producer.to_le_bytes(),
        );
        rig.set_reg(regs::G2H_DOORBELL, self.g2h_producer);
    }

    /// Reads every H2G message, handing each to `f`.
    fn drain(&mut self, rig: &mut Rig, mut f: impl FnMut(&mut Self, &mut Rig, Vec<u8>)) {
        let g = DEFAULT_GEOMETRY;
        let producer = rig.g32(H2G + ring::PRODUCER_OFFSET as u64);
        while self.h2g_consumer != producer {
            let mut slot = vec![0u8; g.slot_size as usize];
            rig.gread(H2G + g.slot_offset(self.h2g_consumer) as u64, &mut slot);
            self.h2g_consumer = self.h2g_consumer.wrapping_add(1);
            f(self, rig, slot);
        }
        rig.gwrite(
            H2G + ring::CONSUMER_OFFSET as u64,
            &self.h2g_consumer.to_le_bytes(),
        );
        rig.set_reg(regs::H2G_DOORBELL, self.h2g_consumer);
    }
}

#[test]
fn config_space_and_bars_answer_like_hardware() {
    let mut rig = Rig::new();
    assert_eq!(rig.cfg32(0), 0x10f0_1af4, "vendor and device");
    assert_eq!(rig.cfg32(0x08) >> 8, 0x08_8000, "class");
    rig.cfg_write32(0x10, 0xffff_ffff);
    assert_eq!(rig.cfg32(0x10), 0xffff_f000, "BAR0 sizes as 4 KiB");
    let reg = rig.client.region(VFIO_PCI_BAR0_REGION_INDEX).unwrap().size;
    assert_eq!(reg, regs::BAR0_SIZE);
    assert_eq!(rig.reg(regs::MAGIC), shared_abi::msg::MSG_MAGIC);
    assert_eq!(
        rig.reg(regs::VERSION_MAX),
        shared_abi::ABI_VERSION.to_wire()
    );
    assert_eq!(rig.reg(regs::SESSION), 7);
    // Writes to read-only registers change nothing.
    rig.set_reg(regs::MAGIC, 0);
    assert_eq!(rig.reg(regs::MAGIC), shared_abi::msg::MSG_MAGIC);
}

#[test]
fn negotiation_pings_and_interrupts_through_the_rings() {
    let mut rig = Rig::new();
    rig.cfg_write32(0x04, 0x6); // memory + bus master
    rig.enable(G2H, H2G, DEFAULT_GEOMETRY);
    assert_eq!(rig.reg(regs::STATUS) & status::ENABLED, status::ENABLED);
    assert!(rig.wait_irq(regs::VECTOR_STATUS as usize));

    let mut guest = Guest::hello(&mut rig, "test-guest");
    assert!(
        rig.wait_irq(regs::VECTOR_RING as usize),
        "no interrupt for the HELLO reply"
    );
    let mut negotiated = false;
    guest.drain(&mut rig, |g, _, slot| {
        if let Outcome::Negotiated { .. } = g.ep.receive(&slot, 1) {
            negotiated = true;
        }
    });
    assert!(negotiated);
    assert_eq!(rig.dev.lock().unwrap().info().channel_state, "up");
    assert_eq!(
        rig.dev.lock().unwrap().info().guest_driver.as_deref(),
        Some("test-guest")
    );

    // Host pings the guest 50 times; the guest answers each.
    for i in 0..50u32 {
        let payload: Vec<u8> = (0..(i * 9) % 480).map(|b| b as u8 ^ i as u8).collect();
        let rx = rig.dev.lock().unwrap().begin_ping(&payload, 2000).unwrap();
        assert!(rig.wait_irq(regs::VECTOR_RING as usize));
        guest.drain(&mut rig, |g, rig, slot| {
            if let Outcome::Reply { out, payload } = g.ep.receive(&slot, 2) {
                let mut b = [0u8; 512];
                let n = encode(&mut b, &out, payload.as_slice()).unwrap();
                g.send(rig, &b[..n]);
            }
        });
        let (status, echo) = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(status, shared_abi::msg::Status::Ok);
        assert_eq!(echo, payload);
    }

    // A FUNCTION request (ABI 1.1) reaches the guest driver, which answers
    // later with its report; the host gets the status and the payload.
    let req = shared_abi::msg::FunctionRequest {
        op: shared_abi::msg::function::op::REPORT.into(),
        segment: 0.into(),
        bus: 3,
        devfn: 0,
        drain_ms: 0.into(),
        lease_ms: 0.into(),
        policy: 0.into(),
        volume: 0.into(),
    };
    let rx = rig
        .dev
        .lock()
        .unwrap()
        .begin_request(shared_abi::msg::Kind::Function, req.as_bytes(), 2000)
        .unwrap();
    assert!(rig.wait_irq(regs::VECTOR_RING as usize));
    guest.drain(&mut rig, |g, rig, slot| {
        if let Outcome::Request {
            kind, tag, payload, ..
        } = g.ep.receive(&slot, 3)
        {
            let got =
                shared_abi::msg::payload::<shared_abi::msg::FunctionRequest>(payload).unwrap();
            assert_eq!(got.bus, 3);
            let out =
                g.ep.respond(kind, tag, shared_abi::msg::Status::NoDevice)
                    .unwrap();
            let mut b = [0u8; 512];
            let n = encode(&mut b, &out, &[]).unwrap();
            g.send(rig, &b[..n]);
        }
    });
    let (status, body) = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(status, shared_abi::msg::Status::NoDevice);
    assert!(body.is_empty());
    let info = rig.dev.lock().unwrap().info();
    assert_eq!(info.counters.malformed, 0);
    assert!(info.counters.interrupts >= 51);

    // Garbage from the guest is counted and dropped, and the channel lives.
    guest.send(&mut rig, &[0xabu8; 64]);
    let info = rig.dev.lock().unwrap().info();
    assert_eq!(info.counters.malformed, 1);
    assert_eq!(info.channel_state, "up");
    assert!(info.last_error.contains("bad magic"), "{}", info.last_error);

    // A corrupt producer index fails the device, with a status interrupt.
    let _ = rig.irq[regs::VECTOR_STATUS as usize].read();
    rig.gwrite(
        G2H + ring::PRODUCER_OFFSET as u64,
        &(guest.g2h_producer + 1000).to_le_bytes(),
    );
    rig.set_reg(regs::G2H_DOORBELL, 0);
    assert_eq!(rig.reg(regs::STATUS) & status::FAILED, status::FAILED);
    assert_eq!(rig.reg(regs::ERROR), error::RING_CORRUPT);
    assert!(rig.wait_irq(regs::VECTOR_STATUS as usize));
    // A reset clears it.
    rig.set_reg(regs::CONTROL, control::RESET);
    assert_eq!(rig.reg(regs::STATUS), 0);
    assert_eq!(rig.reg(regs::ERROR), error::NONE);
}

#[test]
fn rings_outside_dma_memory_or_malformed_are_refused() {
    let mut rig = Rig::new();
    rig.cfg_write32(0x04, 0x6);
    // Outside the mapped range.
    rig.enable(GUEST_BASE + GUEST_SIZE - 0x100, H2G, DEFAULT_GEOMETRY);
    assert_eq!(rig.reg(regs::ERROR), error::RING_NOT_MAPPED);
    assert_eq!(rig.reg(regs::STATUS), status::FAILED);
    rig.set_reg(regs::CONTROL, control::RESET);
    // Overlapping rings.
    rig.enable(G2H, G2H + 64, DEFAULT_GEOMETRY);
    assert_eq!(rig.reg(regs::ERROR), error::RINGS_OVERLAP);
    rig.set_reg(regs::CONTROL, control::RESET);
    // Bad geometry.
    rig.enable(
        G2H,
        H2G,
        RingGeometry {
            slot_count: 3,
            slot_size: 512,
        },
    );
    assert_eq!(rig.reg(regs::ERROR), error::BAD_GEOMETRY);
    rig.set_reg(regs::CONTROL, control::RESET);
    // Misaligned.
    rig.enable(G2H + 8, H2G, DEFAULT_GEOMETRY);
    assert_eq!(rig.reg(regs::ERROR), error::RING_MISALIGNED);
    rig.set_reg(regs::CONTROL, control::RESET);
    // A good setup still works after all that.
    rig.enable(G2H, H2G, DEFAULT_GEOMETRY);
    assert_eq!(rig.reg(regs::STATUS), status::ENABLED);
    // Ring registers are frozen while enabled.
    rig.set_reg(regs::G2H_BASE_LO, 0);
    assert_eq!(rig.reg(regs::G2H_BASE_LO), G2H as u32);
}

#[test]
fn no_bus_master_no_dma() {
    let mut rig = Rig::new();
    rig.enable(G2H, H2G, DEFAULT_GEOMETRY);
    // A HELLO sits in G2H, but bus mastering is off: nothing happens.
    let _guest = Guest::hello(&mut rig, "g");
    assert_eq!(rig.g32(G2H + ring::CONSUMER_OFFSET as u64), 0);
    // Turning it on lets the device catch up.
    rig.cfg_write32(0x04, 0x6);
    assert_eq!(rig.g32(G2H + ring::CONSUMER_OFFSET as u64), 1);
    assert_eq!(rig.dev.lock().unwrap().info().channel_state, "up");
}
