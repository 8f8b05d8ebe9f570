//! PCI configuration space as Tandem's device servers present it.
//!
//! A device server must answer the guest's (and QEMU's) config-space
//! accesses like hardware: read-only identity, BARs that report their size
//! when all-ones are written, a capability list, write-one-to-clear status
//! bits. This crate holds the bytes and the per-bit write rules, and says
//! when a write changed something the device cares about (command bits,
//! MSI-X enable). It is pure: no I/O, no policy about who may write what
//! beyond the masks (system-wide policy is the config-space virtualization
//! layer's job, F5).
#![forbid(unsafe_code)]

use std::fmt;

/// Size of PCI Express configuration space.
pub const CONFIG_SIZE: usize = 4096;

pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const CLASS_PROG: usize = 0x09;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
}

pub mod command {
    pub const IO: u16 = 1 << 0;
    pub const MEMORY: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY: u16 = 1 << 6;
    pub const SERR: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
}

pub mod cap_id {
    pub const PM: u8 = 0x01;
    pub const PCIE: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
}

pub mod ext_cap_id {
    pub const SRIOV: u16 = 0x0010;
}

/// Offsets inside the SR-IOV extended capability (PCIe base spec 9.3.3).
pub mod sriov {
    pub const CAPS: usize = 0x04;
    pub const CONTROL: usize = 0x08;
    pub const STATUS: usize = 0x0a;
    pub const INITIAL_VFS: usize = 0x0c;
    pub const TOTAL_VFS: usize = 0x0e;
    pub const NUM_VFS: usize = 0x10;
    pub const FIRST_VF_OFFSET: usize = 0x14;
    pub const VF_STRIDE: usize = 0x16;
    pub const VF_DEVICE_ID: usize = 0x1a;
    pub const SUPPORTED_PAGE_SIZES: usize = 0x1c;
    pub const SYSTEM_PAGE_SIZE: usize = 0x20;
    pub const VF_BAR0: usize = 0x24;
    pub const SIZE: usize = 0x40;
    /// Control: VF Enable.
    pub const CTL_VF_ENABLE: u16 = 1 << 0;
    /// Control: VF Memory Space Enable.
    pub const CTL_VF_MSE: u16 = 1 << 3;
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    Mem64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("BAR{0}: size {1:#x} is not a power of two of at least 16 bytes")]
    BarSize(usize, u64),
    #[error("BAR{0} is taken (or is the upper half of a 64-bit BAR)")]
    BarTaken(usize),
    #[error("BAR index {0} out of range")]
    BarIndex(usize),
    #[error("no room for a capability of {0} bytes")]
    NoRoom(usize),
}

/// Something a config write changed that the device must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigEvent {
    /// The command register changed: old and new values.
    Command { old: u16, new: u16 },
    /// The MSI-X enable or function-mask bit changed.
    MsixControl { enabled: bool, masked: bool },
    /// The guest asked for a function-level reset (PCIe device control,
    /// Initiate FLR). The bit itself always reads as zero.
    FunctionLevelReset,
    /// The SR-IOV control register or NumVFs changed.
    Sriov { vf_enable: bool, num_vfs: u16 },
    /// The power state in the PM control/status register changed (0..=3).
    PowerState { old: u8, new: u8 },
}

/// Configuration space bytes and write rules.
#[derive(Clone)]
pub struct ConfigSpace {
    data: Vec<u8>,
    /// Bits the guest may change.
    wmask: Vec<u8>,
    /// Bits a write of 1 clears.
    w1c: Vec<u8>,
    bars: [Option<Bar>; 6],
    msix_cap: Option<usize>,
    pcie_cap: Option<usize>,
    pm_cap: Option<usize>,
    sriov_cap: Option<usize>,
    next_cap: usize,
    last_cap: Option<usize>,
    next_ext: usize,
    last_ext: Option<usize>,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read16(reg::VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read16(reg::DEVICE_ID)),
            )
            .field("bars", &self.bars)
            .finish()
    }
}

/// Identity of a type-0 function.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// Class, subclass and programming interface, e.g. 0x010802 for NVMe.
    pub class_code: u32,
    pub revision: u8,
}

impl ConfigSpace {
    pub fn new(id: Identity) -> ConfigSpace {
        let mut c = ConfigSpace {
            data: vec![0; CONFIG_SIZE],
            wmask: vec![0; CONFIG_SIZE],
            w1c: vec![0; CONFIG_SIZE],
            bars: [None; 6],
            msix_cap: None,
            pcie_cap: None,
            pm_cap: None,
            sriov_cap: None,
            next_cap: 0x40,
            last_cap: None,
            next_ext: 0x100,
            last_ext: None,
        };
        c.set16(reg::VENDOR_ID, id.vendor_id);
        c.set16(reg::DEVICE_ID, id.device_id);
        c.set16(reg::SUBSYSTEM_VENDOR_ID, id.subsystem_vendor_id);
        c.set16(reg::SUBSYSTEM_ID, id.subsystem_id);
        c.data[reg::REVISION] = id.revision;
        c.data[reg::CLASS_PROG] = id.class_code as u8;
        c.data[reg::CLASS_PROG + 1] = (id.class_code >> 8) as u8;
        c.data[reg::CLASS_PROG + 2] = (id.class_code >> 16) as u8;
        c.data[reg::HEADER_TYPE] = 0;
        let cmd_mask = command::IO
            | command::MEMORY
            | command::BUS_MASTER
            | command::PARITY
            | command::SERR
            | command::INTX_DISABLE;
        c.wmask[reg::COMMAND..reg::COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        // Status: error bits are write-one-to-clear.
        c.w1c[reg::STATUS + 1] = 0xf9;
        c.wmask[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares a memory BAR. A 64-bit BAR also takes the next index.
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), BuildError> {
        if index >= 6 || (bar.kind == BarKind::Mem64 && index >= 5) {
            return Err(BuildError::BarIndex(index));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 {
            return Err(BuildError::BarSize(index, bar.size));
        }
        let taken = |i: usize| {
            self.bars[i].is_some()
                || (i > 0
                    && matches!(
                        self.bars[i - 1],
                        Some(Bar {
                            kind: BarKind::Mem64,
                            ..
                        })
                    ))
        };
        if taken(index) || (bar.kind == BarKind::Mem64 && taken(index + 1)) {
            return Err(BuildError::BarTaken(index));
        }
        let off = reg::BAR0 + index * 4;
        let mut low: u32 = 0;
        if bar.kind == BarKind::Mem64 {
            low |= 0b100;
        }
        if bar.prefetchable {
            low |= 0b1000;
        }
        self.set32(off, low);
        // Address bits above the size are writable; the rest read as zero,
        // which is how sizing works.
        let mask = !(bar.size - 1);
        self.wmask[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if bar.kind == BarKind::Mem64 {
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Appends a standard capability: `body` starts after the id and next
    /// bytes; `body_wmask` (same length) says which of its bits are writable.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        body_wmask: &[u8],
    ) -> Result<usize, BuildError> {
        let len = 2 + body.len();
        let at = self.next_cap;
        if at + len > 0x100 {
            return Err(BuildError::NoRoom(len));
        }
        self.data[at] = id;
        self.data[at + 1] = 0;
        self.data[at + 2..at + len].copy_from_slice(body);
        for (i, m) in body_wmask.iter().enumerate().take(body.len()) {
            self.wmask[at + 2 + i] = *m;
        }
        match self.last_cap {
            None => self.data[reg::CAPABILITIES] = at as u8,
            Some(prev) => self.data[prev + 1] = at as u8,
        }
        self.last_cap = Some(at);
        // Capabilities start dword-aligned.
        self.next_cap = (at + len + 3) & !3;
        self.data[reg::STATUS] |= 1 << 4;
        Ok(at)
    }

    /// Adds an MSI-X capability: `vectors` entries, table and PBA in BARs.
    pub fn add_msix(
        &mut self,
        vectors: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<usize, BuildError> {
        let ctl = (vectors - 1) & 0x7ff;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&ctl.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        // Enable (bit 15) and function mask (bit 14) are writable.
        let wm = [0x00, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
        let at = self.add_capability(cap_id::MSIX, &body, &wm)?;
        self.msix_cap = Some(at);
        Ok(at)
    }

    /// Adds a PCI Express capability (version 2) for an endpoint with a
    /// 2.5 GT/s x1 link.
    pub fn add_pcie_endpoint(&mut self) -> Result<usize, BuildError> {
        let mut body = vec![0u8; 0x3a];
        // Capabilities register: version 2, device/port type 0 (endpoint).
        body[0] = 0x02;
        // Device capabilities: max payload 128 bytes, role-based error
        // reporting (mandatory since PCIe 1.1; without it Linux treats the
        // function as pre-1.1), function-level reset.
        body[2..6].copy_from_slice(&((1u32 << 15) | (1u32 << 28)).to_le_bytes());
        // Device control (0x08 in the cap): relaxed ordering, no snoop,
        // max payload/read request bits are the guest's to set.
        let mut wm = vec![0u8; 0x3a];
        wm[6] = 0xff;
        wm[7] = 0x7f;
        // Link capabilities: 2.5 GT/s, x1.
        body[10..14].copy_from_slice(&(0x1u32 | (1 << 4)).to_le_bytes());
        // Link status: 2.5 GT/s, x1.
        body[16..18].copy_from_slice(&(0x1u16 | (1 << 4)).to_le_bytes());
        let at = self.add_capability(cap_id::PCIE, &body, &wm)?;
        self.pcie_cap = Some(at);
        Ok(at)
    }

    /// Adds a power management capability (version 3, D0 and D3hot, No
    /// Soft Reset set: D3hot to D0 keeps the function's state).
    pub fn add_pm(&mut self) -> Result<usize, BuildError> {
        // PMC: version 3. PMCSR: No_Soft_Reset (bit 3).
        let body = [0x03, 0x00, 0x08, 0x00, 0x00, 0x00];
        // PowerState (bits 1:0) is writable.
        let wm = [0x00, 0x00, 0x03, 0x00, 0x00, 0x00];
        let at = self.add_capability(cap_id::PM, &body, &wm)?;
        self.pm_cap = Some(at);
        Ok(at)
    }

    /// Appends an extended capability (offset 0x100 and up): `body` starts
    /// after the 4-byte header. Returns the capability's offset.
    pub fn add_ext_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        body_wmask: &[u8],
    ) -> Result<usize, BuildError> {
        let len = 4 + body.len();
        let at = self.next_ext;
        if at + len > CONFIG_SIZE {
            return Err(BuildError::NoRoom(len));
        }
        let header = u32::from(id) | (u32::from(version & 0xf) << 16);
        self.set32(at, header);
        self.data[at + 4..at + len].copy_from_slice(body);
        for (i, m) in body_wmask.iter().enumerate().take(body.len()) {
            self.wmask[at + 4 + i] = *m;
        }
        if let Some(prev) = self.last_ext {
            let h = self.read32(prev) & 0x000f_ffff;
            self.set32(prev, h | ((at as u32) << 20));
        }
        self.last_ext = Some(at);
        self.next_ext = (at + len + 3) & !3;
        Ok(at)
    }

    /// Adds an SR-IOV capability for `total_vfs` VFs with device id
    /// `vf_device_id` and the given VF BARs (VF BAR sizing works like a
    /// normal BAR's). VF Enable, VF MSE, NumVFs and the system page size
    /// are writable.
    pub fn add_sriov(
        &mut self,
        total_vfs: u16,
        first_vf_offset: u16,
        vf_stride: u16,
        vf_device_id: u16,
        vf_bars: &[(usize, Bar)],
    ) -> Result<usize, BuildError> {
        let mut body = vec![0u8; sriov::SIZE - 4];
        let mut wm = vec![0u8; sriov::SIZE - 4];
        let put16 = |b: &mut Vec<u8>, off: usize, v: u16| {
            b[off - 4..off - 2].copy_from_slice(&v.to_le_bytes());
        };
        let put32 = |b: &mut Vec<u8>, off: usize, v: u32| {
            b[off - 4..off].copy_from_slice(&v.to_le_bytes());
        };
        put16(
            &mut wm,
            sriov::CONTROL,
            sriov::CTL_VF_ENABLE | sriov::CTL_VF_MSE,
        );
        put16(&mut body, sriov::INITIAL_VFS, total_vfs);
        put16(&mut body, sriov::TOTAL_VFS, total_vfs);
        put16(&mut wm, sriov::NUM_VFS, 0xffff);
        put16(&mut body, sriov::FIRST_VF_OFFSET, first_vf_offset);
        put16(&mut body, sriov::VF_STRIDE, vf_stride);
        put16(&mut body, sriov::VF_DEVICE_ID, vf_device_id);
        // 4 KiB pages only.
        put32(&mut body, sriov::SUPPORTED_PAGE_SIZES, 1);
        put32(&mut body, sriov::SYSTEM_PAGE_SIZE, 1);
        for &(i, bar) in vf_bars {
            if i >= 6 || (bar.kind == BarKind::Mem64 && i >= 5) {
                return Err(BuildError::BarIndex(i));
            }
            if !bar.size.is_power_of_two() || bar.size < 16 {
                return Err(BuildError::BarSize(i, bar.size));
            }
            let off = sriov::VF_BAR0 + 4 * i;
            let mut low = 0u32;
            if bar.kind == BarKind::Mem64 {
                low |= 0b100;
            }
            if bar.prefetchable {
                low |= 0b1000;
            }
            put32(&mut body, off, low);
            let mask = !(bar.size - 1);
            put32(&mut wm, off, (mask as u32) & !0xf);
            if bar.kind == BarKind::Mem64 {
                put32(&mut wm, off + 4, (mask >> 32) as u32);
            }
        }
        let at = self.add_ext_capability(ext_cap_id::SRIOV, 1, &body, &wm)?;
        self.sriov_cap = Some(at);
        Ok(at)
    }

    /// Where the standard capability `id` is, if present.
    pub fn capability(&self, id: u8) -> Option<usize> {
        let mut at = usize::from(self.data[reg::CAPABILITIES]);
        let mut hops = 0;
        while (0x40..0x100).contains(&at) && hops < 48 {
            if self.data[at] == id {
                return Some(at);
            }
            at = usize::from(self.data[at + 1]);
            hops += 1;
        }
        None
    }

    /// Where the SR-IOV capability is, if present.
    pub fn sriov_cap(&self) -> Option<usize> {
        self.sriov_cap
    }

    /// The SR-IOV state: (VF Enable, NumVFs).
    pub fn sriov_state(&self) -> Option<(bool, u16)> {
        let at = self.sriov_cap?;
        let ctl = self.read16(at + sriov::CONTROL);
        Some((
            ctl & sriov::CTL_VF_ENABLE != 0,
            self.read16(at + sriov::NUM_VFS),
        ))
    }

    /// The current power state (0 = D0 .. 3 = D3hot), if the function has
    /// a PM capability.
    pub fn power_state(&self) -> Option<u8> {
        Some(self.data[self.pm_cap? + 4] & 3)
    }

    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.data.get(o).copied())
                .unwrap_or(0xff);
        }
    }

    /// The whole configuration space (4096 bytes), as the guest reads it.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn read16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Applies a write under the masks and reports what changed.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Vec<ConfigEvent> {
        let old_cmd = self.read16(reg::COMMAND);
        let old_msix = self.msix_state();
        let old_sriov = self.sriov_state();
        let old_power = self.power_state();
        // Initiate FLR is bit 15 of PCIe device control; it is not stored.
        let flr = self.pcie_cap.is_some_and(|cap| {
            let hi = cap + 9;
            offset <= hi
                && hi
                    .checked_sub(offset)
                    .and_then(|i| data.get(i))
                    .is_some_and(|b| b & 0x80 != 0)
        });
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|o| *o < CONFIG_SIZE) else {
                break;
            };
            let keep = self.data[o] & !self.wmask[o];
            let mut byte = keep | (v & self.wmask[o]);
            byte &= !(v & self.w1c[o]);
            self.data[o] = byte;
        }
        let mut events = Vec::new();
        let new_cmd = self.read16(reg::COMMAND);
        if new_cmd != old_cmd {
            events.push(ConfigEvent::Command {
                old: old_cmd,
                new: new_cmd,
            });
        }
        let new_msix = self.msix_state();
        if new_msix != old_msix {
            if let Some((enabled, masked)) = new_msix {
                events.push(ConfigEvent::MsixControl { enabled, masked });
            }
        }
        let new_sriov = self.sriov_state();
        if new_sriov != old_sriov {
            if let Some((vf_enable, num_vfs)) = new_sriov {
                events.push(ConfigEvent::Sriov { vf_enable, num_vfs });
            }
        }
        if let (Some(old), Some(new)) = (old_power, self.power_state()) {
            if old != new {
                events.push(ConfigEvent::PowerState { old, new });
            }
        }
        if flr {
            events.push(ConfigEvent::FunctionLevelReset);
        }
        events
    }

    fn msix_state(&self) -> Option<(bool, bool)> {
        let at = self.msix_cap?;
        let ctl = self.read16(at + 2);
        Some((ctl & 0x8000 != 0, ctl & 0x4000 != 0))
    }

    pub fn command(&self) -> u16 {
        self.read16(reg::COMMAND)
    }

    /// Sets bits in the status register (device side, e.g. an error).
    pub fn set_status_bits(&mut self, bits: u16) {
        let v = self.read16(reg::STATUS) | bits;
        self.set16(reg::STATUS, v);
    }

    /// Restores the power-on state of the writable registers (a
    /// function-level reset): command, BARs, capability controls.
    pub fn reset(&mut self, pristine: &ConfigSpace) {
        self.data.copy_from_slice(&pristine.data);
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> ConfigSpace {
        let mut c = ConfigSpace::new(Identity {
            vendor_id: 0x1af4,
            device_id: 0x10f0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x10f0,
            class_code: 0x088000,
            revision: 1,
        });
        c.add_bar(
            0,
            Bar {
                size: 0x1000,
                kind: BarKind::Mem32,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                size: 0x4000,
                kind: BarKind::Mem64,
                prefetchable: true,
            },
        )
        .unwrap();
        c.add_pcie_endpoint().unwrap();
        c.add_msix(2, 2, 0, 2, 0x800).unwrap();
        c
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = dev();
        assert_eq!(c.read32(0), 0x10f0_1af4);
        c.write(0, &[0xff; 4]);
        assert_eq!(c.read32(0), 0x10f0_1af4);
        assert_eq!(c.read32(0x08) >> 8, 0x088000);
        let mut out = [0u8; 2];
        c.read(4095, &mut out);
        assert_eq!(out, [0, 0xff], "reads past the end are all-ones");
    }

    #[test]
    fn bar_sizing() {
        let mut c = dev();
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read32(0x10), 0xffff_f000);
        c.write(0x10, &0xfebf_1000u32.to_le_bytes());
        assert_eq!(c.read32(0x10), 0xfebf_1000);
        // 64-bit prefetchable BAR2/3.
        assert_eq!(c.read32(0x18) & 0xf, 0b1100);
        c.write(0x18, &0xffff_ffffu32.to_le_bytes());
        c.write(0x1c, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read32(0x18), 0xffff_c00c);
        assert_eq!(c.read32(0x1c), 0xffff_ffff);
        // Unused BAR1 reads zero whatever is written.
        c.write(0x14, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read32(0x14), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = dev();
        assert_eq!(
            c.add_bar(
                3,
                Bar {
                    size: 0x1000,
                    kind: BarKind::Mem32,
                    prefetchable: false
                }
            ),
            Err(BuildError::BarTaken(3))
        );
        assert_eq!(
            c.add_bar(
                4,
                Bar {
                    size: 0x1001,
                    kind: BarKind::Mem32,
                    prefetchable: false
                }
            ),
            Err(BuildError::BarSize(4, 0x1001))
        );
        assert_eq!(
            c.add_bar(
                5,
                Bar {
                    size: 0x1000,
                    kind: BarKind::Mem64,
                    prefetchable: false
                }
            ),
            Err(BuildError::BarIndex(5))
        );
    }

    #[test]
    fn capability_chain_and_msix_control() {
        let mut c = dev();
        assert_ne!(c.read16(reg::STATUS) & (1 << 4), 0);
        let p1 = c.read32(reg::CAPABILITIES) as u8 as usize;
        assert_eq!(c.data[p1], cap_id::PCIE);
        let p2 = c.data[p1 + 1] as usize;
        assert_eq!(c.data[p2], cap_id::MSIX);
        assert_eq!(c.data[p2 + 1], 0);
        assert_eq!(c.read16(p2 + 2) & 0x7ff, 1, "table size is N-1");
        let ev = c.write(p2 + 2, &0x8000u16.to_le_bytes());
        assert_eq!(
            ev,
            vec![ConfigEvent::MsixControl {
                enabled: true,
                masked: false
            }]
        );
        // Table size stays read-only.
        c.write(p2 + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.read16(p2 + 2), 0xc001);
    }

    #[test]
    fn command_changes_are_reported_and_status_errors_clear() {
        let mut c = dev();
        let ev = c.write(
            reg::COMMAND,
            &(command::MEMORY | command::BUS_MASTER | 0x8000).to_le_bytes(),
        );
        assert_eq!(
            ev,
            vec![ConfigEvent::Command {
                old: 0,
                new: command::MEMORY | command::BUS_MASTER
            }]
        );
        c.set_status_bits(1 << 13);
        c.write(reg::STATUS, &(1u16 << 13).to_le_bytes());
        assert_eq!(c.read16(reg::STATUS) & (1 << 13), 0);
        let pristine = dev();
        c.reset(&pristine);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn sriov_pm_and_flr() {
        let mut c = dev();
        let pm = c.add_pm().unwrap();
        let vf_bar = Bar {
            size: 0x4000,
            kind: BarKind::Mem64,
            prefetchable: false,
        };
        let at = c.add_sriov(4, 1, 1, 0x1234, &[(0, vf_bar)]).unwrap();
        assert_eq!(at, 0x100);
        assert_eq!(c.read32(at) & 0xffff, u32::from(ext_cap_id::SRIOV));
        assert_eq!(c.read32(at) >> 20, 0, "last in the list");
        assert_eq!(c.capability(cap_id::PM), Some(pm));
        assert_eq!(c.read16(at + sriov::TOTAL_VFS), 4);
        // VF BAR sizing: all ones reads back the size mask.
        c.write(at + sriov::VF_BAR0, &[0xff; 4]);
        c.write(at + sriov::VF_BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read32(at + sriov::VF_BAR0), 0xffff_c004);
        assert_eq!(c.read32(at + sriov::VF_BAR0 + 4), 0xffff_ffff);
        let ev = c.write(at + sriov::NUM_VFS, &2u16.to_le_bytes());
        assert_eq!(
            ev,
            vec![ConfigEvent::Sriov {
                vf_enable: false,
                num_vfs: 2
            }]
        );
        let ev = c.write(at + sriov::CONTROL, &1u16.to_le_bytes());
        assert_eq!(
            ev,
            vec![ConfigEvent::Sriov {
                vf_enable: true,
                num_vfs: 2
            }]
        );
        let ev = c.write(pm + 4, &3u16.to_le_bytes());
        assert_eq!(ev, vec![ConfigEvent::PowerState { old: 0, new: 3 }]);
        let pcie = c.capability(cap_id::PCIE).unwrap();
        let ev = c.write(pcie + 8, &0x8000u16.to_le_bytes());
        assert_eq!(ev, vec![ConfigEvent::FunctionLevelReset]);
        assert_eq!(c.read16(pcie + 8) & 0x8000, 0, "Initiate FLR reads as 0");
    }
}
