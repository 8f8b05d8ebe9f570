//! Fault injection for crash-consistency tests: named steps of multi-step
//! on-disk updates ask the hook whether to stop there, as a crash would.

use std::fmt;
use std::sync::Arc;

use crate::error::{DiskError, Result};

type Hook = dyn Fn(&str) -> bool + Send + Sync;

/// A hook consulted at each named step; `None` (the default) never fails.
#[derive(Clone, Default)]
pub struct FaultHook(Option<Arc<Hook>>);

impl FaultHook {
    pub fn new(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> FaultHook {
        FaultHook(Some(Arc::new(f)))
    }

    /// Returns an error if the hook asks to fail at `step`.
    pub fn check(&self, step: &str) -> Result<()> {
        match &self.0 {
            Some(f) if f(step) => Err(DiskError::InjectedFault(step.to_string())),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "FaultHook(set)"
        } else {
            "FaultHook(none)"
        })
    }
}
