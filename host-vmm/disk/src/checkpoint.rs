//! Checkpoint: seal the top layer and put a new, empty differencing layer
//! on top of it, keeping the top's path (so a VM's configuration keeps
//! naming the live layer).
//!
//! Steps, each leaving a chain that opens and reads what was acknowledged:
//! 1. create the child under a temporary name (`.NAME.tandem-new`) naming
//!    the sealed name as its parent, and fsync it. A crash leaves a stray
//!    temporary file; the chain at NAME is untouched.
//! 2. hard-link NAME to the sealed name (`STEM.ckptN.EXT`), fsync the
//!    directory. A crash leaves two names for the same file; the chain at
//!    NAME is untouched and the next checkpoint reuses the link.
//! 3. rename the temporary file over NAME (atomic), fsync the directory.
//!    From here NAME is the child and its parent is the sealed layer.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{DiskError, IoContext, Result};
use crate::fault::FaultHook;
use crate::layer::Format;
use crate::qcow2::Qcow2Layer;
use crate::vhdx::{VhdxCreateOptions, VhdxLayer, VhdxOpenOptions, VhdxParent};

/// Temporary name of a child being created for `top`.
pub fn temp_name(top: &Path) -> PathBuf {
    let name = top
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    top.with_file_name(format!(".{name}.tandem-new"))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(dir, "fsync directory")
}

pub(crate) fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Picks the sealed name: one past the highest `STEM.ckptN.EXT` in the
/// directory (never a name a merge freed, so a name is never reused for
/// another layer), or one that is already a link to `top` (left by an
/// interrupted checkpoint).
fn sealed_name(top: &Path) -> Result<PathBuf> {
    let ino = fs::metadata(top).ctx(top, "stat")?.ino();
    let stem = top
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = top
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let dir = dir_of(top);
    let prefix = format!("{stem}.ckpt");
    let mut highest = 0u64;
    for entry in fs::read_dir(&dir).ctx(&dir, "list directory")? {
        let entry = entry.ctx(&dir, "list directory")?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(&ext))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.metadata().is_ok_and(|m| m.ino() == ino) {
            return Ok(top.with_file_name(&name));
        }
        highest = highest.max(n);
    }
    if highest >= 1_000_000_000 {
        return Err(DiskError::Invalid(format!(
            "{}: no free checkpoint name",
            top.display()
        )));
    }
    Ok(top.with_file_name(format!("{prefix}{}{ext}", highest + 1)))
}

/// Performs the checkpoint steps on closed files. `format` and `size` are
/// the top layer's. Returns the sealed layer's path.
pub fn seal_and_branch(
    top: &Path,
    format: Format,
    size: u64,
    faults: &FaultHook,
) -> Result<PathBuf> {
    let dir = dir_of(top);
    let sealed = sealed_name(top)?;
    let sealed_file = sealed
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = temp_name(top);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).ctx(&tmp, "remove stale temporary file")
        }
        _ => {}
    }
    match format {
        Format::Vhdx => {
            let parent = VhdxLayer::open(top, VhdxOpenOptions::default())?;
            let (identity, sector) = (
                parent.header().data_write_guid,
                parent.params().logical_sector,
            );
            drop(parent);
            VhdxLayer::create(
                &tmp,
                &VhdxCreateOptions {
                    size,
                    block_size: None,
                    logical_sector: Some(sector),
                    parent: Some(VhdxParent {
                        relative_path: sealed_file,
                        linkage: identity,
                    }),
                },
            )?;
        }
        // A raw layer cannot record a parent, so its child is qcow2.
        Format::Qcow2 | Format::Raw => {
            Qcow2Layer::create(&tmp, size, Some((&sealed_file, format)))?
        }
    }
    faults.check("checkpoint.child-created")?;
    if !sealed.exists() {
        fs::hard_link(top, &sealed).ctx(&sealed, "link sealed layer")?;
    }
    fsync_dir(&dir)?;
    faults.check("checkpoint.linked")?;
    fs::rename(&tmp, top).ctx(top, "rename new layer into place")?;
    faults.check("checkpoint.renamed")?;
    fsync_dir(&dir)?;
    tracing::info!(top = %top.display(), sealed = %sealed.display(), "checkpoint");
    Ok(sealed)
}
