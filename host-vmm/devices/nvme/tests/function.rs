//! The PCI function with its config-space policy (F5), without a VM:
//! guest config writes as QEMU forwards them.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use tandem_cfgpolicy::AuditLog;
use tandem_nvme_device::ctrl::{Controller, HostPolicy, Params};
use tandem_nvme_device::function::{
    config_space, description, ConfigPolicy, Notice, NvmeFunction, Role,
};
use tandem_pci::sriov;
use tandem_vfio_server::{DmaSpace, PciFunction};

fn pf(audit: Arc<Mutex<AuditLog>>) -> (NvmeFunction, std::sync::mpsc::Receiver<Notice>) {
    let config = config_space(Role::Pf, 4).unwrap();
    let policy = ConfigPolicy::bind(
        description(Role::Pf).unwrap(),
        &config,
        "t",
        Role::Pf,
        audit,
    )
    .unwrap();
    let ctrl = Controller::new(
        Params {
            controller_id: 1,
            serial: "T".into(),
            model: "t".into(),
            firmware: "0".into(),
            max_io_queues: 2,
            msix_vectors: 3,
        },
        vec![],
    );
    let (tx, rx) = channel();
    let mut f = NvmeFunction::new(Role::Pf, config, Arc::new(DmaSpace::new()), ctrl, Some(tx));
    f.set_config_policy(policy);
    (f, rx)
}

#[test]
fn a_guest_enables_vfs_only_as_the_host_allows() {
    let audit = Arc::new(Mutex::new(AuditLog::new(64)));
    let (mut f, rx) = pf(audit.clone());
    let at = f.config().sriov_cap().unwrap();
    // Not allowed: NumVFs and VF Enable are denied and audited.
    f.config_write(at + sriov::NUM_VFS, &2u16.to_le_bytes());
    f.config_write(at + sriov::CONTROL, &1u16.to_le_bytes());
    assert_eq!(f.config().sriov_state(), Some((false, 0)));
    assert!(rx.try_recv().is_err(), "no VF was created");
    let n = audit.lock().unwrap().len();
    assert!(n >= 2, "{n} audit records");
    assert!(f.info().config_denied + f.info().config_translated >= 2);
    // Allowed, up to 1: NumVFs 2 is clamped to 1.
    f.set_policy(HostPolicy {
        manage_vfs: true,
        num_vfs_ceiling: 1,
        ..HostPolicy::default()
    });
    f.config_write(at + sriov::NUM_VFS, &2u16.to_le_bytes());
    f.config_write(at + sriov::CONTROL, &1u16.to_le_bytes());
    assert_eq!(f.config().sriov_state(), Some((true, 1)));
    let mut last = None;
    while let Ok(n) = rx.try_recv() {
        last = Some(n);
    }
    assert_eq!(
        last,
        Some(Notice::Sriov {
            vf_enable: true,
            num_vfs: 1
        })
    );
    // The host's own writes (the PF driver's role) are not filtered.
    f.host_config_write(at + sriov::CONTROL, &0u16.to_le_bytes());
    f.host_config_write(at + sriov::NUM_VFS, &4u16.to_le_bytes());
    assert_eq!(f.config().sriov_state(), Some((false, 4)));
}

#[test]
fn identity_is_read_only_and_flr_storms_are_limited() {
    let audit = Arc::new(Mutex::new(AuditLog::new(256)));
    let (mut f, _rx) = pf(audit.clone());
    f.config_write(0, &0xdead_beefu32.to_le_bytes());
    assert_eq!(f.config().read32(0), 0x10f1_1af4);
    let pcie = f.config().capability(tandem_pci::cap_id::PCIE).unwrap();
    for _ in 0..50 {
        f.config_write(pcie + 8, &0x8000u16.to_le_bytes());
    }
    let flrs = f.info().function_resets;
    assert!(
        (1..50).contains(&flrs),
        "{flrs} of 50 back-to-back FLRs went through"
    );
    let log = audit.lock().unwrap();
    assert!(log.records().any(|r| r.register == "vendor-id"));
    assert!(log.records().filter(|r| r.rule == "flr").count() as u64 == 50 - flrs);
}
