//! Driving a guest through its serial console.
//!
//! The harness reads everything the guest prints into one buffer and waits
//! for patterns in it; commands are wrapped in unique begin/end markers so
//! that their output and exit status can be cut out of the console stream
//! (which also carries the echo of what we type and kernel messages).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::Notify;

pub struct Console {
    buf: Arc<Mutex<String>>,
    grew: Arc<Notify>,
    writer: OwnedWriteHalf,
    /// Where the next search starts.
    cursor: usize,
    seq: u64,
}

fn lock(m: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Console {
    /// Connects to a serial socket, waiting for it to appear.
    pub async fn connect(path: &Path, limit: Duration) -> Result<Console> {
        let begun = Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if begun.elapsed() < limit => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("serial socket {}", path.display()))
                }
            }
        };
        let (mut read, writer) = stream.into_split();
        let buf = Arc::new(Mutex::new(String::new()));
        let grew = Arc::new(Notify::new());
        {
            let buf = buf.clone();
            let grew = grew.clone();
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = read.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    lock(&buf).push_str(&String::from_utf8_lossy(&chunk[..n]).replace('\r', ""));
                    grew.notify_waiters();
                }
            });
        }
        Ok(Console {
            buf,
            grew,
            writer,
            cursor: 0,
            seq: 0,
        })
    }

    /// Everything the guest printed so far.
    pub fn transcript(&self) -> String {
        lock(&self.buf).clone()
    }

    /// Types `text` at the console. Bounded: a guest that stopped
    /// reading its serial port (hung, or QEMU stopped) fails the step
    /// instead of blocking the run forever.
    pub async fn send(&mut self, text: &str) -> Result<()> {
        const LIMIT: Duration = Duration::from_secs(60);
        match tokio::time::timeout(LIMIT, self.writer.write_all(text.as_bytes())).await {
            Ok(written) => Ok(written?),
            Err(_) => bail!(
                "the guest's console took no input for {LIMIT:?} (hung?); console tail:\n{}",
                tail(&self.transcript(), 25)
            ),
        }
    }

    /// Waits for `pattern` after the cursor; moves the cursor past it.
    pub async fn wait_for(&mut self, pattern: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.grew.notified();
            {
                let b = lock(&self.buf);
                if let Some(at) = b[self.cursor.min(b.len())..].find(pattern) {
                    self.cursor += at + pattern.len();
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the guest did not print {pattern:?} within {limit:?}; console tail:\n{}",
                    tail(&self.transcript(), 25)
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Whether `pattern` appears after the cursor within `limit` (no error).
    pub async fn sees(&mut self, pattern: &str, limit: Duration) -> bool {
        self.wait_for(pattern, limit).await.is_ok()
    }

    /// Waits until the shell answers: types a computed echo until its
    /// result appears (the echo of the typed line does not contain it).
    pub async fn wait_for_shell(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.send("echo tandem-shell-$((6*7))\n").await?;
            if self
                .sees("tandem-shell-42", Duration::from_millis(300))
                .await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no shell within {limit:?}; console tail:\n{}",
                    tail(&self.transcript(), 25)
                );
            }
        }
    }

    /// Runs a shell command; returns its output and exit status.
    pub async fn run(&mut self, cmd: &str, limit: Duration) -> Result<(String, i32)> {
        self.seq += 1;
        let b = format!("@@B{}@@", self.seq);
        let e = format!("@@E{}@@", self.seq);
        // The markers are printed with a computed part so the typed echo of
        // this line never matches them.
        let line = format!(
            "echo @@B$(({}))@@; {cmd}; echo @@E$(({}))@@ $?\n",
            self.seq, self.seq
        );
        self.send(&line).await?;
        // A kernel message may land on the console right after the marker,
        // before the echo's newline: the output starts after that line.
        self.wait_for(&b, limit).await?;
        self.wait_for("\n", limit).await?;
        let start = self.cursor;
        self.wait_for(&e, limit)
            .await
            .with_context(|| format!("running {cmd:?}"))?;
        let end = self.cursor - e.len();
        let text = lock(&self.buf)[start..end].to_owned();
        // The status follows the end marker on the same line, unless a
        // kernel message landed between them: then on a line of its own.
        let mut from = end + e.len();
        for _ in 0..4 {
            self.wait_for("\n", limit).await?;
            let status_line = lock(&self.buf)[from..self.cursor].trim().to_owned();
            if let Ok(status) = status_line.parse::<i32>() {
                return Ok((text, status));
            }
            if !status_line.starts_with('[') {
                bail!("bad status line {status_line:?} after {cmd:?}");
            }
            from = self.cursor;
        }
        bail!("no status line after {cmd:?}")
    }

    /// Runs a command that must succeed; returns its output, trimmed.
    pub async fn check(&mut self, cmd: &str) -> Result<String> {
        let (out, status) = self.run(cmd, Duration::from_secs(60)).await?;
        if status != 0 {
            bail!("guest command {cmd:?} failed with status {status}:\n{out}");
        }
        Ok(out.trim().to_owned())
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
