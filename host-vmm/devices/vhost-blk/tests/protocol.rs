//! The backend process over a real vhost-user connection (the `vhost`
//! crate's frontend, as QEMU would speak it): what it offers, its
//! configuration space, its API socket, and a clean exit with the chain
//! closed when the frontend goes away.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_disk::{ops, Format};
use tandem_vhost_blk::api::{Request, Response};
use tandem_vhost_blk::{run, ServerConfig};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;

fn wait_for(p: &Path) {
    let begun = Instant::now();
    while !p.exists() {
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ask(api: &Path, req: &Request) -> Response {
    let mut s = UnixStream::connect(api).unwrap();
    let mut line = serde_json::to_string(req).unwrap();
    line.push('\n');
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

fn serve(
    disk: &Path,
    readonly: bool,
) -> (
    std::thread::JoinHandle<()>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = disk.parent().unwrap();
    let socket = dir.join(format!("{readonly}.sock"));
    let api = dir.join(format!("{readonly}.api"));
    let cfg = ServerConfig {
        socket: socket.clone(),
        disk: disk.to_path_buf(),
        readonly,
        api_socket: Some(api.clone()),
        serial: None,
    };
    let server = std::thread::spawn(move || run(cfg).unwrap());
    wait_for(&socket);
    wait_for(&api);
    (server, socket, api)
}

#[test]
fn a_frontend_reads_features_and_capacity_then_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    ops::create(&disk, Format::Qcow2, Some(48 << 20), None).unwrap();
    let (server, socket, api) = serve(&disk, false);

    let mut fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_DISCARD,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {bit} missing");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(proto).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    let (_, config) = fe
        .get_config(0, 24, VhostUserConfigFlags::WRITABLE, &[0u8; 24])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        (48 << 20) / 512
    );
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);

    // A checkpoint through the API while connected.
    match ask(&api, &Request::Checkpoint) {
        Response::Checkpoint { sealed, .. } => {
            assert!(sealed.ends_with("d.ckpt1.qcow2"), "{sealed}")
        }
        other => panic!("checkpoint: {other:?}"),
    }
    match ask(&api, &Request::Info) {
        Response::Info(info) => {
            assert_eq!(info.chain.len(), 2);
            assert!(!info.chain[0].sealed && info.chain[1].sealed);
            assert_eq!(info.capacity_bytes, 48 << 20);
        }
        other => panic!("info: {other:?}"),
    }

    // The frontend leaves: the backend exits cleanly and removes its sockets.
    drop(fe);
    server.join().unwrap();
    assert!(!socket.exists() && !api.exists());
    assert!(ops::check(&disk).unwrap().is_clean());
    assert_eq!(ops::info(&disk).unwrap().len(), 2);
}

#[test]
fn read_only_disks_are_offered_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ro.vhdx");
    ops::create(&disk, Format::Vhdx, Some(16 << 20), None).unwrap();
    let (server, socket, api) = serve(&disk, true);
    let fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    match ask(&api, &Request::Info) {
        Response::Info(info) => assert!(info.readonly),
        other => panic!("info: {other:?}"),
    }
    // A bad API line gets an error, not a hang or a crash.
    let mut s = UnixStream::connect(&api).unwrap();
    s.write_all(b"{\"op\":\"explode\"}\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    assert!(
        answer.contains("\"error\"") && answer.contains("bad request"),
        "{answer}"
    );
    drop(fe);
    server.join().unwrap();
}

/// Live migration: with `VHOST_F_LOG_ALL` and the log QEMU shares
/// (`SET_LOG_BASE`), every guest page the backend writes (the data of a
/// read, the status byte, the used ring) is marked in the log, and pages
/// it only read are not; `GET_VRING_BASE` counts the request answered.
#[test]
fn pages_written_for_the_guest_are_marked_in_the_dirty_log() {
    use std::os::fd::AsRawFd;
    use tandem_vhost_blk::config::VHOST_F_LOG_ALL;
    use vhost::{VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    const MEM: usize = 4 << 20;
    const PAGE: u64 = 4096;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x10_000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("log.raw");
    ops::create(&disk, Format::Raw, Some(1 << 20), None).unwrap();
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let (server, socket, _api) = serve(&disk, false);

    // Guest memory in a shared file, as QEMU's memory backend would be.
    let memfile = tempfile::tempfile().unwrap();
    memfile.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(memfile.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let region = mem.iter().next().unwrap();
    let logfile = tempfile::tempfile().unwrap();
    let log_len = (MEM as u64 / PAGE).div_ceil(8);
    logfile.set_len(log_len).unwrap();

    let mut fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << VHOST_F_LOG_ALL), 0, "no VHOST_F_LOG_ALL");
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    fe.set_protocol_features(proto).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: region.as_ptr() as u64,
        mmap_offset: 0,
        mmap_handle: memfile.as_raw_fd(),
    }])
    .unwrap();
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: log_len,
            mmap_offset: 0,
            mmap_handle: logfile.as_raw_fd(),
        }),
    )
    .unwrap();
    fe.set_vring_num(0, 16).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: 16,
            flags: 0,
            desc_table_addr: region.as_ptr() as u64 + DESC,
            used_ring_addr: region.as_ptr() as u64 + USED,
            avail_ring_addr: region.as_ptr() as u64 + AVAIL,
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

    // One read of sector 0: header, 512 bytes of data, status.
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        d
    };
    mem.write_slice(&desc(HEADER, 16, 1, 1), GuestAddress(DESC))
        .unwrap();
    mem.write_slice(&desc(DATA, 512, 1 | 2, 2), GuestAddress(DESC + 16))
        .unwrap();
    mem.write_slice(&desc(STATUS, 1, 2, 0), GuestAddress(DESC + 32))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap(); // ring[0] = head 0
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // idx = 1
    kick.write(1).unwrap();

    let begun = Instant::now();
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
        assert!(begun.elapsed() < Duration::from_secs(10), "no answer");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0x5a; 512]);
    assert_eq!(fe.get_vring_base(0).unwrap(), 1);

    let mut log = vec![0u8; log_len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&logfile, &mut log, 0).unwrap();
    let dirty = |addr: u64| log[(addr / PAGE / 8) as usize] & (1 << (addr / PAGE % 8)) != 0;
    for (what, addr) in [("data", DATA), ("status", STATUS), ("used ring", USED)] {
        assert!(dirty(addr), "the {what} page is not in the dirty log");
    }
    for (what, addr) in [("header", HEADER), ("descriptor table", DESC)] {
        assert!(!dirty(addr), "the {what} page was only read but is logged");
    }
    drop(fe);
    server.join().unwrap();
}
