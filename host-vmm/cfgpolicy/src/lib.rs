//! Declarative PCI config-space virtualization (F5): descriptions, checks, the write filter and its audit log.
#![forbid(unsafe_code)]
