//! The backend's own API: one JSON object per line each way over a Unix
//! socket (`--api-socket`), for `tandem run`, the harness and operators.

use serde::{Deserialize, Serialize};

pub use crate::device::Counters;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The disk chain, the geometry offered and the counters.
    Info,
    /// Seal the top layer and continue on a new differencing layer, while
    /// the guest keeps running.
    Checkpoint,
    /// Cut the volume socket's borrowers (an NVMe function's namespace),
    /// refuse their requests until `unfence`, and answer once none runs
    /// (up to `wait_ms`). The host does this before the guest can see
    /// that function removed.
    Fence {
        #[serde(default = "default_fence_wait_ms")]
        wait_ms: u32,
    },
    /// Let borrowers in again (a function is about to use the volume).
    Unfence,
}

fn default_fence_wait_ms() -> u32 {
    10_000
}

/// The volume socket's state (`tandem-volume`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LendingInfo {
    pub socket: String,
    /// The lender's own counters, flattened into this object.
    #[serde(flatten)]
    pub stats: tandem_volume::GateStats,
}

/// One layer of the chain, top first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub path: String,
    pub format: String,
    pub sealed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub chain: Vec<LayerInfo>,
    pub capacity_bytes: u64,
    pub blk_size: u32,
    pub readonly: bool,
    pub counters: Counters,
    pub last_error: Option<String>,
    /// Absent when the backend lends nothing.
    #[serde(default)]
    pub lending: Option<LendingInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Info(Box<Info>),
    Checkpoint {
        /// Where the sealed layer now lives.
        sealed: String,
        /// Checkpoint duration, guest I/O held back included.
        elapsed_us: u64,
    },
    Fenced {
        /// Borrower connections cut.
        closed: u32,
        /// How long lent requests were waited for.
        waited_us: u64,
    },
    Unfenced,
    Error {
        message: String,
    },
}
