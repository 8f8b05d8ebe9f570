//! The receiver's side of one connection, as a pure state machine: it
//! decides whether a primary is accepted, checks that layers arrive in
//! order with chunks where the rules put them, and verifies each layer's
//! digest. The server (`server.rs`) does the I/O its answers call for.

use crate::manifest::Manifest;
use crate::proto::{hex, LayerDigest, Message, Partial, RefuseCode, WireFormat, VERSION};

/// A refusal: sent to the peer, then the connection closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: RefuseCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: RefuseCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
    pub fn message(&self) -> Message {
        Message::Refuse {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// Who the primary is, once accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub chain_id: [u8; 16],
    pub generation: u64,
    pub disk_size: u64,
}

/// A layer being received.
pub struct Incoming {
    pub seq: u64,
    pub format: WireFormat,
    pub file_len: u64,
    pub sealed_at_ms: u64,
    pub has_parent: bool,
    pub name: String,
    /// Resumed: chunks below this offset are the site's own (replayed
    /// from its partial file), the sender's start here. 0: a fresh layer.
    pub resume_from: u64,
    digest: LayerDigest,
}

impl Incoming {
    /// Where the chunks received so far end: every chunk below is in the file.
    pub fn received_up_to(&self) -> u64 {
        self.digest.next_offset()
    }
}

/// A partial layer the site holds (the next one, cut mid-transfer), offered
/// to the primary in its welcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub seq: u64,
    pub format: WireFormat,
    pub file_len: u64,
    pub sealed_at_ms: u64,
    pub name: String,
    pub offset: u64,
}

/// A layer whose bytes all arrived and whose digest matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    pub seq: u64,
    pub format: WireFormat,
    pub file_len: u64,
    pub sealed_at_ms: u64,
    pub has_parent: bool,
    pub name: String,
    pub digest: [u8; 32],
}

#[derive(Default)]
pub struct Session {
    peer: Option<Peer>,
    last_seq: u64,
    incoming: Option<Incoming>,
    offer: Option<Offer>,
}

fn protocol(reason: impl Into<String>) -> Refusal {
    Refusal::new(RefuseCode::Protocol, reason)
}

impl Session {
    pub fn new() -> Session {
        Session::default()
    }

    pub fn peer(&self) -> Option<&Peer> {
        self.peer.as_ref()
    }

    pub fn incoming(&self) -> Option<&Incoming> {
        self.incoming.as_ref()
    }

    /// The first message. Accepts the primary if the site is empty or holds
    /// this chain at this or an older generation; answers with where to resume.
    pub fn hello(
        &mut self,
        msg: &Message,
        manifest: &Manifest,
    ) -> Result<(Peer, Message), Refusal> {
        self.hello_with(msg, manifest, None)
    }

    /// [`Session::hello`], offering a partial layer (ignored unless it is
    /// the next one): the welcome names it, and a `layer-begin` that
    /// describes the same layer resumes it.
    pub fn hello_with(
        &mut self,
        msg: &Message,
        manifest: &Manifest,
        offer: Option<Offer>,
    ) -> Result<(Peer, Message), Refusal> {
        let Message::Hello {
            version,
            chain_id,
            generation,
            disk_size,
        } = msg
        else {
            return Err(Refusal::new(
                RefuseCode::Version,
                format!("expected hello, got {}", msg.name()),
            ));
        };
        if self.peer.is_some() {
            return Err(protocol("a second hello"));
        }
        if *version != VERSION {
            return Err(Refusal::new(
                RefuseCode::Version,
                format!("protocol version {version}; this site speaks {VERSION}"),
            ));
        }
        if let Some(id) = &manifest.chain_id {
            if *id != hex(chain_id) {
                return Err(Refusal::new(
                    RefuseCode::WrongPrimary,
                    format!(
                        "this site replicates chain {id}, not {} (use another directory for another disk)",
                        hex(chain_id)
                    ),
                ));
            }
            if *generation < manifest.generation {
                return Err(Refusal::new(
                    RefuseCode::StaleGeneration,
                    format!(
                        "stale primary: generation {generation}, but generation {} has connected since",
                        manifest.generation
                    ),
                ));
            }
        }
        if let Some(size) = manifest.disk_size {
            if size != *disk_size {
                return Err(Refusal::new(
                    RefuseCode::Size,
                    format!("disk size {disk_size} differs from the replica's {size}"),
                ));
            }
        }
        let (last_seq, last_digest) = match manifest.layers.last() {
            Some(l) => (
                l.seq,
                l.digest_bytes().ok_or_else(|| {
                    Refusal::new(RefuseCode::Storage, "manifest digest is not hex")
                })?,
            ),
            None => (0, [0u8; 32]),
        };
        let peer = Peer {
            chain_id: *chain_id,
            generation: *generation,
            disk_size: *disk_size,
        };
        self.peer = Some(peer.clone());
        self.last_seq = last_seq;
        let partial = self.set_offer(offer);
        Ok((
            peer,
            Message::Welcome {
                version: VERSION,
                last_seq,
                last_digest,
                partial,
            },
        ))
    }

    /// Offers a partial layer after the hello (ignored unless it is the next
    /// layer and partial); returns what the welcome says of it.
    pub fn set_offer(&mut self, offer: Option<Offer>) -> Option<Partial> {
        self.offer =
            offer.filter(|o| o.seq == self.last_seq + 1 && o.offset > 0 && o.offset <= o.file_len);
        self.offer.as_ref().map(|o| Partial {
            file_len: o.file_len,
            sealed_at_ms: o.sealed_at_ms,
            offset: o.offset,
        })
    }

    /// A layer begins: it must be the next one, and only the base has no parent.
    pub fn begin(&mut self, msg: Message) -> Result<&Incoming, Refusal> {
        let Message::LayerBegin {
            seq,
            format,
            file_len,
            sealed_at_ms,
            has_parent,
            name,
        } = msg
        else {
            return Err(protocol(format!(
                "expected layer-begin, got {}",
                msg.name()
            )));
        };
        if self.peer.is_none() {
            return Err(protocol("layer before hello"));
        }
        if let Some(i) = &self.incoming {
            return Err(protocol(format!(
                "layer {seq} begins inside layer {}",
                i.seq
            )));
        }
        if Some(seq) != self.last_seq.checked_add(1) {
            return Err(protocol(format!(
                "layer {seq} does not follow layer {}",
                self.last_seq
            )));
        }
        if has_parent != (seq > 1) {
            return Err(protocol(format!(
                "layer {seq} {} a parent",
                if has_parent { "has" } else { "lacks" }
            )));
        }
        if format == WireFormat::Raw && has_parent {
            return Err(protocol("a raw layer cannot have a parent"));
        }
        // The offer holds for the first layer of the session only.
        let resume_from = match self.offer.take() {
            Some(o)
                if o.seq == seq
                    && o.format == format
                    && o.file_len == file_len
                    && o.sealed_at_ms == sealed_at_ms
                    && o.name == name =>
            {
                o.offset
            }
            _ => 0,
        };
        Ok(self.incoming.insert(Incoming {
            seq,
            format,
            file_len,
            sealed_at_ms,
            has_parent,
            name,
            resume_from,
            digest: LayerDigest::new(file_len),
        }))
    }

    /// A chunk of a resumed layer that the site already holds (below
    /// `resume_from`), read back from its partial file, in order.
    pub fn replay(&mut self, seq: u64, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        match &self.incoming {
            Some(i) if offset < i.resume_from => {}
            _ => return Err(protocol(format!("replay of a chunk at {offset:#x}"))),
        }
        self.add(seq, offset, data).map(|_| ())
    }

    /// A chunk of the current layer: returns where to write it.
    pub fn chunk(&mut self, seq: u64, offset: u64, data: &[u8]) -> Result<u64, Refusal> {
        if let Some(i) = &self.incoming {
            if offset < i.resume_from {
                return Err(protocol(format!(
                    "chunk at {offset:#x} of a layer resumed at {:#x}",
                    i.resume_from
                )));
            }
        }
        self.add(seq, offset, data)
    }

    fn add(&mut self, seq: u64, offset: u64, data: &[u8]) -> Result<u64, Refusal> {
        let i = self
            .incoming
            .as_mut()
            .ok_or_else(|| protocol("chunk outside a layer"))?;
        if i.seq != seq {
            return Err(protocol(format!(
                "chunk of layer {seq} inside layer {}",
                i.seq
            )));
        }
        i.digest
            .add(offset, data)
            .map_err(|e| protocol(format!("layer {seq}: {e}")))?;
        Ok(offset)
    }

    /// The layer ends: the chunk count and digest must match what arrived.
    pub fn end(&mut self, msg: Message) -> Result<Completed, Refusal> {
        let Message::LayerEnd {
            seq,
            chunks,
            digest,
        } = msg
        else {
            return Err(protocol(format!("expected layer-end, got {}", msg.name())));
        };
        let i = self
            .incoming
            .take()
            .ok_or_else(|| protocol("layer-end outside a layer"))?;
        if i.seq != seq {
            return Err(protocol(format!(
                "end of layer {seq} inside layer {}",
                i.seq
            )));
        }
        if i.digest.chunks() != chunks {
            return Err(Refusal::new(
                RefuseCode::Digest,
                format!(
                    "layer {seq}: {} chunks arrived, the sender sent {chunks}",
                    i.digest.chunks()
                ),
            ));
        }
        let found = i.digest.finish();
        if found != digest {
            return Err(Refusal::new(
                RefuseCode::Digest,
                format!(
                    "layer {seq}: digest {} of the bytes received differs from the sender's {}",
                    hex(&found),
                    hex(&digest)
                ),
            ));
        }
        Ok(Completed {
            seq,
            format: i.format,
            file_len: i.file_len,
            sealed_at_ms: i.sealed_at_ms,
            has_parent: i.has_parent,
            name: i.name,
            digest,
        })
    }

    /// The layer is committed: the next one may begin.
    pub fn committed(&mut self, seq: u64) {
        self.last_seq = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::LayerRecord;
    use crate::proto::CHUNK;

    fn hello(id: u8, generation: u64) -> Message {
        Message::Hello {
            version: VERSION,
            chain_id: [id; 16],
            generation,
            disk_size: 1 << 20,
        }
    }

    fn manifest_with(id: u8, generation: u64, layers: u64) -> Manifest {
        Manifest {
            chain_id: Some(hex(&[id; 16])),
            generation,
            disk_size: Some(1 << 20),
            layers: (1..=layers)
                .map(|seq| LayerRecord {
                    seq,
                    file: format!("layer-{seq:06}.qcow2"),
                    format: "qcow2".into(),
                    file_len: 1,
                    digest: hex(&[seq as u8; 32]),
                    sealed_at_ms: seq,
                    received_at_ms: seq,
                    primary_name: String::new(),
                    merged_from: None,
                    retired: false,
                })
                .collect(),
            ..Manifest::default()
        }
    }

    fn begin(seq: u64, file_len: u64, has_parent: bool) -> Message {
        Message::LayerBegin {
            seq,
            format: WireFormat::Qcow2,
            file_len,
            sealed_at_ms: 1,
            has_parent,
            name: "x".into(),
        }
    }

    /// A partial layer offered in the welcome resumes only for the same
    /// layer: the site's own chunks are replayed below the offset, the
    /// sender's start at it, and the digest is the whole layer's.
    #[test]
    fn a_partial_layer_resumes_only_for_the_same_layer() {
        let offer = Offer {
            seq: 4,
            format: WireFormat::Qcow2,
            file_len: 3 * CHUNK,
            sealed_at_ms: 1,
            name: "x".into(),
            offset: 2 * CHUNK,
        };
        let chunks: Vec<Vec<u8>> = (1..=3u8).map(|b| vec![b; CHUNK as usize]).collect();
        let mut whole = LayerDigest::new(3 * CHUNK);
        for (i, c) in chunks.iter().enumerate() {
            whole.add(i as u64 * CHUNK, c).unwrap();
        }
        let whole = whole.finish();
        // Another layer 4 (another seal time): a fresh start.
        let mut s = Session::new();
        let (_, w) = s
            .hello_with(&hello(1, 5), &manifest_with(1, 4, 3), Some(offer.clone()))
            .unwrap();
        assert!(matches!(w, Message::Welcome { partial: Some(p), .. } if p.offset == 2 * CHUNK));
        let mut other = begin(4, 3 * CHUNK, true);
        if let Message::LayerBegin { sealed_at_ms, .. } = &mut other {
            *sealed_at_ms = 2;
        }
        assert_eq!(s.begin(other).unwrap().resume_from, 0);
        // An offer for a layer that is not the next one is not made.
        let mut s = Session::new();
        let (_, w) = s
            .hello_with(&hello(1, 5), &manifest_with(1, 4, 2), Some(offer.clone()))
            .unwrap();
        assert!(matches!(w, Message::Welcome { partial: None, .. }));
        // The same layer resumes.
        let mut s = Session::new();
        s.hello_with(&hello(1, 5), &manifest_with(1, 4, 3), Some(offer))
            .unwrap();
        assert_eq!(
            s.begin(begin(4, 3 * CHUNK, true)).unwrap().resume_from,
            2 * CHUNK
        );
        assert!(s.chunk(4, 0, &chunks[0]).is_err(), "the site's part");
        s.replay(4, 0, &chunks[0]).unwrap();
        s.replay(4, CHUNK, &chunks[1]).unwrap();
        assert!(
            s.replay(4, 2 * CHUNK, &chunks[2]).is_err(),
            "the sender's part"
        );
        s.chunk(4, 2 * CHUNK, &chunks[2]).unwrap();
        let done = s
            .end(Message::LayerEnd {
                seq: 4,
                chunks: 3,
                digest: whole,
            })
            .unwrap();
        assert_eq!(done.digest, whole);
    }

    #[test]
    fn an_empty_site_accepts_and_resumes_from_nothing() {
        let mut s = Session::new();
        let (peer, w) = s.hello(&hello(1, 1), &Manifest::default()).unwrap();
        assert_eq!(peer.generation, 1);
        assert!(matches!(w, Message::Welcome { last_seq: 0, .. }));
        assert!(s.hello(&hello(1, 1), &Manifest::default()).is_err());
    }

    #[test]
    fn resume_point_is_the_last_committed_layer() {
        let mut s = Session::new();
        let (_, w) = s.hello(&hello(1, 5), &manifest_with(1, 4, 3)).unwrap();
        assert_eq!(
            w,
            Message::Welcome {
                version: VERSION,
                last_seq: 3,
                last_digest: [3; 32],
                partial: None,
            }
        );
        assert!(s.begin(begin(3, 10, true)).is_err(), "already have 3");
        assert!(s.begin(begin(5, 10, true)).is_err(), "gap");
        assert!(
            s.begin(begin(4, 10, false)).is_err(),
            "no parent above the base"
        );
        s.begin(begin(4, 10, true)).unwrap();
    }

    #[test]
    fn wrong_and_stale_primaries_are_refused() {
        let m = manifest_with(1, 7, 2);
        let code = |msg: Message| Session::new().hello(&msg, &m).unwrap_err().code;
        assert_eq!(code(hello(2, 9)), RefuseCode::WrongPrimary);
        assert_eq!(code(hello(1, 6)), RefuseCode::StaleGeneration);
        let mut big = hello(1, 7);
        if let Message::Hello { disk_size, .. } = &mut big {
            *disk_size *= 2;
        }
        assert_eq!(code(big), RefuseCode::Size);
        let mut old = hello(1, 7);
        if let Message::Hello { version, .. } = &mut old {
            *version = 99;
        }
        assert_eq!(code(old), RefuseCode::Version);
        assert!(Session::new().hello(&hello(1, 7), &m).is_ok());
    }

    #[test]
    fn a_layer_completes_only_with_its_digest() {
        let len = CHUNK + 10;
        let c0 = vec![3u8; CHUNK as usize];
        let c1 = vec![4u8; 10];
        let mut d = LayerDigest::new(len);
        d.add(0, &c0).unwrap();
        d.add(CHUNK, &c1).unwrap();
        let digest = d.finish();
        for (chunks, dig, ok) in [(2, digest, true), (3, digest, false), (2, [0; 32], false)] {
            let mut s = Session::new();
            s.hello(&hello(1, 1), &Manifest::default()).unwrap();
            s.begin(Message::LayerBegin {
                seq: 1,
                format: WireFormat::Raw,
                file_len: len,
                sealed_at_ms: 1,
                has_parent: false,
                name: "base".into(),
            })
            .unwrap();
            assert!(s.chunk(2, 0, &c0).is_err(), "wrong layer");
            s.chunk(1, 0, &c0).unwrap();
            s.chunk(1, CHUNK, &c1).unwrap();
            let r = s.end(Message::LayerEnd {
                seq: 1,
                chunks,
                digest: dig,
            });
            assert_eq!(r.is_ok(), ok, "{chunks} {dig:?}");
            if !ok {
                assert_eq!(r.unwrap_err().code, RefuseCode::Digest);
            }
        }
    }

    #[test]
    fn nothing_before_hello() {
        let mut s = Session::new();
        assert!(s.begin(begin(1, 1, false)).is_err());
        assert!(s.chunk(1, 0, &[1]).is_err());
        assert!(s
            .end(Message::LayerEnd {
                seq: 1,
                chunks: 0,
                digest: [0; 32]
            })
            .is_err());
    }
}
