//! Serving a PCI function to QEMU over vfio-user.
//!
//! The protocol is the `vfio_user` crate's (rust-vmm): it fits, except that
//! its `Server` serves one connection and returns, which suits Tandem's
//! model (one device server process per device; the supervisor restarts
//! it). This crate adapts a [`PciFunction`] to it: config-space and BAR
//! accesses, the guest memory QEMU maps for DMA ([`DmaSpace`]), and the
//! interrupt eventfds. Devices see guest memory only through `DmaSpace`,
//! which holds exactly the regions QEMU mapped: an address outside them is
//! a DMA fault, never a host access.
#![forbid(unsafe_code)]

mod dma;

use std::fs::File;
use std::mem::size_of;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use dma::{DmaError, DmaSpace, Mem};
use tandem_pci::ConfigSpace;
use tracing::debug;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, Server, ServerBackend, ServerRegion};

/// A PCI function a device server implements.
pub trait PciFunction: Send {
    /// The function's configuration space.
    fn config(&self) -> &ConfigSpace;
    /// A config-space write from QEMU (the guest, through QEMU's filter).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Number of MSI-X vectors (0: none).
    fn msix_vectors(&self) -> u32;
    /// QEMU set (`Some`) or cleared (`None`) the eventfd of MSI-X vectors
    /// `start..start + fds.len()`.
    fn set_msix(&mut self, start: u32, fds: Vec<Option<File>>);
    /// The set of DMA-mapped guest memory changed.
    fn dma_changed(&mut self) {}
    /// A device reset from QEMU (the guest's FLR or system reset).
    fn reset(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: vfio_user::Error,
    },
    #[error("vfio-user connection failed: {0}")]
    Connection(vfio_user::Error),
}

/// The regions QEMU asks about: config space and the BARs the function
/// declares.
fn regions(config: &ConfigSpace) -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let mut info = vfio_region_info {
                // CAST: the struct is a few dozen bytes.
                argsz: size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            let size = if index == VFIO_PCI_CONFIG_REGION_INDEX {
                tandem_pci::CONFIG_SIZE as u64
            } else if (VFIO_PCI_BAR0_REGION_INDEX..VFIO_PCI_BAR0_REGION_INDEX + 6).contains(&index)
            {
                config
                    .bar((index - VFIO_PCI_BAR0_REGION_INDEX) as usize)
                    .map_or(0, |b| b.size)
            } else {
                0
            };
            if size > 0 {
                info.size = size;
                info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            }
            ServerRegion {
                region_info: info,
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

fn irqs(msix: u32) -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX && msix > 0 {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                msix
            } else {
                0
            },
        })
        .collect()
}

/// The `vfio_user` backend: forwards to the function under its lock.
struct Backend<D: PciFunction> {
    dev: Arc<Mutex<D>>,
    dma: Arc<DmaSpace>,
}

fn lock<D>(m: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    // A device that panicked mid-access is already broken; serving the
    // next access from its state is no worse than refusing it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<D: PciFunction> ServerBackend for Backend<D> {
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), std::io::Error> {
        let mut dev = lock(&self.dev);
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            let off = usize::try_from(offset).unwrap_or(usize::MAX);
            dev.config().read(off, data);
        } else if let Some(bar) = bar_of(region) {
            dev.bar_read(bar, offset, data);
        } else {
            data.fill(0xff);
        }
        Ok(())
    }

    fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), std::io::Error> {
        let mut dev = lock(&self.dev);
        if region == VFIO_PCI_CONFIG_REGION_INDEX {
            let off = usize::try_from(offset).unwrap_or(usize::MAX);
            dev.config_write(off, data);
        } else if let Some(bar) = bar_of(region) {
            dev.bar_write(bar, offset, data);
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        debug!(?flags, address, size, offset, "DMA map");
        let Some(fd) = fd else {
            // Without a file descriptor the region is only reachable through
            // DMA_READ/DMA_WRITE messages, which this server does not use
            // (QEMU sends ROM and firmware ranges this way): accesses there
            // fault, as they must.
            debug!(
                address,
                size, "DMA range without a file descriptor: unreachable"
            );
            self.dma.map_opaque(address, size);
            return Ok(());
        };
        self.dma
            .map(address, size, fd, offset)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        lock(&self.dev).dma_changed();
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), std::io::Error> {
        debug!(address, size, "DMA unmap");
        self.dma
            .unmap(address, size)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        lock(&self.dev).dma_changed();
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        lock(&self.dev).reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return Ok(());
        }
        let mut dev = lock(&self.dev);
        if flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(());
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
            // QEMU passes -1 for vectors it leaves unset; those arrive as
            // missing fds, so pair what came in order.
            let mut fds = fds.into_iter();
            let list = (0..count).map(|_| fds.next()).collect();
            dev.set_msix(start, list);
        } else if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            let n = dev.msix_vectors();
            dev.set_msix(0, (0..n).map(|_| None).collect());
        }
        Ok(())
    }
}

fn bar_of(region: u32) -> Option<usize> {
    let i = region.checked_sub(VFIO_PCI_BAR0_REGION_INDEX)?;
    (i < 6).then_some(i as usize)
}

/// A bound vfio-user socket, not yet serving.
pub struct Listener<D: PciFunction> {
    server: Server,
    backend: Backend<D>,
}

impl<D: PciFunction + 'static> Listener<D> {
    /// Binds `socket` for `dev`. The path must not exist.
    pub fn bind(
        socket: &Path,
        dev: Arc<Mutex<D>>,
        dma: Arc<DmaSpace>,
    ) -> Result<Listener<D>, ServeError> {
        let (regions, irqs) = {
            let d = lock(&dev);
            (regions(d.config()), irqs(d.msix_vectors()))
        };
        let server =
            Server::new(socket, true, irqs, regions).map_err(|source| ServeError::Listen {
                path: socket.display().to_string(),
                source,
            })?;
        Ok(Listener {
            server,
            backend: Backend { dev, dma },
        })
    }

    /// Serves one QEMU connection until it closes. Blocks.
    pub fn serve(mut self) -> Result<(), ServeError> {
        self.server
            .run(&mut self.backend)
            .map_err(ServeError::Connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_pci::{Bar, BarKind, Identity};

    #[test]
    fn regions_follow_the_bars() {
        let mut c = ConfigSpace::new(Identity {
            vendor_id: 1,
            device_id: 2,
            subsystem_vendor_id: 1,
            subsystem_id: 2,
            class_code: 0,
            revision: 0,
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
                prefetchable: false,
            },
        )
        .unwrap();
        let r = regions(&c);
        assert_eq!(r.len(), VFIO_PCI_NUM_REGIONS as usize);
        assert_eq!(
            r[VFIO_PCI_CONFIG_REGION_INDEX as usize].region_info.size,
            4096
        );
        assert_eq!(r[0].region_info.size, 0x1000);
        assert_eq!(r[1].region_info.size, 0);
        assert_eq!(r[2].region_info.size, 0x4000);
        assert_eq!(
            r[3].region_info.size, 0,
            "the upper half of a 64-bit BAR is no region"
        );
        let i = irqs(2);
        assert_eq!(i[VFIO_PCI_MSIX_IRQ_INDEX as usize].count, 2);
        assert_eq!(bar_of(VFIO_PCI_CONFIG_REGION_INDEX), None);
        assert_eq!(bar_of(2), Some(2));
    }
}
