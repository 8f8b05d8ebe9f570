//! The volume socket's wire format (`tandem-volume`): arbitrary hello,
//! request and response headers, and a server fed an arbitrary byte
//! stream over an in-memory volume, which must answer or hang up, never
//! panic, and never touch the volume outside its bounds.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use tandem_volume::proto::{
    Geometry, Request, Response, HELLO_LEN, REQUEST_LEN, RESPONSE_LEN,
};
use tandem_volume::server::{serve, Memory};

/// A connection: reads come from the fuzzer's bytes, writes are dropped.
struct Conn(Cursor<Vec<u8>>);

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = <[u8; HELLO_LEN]>::try_from(data.get(..HELLO_LEN).unwrap_or(&[])) {
        if let Ok(g) = Geometry::decode(&h) {
            assert_eq!(Geometry::decode(&g.encode()), Ok(g));
        }
    }
    if let Ok(h) = <[u8; REQUEST_LEN]>::try_from(data.get(..REQUEST_LEN).unwrap_or(&[])) {
        if let Ok(r) = Request::decode(&h) {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }
    if let Ok(h) = <[u8; RESPONSE_LEN]>::try_from(data.get(..RESPONSE_LEN).unwrap_or(&[])) {
        if let Ok(r) = Response::decode(&h) {
            assert_eq!(Response::decode(&r.encode()), Ok(r));
        }
    }
    // `Memory` indexes its buffer: any out-of-bounds access the server
    // let through panics.
    let vol = Memory::new(64 * 1024, false);
    serve(Conn(Cursor::new(data.to_vec())), &vol);
});
