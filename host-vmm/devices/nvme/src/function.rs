//! One NVMe PCI function (the physical function or a virtual function):
//! config space, BARs and MSI-X around a [`Controller`].

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use serde::Serialize;
use tandem_pci::{command, Bar, BarKind, ConfigEvent, ConfigSpace, Identity};
use tandem_vfio_server::{DmaSpace, PciFunction};
use tracing::{debug, info, warn};

use crate::ctrl::{Controller, ControllerState, Effects, HostPolicy};

/// BAR0 (64-bit): registers and doorbells.
pub const BAR0_SIZE: u64 = 16 * 1024;
/// BAR4: the MSI-X table (offset 0) and PBA.
pub const MSIX_BAR: u8 = 4;
pub const MSIX_BAR_SIZE: u64 = 16 * 1024;
pub const MSIX_PBA_OFFSET: u32 = 0x2000;
/// Vectors: one for the admin queue and one per I/O queue.
pub const MSIX_VECTORS: u16 = 17;
pub const MAX_IO_QUEUES: u16 = 16;

/// Which function of the device this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Pf,
    /// Virtual function number (1-based, as `tandem` names them).
    Vf(u16),
}

/// Something the device server must act on outside this function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The PF's SR-IOV control changed.
    Sriov { vf_enable: bool, num_vfs: u16 },
}

pub struct NvmeFunction {
    role: Role,
    config: ConfigSpace,
    pristine: ConfigSpace,
    dma: Arc<DmaSpace>,
    msix: Vec<Option<File>>,
    ctrl: Controller,
    notices: Option<Sender<Notice>>,
    /// A VF whose PF disabled it: it reads as absent and does nothing.
    gone: bool,
    interrupts: u64,
    flrs: u64,
}

fn identity(role: Role) -> Identity {
    Identity {
        vendor_id: crate::VENDOR_ID,
        device_id: match role {
            Role::Pf => crate::PF_DEVICE_ID,
            Role::Vf(_) => crate::VF_DEVICE_ID,
        },
        subsystem_vendor_id: crate::VENDOR_ID,
        subsystem_id: 0x0001,
        class_code: 0x01_08_02,
        revision: 1,
    }
}

/// The function's config space: PM, MSI-X and PCIe capabilities; the PF
/// also carries SR-IOV for `total_vfs` VFs.
pub fn config_space(role: Role, total_vfs: u16) -> Result<ConfigSpace, tandem_pci::BuildError> {
    let mut c = ConfigSpace::new(identity(role));
    let bar0 = Bar {
        size: BAR0_SIZE,
        kind: BarKind::Mem64,
        prefetchable: false,
    };
    c.add_bar(0, bar0)?;
    c.add_bar(
        usize::from(MSIX_BAR),
        Bar {
            size: MSIX_BAR_SIZE,
            kind: BarKind::Mem32,
            prefetchable: false,
        },
    )?;
    c.add_pm()?;
    c.add_msix(MSIX_VECTORS, MSIX_BAR, 0, MSIX_BAR, MSIX_PBA_OFFSET)?;
    c.add_pcie_endpoint()?;
    if role == Role::Pf && total_vfs > 0 {
        c.add_sriov(total_vfs, 1, 1, crate::VF_DEVICE_ID, &[(0, bar0)])?;
    }
    Ok(c)
}

/// The function as the API shows it: the host proxy's view (F6).
#[derive(Clone, Debug, Serialize)]
pub struct FunctionInfo {
    pub role: Role,
    pub bus_master: bool,
    pub memory_enable: bool,
    pub msix_enabled: bool,
    pub power_state: Option<u8>,
    pub interrupts: u64,
    pub function_resets: u64,
    pub namespaces: Vec<String>,
    pub sriov: Option<(bool, u16)>,
    pub controller: ControllerState,
}

impl NvmeFunction {
    pub fn new(
        role: Role,
        config: ConfigSpace,
        dma: Arc<DmaSpace>,
        ctrl: Controller,
        notices: Option<Sender<Notice>>,
    ) -> NvmeFunction {
        NvmeFunction {
            role,
            pristine: config.clone(),
            config,
            dma,
            msix: Vec::new(),
            ctrl,
            notices,
            gone: false,
            interrupts: 0,
            flrs: 0,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The PF disabled this VF: it vanishes from the bus.
    pub fn remove(&mut self) {
        if !self.gone {
            info!(role = ?self.role, "function removed");
        }
        self.gone = true;
        self.ctrl.function_reset();
    }

    pub fn info(&self) -> FunctionInfo {
        let cmd = self.config.command();
        let msix_enabled = self
            .config
            .capability(tandem_pci::cap_id::MSIX)
            .is_some_and(|at| self.config.read16(at + 2) & 0x8000 != 0);
        FunctionInfo {
            role: self.role,
            bus_master: cmd & command::BUS_MASTER != 0,
            memory_enable: cmd & command::MEMORY != 0,
            msix_enabled,
            power_state: self.config.power_state(),
            interrupts: self.interrupts,
            function_resets: self.flrs,
            namespaces: self
                .ctrl
                .namespaces()
                .iter()
                .map(|n| n.describe())
                .collect(),
            sriov: self.config.sriov_state(),
            controller: self.ctrl.state(),
        }
    }

    pub fn set_policy(&mut self, policy: HostPolicy) {
        let mem = self.dma.memory();
        let fx = self.ctrl.set_policy(policy, mem.as_deref());
        self.raise(fx);
    }

    fn raise(&mut self, fx: Effects) {
        for v in fx.irqs {
            match self.msix.get(usize::from(v)) {
                Some(Some(fd)) => {
                    let mut fd = fd;
                    if let Err(e) = fd.write_all(&1u64.to_le_bytes()) {
                        warn!(vector = v, error = %e, "cannot signal MSI-X vector");
                    } else {
                        self.interrupts += 1;
                    }
                }
                _ => debug!(vector = v, "interrupt on a vector without an eventfd"),
            }
        }
    }

    fn function_level_reset(&mut self) {
        self.flrs += 1;
        info!(role = ?self.role, "function-level reset");
        let before = self.config.sriov_state();
        self.config.reset(&self.pristine);
        self.ctrl.function_reset();
        self.ctrl.set_bus_master(false);
        if before.is_some_and(|(on, _)| on) {
            self.notify(Notice::Sriov {
                vf_enable: false,
                num_vfs: 0,
            });
        }
    }

    fn notify(&self, n: Notice) {
        if let Some(tx) = &self.notices {
            let _ = tx.send(n);
        }
    }
}

impl PciFunction for NvmeFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.gone {
            return;
        }
        for ev in self.config.write(offset, data) {
            match ev {
                ConfigEvent::Command { new, .. } => {
                    self.ctrl.set_bus_master(new & command::BUS_MASTER != 0);
                }
                ConfigEvent::FunctionLevelReset => self.function_level_reset(),
                ConfigEvent::Sriov { vf_enable, num_vfs } => {
                    self.notify(Notice::Sriov { vf_enable, num_vfs });
                }
                ConfigEvent::PowerState { old, new } => {
                    info!(role = ?self.role, old, new, "power state");
                }
                ConfigEvent::MsixControl { .. } => {}
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.gone {
            data.fill(0xff);
            return;
        }
        if bar == 0 && self.config.command() & command::MEMORY != 0 {
            self.ctrl.mmio_read(offset, data);
        } else if bar == 0 {
            // Memory decoding is off: the access is not claimed.
            data.fill(0xff);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.gone || bar != 0 || self.config.command() & command::MEMORY == 0 {
            return;
        }
        let mem = self.dma.memory();
        let fx = self.ctrl.mmio_write(mem.as_deref(), offset, data);
        self.raise(fx);
    }

    fn msix_vectors(&self) -> u32 {
        u32::from(MSIX_VECTORS)
    }

    fn set_msix(&mut self, start: u32, fds: Vec<Option<File>>) {
        let n = usize::from(MSIX_VECTORS);
        if self.msix.len() < n {
            self.msix.resize_with(n, || None);
        }
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(slot) = self.msix.get_mut(start as usize + i) {
                *slot = fd;
            }
        }
    }

    fn reset(&mut self) {
        self.function_level_reset();
    }
}
