//! The file server's operator API: JSON lines on a Unix socket
//! (`tandem share list`, `tandem share clear`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Every open disk: initiators, registrations, the reservation.
    List,
    /// Removes every registration and the reservation of `disk` (as a
    /// PERSISTENT RESERVE OUT CLEAR would; registrants get a unit
    /// attention).
    Clear { disk: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitiatorInfo {
    pub name: String,
    pub connected: bool,
    pub incarnation: u64,
    /// Highest command sequence number seen from it.
    pub last_seq: u64,
    pub running: usize,
    /// Results kept for a replay.
    pub kept: usize,
    pub commands: u64,
    pub replayed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationInfo {
    pub initiator: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationInfo {
    pub holder: String,
    /// SPC-4 type name, e.g. WriteExclusiveRegistrantsOnly.
    pub kind: String,
    pub code: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub disk: String,
    pub blocks: u64,
    pub read_only: bool,
    pub generation: u32,
    pub aptpl: bool,
    pub registrations: Vec<RegistrationInfo>,
    pub reservation: Option<ReservationInfo>,
    pub initiators: Vec<InitiatorInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    List { epoch: u64, disks: Vec<DiskInfo> },
    Cleared { disk: String, removed: usize },
    Error { message: String },
}
