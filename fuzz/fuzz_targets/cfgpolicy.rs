//! The config-space policy engine under arbitrary guest writes: the NVMe PF
//! description bound to the mock PF, then any sequence of config and MSI-X
//! table writes in any host state. Must not panic; identity must not change;
//! a write that is not passed must leave an audit record.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tandem_cfgpolicy::mock::MockFunction;
use tandem_cfgpolicy::{Context, Description, Function, FunctionId, Policy, Verdict};

fn description() -> Arc<Description> {
    static DESC: OnceLock<Arc<Description>> = OnceLock::new();
    DESC.get_or_init(|| {
        let text = tandem_cfgpolicy::builtin("nvme-pf").expect("built in");
        Arc::new(Description::parse(text).expect("the shipped description parses"))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut m = MockFunction::nvme(true);
    let id = FunctionId {
        device: "fuzz".into(),
        function: Function::Pf,
    };
    let mut p = Policy::bind(description(), m.config(), id, m.bar_sizes()).expect("binds");
    let identity = m.read32(0);
    let mut now = 0u64;
    let mut allowed = false;
    let mut rest = data;
    // Each op: flags, offset (2 bytes), time step, length, bytes.
    while rest.len() >= 5 {
        let flags = rest[0];
        let off = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        now = now.saturating_add(u64::from(rest[3]) * 10_000_000);
        let n = usize::from(rest[4] % 9).min(rest.len() - 5);
        let bytes = &rest[5..5 + n];
        rest = &rest[5 + n..];
        let ctx = Context {
            now_ns: now,
            frozen: flags & 1 != 0,
            manage_vfs: flags & 2 != 0,
            num_vfs_ceiling: u16::from(flags >> 4),
        };
        let d = if flags & 4 != 0 {
            let entry = m.msix_entry((off % 0x110) / 16);
            match p.msix_table_write(&ctx, (off % 0x110) as u32, bytes, &entry) {
                Ok(d) => {
                    m.apply_msix(&d);
                    d
                }
                Err(_) => continue,
            }
        } else {
            match p.config_write(&ctx, m.config(), off, bytes) {
                Ok(d) => {
                    m.apply(&d);
                    d
                }
                Err(_) => continue,
            }
        };
        assert_eq!(d.bytes.len(), bytes.len());
        if d.verdict != Verdict::Pass {
            assert!(!d.audit.is_empty());
        }
        assert_eq!(m.read32(0), identity);
        // VF Enable and NumVFs only change while the guest may manage VFs.
        allowed |= ctx.manage_vfs;
        if !allowed {
            assert_eq!(m.read16(0x108) & 0x9, 0);
            assert_eq!(m.read16(0x110), 0);
        }
    }
});
