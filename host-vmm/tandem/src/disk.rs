//! `tandem disk`: create, inspect, check, checkpoint, commit, convert and
//! compare disk images and their chains (the work is `tandem_disk::ops`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_disk::{ops, FaultHook, Format};

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Create an image (raw, qcow2 or vhdx), optionally on top of a parent.
    Create {
        path: PathBuf,
        /// raw, qcow2 or vhdx.
        #[arg(long, short = 'f', value_parser = parse_format)]
        format: Format,
        /// Virtual size (bytes, or with K/M/G/T); defaults to the parent's.
        #[arg(long, short = 's', value_parser = parse_size)]
        size: Option<u64>,
        /// Parent image (qcow2: any format; vhdx: a vhdx of the same size).
        #[arg(long, short = 'p')]
        parent: Option<PathBuf>,
    },
    /// Show the chain: each layer's path, format, sizes and whether it is sealed.
    Info {
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every layer's structure; exits 1 if a problem is found.
    Check { path: PathBuf },
    /// Seal the top layer and start a new differencing layer at the same path.
    /// With --disk: a running VM's disk, by its vhost-blk backend, while the guest writes.
    Checkpoint {
        /// The top of the chain (no VM may be using it).
        #[arg(required_unless_present = "disk")]
        path: Option<PathBuf>,
        /// A running VM's `if=vhost-blk` disk, as `tandem info` names it (disk0, ...).
        #[arg(long, conflicts_with = "path")]
        disk: Option<String>,
        #[command(flatten)]
        target: crate::Target,
    },
    /// Merge the top layer into its parent (the parent takes the top's path).
    Commit { path: PathBuf },
    /// Copy a chain into a new single-layer image of any format.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        /// Output format: raw, qcow2 or vhdx.
        #[arg(long, short = 'O', value_parser = parse_format)]
        format: Format,
    },
    /// Compare two chains byte for byte; exits 1 at the first difference.
    Compare { a: PathBuf, b: PathBuf },
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format {s:?} (raw, qcow2 or vhdx)"))
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn progress_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn with_progress<T>(
    what: &str,
    f: impl FnOnce(ops::Progress) -> tandem_disk::Result<T>,
) -> Result<T> {
    let bar = progress_bar(what);
    let r = f(&|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    Ok(r?)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn disk(cmd: DiskCmd) -> Result<i32> {
    match cmd {
        DiskCmd::Create {
            path,
            format,
            size,
            parent,
        } => {
            ops::create(&path, format, size, parent.as_deref())
                .with_context(|| format!("creating {}", path.display()))?;
            println!("created {} ({format})", path.display());
            Ok(0)
        }
        DiskCmd::Info { path, json } => {
            let layers = ops::info(&path).with_context(|| format!("opening {}", path.display()))?;
            if json {
                let v: Vec<_> = layers
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "path": l.path, "format": l.format.name(), "virtual_size": l.virtual_size,
                            "allocated_bytes": l.allocated_bytes, "sealed": l.sealed,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (i, l) in layers.iter().enumerate() {
                    println!(
                        "{i}: {}  {}  virtual {}  allocated {}  {}",
                        l.path.display(),
                        l.format,
                        human(l.virtual_size),
                        human(l.allocated_bytes),
                        if l.sealed { "sealed" } else { "top (writable)" }
                    );
                }
            }
            Ok(0)
        }
        DiskCmd::Check { path } => check(&path),
        DiskCmd::Checkpoint {
            disk: Some(disk),
            target,
            ..
        } => crate::vhost::checkpoint_live(&target, &disk),
        DiskCmd::Checkpoint { path: None, .. } => bail!("name a disk image, or --disk of a VM"),
        DiskCmd::Checkpoint {
            path: Some(path), ..
        } => {
            let sealed = ops::checkpoint(&path, FaultHook::default())
                .with_context(|| format!("checkpointing {}", path.display()))?;
            println!(
                "sealed the previous top as {}; {} is the new top",
                sealed.display(),
                path.display()
            );
            Ok(0)
        }
        DiskCmd::Commit { path } => {
            let merged = with_progress("commit", |p| ops::commit(&path, FaultHook::default(), p))
                .with_context(|| format!("committing {}", path.display()))?;
            println!(
                "merged {} into its parent, now at {} ({} is gone)",
                path.display(),
                path.display(),
                merged.display()
            );
            Ok(0)
        }
        DiskCmd::Convert { src, dst, format } => {
            if dst.exists() {
                bail!("{} exists; not overwriting it", dst.display());
            }
            with_progress("convert", |p| ops::convert(&src, &dst, format, p))
                .with_context(|| format!("converting {} to {}", src.display(), dst.display()))?;
            println!("wrote {} ({format})", dst.display());
            Ok(0)
        }
        DiskCmd::Compare { a, b } => {
            let c = with_progress("compare", |p| ops::compare(&a, &b, p))?;
            if c.size_a != c.size_b {
                println!(
                    "sizes differ: {} is {} bytes, {} is {} bytes",
                    a.display(),
                    c.size_a,
                    b.display(),
                    c.size_b
                );
            }
            match c.first_difference {
                None => {
                    println!("images are identical");
                    Ok(0)
                }
                Some(off) => {
                    println!("content differs at offset {off} ({off:#x})");
                    Ok(1)
                }
            }
        }
    }
}

fn check(path: &Path) -> Result<i32> {
    let report = match ops::check(path) {
        Ok(r) => r,
        Err(e) => {
            println!("{}: does not open: {e}", path.display());
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                println!("  caused by: {s}");
                src = s.source();
            }
            return Ok(1);
        }
    };
    for (layer, issues) in &report.layers {
        if issues.is_empty() {
            println!("{}: no problems found", layer.display());
        }
        for i in issues {
            println!("{}: {i}", layer.display());
        }
    }
    Ok(if report.is_clean() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn every_subcommand_on_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("d.vhdx");
        let flat = dir.path().join("flat.qcow2");
        let other = dir.path().join("other.img");
        let run = |cmd| disk(cmd).unwrap();
        assert_eq!(
            run(DiskCmd::Create {
                path: top.clone(),
                format: Format::Vhdx,
                size: Some(64 << 20),
                parent: None
            }),
            0
        );
        assert_eq!(
            run(DiskCmd::Checkpoint {
                path: Some(top.clone()),
                disk: None,
                target: crate::Target {
                    vm: "vm0".into(),
                    api_socket: None
                },
            }),
            0
        );
        assert_eq!(ops::info(&top).unwrap().len(), 2);
        assert_eq!(
            run(DiskCmd::Info {
                path: top.clone(),
                json: true
            }),
            0
        );
        assert_eq!(run(DiskCmd::Check { path: top.clone() }), 0);
        assert_eq!(
            run(DiskCmd::Convert {
                src: top.clone(),
                dst: flat.clone(),
                format: Format::Qcow2
            }),
            0
        );
        assert!(
            disk(DiskCmd::Convert {
                src: top.clone(),
                dst: flat.clone(),
                format: Format::Qcow2
            })
            .is_err(),
            "refuses to overwrite"
        );
        assert_eq!(
            run(DiskCmd::Compare {
                a: top.clone(),
                b: flat.clone()
            }),
            0
        );
        assert_eq!(
            run(DiskCmd::Create {
                path: other.clone(),
                format: Format::Raw,
                size: Some(64 << 20),
                parent: None
            }),
            0
        );
        std::fs::write(&other, [1u8]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        assert_eq!(
            run(DiskCmd::Compare {
                a: top.clone(),
                b: other.clone()
            }),
            1
        );
        assert_eq!(run(DiskCmd::Commit { path: top.clone() }), 0);
        assert_eq!(ops::info(&top).unwrap().len(), 1);
        std::fs::write(&top, b"vhdxfile but broken").unwrap();
        assert_eq!(run(DiskCmd::Check { path: top }), 1);
    }
}
