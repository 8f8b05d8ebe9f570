//! The description file: parsing it, and every check that needs no config
//! space (contradictions, unknown names, bad widths and offsets, bits or
//! bytes nobody described). The format is documented in the crate's
//! README; the types here are its compiled, checked form.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

/// Size of the type-0 header block.
pub const HEADER_SIZE: u16 = 0x40;
/// Size of one MSI-X table entry (the `msix-table` block).
pub const MSIX_ENTRY_SIZE: u16 = 16;
/// Longest translation chain a field may carry.
const MAX_CHAIN: usize = 8;
/// Largest FLR rate a description may allow.
const MAX_FLR_PER_SECOND: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum DescError {
    #[error("description is not valid TOML for this format: {0}")]
    Syntax(#[source] toml::de::Error),
    #[error("description: {0}")]
    Device(String),
    #[error("capability `{name}`: {msg}")]
    Capability { name: String, msg: String },
    #[error("register `{register}`: {msg}")]
    Register { register: String, msg: String },
    #[error("register `{register}`, field `{field}`: {msg}")]
    Field {
        register: String,
        field: String,
        msg: String,
    },
    #[error("registers `{first}` and `{second}` overlap at {block} offset {offset:#x}")]
    Overlap {
        first: String,
        second: String,
        block: String,
        offset: u16,
    },
    #[error("{block} offset {offset:#x} is not described by any register")]
    Gap { block: String, offset: u16 },
}

fn reg_err(register: &str, msg: impl Into<String>) -> DescError {
    DescError::Register {
        register: register.to_owned(),
        msg: msg.into(),
    }
}

/// Standard (list at 0x34) or extended (list at 0x100) capability.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CapKind {
    Standard,
    Extended,
}

impl fmt::Display for CapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapKind::Standard => "standard",
            CapKind::Extended => "extended",
        })
    }
}

/// A host state flag a rule can depend on. The set is fixed so that a
/// misspelt flag is a load error, not a rule that never fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFlag {
    /// The host froze the function (e.g. during a handoff).
    Frozen,
    /// The guest may manage SR-IOV VFs of this PF.
    ManageVfs,
}

impl HostFlag {
    fn parse(s: &str) -> Option<HostFlag> {
        match s {
            "frozen" => Some(HostFlag::Frozen),
            "manage-vfs" => Some(HostFlag::ManageVfs),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HostFlag::Frozen => "frozen",
            HostFlag::ManageVfs => "manage-vfs",
        }
    }
}

/// A ceiling the host supplies at write time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostLimit {
    /// How many VFs the guest may enable.
    NumVfsCeiling,
}

impl HostLimit {
    fn parse(s: &str) -> Option<HostLimit> {
        match s {
            "num-vfs-ceiling" => Some(HostLimit::NumVfsCeiling),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HostLimit::NumVfsCeiling => "num-vfs-ceiling",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Fixed(u32),
    Host(HostLimit),
}

/// One step of a translation chain (the fixed set a description may name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// `force-clear`: these bits are always written as 0.
    ForceClear(u32),
    /// `force-set`: these bits are always written as 1.
    ForceSet(u32),
    /// `clamp`: the field's value (as a number) is capped.
    Clamp(Limit),
    /// `ignore-unless`: without the flag the field keeps its value.
    IgnoreUnless(HostFlag),
    /// `ignore-if`: with the flag the field keeps its value.
    IgnoreIf(HostFlag),
    /// `deny-unless`: without the flag the write to the field is denied.
    DenyUnless(HostFlag),
    /// `deny-if`: with the flag the write to the field is denied.
    DenyIf(HostFlag),
    /// `msi-address-check`: a message address outside 0xfee0_0000..=0xfeef_ffff
    /// (other than 0, the reset value) is denied.
    MsiAddress,
    /// `msi-upper-address-check`: the upper 32 address bits must be 0.
    MsiUpperAddress,
    /// `msi-data-check`: delivery modes other than fixed and lowest
    /// priority (SMI, NMI, INIT, ExtINT) are denied.
    MsiData,
    /// `power-state`: only D0 and D3hot; D1/D2 are discarded like a
    /// function without them does.
    PowerState,
    /// `flr`: at most `per-second` Function Level Resets in any second.
    Flr { per_second: u32 },
    /// `bar-check`: with memory decode on, a BAR may not be moved onto
    /// another BAR or the MSI window.
    BarCheck,
    /// `decode-check`: memory decode may not be turned on while BARs
    /// overlap each other or the MSI window.
    DecodeCheck,
}

impl Translation {
    pub fn name(&self) -> &'static str {
        match self {
            Translation::ForceClear(_) => "force-clear",
            Translation::ForceSet(_) => "force-set",
            Translation::Clamp(_) => "clamp",
            Translation::IgnoreUnless(_) => "ignore-unless",
            Translation::IgnoreIf(_) => "ignore-if",
            Translation::DenyUnless(_) => "deny-unless",
            Translation::DenyIf(_) => "deny-if",
            Translation::MsiAddress => "msi-address-check",
            Translation::MsiUpperAddress => "msi-upper-address-check",
            Translation::MsiData => "msi-data-check",
            Translation::PowerState => "power-state",
            Translation::Flr { .. } => "flr",
            Translation::BarCheck => "bar-check",
            Translation::DecodeCheck => "decode-check",
        }
    }
}

/// What happens to a guest write of a system-wide field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteRule {
    Permit,
    Deny,
    Translate(Vec<Translation>),
}

/// The class of a group of bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// Guest writes are ignored, as hardware ignores writes to RO bits.
    ReadOnly,
    /// Passed to the device model unchanged.
    DeviceLocal,
    /// Affects the system: the write rule decides.
    SystemWide(WriteRule),
}

impl Class {
    pub fn name(&self) -> &'static str {
        match self {
            Class::ReadOnly => "read-only",
            Class::DeviceLocal => "device-local",
            Class::SystemWide(_) => "system-wide",
        }
    }
}

/// Bits of one register that share a class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// Bits within the register (bit 0 = lowest bit of the register).
    pub mask: u32,
    pub class: Class,
    /// Write-one-to-clear bits: leaving them alone means writing 0.
    pub w1c: bool,
}

/// Where a register lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Block {
    /// The type-0 header, 0x00..0x40.
    Header,
    /// A capability, by index into [`Description::capabilities`].
    Capability(usize),
    /// One MSI-X table entry (in a BAR, not config space), 16 bytes.
    MsixTable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    pub name: String,
    pub block: Block,
    /// Offset within the block.
    pub offset: u16,
    /// 1, 2 or 4 bytes.
    pub width: u8,
    /// Audit attempts to change read-only bits.
    pub audit: bool,
    /// Disjoint, and together they cover every bit of the register.
    pub fields: Vec<Field>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: String,
    pub kind: CapKind,
    pub id: u16,
    /// Bytes from the capability's header on.
    pub size: u16,
    /// Binding to a config space without it is refused.
    pub required: bool,
}

/// A checked description of one device type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    pub name: String,
    pub summary: String,
    pub capabilities: Vec<Capability>,
    pub registers: Vec<Register>,
}

// ---- The file format (raw, before checks). ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    device: RawDevice,
    #[serde(default)]
    capability: Vec<RawCapability>,
    #[serde(default)]
    register: Vec<RawRegister>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: String,
    #[serde(default)]
    summary: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapability {
    name: String,
    kind: CapKind,
    id: i64,
    size: i64,
    #[serde(default)]
    required: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The rule keys of a field or of a register (its default class).
struct RawRule {
    class: Option<String>,
    write: Option<String>,
    translation: Option<OneOrMany>,
    bits: Option<i64>,
    max: Option<i64>,
    max_from: Option<String>,
    flag: Option<String>,
    per_second: Option<i64>,
    w1c: bool,
}

// serde cannot combine `flatten` with `deny_unknown_fields`, and a
// misspelt key must be an error, so the rule keys are spelt out twice.
macro_rules! with_rule_keys {
    ($(#[$m:meta])* struct $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty,)* }) => {
        $(#[$m])*
        struct $name {
            $($(#[$fm])* $f: $t,)*
            class: Option<String>,
            write: Option<String>,
            translation: Option<OneOrMany>,
            bits: Option<i64>,
            max: Option<i64>,
            max_from: Option<String>,
            flag: Option<String>,
            per_second: Option<i64>,
            #[serde(default)]
            w1c: bool,
        }

        impl $name {
            fn take_rule(&mut self) -> RawRule {
                RawRule {
                    class: self.class.take(),
                    write: self.write.take(),
                    translation: self.translation.take(),
                    bits: self.bits,
                    max: self.max,
                    max_from: self.max_from.take(),
                    flag: self.flag.take(),
                    per_second: self.per_second,
                    w1c: self.w1c,
                }
            }
        }
    };
}

with_rule_keys! {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct RawField {
        name: String,
        mask: i64,
    }
}

with_rule_keys! {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct RawRegister {
        name: String,
        at: String,
        offset: i64,
        width: i64,
        #[serde(default)]
        audit: bool,
        #[serde(default)]
        field: Vec<RawField>,
    }
}

impl Description {
    /// Parses and checks a description. The error names the register (or
    /// capability) at fault.
    pub fn parse(text: &str) -> Result<Description, DescError> {
        let raw: RawFile = toml::from_str(text).map_err(DescError::Syntax)?;
        compile(raw)
    }

    /// Size in bytes of a block.
    pub fn block_size(&self, block: Block) -> u16 {
        match block {
            Block::Header => HEADER_SIZE,
            Block::MsixTable => MSIX_ENTRY_SIZE,
            Block::Capability(i) => self.capabilities.get(i).map_or(0, |c| c.size),
        }
    }

    /// A block's name for messages: `header`, `msix-table` or the
    /// capability's name.
    pub fn block_name(&self, block: Block) -> String {
        match block {
            Block::Header => "header".to_owned(),
            Block::MsixTable => "msix-table".to_owned(),
            Block::Capability(i) => self.capabilities.get(i).map_or_else(
                || format!("capability #{i}"),
                |c| format!("capability `{}`", c.name),
            ),
        }
    }

    /// Whether any register describes the MSI-X table.
    pub fn has_msix_table(&self) -> bool {
        self.registers.iter().any(|r| r.block == Block::MsixTable)
    }

    pub fn register(&self, name: &str) -> Option<&Register> {
        self.registers.iter().find(|r| r.name == name)
    }
}

fn to_u16(v: i64) -> Option<u16> {
    u16::try_from(v).ok()
}

fn compile(raw: RawFile) -> Result<Description, DescError> {
    if raw.device.name.trim().is_empty() {
        return Err(DescError::Device("[device] name is empty".into()));
    }
    let mut capabilities = Vec::new();
    let mut names = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for c in raw.capability {
        let err = |msg: String| DescError::Capability {
            name: c.name.clone(),
            msg,
        };
        if c.name == "header" || c.name == "msix-table" || c.name.is_empty() {
            return Err(err("this name is reserved or empty".into()));
        }
        if !names.insert(c.name.clone()) {
            return Err(err("declared twice".into()));
        }
        let (max_id, min_size, max_size) = match c.kind {
            CapKind::Standard => (0xff, 2, 0xc0),
            CapKind::Extended => (0xffff, 4, 0xf00),
        };
        let id = to_u16(c.id)
            .filter(|id| i64::from(*id) <= max_id)
            .ok_or_else(|| {
                err(format!(
                    "id {:#x} is out of range for a {} capability",
                    c.id, c.kind
                ))
            })?;
        if !ids.insert((c.kind, id)) {
            return Err(err(format!(
                "{} capability id {id:#x} is declared twice",
                c.kind
            )));
        }
        let size = to_u16(c.size)
            .filter(|s| (min_size..=max_size).contains(s))
            .ok_or_else(|| {
                err(format!(
                    "size {} is outside {min_size}..={max_size} for a {} capability",
                    c.size, c.kind
                ))
            })?;
        capabilities.push(Capability {
            name: c.name,
            kind: c.kind,
            id,
            size,
            required: c.required,
        });
    }

    let mut registers = Vec::new();
    let mut reg_names = BTreeSet::new();
    for mut r in raw.register {
        let rule = r.take_rule();
        let name = r.name.clone();
        if name.is_empty() {
            return Err(reg_err("", "register name is empty"));
        }
        if !reg_names.insert(name.clone()) {
            return Err(reg_err(&name, "declared twice"));
        }
        let block = match r.at.as_str() {
            "header" => Block::Header,
            "msix-table" => Block::MsixTable,
            other => Block::Capability(
                capabilities
                    .iter()
                    .position(|c| c.name == other)
                    .ok_or_else(|| {
                        reg_err(
                            &name,
                            format!("`at = \"{other}\"` names no declared capability"),
                        )
                    })?,
            ),
        };
        let width = match r.width {
            1 | 2 | 4 => r.width as u8,
            w => return Err(reg_err(&name, format!("width {w} is not 1, 2 or 4"))),
        };
        let offset = to_u16(r.offset)
            .ok_or_else(|| reg_err(&name, format!("offset {:#x} is out of range", r.offset)))?;
        if offset % u16::from(width) != 0 {
            return Err(reg_err(
                &name,
                format!("offset {offset:#x} is not aligned to its width {width}"),
            ));
        }
        let size = match block {
            Block::Header => HEADER_SIZE,
            Block::MsixTable => MSIX_ENTRY_SIZE,
            Block::Capability(i) => capabilities[i].size,
        };
        if u32::from(offset) + u32::from(width) > u32::from(size) {
            let b = match block {
                Block::Header => "the header".to_owned(),
                Block::MsixTable => "an MSI-X table entry".to_owned(),
                Block::Capability(i) => format!("capability `{}`", capabilities[i].name),
            };
            return Err(reg_err(
                &name,
                format!("offset {offset:#x} + width {width} is outside {b} ({size} bytes)"),
            ));
        }
        let full: u32 = if width == 4 {
            u32::MAX
        } else {
            (1u32 << (8 * width)) - 1
        };
        let mut fields = Vec::new();
        let mut covered = 0u32;
        let mut field_names = BTreeSet::new();
        for mut f in std::mem::take(&mut r.field) {
            let frule = f.take_rule();
            let ferr = |msg: String| DescError::Field {
                register: name.clone(),
                field: f.name.clone(),
                msg,
            };
            if f.name.is_empty() || !field_names.insert(f.name.clone()) {
                return Err(ferr("field name is empty or used twice".into()));
            }
            let mask = u32::try_from(f.mask)
                .ok()
                .filter(|m| *m != 0 && m & !full == 0)
                .ok_or_else(|| {
                    ferr(format!(
                        "mask {:#x} is empty or wider than the register",
                        f.mask
                    ))
                })?;
            if covered & mask != 0 {
                let bit = (covered & mask).trailing_zeros();
                return Err(ferr(format!("bit {bit} is given two classes")));
            }
            covered |= mask;
            let class = compile_rule(&frule, mask, block, offset, width)
                .map_err(ferr)?
                .ok_or_else(|| ferr("has no `class`".into()))?;
            fields.push(Field {
                name: f.name,
                mask,
                class,
                w1c: frule.w1c,
            });
        }
        let rest = full & !covered;
        match compile_rule(&rule, rest, block, offset, width).map_err(|m| reg_err(&name, m))? {
            Some(class) => {
                if rest == 0 {
                    return Err(reg_err(
                        &name,
                        "has a register-level `class` but its fields already cover every bit",
                    ));
                }
                let fname = if fields.is_empty() {
                    name.clone()
                } else {
                    "other-bits".to_owned()
                };
                fields.push(Field {
                    name: fname,
                    mask: rest,
                    class,
                    w1c: rule.w1c,
                });
            }
            None => {
                if rule.w1c {
                    return Err(reg_err(&name, "`w1c` without a register-level `class`"));
                }
                if rest != 0 {
                    return Err(reg_err(
                        &name,
                        format!("bits {rest:#x} have no class (add a field or a register-level `class`)"),
                    ));
                }
            }
        }
        registers.push(Register {
            name,
            block,
            offset,
            width,
            audit: r.audit,
            fields,
        });
    }

    let desc = Description {
        name: raw.device.name,
        summary: raw.device.summary,
        capabilities,
        registers,
    };
    check_coverage(&desc)?;
    Ok(desc)
}

/// Every byte of every declared block is owned by exactly one register.
fn check_coverage(desc: &Description) -> Result<(), DescError> {
    let mut blocks: BTreeMap<Block, Vec<Option<usize>>> = BTreeMap::new();
    blocks.insert(Block::Header, vec![None; usize::from(HEADER_SIZE)]);
    for (i, c) in desc.capabilities.iter().enumerate() {
        blocks.insert(Block::Capability(i), vec![None; usize::from(c.size)]);
    }
    if desc.has_msix_table() {
        blocks.insert(Block::MsixTable, vec![None; usize::from(MSIX_ENTRY_SIZE)]);
    }
    for (ri, r) in desc.registers.iter().enumerate() {
        let Some(owners) = blocks.get_mut(&r.block) else {
            continue;
        };
        for b in 0..u16::from(r.width) {
            let at = usize::from(r.offset + b);
            if let Some(slot) = owners.get_mut(at) {
                if let Some(prev) = *slot {
                    return Err(DescError::Overlap {
                        first: desc.registers[prev].name.clone(),
                        second: r.name.clone(),
                        block: desc.block_name(r.block),
                        offset: r.offset + b,
                    });
                }
                *slot = Some(ri);
            }
        }
    }
    for (block, owners) in &blocks {
        if let Some(at) = owners.iter().position(Option::is_none) {
            return Err(DescError::Gap {
                block: desc.block_name(*block),
                offset: at as u16,
            });
        }
    }
    Ok(())
}

/// Compiles a rule (a field's, or a register's default for its remaining
/// bits). `Ok(None)`: no class given (and no other rule key either).
fn compile_rule(
    rule: &RawRule,
    mask: u32,
    block: Block,
    offset: u16,
    width: u8,
) -> Result<Option<Class>, String> {
    let Some(class) = rule.class.as_deref() else {
        if rule.write.is_some()
            || rule.translation.is_some()
            || rule.bits.is_some()
            || rule.max.is_some()
            || rule.max_from.is_some()
            || rule.flag.is_some()
            || rule.per_second.is_some()
        {
            return Err("write rule given without `class`".into());
        }
        return Ok(None);
    };
    let class = match class {
        "read-only" | "device-local" => {
            if rule.write.is_some() || rule.translation.is_some() {
                return Err(format!(
                    "is `{class}` but has a write rule (only system-wide bits have one)"
                ));
            }
            if class == "read-only" && rule.w1c {
                return Err("is read-only and write-one-to-clear at once".into());
            }
            if class == "read-only" {
                Class::ReadOnly
            } else {
                Class::DeviceLocal
            }
        }
        "system-wide" => Class::SystemWide(compile_write(rule, mask, block, offset, width)?),
        other => {
            return Err(format!(
                "unknown class `{other}` (read-only, device-local or system-wide)"
            ))
        }
    };
    if !matches!(class, Class::SystemWide(WriteRule::Translate(_))) {
        for (key, set) in [
            ("bits", rule.bits.is_some()),
            ("max", rule.max.is_some()),
            ("max-from", rule.max_from.is_some()),
            ("flag", rule.flag.is_some()),
            ("per-second", rule.per_second.is_some()),
        ] {
            if set {
                return Err(format!(
                    "parameter `{key}` is given but no translation uses it"
                ));
            }
        }
    }
    Ok(Some(class))
}

fn compile_write(
    rule: &RawRule,
    mask: u32,
    block: Block,
    offset: u16,
    width: u8,
) -> Result<WriteRule, String> {
    let write = rule
        .write
        .as_deref()
        .ok_or("is system-wide but has no `write` (permit, deny or translate)")?;
    match write {
        "permit" | "deny" => {
            if rule.translation.is_some() {
                return Err(format!("`write = \"{write}\"` with a `translation`"));
            }
            return Ok(if write == "permit" {
                WriteRule::Permit
            } else {
                WriteRule::Deny
            });
        }
        "translate" => {}
        other => {
            return Err(format!(
                "unknown write rule `{other}` (permit, deny or translate)"
            ))
        }
    }
    let names: Vec<&str> = match &rule.translation {
        None => return Err("`write = \"translate\"` without a `translation`".into()),
        Some(OneOrMany::One(s)) => vec![s.as_str()],
        Some(OneOrMany::Many(v)) => v.iter().map(String::as_str).collect(),
    };
    if names.is_empty() || names.len() > MAX_CHAIN {
        return Err(format!("a translation chain has 1 to {MAX_CHAIN} steps"));
    }
    let mut used = BTreeSet::new();
    let mut uses = |key: &'static str, by: &str| -> Result<(), String> {
        if !used.insert(key) {
            return Err(format!(
                "parameter `{key}` is needed by two steps (`{by}` is the second)"
            ));
        }
        Ok(())
    };
    let flag = || -> Result<HostFlag, String> {
        let f = rule.flag.as_deref().ok_or("needs `flag`")?;
        HostFlag::parse(f).ok_or_else(|| format!("unknown host flag `{f}` (frozen, manage-vfs)"))
    };
    let shifted = mask.checked_shr(mask.trailing_zeros()).unwrap_or(0);
    let contiguous = shifted != 0 && shifted & shifted.wrapping_add(1) == 0;
    let mut chain = Vec::new();
    for name in names {
        let t = match name {
            "force-clear" | "force-set" => {
                uses("bits", name)?;
                let bits = rule
                    .bits
                    .and_then(|b| u32::try_from(b).ok())
                    .filter(|b| *b != 0 && b & !mask == 0)
                    .ok_or_else(|| format!("`{name}` needs `bits`, non-zero and inside the field's mask {mask:#x}"))?;
                if name == "force-clear" {
                    Translation::ForceClear(bits)
                } else {
                    Translation::ForceSet(bits)
                }
            }
            "clamp" => {
                if !contiguous {
                    return Err("`clamp` needs a field of contiguous bits".into());
                }
                let field_max = u64::from(mask >> mask.trailing_zeros());
                let limit = match (rule.max, rule.max_from.as_deref()) {
                    (Some(m), None) => {
                        uses("max", name)?;
                        let m = u32::try_from(m)
                            .ok()
                            .filter(|m| u64::from(*m) <= field_max)
                            .ok_or_else(|| format!("`max` {m} does not fit the field (largest {field_max})"))?;
                        Limit::Fixed(m)
                    }
                    (None, Some(f)) => {
                        uses("max-from", name)?;
                        Limit::Host(HostLimit::parse(f).ok_or_else(|| format!("unknown host limit `{f}` (num-vfs-ceiling)"))?)
                    }
                    _ => return Err("`clamp` needs exactly one of `max` and `max-from`".into()),
                };
                Translation::Clamp(limit)
            }
            "ignore-unless" | "ignore-if" | "deny-unless" | "deny-if" => {
                uses("flag", name)?;
                let f = flag().map_err(|e| format!("`{name}` {e}"))?;
                match name {
                    "ignore-unless" => Translation::IgnoreUnless(f),
                    "ignore-if" => Translation::IgnoreIf(f),
                    "deny-unless" => Translation::DenyUnless(f),
                    _ => Translation::DenyIf(f),
                }
            }
            "msi-address-check" | "msi-upper-address-check" | "msi-data-check" => {
                // MSI's data register is 16 bits, MSI-X's 32; addresses are 32.
                if width != 4 && !(name == "msi-data-check" && width == 2) {
                    return Err(format!("`{name}` applies to 4-byte registers (msi-data-check also 2-byte)"));
                }
                match name {
                    "msi-address-check" => Translation::MsiAddress,
                    "msi-upper-address-check" => Translation::MsiUpperAddress,
                    _ => Translation::MsiData,
                }
            }
            "power-state" => {
                if mask != 0b11 {
                    return Err("`power-state` applies to a field of mask 0x3 (PMCSR PowerState)".into());
                }
                Translation::PowerState
            }
            "flr" => {
                uses("per-second", name)?;
                if mask.count_ones() != 1 {
                    return Err("`flr` applies to a single bit (Initiate Function Level Reset)".into());
                }
                let n = rule
                    .per_second
                    .filter(|n| (1..=MAX_FLR_PER_SECOND).contains(n))
                    .ok_or_else(|| format!("`flr` needs `per-second` in 1..={MAX_FLR_PER_SECOND}"))?;
                Translation::Flr { per_second: n as u32 }
            }
            "bar-check" => {
                if block != Block::Header || !(0x10..=0x24).contains(&offset) || width != 4 {
                    return Err("`bar-check` applies to the header's BAR registers (0x10..=0x24, width 4)".into());
                }
                Translation::BarCheck
            }
            "decode-check" => {
                if block != Block::Header || offset != 0x04 || mask != 0x2 {
                    return Err("`decode-check` applies to the command register's Memory Space bit (header 0x04, mask 0x2)".into());
                }
                Translation::DecodeCheck
            }
            other => {
                return Err(format!(
                    "unknown translation `{other}` (known: force-clear, force-set, clamp, \
                     ignore-unless, ignore-if, deny-unless, deny-if, msi-address-check, msi-upper-address-check, \
                     msi-data-check, power-state, flr, bar-check, decode-check)"
                ))
            }
        };
        chain.push(t);
    }
    for (key, set) in [
        ("bits", rule.bits.is_some()),
        ("max", rule.max.is_some()),
        ("max-from", rule.max_from.is_some()),
        ("flag", rule.flag.is_some()),
        ("per-second", rule.per_second.is_some()),
    ] {
        if set && !used.contains(key) {
            return Err(format!(
                "parameter `{key}` is given but no translation uses it"
            ));
        }
    }
    Ok(WriteRule::Translate(chain))
}
