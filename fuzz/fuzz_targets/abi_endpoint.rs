//! The channel endpoint, host and guest roles, fed arbitrary message
//! sequences interleaved with its own requests and the clock.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_abi::channel::{Endpoint, Outcome, Role, DEFAULT_HOST_PARAMS};
use shared_abi::msg::{caps, encode, os, Kind};
use shared_abi::SUPPORTED;
use zerocopy::IntoBytes;

fuzz_target!(|data: &[u8]| {
    let mut host: Endpoint<4> = Endpoint::new(
        Role::Host,
        SUPPORTED,
        caps::ALL,
        DEFAULT_HOST_PARAMS,
        "h",
        0,
    );
    let mut guest: Endpoint<4> = Endpoint::new(
        Role::Guest,
        SUPPORTED,
        caps::ALL,
        DEFAULT_HOST_PARAMS,
        "g",
        0,
    );
    // Start from a real negotiation, so later input reaches the "up" paths.
    let mut buf = [0u8; 512];
    if let Ok((out, hello)) = guest.hello(os::LINUX, 0, 100) {
        let n = encode(&mut buf, &out, hello.as_bytes()).unwrap_or(0);
        if let Outcome::Reply { out, payload } = host.receive(&buf[..n], 0) {
            let mut r = [0u8; 512];
            let m = encode(&mut r, &out, payload.as_slice()).unwrap_or(0);
            let _ = guest.receive(&r[..m], 0);
        }
    }
    let mut now = 1u64;
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        let len = usize::from(op & 0x3f).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        now += u64::from(op >> 6) * 700;
        match op & 0xc0 {
            0x00 => {
                let _ = host.receive(chunk, now);
            }
            0x40 => {
                let _ = guest.receive(chunk, now);
            }
            0x80 => {
                let _ = host.begin(Kind::Ping, now, 50);
                let _ = guest.heartbeat_due(now).then(|| guest.heartbeat(now));
            }
            _ => {
                while host.expire(now).is_some() {}
                while guest.expire(now).is_some() {}
                let _ = host.peer_alive(now);
            }
        }
        assert!(host.outstanding() <= 4 && guest.outstanding() <= 4);
    }
});
