//! The file behind one disk's [`Journal`]: read and rewritten whole when
//! the disk is opened, appended to (one write(2) per record, no fsync)
//! while it is served, rewritten whole (temporary file, fsync, rename,
//! fsync of the directory) when enough was appended, and fsynced when the
//! disk's SYNCHRONIZE CACHE makes the data durable. The decisions are the
//! journal's; this is plumbing.
//!
//! Test hook: with `TANDEM_SHARE_TEST_ABORT_AFTER_INTENT=<initiator>/<seq>`
//! in its environment the server aborts right after that command's intent
//! reached the file, before the command runs (the integration tests use it
//! to land a kill between intent and result).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{info, warn};

use crate::journal::{self, encode, Journal, JournalError, Record, Restored};
use crate::proto::Outcome;

/// Names the test hook's environment variable.
pub const ABORT_AFTER_INTENT_ENV: &str = "TANDEM_SHARE_TEST_ABORT_AFTER_INTENT";
/// Largest record file read (the bound keeps it far below).
const MAX_FILE: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalFileError {
    #[error("command record {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("command record {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: JournalError,
    },
}

/// This boot's id; None where the kernel does not say (nothing written
/// then is trusted after a restart).
pub fn boot_id() -> Option<String> {
    let s = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let s = s.trim();
    (!s.is_empty() && s.len() <= 64).then(|| s.to_string())
}

struct Inner {
    file: File,
    journal: Journal,
}

pub struct JournalFile {
    path: PathBuf,
    boot_id: Option<String>,
    inner: Mutex<Inner>,
    abort_after_intent: Option<(String, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `records` as a new file at `path` (temporary file, fsync,
/// rename, fsync of the directory); the new file, open for appending.
fn write_whole(path: &Path, records: &[Record]) -> io::Result<File> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)?;
    let bytes: Vec<u8> = records.iter().flat_map(encode).collect();
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    // Appends go to the renamed file; O_APPEND keeps each at its end.
    OpenOptions::new().append(true).open(path)
}

impl JournalFile {
    /// Reads the record at `path` (missing: a fresh disk), rewrites it under
    /// this boot and returns it with what it knows of each initiator.
    pub fn open(path: &Path) -> Result<(JournalFile, Vec<Restored>), JournalFileError> {
        let io_err = |source| JournalFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let boot_id = boot_id();
        let bytes = match File::open(path) {
            Ok(f) => {
                let len = f.metadata().map_err(io_err)?.len();
                if len > MAX_FILE {
                    return Err(io_err(io::Error::other(format!(
                        "{len} bytes, over the {MAX_FILE} this build reads"
                    ))));
                }
                fs::read(path).map_err(io_err)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(e)),
        };
        let loaded = journal::parse(&bytes, boot_id.as_deref()).map_err(|source| {
            JournalFileError::Format {
                path: path.to_path_buf(),
                source,
            }
        })?;
        if !bytes.is_empty() {
            if !loaded.trusted {
                warn!(path = %path.display(), bad_lines = loaded.bad_lines, "the command record is from another boot or damaged: replays of the commands it names fail as unknown");
            }
            if loaded.torn {
                info!(path = %path.display(), "the command record's last write was cut");
            }
        }
        let mut journal = loaded.journal;
        let sessions = journal.restored();
        journal.written();
        // Rewritten now: a cut last line goes, and what was not trusted is
        // written as unknown under this boot.
        let file = write_whole(path, &journal.snapshot(boot_id.as_deref())).map_err(io_err)?;
        let abort_after_intent = std::env::var(ABORT_AFTER_INTENT_ENV).ok().and_then(|v| {
            let (who, seq) = v.rsplit_once('/')?;
            Some((who.to_string(), seq.parse().ok()?))
        });
        Ok((
            JournalFile {
                path: path.to_path_buf(),
                boot_id,
                inner: Mutex::new(Inner { file, journal }),
                abort_after_intent,
            },
            sessions,
        ))
    }

    fn append(inner: &mut Inner, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // One write(2): the page cache has it when it returns, which is
        // what survives the process.
        let bytes: Vec<u8> = records.iter().flat_map(encode).collect();
        inner.file.write_all(&bytes)
    }

    /// An initiator said hello with `incarnation`.
    pub fn begin(&self, initiator: &str, incarnation: u64) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let r: Vec<Record> = g
            .journal
            .begin(initiator, incarnation)
            .into_iter()
            .collect();
        Self::append(&mut g, &r)
    }

    /// Before command `seq` runs: its intent reaches the file (an error
    /// means the command must not run).
    pub fn intent(
        &self,
        initiator: &str,
        incarnation: u64,
        seq: u64,
        cdb: &[u8],
    ) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let r = g.journal.intent(initiator, incarnation, seq, cdb);
        Self::append(&mut g, &r)?;
        if !r.is_empty()
            && self
                .abort_after_intent
                .as_ref()
                .is_some_and(|(who, s)| who == initiator && *s == seq)
        {
            warn!(initiator, seq, "test hook: aborting after the intent");
            std::process::abort();
        }
        Ok(())
    }

    /// After the command ran, before its result goes out.
    pub fn done(&self, initiator: &str, incarnation: u64, outcome: &Outcome) -> io::Result<()> {
        let mut g = lock(&self.inner);
        let r: Vec<Record> = g
            .journal
            .done(initiator, incarnation, outcome)
            .into_iter()
            .collect();
        Self::append(&mut g, &r)?;
        if g.journal.wants_compaction() {
            let records = g.journal.snapshot(self.boot_id.as_deref());
            match write_whole(&self.path, &records) {
                Ok(f) => {
                    g.file = f;
                    g.journal.written();
                }
                // The old file is still whole and appended to; the next
                // append tries again.
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot compact the command record")
                }
            }
        }
        Ok(())
    }

    /// The client has the results up to `acked`.
    pub fn ack(&self, initiator: &str, incarnation: u64, acked: u64) {
        lock(&self.inner).journal.ack(initiator, incarnation, acked);
    }

    /// Makes what was appended durable (with the data, at SYNCHRONIZE
    /// CACHE).
    pub fn sync(&self) -> io::Result<()> {
        lock(&self.inner).file.sync_data()
    }
}
