//! Frames over a byte stream: the I/O half of [`crate::proto`].

use std::io::{ErrorKind, Read, Write};

use crate::proto::{
    decode_chunk, decode_frame, is_chunk, parse_header, Message, ProtoError, HEADER_LEN,
    TRAILER_LEN,
};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame from the peer")]
    Proto(#[from] ProtoError),
}

/// Sends one message and flushes.
pub fn send(w: &mut impl Write, m: &Message) -> Result<(), WireError> {
    w.write_all(&m.encode())?;
    w.flush()?;
    Ok(())
}

/// Sends one message without flushing (for a run of chunks).
pub fn queue(w: &mut impl Write, m: &Message) -> Result<(), WireError> {
    w.write_all(&m.encode())?;
    Ok(())
}

/// Receives one message; `None` when the peer closed between frames.
pub fn recv(r: &mut impl Read) -> Result<Option<Message>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (_, len) = parse_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let mut crc = [0u8; TRAILER_LEN];
    r.read_exact(&mut crc)?;
    Ok(Some(decode_frame(&header, &payload, crc)?))
}

/// What [`FrameReader::next`] returns: chunks borrowed from its buffer,
/// everything else decoded.
pub enum Frame<'a> {
    Chunk {
        seq: u64,
        offset: u64,
        data: &'a [u8],
    },
    Other(Message),
}

/// Receives frames into one reusable buffer (a layer is thousands of
/// 1 MiB chunks: no allocation or extra copy per chunk).
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

/// Where a chunk's data starts in its payload (after seq and offset).
pub const CHUNK_DATA_START: usize = 16;

impl FrameReader {
    /// Takes the buffer holding the last frame's payload, leaving `with`
    /// for the next frame (a receiver hands chunk payloads to a writer
    /// thread without copying them).
    pub fn swap_buffer(&mut self, with: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.buf, with)
    }

    /// The next frame; `None` when the peer closed between frames.
    pub fn next<'a>(&'a mut self, r: &mut impl Read) -> Result<Option<Frame<'a>>, WireError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let (t, len) = parse_header(&header)?;
        self.buf.resize(len, 0);
        r.read_exact(&mut self.buf)?;
        let mut crc = [0u8; TRAILER_LEN];
        r.read_exact(&mut crc)?;
        if is_chunk(t) {
            let expected = crc32c::crc32c_append(crc32c::crc32c(&header), &self.buf);
            let found = u32::from_le_bytes(crc);
            if found != expected {
                return Err(ProtoError::Checksum { found, expected }.into());
            }
            let (seq, offset, data) = decode_chunk(&self.buf)?;
            return Ok(Some(Frame::Chunk { seq, offset, data }));
        }
        Ok(Some(Frame::Other(decode_frame(&header, &self.buf, crc)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_a_stream_and_eof_is_clean_only_between_frames() {
        let m = Message::LayerAck {
            seq: 3,
            digest: [1; 32],
        };
        let mut buf = Vec::new();
        send(&mut buf, &m).unwrap();
        send(&mut buf, &m).unwrap();
        let mut r = &buf[..];
        assert_eq!(recv(&mut r).unwrap(), Some(m.clone()));
        assert_eq!(recv(&mut r).unwrap(), Some(m));
        assert!(recv(&mut r).unwrap().is_none());
        let mut cut = &buf[..10];
        assert!(recv(&mut cut).is_err());
        let mut fr = FrameReader::default();
        let mut r = &buf[..];
        assert!(matches!(fr.next(&mut r).unwrap(), Some(Frame::Other(_))));
        let mut chunk = Vec::new();
        send(
            &mut chunk,
            &Message::Chunk {
                seq: 1,
                offset: 0,
                data: vec![5; 10],
            },
        )
        .unwrap();
        match fr.next(&mut &chunk[..]).unwrap() {
            Some(Frame::Chunk { seq, offset, data }) => {
                assert_eq!((seq, offset, data), (1, 0, &[5u8; 10][..]))
            }
            _ => panic!("not a chunk"),
        }
        chunk[20] ^= 1;
        assert!(fr.next(&mut &chunk[..]).is_err());
        let mut bad = buf.clone();
        bad[8] ^= 1;
        assert!(matches!(
            recv(&mut &bad[..]),
            Err(WireError::Proto(ProtoError::Checksum { .. }))
        ));
    }
}
