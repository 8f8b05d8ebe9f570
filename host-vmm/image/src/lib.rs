//! Builds the pinned execution engine and the default guest image into a
//! cache keyed by their inputs, and finds them again for `tandem run`.
//!
//! The recipes are shell scripts (`scripts/`, embedded in the binary):
//! apt, configure and make are the natural language for them. This crate
//! owns what the scripts do not: the pins ([`pins`]), the cache keys and
//! layout ([`cache`]), the step order, locking, logs and progress
//! ([`build`]). It never touches the system's apt configuration: sources
//! are fetched through a private list and state directory.
#![forbid(unsafe_code)]

pub mod assets;
pub mod build;
pub mod cache;
pub mod pins;

pub use build::{BuildError, BuildOptions, Builder};
pub use cache::{Cache, ImageManifest};
