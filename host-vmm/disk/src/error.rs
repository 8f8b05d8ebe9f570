//! The crate's error type: every public function returns [`DiskError`],
//! which names the file and the structure at fault.

use std::io;
use std::path::PathBuf;

use crate::qcow2::Qcow2Error;
use crate::vhdx::VhdxError;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: bad or unsupported VHDX image")]
    Vhdx {
        path: PathBuf,
        #[source]
        source: VhdxError,
    },
    #[error("{path}: bad or unsupported qcow2 image")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: Qcow2Error,
    },
    #[error("{path}: not a disk image this build understands (no raw/qcow2/VHDX signature and raw not requested)")]
    UnknownFormat { path: PathBuf },
    #[error("request at {offset:#x}+{len:#x} is outside the disk ({size:#x} bytes)")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("request at {offset:#x}+{len:#x} is not aligned to {align} bytes")]
    Unaligned { offset: u64, len: u64, align: u64 },
    #[error("{path}: layer is sealed or opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("backing chain loops: {path} appears twice")]
    ChainLoop { path: PathBuf },
    #[error("backing chain is deeper than {max} layers")]
    ChainTooDeep { max: usize },
    #[error("{child}: parent {parent} has the wrong identity (expected DataWriteGuid {expected}, found {found})")]
    ParentIdentity {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{child}: parent {parent} is {parent_size} bytes but the child is {child_size}")]
    ParentSize {
        child: PathBuf,
        parent: PathBuf,
        parent_size: u64,
        child_size: u64,
    },
    #[error("{child}: a VHDX differencing disk needs a VHDX parent, {parent} is {format}")]
    ParentFormat {
        child: PathBuf,
        parent: PathBuf,
        format: &'static str,
    },
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("injected fault at step {0:?}")]
    InjectedFault(String),
}

pub type Result<T, E = DiskError> = std::result::Result<T, E>;

/// Attaches a path and an operation name to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &std::path::Path, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &std::path::Path, op: &'static str) -> Result<T> {
        self.map_err(|source| DiskError::Io {
            path: path.to_path_buf(),
            op,
            source,
        })
    }
}
