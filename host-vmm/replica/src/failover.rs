//! The recovery side's read-only operations: listing recovery points and
//! failing over to one (a new chain, or a flattened image, that reads
//! exactly as the primary did when that point's layer was sealed). The
//! stored layers are never written: a failed-over VM writes into a new
//! differencing layer on top, so later failovers stay possible.
//!
//! A site may merge old points away (retention). A failover therefore
//! holds the site's lock while it reads a point, and a failed-over chain
//! holds its point for good (`hold-NNNNNN.json`): its new layer names the
//! point's layer as its parent, so retention never writes nor removes it
//! until [`release`].

use std::path::{Path, PathBuf};

use tandem_disk::{ops, Format};

use crate::manifest::{hold_file, write_atomic, DirLock, LayerRecord, Manifest, ManifestError};

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("no recovery point {point} in {dir} (points: {have})")]
    NoPoint {
        point: u64,
        dir: PathBuf,
        have: String,
    },
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("{path}: cannot record the hold")]
    Hold {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the disk at {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: tandem_disk::DiskError,
    },
}

/// The recovery points of the site at `dir`, oldest first.
pub fn points(dir: &Path) -> Result<Vec<LayerRecord>, FailoverError> {
    Ok(Manifest::load(dir)?.points().cloned().collect())
}

/// The points held by failed-over chains.
pub fn held(dir: &Path) -> Result<Vec<u64>, FailoverError> {
    Ok(crate::manifest::holds(dir)?)
}

/// Lets retention merge point `point` again (once no failed-over disk
/// needs its layer: it was flattened or deleted). Returns whether it was held.
pub fn release(dir: &Path, point: u64) -> Result<bool, FailoverError> {
    let _lock = DirLock::exclusive(dir)?;
    let path = dir.join(hold_file(point));
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FailoverError::Hold { path, source }),
    }
}

/// How the failed-over disk is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// A new differencing layer (qcow2, or VHDX over a VHDX chain) on the point's layer.
    Chain,
    /// A single image of this format with the point's content.
    Flat(Format),
}

/// Produces at `out` a disk that reads as recovery point `point`.
/// Returns the path of the point's layer in the site.
pub fn failover(dir: &Path, point: u64, out: &Path, how: Output) -> Result<PathBuf, FailoverError> {
    // No merge runs while we read the manifest and the point's chain.
    let _lock = DirLock::exclusive(dir)?;
    let m = Manifest::load(dir)?;
    let rec = m.point(point).ok_or_else(|| FailoverError::NoPoint {
        point,
        dir: dir.into(),
        have: match (m.layers.first(), m.layers.last()) {
            (Some(a), Some(b)) => format!("{}..={}", a.seq, b.seq),
            _ => "none".into(),
        },
    })?;
    if out.exists() {
        return Err(FailoverError::Exists(out.into()));
    }
    let layer = dir.join(&rec.file);
    let disk = |source| FailoverError::Disk {
        path: out.into(),
        source,
    };
    match how {
        Output::Chain => {
            let format = if Format::parse(&rec.format) == Some(Format::Vhdx) {
                Format::Vhdx
            } else {
                Format::Qcow2
            };
            // The hold first: a crash leaves a hold without a disk (harmless).
            let hold = serde_json::json!({ "point": point, "disk": out });
            write_atomic(&dir.join(hold_file(point)), hold.to_string().as_bytes())?;
            ops::create(out, format, None, Some(&layer)).map_err(disk)?;
        }
        Output::Flat(format) => ops::convert(&layer, out, format, &|_, _| {}).map_err(disk)?,
    }
    tracing::info!(point, layer = %layer.display(), out = %out.display(), "failover");
    Ok(layer)
}

/// `YYYY-MM-DD HH:MM:SS.mmm UTC` for Unix milliseconds.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123 UTC");
        assert_eq!(utc(1_798_761_599_000), "2026-12-31 23:59:59.000 UTC");
    }

    #[test]
    fn a_missing_point_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = failover(dir.path(), 3, &dir.path().join("out"), Output::Chain).unwrap_err();
        assert!(held(dir.path()).unwrap().is_empty());
        assert!(e.to_string().contains("no recovery point 3"), "{e}");
    }
}
