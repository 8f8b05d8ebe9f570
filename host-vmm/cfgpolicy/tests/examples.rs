//! The examples the issue lists, each through the shipped descriptions
//! and a device model that behaves like hardware (tandem-pci's, or the
//! crate's mock where the MSI-X table or FLR is needed).
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use common::*;
use tandem_cfgpolicy::mock::{MockFunction, PCIE_AT, PCIE_DEVCTL};
use tandem_cfgpolicy::{
    AuditAction, AuditLog, Context, Description, Function, FunctionId, Outcome, Policy, Space,
    Verdict,
};

#[test]
fn bar_sizing_and_programming_pass_through() {
    let mut g = Guarded::nvme(true);
    for off in [0x10, 0x14, 0x20] {
        let d = g.write32(off, u32::MAX);
        assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
        assert!(d.audit.is_empty());
    }
    // The device answers sizing with its size masks.
    assert_eq!(g.config.read32(0x10), 0xffff_c004);
    assert_eq!(g.config.read32(0x14), 0xffff_ffff);
    assert_eq!(g.config.read32(0x20), 0xffff_c000);
    // Program BAR0/1 above 4 GiB and BAR4 below, then turn decode on.
    for (off, v) in [(0x10, 0), (0x14, 1), (0x20, 0xfe00_0000)] {
        assert_eq!(g.write32(off, v).verdict, Verdict::Pass);
    }
    assert_eq!(g.config.read32(0x14), 1);
    assert_eq!(g.write16(0x04, 0x0006).verdict, Verdict::Pass);
    assert_eq!(g.config.command() & 0x6, 0x6);
    // With decode on, sizing and moving to free space still pass.
    assert_eq!(g.write32(0x20, u32::MAX).verdict, Verdict::Pass);
    assert_eq!(g.config.read32(0x20), 0xffff_c000);
    assert_eq!(g.write32(0x20, 0xfd00_0000).verdict, Verdict::Pass);
    assert_eq!(g.config.read32(0x20), 0xfd00_0000);
}

#[test]
fn bar_overlap_and_the_msi_window_are_refused() {
    let mut g = Guarded::nvme(false);
    for (off, v) in [(0x10, 0xfe00_0000), (0x14, 0), (0x20, 0xfd00_0000)] {
        g.write32(off, v);
    }
    assert_eq!(g.write16(0x04, 0x0002).verdict, Verdict::Pass);
    // BAR4 onto BAR0's 16 KiB.
    let d = g.write32(0x20, 0xfe00_2000);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.audit.len(), 1);
    let r = &d.audit[0];
    assert_eq!(
        (r.register.as_str(), r.rule.as_str()),
        ("bar4", "bar-check")
    );
    assert!(
        r.reason.contains("BAR4") && r.reason.contains("overlaps BAR0"),
        "{}",
        r.reason
    );
    assert_eq!((r.written, r.applied), (0xfe00_2000, 0xfd00_0000));
    assert_eq!(g.config.read32(0x20), 0xfd00_0000);
    // BAR4 into the MSI window.
    let d = g.write32(0x20, 0xfee0_0000);
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(
        d.audit[0].reason.contains("MSI window"),
        "{}",
        d.audit[0].reason
    );
    // With decode off BARs may pass through each other (an OS moving
    // them does), but decode cannot go on over an overlap.
    g.write16(0x04, 0);
    assert_eq!(g.write32(0x20, 0xfe00_0000).verdict, Verdict::Pass);
    let d = g.write16(0x04, 0x0006);
    assert_eq!(d.verdict, Verdict::Translate);
    assert_eq!(d.bytes, vec![0x04, 0x00]);
    assert_eq!(
        g.config.command(),
        0x0004,
        "bus master on, memory decode off"
    );
    assert_eq!(d.audit.len(), 1);
    assert_eq!(
        (d.audit[0].field.as_str(), d.audit[0].rule.as_str()),
        ("memory-space", "decode-check")
    );
    let outcomes: Vec<(&str, Outcome)> = d
        .fields
        .iter()
        .map(|f| (f.field.as_str(), f.outcome))
        .collect();
    assert!(outcomes.contains(&("memory-space", Outcome::Denied)));
    assert!(outcomes.contains(&("bus-master", Outcome::Passed)));
    // The caller's own hook says the same.
    assert!(tandem_cfgpolicy::bars::check(g.config.bytes(), &nvme_bar_sizes()).is_err());
}

#[test]
fn msix_address_and_data_spoofing_is_denied_and_audited() {
    let mut m = MockFunction::nvme(false);
    let mut p = Policy::bind(
        desc("nvme-vf"),
        m.config(),
        fid(Function::Vf(1)),
        m.bar_sizes(),
    )
    .unwrap();
    let ctx = Context::default();
    let mut log = AuditLog::new(64);
    let mut put = |m: &mut MockFunction, off: u32, bytes: &[u8]| {
        let entry = m.msix_entry(off as usize / 16);
        let d = p.msix_table_write(&ctx, off, bytes, &entry).unwrap();
        m.apply_msix(&d);
        log.extend(d.audit.clone());
        d
    };
    // What Linux writes for vector 3: address, upper address, data, unmask.
    for (off, v) in [
        (0x30, 0xfee0_1000u32),
        (0x34, 0),
        (0x38, 0x0000_0041),
        (0x3c, 0),
    ] {
        let d = put(&mut m, off, &v.to_le_bytes());
        assert_eq!(d.verdict, Verdict::Pass, "{off:#x}: {d:?}");
    }
    let good = m.msix_entry(3);
    // Spoofed addresses (HPET, guest RAM, above 4 GiB, one byte changed)
    // and delivery modes (SMI, NMI, INIT).
    let attacks: [(u32, Vec<u8>, &str); 7] = [
        (
            0x30,
            0xfed0_0000u32.to_le_bytes().to_vec(),
            "msi-address-check",
        ),
        (
            0x30,
            0x8000_0000u32.to_le_bytes().to_vec(),
            "msi-address-check",
        ),
        (0x34, 1u32.to_le_bytes().to_vec(), "msi-upper-address-check"),
        (0x33, vec![0x12], "msi-address-check"),
        (
            0x38,
            0x0000_0241u32.to_le_bytes().to_vec(),
            "msi-data-check",
        ),
        (
            0x38,
            0x0000_0441u32.to_le_bytes().to_vec(),
            "msi-data-check",
        ),
        (0x39, vec![0x05], "msi-data-check"),
    ];
    for (off, bytes, rule) in attacks {
        let d = put(&mut m, off, &bytes);
        assert_eq!(d.verdict, Verdict::Deny, "{off:#x}");
        assert_eq!(d.audit.len(), 1);
        let r = &d.audit[0];
        assert_eq!(r.rule, rule);
        assert_eq!(r.space, Space::MsixTable);
        assert!(r.register.ends_with("[3]"), "{}", r.register);
        assert_eq!(r.offset, off & !3);
    }
    assert_eq!(m.msix_entry(3), good, "the entry is untouched");
    assert_eq!(log.len(), 7);
    let json = serde_json::to_value(&log).unwrap();
    assert_eq!(
        json["records"][0]["register"],
        "msix-table.message-address[3]"
    );
    assert_eq!(json["records"][0]["action"], "denied");
    assert_eq!(json["records"][0]["function"]["function"]["vf"], 1);
    // A write crossing entries is refused outright.
    assert!(p.msix_table_write(&ctx, 0x3e, &[0; 4], &good).is_err());
}

/// MSI (not MSI-X) keeps its address in config space; the same checks
/// apply there, wherever the capability sits.
#[test]
fn msi_capability_address_spoofing_is_denied() {
    let text = format!(
        "{}\n{}",
        tandem_cfgpolicy::builtin("control").unwrap(),
        r#"
[[capability]]
name = "msi"
kind = "standard"
id = 0x05
size = 14

[[register]]
name = "msi.header"
at = "msi"
offset = 0x0
width = 2
class = "read-only"

[[register]]
name = "msi.control"
at = "msi"
offset = 0x2
width = 2
class = "read-only"
[[register.field]]
name = "enable"
mask = 0x0001
class = "device-local"

[[register]]
name = "msi.address"
at = "msi"
offset = 0x4
width = 4
class = "system-wide"
write = "translate"
translation = "msi-address-check"

[[register]]
name = "msi.upper-address"
at = "msi"
offset = 0x8
width = 4
class = "system-wide"
write = "translate"
translation = "msi-upper-address-check"

[[register]]
name = "msi.data"
at = "msi"
offset = 0xc
width = 2
class = "system-wide"
write = "translate"
translation = "msi-data-check"
"#
    );
    let desc = std::sync::Arc::new(Description::parse(&text).unwrap());
    let mut c = control_config();
    let at = c
        .add_capability(
            0x05,
            &[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[
                0x01, 0, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        )
        .unwrap();
    let id = FunctionId {
        device: "control".into(),
        function: Function::Single,
    };
    let mut p = Policy::bind(desc, c.bytes(), id, control_bar_sizes()).unwrap();
    let ctx = Context::default();
    let d = p
        .config_write(&ctx, c.bytes(), at + 4, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    assert_eq!(d.verdict, Verdict::Pass);
    c.write(at + 4, &d.bytes);
    let d = p
        .config_write(&ctx, c.bytes(), at + 4, &0xdead_0000u32.to_le_bytes())
        .unwrap();
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.audit[0].register, "msi.address");
    assert_eq!(d.audit[0].offset, at as u32 + 4);
    let d = p
        .config_write(&ctx, c.bytes(), at + 0xc, &0x0400u16.to_le_bytes())
        .unwrap();
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.audit[0].reason.contains("NMI"));
}

#[test]
fn bus_master_and_memory_enable_follow_the_freeze_flag() {
    let mut g = Guarded::nvme(false);
    assert_eq!(g.write16(0x04, 0x0006).verdict, Verdict::Pass);
    assert_eq!(g.config.command(), 0x0006);
    g.write16(0x04, 0);
    g.ctx.frozen = true;
    let d = g.write16(0x04, 0x0006);
    assert_eq!(d.verdict, Verdict::Deny);
    let fields: Vec<&str> = d.audit.iter().map(|r| r.field.as_str()).collect();
    assert_eq!(fields, vec!["memory-space", "bus-master"]);
    assert!(d
        .audit
        .iter()
        .all(|r| r.rule == "ignore-if" && r.action == AuditAction::Translated));
    assert_eq!(g.config.command(), 0);
    // Other bits of the same write still reach the device.
    let d = g.write16(0x04, 0x0404);
    assert_eq!(d.verdict, Verdict::Translate);
    assert_eq!(d.overridden, vec![0x04, 0x00]);
    assert_eq!(g.config.command(), 0x0400);
    g.ctx.frozen = false;
    assert_eq!(g.write16(0x04, 0x0406).verdict, Verdict::Pass);
    // While frozen the guest cannot turn them off either.
    g.ctx.frozen = true;
    assert_eq!(g.write16(0x04, 0x0400).verdict, Verdict::Deny);
    assert_eq!(g.config.command(), 0x0406);
}

#[test]
fn power_state_allows_d0_and_d3hot_only() {
    let mut g = Guarded::nvme(true);
    let pmcsr = g.cap("pm") + 4;
    let d = g.write16(pmcsr, 0x0003);
    assert_eq!(d.verdict, Verdict::Pass);
    assert_eq!(g.config.read16(pmcsr) & 3, 3);
    assert_eq!(g.write16(pmcsr, 0).verdict, Verdict::Pass);
    assert_eq!(g.config.read16(pmcsr) & 3, 0);
    for state in [1u16, 2] {
        let d = g.write16(pmcsr, state);
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.audit[0].register, "pm.pmcsr");
        assert_eq!(d.audit[0].rule, "power-state");
        assert!(d.audit[0].reason.contains(&format!("D{state}")));
        assert_eq!(g.config.read16(pmcsr) & 3, 0);
    }
}

#[test]
fn sriov_control_written_from_a_vf_is_denied() {
    let mut g = Guarded::nvme(false);
    // Where the PF's SR-IOV capability would be: header, VF Enable, NumVFs.
    for (off, bytes) in [
        (0x100, vec![0x10, 0, 1, 0]),
        (0x108, vec![1, 0]),
        (0x110, vec![8, 0]),
    ] {
        let d = g.write(off, &bytes);
        assert_eq!(d.verdict, Verdict::Deny, "{off:#x}");
        assert!(d
            .audit
            .iter()
            .all(|r| r.register == "unclaimed" && r.action == AuditAction::Denied));
        assert_eq!(d.audit[0].offset, off as u32);
        assert!(g.config.bytes()[off..off + bytes.len()]
            .iter()
            .all(|b| *b == 0));
    }
    // The VF's own controls exist.
    assert_eq!(g.write16(0x04, 0x0004).verdict, Verdict::Pass);
    let devctl = g.cap("pcie") + 8;
    let cur = g.config.read16(devctl);
    let d = g.write16(devctl, cur | 0x8000);
    assert_eq!(d.verdict, Verdict::Pass, "one FLR is fine");
}

#[test]
fn num_vfs_is_clamped_and_vf_enable_needs_permission() {
    let mut g = Guarded::nvme(true);
    g.ctx = Context {
        manage_vfs: true,
        num_vfs_ceiling: 4,
        ..Context::default()
    };
    let d = g.write16(0x110, 8);
    assert_eq!(d.verdict, Verdict::Translate);
    assert_eq!(d.bytes, vec![4, 0]);
    assert_eq!(g.config.read16(0x110), 4);
    let r = &d.audit[0];
    assert_eq!(
        (r.register.as_str(), r.rule.as_str(), r.written, r.applied),
        ("sriov.num-vfs", "clamp", 8, 4)
    );
    assert_eq!(r.action, AuditAction::Translated);
    assert_eq!(g.write16(0x110, 2).verdict, Verdict::Pass);
    assert_eq!(g.write16(0x108, 0x0009).verdict, Verdict::Pass);
    assert_eq!(g.config.read16(0x108) & 9, 9);
    g.ctx.manage_vfs = false;
    let d = g.write16(0x108, 0);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.audit.len(), 2);
    assert!(d
        .audit
        .iter()
        .all(|r| r.rule == "deny-unless" && r.reason.contains("manage-vfs")));
    assert_eq!(g.config.read16(0x108) & 9, 9);
    let d = g.write16(0x110, 1);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(g.config.read16(0x110), 2);
}

#[test]
fn flr_storm_is_rate_limited() {
    let mut m = MockFunction::nvme(true);
    let mut p = Policy::bind(
        desc("nvme-pf"),
        m.config(),
        fid(Function::Pf),
        m.bar_sizes(),
    )
    .unwrap();
    let devctl = PCIE_AT + PCIE_DEVCTL;
    let mut ctx = Context {
        now_ns: 5_000_000_000,
        ..Context::default()
    };
    let mut log = AuditLog::new(1000);
    let mut flr = |m: &mut MockFunction, ctx: &Context, log: &mut AuditLog| {
        let v = m.read16(devctl) | 0x8000;
        let d = p
            .config_write(ctx, m.config(), devctl, &v.to_le_bytes())
            .unwrap();
        m.apply(&d);
        log.extend(d.audit);
    };
    for _ in 0..100 {
        ctx.now_ns += 1_000_000;
        flr(&mut m, &ctx, &mut log);
    }
    assert_eq!(m.flr_count, 4, "the description allows 4 a second");
    assert_eq!(log.len(), 96);
    assert!(log.records().all(|r| r.rule == "flr"
        && r.field == "initiate-flr"
        && r.register == "pcie.device-control"));
    assert_eq!(log.records().next().unwrap().time_ns, 5_005_000_000);
    // A second after the first ones, FLR is allowed again.
    ctx.now_ns += 1_000_000_000;
    flr(&mut m, &ctx, &mut log);
    assert_eq!(m.flr_count, 5);
}

#[test]
fn no_flr_or_power_change_while_frozen() {
    let mut g = Guarded::nvme(false);
    g.ctx.frozen = true;
    let devctl = g.cap("pcie") + 8;
    let cur = g.config.read16(devctl);
    let d = g.write16(devctl, cur | 0x8000);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        (d.audit[0].field.as_str(), d.audit[0].rule.as_str()),
        ("initiate-flr", "deny-if")
    );
    assert!(d.audit[0].reason.contains("frozen"));
    // Other device control bits still reach the device.
    let d = g.write16(devctl, (cur ^ 0x0010) | 0x8000);
    assert_eq!(d.verdict, Verdict::Translate);
    assert_eq!(g.config.read16(devctl), cur ^ 0x0010);
    let pmcsr = g.cap("pm") + 4;
    assert_eq!(g.write16(pmcsr, 3).verdict, Verdict::Deny);
    assert_eq!(g.config.read16(pmcsr) & 3, 0);
    g.ctx.frozen = false;
    assert_eq!(g.write16(pmcsr, 3).verdict, Verdict::Pass);
}

#[test]
fn read_only_bits_keep_their_value_and_audited_registers_say_so() {
    let mut g = Guarded::control();
    let d = g.write16(0x00, 0xdead);
    assert_eq!(d.verdict, Verdict::Pass, "hardware ignores it too");
    assert_eq!(d.bytes, vec![0xf4, 0x1a]);
    assert_eq!(d.audit.len(), 1);
    assert_eq!(
        (d.audit[0].register.as_str(), d.audit[0].action),
        ("vendor-id", AuditAction::ReadOnly)
    );
    assert_eq!(g.config.read16(0x00), 0x1af4);
    // Not audited: the latency timer.
    let d = g.write(0x0d, &[0x40]);
    assert!(d.audit.is_empty());
    // Status error bits are write-one-to-clear and device-local.
    g.config.set_status_bits(1 << 13);
    let d = g.write32(0x04, 0xffff_0006);
    assert_eq!(d.verdict, Verdict::Pass);
    assert_eq!(g.config.read16(0x06) & (1 << 13), 0);
    assert_ne!(
        g.config.read16(0x06) & (1 << 4),
        0,
        "capability list bit stays"
    );
    assert_eq!(g.config.command() & 0x6, 0x6);
}

#[test]
fn bad_accesses_are_errors_not_panics() {
    let mut g = Guarded::control();
    let img = g.config.bytes().to_vec();
    let ctx = Context::default();
    assert!(g.policy.config_write(&ctx, &img, 4095, &[0, 0]).is_err());
    assert!(g.policy.config_write(&ctx, &img, usize::MAX, &[0]).is_err());
    assert!(g.policy.config_write(&ctx, &img, 0, &[]).is_err());
    assert!(g.policy.config_write(&ctx, &img[..256], 0, &[0]).is_err());
}
