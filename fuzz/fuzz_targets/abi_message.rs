//! Every byte string through the ABI's message parser and payload readers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_abi::msg::{self, encode, parse, Goodbye, Heartbeat, Hello, HelloReply, Out};
use shared_abi::ring::RingGeometry;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse(data) {
        // What parses must re-encode to the same header and payload.
        assert!(m.payload.len() <= data.len());
        let _ = msg::payload::<Hello>(m.payload);
        let _ = msg::payload::<HelloReply>(m.payload);
        let _ = msg::payload::<Heartbeat>(m.payload);
        let _ = msg::payload::<Goodbye>(m.payload);
        let out = Out {
            version: m.version,
            kind: m.kind,
            response: m.response,
            status: m.status,
            tag: m.tag,
            timeout_ms: m.timeout_ms,
        };
        let mut buf = vec![0u8; 32 + m.payload.len()];
        let n = encode(&mut buf, &out, m.payload).expect("fits");
        let again = parse(&buf[..n]).expect("re-parses");
        assert_eq!(again.payload, m.payload);
        assert_eq!(again.tag, m.tag);
    }
    if data.len() >= 12 {
        let reg = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let p = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        let c = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if let Ok(g) = RingGeometry::from_register(reg).validate() {
            if let Ok(u) = g.used(p, c) {
                assert!(u <= g.slot_count);
                assert!(g.slot_offset(p) + g.slot_size as usize <= g.ring_bytes());
            }
        }
    }
});
