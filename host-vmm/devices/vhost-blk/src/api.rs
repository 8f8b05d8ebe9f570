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
    Error {
        message: String,
    },
}
