//! The backend process over a real vhost-user connection (the `vhost`
//! crate's frontend, as QEMU would speak it): what it offers, its
//! configuration space, its API socket, and a clean exit with the chain
//! closed when the frontend goes away.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

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
        volume_socket: None,
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
    use common::{Driver, DATA, DESC, HEADER, MEM, PAGE, STATUS, T_IN, USED};
    use tandem_vhost_blk::config::VHOST_F_LOG_ALL;

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("log.raw");
    ops::create(&disk, Format::Raw, Some(1 << 20), None).unwrap();
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let (server, socket, _api) = serve(&disk, false);

    let probe = Frontend::connect(&socket, 1).unwrap();
    probe.set_owner().unwrap();
    let features = probe.get_features().unwrap();
    assert_ne!(features & (1 << VHOST_F_LOG_ALL), 0, "no VHOST_F_LOG_ALL");
    drop(probe);
    server.join().unwrap();
    let (server, socket, _api) = serve(&disk, false);

    let logfile = tempfile::tempfile().unwrap();
    let log_len = (MEM as u64 / PAGE).div_ceil(8);
    logfile.set_len(log_len).unwrap();
    let mut drv = Driver::connect(&socket, Some((&logfile, log_len)));
    drv.submit(T_IN, 0, &[], 512);
    assert_eq!(
        drv.wait(Duration::from_secs(10)),
        Some(0),
        "the read failed"
    );
    assert_eq!(drv.data(512), vec![0x5a; 512]);
    assert_eq!(drv.fe.get_vring_base(0).unwrap(), 1);

    let mut log = vec![0u8; log_len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&logfile, &mut log, 0).unwrap();
    let dirty = |addr: u64| log[(addr / PAGE / 8) as usize] & (1 << (addr / PAGE % 8)) != 0;
    for (what, addr) in [("data", DATA), ("status", STATUS), ("used ring", USED)] {
        assert!(dirty(addr), "the {what} page is not in the dirty log");
    }
    for (what, addr) in [("header", HEADER), ("descriptor table", DESC)] {
        assert!(!dirty(addr), "the {what} page was only read but is logged");
    }
    drop(drv);
    server.join().unwrap();
}

/// The second path: an NVMe namespace's reads and writes through the
/// volume socket land in the same chain, are counted, and a checkpoint
/// seals them with the guest's.
#[test]
fn the_volume_socket_lends_the_same_chain_to_a_second_path() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("v.qcow2");
    ops::create(&disk, Format::Qcow2, Some(16 << 20), None).unwrap();
    let socket = dir.path().join("v.sock");
    let api = dir.path().join("v.api");
    let volume = dir.path().join("v.volume");
    let cfg = ServerConfig {
        socket: socket.clone(),
        disk: disk.clone(),
        readonly: false,
        api_socket: Some(api.clone()),
        serial: None,
        volume_socket: Some(volume.clone()),
    };
    let server = std::thread::spawn(move || run(cfg).unwrap());
    wait_for(&socket);
    wait_for(&volume);
    let fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();

    let lent = tandem_volume::RemoteVolume::connect(&volume).unwrap();
    assert_eq!(lent.geometry().size, 16 << 20);
    lent.write_at(&[0xa1; 4096], 1 << 20).unwrap();
    match ask(&api, &Request::Checkpoint) {
        Response::Checkpoint { .. } => {}
        other => panic!("checkpoint: {other:?}"),
    }
    lent.write_at(&[0xb2; 4096], 2 << 20).unwrap();
    lent.flush().unwrap();
    let mut back = [0u8; 4096];
    lent.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(
        back, [0xa1; 4096],
        "the sealed layer's block, through the chain"
    );
    let e = lent.read_at(&mut back, 16 << 20).unwrap_err().to_string();
    assert!(e.contains("beyond the end"), "{e}");
    match ask(&api, &Request::Info) {
        Response::Info(info) => {
            let c = &info.counters;
            assert_eq!((c.lent_reads, c.lent_writes, c.lent_flushes), (1, 2, 1));
            assert_eq!(c.lent_errors, 0, "a refused request is not a backend error");
            assert_eq!(info.chain.len(), 2);
            let l = info.lending.expect("the backend lends").stats;
            assert_eq!((l.fenced, l.fences, l.connections), (false, 0, 1));
        }
        other => panic!("info: {other:?}"),
    }

    // Fenced through the API (the host does this before the guest can see
    // the function removed): the borrower's writes are refused and land
    // nowhere, until the fence is lifted.
    match ask(&api, &Request::Fence { wait_ms: 5000 }) {
        Response::Fenced { closed: 1, .. } => {}
        other => panic!("fence: {other:?}"),
    }
    assert!(lent.write_at(&[0xd4; 512], 3 << 20).is_err());
    match ask(&api, &Request::Info) {
        Response::Info(info) => {
            let l = info.lending.unwrap().stats;
            assert!(l.fenced && l.fences == 1 && l.dropped >= 1, "{l:?}");
            assert_eq!(info.counters.lent_writes, 2, "a fenced write ran");
        }
        other => panic!("info: {other:?}"),
    }
    assert_eq!(ask(&api, &Request::Unfence), Response::Unfenced);
    lent.read_at(&mut back, 3 << 20).unwrap();
    assert_eq!(back, [0; 4096], "the refused write landed");

    // The VM leaves: the backend closes the chain and the volume socket;
    // the second path then fails instead of writing behind its back.
    drop(fe);
    server.join().unwrap();
    assert!(!volume.exists());
    assert!(lent.write_at(&[0xc3; 512], 0).is_err());
    let chain = tandem_disk::Chain::open(&disk, Default::default()).unwrap();
    use tandem_disk::BlockDevice as _;
    chain.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(back, [0xa1; 4096]);
    chain.read_at(&mut back, 2 << 20).unwrap();
    assert_eq!(back, [0xb2; 4096]);
    assert!(ops::check(&disk).unwrap().is_clean());
}
