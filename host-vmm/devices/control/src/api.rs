//! The device server's own API, used by the VMM (not by operators):
//! one JSON object per line each way over a Unix socket.

use serde::{Deserialize, Serialize};
pub use tandem_api::channel::{ChannelInfo, Counters, FunctionCall, GuestFunction, PingReport};

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
    /// A `FUNCTION` request to the guest driver (ABI 1.1). (A struct
    /// variant: the call has its own `op`, which would clash with the tag.)
    Function { call: FunctionCall },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Info(Box<ChannelInfo>),
    Ping(PingReport),
    Function(GuestFunction),
    Injected,
    Error { message: String },
}

pub use tandem_api::channel::Fault;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_requests_round_trip_as_json() {
        let r = Request::Function {
            call: FunctionCall {
                op: tandem_api::channel::FunctionOp::Quiesce,
                segment: 0,
                bus: 2,
                devfn: 0,
                drain_ms: 100,
                lease_ms: 0,
                frozen: false,
                volume: 0,
                timeout_ms: 1000,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
    }
}
