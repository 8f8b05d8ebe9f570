//! Frames over a blocking byte stream (TCP): the one place that reads and
//! writes them, for the server and the client alike.

use std::io::{self, Read, Write};

use crate::proto::{decode_from, parse_header, Message, ProtoError, HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection")]
    Io(#[from] io::Error),
    #[error("bad frame")]
    Proto(#[from] ProtoError),
}

/// Reads one message; `None` when the peer closed between frames.
pub fn read_message(r: &mut impl Read) -> Result<Option<Message>, StreamError> {
    let mut h = [0u8; HEADER_LEN];
    // The first byte tells a clean end from a cut frame.
    match r.read(&mut h[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut h[1..])?;
    let (kind, len) = parse_header(&h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Message::decode(kind, &payload)?))
}

/// Reads frames from a stream with a read timeout: bytes of a frame cut
/// by a timeout are kept for the next call, so a timeout never loses
/// data. The buffer is allocated once (and grown to the largest frame
/// seen); bytes are read into its free end, frames decoded in place.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Undecoded bytes are `buf[head..tail]`.
    head: usize,
    tail: usize,
}

/// Bytes asked of the stream per read, at least.
const READ_CHUNK: usize = 256 << 10;

impl FrameReader {
    /// The next message; `None` when the peer closed between frames; a
    /// timeout is `StreamError::Io` of kind `WouldBlock` or `TimedOut`.
    pub fn next(&mut self, r: &mut impl Read) -> Result<Option<Message>, StreamError> {
        loop {
            let have = &self.buf[self.head..self.tail];
            if let Some((m, used)) = decode_from(have)? {
                self.head += used;
                if self.head == self.tail {
                    self.head = 0;
                    self.tail = 0;
                }
                return Ok(Some(m));
            }
            // Room for the whole frame being read (its length is checked
            // against the bound by decode_from above) and a chunk more.
            let need = match have.first_chunk::<HEADER_LEN>() {
                Some(h) => HEADER_LEN + parse_header(h)?.1,
                None => HEADER_LEN,
            };
            if self.head > 0 && self.buf.len() - self.head < need.max(READ_CHUNK) {
                self.buf.copy_within(self.head..self.tail, 0);
                self.tail -= self.head;
                self.head = 0;
            }
            let want = self.head + need.max(READ_CHUNK);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let n = r.read(&mut self.buf[self.tail..])?;
            if n == 0 {
                return if self.tail == self.head {
                    Ok(None)
                } else {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                };
            }
            self.tail += n;
        }
    }
}

/// Writes one message and flushes.
pub fn write_message(w: &mut impl Write, m: &Message) -> io::Result<()> {
    w.write_all(&m.encode())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{RefuseCode, MAX_PAYLOAD};

    #[test]
    fn frames_through_a_stream() {
        let m = Message::Refuse {
            code: RefuseCode::Busy,
            reason: "full".into(),
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &m).unwrap();
        write_message(&mut buf, &m).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_message(&mut r).unwrap(), Some(m.clone()));
        assert_eq!(read_message(&mut r).unwrap(), Some(m));
        assert_eq!(read_message(&mut r).unwrap(), None);
        // A cut frame is an error, not an end.
        let mut r = &buf[..3];
        assert!(read_message(&mut r).is_err());
        // A frame reader keeps what a timeout cut.
        struct Dribble<'a>(&'a [u8], bool);
        impl Read for Dribble<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = self.0.len().min(out.len()).min(3);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut d = Dribble(&buf, false);
        let mut fr = FrameReader::default();
        let mut got = Vec::new();
        for _ in 0..1000 {
            match fr.next(&mut d) {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(StreamError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), 2);
        // A length over the bound is refused before allocating.
        let big = (MAX_PAYLOAD as u32 + 1).to_be_bytes();
        let mut r = &[2, big[0], big[1], big[2], big[3]][..];
        assert!(matches!(
            read_message(&mut r),
            Err(StreamError::Proto(ProtoError::TooLong { .. }))
        ));
    }
}
