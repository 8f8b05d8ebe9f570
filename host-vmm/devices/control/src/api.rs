//! The device server's own API, used by the VMM (not by operators):
//! one JSON object per line each way over a Unix socket.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The device and channel state.
    Info,
    /// Host-to-guest pings; each answer is checked against what was sent.
    Ping {
        count: u32,
        /// Payload bytes; `None`: random sizes from 0 to the ring's maximum.
        size: Option<usize>,
        timeout_ms: u32,
        /// Seed of the payload generator (reproducible runs).
        seed: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Info(ChannelInfo),
    Ping(PingReport),
    Error { message: String },
}

/// Everything the device and the host endpoint know.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub pid: u32,
    pub session: u32,
    /// "disabled", "enabled" or "failed".
    pub device_state: String,
    /// The device error, if failed.
    pub device_error: Option<String>,
    /// "down", "negotiating", "up" or "refused".
    pub channel_state: String,
    /// The negotiated ABI version.
    pub version: Option<String>,
    pub capabilities: Option<u64>,
    pub host_versions: String,
    /// The guest's range when it was refused.
    pub refused_guest_versions: Option<String>,
    pub guest_driver: Option<String>,
    /// Whether the guest's heartbeats arrive in time.
    pub guest_alive: Option<bool>,
    pub guest_silence_ms: Option<u64>,
    pub counters: Counters,
    pub last_error: String,
    pub ring_slots: Option<u32>,
    pub ring_slot_size: Option<u32>,
    pub dma_mapped: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rx_messages: u64,
    pub tx_messages: u64,
    pub malformed: u64,
    pub error_replies: u64,
    pub unexpected_responses: u64,
    pub timeouts: u64,
    pub pings_answered: u64,
    pub heartbeats_received: u64,
    pub negotiations: u64,
    pub doorbells: u64,
    pub interrupts: u64,
    pub dma_faults: u64,
    pub outbox_drops: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub sent: u32,
    pub ok: u32,
    /// Answers whose payload differed from what was sent.
    pub mismatched: u32,
    pub timeouts: u32,
    pub failed: u32,
    pub bytes: u64,
    pub rtt_us_min: Option<f64>,
    pub rtt_us_median: Option<f64>,
    pub rtt_us_p99: Option<f64>,
    pub rtt_us_max: Option<f64>,
    pub first_error: Option<String>,
}
