//! The VM lifecycle as a pure state machine.
//!
//! Inputs are operator commands (from the API or signals) and what QEMU
//! reports (QMP events, process exit); outputs are the QMP commands to send.
//! The plumbing in [`crate::vm`] feeds it and carries out its actions, so
//! every rule about what may happen when lives here and is unit-tested.

use std::time::Duration;

use tandem_api::VmState;

/// What an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Shutdown { force: bool, timeout: Duration },
}

/// What QEMU tells us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// `cont` succeeded at start-up.
    Started,
    /// QMP `STOP`.
    Stopped,
    /// QMP `RESUME`.
    Resumed,
    /// QMP `SHUTDOWN` with its reason.
    Shutdown { reason: String },
    /// The QEMU process exited.
    Exited,
    /// The grace period of a shutdown ran out.
    ShutdownTimeout,
}

/// What the plumbing must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this QMP command.
    Qmp(&'static str),
    /// Call back with [`Observed::ShutdownTimeout`] after this long.
    ArmShutdownTimer(Duration),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("the VM is {0}, not running")]
    NotRunning(VmState),
    #[error("the VM is {0}, not paused")]
    NotPaused(VmState),
    #[error("the VM is already {0}")]
    AlreadyStopping(VmState),
}

/// How the VM ended, once it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered itself off (or obeyed the power button).
    GuestPoweroff,
    /// Tandem stopped QEMU (forced, or the guest ignored the button).
    Forced,
    /// The guest reset or panicked; with `-no-reboot` that ends the VM.
    GuestReset { reason: String },
    /// QEMU exited with no shutdown event: it crashed or was killed.
    EngineLost,
    /// QEMU was stopped from outside, e.g. by a signal.
    Host { reason: String },
}

#[derive(Clone, Debug)]
pub struct Lifecycle {
    state: VmState,
    /// Set when the operator asked for a shutdown.
    requested_shutdown: Option<bool>,
    forced: bool,
    shutdown_reason: Option<String>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            state: VmState::Starting,
            requested_shutdown: None,
            forced: false,
            shutdown_reason: None,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn command(&mut self, cmd: Command) -> Result<Vec<Action>, LifecycleError> {
        use VmState::*;
        match (cmd, self.state) {
            (Command::Pause, Running) => Ok(vec![Action::Qmp("stop")]),
            (Command::Pause, s) => Err(LifecycleError::NotRunning(s)),
            (Command::Resume, Paused) => Ok(vec![Action::Qmp("cont")]),
            (Command::Resume, s) => Err(LifecycleError::NotPaused(s)),
            (Command::Shutdown { .. }, s @ (ShuttingDown | Stopped)) => {
                Err(LifecycleError::AlreadyStopping(s))
            }
            (Command::Shutdown { force, timeout }, s) => {
                self.state = ShuttingDown;
                self.requested_shutdown = Some(force);
                if force || s == Starting {
                    // A guest that has not run cannot see the button.
                    self.forced = true;
                    return Ok(vec![Action::Qmp("quit")]);
                }
                let mut actions = Vec::new();
                if s == Paused {
                    // A paused guest cannot see the button either.
                    actions.push(Action::Qmp("cont"));
                }
                actions.push(Action::Qmp("system_powerdown"));
                actions.push(Action::ArmShutdownTimer(timeout));
                Ok(actions)
            }
        }
    }

    pub fn observe(&mut self, what: Observed) -> Vec<Action> {
        use VmState::*;
        match what {
            Observed::Started => {
                if self.state == Starting {
                    self.state = Running;
                }
                vec![]
            }
            Observed::Stopped => {
                if self.state == Running {
                    self.state = Paused;
                }
                vec![]
            }
            Observed::Resumed => {
                if matches!(self.state, Paused | Starting) {
                    self.state = Running;
                }
                vec![]
            }
            Observed::Shutdown { reason } => {
                if self.state != Stopped {
                    self.state = ShuttingDown;
                }
                self.shutdown_reason.get_or_insert(reason);
                vec![]
            }
            Observed::ShutdownTimeout => {
                if self.state == ShuttingDown {
                    self.forced = true;
                    vec![Action::Qmp("quit")]
                } else {
                    vec![]
                }
            }
            Observed::Exited => {
                self.state = Stopped;
                vec![]
            }
        }
    }

    /// How the VM ended; meaningful once the state is `Stopped`.
    pub fn ending(&self) -> Ending {
        match self.shutdown_reason.as_deref() {
            _ if self.forced => Ending::Forced,
            Some("guest-shutdown") => Ending::GuestPoweroff,
            Some(r @ ("guest-reset" | "guest-panic")) => Ending::GuestReset {
                reason: r.to_owned(),
            },
            Some("host-qmp-quit") => Ending::Forced,
            Some(r) => Ending::Host {
                reason: r.to_owned(),
            },
            None => Ending::EngineLost,
        }
    }

    /// True once a graceful shutdown was asked for and the guest obeyed.
    pub fn graceful(&self) -> bool {
        self.requested_shutdown == Some(false) && !self.forced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    fn running() -> Lifecycle {
        let mut l = Lifecycle::new();
        l.observe(Observed::Started);
        assert_eq!(l.state(), VmState::Running);
        l
    }

    #[test]
    fn pause_and_resume() {
        let mut l = running();
        assert_eq!(l.command(Command::Pause), Ok(vec![Action::Qmp("stop")]));
        // The state follows QEMU's event, not the command.
        assert_eq!(l.state(), VmState::Running);
        l.observe(Observed::Stopped);
        assert_eq!(l.state(), VmState::Paused);
        assert_eq!(
            l.command(Command::Pause),
            Err(LifecycleError::NotRunning(VmState::Paused))
        );
        assert_eq!(l.command(Command::Resume), Ok(vec![Action::Qmp("cont")]));
        l.observe(Observed::Resumed);
        assert_eq!(l.state(), VmState::Running);
        assert_eq!(
            l.command(Command::Resume),
            Err(LifecycleError::NotPaused(VmState::Running))
        );
    }

    #[test]
    fn graceful_shutdown() {
        let mut l = running();
        let a = l
            .command(Command::Shutdown {
                force: false,
                timeout: T,
            })
            .unwrap();
        assert_eq!(
            a,
            vec![Action::Qmp("system_powerdown"), Action::ArmShutdownTimer(T)]
        );
        assert_eq!(l.state(), VmState::ShuttingDown);
        assert!(matches!(
            l.command(Command::Pause),
            Err(LifecycleError::NotRunning(VmState::ShuttingDown))
        ));
        assert!(l
            .command(Command::Shutdown {
                force: true,
                timeout: T
            })
            .is_err());
        l.observe(Observed::Shutdown {
            reason: "guest-shutdown".into(),
        });
        l.observe(Observed::Exited);
        // A late timer does nothing.
        assert!(l.observe(Observed::ShutdownTimeout).is_empty());
        assert_eq!(l.state(), VmState::Stopped);
        assert_eq!(l.ending(), Ending::GuestPoweroff);
        assert!(l.graceful());
    }

    #[test]
    fn ignored_button_is_forced_after_the_timeout() {
        let mut l = running();
        l.command(Command::Shutdown {
            force: false,
            timeout: T,
        })
        .unwrap();
        assert_eq!(
            l.observe(Observed::ShutdownTimeout),
            vec![Action::Qmp("quit")]
        );
        l.observe(Observed::Shutdown {
            reason: "host-qmp-quit".into(),
        });
        l.observe(Observed::Exited);
        assert_eq!(l.ending(), Ending::Forced);
        assert!(!l.graceful());
    }

    #[test]
    fn paused_vm_is_resumed_to_see_the_button_and_starting_vm_is_quit() {
        let mut l = running();
        l.command(Command::Pause).unwrap();
        l.observe(Observed::Stopped);
        let a = l
            .command(Command::Shutdown {
                force: false,
                timeout: T,
            })
            .unwrap();
        assert_eq!(a[0], Action::Qmp("cont"));
        assert_eq!(a[1], Action::Qmp("system_powerdown"));

        let mut l = Lifecycle::new();
        assert_eq!(
            l.command(Command::Shutdown {
                force: false,
                timeout: T
            }),
            Ok(vec![Action::Qmp("quit")])
        );
    }

    #[test]
    fn endings() {
        let mut l = running();
        l.observe(Observed::Shutdown {
            reason: "guest-reset".into(),
        });
        l.observe(Observed::Exited);
        assert_eq!(
            l.ending(),
            Ending::GuestReset {
                reason: "guest-reset".into()
            }
        );

        let mut l = running();
        l.observe(Observed::Exited);
        assert_eq!(l.ending(), Ending::EngineLost);

        let mut l = running();
        l.observe(Observed::Shutdown {
            reason: "host-signal".into(),
        });
        l.observe(Observed::Exited);
        assert_eq!(
            l.ending(),
            Ending::Host {
                reason: "host-signal".into()
            }
        );
    }
}
