//! Running the build steps, with locking, logs and progress.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::debug;

use crate::assets;
use crate::cache::{engine_key, image_key, script_assets, Cache, ImageManifest, Key, COMPLETE};
use crate::pins;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {what}: {detail}")]
    Tool { what: String, detail: String },
    #[error("step {step} failed ({status}); last lines of {log}:\n{tail}")]
    Step {
        step: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("step {step} finished but {missing} is missing")]
    Output { step: String, missing: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Use a system QEMU that is new enough instead of building the pinned
    /// one (it lacks Tandem's fix for hot-unplugging vfio-user devices
    /// unless its vendor applied one).
    pub system_engine: bool,
}

/// How a step ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Cached,
    Built(Duration),
    Skipped(String),
}

#[derive(Clone, Debug)]
pub struct StepReport {
    pub name: String,
    pub key: String,
    pub outcome: StepOutcome,
}

#[derive(Clone, Debug)]
pub struct BuildReport {
    pub engine: PathBuf,
    pub image: ImageManifest,
    pub steps: Vec<StepReport>,
}

pub struct Builder {
    cache: Cache,
    opts: BuildOptions,
    scripts: PathBuf,
    reports: Vec<StepReport>,
    total_steps: usize,
}

const STEPS: usize = 5;

impl Builder {
    pub fn new(cache: Cache, opts: BuildOptions) -> Builder {
        let scripts = cache.root().join("scripts");
        Builder {
            cache,
            opts,
            scripts,
            reports: Vec::new(),
            total_steps: STEPS,
        }
    }

    /// Builds (or finds in the cache) the engine and the default image.
    pub fn build(mut self) -> Result<BuildReport, BuildError> {
        let root = self.cache.root().to_owned();
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let _lock = lock(&root.join("lock"))?;
        // Fresh copies of the recipes for this build.
        let _ = std::fs::remove_dir_all(&self.scripts);
        assets::write_all(assets::SCRIPTS, &self.scripts).map_err(io(&self.scripts))?;
        assets::write_all(assets::QEMU_PATCHES, &self.scripts).map_err(io(&self.scripts))?;

        let engine = self.engine()?;

        let bindgen_key = Key::new("bindgen")
            .add("version", pins::BINDGEN_VERSION.as_bytes())
            .add_assets(&script_assets(&["lib.sh", "bindgen.sh"]))
            .finish();
        let bindgen = self.step(
            "bindgen",
            &bindgen_key,
            "bindgen.sh",
            &[("TANDEM_BINDGEN_VERSION", pins::BINDGEN_VERSION.into())],
        )?;

        let work = root.join("work");
        let inputs = work.join("inputs");
        let _ = std::fs::remove_dir_all(&inputs);
        let mut all = vec![assets::KERNEL_FRAGMENT];
        all.extend_from_slice(assets::MODULE_SOURCES);
        all.extend_from_slice(assets::ROOTFS);
        all.extend_from_slice(assets::GUEST_TOOL_SOURCES);
        assets::write_all(&all, &inputs).map_err(io(&inputs))?;

        let rustc = tool_version("rustc", &["--version"])?;
        let clang = tool_version(&format!("clang{}", pins::LLVM_SUFFIX), &["--version"])?;
        let kernel_key = Key::new("kernel")
            .add("package", pins::KERNEL_PACKAGE.as_bytes())
            .add("version", pins::KERNEL_PACKAGE_VERSION.as_bytes())
            .add("suites", pins::APT_SUITES.as_bytes())
            .add("llvm", pins::LLVM_SUFFIX.as_bytes())
            .add("rustc", rustc.as_bytes())
            .add("clang", clang.as_bytes())
            .add("bindgen", bindgen_key.as_bytes())
            .add_assets(&[assets::KERNEL_FRAGMENT])
            .add_assets(&script_assets(&["lib.sh", "kernel.sh"]))
            .finish();
        let kernel = self.step(
            "kernel",
            &kernel_key,
            "kernel.sh",
            &[
                ("TANDEM_KERNEL_PACKAGE", pins::KERNEL_PACKAGE.into()),
                (
                    "TANDEM_KERNEL_PACKAGE_VERSION",
                    pins::KERNEL_PACKAGE_VERSION.into(),
                ),
                (
                    "TANDEM_KERNEL_FRAGMENT",
                    path_string(&inputs.join(assets::KERNEL_FRAGMENT.path)),
                ),
                ("TANDEM_BINDGEN_DIR", path_string(&bindgen)),
                ("TANDEM_LLVM_SUFFIX", pins::LLVM_SUFFIX.into()),
            ],
        )?;

        let module_key = Key::new("module")
            .add("kernel", kernel_key.as_bytes())
            .add_assets(assets::MODULE_SOURCES)
            .add_assets(&script_assets(&["lib.sh", "module.sh"]))
            .finish();
        let module = self.step(
            "module",
            &module_key,
            "module.sh",
            &[
                ("TANDEM_KERNEL_TREE", path_string(&kernel.join("linux"))),
                ("TANDEM_MODULE_SRC", path_string(&inputs)),
                ("TANDEM_BINDGEN_DIR", path_string(&bindgen)),
                ("TANDEM_LLVM_SUFFIX", pins::LLVM_SUFFIX.into()),
            ],
        )?;
        let module_ko = module.join("tandem.ko");

        let mut initramfs_key = Key::new("initramfs");
        initramfs_key
            .add("module", module_key.as_bytes())
            .add("tools", pins::GUEST_TOOLS.join(" ").as_bytes())
            .add_assets(assets::ROOTFS)
            .add_assets(assets::GUEST_TOOL_SOURCES)
            .add("gcc", tool_version("gcc", &["--version"])?.as_bytes())
            .add_assets(&script_assets(&["lib.sh", "initramfs.sh"]));
        for pkg in pins::GUEST_TOOL_PACKAGES {
            initramfs_key.add(pkg, package_version(pkg).as_bytes());
        }
        let initramfs_key = initramfs_key.finish();
        let initramfs = self.step(
            "initramfs",
            &initramfs_key,
            "initramfs.sh",
            &[
                ("TANDEM_MODULE_KO", path_string(&module_ko)),
                (
                    "TANDEM_ROOTFS_SRC",
                    path_string(&inputs.join("guest-linux/initramfs")),
                ),
                ("TANDEM_GUEST_TOOLS", pins::GUEST_TOOLS.join(" ")),
                (
                    "TANDEM_TOOLS_SRC",
                    path_string(&inputs.join("guest-linux/tools")),
                ),
            ],
        )?;

        let kernel_release = std::fs::read_to_string(kernel.join("release"))
            .map_err(io(&kernel))?
            .trim()
            .to_owned();
        let manifest = ImageManifest {
            image_key: image_key(),
            kernel: kernel.join("bzImage"),
            initrd: initramfs.join("initramfs.cpio.zst"),
            module: module_ko,
            append: pins::DEFAULT_APPEND.into(),
            kernel_release,
            module_version: env!("CARGO_PKG_VERSION").into(),
            // The module compiles shared-abi's own files, so this is what it speaks.
            abi_version: shared_abi::ABI_VERSION.to_string(),
            steps: self
                .reports
                .iter()
                .map(|r| (r.name.clone(), r.key.clone()))
                .collect(),
        };
        self.cache
            .write_manifest(&manifest)
            .map_err(io(&self.cache.manifest_path(&manifest.image_key)))?;
        let _ = std::fs::remove_dir_all(&inputs);
        Ok(BuildReport {
            engine,
            image: manifest,
            steps: self.reports,
        })
    }

    fn engine(&mut self) -> Result<PathBuf, BuildError> {
        let key = engine_key();
        if self.opts.system_engine {
            let path_env = std::env::var_os("PATH");
            if let Ok(e) = tandem_engine::Engine::find(None, None, path_env.as_deref()) {
                let why = format!(
                    "system QEMU {} at {} is new enough",
                    e.version,
                    e.path.display()
                );
                self.announce("engine", &StepOutcome::Skipped(why.clone()));
                self.reports.push(StepReport {
                    name: "engine".into(),
                    key,
                    outcome: StepOutcome::Skipped(why),
                });
                return Ok(e.path);
            }
        }
        let out = self.step(
            "engine",
            &key,
            "engine.sh",
            &[
                (
                    "TANDEM_QEMU_SOURCE_VERSION",
                    pins::QEMU_SOURCE_VERSION.into(),
                ),
                ("TANDEM_QEMU_CONFIGURE", pins::QEMU_CONFIGURE.join(" ")),
                ("TANDEM_MESON_VERSION", pins::MESON_VERSION.into()),
                ("TANDEM_APT_SUITES", pins::APT_SUITES.into()),
                (
                    "TANDEM_QEMU_PATCHES",
                    path_string(&self.scripts.join("host-vmm/image/patches/qemu")),
                ),
            ],
        )?;
        let bin = out.join("bin/qemu-system-x86_64");
        // The built engine must pass the same checks as any other.
        tandem_engine::Engine::inspect(&bin, "cache").map_err(|e| BuildError::Tool {
            what: "the built engine".into(),
            detail: e.to_string(),
        })?;
        Ok(bin)
    }

    fn announce(&self, name: &str, outcome: &StepOutcome) {
        let n = self.reports.len() + 1;
        let text = match outcome {
            StepOutcome::Cached => "cached".to_string(),
            StepOutcome::Built(d) => format!("built in {}", human(*d)),
            StepOutcome::Skipped(why) => format!("skipped: {why}"),
        };
        eprintln!("[{n}/{}] {name:<9} {text}", self.total_steps);
    }

    /// Runs one step unless its output is already complete.
    fn step(
        &mut self,
        name: &str,
        key: &str,
        script: &str,
        env: &[(&str, String)],
    ) -> Result<PathBuf, BuildError> {
        let out = self.cache.step_dir(name, key);
        if self.cache.is_complete(name, key) {
            self.announce(name, &StepOutcome::Cached);
            self.reports.push(StepReport {
                name: name.into(),
                key: key.into(),
                outcome: StepOutcome::Cached,
            });
            return Ok(out);
        }
        let work = self.cache.root().join("work").join(format!("{name}-{key}"));
        for d in [&out, &work] {
            if d.exists() {
                std::fs::remove_dir_all(d).map_err(io(d))?;
            }
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let log_path = self.cache.log_path(name, key);
        if let Some(p) = log_path.parent() {
            std::fs::create_dir_all(p).map_err(io(p))?;
        }
        let log = File::create(&log_path).map_err(io(&log_path))?;
        debug!(step = name, key, "building");

        let script_path = self.scripts.join("host-vmm/image/scripts").join(script);
        let (reader, writer) = std::io::pipe().map_err(io(&log_path))?;
        let mut cmd = Command::new("bash");
        cmd.arg(&script_path)
            .env("TANDEM_STEP_OUT", &out)
            .env("TANDEM_STEP_WORK", &work)
            .env("TANDEM_CACHE_DIR", self.cache.root())
            .env("TANDEM_APT_SUITES", pins::APT_SUITES)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().map_err(io(&log_path))?)
            .stderr(writer);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let begun = Instant::now();
        let mut child = cmd.spawn().map_err(|e| BuildError::Tool {
            what: "bash".into(),
            detail: e.to_string(),
        })?;
        drop(cmd); // closes our copies of the pipe's write end

        let last = Arc::new(Mutex::new(String::new()));
        let copier = {
            let last = last.clone();
            let mut log = log;
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    let _ = writeln!(log, "{line}");
                    if !line.trim().is_empty() {
                        *last.lock().unwrap_or_else(|p| p.into_inner()) = line;
                    }
                }
            })
        };

        let n = self.reports.len() + 1;
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(format!("[{n}/{}] {name:<9}", self.total_steps));
            b.enable_steady_tick(Duration::from_millis(120));
            Some(b)
        } else {
            eprintln!(
                "[{n}/{}] {name:<9} building (log: {})",
                self.total_steps,
                log_path.display()
            );
            None
        };
        let mut last_beat = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Ok(s),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let line = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match &bar {
                Some(b) => b.set_message(line),
                None if last_beat.elapsed() >= Duration::from_secs(30) => {
                    eprintln!(
                        "[{n}/{}] {name:<9} {:>5} {line}",
                        self.total_steps,
                        human(begun.elapsed())
                    );
                    last_beat = Instant::now();
                }
                None => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _ = copier.join();
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let status = status.map_err(|e| BuildError::Tool {
            what: script.into(),
            detail: e.to_string(),
        })?;
        let _ = std::fs::remove_dir_all(&work);
        if !status.success() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            // A failed step leaves no output behind.
            let _ = std::fs::remove_dir_all(&out);
            return Err(BuildError::Step {
                step: name.into(),
                status: status.to_string(),
                log: log_path,
                tail,
            });
        }
        let took = begun.elapsed();
        let marker = out.join(COMPLETE);
        std::fs::write(
            &marker,
            serde_json::json!({"step": name, "key": key, "seconds": took.as_secs_f64()})
                .to_string(),
        )
        .map_err(io(&marker))?;
        let outcome = StepOutcome::Built(took);
        self.announce(name, &outcome);
        self.reports.push(StepReport {
            name: name.into(),
            key: key.into(),
            outcome,
        });
        Ok(out)
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The first line a tool prints about its version; an error names the tool.
fn tool_version(tool: &str, args: &[&str]) -> Result<String, BuildError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| BuildError::Tool {
            what: tool.into(),
            detail: format!("{e} (ci/deps installs the build dependencies)"),
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}

/// A Debian package's installed version, or "absent".
fn package_version(pkg: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "absent".into())
}

/// An exclusive lock on the cache, so two builds never interleave.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<File>, BuildError> {
    use nix::fcntl::{Flock, FlockArg};
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((f, _)) => {
            eprintln!("waiting for another `tandem image build` to finish...");
            Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| BuildError::Io {
                path: path.to_owned(),
                source: e.into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humane_durations() {
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
    }
}
