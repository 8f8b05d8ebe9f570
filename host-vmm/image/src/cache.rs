//! The cache: where built artifacts live, and how they are named.
//!
//! ```text
//! <cache>/steps/<step>-<key>/      one step's output; valid only with .complete
//! <cache>/images/<image-key>.json  the default image: paths into steps/
//! <cache>/logs/<step>-<key>.log    the last build log of each step
//! <cache>/apt/                     the private apt state
//! ```
//! Keys are hashes of every input of a step (pins, recipes, sources, and
//! the keys of the steps it builds on), so a changed input builds anew and
//! an unchanged one is found again. The default cache is
//! `$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{assets, pins};

/// The marker a finished step leaves in its output directory.
pub const COMPLETE: &str = ".complete";

/// A hash of named inputs, 16 hex digits.
#[derive(Default)]
pub struct Key(Sha256);

impl Key {
    pub fn new(kind: &str) -> Key {
        let mut k = Key(Sha256::new());
        k.add("kind", kind.as_bytes());
        k
    }

    pub fn add(&mut self, name: &str, value: &[u8]) -> &mut Key {
        // Length-prefixed, so that no two input lists hash alike.
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
        self
    }

    pub fn add_assets(&mut self, list: &[assets::Asset]) -> &mut Key {
        for a in list {
            self.add(a.path, a.text.as_bytes());
        }
        self
    }

    pub fn finish(&self) -> String {
        let digest = self.0.clone().finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The engine's key: pins and recipes only, so `tandem run` can find it.
pub fn engine_key() -> String {
    Key::new("engine")
        .add("qemu", pins::QEMU_SOURCE_VERSION.as_bytes())
        .add("meson", pins::MESON_VERSION.as_bytes())
        .add("configure", pins::QEMU_CONFIGURE.join(" ").as_bytes())
        .add("suites", pins::APT_SUITES.as_bytes())
        .add_assets(&script_assets(&["lib.sh", "engine.sh"]))
        .add_assets(assets::QEMU_PATCHES)
        .finish()
}

/// The default image's key: everything embedded that shapes the guest
/// (host tool versions are added to the step keys at build time).
pub fn image_key() -> String {
    Key::new("image")
        .add("kernel", pins::KERNEL_PACKAGE.as_bytes())
        .add("kernel-version", pins::KERNEL_PACKAGE_VERSION.as_bytes())
        .add("llvm", pins::LLVM_SUFFIX.as_bytes())
        .add("bindgen", pins::BINDGEN_VERSION.as_bytes())
        .add("append", pins::DEFAULT_APPEND.as_bytes())
        .add("tools", pins::GUEST_TOOLS.join(" ").as_bytes())
        .add_assets(assets::SCRIPTS)
        .add_assets(&[assets::KERNEL_FRAGMENT])
        .add_assets(assets::MODULE_SOURCES)
        .add_assets(assets::ROOTFS)
        .add_assets(assets::GUEST_TOOL_SOURCES)
        .finish()
}

pub fn script_assets(names: &[&str]) -> Vec<assets::Asset> {
    assets::SCRIPTS
        .iter()
        .filter(|a| names.iter().any(|n| a.path.ends_with(&format!("/{n}"))))
        .copied()
        .collect()
}

/// What `tandem image build` records for `tandem run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub image_key: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub module: PathBuf,
    pub append: String,
    pub kernel_release: String,
    pub module_version: String,
    pub abi_version: String,
    /// Step name to the key it was built with.
    pub steps: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn at(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The default location (see the module docs).
    pub fn default_location() -> Cache {
        if let Some(d) = std::env::var_os("TANDEM_CACHE_DIR") {
            return Cache::at(d);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/cache"));
        Cache::at(base.join("tandem"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn step_dir(&self, step: &str, key: &str) -> PathBuf {
        self.root.join("steps").join(format!("{step}-{key}"))
    }

    pub fn is_complete(&self, step: &str, key: &str) -> bool {
        self.step_dir(step, key).join(COMPLETE).is_file()
    }

    pub fn log_path(&self, step: &str, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{step}-{key}.log"))
    }

    pub fn manifest_path(&self, image_key: &str) -> PathBuf {
        self.root.join("images").join(format!("{image_key}.json"))
    }

    /// The engine `tandem image build` made, if it made one.
    pub fn engine_binary(&self) -> Option<PathBuf> {
        let key = engine_key();
        self.is_complete("engine", &key)
            .then(|| self.step_dir("engine", &key).join("bin/qemu-system-x86_64"))
    }

    /// The default image of this build of Tandem, if it has been built and
    /// its files are all still there.
    pub fn default_image(&self) -> Option<ImageManifest> {
        let text = std::fs::read_to_string(self.manifest_path(&image_key())).ok()?;
        let m: ImageManifest = serde_json::from_str(&text).ok()?;
        (m.kernel.is_file() && m.initrd.is_file()).then_some(m)
    }

    pub fn write_manifest(&self, m: &ImageManifest) -> std::io::Result<()> {
        let path = self.manifest_path(&m.image_key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

impl ImageManifest {
    pub fn defaults(&self) -> tandem_vmm::ImageDefaults {
        tandem_vmm::ImageDefaults {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_sensitive() {
        let a = Key::new("x").add("a", b"1").finish();
        assert_eq!(a, Key::new("x").add("a", b"1").finish());
        assert_eq!(a.len(), 16);
        assert_ne!(a, Key::new("x").add("a", b"2").finish());
        assert_ne!(a, Key::new("y").add("a", b"1").finish());
        // Boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(
            Key::new("x").add("ab", b"c").finish(),
            Key::new("x").add("a", b"bc").finish()
        );
        assert_eq!(engine_key(), engine_key());
        assert_ne!(engine_key(), image_key());
    }

    #[test]
    fn manifest_roundtrip_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path());
        assert!(cache.default_image().is_none());
        let k = dir.path().join("bzImage");
        let i = dir.path().join("initramfs");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let m = ImageManifest {
            image_key: image_key(),
            kernel: k.clone(),
            initrd: i,
            module: dir.path().join("tandem.ko"),
            append: "console=ttyS0".into(),
            kernel_release: "7.3.4".into(),
            module_version: "0.1.0".into(),
            abi_version: "1.0".into(),
            steps: vec![],
        };
        cache.write_manifest(&m).unwrap();
        assert_eq!(cache.default_image(), Some(m));
        std::fs::remove_file(k).unwrap();
        assert!(
            cache.default_image().is_none(),
            "a manifest whose files are gone is no image"
        );
        assert!(cache.engine_binary().is_none());
    }
}
