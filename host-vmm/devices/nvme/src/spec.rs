//! Numbers from the NVM Express Base Specification (revision 1.4 unless
//! noted) that the controller model uses. Names follow the specification.

/// Controller registers (BAR0), section 3.1.
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const NSSR: u64 = 0x20;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
    /// Doorbells start here; stride 4 bytes (CAP.DSTRD = 0).
    pub const DOORBELL_BASE: u64 = 0x1000;
}

/// Version 1.4.0.
pub const VERSION: u32 = 0x0001_0400;

pub mod cc {
    pub const EN: u32 = 1;
    pub const CSS_SHIFT: u32 = 4;
    pub const MPS_SHIFT: u32 = 7;
    pub const SHN_SHIFT: u32 = 14;
    pub const IOSQES_SHIFT: u32 = 16;
    pub const IOCQES_SHIFT: u32 = 20;
}

pub mod csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

pub mod admin {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    pub const FORMAT_NVM: u8 = 0x80;
}

pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
}

pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NS_LIST: u32 = 0x02;
    pub const NS_DESCRIPTORS: u32 = 0x03;
}

pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

pub mod log {
    pub const ERROR_INFO: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
}

/// Status codes: (status code type << 8) | status code.
pub mod status {
    pub const SUCCESS: u16 = 0x000;
    pub const INVALID_OPCODE: u16 = 0x001;
    pub const INVALID_FIELD: u16 = 0x002;
    pub const DATA_TRANSFER_ERROR: u16 = 0x004;
    pub const ABORTED_SQ_DELETION: u16 = 0x008;
    pub const INVALID_NAMESPACE: u16 = 0x00b;
    pub const LBA_OUT_OF_RANGE: u16 = 0x080;
    pub const INTERNAL_ERROR: u16 = 0x006;
    pub const COMMAND_SEQUENCE_ERROR: u16 = 0x00c;
    pub const INVALID_PRP_OFFSET: u16 = 0x013;
    pub const CQ_INVALID: u16 = 0x100;
    pub const INVALID_QUEUE_ID: u16 = 0x101;
    pub const INVALID_QUEUE_SIZE: u16 = 0x102;
    pub const ASYNC_EVENT_LIMIT: u16 = 0x105;
    pub const INVALID_INTERRUPT_VECTOR: u16 = 0x108;
    pub const INVALID_LOG_PAGE: u16 = 0x109;
    pub const INVALID_QUEUE_DELETION: u16 = 0x10c;
    pub const FEATURE_NOT_SAVEABLE: u16 = 0x10d;
    /// Not a status code: the Do Not Retry bit, in the same 15-bit field.
    pub const DNR: u16 = 1 << 14;
}

/// Asynchronous event types and the error-status information codes.
pub mod aen {
    pub const TYPE_ERROR: u32 = 0;
    pub const INFO_INVALID_DOORBELL: u32 = 0x00;
    pub const INFO_INVALID_DOORBELL_VALUE: u32 = 0x01;
}
