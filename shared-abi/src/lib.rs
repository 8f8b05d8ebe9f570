//! The one definition of the wire format between Tandem's guest drivers and
//! its host VMM.
//!
//! This crate owns every constant, message and layout that crosses the
//! guest/host boundary, and nothing else: no I/O, no allocation, no policy.
//! It is `no_std` and has no dependencies, because the Linux guest module
//! compiles its source files directly: a kernel module cannot pull crates
//! from crates.io, so `guest-linux/tandem.rs` includes the files below with
//! `#[path]` and the kernel build sees exactly the definitions the host uses.
//! Every file under `src/` must therefore compile both as part of this crate
//! and as a module inside the kernel crate (only `core`, no `std`, no
//! external crates, no `crate::` paths that assume this crate's root).
#![no_std]
#![forbid(unsafe_code)]

pub mod version;

pub use version::{AbiVersion, ABI_VERSION};
