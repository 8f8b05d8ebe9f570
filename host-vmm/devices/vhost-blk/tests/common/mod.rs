//! A minimal virtio-blk driver over a real vhost-user connection, as QEMU
//! and a guest would drive the backend: guest memory in a shared file,
//! one request queue, requests built by hand, completions read from the
//! used ring.
#![allow(dead_code, clippy::unwrap_used)] // shared by several test binaries

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MEM: usize = 4 << 20;
pub const PAGE: u64 = 4096;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const HEADER: u64 = 0x10_000;
pub const DATA: u64 = 0x20_0000;
pub const STATUS: u64 = 0x30_0000;
pub const QUEUE: u16 = 16;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

pub struct Driver {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap,
    _memfile: std::fs::File,
    _call: EventFd,
    kick: EventFd,
    avail: u16,
}

impl Driver {
    /// Connects and sets the queue up; with `log`, shares it as the dirty
    /// log (`SET_LOG_BASE`) before the queue starts.
    pub fn connect(socket: &Path, log: Option<(&std::fs::File, u64)>) -> Driver {
        let memfile = tempfile::tempfile().unwrap();
        memfile.set_len(MEM as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(memfile.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host = mem.iter().next().unwrap().as_ptr() as u64;
        let mut fe = Frontend::connect(socket, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: memfile.as_raw_fd(),
        }])
        .unwrap();
        if let Some((file, len)) = log {
            assert!(proto.contains(VhostUserProtocolFeatures::LOG_SHMFD));
            fe.set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: len,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .unwrap();
        }
        fe.set_vring_num(0, QUEUE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: QUEUE,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(0).unwrap();
        let kick = EventFd::new(0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Driver {
            fe,
            mem,
            _memfile: memfile,
            _call: call,
            kick,
            avail: 0,
        }
    }

    fn desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Makes one request available (one at a time: descriptors 0..2):
    /// `data` is written for T_OUT, `len` bytes read for T_IN, nothing
    /// for T_FLUSH.
    pub fn submit(&mut self, kind: u32, sector: u64, data: &[u8], len: u32) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        if kind == T_FLUSH {
            self.desc(DESC, HEADER, 16, NEXT, 1);
            self.desc(DESC + 16, STATUS, 1, WRITE, 0);
        } else {
            if kind == T_OUT {
                self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
            }
            let in_flag = if kind == T_IN { WRITE } else { 0 };
            self.desc(DESC, HEADER, 16, NEXT, 1);
            self.desc(DESC + 16, DATA, len, NEXT | in_flag, 2);
            self.desc(DESC + 32, STATUS, 1, WRITE, 0);
        }
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let slot = u64::from(self.avail % QUEUE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Waits for the last request's completion; its status, or `None` if
    /// none came within `limit`.
    pub fn wait(&self, limit: Duration) -> Option<u8> {
        let begun = Instant::now();
        while self.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != self.avail {
            if begun.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Some(self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    pub fn data(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        b
    }
}
