//! The guest/host control channel as the API shows it.

use serde::{Deserialize, Serialize};

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

/// `PUT /api/v1/channel.ping`: host-to-guest pings with checked echoes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    #[serde(default = "one")]
    pub count: u32,
    /// Payload bytes; absent: random sizes up to the ring's maximum.
    #[serde(default)]
    pub size: Option<usize>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
    #[serde(default)]
    pub seed: u64,
}

fn one() -> u32 {
    1
}
fn default_timeout() -> u32 {
    1000
}

/// The supervisor's view of the control device server (a child process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub pid: Option<u32>,
    /// Increases with every (re)start; the guest sees it in `SESSION`.
    pub session: u32,
    pub restarts: u32,
    /// "starting", "running", "replacing" or "failed".
    pub state: String,
    /// How the last server process ended, if one did.
    pub last_exit: Option<String>,
    pub last_error: Option<String>,
}

/// `GET /api/v1/channel.info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    pub server: ServerStatus,
    /// The device's own report; absent while the server is unreachable.
    pub device: Option<ChannelInfo>,
}

/// A deliberately broken host-to-guest message, for robustness tests
/// (`PUT /api/v1/channel.inject`). A correct guest driver counts each and
/// carries on; none may crash it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Random bytes: no magic.
    Garbage,
    /// A header whose length runs past the slot.
    Oversized,
    /// A kind no version defines.
    UnknownKind,
    /// A ping in a version that was not negotiated.
    BadVersion,
    /// A heartbeat whose payload is too short.
    ShortPayload,
    /// A response to a request the guest never sent.
    UnexpectedResponse,
    /// Undefined flag bits.
    BadFlags,
}

/// `PUT /api/v1/channel.inject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    pub fault: Fault,
}

/// What the host asks the guest driver to do with an assigned function
/// (ABI 1.1 `FUNCTION` requests, `shared-abi/README.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionOp {
    /// Hold new I/O in the guest and wait for I/O in flight to complete.
    Quiesce,
    /// Let held I/O go.
    Resume,
    /// Only report the guest's view.
    Report,
    /// Apply the host's policy (`frozen`) in the guest's filter.
    Policy,
    /// (ABI 1.2) The function's disk becomes the synthetic path of a
    /// multi-path volume (`/dev/tandem<volume>` in the guest).
    PathSynthetic,
    /// (ABI 1.2) The function's disk becomes the volume's direct path and
    /// the volume's I/O moves to it.
    PathDirect,
    /// (ABI 1.2) The volume's I/O moves off the function to the synthetic
    /// path and the guest lets go of the function's disk.
    PathRelease,
}

impl FunctionOp {
    /// Whether the operation needs ABI 1.2's `PATHS` capability.
    pub fn is_path_op(self) -> bool {
        matches!(
            self,
            FunctionOp::PathSynthetic | FunctionOp::PathDirect | FunctionOp::PathRelease
        )
    }
}

/// A `FUNCTION` request as the control device server takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub op: FunctionOp,
    /// The function's address as the guest enumerated it.
    pub segment: u16,
    pub bus: u8,
    pub devfn: u8,
    /// `quiesce`: how long the guest waits for I/O in flight.
    #[serde(default)]
    pub drain_ms: u32,
    /// `quiesce`: the guest resumes by itself after this long without a
    /// `resume` (0: one minute).
    #[serde(default)]
    pub lease_ms: u32,
    /// `policy`: the host holds the function frozen.
    #[serde(default)]
    pub frozen: bool,
    /// `path_*`: the multi-path volume.
    #[serde(default)]
    pub volume: u32,
    /// How long the host waits for the answer.
    pub timeout_ms: u32,
}

/// The guest driver's answer: its view of the function after the operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFunction {
    /// The guest's status: "ok", or why the operation did not complete
    /// ("timed out": I/O was still in flight after `drain_ms`).
    pub status: String,
    /// The same as the ABI's status number (`shared_abi::msg::Status`; 0
    /// is OK), for programs to match on; absent from an older host.
    #[serde(default)]
    pub status_code: Option<u16>,
    pub present: bool,
    /// The guest driver bound to it ("" when none).
    pub driver: String,
    pub enabled: bool,
    pub bus_master: bool,
    pub msix: bool,
    /// New I/O is held in the guest.
    pub quiesced: bool,
    /// Nothing is in flight.
    pub drained: bool,
    /// The guest's filter applies the frozen policy.
    pub frozen: bool,
    /// "D0" to "D3cold".
    pub power_state: String,
    pub disks: u32,
    pub in_flight: u32,
    pub drain_us: u32,
    pub quiesces: u32,
    /// (ABI 1.2) The function's disk is a path of a multi-path volume.
    #[serde(default)]
    pub path: bool,
    /// (ABI 1.2) The volume's I/O goes to this function.
    #[serde(default)]
    pub active_path: bool,
    /// Host-side round trip of the request.
    pub round_trip_us: u64,
}
