//! A description bound to one function's config space, and the write
//! filter itself. Binding finds where each capability lives and refuses
//! images the description does not fully cover; every guest write then
//! goes through [`Policy::config_write`] (or [`Policy::msix_table_write`])
//! and comes out as a [`Decision`]: what to forward, what was denied or
//! translated, and the audit records to keep.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;
use tracing::debug;

use crate::audit::{AuditAction, AuditRecord, FunctionId, Space};
use crate::bars;
use crate::desc::{
    Block, CapKind, Class, Description, HostFlag, HostLimit, Limit, Register, Translation,
    WriteRule, HEADER_SIZE, MSIX_ENTRY_SIZE,
};
use crate::layout::{self, LayoutError};

const NS_PER_SEC: u64 = 1_000_000_000;
const COMMAND: usize = 0x04;
const COMMAND_MEMORY: u8 = 1 << 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindError {
    #[error("config space of {function}: {source}")]
    Layout {
        function: String,
        #[source]
        source: LayoutError,
    },
    #[error(
        "description `{desc}` does not describe the {kind} capability {id:#x} found at {offset:#x} \
         (first uncovered byte: {offset:#x})"
    )]
    Undescribed {
        desc: String,
        kind: CapKind,
        id: u16,
        offset: u16,
    },
    #[error(
        "capability `{name}` is required by description `{desc}` but the config space has none"
    )]
    Missing { desc: String, name: String },
    #[error("capability `{name}` at {offset:#x} ({size} bytes) runs past {limit:#x}")]
    TooLong {
        name: String,
        offset: u16,
        size: u16,
        limit: usize,
    },
    #[error("capability `{name}` at {offset:#x} overlaps {other} at config offset {at:#x}")]
    Overlap {
        name: String,
        offset: u16,
        other: String,
        at: usize,
    },
    #[error("{block} offset {offset:#x} (config offset {at:#x}) is not described")]
    Gap {
        block: String,
        offset: u16,
        at: usize,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    #[error("a write of no bytes")]
    Empty,
    #[error("write of {len} bytes at {offset:#x} is outside the {size}-byte space")]
    OutOfRange {
        offset: u32,
        len: usize,
        size: usize,
    },
    #[error("config space image is {got} bytes; the policy was bound to {want}")]
    ImageSize { got: usize, want: usize },
    #[error("description `{0}` does not describe the MSI-X table")]
    NoMsixTable(String),
    #[error("MSI-X table write of {len} bytes at {offset:#x} crosses an entry boundary")]
    CrossesEntry { offset: u32, len: usize },
}

/// Host state a write is judged in. `now_ns` is the caller's monotonic
/// clock; it stamps audit records and drives the FLR rate limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    pub now_ns: u64,
    /// The host froze the function (`frozen` flag).
    pub frozen: bool,
    /// The guest may manage this PF's VFs (`manage-vfs` flag).
    pub manage_vfs: bool,
    /// How many VFs the guest may enable (`num-vfs-ceiling` limit).
    pub num_vfs_ceiling: u16,
}

impl Context {
    fn flag(&self, f: HostFlag) -> bool {
        match f {
            HostFlag::Frozen => self.frozen,
            HostFlag::ManageVfs => self.manage_vfs,
        }
    }

    fn limit(&self, l: HostLimit) -> u32 {
        match l {
            HostLimit::NumVfsCeiling => u32::from(self.num_vfs_ceiling),
        }
    }
}

/// What to do with the write as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Forward [`Decision::bytes`]: no system-wide rule changed anything
    /// (read-only bits may have been replaced by their current value,
    /// which the device ignores anyway).
    Pass,
    /// Forward [`Decision::bytes`]: some fields were denied or translated,
    /// others still take effect.
    Translate,
    /// Drop the write: it was denied and nothing else in it would change
    /// anything.
    Deny,
}

/// What happened to one field the write touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Passed,
    /// Read-only bits the guest tried to change: they keep their value.
    ReadOnly,
    Denied,
    Translated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldDecision {
    pub register: String,
    pub field: String,
    /// The register's offset in its space.
    pub offset: u32,
    /// The field's bits within the register.
    pub mask: u32,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub offset: u32,
    /// The bytes to forward (same length as the guest's), unless `Deny`.
    pub bytes: Vec<u8>,
    /// Per byte, the bits a system-wide rule (or an unclaimed byte) made
    /// differ from the guest's value.
    pub overridden: Vec<u8>,
    /// Every field the write touched, with its outcome.
    pub fields: Vec<FieldDecision>,
    /// One record per denied or translated field (and per audited
    /// read-only change). The caller pushes them into its [`crate::AuditLog`].
    pub audit: Vec<AuditRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    reg: usize,
    /// Offset of the register's block in the space.
    base: u16,
}

/// A description bound to one function. Holds the FLR rate limiter's
/// state, so keep one per function for its lifetime.
#[derive(Debug)]
pub struct Policy {
    desc: Arc<Description>,
    function: FunctionId,
    bar_sizes: [u64; 6],
    image_len: usize,
    owners: Vec<Option<Owner>>,
    msix_owners: Vec<Option<Owner>>,
    placed: Vec<(usize, u16)>,
    flr: FlrState,
}

/// FLR timestamps per (register, block base, field).
#[derive(Debug, Default)]
struct FlrState {
    windows: HashMap<(usize, u16, usize), VecDeque<u64>>,
}

impl Policy {
    /// Binds `desc` to a function whose current config space is `image`
    /// (256 or 4096 bytes). `bar_sizes[i]` is BAR `i`'s size in bytes (0
    /// if unimplemented; a 64-bit BAR's size at its lower index), used by
    /// `bar-check` and `decode-check`. Refuses capabilities the
    /// description lacks, required capabilities the image lacks, and any
    /// byte of the header or of a present capability no register covers.
    pub fn bind(
        desc: Arc<Description>,
        image: &[u8],
        function: FunctionId,
        bar_sizes: [u64; 6],
    ) -> Result<Policy, BindError> {
        let found = layout::walk(image).map_err(|source| BindError::Layout {
            function: format!("{}/{:?}", function.device, function.function),
            source,
        })?;
        let mut block_of: Vec<Option<String>> = vec![None; image.len()];
        for b in block_of.iter_mut().take(usize::from(HEADER_SIZE)) {
            *b = Some("header".to_owned());
        }
        let mut placed = Vec::new();
        for f in &found {
            let Some(ci) = desc
                .capabilities
                .iter()
                .position(|c| c.kind == f.kind && c.id == f.id)
            else {
                return Err(BindError::Undescribed {
                    desc: desc.name.clone(),
                    kind: f.kind,
                    id: f.id,
                    offset: f.offset,
                });
            };
            let cap = &desc.capabilities[ci];
            let limit = match f.kind {
                CapKind::Standard => layout::CONVENTIONAL_SIZE,
                CapKind::Extended => image.len(),
            };
            let start = usize::from(f.offset);
            let end = start + usize::from(cap.size);
            if end > limit {
                return Err(BindError::TooLong {
                    name: cap.name.clone(),
                    offset: f.offset,
                    size: cap.size,
                    limit,
                });
            }
            for (at, slot) in block_of.iter_mut().enumerate().take(end).skip(start) {
                if let Some(other) = slot {
                    return Err(BindError::Overlap {
                        name: cap.name.clone(),
                        offset: f.offset,
                        other: other.clone(),
                        at,
                    });
                }
                *slot = Some(format!("capability `{}`", cap.name));
            }
            placed.push((ci, f.offset));
        }
        for (ci, cap) in desc.capabilities.iter().enumerate() {
            if cap.required && !placed.iter().any(|(p, _)| *p == ci) {
                return Err(BindError::Missing {
                    desc: desc.name.clone(),
                    name: cap.name.clone(),
                });
            }
        }
        let mut owners = vec![None; image.len()];
        let mut msix_owners = vec![None; usize::from(MSIX_ENTRY_SIZE)];
        for (ri, r) in desc.registers.iter().enumerate() {
            let fill = |owners: &mut Vec<Option<Owner>>, base: u16| {
                for b in 0..u16::from(r.width) {
                    if let Some(slot) = owners.get_mut(usize::from(base + r.offset + b)) {
                        *slot = Some(Owner { reg: ri, base });
                    }
                }
            };
            match r.block {
                Block::Header => fill(&mut owners, 0),
                Block::MsixTable => fill(&mut msix_owners, 0),
                Block::Capability(ci) => {
                    for &(p, off) in &placed {
                        if p == ci {
                            fill(&mut owners, off);
                        }
                    }
                }
            }
        }
        // The description's own checks make this hold; it is checked
        // again against the image so that a gap can never pass silently.
        for (at, b) in block_of.iter().enumerate() {
            if let (Some(block), None) = (b, owners[at]) {
                let base = placed
                    .iter()
                    .map(|&(_, o)| usize::from(o))
                    .filter(|o| *o <= at)
                    .max()
                    .unwrap_or(0);
                return Err(BindError::Gap {
                    block: block.clone(),
                    offset: (at - base) as u16,
                    at,
                });
            }
        }
        tracing::info!(
            description = %desc.name,
            device = %function.device,
            capabilities = placed.len(),
            "config-space policy bound"
        );
        Ok(Policy {
            desc,
            function,
            bar_sizes,
            image_len: image.len(),
            owners,
            msix_owners,
            placed,
            flr: FlrState::default(),
        })
    }

    pub fn description(&self) -> &Description {
        &self.desc
    }

    pub fn function(&self) -> &FunctionId {
        &self.function
    }

    /// Where each described capability was found: (name, offset).
    pub fn capabilities(&self) -> impl Iterator<Item = (&str, u16)> {
        self.placed
            .iter()
            .map(|&(ci, off)| (self.desc.capabilities[ci].name.as_str(), off))
    }

    /// The register covering config offset `offset`, if any.
    pub fn register_at(&self, offset: usize) -> Option<&Register> {
        let o = self.owners.get(offset).copied().flatten()?;
        self.desc.registers.get(o.reg)
    }

    /// Judges a guest write of `data` at config offset `offset`, given the
    /// function's current config space `image` (same size as at binding).
    pub fn config_write(
        &mut self,
        ctx: &Context,
        image: &[u8],
        offset: usize,
        data: &[u8],
    ) -> Result<Decision, WriteError> {
        if image.len() != self.image_len {
            return Err(WriteError::ImageSize {
                got: image.len(),
                want: self.image_len,
            });
        }
        if data.is_empty() {
            return Err(WriteError::Empty);
        }
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > image.len())
        {
            return Err(WriteError::OutOfRange {
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                len: data.len(),
                size: image.len(),
            });
        }
        let job = Job {
            desc: &self.desc,
            function: &self.function,
            bar_sizes: &self.bar_sizes,
            ctx,
            space: Space::Config,
            image,
            owners: &self.owners,
            config: Some(image),
            entry: None,
            record_base: 0,
        };
        Ok(job.run(&mut self.flr, offset, data))
    }

    /// Judges a guest write to the MSI-X table (in the table's BAR) at
    /// `table_offset` from the table's start; `entry` is the current 16
    /// bytes of the entry written. The write must stay within one entry.
    pub fn msix_table_write(
        &mut self,
        ctx: &Context,
        table_offset: u32,
        data: &[u8],
        entry: &[u8; 16],
    ) -> Result<Decision, WriteError> {
        if !self.desc.has_msix_table() {
            return Err(WriteError::NoMsixTable(self.desc.name.clone()));
        }
        if data.is_empty() {
            return Err(WriteError::Empty);
        }
        let within = (table_offset % u32::from(MSIX_ENTRY_SIZE)) as usize;
        if within + data.len() > usize::from(MSIX_ENTRY_SIZE) {
            return Err(WriteError::CrossesEntry {
                offset: table_offset,
                len: data.len(),
            });
        }
        let index = table_offset / u32::from(MSIX_ENTRY_SIZE);
        let job = Job {
            desc: &self.desc,
            function: &self.function,
            bar_sizes: &self.bar_sizes,
            ctx,
            space: Space::MsixTable,
            image: entry,
            owners: &self.msix_owners,
            config: None,
            entry: Some(index),
            record_base: table_offset - within as u32,
        };
        Ok(job.run(&mut self.flr, within, data))
    }
}

/// One write being judged.
struct Job<'a> {
    desc: &'a Description,
    function: &'a FunctionId,
    bar_sizes: &'a [u64; 6],
    ctx: &'a Context,
    space: Space,
    /// The space the write lands in (config space, or one MSI-X entry).
    image: &'a [u8],
    owners: &'a [Option<Owner>],
    /// The config space, for BAR and decode checks.
    config: Option<&'a [u8]>,
    entry: Option<u32>,
    /// Added to offsets in records (the MSI-X entry's table offset).
    record_base: u32,
}

/// A field's fate: the bits to apply, and if not simply passed, why.
struct Fate {
    value: u32,
    outcome: Outcome,
    rule: &'static str,
    reason: String,
}

impl Fate {
    fn passed(value: u32) -> Fate {
        Fate {
            value,
            outcome: Outcome::Passed,
            rule: "",
            reason: String::new(),
        }
    }
}

fn read_le(image: &[u8], at: usize, width: usize) -> u32 {
    let mut v = 0u32;
    for k in 0..width.min(4) {
        v |= u32::from(image.get(at + k).copied().unwrap_or(0)) << (8 * k);
    }
    v
}

impl Job<'_> {
    fn register_name(&self, r: &Register) -> String {
        match self.entry {
            Some(i) => format!("{}[{i}]", r.name),
            None => r.name.clone(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        register: String,
        field: &str,
        offset: u32,
        width: u8,
        written: u32,
        applied: u32,
        fate: &Fate,
    ) -> AuditRecord {
        let action = match fate.outcome {
            Outcome::Denied => AuditAction::Denied,
            Outcome::Translated => AuditAction::Translated,
            Outcome::ReadOnly | Outcome::Passed => AuditAction::ReadOnly,
        };
        debug!(
            device = %self.function.device,
            %register,
            field,
            offset,
            written,
            applied,
            rule = fate.rule,
            reason = %fate.reason,
            "config write {action:?}"
        );
        AuditRecord {
            seq: 0,
            time_ns: self.ctx.now_ns,
            function: self.function.clone(),
            space: self.space,
            register,
            field: field.to_owned(),
            offset,
            width,
            written,
            applied,
            rule: fate.rule.to_owned(),
            action,
            reason: fate.reason.clone(),
        }
    }

    fn run(&self, flr: &mut FlrState, offset: usize, data: &[u8]) -> Decision {
        let len = data.len();
        let mut bytes = data.to_vec();
        let mut overridden = vec![0u8; len];
        let mut fields = Vec::new();
        let mut audit = Vec::new();
        // Some written, non-read-only bit would change something.
        let mut effect = false;
        // Some field was denied or translated.
        let mut policed = false;
        let mut i = 0;
        while i < len {
            let at = offset + i;
            let Some(owner) = self.owners.get(at).copied().flatten() else {
                // No register here: reserved space, or a capability this
                // function does not have. Hardware ignores such writes.
                let cur = self.image.get(at).copied().unwrap_or(0);
                bytes[i] = cur;
                if data[i] != cur {
                    overridden[i] = data[i] ^ cur;
                    policed = true;
                    let fate = Fate {
                        value: u32::from(cur),
                        outcome: Outcome::Denied,
                        rule: "unclaimed",
                        reason: format!(
                            "no register of `{}` covers this byte; the write is dropped",
                            self.desc.name
                        ),
                    };
                    let off = self.record_base + at as u32;
                    fields.push(FieldDecision {
                        register: "unclaimed".into(),
                        field: "unclaimed".into(),
                        offset: off,
                        mask: 0xff,
                        outcome: Outcome::Denied,
                    });
                    audit.push(self.record(
                        "unclaimed".into(),
                        "unclaimed",
                        off,
                        1,
                        u32::from(data[i]),
                        u32::from(cur),
                        &fate,
                    ));
                }
                i += 1;
                continue;
            };
            let Some(reg) = self.desc.registers.get(owner.reg) else {
                i += 1;
                continue;
            };
            let start = usize::from(owner.base) + usize::from(reg.offset);
            let width = usize::from(reg.width);
            let first = at - start;
            let n = (width - first).min(len - i);
            let cur = read_le(self.image, start, width);
            let mut guest = cur;
            let mut wb = 0u32;
            for k in 0..n {
                let sh = 8 * (first + k);
                wb |= 0xff << sh;
                guest = (guest & !(0xff << sh)) | (u32::from(data[i + k]) << sh);
            }
            let mut result = cur;
            let mut ro_mask = 0u32;
            let reg_off = self.record_base + start as u32;
            for (fi, f) in reg.fields.iter().enumerate() {
                let m = f.mask;
                if m & wb == 0 {
                    continue;
                }
                let g = guest & m;
                let c = cur & m;
                let keep = if f.w1c { 0 } else { c };
                let fate = match &f.class {
                    Class::ReadOnly => {
                        ro_mask |= m;
                        if (g ^ c) & wb != 0 {
                            Fate {
                                value: c,
                                outcome: Outcome::ReadOnly,
                                rule: "read-only",
                                reason: "read-only bits keep their value".into(),
                            }
                        } else {
                            Fate::passed(c)
                        }
                    }
                    Class::DeviceLocal | Class::SystemWide(WriteRule::Permit) => Fate::passed(g),
                    Class::SystemWide(WriteRule::Deny) => {
                        if g != keep {
                            Fate {
                                value: keep,
                                outcome: Outcome::Denied,
                                rule: "deny",
                                reason: "system-wide bits: guest writes are denied".into(),
                            }
                        } else {
                            Fate::passed(g)
                        }
                    }
                    Class::SystemWide(WriteRule::Translate(chain)) => self.translate(
                        flr,
                        chain,
                        (owner.reg, owner.base, fi),
                        reg,
                        m,
                        guest,
                        cur,
                        keep,
                    ),
                };
                let value = fate.value & m;
                result = (result & !m) | value;
                if !matches!(f.class, Class::ReadOnly) && (value ^ keep) & wb != 0 {
                    effect = true;
                }
                let applied = (cur & !wb) | (result & wb);
                match fate.outcome {
                    Outcome::Passed => {}
                    Outcome::ReadOnly => {
                        if reg.audit {
                            audit.push(self.record(
                                self.register_name(reg),
                                &f.name,
                                reg_off,
                                reg.width,
                                guest,
                                applied,
                                &fate,
                            ));
                        }
                    }
                    Outcome::Denied | Outcome::Translated => {
                        policed = true;
                        audit.push(self.record(
                            self.register_name(reg),
                            &f.name,
                            reg_off,
                            reg.width,
                            guest,
                            applied,
                            &fate,
                        ));
                    }
                }
                fields.push(FieldDecision {
                    register: self.register_name(reg),
                    field: f.name.clone(),
                    offset: reg_off,
                    mask: m,
                    outcome: fate.outcome,
                });
            }
            for k in 0..n {
                let sh = 8 * (first + k);
                bytes[i + k] = (result >> sh) as u8;
                overridden[i + k] = (((result ^ guest) & !ro_mask) >> sh) as u8;
            }
            i += n;
        }
        let verdict = match (policed, effect) {
            (false, _) => Verdict::Pass,
            (true, true) => Verdict::Translate,
            (true, false) => Verdict::Deny,
        };
        Decision {
            verdict,
            offset: self.record_base + offset as u32,
            bytes,
            overridden,
            fields,
            audit,
        }
    }

    /// Runs a translation chain over a field. `guest` and `cur` are the
    /// whole register as the guest would leave it and as it is; `keep` is
    /// what leaving the field alone means.
    #[allow(clippy::too_many_arguments)]
    fn translate(
        &self,
        flr: &mut FlrState,
        chain: &[Translation],
        key: (usize, u16, usize),
        reg: &Register,
        m: u32,
        guest: u32,
        cur: u32,
        keep: u32,
    ) -> Fate {
        let g = guest & m;
        let mut v = g;
        let mut changed: Option<(&'static str, String)> = None;
        for t in chain {
            match self.step(flr, *t, key, reg, m, cur, v, keep) {
                Ok((nv, why)) => {
                    let nv = nv & m;
                    if nv != v && changed.is_none() {
                        changed = Some((t.name(), why));
                    }
                    v = nv;
                }
                Err(reason) => {
                    if g == keep {
                        return Fate::passed(g);
                    }
                    return Fate {
                        value: keep,
                        outcome: Outcome::Denied,
                        rule: t.name(),
                        reason,
                    };
                }
            }
        }
        match changed {
            Some((rule, reason)) if v != g => Fate {
                value: v,
                outcome: Outcome::Translated,
                rule,
                reason,
            },
            _ => Fate::passed(g),
        }
    }

    /// One translation of field `m`'s bits `v`: `Ok((value, why it
    /// changed))` or `Err(why denied)`. `cur` is the register as it is.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        flr: &mut FlrState,
        t: Translation,
        key: (usize, u16, usize),
        reg: &Register,
        m: u32,
        cur: u32,
        v: u32,
        keep: u32,
    ) -> Result<(u32, String), String> {
        let ctx = self.ctx;
        let c = cur & m;
        let shift = m.trailing_zeros();
        match t {
            Translation::ForceClear(bits) => {
                Ok((v & !bits, format!("bits {bits:#x} are forced to 0")))
            }
            Translation::ForceSet(bits) => {
                Ok((v | bits, format!("bits {bits:#x} are forced to 1")))
            }
            Translation::Clamp(limit) => {
                let (max, what) = match limit {
                    Limit::Fixed(n) => (n, "the description's maximum".to_owned()),
                    Limit::Host(l) => (ctx.limit(l), format!("the host's {}", l.name())),
                };
                let field_max = m.checked_shr(shift).unwrap_or(0);
                let max = max.min(field_max);
                let val = v.checked_shr(shift).unwrap_or(0);
                if val > max {
                    Ok((max << shift, format!("{val} is clamped to {max}, {what}")))
                } else {
                    Ok((v, String::new()))
                }
            }
            Translation::IgnoreUnless(f) | Translation::IgnoreIf(f) => {
                let ignore = ctx.flag(f) == matches!(t, Translation::IgnoreIf(_));
                if ignore {
                    let state = if ctx.flag(f) { "set" } else { "not set" };
                    Ok((
                        keep,
                        format!(
                            "host flag `{}` is {state}: the bits keep their value",
                            f.name()
                        ),
                    ))
                } else {
                    Ok((v, String::new()))
                }
            }
            Translation::DenyUnless(f) | Translation::DenyIf(f) => {
                if ctx.flag(f) == matches!(t, Translation::DenyIf(_)) {
                    let state = if ctx.flag(f) { "set" } else { "not set" };
                    Err(format!("host flag `{}` is {state}", f.name()))
                } else {
                    Ok((v, String::new()))
                }
            }
            Translation::MsiAddress => {
                if v == 0 || (v & 0xfff0_0000) == 0xfee0_0000 {
                    Ok((v, String::new()))
                } else {
                    Err(format!(
                        "MSI address {v:#010x} is outside the interrupt window 0xfee00000..=0xfeefffff"
                    ))
                }
            }
            Translation::MsiUpperAddress => {
                if v == 0 {
                    Ok((v, String::new()))
                } else {
                    Err(format!(
                        "MSI upper address {v:#x} is not 0 (the interrupt window is below 4 GiB)"
                    ))
                }
            }
            Translation::MsiData => {
                let mode = (v >> 8) & 7;
                match mode {
                    0 | 1 => Ok((v, String::new())),
                    _ => {
                        let name = match mode {
                            2 => "SMI",
                            4 => "NMI",
                            5 => "INIT",
                            7 => "ExtINT",
                            _ => "reserved",
                        };
                        Err(format!("MSI delivery mode {mode} ({name}) is not allowed"))
                    }
                }
            }
            Translation::PowerState => {
                let new = v & 3;
                let now = c & 3;
                if new == now || new == 0 || new == 3 {
                    Ok((v, String::new()))
                } else {
                    Err(format!(
                        "D{new} is not supported (only D0 and D3hot); the write is discarded as PCI PM requires"
                    ))
                }
            }
            Translation::Flr { per_second } => {
                if v == 0 {
                    return Ok((v, String::new()));
                }
                let window = flr.windows.entry(key).or_default();
                while window
                    .front()
                    .is_some_and(|t| t.saturating_add(NS_PER_SEC) <= ctx.now_ns)
                {
                    window.pop_front();
                }
                if window.len() < per_second as usize {
                    window.push_back(ctx.now_ns);
                    Ok((v, String::new()))
                } else {
                    Err(format!(
                        "Function Level Reset rate limit: at most {per_second} per second"
                    ))
                }
            }
            Translation::BarCheck => {
                let Some(config) = self.config else {
                    return Ok((v, String::new()));
                };
                let decoding = config.get(COMMAND).is_some_and(|b| b & COMMAND_MEMORY != 0);
                // With decode off the BAR decodes nothing: sizing and moves
                // are the device's business. With decode on, a sizing
                // write places the BAR at its size mask for a moment, so
                // it is judged like any other placement (one BAR sized at
                // a time, as OSes do, never conflicts).
                if !decoding {
                    return Ok((v, String::new()));
                }
                let reg_off = usize::from(reg.offset);
                let index = (reg_off - 0x10) / 4;
                // Other bits of a BAR (its type) are read-only.
                let value = (cur & !m) | v;
                let ranges = bars::decode(config, self.bar_sizes, Some((reg_off, value)));
                match bars::conflicts(&ranges, Some(index)) {
                    Ok(()) => Ok((v, String::new())),
                    Err(e) => Err(format!("with memory decode on, {e}")),
                }
            }
            Translation::DecodeCheck => {
                let Some(config) = self.config else {
                    return Ok((v, String::new()));
                };
                if v == 0 || c != 0 {
                    return Ok((v, String::new()));
                }
                match bars::check(config, self.bar_sizes) {
                    Ok(()) => Ok((v, String::new())),
                    Err(e) => Err(format!("memory decode stays off: {e}")),
                }
            }
        }
    }
}
