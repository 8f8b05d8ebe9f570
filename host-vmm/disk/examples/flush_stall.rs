//! How long writes to a chain stall while it flushes: the same paced 4 KiB
//! random writes and a flush every 300 ms, for 6 s, on a fresh qcow2 image
//! and on a raw file (the baseline) in the same run, side by side.
//!
//!     cargo run --release -p tandem-disk --example flush_stall [DIR]
//!
//! It prints, per format, the flushes' median and largest duration and the
//! largest write latency overlapping a flush and outside them, then the
//! ratio of the two formats' worst stalls during a flush.
#![allow(clippy::unwrap_used)] // a measurement script: a panic is its report

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_disk::{BlockDevice, Chain, ChainOptions, Format};

struct Figures {
    writes: usize,
    flush_median: Duration,
    flush_max: Duration,
    stall_in_flush: Duration,
    stall_otherwise: Duration,
}

fn measure(dir: &std::path::Path, format: Format) -> Figures {
    let path = dir.join(format!("flush-stall.{}", format.name()));
    let _ = std::fs::remove_file(&path);
    tandem_disk::ops::create(&path, format, Some(256 << 20), None).unwrap();
    let chain = Arc::new(
        Chain::open(
            &path,
            ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let flusher = {
        let (chain, stop, flushes) = (chain.clone(), stop.clone(), flushes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(300));
                let a = Instant::now();
                chain.flush().unwrap();
                flushes.lock().unwrap().push((a, Instant::now()));
            }
        })
    };
    let mut lat = Vec::new();
    let buf = vec![0x5au8; 4096];
    let begun = Instant::now();
    let mut x: u64 = 12345;
    while begun.elapsed() < Duration::from_secs(6) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 20) % (128 << 20) / 4096) * 4096;
        let a = Instant::now();
        chain.write_at(&buf, off).unwrap();
        lat.push((a, a.elapsed()));
        std::thread::sleep(Duration::from_micros(100));
    }
    stop.store(true, Ordering::Relaxed);
    flusher.join().unwrap();
    let fl = flushes.lock().unwrap();
    let during = |t: Instant, d: Duration| fl.iter().any(|(a, b)| t + d > *a && t < *b);
    let worst = |inside: bool| {
        lat.iter()
            .filter(|(t, d)| during(*t, *d) == inside)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    };
    let mut durations: Vec<Duration> = fl.iter().map(|(a, b)| *b - *a).collect();
    durations.sort();
    let _ = std::fs::remove_file(&path);
    Figures {
        writes: lat.len(),
        flush_median: durations[durations.len() / 2],
        flush_max: durations[durations.len() - 1],
        stall_in_flush: worst(true),
        stall_otherwise: worst(false),
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut worst = Vec::new();
    for format in [Format::Qcow2, Format::Raw] {
        let f = measure(&dir, format);
        println!(
            "{:5}: {} writes; flushes median {:.1} ms, max {:.1} ms; largest write latency overlapping a flush {:.2} ms, otherwise {:.2} ms",
            format.name(),
            f.writes,
            ms(f.flush_median),
            ms(f.flush_max),
            ms(f.stall_in_flush),
            ms(f.stall_otherwise)
        );
        worst.push(ms(f.stall_in_flush));
    }
    println!(
        "RESULT flush_stall qcow2_ms={:.2} raw_ms={:.2} ratio={:.2}",
        worst[0],
        worst[1],
        worst[0] / worst[1].max(0.001)
    );
}
