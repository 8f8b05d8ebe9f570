//! Test support for the process-level fault tests (a file server, a
//! replication sender or receiver, a vhost-user backend killed with
//! SIGKILL at random points).
//!
//! Each such test binary holds a `#[test] fn child_entry()` that does
//! nothing in a normal run and, when its environment names a role, runs
//! the process under test and exits. [`reexec`] starts the binary again
//! as that child; [`Proc`] SIGKILLs it at the latest when dropped, so a
//! failing test leaves no process behind; [`Proc::ready`] reads the
//! child's `ready <address>` line. [`Rng`] gives reproducible kill points
//! without a dependency.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A command that runs this test binary's test `entry` alone, with its
/// stdout piped (for [`Proc::ready`]) and its stderr dropped. The caller
/// adds the environment that makes `entry` run the child.
pub fn reexec(entry: &str) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut c = Command::new(exe);
    c.args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// A child process, killed with SIGKILL (and reaped) at the latest when
/// dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Starts `c` (from [`reexec`]).
    pub fn spawn(mut c: Command) -> Proc {
        Proc(c.spawn().expect("cannot start the child process"))
    }

    /// SIGKILLs the child and reaps it.
    pub fn sigkill(&mut self) {
        // std's kill is SIGKILL on Unix.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the child's `ready <text>` line and returns `<text>`;
    /// its stdout is drained from then on, so that it never blocks on the
    /// pipe. Panics if the child exits first.
    pub fn ready(&mut self) -> String {
        let out = self.0.stdout.take().expect("the child's stdout is piped");
        let mut out = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap_or(0) > 0,
                "the child process exited before it was ready"
            );
            // The test harness prints its own lines first ("test
            // child_entry ... " may precede it on the same line).
            if let Some(at) = line.find("ready ") {
                let text = line[at + 6..].trim().to_owned();
                std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
                return text;
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// xorshift64*: reproducible random points without a dependency.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is made odd).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A generator seeded from the clock, its seed printed so that a
    /// failing run can be repeated.
    pub fn from_clock(what: &str) -> Rng {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        eprintln!("{what} seed {:#x}", s | 1);
        Rng::new(s)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_repeats_from_a_seed_and_stays_below() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..1000 {
            let x = a.below(7);
            assert_eq!(x, b.below(7));
            assert!(x < 7);
        }
        let mut c = Rng::new(0);
        assert_ne!(c.next_u64(), 0);
    }
}
