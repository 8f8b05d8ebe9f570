//! VM configuration files and command-line values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_vmm::config::{parse_abi_range, parse_disk_flag, parse_serial, parse_size_mib};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = toml::from_str::<tandem_vmm::VmConfig>(s);
        let _ = parse_disk_flag(s);
        let _ = parse_size_mib(s);
        let _ = parse_serial(s);
        let _ = parse_abi_range(s);
    }
});
