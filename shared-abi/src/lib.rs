//! The one definition of the wire format between Tandem's guest drivers and
//! its host VMM (ABI v1). The specification in prose is `README.md` beside
//! this crate; this code is its executable form.
//!
//! This crate owns every constant, message, layout and rule that crosses
//! the guest/host boundary, and the one state machine both sides must run
//! identically ([`handoff`]: moving a disk's I/O between paths), and
//! nothing else: no I/O, no allocation, no policy, no time source.
//!
//! # How one source serves the host and the Linux kernel module
//!
//! A kernel module cannot pull crates from crates.io, so `guest-linux`
//! compiles these very files: `tandem.rs` includes this `lib.rs` with
//! `#[path = "../shared-abi/src/lib.rs"] mod abi;`, and the `mod` items
//! below then load the other files. Linux 7.3 vendors `zerocopy` 0.8.54 and
//! `zerocopy_derive` and passes both to modules, so the layouts derive the
//! same traits on both sides. The rules that keep that working:
//! - only `core`, `zerocopy` and `zerocopy_derive`; no `std`, no `alloc`;
//! - derives are spelled `zerocopy_derive::X` (the kernel builds zerocopy
//!   without its `derive` feature);
//! - items refer to each other with `super::`, never `crate::` (inside the
//!   module the crate root is `tandem.rs`, not this file);
//! - crate-level attributes are applied only when this is the crate root
//!   (`cfg(not(MODULE))`: the kernel sets `MODULE` for module builds).
//!
//! [`golden`] holds byte vectors that the host tests and the guest module
//! (at load) both check, so a divergence between the two builds is caught.
#![cfg_attr(not(MODULE), no_std)]
#![cfg_attr(not(MODULE), forbid(unsafe_code))]

pub mod channel;
pub mod faults;
pub mod golden;
pub mod handoff;
pub mod msg;
pub mod pci;
pub mod regs;
pub mod ring;
pub mod version;

pub use msg::{Kind, Message, MsgHeader, ParseError, Status};
pub use ring::{RingError, RingGeometry};
pub use version::{AbiVersion, VersionRange, ABI_VERSION, SUPPORTED};
