//! An emulated SR-IOV NVMe controller served over vfio-user.
#![forbid(unsafe_code)]
