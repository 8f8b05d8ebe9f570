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
use tandem_volume::server::{serve, Volume, VolumeError};

struct Mem(std::sync::Mutex<Vec<u8>>);

impl Volume for Mem {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: 64 * 1024,
            readonly: false,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let o = usize::try_from(offset).map_err(|_| VolumeError::Closed)?;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let o = usize::try_from(offset).map_err(|_| VolumeError::Closed)?;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), VolumeError> {
        Ok(())
    }
}

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
    // The slice indexing in `Mem` panics on any out-of-bounds access the
    // server let through.
    let vol = Mem(std::sync::Mutex::new(vec![0; 64 * 1024]));
    serve(Conn(Cursor::new(data.to_vec())), &vol);
});
