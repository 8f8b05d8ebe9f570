//! The hostile-guest suite, host side: what a guest can do to its
//! function's config space (raw writes of anything anywhere, as through
//! sysfs; BAR overlap; MSI address spoofing; VF enable from a VF; FLR
//! storms). Every attack must be denied, translated or ignored the way
//! hardware ignores it, and every denial or translation audited.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use common::*;
use tandem_cfgpolicy::mock::{MockFunction, PCIE_AT, PCIE_DEVCTL};
use tandem_cfgpolicy::{layout, AuditLog, Context, Function, Policy, Verdict};
use tandem_testkit::Rng;

/// Identity, capability chain and MSI-X table location: what a guest must
/// never change.
fn fixed_parts(c: &[u8]) -> (Vec<u8>, Vec<layout::Found>) {
    let mut id = c[0x00..0x04].to_vec();
    id.extend_from_slice(&c[0x08..0x0c]);
    id.extend_from_slice(&c[0x2c..0x30]);
    id.push(c[0x34]);
    (id, layout::walk(c).unwrap())
}

/// Every write pattern a guest with raw access could try: all-ones bytes
/// and dwords everywhere, then random writes of every width.
fn raw_writes(
    g: &mut Guarded,
    seed: u64,
    mut check: impl FnMut(&Guarded, &tandem_cfgpolicy::Decision),
) -> AuditLog {
    let mut log = AuditLog::new(100_000);
    let mut rng = Rng::new(seed);
    let mut writes: Vec<(usize, Vec<u8>)> = Vec::new();
    writes.extend((0..4096).map(|o| (o, vec![0xff])));
    writes.extend((0..4096).step_by(4).map(|o| (o, vec![0xff; 4])));
    for _ in 0..20_000 {
        let width = [1usize, 2, 4][(rng.next_u64() % 3) as usize];
        let off = (rng.next_u64() % (4096 / width as u64)) as usize * width;
        let v = rng.next_u64().to_le_bytes();
        writes.push((off, v[..width].to_vec()));
    }
    for (i, (off, bytes)) in writes.into_iter().enumerate() {
        g.ctx.now_ns = i as u64 * 1000;
        let d = g.write(off, &bytes);
        if d.verdict != Verdict::Pass {
            assert!(
                !d.audit.is_empty(),
                "{off:#x} {bytes:x?}: {:?} without audit",
                d.verdict
            );
        }
        check(g, &d);
        log.extend(d.audit);
    }
    log
}

#[test]
fn raw_writes_to_a_frozen_vf() {
    let mut g = Guarded::nvme(false);
    g.ctx.frozen = true;
    let before = fixed_parts(g.config.bytes());
    let log = raw_writes(&mut g, 0x5eed, |g, _| {
        let c = g.config.bytes();
        assert_eq!(
            g.config.command() & 0x6,
            0,
            "frozen: no bus master, no decode"
        );
        assert!(
            c[0x100..].iter().all(|b| *b == 0),
            "nothing appears in extended space"
        );
    });
    assert_eq!(fixed_parts(g.config.bytes()), before);
    let rules: std::collections::BTreeSet<&str> = log.records().map(|r| r.rule.as_str()).collect();
    for rule in ["ignore-if", "deny-if", "unclaimed", "read-only"] {
        assert!(rules.contains(rule), "no `{rule}` record among {rules:?}");
    }
}

#[test]
fn raw_writes_to_a_pf_that_may_not_manage_vfs() {
    let mut g = Guarded::nvme(true);
    let before = fixed_parts(g.config.bytes());
    let log = raw_writes(&mut g, 0xbad_c0de, |g, _| {
        assert_eq!(
            g.config.read16(0x108) & 0x9,
            0,
            "VF Enable and VF MSE stay off"
        );
        assert_eq!(g.config.read16(0x110), 0, "NumVFs stays 0");
        assert_eq!(
            g.config.read16(0x10e),
            NVME_TOTAL_VFS,
            "TotalVFs is read-only"
        );
        // Decode is never on over overlapping BARs or the MSI window.
        if g.config.command() & 0x2 != 0 {
            tandem_cfgpolicy::bars::check(g.config.bytes(), &nvme_bar_sizes()).unwrap();
        }
    });
    assert_eq!(fixed_parts(g.config.bytes()), before);
    assert!(log
        .records()
        .any(|r| r.register == "sriov.num-vfs" && r.rule == "deny-unless"));
    assert!(log
        .records()
        .any(|r| r.register == "sriov.control" && r.field == "vf-enable"));
    assert!(log.records().any(|r| r.rule == "power-state"));
}

#[test]
fn raw_writes_to_the_control_device() {
    let mut g = Guarded::control();
    let before = fixed_parts(g.config.bytes());
    raw_writes(&mut g, 42, |g, _| {
        if g.config.command() & 0x2 != 0 {
            tandem_cfgpolicy::bars::check(g.config.bytes(), &control_bar_sizes()).unwrap();
        }
    });
    assert_eq!(fixed_parts(g.config.bytes()), before);
}

#[test]
fn bar_overlap_sweep() {
    let mut g = Guarded::nvme(false);
    for (off, v) in [(0x10, 0xc000_0000), (0x14, 0), (0x20, 0xd000_0000)] {
        g.write32(off, v);
    }
    g.write16(0x04, 0x0002);
    let mut denied = 0;
    for base in (0xbfff_0000u32..0xc001_0000)
        .step_by(0x1000)
        .chain((0xfed0_0000..0xff00_0000).step_by(0x4000))
    {
        let d = g.write32(0x20, base);
        let bar4 = u64::from(base & !0x3fff);
        let hits_bar0 = bar4 < 0xc000_4000 && bar4 + 0x4000 > 0xc000_0000;
        let hits_msi = bar4 < 0xfef0_0000 && bar4 + 0x4000 > 0xfee0_0000;
        if hits_bar0 || hits_msi {
            assert_eq!(d.verdict, Verdict::Deny, "{base:#x}");
            assert_eq!(d.audit[0].rule, "bar-check");
            denied += 1;
        } else {
            assert_eq!(d.verdict, Verdict::Pass, "{base:#x}");
        }
        tandem_cfgpolicy::bars::check(g.config.bytes(), &nvme_bar_sizes()).unwrap();
    }
    assert!(denied > 64, "{denied}");
}

#[test]
fn msi_address_spoofing_sweep() {
    let mut m = MockFunction::nvme(true);
    let mut p = Policy::bind(
        desc("nvme-pf"),
        m.config(),
        fid(Function::Pf),
        m.bar_sizes(),
    )
    .unwrap();
    let ctx = Context::default();
    let mut rng = Rng::new(7);
    let mut denied = 0u32;
    for i in 0..5000u32 {
        let entry = (i % 17) * 16;
        let addr = if i % 3 == 0 {
            0xfee0_0000 | (rng.next_u64() as u32 & 0x000f_fff0)
        } else {
            rng.next_u64() as u32
        };
        let cur = m.msix_entry(entry as usize / 16);
        let d = p
            .msix_table_write(&ctx, entry, &addr.to_le_bytes(), &cur)
            .unwrap();
        m.apply_msix(&d);
        let ok = addr == 0 || addr & 0xfff0_0000 == 0xfee0_0000;
        assert_eq!(d.verdict == Verdict::Pass, ok, "{addr:#x}");
        if !ok {
            denied += 1;
            assert_eq!(d.audit.len(), 1);
        }
        let now = u32::from_le_bytes(m.msix_entry(entry as usize / 16)[..4].try_into().unwrap());
        assert!(
            now == 0 || now & 0xfff0_0000 == 0xfee0_0000,
            "{now:#x} got into the table"
        );
    }
    assert!(denied > 3000);
}

#[test]
fn vf_enable_from_a_vf_in_every_width() {
    let mut g = Guarded::nvme(false);
    g.ctx.manage_vfs = true; // even a VF's guest allowed to manage VFs has none to enable
    for off in 0x100..0x140 {
        for width in [1usize, 2, 4] {
            if off % width != 0 {
                continue;
            }
            let d = g.write(off, &vec![0xff; width]);
            assert_eq!(d.verdict, Verdict::Deny);
            assert_eq!(d.audit.len(), width, "one record per unclaimed byte");
        }
    }
    assert!(g.config.bytes()[0x100..].iter().all(|b| *b == 0));
}

#[test]
fn flr_storm_over_ten_seconds() {
    let mut m = MockFunction::nvme(false);
    let mut p = Policy::bind(
        desc("nvme-vf"),
        m.config(),
        fid(Function::Vf(3)),
        m.bar_sizes(),
    )
    .unwrap();
    let devctl = PCIE_AT + PCIE_DEVCTL;
    let mut log = AuditLog::new(256);
    let mut permitted_at = Vec::new();
    for i in 0..10_000u64 {
        let ctx = Context {
            now_ns: i * 1_000_000,
            ..Context::default()
        };
        let v = m.read16(devctl) | 0x8000;
        let d = p
            .config_write(&ctx, m.config(), devctl, &v.to_le_bytes())
            .unwrap();
        if d.verdict == Verdict::Pass {
            permitted_at.push(ctx.now_ns);
        } else {
            assert_eq!(d.verdict, Verdict::Deny);
        }
        m.apply(&d);
        log.extend(d.audit);
    }
    assert_eq!(m.flr_count as usize, permitted_at.len());
    assert_eq!(permitted_at.len(), 40, "4 a second for 10 seconds");
    // No second anywhere holds more than 4.
    for w in permitted_at.windows(5) {
        assert!(w[4] - w[0] >= 1_000_000_000, "{w:?}");
    }
    assert_eq!(log.len(), 256);
    assert_eq!(log.dropped(), 10_000 - 40 - 256);
}
