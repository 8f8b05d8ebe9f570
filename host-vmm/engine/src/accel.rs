//! Choosing the accelerator.
//!
//! KVM is only worth choosing when it can really boot a standard kernel.
//! `/dev/kvm` may exist and answer ioctls yet be unable to (the software PVM
//! module found on some cloud machines emulates a standard kernel instruction
//! by instruction and fails early in boot), so the choice is made from
//! facts, including, where possible, a boot probe: a real boot of the guest
//! kernel under KVM. [`choose`] is pure; [`gather`] reads the host.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelRequest {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelRequest::Auto),
            "kvm" => Ok(AccelRequest::Kvm),
            "tcg" => Ok(AccelRequest::Tcg),
            other => Err(format!("unknown accelerator '{other}' (auto, kvm or tcg)")),
        }
    }
}

/// The state of `/dev/kvm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DevKvm {
    Missing,
    /// It exists but cannot be used (permissions, or the open/ioctl failed).
    Unusable {
        error: String,
    },
    Usable {
        api_version: i32,
    },
}

/// Facts about the host that decide the accelerator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelFacts {
    pub dev_kvm: DevKvm,
    /// The KVM implementation is the software PVM module (`kvm_pvm`), which
    /// boots only PVM-enabled guest kernels.
    pub pvm: bool,
    /// Result of booting a guest kernel under KVM, when one was run:
    /// `Ok(())` when the guest reached its init, else why not.
    pub boot_probe: Option<Result<(), String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accel: Accel,
    /// One sentence saying why, for the log and `tandem info`.
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("KVM was requested but cannot be used: {0}")]
pub struct KvmUnavailable(pub String);

/// Whether a boot probe would change the decision: only when KVM looks usable.
pub fn wants_probe(req: AccelRequest, facts: &AccelFacts) -> bool {
    req == AccelRequest::Auto
        && matches!(facts.dev_kvm, DevKvm::Usable { .. })
        && !facts.pvm
        && facts.boot_probe.is_none()
}

/// Decides the accelerator. An explicit `kvm` request that cannot be met is
/// an error rather than a silent fall back to TCG.
pub fn choose(req: AccelRequest, facts: &AccelFacts) -> Result<AccelChoice, KvmUnavailable> {
    let kvm_problem: Option<String> = match &facts.dev_kvm {
        DevKvm::Missing => Some("/dev/kvm does not exist".into()),
        DevKvm::Unusable { error } => Some(format!("/dev/kvm cannot be used: {error}")),
        DevKvm::Usable { api_version } if *api_version != 12 => {
            Some(format!("/dev/kvm has API version {api_version}, not 12"))
        }
        DevKvm::Usable { .. } if facts.pvm => Some(
            "/dev/kvm is the software PVM module (kvm_pvm), which cannot boot a standard kernel"
                .into(),
        ),
        DevKvm::Usable { .. } => match &facts.boot_probe {
            Some(Err(why)) => Some(format!("a guest kernel did not boot under KVM: {why}")),
            _ => None,
        },
    };
    match (req, kvm_problem) {
        (AccelRequest::Tcg, _) => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "TCG was requested".into(),
        }),
        (AccelRequest::Kvm, Some(problem)) => Err(KvmUnavailable(problem)),
        (AccelRequest::Kvm, None) => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: "KVM was requested".into(),
        }),
        (AccelRequest::Auto, Some(problem)) => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: problem,
        }),
        (AccelRequest::Auto, None) => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: match facts.boot_probe {
                Some(Ok(())) => "KVM: a guest kernel booted under it".into(),
                _ => "KVM: /dev/kvm is usable (no boot probe run)".into(),
            },
        }),
    }
}

/// Reads `/dev/kvm` and the loaded KVM modules. `sys_module` is normally
/// `/sys/module`. The boot probe is left to the caller (it needs an engine
/// and a kernel).
pub fn gather(sys_module: &Path) -> AccelFacts {
    let dev_kvm = if !Path::new("/dev/kvm").exists() {
        DevKvm::Missing
    } else {
        match kvm_ioctls::Kvm::new() {
            Ok(kvm) => DevKvm::Usable {
                api_version: kvm.get_api_version(),
            },
            Err(e) => DevKvm::Unusable {
                error: e.to_string(),
            },
        }
    };
    AccelFacts {
        dev_kvm,
        pvm: sys_module.join("kvm_pvm").exists(),
        boot_probe: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev_kvm: DevKvm, pvm: bool, probe: Option<Result<(), String>>) -> AccelFacts {
        AccelFacts {
            dev_kvm,
            pvm,
            boot_probe: probe,
        }
    }
    const OK: DevKvm = DevKvm::Usable { api_version: 12 };

    #[test]
    fn auto_picks_kvm_only_when_it_can_boot() {
        let c = choose(AccelRequest::Auto, &facts(OK, false, Some(Ok(())))).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        assert!(c.reason.contains("booted"));
        let c = choose(AccelRequest::Auto, &facts(OK, false, None)).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        let c = choose(
            AccelRequest::Auto,
            &facts(OK, false, Some(Err("no init within 20s".into()))),
        )
        .unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("no init within 20s"), "{}", c.reason);
    }

    #[test]
    fn pvm_missing_and_broken_kvm_fall_back_to_tcg_with_a_reason() {
        for (f, needle) in [
            (facts(OK, true, None), "kvm_pvm"),
            (facts(DevKvm::Missing, false, None), "does not exist"),
            (
                facts(
                    DevKvm::Unusable {
                        error: "Permission denied".into(),
                    },
                    false,
                    None,
                ),
                "Permission denied",
            ),
            (
                facts(DevKvm::Usable { api_version: 11 }, false, None),
                "API version 11",
            ),
        ] {
            let c = choose(AccelRequest::Auto, &f).unwrap();
            assert_eq!(c.accel, Accel::Tcg);
            assert!(c.reason.contains(needle), "{} lacks {needle}", c.reason);
        }
    }

    #[test]
    fn explicit_requests() {
        let pvm = facts(OK, true, None);
        let err = choose(AccelRequest::Kvm, &pvm).unwrap_err();
        assert!(err.to_string().contains("kvm_pvm"));
        assert_eq!(choose(AccelRequest::Tcg, &pvm).unwrap().accel, Accel::Tcg);
        assert_eq!(
            choose(AccelRequest::Kvm, &facts(OK, false, None))
                .unwrap()
                .accel,
            Accel::Kvm
        );
    }

    #[test]
    fn probe_only_when_it_could_change_the_answer() {
        assert!(wants_probe(AccelRequest::Auto, &facts(OK, false, None)));
        assert!(!wants_probe(AccelRequest::Auto, &facts(OK, true, None)));
        assert!(!wants_probe(AccelRequest::Tcg, &facts(OK, false, None)));
        assert!(!wants_probe(
            AccelRequest::Auto,
            &facts(DevKvm::Missing, false, None)
        ));
        assert!(!wants_probe(
            AccelRequest::Auto,
            &facts(OK, false, Some(Ok(())))
        ));
    }

    #[test]
    fn parses_requests() {
        assert_eq!("auto".parse::<AccelRequest>(), Ok(AccelRequest::Auto));
        assert_eq!("kvm".parse::<AccelRequest>(), Ok(AccelRequest::Kvm));
        assert!("hvf".parse::<AccelRequest>().is_err());
    }
}
