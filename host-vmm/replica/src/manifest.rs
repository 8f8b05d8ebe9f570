//! The recovery site's manifest: which primary it replicates (chain id,
//! highest generation seen), and its layers, each a recovery point. JSON,
//! replaced atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old manifest or the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::unhex;

pub const MANIFEST: &str = "manifest.json";
/// Version of the manifest format; a newer one is refused. Version 2 adds
/// merges (retired layers, `merged_from`, a pending `merging`).
pub const MANIFEST_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a replica manifest")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: manifest version {found} is newer than {MANIFEST_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// One stored layer; also the recovery point with the same id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Position in the chain from the base (1) up; the recovery point's id.
    pub seq: u64,
    /// File name in the site's directory.
    pub file: String,
    /// raw, qcow2 or vhdx.
    pub format: String,
    pub file_len: u64,
    /// The layer digest (hex BLAKE3, see `proto::LayerDigest`).
    pub digest: String,
    /// When the primary sealed the layer (Unix milliseconds): the point's time.
    pub sealed_at_ms: u64,
    /// When the site committed it.
    pub received_at_ms: u64,
    /// The layer's file name on the primary.
    pub primary_name: String,
    /// The file holds this point and every older one merged down into it:
    /// the oldest of those (absent: the file holds only this point's layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_from: Option<u64>,
    /// A merge in progress is changing this layer's chain: no longer a
    /// recovery point.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

impl LayerRecord {
    pub fn digest_bytes(&self) -> Option<[u8; 32]> {
        unhex(&self.digest)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The primary's chain id (hex), once one connected.
    pub chain_id: Option<String>,
    /// Highest generation of that primary seen; lower ones are refused.
    pub generation: u64,
    pub disk_size: Option<u64>,
    /// Bottom first; each layer's parent is the one before it.
    pub layers: Vec<LayerRecord>,
    /// A merge started and not yet recorded as done (redone on open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merging: Option<Merging>,
}

/// A merge of layers `target+1..=last` into layer `target` (indices into
/// `layers`), recorded before the merge writes anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merging {
    pub target: usize,
    pub last: usize,
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            chain_id: None,
            generation: 0,
            disk_size: None,
            layers: Vec::new(),
            merging: None,
        }
    }
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ManifestError + 'a {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Syncs a directory, so renames in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), ManifestError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync directory"))
}

/// The site directory's lock (`.lock`, an flock): a failover holds it while
/// it reads a point and records its hold; the server's retention takes it
/// (without waiting) while it merges. Released when dropped.
pub struct DirLock(#[allow(dead_code)] nix::fcntl::Flock<fs::File>);

impl DirLock {
    fn open(dir: &Path) -> Result<fs::File, ManifestError> {
        let path = dir.join(".lock");
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path, "open lock"))
    }

    /// Waits for the lock.
    pub fn exclusive(dir: &Path) -> Result<DirLock, ManifestError> {
        let f = Self::open(dir)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map(DirLock)
            .map_err(|(_, e)| io(&dir.join(".lock"), "lock")(e.into()))
    }

    /// The lock if nobody holds it.
    pub fn try_exclusive(dir: &Path) -> Result<Option<DirLock>, ManifestError> {
        let f = Self::open(dir)?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(DirLock(l))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io(&dir.join(".lock"), "lock")(e.into())),
        }
    }
}

/// Name of the file that holds point `seq` for a failed-over disk.
pub fn hold_file(seq: u64) -> String {
    format!("hold-{seq:06}.json")
}

/// The points held by failed-over disks (their `hold-NNNNNN.json` files).
pub fn holds(dir: &Path) -> Result<Vec<u64>, ManifestError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir, "list"))? {
        let name = entry.map_err(io(dir, "list"))?.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name
            .strip_prefix("hold-")
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|n| n.parse().ok())
        {
            out.push(seq);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ManifestError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp, "create"))?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_all().map_err(io(&tmp, "fsync"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path, "rename into place"))?;
    fsync_dir(&dir)
}

impl Manifest {
    /// Loads `dir/manifest.json`; a missing one is an empty site.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(e) => return Err(io(&path, "read")(e)),
        };
        let m: Manifest = serde_json::from_slice(&text).map_err(|source| ManifestError::Parse {
            path: path.clone(),
            source,
        })?;
        if m.version > MANIFEST_VERSION {
            return Err(ManifestError::Version {
                path,
                found: m.version,
            });
        }
        Ok(m)
    }

    pub fn save(&self, dir: &Path) -> Result<(), ManifestError> {
        let mut text = serde_json::to_vec_pretty(self).map_err(|source| ManifestError::Parse {
            path: dir.join(MANIFEST),
            source,
        })?;
        text.push(b'\n');
        write_atomic(&dir.join(MANIFEST), &text)
    }

    /// The recovery point `seq` (retired layers are not points).
    pub fn point(&self, seq: u64) -> Option<&LayerRecord> {
        self.points().find(|l| l.seq == seq)
    }

    /// The recovery points, oldest first.
    pub fn points(&self) -> impl Iterator<Item = &LayerRecord> {
        self.layers.iter().filter(|l| !l.retired)
    }

    /// The pending merge's files: the target, the merged layers (bottom
    /// first) and the child above them, if any.
    pub fn merge_files(&self) -> Option<(String, Vec<String>, Option<String>)> {
        let m = self.merging.as_ref()?;
        if !(m.target < m.last && m.last < self.layers.len()) {
            return None;
        }
        Some((
            self.layers[m.target].file.clone(),
            self.layers[m.target + 1..=m.last]
                .iter()
                .map(|l| l.file.clone())
                .collect(),
            self.layers.get(m.last + 1).map(|l| l.file.clone()),
        ))
    }

    /// The manifest once the pending merge is done: layer `last`'s point
    /// lives in the target's file, the layers in between are gone.
    /// `file_len` is the target file's new length.
    pub fn merged(&self, file_len: u64) -> Manifest {
        let mut out = self.clone();
        out.merging = None;
        let Some(m) = &self.merging else {
            return out;
        };
        if !(m.target < m.last && m.last < self.layers.len()) {
            return out;
        }
        let base = &self.layers[m.target];
        let mut point = self.layers[m.last].clone();
        point.file = base.file.clone();
        point.format = base.format.clone();
        point.file_len = file_len;
        point.merged_from = Some(base.merged_from.unwrap_or(base.seq));
        point.retired = false;
        out.layers.splice(m.target..=m.last, [point]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Manifest::default());
        let m = Manifest {
            chain_id: Some("ab".repeat(16)),
            generation: 4,
            disk_size: Some(1 << 30),
            layers: vec![LayerRecord {
                seq: 1,
                file: "layer-000001.img".into(),
                format: "raw".into(),
                file_len: 1 << 30,
                digest: "00".repeat(32),
                sealed_at_ms: 5,
                received_at_ms: 6,
                primary_name: "disk.ckpt1.img".into(),
                merged_from: None,
                retired: false,
            }],
            ..Manifest::default()
        };
        m.save(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        assert_eq!(m.point(1).unwrap().digest_bytes(), Some([0; 32]));
        assert!(m.point(2).is_none());
        std::fs::write(dir.path().join(MANIFEST), b"{").unwrap();
        assert!(Manifest::load(dir.path()).is_err());
        let newer = Manifest {
            version: MANIFEST_VERSION + 1,
            ..Manifest::default()
        };
        std::fs::write(
            dir.path().join(MANIFEST),
            serde_json::to_vec(&newer).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(ManifestError::Version { .. })
        ));
    }
}
