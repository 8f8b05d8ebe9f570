//! The audit trail: one record per denied or translated write to a field
//! (and per attempt to change read-only bits of registers marked `audit`),
//! kept in a bounded ring that counts what it had to drop. Both types are
//! serde types so the API can return them as they are.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Which function of a device wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Function {
    Pf,
    /// A virtual function, numbered as the caller numbers them.
    Vf(u16),
    /// A function without SR-IOV (e.g. the control device).
    Single,
}

/// The function a policy instance guards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionId {
    /// The caller's name for the device (e.g. `nvme0`, `control`).
    pub device: String,
    pub function: Function,
}

/// Where the write went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Space {
    Config,
    /// An MSI-X table entry (in a BAR).
    MsixTable,
}

/// What the policy did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditAction {
    /// The field kept its value (or, for write-one-to-clear bits, nothing
    /// was cleared).
    Denied,
    /// A different value than the guest's was applied.
    Translated,
    /// The guest tried to change read-only bits; they kept their value.
    ReadOnly,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Assigned by [`AuditLog::push`]; 0 before.
    pub seq: u64,
    /// The caller's clock (nanoseconds), from the write's context.
    pub time_ns: u64,
    pub function: FunctionId,
    pub space: Space,
    /// Register name from the description (`unclaimed` for bytes no
    /// register covers); MSI-X table registers carry `[entry]`.
    pub register: String,
    pub field: String,
    /// The register's offset (config space, or within the MSI-X table).
    pub offset: u32,
    pub width: u8,
    /// The register value the guest's write would have produced.
    pub written: u32,
    /// The register value the policy let through.
    pub applied: u32,
    /// The class or translation that decided (`deny`, `clamp`, ...).
    pub rule: String,
    pub action: AuditAction,
    pub reason: String,
}

/// A bounded ring of audit records. When full, the oldest record goes and
/// `dropped` counts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AuditLogWire")]
pub struct AuditLog {
    capacity: usize,
    next_seq: u64,
    dropped: u64,
    records: VecDeque<AuditRecord>,
}

#[derive(Deserialize)]
struct AuditLogWire {
    capacity: usize,
    next_seq: u64,
    dropped: u64,
    records: VecDeque<AuditRecord>,
}

impl TryFrom<AuditLogWire> for AuditLog {
    type Error = String;

    fn try_from(w: AuditLogWire) -> Result<AuditLog, String> {
        if w.capacity > AuditLog::MAX_CAPACITY || w.records.len() > w.capacity {
            return Err(format!(
                "audit log holds {} records for a capacity of {} (at most {})",
                w.records.len(),
                w.capacity,
                AuditLog::MAX_CAPACITY
            ));
        }
        Ok(AuditLog {
            capacity: w.capacity,
            next_seq: w.next_seq,
            dropped: w.dropped,
            records: w.records,
        })
    }
}

impl AuditLog {
    /// Upper bound on the capacity, so a log can never grow without limit.
    pub const MAX_CAPACITY: usize = 1 << 20;

    /// A log keeping the last `capacity` records (at most
    /// [`Self::MAX_CAPACITY`]).
    pub fn new(capacity: usize) -> AuditLog {
        let capacity = capacity.min(Self::MAX_CAPACITY);
        AuditLog {
            capacity,
            next_seq: 1,
            dropped: 0,
            records: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    /// Appends a record, numbering it. Returns its sequence number.
    pub fn push(&mut self, mut record: AuditRecord) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        record.seq = seq;
        if self.capacity == 0 {
            self.dropped = self.dropped.saturating_add(1);
            return seq;
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
            self.dropped = self.dropped.saturating_add(1);
        }
        self.records.push_back(record);
        seq
    }

    pub fn extend(&mut self, records: impl IntoIterator<Item = AuditRecord>) {
        for r in records {
            self.push(r);
        }
    }

    pub fn records(&self) -> impl Iterator<Item = &AuditRecord> {
        self.records.iter()
    }

    /// Records with a sequence number above `seq` (for polling).
    pub fn since(&self, seq: u64) -> Vec<AuditRecord> {
        self.records
            .iter()
            .filter(|r| r.seq > seq)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records pushed out of the ring (or refused by a zero capacity).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u32) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_ns: u64::from(n),
            function: FunctionId {
                device: "d".into(),
                function: Function::Vf(2),
            },
            space: Space::Config,
            register: "command".into(),
            field: "bus-master".into(),
            offset: 4,
            width: 2,
            written: n,
            applied: 0,
            rule: "deny".into(),
            action: AuditAction::Denied,
            reason: "test".into(),
        }
    }

    #[test]
    fn ring_drops_oldest_and_counts() {
        let mut log = AuditLog::new(3);
        for n in 0..5 {
            log.push(rec(n));
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.dropped(), 2);
        let seqs: Vec<u64> = log.records().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(log.since(4).len(), 1);
        let mut zero = AuditLog::new(0);
        zero.push(rec(1));
        assert_eq!((zero.len(), zero.dropped()), (0, 1));
    }

    #[test]
    fn serde_round_trip_and_bounds() {
        let mut log = AuditLog::new(2);
        log.push(rec(7));
        let json = serde_json::to_string(&log).unwrap();
        assert!(json.contains("\"vf\":2"), "{json}");
        let back: AuditLog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, log);
        let bad = json.replace("\"capacity\":2", "\"capacity\":0");
        assert!(serde_json::from_str::<AuditLog>(&bad).is_err());
    }
}
