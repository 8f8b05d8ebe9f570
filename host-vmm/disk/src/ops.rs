//! The operations behind `tandem disk`: create, info, check, checkpoint,
//! commit, convert, compare. Long ones report progress through a callback
//! `(done, total)` in bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::{open_layer, probe, Chain, ChainOptions, LayerOptions};
use crate::checkpoint::{dir_of, fsync_dir, temp_name};
use crate::error::{DiskError, Result};
use crate::fault::FaultHook;
use crate::layer::{BlockDevice, Format, Layer, Status};
use crate::qcow2::Qcow2Layer;
use crate::raw::RawLayer;
use crate::util::Guid;
use crate::vhdx::{VhdxCreateOptions, VhdxLayer, VhdxOpenOptions, VhdxParent};

/// Progress callback: bytes done, bytes total.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

const COPY_CHUNK: u64 = 1 << 20;

/// Creates an image. With a parent, the size defaults to the parent's.
pub fn create(path: &Path, format: Format, size: Option<u64>, parent: Option<&Path>) -> Result<()> {
    let parent_info = match parent {
        Some(p) => {
            let pf = probe(p)?;
            let layer = open_layer(p, pf, &LayerOptions::default())?;
            Some((p, pf, layer.size(), layer.identity()))
        }
        None => None,
    };
    let size = match (size, &parent_info) {
        (Some(s), _) => s,
        (None, Some((_, _, s, _))) => *s,
        (None, None) => {
            return Err(DiskError::Invalid(
                "a size is needed when there is no parent".into(),
            ))
        }
    };
    let parent_name = |p: &Path| -> String {
        // Same directory: store the bare name, so the pair can be moved together.
        if dir_of(p) == dir_of(path)
            || fs::canonicalize(dir_of(p)).ok() == fs::canonicalize(dir_of(path)).ok()
        {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .to_string_lossy()
                .into_owned()
        }
    };
    match (format, parent_info) {
        (Format::Raw, None) => RawLayer::create(path, size)?,
        (Format::Raw, Some(_)) => {
            return Err(DiskError::Unsupported {
                path: path.into(),
                what: "a raw image cannot have a parent".into(),
            })
        }
        (Format::Qcow2, p) => {
            let backing = p.map(|(p, f, _, _)| (parent_name(p), f));
            Qcow2Layer::create(path, size, backing.as_ref().map(|(n, f)| (n.as_str(), *f)))?
        }
        (Format::Vhdx, None) => VhdxLayer::create(
            path,
            &VhdxCreateOptions {
                size,
                block_size: None,
                logical_sector: None,
                parent: None,
            },
        )?,
        (Format::Vhdx, Some((p, pf, psize, identity))) => {
            let Some(linkage) = identity.filter(|_| pf == Format::Vhdx) else {
                return Err(DiskError::ParentFormat {
                    child: path.into(),
                    parent: p.into(),
                    format: pf.name(),
                });
            };
            if psize != size {
                return Err(DiskError::ParentSize {
                    child: path.into(),
                    parent: p.into(),
                    parent_size: psize,
                    child_size: size,
                });
            }
            VhdxLayer::create(
                path,
                &VhdxCreateOptions {
                    size,
                    block_size: None,
                    logical_sector: Some(
                        crate::vhdx::VhdxLayer::open(p, Default::default())?
                            .params()
                            .logical_sector,
                    ),
                    parent: Some(VhdxParent {
                        relative_path: parent_name(p),
                        linkage,
                    }),
                },
            )?
        }
    }
    fsync_dir(&dir_of(path))
}

/// One layer as `info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    pub allocated_bytes: u64,
    /// Every layer below the top is sealed (opened read-only, never written).
    pub sealed: bool,
}

pub fn info(path: &Path) -> Result<Vec<LayerInfo>> {
    let chain = Chain::open(path, ChainOptions::default())?;
    chain
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Ok(LayerInfo {
                path: l.path().into(),
                format: l.format(),
                virtual_size: l.size(),
                allocated_bytes: l.allocated_bytes()?,
                sealed: i > 0,
            })
        })
        .collect()
}

/// What `check` found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Per layer (top first): its path and the problems found (empty: clean).
    pub layers: Vec<(PathBuf, Vec<String>)>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.layers.iter().all(|(_, issues)| issues.is_empty())
    }
}

/// Opens the chain (which validates headers, tables, checksums, the log,
/// every parent link) and runs each layer's own structural check. A chain
/// that does not open is an `Err` naming the fault.
pub fn check(path: &Path) -> Result<CheckReport> {
    let chain = Chain::open(path, ChainOptions::default())?;
    let mut report = CheckReport::default();
    for l in chain.layers() {
        let mut issues = l.check()?;
        let tmp = temp_name(l.path());
        if tmp.exists() {
            issues.push(format!(
                "{} is left from an interrupted checkpoint (harmless; removed by the next one)",
                tmp.display()
            ));
        }
        report.layers.push((l.path().into(), issues));
    }
    Ok(report)
}

/// Checkpoints the chain whose top is `path`. Returns the sealed layer's path.
pub fn checkpoint(path: &Path, faults: FaultHook) -> Result<PathBuf> {
    Chain::open(
        path,
        ChainOptions {
            writable: true,
            format: None,
            faults,
        },
    )?
    .checkpoint()
}

/// Makes the layer at `path` name `parent_name` as its parent (a name
/// relative to the layer's directory, or an absolute path), keeping the
/// recorded parent format and identity: qcow2 rewrites its backing file
/// name, VHDX its parent locator (through its log; its own DataWriteGuid is
/// kept, so a child of it still accepts it). The layer must be closed and
/// already have a parent. Used by a replica site on the layers it stores.
pub fn relink(path: &Path, parent_name: &str) -> Result<()> {
    match probe(path)? {
        Format::Qcow2 => Qcow2Layer::set_backing_name(path, parent_name),
        Format::Vhdx => {
            let identity = VhdxLayer::open(path, VhdxOpenOptions::default())?
                .header()
                .data_write_guid;
            let layer = VhdxLayer::open(
                path,
                VhdxOpenOptions {
                    writable: true,
                    data_write_guid: Some(identity),
                    faults: FaultHook::default(),
                },
            )?;
            layer.set_parent_path(parent_name)?;
            layer.close()
        }
        Format::Raw => Err(DiskError::Unsupported {
            path: path.into(),
            what: "a parent for a raw image".into(),
        }),
    }
}

/// Makes the closed layer at `child` a child of `parent` (in the same
/// directory; named by its file name), whatever its parent was: qcow2
/// rewrites its backing name and format in one page, VHDX its locator and
/// parent linkage (the new parent's DataWriteGuid) through its log, keeping
/// its own DataWriteGuid. Either way a killed process leaves the old link
/// or the new one. The caller makes sure both parents read the same.
pub fn relink_to(child: &Path, parent: &Path) -> Result<()> {
    relink_with_faults(child, parent, &FaultHook::default())
}

fn relink_with_faults(child: &Path, parent: &Path, faults: &FaultHook) -> Result<()> {
    if fs::canonicalize(dir_of(child)).ok() != fs::canonicalize(dir_of(parent)).ok() {
        return Err(DiskError::Unsupported {
            path: child.into(),
            what: format!("a parent in another directory ({})", parent.display()),
        });
    }
    let name = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent_format = probe(parent)?;
    match probe(child)? {
        Format::Qcow2 => Qcow2Layer::set_backing(child, &name, parent_format),
        Format::Vhdx => {
            let linkage = open_layer(parent, parent_format, &LayerOptions::default())?
                .identity()
                .filter(|_| parent_format == Format::Vhdx)
                .ok_or_else(|| DiskError::ParentFormat {
                    child: child.into(),
                    parent: parent.into(),
                    format: parent_format.name(),
                })?;
            let identity = VhdxLayer::open(child, VhdxOpenOptions::default())?
                .header()
                .data_write_guid;
            let layer = VhdxLayer::open(
                child,
                VhdxOpenOptions {
                    writable: true,
                    data_write_guid: Some(identity),
                    faults: faults.clone(),
                },
            )?;
            layer.set_parent(&name, linkage)?;
            layer.close()
        }
        Format::Raw => Err(DiskError::Unsupported {
            path: child.into(),
            what: "a parent for a raw image".into(),
        }),
    }
}

/// What `status` says about a run, looking through several layers (top
/// first) without their parents: the first that holds it decides.
fn status_through(layers: &[Arc<dyn Layer>], offset: u64, len: u64) -> Result<(Status, u64)> {
    let mut len = len;
    for l in layers {
        let (st, n) = l.status(offset, len)?;
        let n = n.clamp(1, len);
        if st != Status::Unallocated {
            return Ok((st, n));
        }
        len = n;
    }
    Ok((Status::Unallocated, len))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Merges a run of sealed layers down into the layer below them, online:
/// `merged` (bottom first, each the child of the one before, the first a
/// child of `target`) are copied into `target`, `child` (the layer above
/// the run, if any) is relinked to `target`, and the merged files are
/// removed. `target` then reads as the newest merged layer did. Used to
/// keep replicated chains short; the files may be open read-only elsewhere
/// (a VM's backend keeps reading its old chain until it reopens it).
///
/// Crash safety: `target` changes only where a merged layer holds data,
/// with the data the newest of them reads there, so every chain that goes
/// through the merged layers (`child`'s, the VM's) reads the same during
/// the copy; only chains that stop at `target` or inside the run change
/// (the caller no longer offers them as recovery points). The target keeps
/// its identity (VHDX DataWriteGuid), so the merged layers keep accepting
/// it. One atomic relink (see [`relink_to`]) then makes `child` skip the
/// run; only then are the merged files removed. The merge is idempotent:
/// run again after a crash, it copies again (the run is intact until the
/// relink) or, if `child` already names `target`, only removes what is left.
pub fn merge_into(
    target: &Path,
    merged: &[PathBuf],
    child: Option<&Path>,
    faults: &FaultHook,
) -> Result<()> {
    merge_link(target, merged, child, faults)?;
    remove_layers(merged, faults)?;
    tracing::info!(target = %target.display(), layers = merged.len(), "merged layers down");
    Ok(())
}

/// The first part of [`merge_into`]: the copy and the relink, without
/// removing the merged files (a caller that records the chain elsewhere,
/// like a replica site's manifest, updates its record in between).
/// Idempotent.
pub fn merge_link(
    target: &Path,
    merged: &[PathBuf],
    child: Option<&Path>,
    faults: &FaultHook,
) -> Result<()> {
    let relinked = match child {
        Some(c) => open_layer(c, probe(c)?, &LayerOptions::default())?
            .parent()
            .is_some_and(|p| same_file(&p.path, target)),
        None => false,
    };
    if !relinked && !merged.is_empty() {
        copy_down(target, merged, faults)?;
        faults.check("merge.copied")?;
        if let Some(c) = child {
            relink_with_faults(c, target, faults)?;
            faults.check("merge.relinked")?;
        }
    }
    Ok(())
}

/// The last part of [`merge_into`]: removes layer files no chain uses any
/// more (missing ones are fine), then syncs their directories.
pub fn remove_layers(files: &[PathBuf], faults: &FaultHook) -> Result<()> {
    for m in files {
        match fs::remove_file(m) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DiskError::Io {
                    path: m.clone(),
                    op: "remove merged layer",
                    source,
                })
            }
        }
        faults.check("merge.removed")?;
    }
    if let Some(first) = files.first() {
        fsync_dir(&dir_of(first))?;
    }
    Ok(())
}

/// The copy of [`merge_into`]: every range a merged layer holds, as the
/// newest of them reads it, into `target` (kept at its identity).
fn copy_down(target: &Path, merged: &[PathBuf], faults: &FaultHook) -> Result<()> {
    let Some(newest) = merged.last() else {
        return Ok(());
    };
    let chain = Chain::open(newest, ChainOptions::default())?;
    let layers = chain.layers();
    let n = merged.len();
    // The chain must be the run (newest first) and then the target.
    let in_order = layers.len() > n
        && merged
            .iter()
            .rev()
            .zip(&layers)
            .all(|(m, l)| same_file(m, l.path()))
        && same_file(target, layers[n].path());
    if !in_order {
        return Err(DiskError::Invalid(format!(
            "{}: the layers to merge are not a run of children of {}",
            newest.display(),
            target.display()
        )));
    }
    let old = &layers[n];
    let writable = open_layer(
        target,
        old.format(),
        &LayerOptions {
            writable: true,
            data_write_guid: old.identity(),
            faults: faults.clone(),
        },
    )?;
    let mut below: Vec<Arc<dyn Layer>> = vec![writable];
    below.extend(layers.iter().skip(n + 1).cloned());
    let out = Chain::from_layers(below)?;
    let run = &layers[..n];
    let size = chain.size().min(out.size());
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let (st, len) = status_through(run, pos, (size - pos).min(COPY_CHUNK))?;
        match st {
            Status::Data => {
                let b = &mut buf[..len as usize];
                chain.read_at(b, pos)?;
                out.write_at(b, pos)?;
            }
            Status::Zero => out.discard(pos, len)?,
            Status::Unallocated => {}
        }
        pos += len;
        faults.check("merge.copying")?;
    }
    out.flush()
}

/// Merges the top layer of the chain at `path` into its parent, which then
/// takes the top's path. Returns the path of the parent's old name (gone now).
///
/// Crash safety: while copying, the parent only changes where the top has
/// data (written with that same data), so the chain still reads the same.
/// A VHDX parent changes identity before its first write (so any other child
/// of it now refuses it), to a DataWriteGuid the top recorded first, through
/// its log, as `parent_linkage2`: the top accepts its parent throughout. After
/// the parent is flushed and closed, one atomic rename replaces the top with it.
pub fn commit(path: &Path, faults: FaultHook, progress: Progress) -> Result<PathBuf> {
    let chain = Chain::open(path, ChainOptions::default())?;
    let layers = chain.layers();
    let (Some(top), Some(parent)) = (layers.first().cloned(), layers.get(1).cloned()) else {
        return Err(DiskError::Invalid(format!(
            "{}: nothing to commit, the image has no parent",
            path.display()
        )));
    };
    let parent_path = parent.path().to_path_buf();
    if fs::canonicalize(dir_of(&parent_path)).ok() != fs::canonicalize(dir_of(path)).ok() {
        return Err(DiskError::Unsupported {
            path: path.into(),
            what: "commit into a parent in another directory".into(),
        });
    }
    let parent_format = parent.format();
    let new_identity = match (top.format(), parent.identity()) {
        (Format::Vhdx, Some(current)) => {
            let recorded = top.parent().map(|p| p.identity).unwrap_or_default();
            if recorded.first() != Some(&current) && recorded.contains(&current) {
                // An interrupted commit already moved the parent to the alternate identity.
                Some(current)
            } else {
                let g = Guid::random().map_err(|source| DiskError::Io {
                    path: path.into(),
                    op: "random GUID",
                    source,
                })?;
                let writable_top = VhdxLayer::open(
                    path,
                    VhdxOpenOptions {
                        writable: true,
                        data_write_guid: None,
                        faults: faults.clone(),
                    },
                )?;
                writable_top.add_parent_linkage2(g)?;
                writable_top.close()?;
                faults.check("commit.linkage2")?;
                Some(g)
            }
        }
        _ => None,
    };
    drop(parent);
    drop(chain);
    {
        let writable_parent = open_layer(
            &parent_path,
            parent_format,
            &LayerOptions {
                writable: true,
                data_write_guid: new_identity,
                faults: faults.clone(),
            },
        )?;
        let mut below: Vec<Arc<dyn Layer>> = vec![writable_parent];
        below.extend(layers.iter().skip(2).cloned());
        let target = Chain::from_layers(below)?;
        let size = top.size().min(target.size());
        let mut pos = 0;
        while pos < size {
            let (st, n) = top.status(pos, (size - pos).min(COPY_CHUNK))?;
            let n = n.min(size - pos);
            match st {
                Status::Data => {
                    let mut buf = vec![0u8; n as usize];
                    top.read_data(&mut buf, pos)?;
                    target.write_at(&buf, pos)?;
                }
                Status::Zero => target.write_at(&vec![0u8; n as usize], pos)?,
                Status::Unallocated => {}
            }
            pos += n;
            progress(pos, size);
            faults.check("commit.copying")?;
        }
        target.flush()?;
        faults.check("commit.parent-flushed")?;
    }
    drop(layers);
    drop(top);
    fs::rename(&parent_path, path).map_err(|source| DiskError::Io {
        path: parent_path.clone(),
        op: "rename parent over the top",
        source,
    })?;
    faults.check("commit.renamed")?;
    fsync_dir(&dir_of(path))?;
    tracing::info!(top = %path.display(), parent = %parent_path.display(), "commit");
    Ok(parent_path)
}

/// Copies the whole chain at `src` into a new single-layer image `dst`.
/// Only ranges the chain holds are written, so the output stays sparse.
pub fn convert(src: &Path, dst: &Path, format: Format, progress: Progress) -> Result<()> {
    let chain = Chain::open(src, ChainOptions::default())?;
    let size = chain.size();
    create(dst, format, Some(size), None)?;
    let out = Chain::open(
        dst,
        ChainOptions {
            writable: true,
            format: Some(format),
            faults: FaultHook::default(),
        },
    )?;
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let (allocated, n) = chain.block_status(pos, (size - pos).min(COPY_CHUNK))?;
        let n = n.clamp(1, size - pos);
        if allocated {
            let b = &mut buf[..n as usize];
            chain.read_at(b, pos)?;
            if b.iter().any(|&x| x != 0) {
                out.write_at(b, pos)?;
            }
        }
        pos += n;
        progress(pos, size);
    }
    out.flush()
}

/// Result of comparing two chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    pub size_a: u64,
    pub size_b: u64,
    /// First byte offset whose content differs (past the shorter disk's end,
    /// the longer one is compared with zeros). `None`: identical.
    pub first_difference: Option<u64>,
}

pub fn compare(a: &Path, b: &Path, progress: Progress) -> Result<Comparison> {
    let ca = Chain::open(a, ChainOptions::default())?;
    let cb = Chain::open(b, ChainOptions::default())?;
    let (size_a, size_b) = (ca.size(), cb.size());
    let total = size_a.max(size_b);
    let mut ba = vec![0u8; COPY_CHUNK as usize];
    let mut bb = vec![0u8; COPY_CHUNK as usize];
    let mut pos = 0;
    while pos < total {
        let n = (total - pos).min(COPY_CHUNK) as usize;
        for (c, buf, size) in [(&ca, &mut ba, size_a), (&cb, &mut bb, size_b)] {
            let have = size.saturating_sub(pos).min(n as u64) as usize;
            c.read_at(&mut buf[..have], pos)?;
            buf[have..n].fill(0);
        }
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Comparison {
                size_a,
                size_b,
                first_difference: Some(pos + i as u64),
            });
        }
        pos += n as u64;
        progress(pos, total);
    }
    Ok(Comparison {
        size_a,
        size_b,
        first_difference: None,
    })
}
