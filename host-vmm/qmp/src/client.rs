//! The QMP connection: negotiation, commands and events over a Unix stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, warn};

use crate::protocol::{command_line, Event, Greeting, Incoming, ProtocolError};

/// The longest line accepted from QEMU. Replies to the queries Tandem makes
/// are a few kilobytes; anything this large means a broken peer.
pub const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O error")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("QMP connection closed (QEMU exited?)")]
    Closed,
    #[error("QEMU did not greet within {0:?}")]
    NoGreeting(Duration),
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("unexpected QMP reply during negotiation: {0:?}")]
    Unexpected(Box<Incoming>),
}

type Reply = Result<Value, QmpError>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// A negotiated QMP connection. Cheap to share behind an `Arc`.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    closed: Arc<AtomicBool>,
    greeting: Greeting,
    timeout: Duration,
}

impl Qmp {
    /// Reads the greeting, negotiates capabilities and starts the reader.
    /// `timeout` bounds the greeting and, later, every command.
    pub async fn connect(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let first = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| QmpError::NoGreeting(timeout))??
            .ok_or(QmpError::Closed)?;
        let greeting = match Incoming::parse(&first)? {
            Incoming::Greeting(g) => g,
            other => return Err(QmpError::Unexpected(Box::new(other))),
        };
        debug!(version = %greeting.version, "QMP greeting");
        write
            .write_all(command_line("qmp_capabilities", None, 0).as_bytes())
            .await?;
        // Events cannot arrive before capabilities are accepted, so the next
        // line is the reply.
        let reply = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "qmp_capabilities".into(),
                after: timeout,
            })??
            .ok_or(QmpError::Closed)?;
        match Incoming::parse(&reply)? {
            Incoming::Return { .. } => {}
            Incoming::Error { class, desc, .. } => {
                return Err(QmpError::Command {
                    command: "qmp_capabilities".into(),
                    class,
                    desc,
                })
            }
            other => return Err(QmpError::Unexpected(Box::new(other))),
        }

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(reader_task(
            reader,
            pending.clone(),
            events.clone(),
            closed.clone(),
        ));
        Ok(Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            greeting,
            timeout,
        })
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Events from now on. Subscribe before sending the command whose
    /// events you wait for.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Reply {
        self.execute_with_timeout(command, arguments, self.timeout)
            .await
    }

    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Reply {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let line = command_line(command, arguments.as_ref(), id);
        debug!(command, id, "QMP command");
        let sent = {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e.into());
        }
        // The reader may have closed between the check above and the insert.
        if self.is_closed() {
            lock(&self.pending).remove(&id);
            return Err(QmpError::Closed);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply.map_err(|e| match e {
                QmpError::Command { class, desc, .. } => QmpError::Command {
                    command: command.to_owned(),
                    class,
                    desc,
                },
                other => other,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_owned(),
                    after: timeout,
                })
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent
    // (single inserts and removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one line, bounded by [`MAX_LINE`]. `Ok(None)` at end of stream.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, QmpError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(QmpError::Closed)
            };
        }
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..pos]);
            r.consume(pos + 1);
            break;
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        r.consume(n);
        if line.len() > MAX_LINE {
            return Err(QmpError::LineTooLong);
        }
    }
    if line.len() > MAX_LINE {
        return Err(QmpError::LineTooLong);
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ProtocolError::NotJson("not UTF-8".into()).into())
}

async fn reader_task<R: AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: Arc<AtomicBool>,
) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "QMP connection failed");
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match Incoming::parse(&line) {
            Ok(Incoming::Event(event)) => {
                debug!(event = %event.name, "QMP event");
                // No subscriber is fine: nobody is waiting for this event.
                let _ = events.send(event);
            }
            Ok(Incoming::Return { id, value }) => complete(&pending, id, Ok(value)),
            Ok(Incoming::Error { id, class, desc }) => complete(
                &pending,
                id,
                Err(QmpError::Command {
                    command: String::new(),
                    class,
                    desc,
                }),
            ),
            Ok(Incoming::Greeting(_)) => warn!("QMP greeting in the middle of a session, ignored"),
            Err(e) => warn!(error = %e, "QMP line ignored"),
        }
    }
    closed.store(true, Ordering::Release);
    // Dropping the senders wakes every waiter with `Closed`.
    lock(&pending).clear();
}

fn complete(pending: &Pending, id: Option<Value>, reply: Reply) {
    let Some(id) = id.as_ref().and_then(Value::as_u64) else {
        warn!(?id, "QMP reply without a usable id, ignored");
        return;
    };
    match lock(pending).remove(&id) {
        Some(tx) => {
            // The waiter may have timed out and gone; nothing to do then.
            let _ = tx.send(reply);
        }
        None => warn!(id, "QMP reply for no pending command (timed out?), ignored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::AsyncReadExt;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 2, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n";

    /// A fake QEMU: greets, accepts capabilities, then hands the stream to
    /// `script`, which plays the rest of the conversation.
    async fn fake_qemu<F, Fut>(script: F) -> UnixStream
    where
        F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (ours, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut peer = BufReader::new(theirs);
            peer.get_mut().write_all(GREETING.as_bytes()).await.unwrap();
            let mut line = String::new();
            peer.read_line(&mut line).await.unwrap();
            let cmd: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(cmd["execute"], "qmp_capabilities");
            peer.get_mut()
                .write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", cmd["id"]).as_bytes())
                .await
                .unwrap();
            script(peer).await;
        });
        ours
    }

    async fn next_command(peer: &mut BufReader<UnixStream>) -> Value {
        let mut line = String::new();
        peer.read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[tokio::test]
    async fn negotiates_and_matches_replies_by_id() {
        let stream = fake_qemu(|mut peer| async move {
            let a = next_command(&mut peer).await;
            let b = next_command(&mut peer).await;
            // Reply out of order, with an event in between.
            let w = peer.get_mut();
            w.write_all(format!("{{\"return\": \"b\", \"id\": {}}}\n", b["id"]).as_bytes())
                .await
                .unwrap();
            w.write_all(
                b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
            )
            .await
            .unwrap();
            w.write_all(format!("{{\"return\": \"a\", \"id\": {}}}\n", a["id"]).as_bytes())
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = peer.read_to_end(&mut rest).await;
        })
        .await;
        let qmp = Arc::new(Qmp::connect(stream, Duration::from_secs(5)).await.unwrap());
        assert_eq!(qmp.greeting().version.major, 10);
        let mut events = qmp.subscribe();
        let q1 = qmp.clone();
        let a = tokio::spawn(async move { q1.execute("a", None).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = qmp.execute("b", Some(json!({"x": 1}))).await.unwrap();
        assert_eq!(b, json!("b"));
        assert_eq!(a.await.unwrap().unwrap(), json!("a"));
        assert_eq!(events.recv().await.unwrap().name, "STOP");
    }

    #[tokio::test]
    async fn command_errors_carry_the_command_name() {
        let stream = fake_qemu(|mut peer| async move {
            let c = next_command(&mut peer).await;
            peer.get_mut()
                .write_all(
                    format!(
                        "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}, \"id\": {}}}\n",
                        c["id"]
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = peer.read_to_end(&mut rest).await;
        })
        .await;
        let qmp = Qmp::connect(stream, Duration::from_secs(5)).await.unwrap();
        let err = qmp.execute("cont", None).await.unwrap_err();
        assert_eq!(err.to_string(), "QMP command cont failed: GenericError: no");
    }

    #[tokio::test]
    async fn peer_exit_fails_pending_and_later_commands() {
        let stream = fake_qemu(|mut peer| async move {
            let _ = next_command(&mut peer).await;
            // QEMU dies without answering.
        })
        .await;
        let qmp = Qmp::connect(stream, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(
            qmp.execute("quit", None).await,
            Err(QmpError::Closed)
        ));
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.execute("query-status", None).await,
            Err(QmpError::Closed)
        ));
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let stream = fake_qemu(|mut peer| async move {
            let _ = next_command(&mut peer).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let qmp = Qmp::connect(stream, Duration::from_millis(200))
            .await
            .unwrap();
        let err = qmp.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn no_greeting_or_garbage_is_an_error() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let silent = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(theirs);
        });
        assert!(matches!(
            Qmp::connect(ours, Duration::from_millis(100)).await,
            Err(QmpError::NoGreeting(_))
        ));
        silent.abort();

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"hello there\n").await.unwrap();
        assert!(matches!(
            Qmp::connect(ours, Duration::from_secs(1)).await,
            Err(QmpError::Protocol(_))
        ));

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"{\"return\": {}}\n").await.unwrap();
        assert!(matches!(
            Qmp::connect(ours, Duration::from_secs(1)).await,
            Err(QmpError::Unexpected(_))
        ));
    }

    #[tokio::test]
    async fn oversized_line_closes_the_connection() {
        let stream = fake_qemu(|mut peer| async move {
            let _ = next_command(&mut peer).await;
            let junk = vec![b'x'; MAX_LINE + 10];
            let _ = peer.get_mut().write_all(&junk).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let qmp = Qmp::connect(stream, Duration::from_secs(10)).await.unwrap();
        assert!(matches!(
            qmp.execute("query-status", None).await,
            Err(QmpError::Closed)
        ));
    }
}
