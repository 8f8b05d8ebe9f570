//! Virtual disks: raw, qcow2 and VHDX backends, differencing chains and checkpoints.
#![forbid(unsafe_code)]
