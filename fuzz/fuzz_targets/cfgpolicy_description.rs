//! Arbitrary description files, and arbitrary config space images under
//! the shipped descriptions: parsing, checking and binding must refuse bad
//! input with an error, never panic or hang.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tandem_cfgpolicy::mock::MockFunction;
use tandem_cfgpolicy::{Context, Description, Function, FunctionId, Policy};

fn exercise(desc: Arc<Description>, image: &[u8], writes: &[u8]) {
    let id = FunctionId {
        device: "fuzz".into(),
        function: Function::Single,
    };
    let Ok(mut p) = Policy::bind(desc, image, id, [0x4000, 0, 0x1000, 0, 0x4000, 0]) else {
        return;
    };
    let ctx = Context::default();
    for w in writes.chunks(4) {
        let off = usize::from(w[0]) * 16 + w.len();
        let _ = p.config_write(&ctx, image, off % image.len(), w);
        let _ = p.msix_table_write(&ctx, u32::from(w[0]), w, &[0; 16]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // A description from the fuzzer.
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(desc) = Description::parse(text) {
            let desc = Arc::new(desc);
            exercise(desc.clone(), MockFunction::nvme(true).config(), &[0xff; 64]);
            exercise(desc, MockFunction::nvme(false).config(), &[0x00; 64]);
        }
    } else {
        // A config space image from the fuzzer, under each shipped description.
        let mut image = vec![0u8; if mode & 2 == 0 { 4096 } else { 256 }];
        let n = rest.len().min(image.len());
        image[..n].copy_from_slice(&rest[..n]);
        for (_, text) in tandem_cfgpolicy::DESCRIPTIONS {
            let desc = Arc::new(Description::parse(text).expect("shipped descriptions parse"));
            exercise(desc, &image, &rest[n..]);
        }
    }
});
