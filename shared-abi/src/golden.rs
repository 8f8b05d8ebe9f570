//! Golden byte vectors: messages as they must look on the wire.
//!
//! [`check`] encodes each message from typed values and compares the bytes
//! with the vectors, then parses the vectors back. The host's tests run it
//! and so does the Linux module when it loads (it refuses to load on a
//! mismatch), so both builds of this code provably agree with each other
//! and with this file. A Windows driver author can test against the same
//! bytes.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::msg::{
    self, caps, encode, function, goodbye, os, parse, FunctionReport, FunctionRequest, Goodbye,
    Hello, HelloReply, Kind, Out, Status,
};
use super::ring::DEFAULT_GEOMETRY;
use super::version::AbiVersion;

const V1_0: AbiVersion = AbiVersion { major: 1, minor: 0 };
const V1_1: AbiVersion = AbiVersion { major: 1, minor: 1 };

/// `HELLO` from a Linux guest speaking 1.0 only, tag 1, timeout 1000 ms.
pub const HELLO: [u8; 72] = [
    0x54, 0x4e, 0x44, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x28, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00,
    0x00, //
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x2e, 0x31, 0x2e, 0x30, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// The host's successful reply: version 1.0, all 1.0 capabilities,
/// heartbeat every 1000 ms, timeout 5000 ms, session 0x1122334455667788.
pub const HELLO_REPLY: [u8; 88] = [
    0x54, 0x4e, 0x44, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x38, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x88, 0x13, 0x00,
    0x00, //
    0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x30, 0x2e, 0x31, 0x2e, 0x30, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// A `PING` request from the host with the payload "tandem", tag
/// 0x0102030405060708, timeout 250 ms.
pub const PING: [u8; 38] = [
    0x54, 0x4e, 0x44, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x06, 0x00, 0x00, 0x00, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0xfa, 0x00, 0x00,
    0x00, //
    0x74, 0x61, 0x6e, 0x64, 0x65, 0x6d,
];

/// The guest's `GOODBYE` event on unload.
pub const GOODBYE: [u8; 40] = [
    0x54, 0x4e, 0x44, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x04, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// ABI 1.1: the host asks the guest to quiesce the function at 0000:03:00.0
/// and wait up to 1000 ms for it to drain; tag 7, timeout 2000 ms.
pub const FUNCTION_QUIESCE: [u8; 56] = [
    0x54, 0x4e, 0x44, 0x4d, 0x01, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x18, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd0,
    0x07, //
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0xe8, 0x03, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// The guest's answer: present, bound to `nvme`, enabled, bus master,
/// MSI-X, quiesced and drained; one disk, nothing in flight, drained in
/// 250 us, the first quiesce.
pub const FUNCTION_REPORT: [u8; 72] = [
    0x54, 0x4e, 0x44, 0x4d, 0x01, 0x00, 0x01, 0x00, 0x06, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x28, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x7f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, //
    0x00, 0x00, 0x00, 0xfa, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x6e, 0x76, 0x6d,
    0x65, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// `RING_GEOMETRY` for the default 64 slots of 512 bytes.
pub const DEFAULT_GEOMETRY_REGISTER: u32 = 0x0200_0040;

fn hello() -> Hello {
    Hello {
        min_version: U32::new(V1_0.to_wire()),
        max_version: U32::new(V1_0.to_wire()),
        capabilities: U64::new(caps::ALL_V1_0),
        os: U32::new(os::LINUX),
        reserved: U32::new(0),
        driver_version: msg::version_field("0.1.0"),
    }
}

fn hello_reply() -> HelloReply {
    HelloReply {
        version: U32::new(V1_0.to_wire()),
        host_min_version: U32::new(V1_0.to_wire()),
        host_max_version: U32::new(V1_0.to_wire()),
        reserved: U32::new(0),
        capabilities: U64::new(caps::ALL_V1_0),
        heartbeat_interval_ms: U32::new(1000),
        heartbeat_timeout_ms: U32::new(5000),
        session: U64::new(0x1122_3344_5566_7788),
        host_version: msg::version_field("0.1.0"),
    }
}

fn same(
    name: &'static str,
    expected: &[u8],
    out: &Out,
    payload: &[u8],
) -> Result<(), &'static str> {
    let mut buf = [0u8; 128];
    let n = encode(&mut buf, out, payload).map_err(|_| name)?;
    if &buf[..n] != expected {
        return Err(name);
    }
    let m = parse(expected).map_err(|_| name)?;
    if m.kind != out.kind || m.tag != out.tag || m.status != out.status || m.payload != payload {
        return Err(name);
    }
    Ok(())
}

/// Checks every vector; returns how many, or the name of the first that
/// does not match.
pub fn check() -> Result<usize, &'static str> {
    same(
        "hello",
        &HELLO,
        &Out::request(V1_0, Kind::Hello, 1, 1000),
        hello().as_bytes(),
    )?;
    same(
        "hello-reply",
        &HELLO_REPLY,
        &Out::response(V1_0, Kind::Hello, 1, Status::Ok),
        hello_reply().as_bytes(),
    )?;
    same(
        "ping",
        &PING,
        &Out::request(V1_0, Kind::Ping, 0x0102_0304_0506_0708, 250),
        b"tandem",
    )?;
    let bye = Goodbye {
        reason: U32::new(goodbye::UNLOAD),
        reserved: U32::new(0),
    };
    same(
        "goodbye",
        &GOODBYE,
        &Out::event(V1_0, Kind::Goodbye),
        bye.as_bytes(),
    )?;
    let quiesce = FunctionRequest {
        op: U32::new(function::op::QUIESCE),
        segment: U16::new(0),
        bus: 3,
        devfn: 0,
        drain_ms: U32::new(1000),
        lease_ms: U32::new(0),
        policy: U32::new(0),
        volume: U32::new(0),
    };
    same(
        "function-quiesce",
        &FUNCTION_QUIESCE,
        &Out::request(V1_1, Kind::Function, 7, 2000),
        quiesce.as_bytes(),
    )?;
    use function::state as st;
    let report = FunctionReport {
        state: U32::new(
            st::PRESENT
                | st::BOUND
                | st::ENABLED
                | st::BUS_MASTER
                | st::MSIX
                | st::QUIESCED
                | st::DRAINED,
        ),
        power_state: U32::new(0),
        disks: U32::new(1),
        in_flight: U32::new(0),
        drain_us: U32::new(250),
        quiesces: U32::new(1),
        driver: msg::version_field("nvme"),
    };
    same(
        "function-report",
        &FUNCTION_REPORT,
        &Out::response(V1_1, Kind::Function, 7, Status::Ok),
        report.as_bytes(),
    )?;
    if DEFAULT_GEOMETRY.to_register() != DEFAULT_GEOMETRY_REGISTER {
        return Err("ring-geometry");
    }
    Ok(7)
}

#[cfg(test)]
mod tests {
    #[test]
    fn golden_vectors_hold() {
        assert_eq!(super::check(), Ok(7));
    }
}
