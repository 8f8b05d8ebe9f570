//! The device server process: the vfio-user connection, the API socket and
//! a ticker, around one [`ControlDevice`].
//!
//! It prints `ready` on stdout once both sockets listen, so a supervisor
//! knows when QEMU may connect. It exits when QEMU disconnects (the device
//! was removed); a supervisor replaces it when it dies for any reason.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared_abi::VersionRange;
use tandem_vfio_server::{DmaSpace, Listener, ServeError};
use tracing::{info, warn};

use crate::api::{FunctionCall, GuestFunction, PingReport, Request, Response};
use crate::device::{ControlDevice, RequestError};

/// The longest API request line accepted.
const MAX_LINE: u64 = 64 * 1024;
/// Most pings one API request may ask for.
const MAX_PINGS: u32 = 100_000;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub vfio_socket: PathBuf,
    pub api_socket: PathBuf,
    pub session: u32,
    pub range: VersionRange,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Vfio(#[from] ServeError),
    #[error("cannot listen on {path}")]
    Api {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn lock(m: &Mutex<ControlDevice>) -> std::sync::MutexGuard<'_, ControlDevice> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    let dma = Arc::new(DmaSpace::new());
    let dev = Arc::new(Mutex::new(ControlDevice::new(
        dma.clone(),
        cfg.session,
        cfg.range,
    )));
    let listener = Listener::bind(&cfg.vfio_socket, dev.clone(), dma)?;
    let _ = std::fs::remove_file(&cfg.api_socket);
    let api = UnixListener::bind(&cfg.api_socket).map_err(|source| ServerError::Api {
        path: cfg.api_socket.clone(),
        source,
    })?;
    {
        let dev = dev.clone();
        std::thread::Builder::new()
            .name("ticker".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(10));
                lock(&dev).tick();
            })
            .ok();
    }
    {
        let dev = dev.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in api.incoming().flatten() {
                    let dev = dev.clone();
                    std::thread::spawn(move || serve_api(conn, &dev));
                }
            })
            .ok();
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    info!(session = cfg.session, socket = %cfg.vfio_socket.display(), "control device server ready");
    let r = listener.serve();
    let _ = std::fs::remove_file(&cfg.api_socket);
    match &r {
        Ok(()) => info!("QEMU disconnected; the control device server stops"),
        Err(e) => warn!(error = %e, "the vfio-user connection failed"),
    }
    Ok(r?)
}

fn serve_api(conn: UnixStream, dev: &Mutex<ControlDevice>) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = respond(
                &mut writer,
                &Response::Error {
                    message: "request line too long".into(),
                },
            );
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(Request::Info) => Response::Info(Box::new(lock(dev).info())),
            Ok(Request::Inject { fault }) => match lock(dev).inject(fault) {
                Ok(()) => Response::Injected,
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Ok(Request::Function { call }) => match function(dev, &call) {
                Ok(r) => Response::Function(r),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Ok(Request::Ping {
                count,
                size,
                timeout_ms,
                seed,
            }) => {
                if count > MAX_PINGS {
                    Response::Error {
                        message: format!("at most {MAX_PINGS} pings per request"),
                    }
                } else {
                    Response::Ping(ping(dev, count, size, timeout_ms.max(1), seed))
                }
            }
        };
        if respond(&mut writer, &resp).is_err() {
            return;
        }
    }
}

fn respond(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_string(r).map_err(std::io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes())
}

/// Sends one `FUNCTION` request to the guest driver and waits for its
/// answer. A guest status other than OK with a full report (for example
/// `timed out`: still draining) is an answer, not an error.
pub fn function(
    dev: &Mutex<ControlDevice>,
    call: &FunctionCall,
) -> Result<GuestFunction, RequestError> {
    use shared_abi::msg::{function as f, FunctionReport, FunctionRequest, Kind, Status};
    use zerocopy::IntoBytes;
    let op = match call.op {
        tandem_api::channel::FunctionOp::Quiesce => f::op::QUIESCE,
        tandem_api::channel::FunctionOp::Resume => f::op::RESUME,
        tandem_api::channel::FunctionOp::Report => f::op::REPORT,
        tandem_api::channel::FunctionOp::Policy => f::op::POLICY,
        tandem_api::channel::FunctionOp::PathSynthetic => f::op::PATH_SYNTHETIC,
        tandem_api::channel::FunctionOp::PathDirect => f::op::PATH_DIRECT,
        tandem_api::channel::FunctionOp::PathRelease => f::op::PATH_RELEASE,
    };
    let req = FunctionRequest {
        op: op.into(),
        segment: call.segment.into(),
        bus: call.bus,
        devfn: call.devfn,
        drain_ms: call.drain_ms.into(),
        lease_ms: call.lease_ms.into(),
        policy: if call.frozen { f::policy::FROZEN } else { 0 }.into(),
        volume: call.volume.into(),
    };
    let timeout_ms = call.timeout_ms.max(1);
    let begun = Instant::now();
    let rx = lock(dev).begin_request(Kind::Function, req.as_bytes(), timeout_ms)?;
    let (status, payload) = rx
        .recv_timeout(Duration::from_millis(u64::from(timeout_ms) + 1000))
        .map_err(|_| RequestError::Timeout)??;
    let round_trip_us = u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX);
    let Some(r) = shared_abi::msg::payload::<FunctionReport>(&payload) else {
        // Refusals before the driver looked (unknown kind, bad length,
        // no such function) carry no report.
        return Err(RequestError::Refused(status.name().into()));
    };
    let st = r.state.get();
    let has = |bit| st & bit != 0;
    info!(op = ?call.op, bus = call.bus, devfn = call.devfn, status = status.name(), round_trip_us, "function request answered");
    Ok(GuestFunction {
        status: if status == Status::Ok {
            "ok"
        } else {
            status.name()
        }
        .into(),
        status_code: Some(status as u16),
        present: has(f::state::PRESENT),
        driver: shared_abi::msg::version_str(&r.driver).into(),
        enabled: has(f::state::ENABLED),
        bus_master: has(f::state::BUS_MASTER),
        msix: has(f::state::MSIX),
        quiesced: has(f::state::QUIESCED),
        drained: has(f::state::DRAINED),
        frozen: has(f::state::FROZEN),
        power_state: match r.power_state.get() {
            0 => "D0",
            1 => "D1",
            2 => "D2",
            3 => "D3hot",
            4 => "D3cold",
            _ => "unknown",
        }
        .into(),
        disks: r.disks.get(),
        in_flight: r.in_flight.get(),
        drain_us: r.drain_us.get(),
        quiesces: r.quiesces.get(),
        path: has(f::state::PATH),
        active_path: has(f::state::ACTIVE_PATH),
        round_trip_us,
    })
}

/// xorshift64*: a small reproducible payload generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // CAST: indices are small; the product is within range.
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

/// Runs `count` host-to-guest pings one after another and checks each echo.
pub fn ping(
    dev: &Mutex<ControlDevice>,
    count: u32,
    size: Option<usize>,
    timeout_ms: u32,
    seed: u64,
) -> PingReport {
    let mut rng = Rng(seed | 1);
    let mut rep = PingReport::default();
    let mut rtts = Vec::with_capacity(count as usize);
    let note = |rep: &mut PingReport, e: String| {
        if rep.first_error.is_none() {
            rep.first_error = Some(e);
        }
    };
    for _ in 0..count {
        let max = lock(dev)
            .info()
            .ring_slot_size
            .map(|s| s as usize - shared_abi::msg::HEADER_LEN);
        let Some(max) = max else {
            rep.sent += 1;
            rep.failed += 1;
            note(&mut rep, "the guest has not enabled the rings".into());
            continue;
        };
        // CAST: `max` is at most a slot (4 KiB).
        let len = size.unwrap_or_else(|| (rng.next() % (max as u64 + 1)) as usize);
        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        rep.sent += 1;
        let begun = Instant::now();
        let rx = match lock(dev).begin_ping(&payload, timeout_ms) {
            Ok(rx) => rx,
            Err(e) => {
                rep.failed += 1;
                note(&mut rep, e.to_string());
                continue;
            }
        };
        match rx.recv_timeout(Duration::from_millis(u64::from(timeout_ms) + 1000)) {
            Ok(Ok((status, _))) if status != shared_abi::msg::Status::Ok => {
                rep.failed += 1;
                note(
                    &mut rep,
                    RequestError::Refused(status.name().into()).to_string(),
                );
            }
            Ok(Ok((_, echo))) => {
                rtts.push(begun.elapsed().as_secs_f64() * 1e6);
                if echo == payload {
                    rep.ok += 1;
                    rep.bytes += len as u64;
                } else {
                    rep.mismatched += 1;
                    note(
                        &mut rep,
                        format!("echo of {} bytes differs from the {} sent", echo.len(), len),
                    );
                }
            }
            Ok(Err(RequestError::Timeout)) | Err(_) => {
                rep.timeouts += 1;
                note(&mut rep, "no answer in time".into());
            }
            Ok(Err(e)) => {
                rep.failed += 1;
                note(&mut rep, e.to_string());
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    rep.rtt_us_min = rtts.first().copied();
    rep.rtt_us_median = percentile(&rtts, 0.5);
    rep.rtt_us_p99 = percentile(&rtts, 0.99);
    rep.rtt_us_max = rtts.last().copied();
    rep
}
