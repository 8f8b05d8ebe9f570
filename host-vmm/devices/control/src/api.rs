//! The device server's own API, used by the VMM (not by operators):
//! one JSON object per line each way over a Unix socket.

use serde::{Deserialize, Serialize};
pub use tandem_api::channel::{ChannelInfo, Counters, PingReport};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The device and channel state.
    Info,
    /// Sends the guest a deliberately broken message (robustness tests).
    Inject { fault: Fault },
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
    Info(Box<ChannelInfo>),
    Ping(PingReport),
    Injected,
    Error { message: String },
}

pub use tandem_api::channel::Fault;
