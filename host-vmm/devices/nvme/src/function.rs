//! One NVMe PCI function (the physical function or a virtual function):
//! config space, BARs and MSI-X around a [`Controller`].

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tandem_cfgpolicy::{AuditLog, Context, Description, FunctionId, Policy, Verdict};
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

/// The config-space policy (F5) of one function and where its audit
/// records go.
pub struct ConfigPolicy {
    policy: Policy,
    audit: Arc<Mutex<AuditLog>>,
    clock: Instant,
    /// The guest may enable this PF's VFs (a guest that owns the PF).
    pub manage_vfs: bool,
    /// How many VFs such a guest may enable.
    pub num_vfs_ceiling: u16,
    denied: u64,
    translated: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the built-in description {0:?} is missing")]
    Missing(&'static str),
    #[error("description {name} is refused")]
    Description {
        name: &'static str,
        #[source]
        source: tandem_cfgpolicy::DescError,
    },
    #[error("description {name} does not fit the function's config space")]
    Bind {
        name: &'static str,
        #[source]
        source: tandem_cfgpolicy::BindError,
    },
}

fn description_name(role: Role) -> &'static str {
    match role {
        Role::Pf => "nvme-pf",
        Role::Vf(_) => "nvme-vf",
    }
}

/// The description of a role's config space, parsed and checked.
pub fn description(role: Role) -> Result<Arc<Description>, PolicyError> {
    let name = description_name(role);
    let text = tandem_cfgpolicy::builtin(name).ok_or(PolicyError::Missing(name))?;
    Description::parse(text)
        .map(Arc::new)
        .map_err(|source| PolicyError::Description { name, source })
}

impl ConfigPolicy {
    /// Binds `desc` to `config`; refuses a description with gaps or
    /// contradictions for this layout, naming the register.
    pub fn bind(
        desc: Arc<Description>,
        config: &ConfigSpace,
        device: &str,
        role: Role,
        audit: Arc<Mutex<AuditLog>>,
    ) -> Result<ConfigPolicy, PolicyError> {
        let name = description_name(role);
        let mut sizes = [0u64; 6];
        for (i, s) in sizes.iter_mut().enumerate() {
            *s = config.bar(i).map_or(0, |b| b.size);
        }
        let id = FunctionId {
            device: device.to_string(),
            function: match role {
                Role::Pf => tandem_cfgpolicy::Function::Pf,
                Role::Vf(n) => tandem_cfgpolicy::Function::Vf(n),
            },
        };
        let policy = Policy::bind(desc, config.bytes(), id, sizes)
            .map_err(|source| PolicyError::Bind { name, source })?;
        Ok(ConfigPolicy {
            policy,
            audit,
            clock: Instant::now(),
            manage_vfs: false,
            num_vfs_ceiling: 0,
            denied: 0,
            translated: 0,
        })
    }
}

fn lock_audit(m: &Mutex<AuditLog>) -> std::sync::MutexGuard<'_, AuditLog> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    cfg_policy: Option<ConfigPolicy>,
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
    if role == Role::Pf {
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
    /// The lent namespaces' volume clients: how their requests moved from
    /// one lender connection to the next (the handoff core's counters).
    pub volume_clients: Vec<VolumeClientInfo>,
    pub sriov: Option<(bool, u16)>,
    /// Guest config writes the policy denied or translated (F5).
    pub config_denied: u64,
    pub config_translated: u64,
    pub controller: ControllerState,
}

/// A lent namespace's client, as [`FunctionInfo`] shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeClientInfo {
    pub namespace: String,
    /// Connections to a lender lost with a request on them.
    pub losses: u64,
    /// Requests sent again, by the volume's name, after a loss.
    pub reissued: u64,
    pub switches: u64,
    /// Flushes of the client's own, so that a later flush covers writes
    /// the lost connection had answered.
    pub barriers: u64,
    /// Requests that failed by name too (the controller reported them).
    pub errors: u64,
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
            cfg_policy: None,
        }
    }

    /// Puts guest config writes under `policy` (F5).
    pub fn set_config_policy(&mut self, policy: ConfigPolicy) {
        self.cfg_policy = Some(policy);
    }

    /// A config write by the host itself (the PF driver's role, e.g.
    /// enabling VFs): not subject to the guest's policy.
    pub fn host_config_write(&mut self, offset: usize, data: &[u8]) {
        self.apply_config_write(offset, data);
    }

    /// Runs a guest config write through the policy; `None` drops it.
    fn filter(&mut self, offset: usize, data: &[u8]) -> Option<Vec<u8>> {
        let frozen = self.ctrl.policy().frozen;
        let role = self.role;
        let Some(p) = self.cfg_policy.as_mut() else {
            return Some(data.to_vec());
        };
        let ctx = Context {
            now_ns: u64::try_from(p.clock.elapsed().as_nanos()).unwrap_or(u64::MAX),
            frozen,
            manage_vfs: p.manage_vfs,
            num_vfs_ceiling: p.num_vfs_ceiling,
        };
        match p
            .policy
            .config_write(&ctx, self.config.bytes(), offset, data)
        {
            Ok(d) => {
                match d.verdict {
                    Verdict::Pass => {}
                    Verdict::Translate => p.translated += 1,
                    Verdict::Deny => p.denied += 1,
                }
                for r in &d.audit {
                    info!(?role, register = %r.register, rule = %r.rule, action = ?r.action, reason = %r.reason, "config write audited");
                }
                if !d.audit.is_empty() {
                    lock_audit(&p.audit).extend(d.audit);
                }
                (d.verdict != Verdict::Deny).then_some(d.bytes)
            }
            Err(e) => {
                p.denied += 1;
                warn!(?role, offset, len = data.len(), error = %e, "config write refused");
                None
            }
        }
    }

    fn apply_config_write(&mut self, offset: usize, data: &[u8]) {
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
            volume_clients: self
                .ctrl
                .namespaces()
                .iter()
                .filter_map(|n| {
                    n.handoff().map(|h| VolumeClientInfo {
                        namespace: n.describe(),
                        losses: h.losses,
                        reissued: h.reissued,
                        switches: h.switches,
                        barriers: h.barriers,
                        errors: h.errors_to_app,
                    })
                })
                .collect(),
            sriov: self.config.sriov_state(),
            config_denied: self.cfg_policy.as_ref().map_or(0, |p| p.denied),
            config_translated: self.cfg_policy.as_ref().map_or(0, |p| p.translated),
            controller: self.ctrl.state(),
        }
    }

    pub fn set_policy(&mut self, policy: HostPolicy) {
        if let Some(p) = self.cfg_policy.as_mut() {
            p.manage_vfs = policy.manage_vfs;
            p.num_vfs_ceiling = policy.num_vfs_ceiling;
        }
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
        if let Some(data) = self.filter(offset, data) {
            self.apply_config_write(offset, &data);
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
