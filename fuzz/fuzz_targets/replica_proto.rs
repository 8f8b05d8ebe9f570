//! A hostile replication peer: the input is a byte stream of frames. Every
//! frame that decodes re-encodes to the same bytes; the decoded messages
//! drive a receiver session (hello, layers, chunks, ends) against an empty
//! site and then one that already holds layers: nothing panics, and a layer
//! completes only with the digest of the chunks it was given. The site's
//! stream reader (`wire::FrameReader`, which places chunk data aligned for
//! O_DIRECT) reads the same frames as the codec, and fails where it fails.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_replica::manifest::{LayerRecord, Manifest};
use tandem_replica::proto::{decode_from, hex, LayerDigest, Message};
use tandem_replica::session::Session;
use tandem_replica::wire::{Frame, FrameReader, DATA_ALIGN};

/// Reads the stream with the site's frame reader, frame by frame beside
/// the codec, until either stops.
fn frame_reader_agrees(data: &[u8]) {
    let mut r = data;
    let mut fr = FrameReader::default();
    let mut pos = 0;
    let mut spare = Vec::new();
    loop {
        let expected = decode_from(&data[pos..]);
        let got = fr.next(&mut r);
        let m = match (expected, got) {
            (Ok(Some((m, used))), Ok(Some(frame))) => {
                pos += used;
                match frame {
                    Frame::Chunk { seq, offset, data } => {
                        let ours = Message::Chunk {
                            seq,
                            offset,
                            data: data.to_vec(),
                        };
                        assert_eq!(ours, m);
                    }
                    Frame::Other(o) => {
                        assert_eq!(o, m);
                        continue;
                    }
                }
                m
            }
            // Clean end, a cut frame, or a bad one: both stop.
            (Ok(None), Ok(None) | Err(_)) | (Err(_), Err(_)) => return,
            (e, g) => panic!("codec {e:?}, frame reader {:?}", g.map(|f| f.is_some())),
        };
        let Message::Chunk { data: want, .. } = m else {
            unreachable!()
        };
        let c = fr.take_chunk(spare);
        assert_eq!(c.data(), &want[..]);
        assert_eq!(c.data().as_ptr() as usize % DATA_ALIGN, 0);
        spare = c.into_buffer();
    }
}

fn drive(msgs: &[Message], manifest: &Manifest) {
    let mut s = Session::new();
    let mut shadow: Option<LayerDigest> = None;
    for m in msgs {
        match m {
            Message::Hello { .. } => {
                let _ = s.hello(m, manifest);
            }
            Message::LayerBegin { file_len, .. } => {
                if s.begin(m.clone()).is_ok() {
                    shadow = Some(LayerDigest::new(*file_len));
                }
            }
            Message::Chunk { seq, offset, data } => {
                if s.chunk(*seq, *offset, data).is_ok() {
                    if let Some(d) = shadow.as_mut() {
                        d.add(*offset, data).expect("the session accepted what the digest refuses");
                    }
                }
            }
            Message::LayerEnd { .. } => {
                let expected = shadow.take().map(|d| d.finish());
                if let Ok(done) = s.end(m.clone()) {
                    assert_eq!(Some(done.digest), expected);
                    s.committed(done.seq);
                }
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    frame_reader_agrees(data);
    let mut msgs = Vec::new();
    let mut pos = 0;
    while pos < data.len() && msgs.len() < 64 {
        match decode_from(&data[pos..]) {
            Ok(Some((m, used))) => {
                assert_eq!(m.encode(), data[pos..pos + used].to_vec());
                msgs.push(m);
                pos += used;
            }
            Ok(None) => break,
            // Skip a byte and try again, as a confused stream would.
            Err(_) => pos += 1,
        }
    }
    drive(&msgs, &Manifest::default());
    let held = Manifest {
        chain_id: Some(hex(&[0; 16])),
        generation: 1,
        disk_size: Some(1 << 21),
        layers: vec![LayerRecord {
            seq: 1,
            file: "layer-000001.img".into(),
            format: "raw".into(),
            file_len: 1 << 21,
            digest: hex(&[0; 32]),
            sealed_at_ms: 0,
            received_at_ms: 0,
            primary_name: String::new(),
            merged_from: None,
            retired: false,
        }],
        ..Manifest::default()
    };
    drive(&msgs, &held);
});
