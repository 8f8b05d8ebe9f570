//! Progress of a sender (bytes, rate, lag), kept as plain data, and the
//! JSON-lines API socket that serves it: `{"op":"status"}` answers one line
//! `{"result":"status", ...}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What `tandem replica status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// connecting, connected, disconnected, stopped or failed.
    pub state: String,
    pub disk: String,
    pub target: String,
    pub chain_id: String,
    pub generation: u64,
    /// Recovery points the site has acknowledged (the last one's id).
    pub points: u64,
    /// Bytes of layer data sent since the sender started.
    pub bytes_sent: u64,
    /// Throughput of the last layer shipped, bytes per second.
    pub rate_bps: u64,
    /// When the newest acknowledged point was sealed (Unix ms).
    pub last_point_sealed_at_ms: u64,
    /// Lag of the newest point: from its seal to its acknowledgement.
    pub lag_ms: u64,
    pub worst_lag_ms: u64,
    /// Worst recovery point objective seen: the longest time the site's
    /// newest point was older than the primary (measured at each acknowledgement,
    /// from the previous point's seal).
    pub worst_rpo_ms: u64,
    pub reconnects: u64,
    /// Bytes of layers cut mid-transfer that were not sent again (the site
    /// kept them).
    pub bytes_resumed: u64,
    /// Merges of shipped layers on the primary (retention keeps its chain short).
    pub merges: u64,
    pub last_error: Option<String>,
    /// The layer being shipped: how far into its file, and its length.
    pub layer_offset: u64,
    pub layer_len: u64,
}

impl Status {
    /// Records an acknowledged point.
    pub fn point_acked(
        &mut self,
        seq: u64,
        sealed_at_ms: u64,
        now_ms: u64,
        bytes: u64,
        took: Duration,
    ) {
        if self.points > 0 && self.last_point_sealed_at_ms > 0 {
            self.worst_rpo_ms = self
                .worst_rpo_ms
                .max(now_ms.saturating_sub(self.last_point_sealed_at_ms));
        }
        self.points = seq;
        self.last_point_sealed_at_ms = sealed_at_ms;
        self.lag_ms = now_ms.saturating_sub(sealed_at_ms);
        self.worst_lag_ms = self.worst_lag_ms.max(self.lag_ms);
        let secs = took.as_secs_f64();
        self.rate_bps = if secs > 0.0 {
            (bytes as f64 / secs) as u64
        } else {
            0
        };
    }

    /// The recovery point objective right now: how old the site's newest
    /// point is (`None` before the first point).
    pub fn rpo_ms(&self, now_ms: u64) -> Option<u64> {
        (self.points > 0).then(|| now_ms.saturating_sub(self.last_point_sealed_at_ms))
    }

    /// One line for the terminal.
    pub fn line(&self) -> String {
        format!(
            "replica: point {} on {} | {} sent, {}/s | lag {} ms (worst {}), rpo worst {} ms{}",
            self.points,
            self.target,
            human(self.bytes_sent),
            human(self.rate_bps),
            self.lag_ms,
            self.worst_lag_ms,
            self.worst_rpo_ms,
            if self.reconnects > 0 {
                format!(", {} reconnects", self.reconnects)
            } else {
                String::new()
            }
        )
    }
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApiRequest {
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApiResponse {
    Status {
        #[serde(flatten)]
        status: Box<Status>,
        /// How old the site's newest point is, now (null before the first).
        rpo_ms: Option<u64>,
    },
    Error {
        message: String,
    },
}

/// Answers one request line.
pub fn answer(line: &str, status: &Mutex<Status>) -> ApiResponse {
    match serde_json::from_str::<ApiRequest>(line) {
        Ok(ApiRequest::Status) => {
            let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let rpo_ms = s.rpo_ms(crate::receiver::now_ms());
            ApiResponse::Status {
                status: Box::new(s),
                rpo_ms,
            }
        }
        Err(e) => ApiResponse::Error {
            message: format!("bad request: {e}"),
        },
    }
}

/// Serves the API socket on a background thread (replacing a stale socket file).
pub fn serve_api(path: &Path, status: Arc<Mutex<Status>>) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let status = status.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    if line.trim().is_empty() {
                        continue;
                    }
                    let mut out =
                        serde_json::to_string(&answer(&line, &status)).unwrap_or_else(|e| {
                            format!("{{\"result\":\"error\",\"message\":\"{e}\"}}")
                        });
                    out.push('\n');
                    if w.write_all(out.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Asks a sender's API socket for its status.
pub fn query(path: &Path) -> std::io::Result<ApiResponse> {
    let mut conn = std::os::unix::net::UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_and_rpo_follow_the_points() {
        let mut s = Status::default();
        s.point_acked(1, 1000, 1300, 1 << 20, Duration::from_millis(100));
        assert_eq!((s.lag_ms, s.worst_rpo_ms, s.rate_bps), (300, 0, 10 << 20));
        s.point_acked(2, 2000, 2100, 0, Duration::ZERO);
        assert_eq!((s.lag_ms, s.worst_lag_ms, s.worst_rpo_ms), (100, 300, 1100));
        assert_eq!(s.rpo_ms(2500), Some(500));
        assert_eq!(Status::default().rpo_ms(2500), None);
        assert!(s.line().contains("point 2"));
    }

    #[test]
    fn the_api_answers_status_and_refuses_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let status = Arc::new(Mutex::new(Status {
            points: 7,
            ..Status::default()
        }));
        serve_api(&sock, status).unwrap();
        match query(&sock).unwrap() {
            ApiResponse::Status { status, .. } => assert_eq!(status.points, 7),
            other => panic!("{other:?}"),
        }
        let m = Mutex::new(Status::default());
        assert!(matches!(
            answer("{\"op\":\"nope\"}", &m),
            ApiResponse::Error { .. }
        ));
    }
}
