//! Config spaces of the devices Tandem serves, rebuilt with tandem-pci the
//! way their crates build them (the device crates depend on this one, so
//! they cannot be dev-dependencies), and small helpers.
#![allow(dead_code)] // each test file uses a different part

use std::sync::Arc;

use shared_abi::{pci, regs};
use tandem_cfgpolicy::{Context, Decision, Description, Function, FunctionId, Policy, Verdict};
use tandem_pci::{Bar, BarKind, ConfigSpace, Identity};

pub const NVME_BAR_SIZE: u64 = 16 * 1024;
pub const NVME_TOTAL_VFS: u16 = 8;

/// As `host-vmm/devices/control/src/device.rs` builds it.
pub fn control_config() -> ConfigSpace {
    let mut c = ConfigSpace::new(Identity {
        vendor_id: pci::VENDOR_ID,
        device_id: pci::CONTROL_DEVICE_ID,
        subsystem_vendor_id: pci::SUBSYSTEM_VENDOR_ID,
        subsystem_id: pci::SUBSYSTEM_ID,
        class_code: pci::CLASS_CODE,
        revision: pci::REVISION,
    });
    for (i, size) in [
        (0, regs::BAR0_SIZE),
        (usize::from(regs::MSIX_BAR), regs::BAR2_SIZE),
    ] {
        c.add_bar(
            i,
            Bar {
                size,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
        )
        .unwrap();
    }
    c.add_pcie_endpoint().unwrap();
    c.add_msix(
        regs::MSIX_VECTORS,
        regs::MSIX_BAR,
        regs::MSIX_TABLE_OFFSET,
        regs::MSIX_BAR,
        regs::MSIX_PBA_OFFSET,
    )
    .unwrap();
    c
}

pub fn control_bar_sizes() -> [u64; 6] {
    [regs::BAR0_SIZE, 0, regs::BAR2_SIZE, 0, 0, 0]
}

/// As `host-vmm/devices/nvme/src/function.rs` builds it (PM, MSI-X, PCIe
/// at whatever offsets tandem-pci gives them; SR-IOV at 0x100 on the PF).
pub fn nvme_config(pf: bool) -> ConfigSpace {
    let mut c = ConfigSpace::new(Identity {
        vendor_id: 0x1af4,
        device_id: if pf { 0x10f1 } else { 0x10f2 },
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0001,
        class_code: 0x01_08_02,
        revision: 1,
    });
    let bar0 = Bar {
        size: NVME_BAR_SIZE,
        kind: BarKind::Mem64,
        prefetchable: false,
    };
    c.add_bar(0, bar0).unwrap();
    c.add_bar(
        4,
        Bar {
            size: NVME_BAR_SIZE,
            kind: BarKind::Mem32,
            prefetchable: false,
        },
    )
    .unwrap();
    c.add_pm().unwrap();
    c.add_msix(17, 4, 0, 4, 0x2000).unwrap();
    c.add_pcie_endpoint().unwrap();
    if pf {
        c.add_sriov(NVME_TOTAL_VFS, 1, 1, 0x10f2, &[(0, bar0)])
            .unwrap();
    }
    c
}

pub fn nvme_bar_sizes() -> [u64; 6] {
    [NVME_BAR_SIZE, 0, 0, 0, NVME_BAR_SIZE, 0]
}

pub fn desc(name: &str) -> Arc<Description> {
    Arc::new(Description::parse(tandem_cfgpolicy::builtin(name).unwrap()).unwrap())
}

pub fn fid(function: Function) -> FunctionId {
    FunctionId {
        device: "nvme0".into(),
        function,
    }
}

/// A tandem-pci function behind its policy.
pub struct Guarded {
    pub config: ConfigSpace,
    pub policy: Policy,
    pub ctx: Context,
}

impl Guarded {
    pub fn nvme(pf: bool) -> Guarded {
        let config = nvme_config(pf);
        let (name, f) = if pf {
            ("nvme-pf", Function::Pf)
        } else {
            ("nvme-vf", Function::Vf(1))
        };
        let policy = Policy::bind(desc(name), config.bytes(), fid(f), nvme_bar_sizes()).unwrap();
        Guarded {
            config,
            policy,
            ctx: Context::default(),
        }
    }

    pub fn control() -> Guarded {
        let config = control_config();
        let policy = Policy::bind(
            desc("control"),
            config.bytes(),
            FunctionId {
                device: "control".into(),
                function: Function::Single,
            },
            control_bar_sizes(),
        )
        .unwrap();
        Guarded {
            config,
            policy,
            ctx: Context::default(),
        }
    }

    /// A guest config write: judged, then forwarded unless denied.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Decision {
        let d = self
            .policy
            .config_write(&self.ctx, self.config.bytes(), offset, data)
            .unwrap();
        if d.verdict != Verdict::Deny {
            self.config.write(d.offset as usize, &d.bytes);
        }
        d
    }

    pub fn write16(&mut self, offset: usize, v: u16) -> Decision {
        self.write(offset, &v.to_le_bytes())
    }

    pub fn write32(&mut self, offset: usize, v: u32) -> Decision {
        self.write(offset, &v.to_le_bytes())
    }

    /// Offset of a capability as the policy found it.
    pub fn cap(&self, name: &str) -> usize {
        usize::from(
            self.policy
                .capabilities()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1,
        )
    }
}
