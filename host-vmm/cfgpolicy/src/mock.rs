//! A test double of an NVMe function with the layout the NVMe
//! descriptions are written for, behaving like hardware (write masks,
//! write-one-to-clear bits, BAR sizing, FLR restoring power-on state, an
//! MSI-X table), so the policy can be tested, and its integration tried,
//! without a device server.
//!
//! Layout: type-0 header; BAR0/1 one 64-bit memory BAR of 16 KiB; BAR4 a
//! 32-bit memory BAR of 16 KiB with the MSI-X table at 0 and the PBA at
//! 0x2000; PM at 0x40 (8 bytes), MSI-X at 0x50 (12 bytes), PCIe v2
//! endpoint at 0x60 (60 bytes); the PF adds SR-IOV at 0x100 (64 bytes).

use crate::policy::{Decision, Verdict};

pub const PM_AT: usize = 0x40;
pub const MSIX_AT: usize = 0x50;
pub const PCIE_AT: usize = 0x60;
pub const SRIOV_AT: usize = 0x100;
pub const BAR_SIZE: u64 = 0x4000;
pub const MSIX_VECTORS: usize = 17;
pub const TOTAL_VFS: u16 = 8;
/// PCIe Device Control, relative to the PCIe capability.
pub const PCIE_DEVCTL: usize = 0x08;
/// Initiate Function Level Reset in Device Control.
pub const DEVCTL_FLR: u16 = 1 << 15;

/// A config space, its write rules and an MSI-X table.
#[derive(Clone, Debug)]
pub struct MockFunction {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    pristine: Vec<u8>,
    msix: Vec<[u8; 16]>,
    /// Function Level Resets performed.
    pub flr_count: u32,
    /// Writes that reached the device model.
    pub writes: u32,
}

impl MockFunction {
    /// An NVMe PF (with SR-IOV) or VF.
    pub fn nvme(pf: bool) -> MockFunction {
        let mut m = MockFunction {
            data: vec![0; 4096],
            wmask: vec![0; 4096],
            w1c: vec![0; 4096],
            pristine: Vec::new(),
            msix: vec![[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]; MSIX_VECTORS],
            flr_count: 0,
            writes: 0,
        };
        m.set16(0x00, 0x1af4, 0);
        m.set16(0x02, if pf { 0x10f1 } else { 0x10f2 }, 0);
        m.set16(0x04, 0, 0x0546);
        m.set16(0x06, 0x0010, 0);
        m.w1c[0x07] = 0xf9;
        m.set32(0x08, 0x0108_0201, 0);
        // BAR0/1: 64-bit memory; BAR4: 32-bit memory.
        m.set32(0x10, 0x4, !(BAR_SIZE as u32 - 1) & !0xf);
        m.set32(0x14, 0, u32::MAX);
        m.set32(0x20, 0, !(BAR_SIZE as u32 - 1) & !0xf);
        m.set16(0x2c, 0x1af4, 0);
        m.set16(0x2e, 0x0001, 0);
        m.data[0x34] = PM_AT as u8;
        m.set16(0x3c, 0, 0x00ff);
        // PM: version 3; PMCSR No_Soft_Reset, PowerState writable.
        m.set16(PM_AT, 0x01 | ((MSIX_AT as u16) << 8), 0);
        m.set16(PM_AT + 2, 0x0003, 0);
        m.set16(PM_AT + 4, 0x0008, 0x0103);
        m.w1c[PM_AT + 5] = 0x80;
        // MSI-X: table at BAR4 + 0, PBA at BAR4 + 0x2000.
        m.set16(MSIX_AT, 0x11 | ((PCIE_AT as u16) << 8), 0);
        m.set16(MSIX_AT + 2, (MSIX_VECTORS - 1) as u16, 0xc000);
        m.set32(MSIX_AT + 4, 0x0000_0004, 0);
        m.set32(MSIX_AT + 8, 0x0000_2004, 0);
        // PCIe v2 endpoint, FLR capable, 2.5 GT/s x1.
        m.set16(PCIE_AT, 0x10, 0);
        m.set16(PCIE_AT + 2, 0x0002, 0);
        m.set32(PCIE_AT + 4, 1 << 28, 0);
        m.set16(PCIE_AT + PCIE_DEVCTL, 0x2810, 0x7fff);
        m.w1c[PCIE_AT + 0x0a] = 0x0f;
        m.set32(PCIE_AT + 0x0c, 0x11, 0);
        m.set16(PCIE_AT + 0x10, 0, 0x01c3);
        m.set16(PCIE_AT + 0x12, 0x11, 0);
        m.set16(PCIE_AT + 0x28, 0, 0x0400);
        m.set16(PCIE_AT + 0x30, 0x1, 0x000f);
        if pf {
            m.set32(SRIOV_AT, 0x0010 | (1 << 16), 0);
            m.set16(SRIOV_AT + 0x08, 0, 0x0019);
            m.set16(SRIOV_AT + 0x0c, TOTAL_VFS, 0);
            m.set16(SRIOV_AT + 0x0e, TOTAL_VFS, 0);
            m.set16(SRIOV_AT + 0x10, 0, 0xffff);
            m.set16(SRIOV_AT + 0x14, 1, 0);
            m.set16(SRIOV_AT + 0x16, 1, 0);
            m.set16(SRIOV_AT + 0x1a, 0x10f2, 0);
            m.set32(SRIOV_AT + 0x1c, 0x1, 0);
            m.set32(SRIOV_AT + 0x20, 0x1, 0x1);
            m.set32(SRIOV_AT + 0x24, 0x4, !(BAR_SIZE as u32 - 1) & !0xf);
            m.set32(SRIOV_AT + 0x28, 0, u32::MAX);
        }
        m.pristine = m.data.clone();
        m
    }

    fn set16(&mut self, at: usize, v: u16, wmask: u16) {
        self.data[at..at + 2].copy_from_slice(&v.to_le_bytes());
        self.wmask[at..at + 2].copy_from_slice(&wmask.to_le_bytes());
    }

    fn set32(&mut self, at: usize, v: u32, wmask: u32) {
        self.data[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self.wmask[at..at + 4].copy_from_slice(&wmask.to_le_bytes());
    }

    pub fn config(&self) -> &[u8] {
        &self.data
    }

    pub fn bar_sizes(&self) -> [u64; 6] {
        [BAR_SIZE, 0, 0, 0, BAR_SIZE, 0]
    }

    pub fn read16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.data[at], self.data[at + 1]])
    }

    pub fn read32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.data[at],
            self.data[at + 1],
            self.data[at + 2],
            self.data[at + 3],
        ])
    }

    /// A config write as the hardware takes it. Writing Initiate FLR
    /// resets the function to its power-on state.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        self.writes = self.writes.saturating_add(1);
        let mut flr = false;
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|o| *o < self.data.len()) else {
                break;
            };
            if o == PCIE_AT + PCIE_DEVCTL + 1 && v & 0x80 != 0 {
                flr = true;
            }
            let keep = self.data[o] & !self.wmask[o];
            self.data[o] = (keep | (v & self.wmask[o])) & !(v & self.w1c[o]);
        }
        if flr {
            self.flr_count = self.flr_count.saturating_add(1);
            self.data.copy_from_slice(&self.pristine);
        }
    }

    /// Forwards a policy decision: the decided bytes, unless denied.
    pub fn apply(&mut self, d: &Decision) {
        if d.verdict != Verdict::Deny {
            self.write(d.offset as usize, &d.bytes);
        }
    }

    pub fn msix_entry(&self, index: usize) -> [u8; 16] {
        self.msix.get(index).copied().unwrap_or([0; 16])
    }

    /// A write to the MSI-X table (within one entry).
    pub fn msix_write(&mut self, table_offset: usize, data: &[u8]) {
        let (index, within) = (table_offset / 16, table_offset % 16);
        if let Some(e) = self.msix.get_mut(index) {
            for (i, &v) in data.iter().enumerate() {
                if let Some(b) = e.get_mut(within + i) {
                    // Vector control: only the mask bit is writable.
                    *b = if within + i == 12 {
                        v & 1
                    } else if within + i > 12 {
                        0
                    } else {
                        v
                    };
                }
            }
        }
    }

    /// Forwards a policy decision on the MSI-X table.
    pub fn apply_msix(&mut self, d: &Decision) {
        if d.verdict != Verdict::Deny {
            self.msix_write(d.offset as usize, &d.bytes);
        }
    }
}
