//! Declarative PCI config-space virtualization (F5).
//!
//! This crate owns the description files (one per device type, TOML, in
//! `descriptions/`, format in the README) that say for every bit of a
//! function's config space (header, standard and extended capabilities,
//! and the MSI-X table entries) whether it is read-only, device-local or
//! system-wide, and what happens to system-wide writes. It parses and
//! checks them ([`Description::parse`]: contradictions and gaps are refused
//! naming the register), binds one to a function's config space image
//! ([`Policy::bind`]: capabilities are found by walking the lists, so a
//! description works wherever they sit) and judges every guest write
//! ([`Policy::config_write`], [`Policy::msix_table_write`]) into a
//! [`Decision`] with [`AuditRecord`]s for the [`AuditLog`].
//!
//! It is pure: no I/O, no clock (the caller passes the time in
//! [`Context`]), no knowledge of vfio-user. It must not touch the device
//! models' own write masks (`tandem-pci` keeps those); the device server
//! calls this crate before handing a write to its model.
//!
//! ```
//! use std::sync::Arc;
//! use tandem_cfgpolicy::{mock, Context, Description, Function, FunctionId, Policy, Verdict};
//!
//! let desc = Arc::new(Description::parse(tandem_cfgpolicy::builtin("nvme-vf").unwrap()).unwrap());
//! let mut vf = mock::MockFunction::nvme(false);
//! let id = FunctionId { device: "nvme0".into(), function: Function::Vf(1) };
//! let mut policy = Policy::bind(desc, vf.config(), id, vf.bar_sizes()).unwrap();
//! // The guest enables bus mastering; the host has frozen the function.
//! let ctx = Context { frozen: true, ..Context::default() };
//! let d = policy.config_write(&ctx, vf.config(), 0x04, &[0x06, 0x00]).unwrap();
//! assert_eq!(d.verdict, Verdict::Deny);
//! assert_eq!(d.audit[0].register, "command");
//! ```
#![forbid(unsafe_code)]

pub mod audit;
pub mod bars;
pub mod desc;
pub mod layout;
pub mod mock;
pub mod policy;

pub use audit::{AuditAction, AuditLog, AuditRecord, Function, FunctionId, Space};
pub use desc::{DescError, Description};
pub use policy::{
    BindError, Context, Decision, FieldDecision, Outcome, Policy, Verdict, WriteError,
};

/// The descriptions of the devices Tandem serves: (name, TOML text).
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    ("nvme-pf", include_str!("../descriptions/nvme-pf.toml")),
    ("nvme-vf", include_str!("../descriptions/nvme-vf.toml")),
    ("control", include_str!("../descriptions/control.toml")),
];

/// The text of a built-in description.
pub fn builtin(name: &str) -> Option<&'static str> {
    DESCRIPTIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}
