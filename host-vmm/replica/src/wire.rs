//! Frames over a byte stream: the I/O half of [`crate::proto`].

use std::io::{ErrorKind, Read, Write};

use crate::proto::{decode_frame, parse_header, Message, ProtoError, HEADER_LEN, TRAILER_LEN};

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
        let mut bad = buf.clone();
        bad[8] ^= 1;
        assert!(matches!(
            recv(&mut &bad[..]),
            Err(WireError::Proto(ProtoError::Checksum { .. }))
        ));
    }
}
