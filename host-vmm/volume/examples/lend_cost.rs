//! What lending costs per request, against the volume called directly in
//! the same run: a 4 KiB write through the volume socket (the client's
//! handoff core, the lender's gate and its sender-gone check) and the
//! sender-gone check (`poll(2)` on the connection) alone. The floor is a
//! bare socket round trip of the same bytes to a thread that only answers.
//!
//! `cargo run --release -p tandem-volume --example lend_cost [-- N]`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tandem_volume::proto::{Geometry, REQUEST_LEN, RESPONSE_LEN};
use tandem_volume::server::{sender_gone, VolumeError};
use tandem_volume::{listen, RemoteVolume, Volume};

const SIZE: usize = 64 << 20;
const BLOCK: usize = 4096;

/// A volume in memory: the cheapest backend, so what is measured is the
/// lending path itself.
struct Ram(Mutex<Vec<u8>>);

impl Volume for Ram {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: SIZE as u64,
            readonly: false,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let d = self.0.lock().map_err(|_| VolumeError::Closed)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
        let mut d = self.0.lock().map_err(|_| VolumeError::Closed)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), VolumeError> {
        Ok(())
    }
}

/// Mean microseconds per call of `f` over `n` calls (the i-th call gets i).
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Mean microseconds of a round trip of a request's bytes (header and
/// data) and a response's header over a socket pair, the far end a thread
/// that does nothing else.
fn bare_round_trips(n: usize) -> std::io::Result<f64> {
    let (mut near, mut far) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut msg = vec![0u8; REQUEST_LEN + BLOCK];
        for _ in 0..n {
            far.read_exact(&mut msg)?;
            far.write_all(&msg[..RESPONSE_LEN])?;
        }
        Ok(())
    });
    let head = [0u8; REQUEST_LEN];
    let data = [0x5a_u8; BLOCK];
    let mut answer = [0u8; RESPONSE_LEN];
    let mut res = Ok(());
    let us = per_call(n, |_| {
        if res.is_ok() {
            res = near
                .write_all(&head)
                .and_then(|()| near.write_all(&data))
                .and_then(|()| near.read_exact(&mut answer));
        }
    });
    res?;
    echo.join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(us)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("N must be a count: {e}"))?,
        None => 20_000,
    };
    if n == 0 {
        return Err("N must be at least 1".into());
    }
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("v.sock");
    let ram = Arc::new(Ram(Mutex::new(vec![0; SIZE])));
    let _lending = listen(&sock, ram.clone())?;
    let remote = RemoteVolume::connect(&sock)?;
    let buf = [0x5a_u8; BLOCK];
    let at = |i: usize| ((i * BLOCK) % SIZE) as u64;

    // Warm both paths (page faults on the buffer, the lender's thread).
    for i in 0..1000.min(n) {
        remote.write_at(&buf, at(i))?;
    }
    let mut err = None;
    let lent = per_call(n, |i| {
        if let Err(e) = remote.write_at(&buf, at(i)) {
            err.get_or_insert(e);
        }
    });
    if let Some(e) = err {
        return Err(format!("a lent write failed: {e}").into());
    }
    let direct = per_call(n, |i| {
        ram.write_at(&buf, at(i)).expect("a write to memory");
    });
    let floor = bare_round_trips(n)?;
    let (a, _b) = UnixStream::pair()?;
    let mut gone = false;
    let check = per_call(n, |_| gone |= sender_gone(&a));
    if gone {
        return Err("a live peer was reported gone".into());
    }
    let st = remote.handoff_stats();
    println!("{n} writes of {BLOCK} bytes, one at a time (mean per request):");
    println!("  lent through the volume socket: {lent:>8.2} us");
    println!("  the same volume called directly: {direct:>7.2} us");
    println!(
        "  lending adds:                    {:>7.2} us",
        lent - direct
    );
    println!(
        "  of which the sender-gone check:  {check:>7.2} us ({:.1}% of a lent write)",
        100.0 * check / lent
    );
    println!(
        "  a bare socket round trip:        {floor:>7.2} us (the floor: {:.0}% of what lending adds)",
        100.0 * floor / (lent - direct)
    );
    println!(
        "  client handoff: {} losses, {} re-issued, {} switches",
        st.losses, st.reissued, st.switches
    );
    Ok(())
}
