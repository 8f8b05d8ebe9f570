//! Frames over a byte stream: the I/O half of [`crate::proto`].

use std::io::{ErrorKind, Read, Write};
use std::ops::Range;

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
/// 1 MiB chunks: no allocation or extra copy per chunk). A chunk's data is
/// placed at a [`DATA_ALIGN`]-aligned address, so the site can write it
/// with O_DIRECT straight from this buffer.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Where the last frame's payload is in `buf`.
    last: Range<usize>,
}

/// Where a chunk's data starts in its payload (after seq and offset).
pub const CHUNK_DATA_START: usize = 16;

/// Alignment of a chunk's data in memory (a page: what O_DIRECT asks of
/// the buffer on every Linux file system that supports it).
pub const DATA_ALIGN: usize = 4096;

/// A chunk's payload taken out of a [`FrameReader`]: the buffer and where
/// the data is in it (aligned to [`DATA_ALIGN`]).
pub struct ChunkBuf {
    buf: Vec<u8>,
    data: Range<usize>,
}

impl ChunkBuf {
    pub fn data(&self) -> &[u8] {
        self.buf.get(self.data.clone()).unwrap_or_default()
    }

    /// The buffer, for the next frame.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl FrameReader {
    /// Takes the buffer holding the last frame (a chunk) and its data,
    /// leaving `with` for the next frame (a receiver hands chunk payloads
    /// to a writer thread without copying them).
    pub fn take_chunk(&mut self, with: Vec<u8>) -> ChunkBuf {
        let start = self.last.start + CHUNK_DATA_START;
        let data = start.min(self.last.end)..self.last.end;
        self.last = 0..0;
        ChunkBuf {
            buf: std::mem::replace(&mut self.buf, with),
            data,
        }
    }

    /// Makes room for a payload of `len` bytes whose chunk data would be
    /// aligned; returns where it goes. (The buffer only grows: a recycled
    /// one is not zeroed again.)
    fn place(&mut self, len: usize) -> Range<usize> {
        let need = len + CHUNK_DATA_START + DATA_ALIGN;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        let misaligned = (self.buf.as_ptr().addr() + CHUNK_DATA_START) % DATA_ALIGN;
        let start = (DATA_ALIGN - misaligned) % DATA_ALIGN;
        start..start + len
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
        self.last = self.place(len);
        let payload = &mut self.buf[self.last.clone()];
        r.read_exact(payload)?;
        let mut crc = [0u8; TRAILER_LEN];
        r.read_exact(&mut crc)?;
        let payload = &self.buf[self.last.clone()];
        if is_chunk(t) {
            let expected = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
            let found = u32::from_le_bytes(crc);
            if found != expected {
                return Err(ProtoError::Checksum { found, expected }.into());
            }
            let (seq, offset, data) = decode_chunk(payload)?;
            return Ok(Some(Frame::Chunk { seq, offset, data }));
        }
        Ok(Some(Frame::Other(decode_frame(&header, payload, crc)?)))
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

    #[test]
    fn chunk_data_is_page_aligned_and_taken_whole() {
        let mut stream = Vec::new();
        for (offset, len) in [(0u64, 4096usize), (1 << 20, 5000), (2 << 20, 1 << 20)] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            send(
                &mut stream,
                &Message::Chunk {
                    seq: 2,
                    offset,
                    data,
                },
            )
            .unwrap();
        }
        let mut r = &stream[..];
        let mut fr = FrameReader::default();
        let mut spare = Vec::new();
        for (offset, len) in [(0u64, 4096usize), (1 << 20, 5000), (2 << 20, 1 << 20)] {
            match fr.next(&mut r).unwrap() {
                Some(Frame::Chunk {
                    offset: o, data, ..
                }) => {
                    assert_eq!((o, data.len()), (offset, len))
                }
                _ => panic!("not a chunk"),
            }
            let c = fr.take_chunk(spare);
            assert_eq!(c.data().len(), len);
            assert_eq!(c.data().as_ptr().addr() % DATA_ALIGN, 0);
            assert!(c
                .data()
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8 + 1));
            spare = c.into_buffer();
        }
        assert!(fr.next(&mut r).unwrap().is_none());
    }
}
